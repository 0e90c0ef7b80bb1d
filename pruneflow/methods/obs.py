"""obs: greedy removal of the units whose removal raises the sublayer's least-squares reconstruction error
least, with the exact multiple-removal update of the remaining output-projection columns (the optimal brain
surgeon / APT formula applied to structured units; pruneflow/scoring.py does the math)."""

from __future__ import annotations

from pruneflow.methods.base import Method, register


@register
class OBS(Method):
    name = "obs"
    greedy = True
