"""Metrics of a merged model on a labelled {context, target} jsonl.

    python -m model.evaluate --model DIR --data FILE.jsonl [--output metrics.json] [--limit N] [--unconstrained]
        [--prompts canonical|data]

Prints a table and writes flat keys (n, cls_n, cls_accuracy, cls_macro_f1, ie_n, triple_precision,
triple_recall, triple_f1, parse_rate, examples_per_second, ...) plus per-label, per-predicate and
confusion-matrix tables, and a per-row predictions jsonl beside the metrics file.

Strict: accuracy, macro-F1 and triple P/R/F1 count an answer only if it is exactly in the training
format (a malformed `"酒店"]` is wrong, whatever label it contains). What the parser's repairs would
have recovered is reported beside them as lenient_cls_accuracy, lenient_cls_macro_f1 and
lenient_triple_precision/recall/f1, so the two decoding modes compare on the same footing.
Prompts: `canonical` (default) asks each text with the phrasing the app and model.label use;
`data` asks it with the row's own phrasing (the data has several per task), which shows how much
the answers depend on the wording.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.config import parse_config
from core.dataset import CLASSIFICATION, EXTRACTION, TRAIN_FILE, DataError, Example, read_jsonl
from core.safe_io import OutputError, OutputLock, atomic_write, check_writable, refuse_overlap
from model.baseline import baseline_labels
from model.confidence import THRESHOLDS
from model.load import LoadedModel, ModelLoadError, load_merged
from model.metrics import at_thresholds, classification_metrics, triple_metrics
from model.parsing import Triple, parse_triples
from model.predict import predict

PROMPT_MODES = ("canonical", "data")


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "merged model directory"})
    data: str = field(metadata={"help": "labelled jsonl, e.g. data/mixed_dev_dataset.jsonl"})
    output: str | None = field(default=None, metadata={"help": "metrics json (default: MODEL/metrics.json)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N rows (0: all)"})
    unconstrained: bool = field(default=False, metadata={"help": "plain greedy decoding, for comparison"})
    prompts: str = field(default="canonical", metadata={
        "choices": list(PROMPT_MODES), "help": "canonical: the serving phrasing; data: each row's own phrasing"})
    baseline_train: str | None = field(default=None, metadata={
        "help": "training jsonl for the TF-IDF + logistic regression category baseline (default: the train file "
                "beside --data if there is one; 'none': no baseline)"})
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


def missing_gold_spans(examples: list[Example]) -> list[dict]:
    """Reference subjects/objects that do not occur in their row's text: no copying decoder can produce
    them, so they cap recall; listed rather than silently lost."""
    missing = []
    for ex in examples:
        for triple in gold_triples(ex):
            for role, span in (("subject", triple.subject), ("object", triple.object)):
                if span not in ex.text:
                    missing.append({"line": ex.line, "role": role, "span": span})
    return missing


def _predict_task(lm, rows: list[Example], task: str, batch_size: int, constrained: bool, prompts: str,
                  progress) -> list:
    """Predictions for rows of one task, asked with the canonical phrasing or each row's own."""
    if prompts == "canonical":
        return predict(lm, [ex.text for ex in rows], tasks=(task,), batch_size=batch_size,
                       constrained=constrained, on_progress=progress(0))
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(rows):
        groups.setdefault(ex.phrasing, []).append(i)
    preds: list = [None] * len(rows)
    done = 0
    for phrasing, members in groups.items():
        got = predict(lm, [rows[i].text for i in members], tasks=(task,), batch_size=batch_size,
                      constrained=constrained, phrasing={task: phrasing}, on_progress=progress(done))
        for i, pred in zip(members, got, strict=True):
            preds[i] = pred
        done += len(members)
    return preds


def evaluate(
    lm: LoadedModel,
    examples: list[Example],
    constrained: bool = True,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
    prompts: str = "canonical",
    baseline_train: list[Example] | None = None,
) -> dict:
    """Flat metrics + tables + per-row predictions for validated examples (strict and lenient, see above)."""
    if prompts not in PROMPT_MODES:
        raise ValueError(f"prompts must be one of {PROMPT_MODES}, got {prompts!r}")
    cls_rows = [ex for ex in examples if ex.task == CLASSIFICATION]
    ie_rows = [ex for ex in examples if ex.task == EXTRACTION]
    # Comments rarely hold a relation: the extraction task is asked of every classification text too.
    asks_extraction = bool(lm.schema.get("predicates")) and bool(cls_rows)
    # Progress counts every answer asked: each row's own task, plus extraction of each comment.
    total = len(examples) + (len(cls_rows) if asks_extraction else 0)

    def progress_from(start: int):
        def at(extra: int):
            return (lambda done, _n: on_progress(start + extra + done, total)) if on_progress else None
        return at

    started = time.time()
    cls_preds = _predict_task(lm, cls_rows, CLASSIFICATION, batch_size, constrained, prompts, progress_from(0))
    ie_preds = _predict_task(lm, ie_rows, EXTRACTION, batch_size, constrained, prompts,
                             progress_from(len(cls_rows)))
    seconds = time.time() - started
    # Always the serving phrasing: a comment's own phrasing asks for a category, not for triples.
    comment_preds = _predict_task(lm, cls_rows, EXTRACTION, batch_size, constrained, "canonical",
                                  progress_from(len(examples))) if asks_extraction else []

    def strict_category(p):
        return p.category if p.well_formed.get(CLASSIFICATION) else None

    def strict_triples(p):
        return p.triples if p.well_formed.get(EXTRACTION) else []

    labels = lm.schema["labels"]
    gold_labels = [ex.answer[0] for ex in cls_rows]
    gold_sets = [gold_triples(ex) for ex in ie_rows]
    cls = classification_metrics(gold_labels, [strict_category(p) for p in cls_preds], labels)
    lenient_cls = classification_metrics(gold_labels, [p.category for p in cls_preds], labels)
    ie = triple_metrics(gold_sets, [strict_triples(p) for p in ie_preds])
    lenient_ie = triple_metrics(gold_sets, [p.triples for p in ie_preds])
    answers = [(p, CLASSIFICATION) for p in cls_preds] + [(p, EXTRACTION) for p in ie_preds]
    rows = []
    for ex, pred in [*zip(cls_rows, cls_preds, strict=True), *zip(ie_rows, ie_preds, strict=True)]:
        well_formed = bool(pred.well_formed.get(ex.task))
        if ex.task == CLASSIFICATION:
            gold, got = ex.answer[0], pred.category
            correct = well_formed and gold == got
        else:  # the same set of (subject, predicate, object), as the triple metrics count it
            gold, got = [t.to_dict() for t in gold_triples(ex)], [t.to_output() for t in pred.triples]
            correct = well_formed and {t.key() for t in gold_triples(ex)} == {t.key() for t in pred.triples}
        row = {"line": ex.line, "task": ex.task, "text": ex.text, "gold": gold, "pred": got, "correct": correct,
               "well_formed": well_formed, "raw": pred.raw.get(ex.task, ""), "warnings": pred.warnings}
        if ex.task == CLASSIFICATION and pred.category_confidence is not None:
            row["confidence"] = round(pred.category_confidence, 3)
        rows.append(row)
    missing = missing_gold_spans(ie_rows)
    baseline = baseline_labels(baseline_train or [], [ex.text for ex in cls_rows]) if baseline_train else None
    base = classification_metrics(gold_labels, baseline, labels) if baseline else {}
    return {
        "n": len(examples),
        "cls_n": len(cls_rows),
        "cls_accuracy": cls["accuracy"],
        "cls_macro_f1": cls["macro_f1"],
        "lenient_cls_accuracy": lenient_cls["accuracy"],
        "lenient_cls_macro_f1": lenient_cls["macro_f1"],
        "baseline_cls_accuracy": base.get("accuracy"),
        "baseline_cls_macro_f1": base.get("macro_f1"),
        "ie_n": len(ie_rows),
        "triple_precision": ie["precision"],
        "triple_recall": ie["recall"],
        "triple_f1": ie["f1"],
        "lenient_triple_precision": lenient_ie["precision"],
        "lenient_triple_recall": lenient_ie["recall"],
        "lenient_triple_f1": lenient_ie["f1"],
        "parse_rate": sum(p.well_formed.get(task, False) for p, task in answers) / len(answers) if answers else None,
        "hit_limit_rate": sum(p.hit_limit.get(task, False) for p, task in answers) / len(answers) if answers else None,
        "label_in_set_rate": sum(p.category is not None for p in cls_preds) / len(cls_preds) if cls_preds else None,
        "span_grounded_rate": grounded_share(ie_preds, ie_rows),
        # Share of classification texts (comments) for which extraction returned at least one triple.
        "hallucination_rate": (sum(bool(p.triples) for p in comment_preds) / len(comment_preds)
                               if comment_preds else None),
        "gold_spans_not_in_text": len(missing),
        "examples_per_second": len(examples) / seconds if seconds > 0 else None,
        "constrained": constrained,
        "prompts": prompts,
        "model": str(lm.path),
        "per_label": cls["per_label"],
        "confusion": cls["confusion"],
        "per_predicate": ie["per_predicate"],
        "triple_counts": {k: ie[k] for k in ("tp", "n_pred", "n_gold")},
        "gold_spans_missing": missing,
        # What a --min-confidence / the app's slider at each threshold would keep (model.confidence).
        "confidence_thresholds": at_thresholds(
            THRESHOLDS if constrained else (0.0,), gold_labels,
            [(strict_category(p), p.category_confidence) for p in cls_preds],
            gold_sets, [strict_triples(p) for p in ie_preds], [p.triples for p in comment_preds],
        ),
        "predictions": rows,
    }


FLAT_KEYS = ("n", "cls_n", "cls_accuracy", "cls_macro_f1", "lenient_cls_accuracy", "lenient_cls_macro_f1",
             "baseline_cls_accuracy", "baseline_cls_macro_f1", "ie_n",
             "triple_precision", "triple_recall", "triple_f1", "lenient_triple_precision", "lenient_triple_recall",
             "lenient_triple_f1", "hallucination_rate", "parse_rate", "hit_limit_rate", "label_in_set_rate",
             "span_grounded_rate", "gold_spans_not_in_text", "examples_per_second")


def format_table(metrics: dict) -> str:
    def fmt(value):
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    width = max(map(len, FLAT_KEYS))
    lines = [f"{key:<{width}}  {fmt(metrics.get(key))}" for key in FLAT_KEYS]
    thresholds = metrics.get("confidence_thresholds") or []
    if len(thresholds) > 1:
        columns = ("threshold", "cls_coverage", "cls_precision", "triple_precision", "triple_recall",
                   "triples_kept", "hallucination_rate")
        lines += ["", "at confidence >= threshold:", "  ".join(f"{c:>{len(c)}}" for c in columns)]
        lines += ["  ".join(f"{fmt(row.get(c)):>{len(c)}}" for c in columns) for row in thresholds]
    return "\n".join(lines)


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


def baseline_file(data: Path | str, given: str | None) -> Path | None:
    """The training file of the baseline: --baseline-train, else TRAIN_FILE beside the data."""
    if given is not None:
        return None if given.lower() == "none" else Path(given)
    beside = Path(data).parent / TRAIN_FILE
    return beside if beside.is_file() and not beside.samefile(data) else None


def _run(cfg: EvalConfig, output: Path) -> dict:
    examples = read_jsonl(cfg.data)
    train_path = baseline_file(cfg.data, cfg.baseline_train)
    baseline_train = read_jsonl(train_path) if train_path else None
    lm = load_merged(cfg.model, device=cfg.device)
    if cfg.limit > 0:
        examples = examples[: cfg.limit]
    from tqdm import tqdm

    with tqdm(total=len(examples), desc="evaluating", unit="row", file=sys.stderr) as bar:
        metrics = evaluate(lm, examples, constrained=not cfg.unconstrained, batch_size=cfg.batch_size,
                           on_progress=lambda done, total: (setattr(bar, "total", total), bar.update(done - bar.n)),
                           prompts=cfg.prompts,
                           baseline_train=baseline_train)
    rows_path = write_outputs(metrics, output)
    mode = ("unconstrained" if cfg.unconstrained else "constrained") + f" decoding, {cfg.prompts} prompts"
    print(f"{mode}, {cfg.data}, model {cfg.model}\n{format_table(metrics)}\n-> {output}, {rows_path}")
    return metrics


if __name__ == "__main__":
    main()
