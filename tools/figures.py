"""Regenerate the README's demo metric figures and show which ones changed.

    python -m tools.figures [--runs-dir runs/figures] [--reuse] [--write]   (make figures)

Runs the CPU demo twice through its own CLI (python -m finetune.demo): with the preset (runs-dir/demo) and
with the preset's "no relation" rows off (runs-dir/demo_no_negatives, `negative_rows: 0`), reads each
merged/metrics.json and compares every figure the README states (FIGURES: where it is written, which
metric it is) with what was measured, rounded the way the README writes it. Prints one line per place:
`same` or `CHANGED`, and exits 1 if any changed, unless --write puts the measured figures into README.md
(atomically). --reuse takes run folders that already have merged/metrics.json instead of training again
(e.g. after `make demo`: --demo-run runs/demo).
Timings are not regenerated here: they depend on the load; the README states them as measured ranges.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from core.config import parse_config
from core.safe_io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
DEMO_PRESET = ROOT / "finetune" / "configs" / "demo_cpu.yaml"
NUMBER = r"(\d+\.\d{3})"


@dataclass(frozen=True)
class Figure:
    """One number the README writes: which run and metric it is, and a pattern whose group 1 is the number."""

    run: str  # "demo" or "demo_no_negatives"
    metric: str  # a metrics.json key, or "hallucinated_comments" (= hallucination_rate x cls_n)
    pattern: str


# Each pattern must match the README exactly once (a test checks it), so an edited sentence is noticed.
FIGURES = (
    Figure("demo", "cls_accuracy", r"在验证集上\s*类别准确率 " + NUMBER),
    Figure("demo", "cls_macro_f1", r"类别准确率 [\d.]+、macro-F1 " + NUMBER),
    Figure("demo", "triple_f1", r"macro-F1 [\d.]+、三元组 F1 " + NUMBER + "、答案格式"),
    Figure("demo", "parse_rate", r"答案格式正确率 " + NUMBER),
    Figure("demo", "hallucination_rate", r"、幻觉率 " + NUMBER + r"（\d+ 条评论中"),
    Figure("demo", "hallucinated_comments", r"条评论中 (\d+) 条被抽出了三元组"),
    Figure("demo", "baseline_cls_accuracy", r"逻辑回归的类别参照是 " + NUMBER),
    Figure("demo", "baseline_cls_accuracy", r"参考验证集上 " + NUMBER),
    Figure("demo_no_negatives", "cls_accuracy", r"`negative_rows: 0`）时：准确率 " + NUMBER),
    Figure("demo_no_negatives", "cls_macro_f1", r"时：准确率 [\d.]+、macro-F1 " + NUMBER),
    Figure("demo_no_negatives", "triple_f1", r"时：准确率 [\d.]+、macro-F1 [\d.]+、三元组 F1 " + NUMBER),
    Figure("demo_no_negatives", "hallucination_rate", r"、幻觉率 " + NUMBER + "（每条评论"),
    Figure("demo", "cls_accuracy", r"on the dev set it reaches category accuracy " + NUMBER),
    Figure("demo", "cls_macro_f1", r"category accuracy [\d.]+, macro-F1 " + NUMBER),
    Figure("demo", "triple_f1", r"macro-F1 [\d.]+,\s+triple F1 " + NUMBER + ", parse rate"),
    Figure("demo", "parse_rate", r"parse rate " + NUMBER + " and hallucination"),
    Figure("demo", "hallucination_rate", r"and hallucination rate " + NUMBER),
    Figure("demo", "hallucinated_comments", r"\((\d+) of \d+ dev comments got a triple\)"),
    Figure("demo", "baseline_cls_accuracy", r"baseline on the same rows reaches " + NUMBER),
    Figure("demo", "baseline_cls_accuracy", r"\(`baseline_cls_accuracy`; " + NUMBER + " on the reference dev set"),
    Figure("demo_no_negatives", "cls_accuracy", r"\(`negative_rows: 0`\): accuracy " + NUMBER),
    Figure("demo_no_negatives", "cls_macro_f1", r"\(`negative_rows: 0`\): accuracy [\d.]+,\s+macro-F1 " + NUMBER),
    Figure("demo_no_negatives", "triple_f1", r"accuracy [\d.]+,\s+macro-F1 [\d.]+, triple F1 " + NUMBER),
    Figure("demo_no_negatives", "hallucination_rate", r"hallucination rate " + NUMBER + r" \(every comment"),
)


@dataclass
class FiguresConfig:
    runs_dir: str = field(default="runs/figures", metadata={"help": "where the two demo runs go"})
    data_dir: str = field(default="data", metadata={"help": "folder with the train and dev jsonl (make data)"})
    readme: str = field(default=str(ROOT / "README.md"), metadata={"help": "the README to check (or --write)"})
    reuse: bool = field(default=False, metadata={"help": "use runs that already have merged/metrics.json"})
    demo_run: str | None = field(default=None, metadata={"help": "the preset's run folder (default RUNS/demo)"})
    write: bool = field(default=False, metadata={"help": "put the measured figures into the README"})


def shown(metrics: dict, metric: str) -> str:
    """A measured figure written as the README writes it: three decimals, or a count."""
    if metric == "hallucinated_comments":
        return str(round(metrics["hallucination_rate"] * metrics["cls_n"]))
    return f"{metrics[metric]:.3f}"


def locate(readme: str, figure: Figure) -> re.Match:
    matches = list(re.finditer(figure.pattern, readme))
    if len(matches) != 1:
        raise ValueError(f"README states {figure.run} {figure.metric} {len(matches)} times where "
                         f"tools/figures.py looks for it (pattern {figure.pattern!r}); expected once")
    return matches[0]


def compare(readme: str, measured: dict[str, dict]) -> tuple[list[tuple[Figure, str, str]], str]:
    """([(figure, README's value, measured value)], the README with the measured values written in)."""
    rows, edits = [], []
    for figure in FIGURES:
        match = locate(readme, figure)
        value = shown(measured[figure.run], figure.metric)
        rows.append((figure, match.group(1), value))
        edits.append((match.start(1), match.end(1), value))
    updated = readme
    for start, end, value in sorted(edits, reverse=True):
        updated = updated[:start] + value + updated[end:]
    return rows, updated


def run_demo(out: Path, data_dir: str, preset: Path, reuse: bool) -> dict:
    metrics = out / "merged" / "metrics.json"
    if not (reuse and metrics.is_file()):
        cmd = [sys.executable, "-m", "finetune.demo", "--output-dir", str(out), "--data-dir", data_dir,
               "--train-config", str(preset), "--force"]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(metrics.read_text(encoding="utf-8"))


def no_negatives_preset(folder: Path) -> Path:
    """The demo preset with negative_rows: 0 (everything else as the user's preset)."""
    text = DEMO_PRESET.read_text(encoding="utf-8")
    text, n = re.subn(r"^negative_rows:.*$", "negative_rows: 0", text, flags=re.M)
    if n != 1:
        raise ValueError(f"{DEMO_PRESET} sets negative_rows {n} times; expected once")
    path = folder / "demo_no_negatives.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(FiguresConfig, argv, __doc__)
    runs = Path(cfg.runs_dir)
    readme_path = Path(cfg.readme)
    readme = readme_path.read_text(encoding="utf-8")
    for figure in FIGURES:  # before the 15 minutes of training, not after
        locate(readme, figure)
    with tempfile.TemporaryDirectory() as tmp:
        measured = {
            "demo": run_demo(Path(cfg.demo_run) if cfg.demo_run else runs / "demo", cfg.data_dir, DEMO_PRESET,
                             cfg.reuse),
            "demo_no_negatives": run_demo(runs / "demo_no_negatives", cfg.data_dir,
                                          no_negatives_preset(Path(tmp)), cfg.reuse),
        }
    rows, updated = compare(readme, measured)
    changed = [row for row in rows if row[1] != row[2]]
    for figure, stated, value in rows:
        status = "same" if stated == value else "CHANGED"
        print(f"{status:<8} {figure.run:<18} {figure.metric:<22} README {stated:<6} measured {value}")
    print(f"{len(changed)} of {len(rows)} README figures changed")
    if changed and cfg.write:
        atomic_write(readme_path, updated.encode("utf-8"))
        print(f"-> {readme_path} updated")
        return 0
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
