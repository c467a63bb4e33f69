"""Load a merged model directory once: model, tokenizer, schema.json, family, and a generate lock."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from core.families import (  # noqa: E402
    WEIGHT_PATTERNS,
    Family,
    detect_family,
    load_model,
    load_tokenizer,
    read_model_config,
    torch_dtype,
)
from core.safe_io import TMP_MARK  # noqa: E402
from model.allocator import keep_freed_memory  # noqa: E402

LOAD_COUNT = 0  # how many models this process loaded (the app must load one once)


class ModelLoadError(RuntimeError):
    """A model directory that cannot be served, with what to do about it."""


@dataclass
class LoadedModel:
    path: Path
    model: object
    tokenizer: object
    schema: dict
    family: Family
    device: str
    dtype: str
    n_params: int
    seconds: float
    # One generate at a time per model: several browser sessions share it.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self) -> dict:
        return {
            "path": str(self.path),
            "family": self.family.name,
            "parameters": self.n_params,
            "device": self.device,
            "dtype": self.dtype,
            "labels": list(self.schema.get("labels", [])),
            "predicates": sorted(self.schema.get("predicates", {})),
            "load_seconds": round(self.seconds, 2),
        }


def check_model_dir(path: Path) -> None:
    """Raise ModelLoadError naming what is wrong with a directory, before touching torch."""
    hint = "make one with: python -m finetune.train ... && python -m finetune.merge --run runs/NAME (or make demo)"
    if not path.exists():
        raise ModelLoadError(f"no model at {path}; {hint}")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, expected a merged model directory")
    if TMP_MARK in path.name or ".tmp-" in path.name:
        raise ModelLoadError(f"{path} is a temporary directory of an unfinished merge; rerun finetune.merge")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a model directory; {hint}")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(f"{path} has no weights (*.safetensors): half-written or not a merged model; rerun merge")
    if not (path / "schema.json").is_file():
        raise ModelLoadError(
            f"{path} has no schema.json (labels, predicates, prompt layout); merge a run of finetune.train into it"
        )


def read_schema(path: Path) -> dict:
    try:
        schema = json.loads((path / "schema.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path / 'schema.json'} is unreadable: {err}") from None
    for key in ("labels", "predicates", "prompt"):
        if key not in schema:
            raise ModelLoadError(f"{path / 'schema.json'} lacks '{key}'; it was not written by finetune.train")
    return schema


def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but no CUDA GPU is available")
    return device


def load_merged(path: str | Path, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load a merged model dir: cuda -> fp16, cpu -> fp32 unless dtype is given."""

    global LOAD_COUNT
    path = Path(path)
    check_model_dir(path)
    schema = read_schema(path)
    try:
        config = read_model_config(path)
    except Exception as err:  # noqa: BLE001 - any unreadable config is the same user problem
        raise ModelLoadError(f"{path / 'config.json'} is unreadable: {err}") from None
    family = detect_family(config)
    if getattr(config, "model_type", None) is None:
        raise ModelLoadError(f"{path}: config.json has no model_type; unknown model family")
    device = pick_device(device)
    dtype = dtype or ("fp16" if device.startswith("cuda") else "fp32")
    dtype_of_weights = torch_dtype(dtype)
    started = time.time()
    try:
        tokenizer = load_tokenizer(path, family)
        model = load_model(path, family, torch_dtype=dtype_of_weights)
    except Exception as err:  # noqa: BLE001 - surface as one clear message, not a traceback
        raise ModelLoadError(f"could not load {path} as a {family.name} model: {type(err).__name__}: {err}") from None
    model = model.to(device=device, dtype=dtype_of_weights).eval()
    tokenizer.padding_side = "left"  # batched generation continues every row from its last real token
    # On a CPU the KV cache lives in process memory: see model.allocator for why and what it costs.
    allocator = " (glibc keeps freed memory)" if device == "cpu" and keep_freed_memory() else ""
    LOAD_COUNT += 1
    n_params = sum(p.numel() for p in model.parameters())
    seconds = time.time() - started
    print(f"loaded model {path} ({family.name}, {n_params:,} params, {device}/{dtype}) in {seconds:.1f}s{allocator}",
          file=sys.stderr, flush=True)
    return LoadedModel(path, model, tokenizer, schema, family, device, dtype, n_params, seconds)
