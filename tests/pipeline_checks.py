"""What every family's pipeline test checks on its merged model (tests/chatglm, tests/modern): the model
labels a CSV through the CLI, and batched predictions equal one-at-a-time ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from core.dataset import CLASSIFICATION, read_jsonl
from model import label
from model.predict import predict


def assert_labels_a_csv(merged: Path, dev: Path, tmp_path: Path) -> None:
    """python -m model.label on six dev comments: every row, in order, a category of the label set, no error."""
    comments = [ex.text for ex in read_jsonl(dev) if ex.task == CLASSIFICATION][:6]
    source = tmp_path / "comments.csv"
    with source.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["comment"]] + [[c] for c in comments])
    out = tmp_path / "labelled.csv"
    label.main(["--model", str(merged), "--input", str(source), "--output", str(out)])
    with out.open(encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    labels = json.loads((merged / "schema.json").read_text())["labels"]
    assert [r["comment"] for r in rows] == comments
    assert all(r["category"] in labels and r["error"] == "" for r in rows)
    assert all(0 < float(r["category_confidence"]) <= 1 for r in rows)


def assert_batched_equals_one_at_a_time(lm, texts: list[str]) -> None:
    """The same answers whatever the batch; padding changes the sums' order a little, never the answers."""
    with torch.no_grad():
        batched = predict(lm, texts, batch_size=8)
        single = [predict(lm, [t], batch_size=1)[0] for t in texts]

    def answer(p):  # Triple equality leaves out the confidence
        return {k: v for k, v in vars(p).items() if k not in ("seconds", "category_confidence")}

    def confidences(p):
        return [p.category_confidence, *(t.confidence for t in p.triples)]

    assert [answer(p) for p in batched] == [answer(p) for p in single]
    for b, s in zip(batched, single, strict=True):
        assert confidences(b) == pytest.approx(confidences(s), rel=1e-4)
