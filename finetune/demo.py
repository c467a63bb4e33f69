"""The whole CPU demo through the real pipeline: tiny base -> train -> merge -> evaluate on dev.

    python -m finetune.demo [--output-dir runs/demo] [--data-dir data] [--force]

Steps (each one the same code as its own CLI):
  1. finetune.tiny   a small random Llama-architecture model + character tokenizer -> OUT/base
  2. finetune.train  with finetune/configs/demo_cpu.yaml (full fine-tuning: a random model has
                     nothing for LoRA to adapt)                                  -> OUT/model, train_log.jsonl
  3. finetune.merge  standalone fp16 model with schema.json                     -> OUT/merged
  4. model.evaluate  on the dev file                                            -> OUT/merged/metrics.json
then `streamlit run app.py -- --model OUT/merged` serves it.

Its dev metrics (with and without the preset's "no relation" rows) and measured times are in the README,
regenerated and checked by `make figures` (tools/figures.py).
A model trained from scratch on 902 rows learns the answer formats and most categories, never the
triples: the demo shows the machinery, not the quality; a pretrained base (ChatGLM-6B with
finetune/configs/chatglm6b_lora.yaml) brings that.
An existing OUT/merged is kept unless --force (then every step reruns).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.config import parse_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, whatever the machine: the tiny model's matrices are too small to split (a second
# thread only spin-waits), and the README's figures were measured with one. A different thread count
# sums in a different order, so it is also one less thing that can change the trained model.
os.environ.setdefault("OMP_NUM_THREADS", "1")

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_cpu.yaml"


@dataclass
class DemoConfig:
    output_dir: str = field(default="runs/demo", metadata={"help": "run folder; the app serves OUT/merged"})
    data_dir: str = field(default="data", metadata={"help": "folder with the train and dev jsonl (make data)"})
    train_config: str = field(default=str(DEMO_CONFIG), metadata={"help": "finetune.train preset (YAML)"})
    # Tiny model shape: 1.3M parameters, most of them the character embeddings and output layer.
    # A bigger one (192 hidden, 4 layers) took twice as long for no better accuracy (demo_cpu.yaml).
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    eval_limit: int = field(default=0, metadata={"help": "evaluate only the first N dev rows (0: all)"})
    force: bool = field(default=False, metadata={"help": "rebuild even if OUT/merged exists"})
    seed: int = 0


def progress_line(step: int, total: int, logs: dict, elapsed: float) -> str:
    """One logging event as the demo prints it: step/total, loss, eval loss, lr, time spent and left."""
    parts = [f"step {step}" + (f"/{total}" if total else "")]
    names = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "lr"}
    parts += [f"{short} {logs[key]:.4g}" for key, short in names.items() if key in logs]
    if total and step:
        parts.append(f"{elapsed / 60:.1f} min, ~{elapsed * (total - step) / step / 60:.1f} min left")
    return ", ".join(parts)


def progress_callback():
    """A TrainerCallback printing each logging event as one line (`progress_line`), with the Trainer's own step
    count and total. Trainer's progress bar is off when output is not a terminal (make demo > log, CI); then
    this is the only sign of life during the longest step."""
    from transformers import TrainerCallback

    class PrintProgress(TrainerCallback):
        started = time.time()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                line = progress_line(state.global_step, state.max_steps, logs, time.time() - self.started)
                print("  " + line, flush=True)

    return PrintProgress()


def _step(number: int, title: str) -> float:
    print(f"\n[{number}/4] {title}", flush=True)
    return time.time()


def _done(started: float) -> float:
    seconds = time.time() - started
    print(f"      done in {seconds:.0f}s", flush=True)
    return seconds


def mark_demo(merged: Path) -> None:
    """schema.json says "demo": true, so every page of the app can say it serves a toy model."""
    from core.safe_io import atomic_write_json

    schema = json.loads((merged / "schema.json").read_text(encoding="utf-8"))
    atomic_write_json(merged / "schema.json", {**schema, "demo": True})


def run_demo(cfg: DemoConfig) -> Path:
    from core.dataset import DEV_FILE, TRAIN_FILE
    from finetune import merge, train
    from finetune.tiny import TinyConfig, build_tiny

    out = Path(cfg.output_dir)
    merged = out / "merged"
    data_dir = Path(cfg.data_dir)
    missing = [name for name in (TRAIN_FILE, DEV_FILE) if not (data_dir / name).is_file()]
    if missing:
        raise SystemExit(f"error: {data_dir} lacks {missing}; run `make data` (copies them from ../shared/data)")
    if merged.is_dir() and not cfg.force:
        print(f"{merged} exists; serve it with: streamlit run app.py -- --model {merged}\n"
              f"(python -m finetune.demo --force rebuilds it)")
        return merged

    started = time.time()
    timings = {}
    t = _step(1, f"tiny base model -> {out / 'base'}")
    base = build_tiny(TinyConfig(
        output_dir=str(out / "base"), data_dir=str(data_dir), hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, seed=cfg.seed,
    ))
    timings["tiny"] = _done(t)

    t = _step(2, f"finetune.train --config {cfg.train_config} -> {out}")
    train.main(["--config", cfg.train_config, "--base-model", str(base), "--data-dir", str(data_dir),
                "--output-dir", str(out)], callbacks=[progress_callback()])
    timings["train"] = _done(t)

    t = _step(3, f"finetune.merge --run {out} -> {merged}")
    merge.main(["--run", str(out)])
    mark_demo(merged)
    timings["merge"] = _done(t)

    t = _step(4, f"model.evaluate on {data_dir / DEV_FILE} -> {merged / 'metrics.json'}")
    # The command a user runs next, in its own process: training code reaches serving code only through
    # finetune/sample_decode.py (tests/test_layers.py), and this is exactly the user's path. One thread for
    # generation: the tiny model's matrices are too small to split, and on shared cores two spin-waiting
    # threads made it ~10x slower (measured: 25 s vs 1.7 s for 8 texts under load).
    argv = ["--model", str(merged), "--data", str(data_dir / DEV_FILE), "--output", str(merged / "metrics.json")]
    argv += ["--limit", str(cfg.eval_limit)] if cfg.eval_limit > 0 else []
    done = subprocess.run([sys.executable, "-m", "model.evaluate", *argv], env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"error: model.evaluate failed (exit {done.returncode}); {merged} is kept, rerun it with:\n"
                         f"  python -m model.evaluate {' '.join(argv)}")
    metrics = json.loads((merged / "metrics.json").read_text(encoding="utf-8"))
    timings["evaluate"] = _done(t)

    total = time.time() - started
    steps = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in timings.items())
    print(f"\ndemo finished in {total / 60:.1f} min ({steps})")
    shown = {key: "-" if metrics.get(key) is None else f"{metrics[key]:.3f}"
             for key in ("cls_accuracy", "cls_macro_f1", "triple_f1", "parse_rate")}
    print(f"dev: category accuracy {shown['cls_accuracy']}, macro-F1 {shown['cls_macro_f1']}, "
          f"triple F1 {shown['triple_f1']}, parse rate {shown['parse_rate']}")
    print(f"serve it: streamlit run app.py -- --model {merged}")
    return merged


def main(argv=None) -> Path:
    cfg = parse_config(DemoConfig, argv, __doc__)
    import torch

    threads = os.environ["OMP_NUM_THREADS"]
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else 1)
    return run_demo(cfg)


if __name__ == "__main__":
    main()
