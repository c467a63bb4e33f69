"""At each evaluation, decode a few dev rows with the model being trained and read them with the real parser.

Eval loss says the model fits the answer text; it does not say whether the answers parse, or are right.
So after every evaluation, rank 0 answers a few fixed dev rows (half of each task where the data has
both) the way serving does (model.predict, unconstrained: this shows what the model has learnt, not
what the grammar forces), prints one line and appends to train_log.jsonl:
  {"step", "sample_n", "sample_well_formed", "sample_correct"}
(well-formed: parsed in the exact training format; correct: the category, or the set of triples, equals
the reference). It must never stop training: any error is printed as a warning and the run goes on.
"""

from __future__ import annotations

import json
from pathlib import Path


def pick_samples(dev_rows: list, n: int) -> list:
    """The first dev rows of each task, alternating, n in all (fewer if the dev file is smaller)."""
    by_task: dict[str, list] = {}
    for row in dev_rows:
        by_task.setdefault(row.task, []).append(row)
    picked, queues = [], [list(rows) for _, rows in sorted(by_task.items())]
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def decode_samples(lm, rows: list) -> dict:
    """Answer `rows` (Examples with .text, .task and .answer) with `lm`; the log record without the step."""
    from core.dataset import CLASSIFICATION
    from model.parsing import Triple
    from model.predict import predict

    well_formed = correct = 0
    shown = ""
    for task in sorted({row.task for row in rows}):
        group = [row for row in rows if row.task == task]
        predictions = predict(lm, [row.text for row in group], tasks=(task,), constrained=False)
        for row, pred in zip(group, predictions, strict=True):
            well_formed += bool(pred.well_formed.get(task))
            if task == CLASSIFICATION:
                correct += pred.category == row.answer[0]
            else:
                gold = {Triple(t["subject"], t["predicate"], t["object"]) for t in row.answer}
                correct += set(pred.triples) == gold
            shown = shown or f"{row.text[:20]!r} -> {pred.raw.get(task, '')[:60]!r}"
    n = len(rows)
    return {"sample_n": n, "sample_well_formed": well_formed / n, "sample_correct": correct / n, "example": shown}


def make_sample_decode_callback(
    dev_rows: list, n: int, tokenizer, schema: dict, family, log_path: Path, precision: str
):
    """A TrainerCallback that runs decode_samples after each evaluation (rank 0), or None when n is 0."""
    from transformers import TrainerCallback

    samples = pick_samples(dev_rows, n) if n > 0 else []
    if not samples:
        return None

    class SampleDecode(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero or model is None:
                return
            try:
                record = decode_samples(_loaded(model, tokenizer, schema, family, precision), samples)
            except Exception as err:  # noqa: BLE001 - a failed sample never costs the run
                print(f"warning: step {state.global_step} sample decode skipped: {type(err).__name__}: {err}",
                      flush=True)
                return
            example = record.pop("example")
            print(
                f"step {state.global_step} sample decode ({record['sample_n']} dev rows, unconstrained): "
                f"well-formed {record['sample_well_formed']:.0%}, correct {record['sample_correct']:.0%}; "
                f"e.g. {example}",
                flush=True,
            )
            with log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **record}) + "\n")

    return SampleDecode()


def _loaded(model, tokenizer, schema: dict, family, precision: str):
    """The model being trained, dressed as model.load.LoadedModel for model.predict (no copy, no reload)."""
    from model.load import LoadedModel

    # peft's wrapper forwards attribute lookups in ways generation helpers do not expect; its base model
    # still runs the LoRA layers.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(inner.parameters()).device
    n_params = sum(p.numel() for p in inner.parameters())
    return LoadedModel(Path("."), inner, tokenizer, schema, family, str(device), precision, n_params, 0.0)
