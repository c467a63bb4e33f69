"""Can constrained decoding produce the gold answers? Teacher-forces each reference answer, encoded as
training encodes it, through the grammar token by token, with the model's own tokenizer.

    python -m model.grammar_check --model DIR [--data data/mixed_train_dataset.jsonl,data/mixed_dev_dataset.jsonl]

A row whose answer the grammar cannot hold by design is counted apart, with its reason: a span that is not
in its text, a span that starts or ends with a blank or holds a quote, backslash or control character, or an
answer the tokenizer itself changes in a way serving cannot undo. (ChatGLM-6B's tokenizer NFKC-normalises
full-width punctuation: the model copies spans from that view of the text, and they are read back in the
text at the same positions, so those answers count as held when they read back as the gold.)
Every other answer should be accepted: a model can only be served answers like the ones it was taught.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from core.config import parse_config
from core.dataset import CLASSIFICATION, Example, read_jsonl
from model import grammar


@dataclass
class GrammarCheckConfig:
    model: str = field(metadata={"help": "merged (or base) model directory with schema.json"})
    data: str = field(default="data/mixed_train_dataset.jsonl,data/mixed_dev_dataset.jsonl",
                      metadata={"help": "labelled jsonl files, comma-separated"})


def unholdable(example: Example) -> str | None:
    """Why the grammar cannot produce this answer whatever the tokenizer (None: it can)."""
    if example.task == CLASSIFICATION:
        return None
    for triple in example.answer:
        for key in ("subject", "object"):
            span = str(triple.get(key, ""))
            if span not in example.text:
                return "span not in its text"
            if span != span.strip() or not all(grammar.copyable(ch) for ch in span):
                return "span the grammar does not copy (edge blank, quote, backslash, control character)"
    return None


def restores(answer: str, example: Example, view: str) -> bool:
    """Whether the spans of `answer` (the tokenizer's view of the gold answer), copied from `view` (its view
    of the text), read back in the text as the gold spans: then serving returns the gold triples."""
    from model.parsing import parse_triples
    from model.vocab import restore_span

    if example.task == CLASSIFICATION or view == example.text:
        return False
    parsed = parse_triples(answer)
    gold = [(str(t["subject"]), str(t["object"])) for t in example.answer]
    got = [(restore_span(t.subject, view, example.text), restore_span(t.object, view, example.text))
           for t in parsed.triples]
    return parsed.ok and got == gold


def first_rejected(tokenizer, constraint, ids: list[int], end_id: int) -> int | None:
    """Index of the first gold token (the end token last) the constraint forbids; None if all pass."""
    import torch

    from model.decoding import grammar_processor

    processor = grammar_processor(tokenizer, [constraint], 1, 10_000, end_id)
    seq = [0]  # a one-token prompt: the processor only looks at what follows it
    for k, token in enumerate(ids + [end_id]):
        scores = processor(torch.tensor([seq]), torch.zeros(1, max(len(tokenizer), token + 1)))
        if torch.isneginf(scores[0, token]):
            return k
        seq.append(token)
    return None


def check(tokenizer, family, schema: dict, examples: list[Example]) -> dict:
    """Per task: n, accepted, and the rows left out by reason; `rejected` lists the file lines that failed."""
    from model.vocab import decode_answer, text_view

    end_id = family.end_token_id(tokenizer)
    max_triples = int(schema.get("max_triples") or 16)
    report: dict = {}
    for example in examples:
        row = report.setdefault(example.task, {"n": 0, "accepted": 0, "left_out": Counter(), "rejected": []})
        row["n"] += 1
        reason = unholdable(example)
        ids = tokenizer.encode(example.target, add_special_tokens=False)
        answer = decode_answer(tokenizer, ids)  # what the model is taught: the tokenizer's view of the target
        text = text_view(tokenizer, example.text) if answer != example.target else example.text
        if reason is None and answer != example.target and not restores(answer, example, text):
            reason = "the tokenizer changes the answer text"
        if reason is not None:
            row["left_out"][reason] += 1
            continue
        constraint = (grammar.CategoryConstraint(schema["labels"]) if example.task == CLASSIFICATION
                      else grammar.TripleConstraint(schema, text, max_triples=max_triples))
        if first_rejected(tokenizer, constraint, ids, end_id) is None:
            row["accepted"] += 1
        else:
            row["rejected"].append(example.line)
    for row in report.values():
        row["left_out"] = dict(row["left_out"])
        row["share"] = row["accepted"] / max(1, row["n"] - sum(row["left_out"].values()))
    return report


def main(argv=None) -> dict[str, dict]:
    from model.load import ModelLoadError, load_merged

    cfg = parse_config(GrammarCheckConfig, argv, __doc__)
    try:
        lm = load_merged(cfg.model, device="cpu")
        files = {path: read_jsonl(path) for path in cfg.data.split(",") if path}
    except (ModelLoadError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    # One report per file, so a rejected line number names its file.
    reports = {path: check(lm.tokenizer, lm.family, lm.schema, examples) for path, examples in files.items()}
    print(json.dumps(reports, ensure_ascii=False, indent=2))
    return reports


if __name__ == "__main__":
    main()
