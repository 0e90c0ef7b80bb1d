"""assets: fetch the packaged real data the default pipeline reads, pinned and checksummed.

reads   the package registry (PyPI): the vadersentiment 3.3.2 *source* distribution, which holds the Rotten
        Tomatoes sentences (its wheel does not)
writes  assets/vaderSentiment-3.3.2.tar.gz (a DVC output, so an experiment's temporary workspace, which holds
        only what git or DVC tracks, gets it from the DVC cache instead of downloading it again)
params  none
"""

from __future__ import annotations

import sys

from pruneflow.packaged import Pinned, fetch
from pruneflow.params import Params
from pruneflow.runtime import Layout, stage_main

# pinned by sha256: a changed upload must not change our data
ASSETS = [Pinned("vaderSentiment-3.3.2.tar.gz", "pip-sdist", "vadersentiment==3.3.2",
                 "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")]


def run(params: Params, layout: Layout) -> dict:
    """Download the pinned packaged assets (skipped for a file already there with the right hash)."""
    for asset in ASSETS:
        fetch(asset, layout / "assets")
    return {"assets": len(ASSETS)}


if __name__ == "__main__":
    sys.exit(stage_main("assets", run))
