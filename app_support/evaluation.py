"""Evaluation page helpers: read a labelled jsonl and turn model.evaluate's dict into tables.

No streamlit here. The metrics themselves come from model.evaluate.evaluate; this only reshapes.
"""

from __future__ import annotations

import json
from pathlib import Path

from app_support.uploads import saved_upload
from core.dataset import DataError, Example, read_jsonl


def load_examples(path: Path | str | None = None, data: bytes | None = None, name: str = "upload",
                  limit: int = 0) -> list[Example]:
    """Validated rows of a {context, target} jsonl file or upload, the first `limit` if limit > 0.

    Raises DataError worded for the user (bad lines, no rows, not UTF-8).
    """
    if data is not None:
        with saved_upload(name, data, "upload.jsonl", DataError) as tmp:
            try:
                examples = _read(tmp)
            except DataError as err:
                raise DataError(str(err).replace(str(tmp), name)) from None
    else:
        examples = _read(Path(path))
    return examples[:limit] if limit > 0 else examples


def _read(path: Path) -> list[Example]:
    try:
        return read_jsonl(path)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; expected a jsonl file saved as UTF-8") from None


def task_counts(examples: list[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.task] = counts.get(example.task, 0) + 1
    return counts


def _score(value):
    return None if value is None else round(float(value), 4)


def _prf_row(name_key: str, name: str, scores: dict) -> dict:
    return {name_key: name, **{k: _score(scores.get(k)) for k in ("precision", "recall", "f1")},
            "support": scores.get("support")}


def per_label_table(metrics: dict):
    """DataFrame: label, precision, recall, f1, support (labels that occur in gold or predictions)."""
    import pandas as pd

    rows = [_prf_row("label", label, v) for label, v in metrics.get("per_label", {}).items() if v.get("f1") is not None]
    return pd.DataFrame(rows, columns=["label", "precision", "recall", "f1", "support"])


THRESHOLD_COLUMNS = ("threshold", "cls_coverage", "cls_precision", "cls_recall", "triple_precision",
                     "triple_recall", "triple_f1", "triples_kept", "hallucination_rate")


def threshold_table(metrics: dict):
    """DataFrame: what keeping only answers with confidence >= threshold gives (model.evaluate), one row each."""
    import pandas as pd

    rows = [{c: row.get(c) if c in ("threshold", "triples_kept") else _score(row.get(c)) for c in THRESHOLD_COLUMNS}
            for row in metrics.get("confidence_thresholds") or []]
    return pd.DataFrame(rows, columns=list(THRESHOLD_COLUMNS))


def per_predicate_table(metrics: dict):
    """DataFrame: predicate, precision, recall, f1, support (gold triples), sorted by support."""
    import pandas as pd

    rows = [_prf_row("predicate", name, v) for name, v in metrics.get("per_predicate", {}).items()]
    rows.sort(key=lambda row: (-(row["support"] or 0), row["predicate"]))
    return pd.DataFrame(rows, columns=["predicate", "precision", "recall", "f1", "support"])


def _short(value) -> str:
    """Gold/pred cell text: a label as is, triples as compact (subject, predicate, object) tuples."""
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return "; ".join(f"({t.get('subject')}, {t.get('predicate')}, {t.get('object')})" for t in value
                         if isinstance(t, dict)) or "[]"
    return str(value)


TEXT_SHOWN = 80  # characters of a wrong row's text in the table (the whole row is in the predictions file)


def _clip(text: str, limit: int = TEXT_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def wrong_rows(metrics: dict):
    """DataFrame of the rows the model got wrong: line, task, gold, pred, text (clipped), warnings.

    Gold and prediction come before the text so they are visible without scrolling the table.
    """
    import pandas as pd

    rows = [
        {"line": row.get("line"), "task": row.get("task"), "gold": _short(row.get("gold")),
         "pred": _short(row.get("pred")), "text": _clip(row.get("text", "")),
         "warnings": "; ".join(row.get("warnings") or [])}
        for row in metrics.get("predictions", []) if not row.get("correct")
    ]
    return pd.DataFrame(rows, columns=["line", "task", "gold", "pred", "text", "warnings"])


def summary_json(metrics: dict) -> bytes:
    """metrics.json content as model.evaluate writes it: everything but the per-row list."""
    summary = {key: value for key, value in metrics.items() if key != "predictions"}
    return json.dumps(summary, indent=2, ensure_ascii=False).encode("utf-8")
