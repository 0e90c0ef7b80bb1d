"""Typed params (pruneflow.params) and the stage CLI wrapper (pruneflow.runtime.stage_main).

It proves: the defaults and the repo's params.yaml validate; unknown keys (top level and nested) fail with a
ParamsError naming the dotted key and listing the known keys there; out-of-range and wrongly typed values fail
naming the key (select.budget must lie in (0, 1]); correct.method=none is accepted with sequential=true
(it fits nothing); `apply_overrides` sets dotted keys without touching its input; a missing params file is a
ParamsError; `stage_main` turns a bad `--set` into exit code 2 and a `[name] error:` message, no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pruneflow.params import (
    Params, ParamsError, SelectParams, apply_overrides, load_params, read_raw, validate_params,
)
from pruneflow.runtime import stage_main

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(raw) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(raw, "params.yaml")
    return str(info.value)


# --- valid --------------------------------------------------------------------------------------------------

def test_defaults_validate():
    assert validate_params(None) == Params()
    assert validate_params({}) == Params()
    dumped = Params().model_dump(mode="json")
    assert validate_params(dumped) == Params()  # the defaults round-trip through YAML-able data
    assert validate_params(yaml.safe_load(yaml.safe_dump(dumped))) == Params()


def test_repo_params_yaml_validates():
    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    assert 0 < p.select.budget <= 1


def test_budget_one_is_allowed():
    assert validate_params({"select": {"budget": 1.0}}).select.budget == 1.0
    assert validate_params({"select": {"budget": 1}}).select.budget == 1.0


def test_params_are_frozen():
    p = Params()
    with pytest.raises(Exception):
        p.select.budget = 0.3  # type: ignore[misc]


# --- unknown keys -----------------------------------------------------------------------------------------------

def test_unknown_top_level_key_names_it_and_lists_sections():
    msg = error_of({"selct": {"budget": 0.5}})
    assert "selct" in msg and "unknown key" in msg
    for section in Params.model_fields:
        assert section in msg


def test_unknown_nested_key_names_dotted_path_and_known_keys():
    msg = error_of({"select": {"budgett": 0.5}})
    assert "select.budgett" in msg and "unknown key" in msg
    for key in SelectParams.model_fields:
        assert key in msg
    from pruneflow.validate import check_all

    with pytest.raises(ParamsError) as info:  # a method's options are its registered class's to check
        check_all(validate_params({"rank": {"kcm": {"sigmaa": 1.0}}}))
    assert "rank.kcm.sigmaa" in str(info.value) and "representation" in str(info.value)
    with pytest.raises(ParamsError, match="rank.method='kcmm' is not a registered method"):
        check_all(validate_params({"rank": {"method": "kcmm"}}))
    assert "rank.foo" in error_of({"rank": {"foo": 1}})


# --- values -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, 0.0, 1.5, -0.1, 1.0001])
def test_budget_out_of_range_fails_naming_the_key(budget):
    msg = error_of({"select": {"budget": budget}})
    assert "select.budget" in msg
    assert repr(budget) in msg or str(budget) in msg


def test_wrong_type_fails_naming_the_key():
    msg = error_of({"select": {"budget": "half"}})
    assert "select.budget" in msg and "'half'" in msg
    msg = error_of({"benchmark": {"batch_sizes": [1, 0]}})
    assert "benchmark.batch_sizes" in msg


def test_sequential_with_method_none_is_allowed_and_fits_nothing():
    # `dvc exp run -S correct.method=none` must work with the default sequential=true: none fits nothing.
    assert validate_params({"correct": {"sequential": True, "method": "none"}}).correct.method == "none"
    for ok in ("bias", "rescale", "lstsq"):
        assert validate_params({"correct": {"sequential": True, "method": ok}}).correct.sequential


def test_several_problems_are_all_reported():
    msg = error_of({"select": {"budget": 2, "min_heads": -1}, "bogus": 1})
    assert "select.budget" in msg and "select.min_heads" in msg and "bogus" in msg


# --- overrides and files ---------------------------------------------------------------------------------------

def test_apply_overrides_sets_dotted_keys_on_a_copy():
    raw = {"select": {"budget": 0.5}, "rank": {"kcm": {"sigma": "median"}}}
    out = apply_overrides(raw, {"select.budget": 0.4, "rank.kcm.sigma": 2.0, "correct.method": "bias"})
    assert out == {"select": {"budget": 0.4}, "rank": {"kcm": {"sigma": 2.0}}, "correct": {"method": "bias"}}
    assert raw == {"select": {"budget": 0.5}, "rank": {"kcm": {"sigma": "median"}}}  # input untouched
    p = validate_params(out)
    assert p.select.budget == 0.4 and p.rank.section("kcm")["sigma"] == 2.0 and p.correct.method == "bias"
    assert apply_overrides(None, {"select.budget": 0.3}) == {"select": {"budget": 0.3}}
    with pytest.raises(ParamsError, match="not a section"):
        apply_overrides(raw, {"select.budget.x": 1})


def test_load_params_applies_overrides_then_validates(tmp_path):
    path = write(tmp_path, {"select": {"budget": 0.5}})
    assert load_params(path, {"select.budget": 0.25}).select.budget == 0.25
    with pytest.raises(ParamsError, match="select.budget"):
        load_params(path, {"select.budget": 1.5})
    with pytest.raises(ParamsError, match=r"select\.budgett"):
        load_params(path, {"select.budgett": 0.5})


def test_missing_params_file_raises(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not found"):
        read_raw(tmp_path / "nope.yaml")


def test_non_mapping_params_file_raises(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(path)
    path.write_text("")
    assert load_params(path) == Params()  # an empty file means all defaults


# --- the CLI wrapper -------------------------------------------------------------------------------------------

def dummy_run(calls: list):
    def run(params, layout):
        """A stage that records its params."""
        calls.append(params)
        return {"ok": 1}
    return run


def test_stage_main_bad_override_exits_2_with_a_clear_error(tmp_path, capsys):
    calls: list = []
    path = write(tmp_path, Params().model_dump(mode="json"))
    code = stage_main("select", dummy_run(calls), ["--params", str(path), "--root", str(tmp_path),
                                                   "--set", "select.budget=1.5"])
    assert code == 2
    assert calls == []  # the stage never ran
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("[select] error:")]) == 1
    assert lines[0].startswith("[select] error:")
    assert "select.budget" in err and "1.5" in err
    assert "Traceback" not in err


def test_stage_main_error_is_one_line(tmp_path, capsys):
    path = write(tmp_path, Params().model_dump(mode="json"))
    assert stage_main("select", dummy_run([]), ["--params", str(path), "--set", "select.budget=1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("[select] error:") and "select.budget" in err
    assert len(err.splitlines()) == 1, err


def test_stage_main_other_user_errors_exit_2(tmp_path, capsys):
    assert stage_main("rank", dummy_run([]), ["--params", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("[rank] error:")
    path = write(tmp_path, {})
    assert stage_main("rank", dummy_run([]), ["--params", str(path), "--set", "select.budget"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_stage_main_passes_overrides_to_the_stage(tmp_path):
    calls: list = []
    path = write(tmp_path, {"select": {"budget": 0.5}})
    assert stage_main("select", dummy_run(calls), ["--params", str(path), "--root", str(tmp_path),
                                                   "--set", "select.budget=0.4", "--set", "correct.method=bias"]) == 0
    assert len(calls) == 1
    assert calls[0].select.budget == 0.4 and calls[0].correct.method == "bias"


def test_nm_patterns_stay_strings_when_dvc_writes_them_unquoted(tmp_path):
    """DVC (ruamel, YAML 1.2) writes an overridden "2:4" back as plain 2:4, which YAML 1.1 reads as the base-60
    integer 124: pruneflow reads params with 1.2's integers, so the pattern survives `dvc exp run -S`."""
    from pruneflow.params import load_params, parse_overrides

    path = tmp_path / "params.yaml"
    path.write_text("sparsify:\n  patterns:\n  - 2:4\n  - 50%\nselect:\n  budget: 0.5\n  min_neurons: 16\n")
    p = load_params(path)
    assert p.sparsify.patterns == ["2:4", "50%"] and p.select.min_neurons == 16
    assert parse_overrides(["sparsify.patterns=[4:8]"]) == {"sparsify.patterns": ["4:8"]}


def test_a_dataset_applies_its_overrides_then_the_cli_ones(tmp_path):
    path = write(tmp_path, {"select": {"budget": 0.5},
                            "datasets": {"amazon": {"prepare.source": "amazon_snippets", "select.budget": 0.4}}})
    assert load_params(path).prepare.source == "rt_snippets"
    p = load_params(path, dataset="amazon")
    assert (p.prepare.source, p.select.budget) == ("amazon_snippets", 0.4)
    assert load_params(path, {"select.budget": 0.3}, "amazon").select.budget == 0.3
    with pytest.raises(ParamsError, match=r"no dataset 'tweets'.*known: amazon"):
        load_params(path, dataset="tweets")


@pytest.mark.parametrize("datasets,match", [
    ({"amazon": {"prepare.sourc": "amazon_snippets"}}, r"(?s)datasets\.amazon.*prepare\.sourc: unknown key"),
    ({"amazon": {"select.budget": 1.5}}, r"(?s)datasets\.amazon.*select\.budget"),
    ({"Amazon Reviews": {}}, "lower-case"),
    ({"amazon": {"datasets.x": {}}}, "may not change"),
])
def test_a_bad_dataset_entry_fails_when_the_file_is_validated(tmp_path, datasets, match):
    with pytest.raises(ParamsError, match=match):
        load_params(write(tmp_path, {"datasets": datasets}))


def test_stage_main_dataset_flag(tmp_path, capsys):
    calls: list = []
    path = write(tmp_path, {"datasets": {"tweets": {"prepare.source": "tweet_snippets"}}})
    assert stage_main("prepare", dummy_run(calls), ["--params", str(path), "--dataset", "tweets"]) == 0
    assert calls[0].prepare.source == "tweet_snippets"
    assert stage_main("prepare", dummy_run(calls), ["--params", str(path), "--dataset", "nyt"]) == 2
    assert "no dataset 'nyt'" in capsys.readouterr().err
