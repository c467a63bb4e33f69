"""Does the fast decoder give the model's own answers? Decodes dev texts twice, under the same constraint:
with jump-forward (several tokens per pass, model.feeders' masks and positions) and with plain HF generate()
(one token per pass, the model's own prepare_inputs_for_generation and cache), and compares them token for token.

    python -m model.decode_check --model DIR [--data data/mixed_dev_dataset.jsonl] [--n 32] [--batch-size 8]

Both ways follow the same rules (`SameRulesProcessor`): where a literal could be spelled with several token
splits, jump-forward spells the cheapest one, so generate() is held to that spelling too; every real choice
is the model's, greedy. Answers equal token for token means the fast path feeds the model exactly what its
own code would. Run it once on your own model directory (e.g. a real ChatGLM-6B on a GPU) before trusting the
speed-up; exit status 1 if any answer differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from core.config import parse_config
from core.dataset import CLASSIFICATION, DEV_FILE, EXTRACTION, read_jsonl
from model import feeders
from model.confidence import constrained_logprobs
from model.grammar import INF
from model.matcher import RowMatcher, row_matchers


class SameRulesProcessor(LogitsProcessor):
    """HF generate()'s side of the jump-forward loop's rules: each step allows only the next token of the row's
    forced run (`RowMatcher.run_forced`), or, at a choice, the tokens the row is `waiting_on`; a finished row
    only its end token. Greedy generate() then takes exactly the decisions jump-forward takes, one token per
    pass through the model's own input preparation."""

    def __init__(self, matchers: list[RowMatcher], prompt_length: int):
        self.matchers = matchers
        self.prompt_length = prompt_length
        self.queue: list[list[int]] | None = None  # per row, forced tokens still to emit
        self.choosing = [False] * len(matchers)  # per row, whether the last step let it choose
        self.pending: list[dict[int, float]] = [{} for _ in matchers]  # log-probabilities of the last choice

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.queue is None:  # first step: each row's first forced run
            self.queue = []
            for matcher in self.matchers:
                matcher.run_forced()
                self.queue.append(list(matcher.tokens))
        else:
            for row, matcher in enumerate(self.matchers):
                if not self.choosing[row]:
                    continue
                self.choosing[row] = False
                token = int(input_ids[row, -1])  # the row was at a choice: take what generate() picked
                matcher.accept(token, self.pending[row].get(token))
                before = len(matcher.tokens)
                matcher.run_forced()
                self.queue[row] = list(matcher.tokens[before:])
        masked = torch.full_like(scores, -INF)
        for row, matcher in enumerate(self.matchers):
            if self.queue[row]:
                masked[row, self.queue[row].pop(0)] = 0
                continue
            ids = sorted(matcher.waiting_on) if not matcher.done else []
            if not ids:
                masked[row, matcher.end_token_id] = 0
                continue
            values = scores[row, ids]
            if torch.isneginf(values).all():
                values = torch.zeros_like(values)  # as jump-forward: the lowest allowed id
            masked[row, ids] = values
            self.choosing[row] = True
            logprobs = constrained_logprobs(values.float().tolist()) if len(ids) > 1 else [None]
            self.pending[row] = dict(zip(ids, logprobs, strict=False)) if len(ids) > 1 else {}
        return masked


def compare(lm, texts: list[str], task: str, batch_size: int = 8) -> dict:
    """Decode `texts` both ways; n, identical, the first differing text, and the forward passes of each way."""
    from model import decoding, grammar, vocab
    from model.predict import left_padded_batch, max_new_tokens_for, prompt_ids, seen_text

    tok = lm.tokenizer
    end_id = lm.family.end_token_id(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    budget = max_new_tokens_for(lm.schema, task)
    max_triples = int(lm.schema.get("max_triples") or 16)
    report = {"task": task, "n": 0, "identical": 0, "first_difference": None, "passes": {"jump": 0, "generate": 0}}

    def constraints(chunk):
        if task == CLASSIFICATION:
            return [grammar.CategoryConstraint(lm.schema["labels"]) for _ in chunk]
        views = [vocab.text_view(tok, seen_text(lm, t, task)) for t in chunk]
        return [grammar.TripleConstraint(lm.schema, view, max_triples=max_triples) for view in views]

    calls = [0]
    # On the module both ways run: jump-forward calls a Llama-like decoder apart from its output layer.
    counted = feeders.pass_module(lm.model)
    hook = counted.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            input_ids, mask, extra = left_padded_batch(lm, [prompt_ids(lm, t, task) for t in chunk], pad_id)
            with lm.lock, torch.no_grad():
                calls[0] = 0
                jumped = decoding.constrained_generate(
                    lm.model, tok, input_ids, mask, constraints(chunk), budget, end_id, pad_id, jump_forward=True,
                    **extra,
                )
                report["passes"]["jump"] += calls[0]
                calls[0] = 0
                matchers = row_matchers(tok, constraints(chunk), budget, end_id)
                sequences = decoding.generate_with(
                    lm.model, input_ids, mask, budget, end_id, pad_id,
                    [SameRulesProcessor(matchers, input_ids.shape[1])], **extra,
                )
                report["passes"]["generate"] += calls[0]
            stepped = decoding.answers_of(sequences, input_ids.shape[1], end_id, pad_id)
            for text, a, b in zip(chunk, jumped, stepped, strict=True):
                report["n"] += 1
                report["identical"] += a == b
                if a != b and report["first_difference"] is None:
                    report["first_difference"] = {"text": text, "jump_forward": vocab.decode_answer(tok, a),
                                                  "generate": vocab.decode_answer(tok, b)}
    finally:
        hook.remove()
    return report


@dataclass
class DecodeCheckConfig:
    model: str = field(metadata={"help": "merged (or base) model directory with schema.json"})
    data: str = field(default=f"data/{DEV_FILE}", metadata={"help": "labelled jsonl whose texts are decoded"})
    n: int = field(default=32, metadata={"help": "texts per task"})
    batch_size: int = field(default=8, metadata={"help": "rows per batch (left-padded, as predict batches them)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:N (default: cuda if available)"})


def main(argv=None) -> list[dict]:
    from model.load import ModelLoadError, load_merged

    cfg = parse_config(DecodeCheckConfig, argv, __doc__)
    try:
        lm = load_merged(cfg.model, device=cfg.device)
        examples = read_jsonl(cfg.data)
    except (ModelLoadError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    reports = []
    for task in (CLASSIFICATION, EXTRACTION):
        texts = [ex.text for ex in examples if ex.task == task][: cfg.n]
        if texts:
            reports.append(compare(lm, texts, task, cfg.batch_size))
    print(json.dumps(reports, ensure_ascii=False, indent=2))
    if any(r["identical"] != r["n"] for r in reports):
        raise SystemExit(1)
    return reports


if __name__ == "__main__":
    main()
