"""Merge a trained LoRA adapter into its base model and save a standalone fp16 model.

    python -m finetune.merge --run runs/NAME [--output-dir runs/NAME/merged] [--dtype fp16|bf16|fp32]

The merged model is written to a temporary sibling directory, checked (its logits must equal the
adapter model's on a few prompts), and only then renamed into place: a crash or a kill never
leaves a half-written model where the app looks for one. Running it twice is harmless.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from core import safe_io
from core.config import parse_config
from core.dataset import PROMPT_TEMPLATE
from core.families import (
    DTYPE_NAMES,
    Family,
    LaneError,
    detect_family,
    load_model,
    load_tokenizer,
    read_model_config,
    torch_dtype,
)
from core.safe_io import OLD_MARK, TMP_MARK, OutputError, OutputLock, check_writable, recover_dir, side_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Verification prompts: one of each task, short and long. Characters a tokenizer lacks become
# <unk>, which is fine: the check compares two models on the same ids.
VERIFY_TEXTS = [
    "苹果很甜，个头也大，下次还买。",
    "《喜剧之王》是周星驰主演的电影，1999年上映。",
    "酒店位置不错，房间干净，就是早餐一般。",
    "茶树茶网蝽，属半翅目网蝽科冠网椿属的一种昆虫。",
]
# Max |logit difference| allowed between the merged model (reloaded from disk) and the adapter model.
# Half-precision storage rounds every weight, so its tolerance is looser; fp32 must match closely.
TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.05}


@dataclass
class MergeConfig:
    run: str = field(metadata={"help": "run directory written by finetune.train (has train_config.json)"})
    output_dir: str | None = field(default=None, metadata={"help": "default: RUN/merged"})
    dtype: str = field(default="fp16", metadata={"choices": list(DTYPE_NAMES)})
    config: str | None = None


class MergeError(RuntimeError):
    pass


def verify_ids(tokenizer, family: Family, schema: dict) -> list[list[int]]:
    prompt = schema.get("prompt", {})
    instruction = prompt.get("instruction", "")
    phrasings = [p for ps in prompt.get("phrasings", {}).values() for p in ps[:1]] or [""]
    rows = []
    for i, text in enumerate(VERIFY_TEXTS):
        context = PROMPT_TEMPLATE.format(instruction=instruction, phrasing=phrasings[i % len(phrasings)], text=text)
        rows.append(family.build_generation_ids(tokenizer, tokenizer.encode(context, add_special_tokens=False)))
    return rows


def logits_of(model, rows: list[list[int]]):
    """Last-position logits of each row, run one at a time (no padding to get wrong)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu() for ids in rows]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def copy_support_files(base_dir: Path, out_dir: Path) -> None:
    """Remote-code modules (ChatGLM's modeling/tokenization .py) and tokenizer models the save skipped."""
    for path in base_dir.iterdir():
        if path.is_file() and path.suffix in (".py", ".model", ".tiktoken") and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)


def check_output_name(out_dir: Path, family: Family) -> None:
    if family.trust_remote_code and "." in out_dir.name:
        raise MergeError(
            f"--output-dir {out_dir}: a {family.name} model loads its code as a Python module named after its "
            f"directory, so the name may not contain '.'; use e.g. {out_dir.name.replace('.', '_')}"
        )


def recover_or_clean(out_dir: Path) -> None:
    """A merge killed between its two renames left the previous model as RUN/merged_old_<pid>: put it
    back; a half-written merged_tmp_<pid> is deleted (safe_io.recover_dir)."""
    recover_dir(out_dir)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Swap tmp into out_dir with renames only; a kill between them is undone by recover_or_clean."""
    safe_io.replace_dir(tmp, out_dir, side_dir(out_dir, OLD_MARK))


def check_saved(tmp, family, dtype, compute, device, rows, reference, out_dir) -> tuple[float, float]:
    """Reload the saved model the way users will and compare its logits with the adapter model's;
    returns (max |diff|, tolerance) or raises MergeError."""
    import torch

    reloaded = load_model(tmp, family, torch_dtype=compute).to(device=device, dtype=compute).eval()
    saved_diff = max_diff(reference, logits_of(reloaded, rows))
    del reloaded
    tolerance = TOLERANCE[dtype] if compute == torch.float32 else TOLERANCE["bf16"]
    if not saved_diff <= tolerance:  # also catches NaN
        raise MergeError(
            f"merged model differs from the adapter model: max |logit diff| {saved_diff:.4g} "
            f"> {tolerance} ({dtype}); nothing was written to {out_dir}"
        )
    return saved_diff, tolerance


def merge(cfg: MergeConfig) -> Path:
    run = Path(cfg.run)
    train_config_path = run / "train_config.json"
    if not train_config_path.is_file():
        raise MergeError(f"{run}: no train_config.json; --run must be a directory written by finetune.train")
    try:
        train_cfg = json.loads(train_config_path.read_text(encoding="utf-8"))
        train_cfg["base_model"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MergeError(f"{train_config_path} is unreadable or incomplete ({type(err).__name__}: {err}); "
                         "it is written by finetune.train: rerun the training or restore the file") from None
    base_dir = Path(train_cfg["base_model"])
    method = train_cfg.get("method", "lora")
    trained_dir = run / ("adapter" if method == "lora" else "model")
    if not trained_dir.is_dir():
        raise MergeError(f"{trained_dir}: missing; training did not finish (rerun finetune.train with --resume)")
    if method == "lora" and not (base_dir / "config.json").is_file():
        raise MergeError(f"base model {base_dir} (from {train_config_path}) not found: it is needed to merge")
    schema_path = trained_dir / "schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8")) if schema_path.is_file() else {}
    out_dir = Path(cfg.output_dir) if cfg.output_dir else run / "merged"
    try:
        # The merged weights take about what the base model's take at the output dtype.
        check_writable(out_dir.parent, need_bytes=weight_bytes(base_dir if method == "lora" else trained_dir,
                                                                 cfg.dtype), what="--output-dir")
        with OutputLock(out_dir, "finetune.merge"):
            recover_or_clean(out_dir)
            return _merge(cfg, run, train_cfg, base_dir, method, trained_dir, schema, out_dir)
    except OutputError as err:
        raise MergeError(str(err)) from None


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of a model's weights stored as `dtype`: parameter counts from safetensors headers, else
    the weight files' size (a .bin is not read just to count)."""
    per_param = 4 if dtype == "fp32" else 2
    total = 0
    for path in model_dir.glob("*.safetensors"):
        try:
            with path.open("rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
            total += per_param * sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        except (OSError, ValueError, KeyError, TypeError):
            total += path.stat().st_size
    return total + sum(p.stat().st_size for p in model_dir.glob("pytorch_model*.bin"))


def _merge(cfg, run, train_cfg, base_dir, method, trained_dir, schema, out_dir) -> Path:
    import torch


    family = detect_family(read_model_config(trained_dir if method == "full" else base_dir))
    check_output_name(out_dir, family)
    use_cuda = torch.cuda.is_available()
    # On CPU compute in fp32 (half matmuls are slow or missing); on a GPU in the target dtype.
    compute = torch_dtype(cfg.dtype) if use_cuda else torch.float32
    device = "cuda" if use_cuda else "cpu"
    started = time.time()
    tokenizer = load_tokenizer(trained_dir if (trained_dir / "tokenizer_config.json").is_file() else base_dir, family)
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            load_model(base_dir, family, torch_dtype=compute).to(device=device, dtype=compute), str(trained_dir)
        ).eval()
        rows = verify_ids(tokenizer, family, schema)
        reference = logits_of(model, rows)
        model = model.merge_and_unload()
        leftover = [name for name, _ in model.named_modules() if "lora_" in name]
        if leftover:
            raise MergeError(f"LoRA modules remain after merge: {leftover[:5]}")
    else:
        model = load_model(trained_dir, family, torch_dtype=compute).to(device=device, dtype=compute).eval()
        rows = verify_ids(tokenizer, family, schema)
        reference = logits_of(model, rows)
    in_memory_diff = max_diff(reference, logits_of(model, rows))

    tmp = side_dir(out_dir, TMP_MARK)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = model.to(torch_dtype(cfg.dtype))
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        copy_support_files(base_dir if base_dir.is_dir() else trained_dir, tmp)
        # Free the merged model before reloading the saved one: two 6B copies do not fit a 24 GB GPU.
        del model
        gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()
        saved_diff, tolerance = check_saved(tmp, family, cfg.dtype, compute, device, rows, reference, out_dir)
        info = {
            "base_model": str(base_dir),
            "trained": str(trained_dir),
            "method": method,
            "family": family.name,
            "dtype": cfg.dtype,
            "max_logit_diff_in_memory": in_memory_diff,
            "max_logit_diff_saved": saved_diff,
            "tolerance": tolerance,
            "seconds": round(time.time() - started, 2),
        }
        (tmp / "schema.json").write_text(json.dumps(schema, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        # Whatever failed (a check, a load, a full disk), no half-written directory stays behind.
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"merged {trained_dir} into {base_dir} -> {out_dir} ({cfg.dtype}); "
        f"max |logit diff| vs adapter: {in_memory_diff:.2e} in memory, {saved_diff:.2e} after saving"
    )
    return out_dir


def main(argv=None) -> Path:
    cfg = parse_config(MergeConfig, argv, __doc__)
    try:
        return merge(cfg)
    except (MergeError, LaneError) as err:
        raise SystemExit(f"merge failed: {err}") from None


if __name__ == "__main__":
    main()
