"""summary: print the results table of the last pipeline run (what `make run` ends with).

reads   metrics/{quality,latency,export}.json, params.yaml
writes  nothing (prints a table)
"""

from __future__ import annotations

import sys

from pruneflow.params import Params
from pruneflow.report import results_markdown, results_table
from pruneflow.runtime import Layout, stage_main


def run(params: Params, layout: Layout) -> dict:
    """Print the dense vs pruned table of the last run."""
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(results_markdown(results_table(layout.root, params))))
    return {}


if __name__ == "__main__":
    sys.exit(stage_main("summary", run))
