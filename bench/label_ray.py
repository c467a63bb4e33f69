"""Labelling throughput on Ray Data: 1 and 2 CPU actors against the single-process CLI, same rows, same model.

    python -m bench.label_ray [--files 4] [--rows-per-file 500] [--rounds 3] [--family causal]

Each round labels the same CSV files (UTF-8 and GBK by turn) three ways, in this order:
  cli       the single-process CLI's code (model.label.label_csv per file, one torch thread), the model loaded
            once per round (its load is timed: a user's run pays it too)
  ray x1    model.label_ray.label_files with 1 actor (a local Ray started and stopped per run, as the CLI does)
  ray x2    the same with 2 actors, one CPU and one torch thread each
and prints two rates per way, the median over rounds with the spread: rows/s of the whole run (wall time,
start-up and model loads included: what a user waits) and rows/s after start-up (from the start of the first
block, or the CLI's first chunk, to the end of the last: what more rows would cost), the ratios, and whether
every way wrote the CLI's rows. Ray's start-up (the local cluster, each actor's process, its model) is a fixed
cost of seconds, so the whole-run ratio grows with the rows. On a 2-core machine two actors take both cores
and Ray's own processes (its scheduler, the driver) share them: the figure is this machine's, not a GPU's.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import machine_line, parse_checked, refuse_invalid, set_threads
from bench.models import FAMILIES, trained_model

WAYS = ("cli", "ray x1", "ray x2")
ENCODINGS = ("utf-8", "gbk")


@dataclass
class BenchConfig:
    data_dir: str = "data"
    files: int = 4
    rows_per_file: int = 500
    block_rows: int = 256
    rounds: int = 3
    family: str = field(default="causal", metadata={"choices": list(FAMILIES)})
    model: str | None = None  # a merged model dir; default: the family's benchmark model (bench.models)
    models_root: str = "runs/bench/models"

    def validate(self) -> None:
        problems = []
        if not (Path(self.data_dir) / "mixed_dev_dataset.jsonl").is_file():
            problems.append(f"--data-dir {self.data_dir}: no mixed_dev_dataset.jsonl (run `make data`)")
        if min(self.files, self.rows_per_file, self.rounds) < 1:
            problems.append("--files, --rows-per-file and --rounds must be >= 1")
        if self.block_rows < 1:
            problems.append(f"--block-rows must be >= 1, got {self.block_rows}")
        refuse_invalid(problems)


def write_inputs(folder: Path, cfg: BenchConfig) -> list[Path]:
    from core.dataset import load_split

    texts = []
    for split in ("train", "dev"):
        for example in load_split(cfg.data_dir, split):
            try:
                example.text.encode("gbk")
                texts.append(example.text.strip())
            except UnicodeEncodeError:
                continue
    folder.mkdir(parents=True)
    paths = []
    for f in range(cfg.files):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(["id", "comment"])
        for i in range(cfg.rows_per_file):
            writer.writerow([f * cfg.rows_per_file + i, texts[(f * cfg.rows_per_file + i) % len(texts)]])
        path = folder / f"dump_{f}.csv"
        path.write_bytes(buffer.getvalue().encode(ENCODINGS[f % len(ENCODINGS)]))
        paths.append(path)
    return paths


def data_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="")))[1:]


def steady_rate(marks: list[tuple[float, float, int]]) -> float:
    """Rows/s from the first unit's start to the last one's end: start-up (Ray, actors, model loads) left out.
    marks: (started, finished, rows) of each chunk (CLI) or block (Ray, from its check in .blocks/)."""
    start, end = min(m[0] for m in marks), max(m[1] for m in marks)
    return sum(m[2] for m in marks) / (end - start)


def run_cli(model: Path, inputs: list[Path], out: Path, chunk_rows: int) -> tuple[float, float]:
    from model.label import LabelConfig, label_csv, model_predictor

    started = time.perf_counter()
    configs = [LabelConfig(model=str(model), input=str(p), output=str(out / p.name), chunk_rows=chunk_rows,
                           device="cpu") for p in inputs]
    predict_fn = model_predictor(configs[0])
    marks, last = [], [time.time(), 0]  # on_progress comes after each chunk: its start is the previous one's end

    def chunk_done(done: int, _total: int) -> None:
        now = time.time()
        marks.append((last[0], now, done - last[1]))
        last[:] = [now, done]

    for cfg in configs:
        last[:] = [time.time(), 0]
        label_csv(cfg, predict_fn, log=lambda _: None, show_bar=False, on_progress=chunk_done)
    return time.perf_counter() - started, steady_rate(marks)


def run_ray(model: Path, folder: Path, out: Path, actors: int, cfg: BenchConfig,
            chunk_rows: int) -> tuple[float, float]:
    from model.label_ray import CHECKS, RayLabelConfig, label_files

    started = time.perf_counter()
    label_files(RayLabelConfig(model=str(model), input=str(folder), output=str(out), actors=actors,
                               cpus_per_actor=1, block_rows=cfg.block_rows, chunk_rows=chunk_rows),
                log=lambda line: print("  " + line, flush=True), show_bar=False)
    wall = time.perf_counter() - started
    checks = [json.loads(p.read_text(encoding="utf-8")) for p in (out / CHECKS).glob("*.json")]
    return wall, steady_rate([(c["started"], c["finished"], c["rows"]) for c in checks])


def same_rows(cli_out: Path, ray_out: Path, inputs: list[Path]) -> bool:
    for path in inputs:
        parts = sorted(ray_out.glob(f"{path.stem}.part-*.csv"))
        if [row for p in parts for row in data_rows(p)] != data_rows(cli_out / path.name):
            return False
    return True


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def main(argv=None) -> dict:
    cfg = parse_checked(BenchConfig, argv, __doc__)
    set_threads(1)
    print("resolved config:", json.dumps(asdict(cfg)), flush=True)
    print(machine_line(), flush=True)
    model = Path(cfg.model) if cfg.model else trained_model(cfg.family, cfg.data_dir, cfg.models_root,
                                                            log=lambda line: print(line, flush=True))
    chunk_rows = 256 if cfg.block_rows % 256 == 0 else cfg.block_rows  # the CLI's default where blocks allow
    rows = cfg.files * cfg.rows_per_file
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    steady: dict[str, list[float]] = {way: [] for way in WAYS}
    equal = True
    with tempfile.TemporaryDirectory(prefix="bench_label_ray_") as tmp:
        folder = Path(tmp) / "in"
        inputs = write_inputs(folder, cfg)
        for r in range(cfg.rounds):
            out = Path(tmp) / f"round{r}"
            runs = {"cli": run_cli(model, inputs, out / "cli", chunk_rows),
                    "ray x1": run_ray(model, folder, out / "ray1", 1, cfg, chunk_rows),
                    "ray x2": run_ray(model, folder, out / "ray2", 2, cfg, chunk_rows)}
            for way, (wall, rate) in runs.items():
                seconds[way].append(wall)
                steady[way].append(rate)
            equal &= same_rows(out / "cli", out / "ray1", inputs) and same_rows(out / "cli", out / "ray2", inputs)
            print(f"round {r + 1}: " + ", ".join(f"{w} {seconds[w][-1]:.1f}s" for w in WAYS), flush=True)
    rates = {way: [rows / s for s in values] for way, values in seconds.items()}
    print(f"\n{rows:,} rows in {cfg.files} files, blocks of {cfg.block_rows}, {cfg.rounds} round(s), median (spread):")
    print(f"  {'':8} {'rows/s, whole run':>26} {'rows/s, after start-up':>28}")
    for way in WAYS:
        print(f"  {way:8} {statistics.median(rates[way]):9.1f} ({spread(rates[way]):>11})    "
              f"{statistics.median(steady[way]):9.1f} ({spread(steady[way]):>11})")
    print("  whole run: wall time of the command's work, Ray's start-up and the model loads included; after "
          "start-up: from the first block's (CLI: chunk's) start to the last one's end")
    ratios = {}
    for kind, table in (("whole run", rates), ("after start-up", steady)):
        for way, base in (("ray x1", "cli"), ("ray x2", "cli"), ("ray x2", "ray x1")):
            per_round = [a / b for a, b in zip(table[way], table[base], strict=True)]
            ratios[(kind, way, base)] = statistics.median(per_round)
            print(f"RATIO label_ray {cfg.family} {kind}: {way.replace(' ', '')} / {base.replace(' ', '')} rows/s = "
                  f"{statistics.median(per_round):.2f}x (median of {cfg.rounds}, spread "
                  f"{min(per_round):.2f}-{max(per_round):.2f}x)")
    print(f"outputs: every Ray run wrote the CLI's rows: {'yes' if equal else 'NO'}")
    if not equal:
        sys.exit(1)
    return {"rates": rates, "steady": steady, "ratios": ratios}


if __name__ == "__main__":
    main()
