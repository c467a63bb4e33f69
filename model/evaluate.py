"""Metrics of a merged model on a labelled {context, target} jsonl.

    python -m model.evaluate --model DIR --data FILE.jsonl [--output metrics.json] [--limit N] [--unconstrained]

Prints a table and writes flat keys (n, cls_n, cls_accuracy, cls_macro_f1, ie_n, triple_precision,
triple_recall, triple_f1, parse_rate, examples_per_second, ...) plus per-label, per-predicate and
confusion-matrix tables, and a per-row predictions jsonl beside the metrics file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import parse_config
from finetune.data import CLASSIFICATION, EXTRACTION, DataError, Example, read_jsonl
from finetune.safe_io import OutputError, OutputLock, atomic_write, check_writable, refuse_overlap
from model.load import LoadedModel, ModelLoadError, load_merged
from model.metrics import classification_metrics, triple_metrics
from model.parsing import Triple, parse_triples
from model.predict import predict


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "merged model directory"})
    data: str = field(metadata={"help": "labelled jsonl, e.g. data/mixed_dev_dataset.jsonl"})
    output: str | None = field(default=None, metadata={"help": "metrics json (default: MODEL/metrics.json)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N rows (0: all)"})
    unconstrained: bool = field(default=False, metadata={"help": "plain greedy decoding, for comparison"})
    batch_size: int = 8
    device: str | None = None


def gold_triples(example: Example) -> list[Triple]:
    return [Triple(t["subject"], t["predicate"], t["object"], t["subject_type"], t["object_type"])
            for t in example.answer]


def grounded_share(predictions, examples) -> float | None:
    """Share of emitted triples (before validation dropped any) whose subject and object occur in the text."""
    total = grounded = 0
    for pred, ex in zip(predictions, examples, strict=True):
        for triple in parse_triples(pred.raw.get(EXTRACTION, ""), None, None).triples:
            total += 1
            grounded += triple.subject in ex.text and triple.object in ex.text
    return grounded / total if total else None


def evaluate(
    lm: LoadedModel,
    examples: list[Example],
    constrained: bool = True,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Flat metrics + tables + per-row predictions for validated examples."""
    cls_rows = [ex for ex in examples if ex.task == CLASSIFICATION]
    ie_rows = [ex for ex in examples if ex.task == EXTRACTION]
    total, offset = len(examples), 0

    def progress_from(start: int):
        return (lambda done, _n: on_progress(start + done, total)) if on_progress else None

    started = time.time()
    cls_preds = predict(lm, [ex.text for ex in cls_rows], tasks=(CLASSIFICATION,), batch_size=batch_size,
                        constrained=constrained, on_progress=progress_from(offset))
    offset += len(cls_rows)
    ie_preds = predict(lm, [ex.text for ex in ie_rows], tasks=(EXTRACTION,), batch_size=batch_size,
                       constrained=constrained, on_progress=progress_from(offset))
    seconds = time.time() - started

    labels = lm.schema["labels"]
    cls = classification_metrics([ex.answer[0] for ex in cls_rows], [p.category for p in cls_preds], labels)
    ie = triple_metrics([gold_triples(ex) for ex in ie_rows], [p.triples for p in ie_preds])
    answers = [(p, CLASSIFICATION) for p in cls_preds] + [(p, EXTRACTION) for p in ie_preds]
    rows = []
    for ex, pred in [*zip(cls_rows, cls_preds, strict=True), *zip(ie_rows, ie_preds, strict=True)]:
        gold = ex.answer[0] if ex.task == CLASSIFICATION else [t.to_dict() for t in gold_triples(ex)]
        got = pred.category if ex.task == CLASSIFICATION else [t.to_dict() for t in pred.triples]
        if ex.task == CLASSIFICATION:
            correct = gold == got
        else:  # the same set of (subject, predicate, object), as the triple metrics count it
            correct = {t.key() for t in gold_triples(ex)} == {t.key() for t in pred.triples}
        rows.append({"line": ex.line, "task": ex.task, "text": ex.text, "gold": gold, "pred": got, "correct": correct,
                     "raw": pred.raw.get(ex.task, ""), "warnings": pred.warnings})
    return {
        "n": total,
        "cls_n": len(cls_rows),
        "cls_accuracy": cls["accuracy"],
        "cls_macro_f1": cls["macro_f1"],
        "ie_n": len(ie_rows),
        "triple_precision": ie["precision"],
        "triple_recall": ie["recall"],
        "triple_f1": ie["f1"],
        "parse_rate": sum(p.well_formed.get(task, False) for p, task in answers) / len(answers) if answers else None,
        "hit_limit_rate": sum(p.hit_limit.get(task, False) for p, task in answers) / len(answers) if answers else None,
        "label_in_set_rate": sum(p.category is not None for p in cls_preds) / len(cls_preds) if cls_preds else None,
        "span_grounded_rate": grounded_share(ie_preds, ie_rows),
        "examples_per_second": total / seconds if seconds > 0 else None,
        "constrained": constrained,
        "model": str(lm.path),
        "per_label": cls["per_label"],
        "confusion": cls["confusion"],
        "per_predicate": ie["per_predicate"],
        "triple_counts": {k: ie[k] for k in ("tp", "n_pred", "n_gold")},
        "predictions": rows,
    }


FLAT_KEYS = ("n", "cls_n", "cls_accuracy", "cls_macro_f1", "ie_n", "triple_precision", "triple_recall", "triple_f1",
             "parse_rate", "hit_limit_rate", "label_in_set_rate", "span_grounded_rate", "examples_per_second")


def format_table(metrics: dict) -> str:
    def fmt(value):
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    width = max(map(len, FLAT_KEYS))
    return "\n".join(f"{key:<{width}}  {fmt(metrics.get(key))}" for key in FLAT_KEYS)


def predictions_path(output: Path) -> Path:
    return output.with_suffix(".predictions.jsonl")


def check_outputs(output: Path, data: Path | str | None) -> None:
    """Before anything slow: neither written file is the data, and the folder takes them."""
    refuse_overlap({"--output": output, "--output's predictions file": predictions_path(output)}, {"--data": data})
    check_writable(output.parent, need_bytes=1 << 20)


def write_outputs(metrics: dict, output: Path) -> Path:
    """metrics.json (without the per-row list) and OUTPUT.predictions.jsonl beside it, each atomically."""
    rows_path = predictions_path(output)
    summary = {k: v for k, v in metrics.items() if k != "predictions"}
    summary["predictions_file"] = rows_path.name
    atomic_write(rows_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in metrics["predictions"]))
    atomic_write(output, json.dumps(summary, indent=2, ensure_ascii=False))
    return rows_path


def main(argv=None) -> dict:
    cfg = parse_config(EvalConfig, argv, __doc__)
    output = Path(cfg.output) if cfg.output else Path(cfg.model) / "metrics.json"
    try:
        check_outputs(output, cfg.data)
        with OutputLock(output, "model.evaluate"):
            return _run(cfg, output)
    except (DataError, ModelLoadError, OutputError) as err:
        raise SystemExit(f"error: {err}") from None


def _run(cfg: EvalConfig, output: Path) -> dict:
    examples = read_jsonl(cfg.data)
    lm = load_merged(cfg.model, device=cfg.device)
    if cfg.limit > 0:
        examples = examples[: cfg.limit]
    from tqdm import tqdm

    with tqdm(total=len(examples), desc="evaluating", unit="row", file=sys.stderr) as bar:
        metrics = evaluate(lm, examples, constrained=not cfg.unconstrained, batch_size=cfg.batch_size,
                           on_progress=lambda done, _total: bar.update(done - bar.n))
    rows_path = write_outputs(metrics, output)
    mode = "unconstrained" if cfg.unconstrained else "constrained"
    print(f"{mode} decoding, {cfg.data}, model {cfg.model}\n{format_table(metrics)}\n-> {output}, {rows_path}")
    return metrics


if __name__ == "__main__":
    main()
