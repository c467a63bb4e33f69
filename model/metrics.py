"""Category and triple metrics from gold and predicted answers (pure).

Conventions (sklearn's zero_division=0): a precision with no predictions, a recall with no gold,
and an F1 with P + R == 0 are 0.0, so a model that predicts nothing scores 0, not "undefined".
A metric is None only where nothing at all was evaluated (no rows, or neither gold nor predictions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from model.parsing import Triple

# Column of the confusion matrix for answers that parsed to no known label.
NONE_COLUMN = "(none)"


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    """precision, recall, f1 and support (= n_gold) from counts, zero-division giving 0.0."""
    precision, recall = _ratio(tp, n_pred), _ratio(tp, n_gold)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "support": n_gold}


def classification_metrics(gold: list[str], pred: list[str | None], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-label P/R/F1 and the confusion matrix of predicted labels.

    A None prediction (an unparsed answer) is wrong: a miss for its gold label, a false positive
    for no label, and counted in the confusion matrix's last column "(none)". Macro-F1 averages
    over the labels that occur in gold or predictions, so labels absent from this data set do not
    drag it down; their per-label entries are None.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    # Labels outside `labels` (a dev label unseen in training) still get a row, not silently lost.
    seen = [label for label in [*gold, *pred] if label is not None]
    rows = list(dict.fromkeys([*labels, *seen]))
    index = {label: i for i, label in enumerate(rows)}
    matrix = [[0] * (len(rows) + 1) for _ in rows]
    for g, p in zip(gold, pred, strict=True):
        matrix[index[g]][len(rows) if p is None else index[p]] += 1

    gold_counts, pred_counts = Counter(gold), Counter(p for p in pred if p is not None)
    correct = Counter(g for g, p in zip(gold, pred, strict=True) if g == p)
    per_label: dict[str, dict] = {}
    for label in rows:
        if gold_counts[label] or pred_counts[label]:
            per_label[label] = _prf(correct[label], pred_counts[label], gold_counts[label])
        else:
            per_label[label] = {"precision": None, "recall": None, "f1": None, "support": 0}
    occurring = [m["f1"] for m in per_label.values() if m["f1"] is not None]
    n = len(gold)
    return {
        "n": n,
        "correct": sum(correct.values()),
        "accuracy": sum(correct.values()) / n if n else None,
        "macro_f1": sum(occurring) / len(occurring) if occurring else None,
        "per_label": per_label,
        "confusion": {"labels": rows, "columns": [*rows, NONE_COLUMN], "matrix": matrix},
    }


def triple_metrics(gold: list[list[Triple]], pred: list[list[Triple]]) -> dict:
    """Micro precision/recall/F1 over all rows, exact match on (subject, predicate, object).

    Types are not compared. A triple repeated within a row counts once, in gold and in predictions.
    No predictions but some gold gives precision 0.0 (not None: predicting nothing is a failure
    to report, not an undefined score); no gold and no predictions gives None everywhere.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold rows but {len(pred)} prediction rows")
    tp = n_pred = n_gold = 0
    by_predicate: dict[str, Counter] = {}
    for gold_row, pred_row in zip(gold, pred, strict=True):
        gold_keys, pred_keys = {t.key() for t in gold_row}, {t.key() for t in pred_row}
        for keys, field in ((gold_keys, "n_gold"), (pred_keys, "n_pred"), (gold_keys & pred_keys, "tp")):
            for key in keys:
                by_predicate.setdefault(key[1], Counter())[field] += 1
        tp += len(gold_keys & pred_keys)
        n_pred += len(pred_keys)
        n_gold += len(gold_keys)
    per_predicate = {
        name: _prf(counts["tp"], counts["n_pred"], counts["n_gold"]) for name, counts in sorted(by_predicate.items())
    }
    if n_pred == 0 and n_gold == 0:
        overall = {"precision": None, "recall": None, "f1": None}
    else:
        overall = {key: value for key, value in _prf(tp, n_pred, n_gold).items() if key != "support"}
    return {**overall, "tp": tp, "n_pred": n_pred, "n_gold": n_gold, "rows": len(gold), "per_predicate": per_predicate}


def at_thresholds(
    thresholds: Sequence[float],
    gold_labels: list[str],
    labels: list[tuple[str | None, float | None]],
    gold_sets: list[list[Triple]],
    pred_sets: list[list[Triple]],
    comment_sets: list[list[Triple]],
) -> list[dict]:
    """Precision and recall when only answers with confidence >= t are kept, for each threshold t.

    Categories: labels[i] = (strict label or None, its confidence). cls_coverage = share of rows answered
    at t, cls_precision = accuracy among them, cls_recall = correct answers at t / all rows.
    Triples: those with confidence >= t, scored as triple_metrics does; hallucination_rate = share of
    comments (comment_sets) still given a triple. An answer without a confidence is never kept above 0.
    """

    def kept(confidence: float | None, t: float) -> bool:
        return t <= 0 or (confidence is not None and confidence >= t)

    out = []
    for t in thresholds:
        answered = [(g, p) for g, (p, c) in zip(gold_labels, labels, strict=True) if p is not None and kept(c, t)]
        correct = sum(g == p for g, p in answered)
        ie = triple_metrics(gold_sets, [[x for x in row if kept(x.confidence, t)] for row in pred_sets])
        with_triples = sum(any(kept(x.confidence, t) for x in row) for row in comment_sets)
        out.append({
            "threshold": t,
            "cls_coverage": _ratio(len(answered), len(gold_labels)) if gold_labels else None,
            "cls_precision": _ratio(correct, len(answered)) if gold_labels else None,
            "cls_recall": _ratio(correct, len(gold_labels)) if gold_labels else None,
            "triple_precision": ie["precision"],
            "triple_recall": ie["recall"],
            "triple_f1": ie["f1"],
            "triples_kept": ie["n_pred"],
            "hallucination_rate": _ratio(with_triples, len(comment_sets)) if comment_sets else None,
        })
    return out
