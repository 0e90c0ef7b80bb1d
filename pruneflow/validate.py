"""`python -m pruneflow.validate [params.yaml] [--set k=v ...]`: the whole params check, registries included.

Every stage validates the structure of the whole params file at start (pruneflow/params.py). What the method
and task registries accept (rank.method, rank.<method> options, sparsify.methods and options, task.kind) is checked by the stages that use
them and here, so `make run` and the Prefect flows fail on any bad key before the first stage runs.
"""

from __future__ import annotations

import argparse
import sys

from pruneflow.params import Params, ParamsError, load_params, parse_overrides


def check_all(params: Params) -> Params:
    from pruneflow.methods import check_rank_params
    from pruneflow.sparsify import check_sparsify_params
    from pruneflow.tasks import get_task

    check_rank_params(params.rank)
    check_sparsify_params(params.sparsify)
    try:
        get_task(params.task.kind)
    except ValueError as err:
        raise ParamsError(str(err)) from None
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruneflow.validate", description=__doc__.split("\n")[0])
    parser.add_argument("params", nargs="?", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        check_all(load_params(args.params, parse_overrides(args.overrides)))
    except ParamsError as err:
        print(f"[validate] error: {err}", file=sys.stderr)
        return 2
    print(f"{args.params}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
