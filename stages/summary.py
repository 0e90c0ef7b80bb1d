"""summary: print the results table of the last pipeline run (what `make run` ends with).

reads   metrics/{quality,latency,export}.json, params.yaml (the causal LM's, with `--params lm/params.yaml
        --metrics metrics/lm`: metrics/lm/quality.json)
writes  nothing (prints a table)
"""

from __future__ import annotations

import sys

from pruneflow.params import Params
from pruneflow.artifacts import read_json
from pruneflow.report import quality_markdown, results_markdown, results_table
from pruneflow.runtime import Layout, stage_main


def run(params: Params, layout: Layout) -> dict:
    """Print the dense vs pruned table of the last run."""
    from rich.console import Console
    from rich.markdown import Markdown

    if params.task.kind == "classification":
        Console().print(Markdown(results_markdown(results_table(layout.root, params))))
    else:
        quality = layout.metrics / "quality.json"
        if not quality.exists():
            raise FileNotFoundError(f"{quality} not found: run the pipeline first")
        Console().print(Markdown(f"## pruneflow results ({params.task.kind})\n\n"
                                 + quality_markdown(read_json(quality), params.task.kind)))
    return {}


if __name__ == "__main__":
    sys.exit(stage_main("summary", run))
