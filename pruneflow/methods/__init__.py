"""Ranking methods, one file each, registered by name (see base.py)."""

from pruneflow.methods import activation, bonsai, kcm, magnitude, obs, random  # noqa: F401  (registration)
from pruneflow.methods.base import METHODS, Method, RankContext, register  # noqa: F401
from pruneflow.params import ParamsError, RankParams


def check_rank_params(p: RankParams) -> None:
    """rank.method and rank.heads name registered methods, and every rank.<method> section is valid for that
    method's class (unknown keys, types, ranges); ParamsError naming the dotted key otherwise."""
    from pydantic import ValidationError

    known = ", ".join(sorted(METHODS))
    if p.method not in METHODS:
        raise ParamsError(f"rank.method={p.method!r} is not a registered method (registered: {known})")
    if p.heads != "auto" and (p.heads not in METHODS or not METHODS[p.heads].ranks_heads):
        heads = ", ".join(["auto"] + sorted(n for n, m in METHODS.items() if m.ranks_heads))
        raise ParamsError(f"rank.heads={p.heads!r} is not a method that ranks heads (choose from: {heads})")
    for key in p.model_extra or {}:
        if key not in METHODS:
            fields = ", ".join(sorted(RankParams.model_fields))
            raise ParamsError(f"rank.{key}: unknown key (known here: {fields}, or a method's options section: {known})")
        try:
            METHODS[key].model_validate(p.section(key))
        except ValidationError as err:
            fields = ", ".join(sorted(METHODS[key].model_fields))
            raise ParamsError("; ".join(
                f"rank.{key}." + ".".join(str(x) for x in e["loc"]) + ": "
                + ("unknown key" + (f" (known here: {fields})" if fields else f" ({key} has no options)")
                   if e["type"] == "extra_forbidden" else e["msg"])
                for e in err.errors())) from None


def method_options(p: RankParams, name: str) -> Method:
    """The validated options of method `name` (its class's defaults where params.yaml says nothing)."""
    check_rank_params(p)
    return METHODS[name].model_validate(p.section(name))


def method_names() -> list[str]:
    return sorted(METHODS)
