"""Peak memory of `python -m model.label` on 1,000 vs 10,000 rows: streaming keeps it flat.

    python -m bench.label_memory [--rows 1000,10000] [--model DIR]

Each run is its own child process; its peak RSS comes from os.wait4, the rusage of exactly that
child (resource.getrusage(RUSAGE_CHILDREN) would report the largest child so far, not each one).
This script never imports torch: Linux carries the spawning process's high-water mark over exec
into the child's ru_maxrss, so the parent must stay small (its own peak is printed as the bound).
For the same reason the tiny model is built through the CLIs in child processes too:
finetune.tiny -> finetune.train (5 steps) -> finetune.merge.
The model is trained with --max-target-len 40, so its schema budget keeps every extraction answer
short (constrained decoding then closes the list early): labelling 11,000 rows twice over with full
300-token answers would take an hour on 2 cores, and the memory question is about rows, not answer
length. Both tasks still run for every row, through the same code as any other model.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from core.config import parse_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]  # children run `python -m ...` from the repository root
TARGET_RATIO = 1.10  # the large run's peak may be at most 10% above the small run's


@dataclass
class BenchConfig:
    data_dir: str = "data"
    rows: str = "1000,10000"
    model: str | None = None  # a merged model dir; default: build the tiny one described above
    hidden_size: int = 32
    num_layers: int = 1
    train_steps: int = 5
    max_target_len: int = 40
    threads: int = 1  # OMP/MKL threads of the child processes (see bench.common.set_threads)
    label_args: str = ""  # extra flags for model.label, e.g. "--batch-size 16"

    def row_counts(self) -> list[int]:
        return [int(n) for n in self.rows.split(",") if n.strip()]


def parse_args(argv=None) -> BenchConfig:
    cfg = parse_config(BenchConfig, argv, __doc__)
    if not (Path(cfg.data_dir) / "mixed_train_dataset.jsonl").is_file():
        raise SystemExit(f"--data-dir {cfg.data_dir}: no mixed_train_dataset.jsonl (run `make data`)")
    if len(cfg.row_counts()) < 2:
        raise SystemExit("--rows needs at least two counts, e.g. 1000,10000")
    return cfg


def self_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def child_env(cfg: BenchConfig) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cfg.threads)
    return env


def run(args: list[str], cfg: BenchConfig, log: Path) -> tuple[float, float]:
    """Run one child; (peak RSS MB of that child, seconds). Its output goes to `log`."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=child_env(cfg), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-20:])
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{tail}")
    peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return peak, time.perf_counter() - started


def build_model(cfg: BenchConfig, workdir: Path) -> Path:
    py = sys.executable
    base, run_dir = workdir / "base", workdir / "run"
    run([py, "-m", "finetune.tiny", "--output-dir", str(base), "--data-dir", cfg.data_dir, "--hidden-size",
         str(cfg.hidden_size), "--num-layers", str(cfg.num_layers), "--num-heads", "1", "--intermediate-size",
         str(cfg.hidden_size * 2)], cfg, workdir / "tiny.log")
    run([py, "-m", "finetune.train", "--base-model", str(base), "--data-dir", cfg.data_dir, "--output-dir",
         str(run_dir), "--max-steps", str(cfg.train_steps), "--eval-steps", str(cfg.train_steps),
         "--max-target-len", str(cfg.max_target_len)], cfg, workdir / "train.log")
    run([py, "-m", "finetune.merge", "--run", str(run_dir), "--dtype", "fp32"], cfg, workdir / "merge.log")
    return run_dir / "merged"


def texts(cfg: BenchConfig) -> list[str]:
    """The sentences of the reference data (train + dev), without importing the project (torch)."""
    out = []
    for name in ("mixed_train_dataset.jsonl", "mixed_dev_dataset.jsonl"):
        path = Path(cfg.data_dir) / name
        if path.is_file():
            for line in path.open(encoding="utf-8"):
                context = json.loads(line)["context"]
                out.append(context.split("\n\n", 1)[-1].rsplit("\nAnswer: ", 1)[0])
    return out


def write_csv(path: Path, n: int, pool: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "comment"])
        for i in range(n):
            writer.writerow([i, pool[i % len(pool)]])


def count_rows(path: Path) -> int:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return sum(1 for _ in csv.reader(handle)) - 1


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    wall = time.perf_counter()
    print("resolved config:", json.dumps(asdict(cfg)), flush=True)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPU(s), children use {cfg.threads} thread(s), load avg "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}", flush=True)
    pool = texts(cfg)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        model = Path(cfg.model) if cfg.model else build_model(cfg, workdir)
        if not cfg.model:
            print(f"built tiny model {model} in {time.perf_counter() - started:.0f} s", flush=True)
        for n in cfg.row_counts():
            src, out = workdir / f"in_{n}.csv", workdir / f"out_{n}.csv"
            write_csv(src, n, pool)
            parent = self_peak_mb()
            args = [sys.executable, "-m", "model.label", "--model", str(model), "--input", str(src),
                    "--output", str(out), *cfg.label_args.split()]
            peak, seconds = run(args, cfg, workdir / f"label_{n}.log")
            labelled = count_rows(out)
            if labelled != n:
                raise SystemExit(f"model.label wrote {labelled} rows for {n} input rows")
            results[n] = {"peak_rss_mb": peak, "seconds": seconds, "rows_per_s": n / seconds,
                          "parent_peak_mb": parent, "input_mb": src.stat().st_size / 2**20}
            print(f"{n:>7,} rows: peak RSS {peak:,.0f} MB, {seconds:.0f} s ({n / seconds:.1f} rows/s), input "
                  f"{results[n]['input_mb']:.1f} MB (parent's own peak {parent:.0f} MB)", flush=True)
    small, large = min(results), max(results)
    ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
    verdict = "PASS" if ratio <= TARGET_RATIO else "SHORT"
    print(f"\nRATIO label causal peak RSS {large:,} rows / {small:,} rows = {ratio:.3f} "
          f"(target <= {TARGET_RATIO:.2f}: {verdict})")
    print(f"(whole benchmark: {time.perf_counter() - wall:.0f} s wall)")
    return results


if __name__ == "__main__":
    main()
