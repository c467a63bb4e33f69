"""Batched prediction: texts -> Predictions (category + triples) with the exact training prompts.

Rows are sorted by length and generated in left-padded batches with the KV cache; each comment
gets both answers (its category and its triples). Decoding is constrained by default (see
model.decoding), so answers are always well-formed; `constrained=False` is kept for comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from core.dataset import CLASSIFICATION, EXTRACTION, TASKS, kept_head_length, truncate_prompt
from model import confidence, decoding, grammar, vocab
from model.load import LoadedModel
from model.parsing import Triple, format_category, parse_category, parse_triples
from model.prompts import build_prompt, is_blank

DEFAULT_MAX_NEW_TOKENS = {CLASSIFICATION: 16, EXTRACTION: 300}
MAX_TEXT_CHARS = 2000  # longer texts are cut (with a warning) before prompting


@dataclass
class Prediction:
    text: str
    category: str | None = None
    triples: list[Triple] = field(default_factory=list)
    # Probability of the category answer under the constraint (model.confidence); None if unconstrained.
    category_confidence: float | None = None
    raw: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    # Per task: the answer parsed in the training format with no repair, and whether it hit the token limit.
    well_formed: dict[str, bool] = field(default_factory=dict)
    hit_limit: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["triples"] = [t.to_output() for t in self.triples]
        return data


@dataclass
class Answer:
    """One generated answer: its text, whether it hit max_new_tokens, its ids and (constrained) choices."""

    text: str
    hit_limit: bool
    ids: list[int] = field(default_factory=list)
    # (answer index, log-probability) of each token chosen among several allowed; None: unconstrained.
    choices: list[tuple[int, float]] | None = field(default=None, compare=False)
    # How many characters of the text the model saw (seen_text); None: all of them.
    seen_chars: int | None = None


def max_new_tokens_for(schema: dict, task: str) -> int:
    """The longest training answer (in tokens, end token included) bounds generation."""
    budget = schema.get("answer_tokens", {}).get(task, DEFAULT_MAX_NEW_TOKENS[task])
    return min(int(budget), int(schema.get("max_target_len", budget)))


def prompt_ids(lm: LoadedModel, text: str, task: str, phrasing: str | None = None) -> list[int]:
    """Token ids a generate() call starts from: exactly the training row up to the answer, cut as training cuts
    an over-long prompt (in the middle, keeping the instruction's head and the 'Answer:' tail)."""
    ids = lm.tokenizer.encode(build_prompt(lm.schema, text, task, phrasing), add_special_tokens=False)
    ids = truncate_prompt(ids, int(lm.schema.get("max_source_len", len(ids))))
    return lm.family.build_generation_ids(lm.tokenizer, ids)


def seen_text(lm: LoadedModel, text: str, task: str, phrasing: str | None = None) -> str:
    """The part of the text the triple constraint may copy spans from: all of it when its prompt fits the
    schema's max_source_len tokens; else the longest start of it that lies inside the head training's cut
    keeps (core.dataset.truncate_prompt), so every span comes from words the model read. The prompt itself is
    not changed: it is cut exactly as in training (a prompt rebuilt around a shorter text would be one the
    model was never trained on)."""
    limit = lm.schema.get("max_source_len")
    if limit is None:
        return text
    encode = lm.tokenizer.encode
    if len(encode(build_prompt(lm.schema, text, task, phrasing), add_special_tokens=False)) <= int(limit):
        return text
    marker = "\x00"
    before = build_prompt(lm.schema, marker, task, phrasing).split(marker)[0]  # the template up to the text
    head = kept_head_length(int(limit))
    body = text.strip()

    def inside(chars: int) -> bool:
        return len(encode(before + body[:chars], add_special_tokens=False)) <= head

    if not inside(1):
        return body[:1]
    fitting, too_long = 1, len(body)  # binary search: a few encodes, only for over-long texts
    while too_long - fitting > 1:
        middle = (fitting + too_long) // 2
        fitting, too_long = (middle, too_long) if inside(middle) else (fitting, middle)
    # The last character may share a token with the cut; leave it out.
    return body[: max(1, fitting - 1)].rstrip()


def clean_text(text: object) -> tuple[str | None, list[str], str | None]:
    """(text to label, warnings, error): empty texts are errors, over-long ones are cut."""
    if text is None or (isinstance(text, float) and text != text):  # None or NaN from pandas
        return None, [], "empty text"
    text = str(text).strip()
    if is_blank(text):
        return None, [], "empty text"
    if len(text) > MAX_TEXT_CHARS:
        return text[:MAX_TEXT_CHARS], [f"text cut to its first {MAX_TEXT_CHARS} of {len(text)} characters"], None
    return text, [], None


def left_padded_batch(lm: LoadedModel, rows: list[list[int]], pad_id: int):
    """(input_ids, attention_mask, extra generate kwargs) for rows of prompt ids, padded on the left.

    ChatGLM's own tokenizer pads and builds what its model expects: for ChatGLM-6B v1 a 4D boolean
    mask (prompt bidirectional, pads masked) plus 2D position ids; v1 ignores a plain 0/1 mask and
    would attend to the pads. Other families take a 0/1 mask and number positions from it.
    """
    import torch

    if lm.family.name.startswith("chatglm"):
        batch = lm.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        extra = {"position_ids": batch["position_ids"].to(lm.device)} if "position_ids" in batch else {}
        return batch["input_ids"].to(lm.device), batch["attention_mask"].to(lm.device), extra
    longest = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (longest - len(row)) + row for row in rows], device=lm.device)
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in rows], device=lm.device)
    return input_ids, mask, {}


def generate_answers(
    lm: LoadedModel,
    texts: Sequence[str],
    task: str,
    batch_size: int = 8,
    constrained: bool = True,
    max_new_tokens: int | None = None,
    phrasing: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Answer]:
    """The answer to each text, in input order."""
    import torch

    tok = lm.tokenizer
    budget = max_new_tokens or max_new_tokens_for(lm.schema, task)
    end_id = lm.family.end_token_id(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    seen = [seen_text(lm, text, task, phrasing) if task == EXTRACTION else text for text in texts]
    rows = [prompt_ids(lm, text, task, phrasing) for text in texts]
    max_triples = int(lm.schema.get("max_triples") or 16)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
    answers: list[Answer] = [Answer("", False)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask, extra = left_padded_batch(lm, [rows[i] for i in chunk], pad_id)
        with lm.lock, torch.no_grad():
            if constrained:
                constraints = [
                    grammar.CategoryConstraint(lm.schema["labels"])
                    if task == CLASSIFICATION
                    else grammar.TripleConstraint(lm.schema, vocab.text_view(tok, seen[i]), max_triples=max_triples)
                    for i in chunk
                ]
                generated = decoding.constrained_generate_scored(
                    lm.model, tok, input_ids, mask, constraints, budget, end_id, pad_id, **extra
                )
            else:
                generated = [
                    decoding.Generated(ids, None)
                    for ids in decoding.unconstrained_generate(
                        lm.model, tok, input_ids, mask, budget, end_id, pad_id, **extra
                    )
                ]
        for i, g in zip(chunk, generated, strict=True):
            cut = len(seen[i]) if seen[i] != texts[i] else None
            answers[i] = Answer(vocab.decode_answer(tok, g.ids), len(g.ids) >= budget, g.ids, g.choices, cut)
        if on_batch:
            on_batch(len(chunk))
    return answers


def score_answer(lm: LoadedModel, text: str, task: str, answer_ids: Sequence[int]) -> Answer:
    """A given answer (ids, without the end token) put through constrained generation as if the model had
    chosen it: the choices and log-probabilities decoding would record, so its confidence compares with a
    generated answer's. Runs HF generate() (the model's own input preparation, positions and cache) with a
    processor after the grammar's that forces the answer. Raises ValueError if the constraint does not
    allow the answer."""
    import torch

    tok = lm.tokenizer
    end_id = lm.family.end_token_id(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    constraint = (grammar.CategoryConstraint(lm.schema["labels"]) if task == CLASSIFICATION
                  else grammar.TripleConstraint(lm.schema, vocab.text_view(tok, seen_text(lm, text, task)),
                                                max_triples=int(lm.schema.get("max_triples") or 16)))
    input_ids, mask, extra = left_padded_batch(lm, [prompt_ids(lm, text, task)], pad_id)
    budget = max(max_new_tokens_for(lm.schema, task), len(answer_ids) + 1)
    processor = decoding.grammar_processor(tok, [constraint], input_ids.shape[1], budget, end_id)
    forced = _ForceAnswer([*answer_ids, end_id], input_ids.shape[1])
    try:
        with lm.lock, torch.no_grad():
            sequences = decoding.generate_with(lm.model, input_ids, mask, len(answer_ids) + 1, end_id, pad_id,
                                               [processor, forced], **extra)
    except _Refused as refused:
        k = refused.step
        what = "the end" if k == len(answer_ids) else f"token {k} ({tok.decode([answer_ids[k]])!r})"
        raise ValueError(f"the {task} constraint does not allow {what} of this answer") from None
    processor.finish(sequences)
    return Answer(vocab.decode_answer(tok, answer_ids), False, list(answer_ids), processor.choices[0])


class _Refused(Exception):
    def __init__(self, step: int):
        self.step = step


class _ForceAnswer:
    """Logits processor (after the grammar's) that leaves only the answer's next token, and stops generation
    (_Refused) where the grammar has ruled that token out."""

    def __init__(self, ids: list[int], prompt_length: int):
        self.ids, self.prompt_length = ids, prompt_length

    def __call__(self, input_ids, scores):
        k = input_ids.shape[1] - self.prompt_length
        token = self.ids[min(k, len(self.ids) - 1)]
        if scores[0, token] == float("-inf"):
            raise _Refused(k)
        forced = scores.new_full(scores.shape, float("-inf"))
        forced[:, token] = 0.0
        return forced


def answer_confidence(lm: LoadedModel, task: str, answer: Answer) -> float | list[float]:
    """The category confidence of a classification answer, or each triple's confidence of an extraction one."""
    if answer.choices is None:
        raise ValueError("an unconstrained answer has no confidence")
    if task == CLASSIFICATION:
        return confidence.category_confidence(answer.choices)
    return [score for _, score in _triple_scores(lm, answer)]


def _triple_scores(lm: LoadedModel, got: Answer) -> list[tuple[tuple[str, str, str], float]]:
    """(key as written in the answer, confidence) of each triple object in the answer, in order."""
    if got.choices is None:
        return []
    v = vocab.vocab_for(lm.tokenizer)
    n = len(v.strings)
    pieces = [v.strings[i] if 0 <= i < n else None for i in got.ids]
    return confidence.triple_confidences(got.text, confidence.token_offsets(pieces, v.lead), got.choices)


def _take_score(scores: list[tuple[tuple[str, str, str], float]], key: tuple[str, str, str]) -> float | None:
    """The confidence of the first not yet taken object with this key (parsing drops duplicates after it)."""
    for k, (written, score) in enumerate(scores):
        if written == key:
            del scores[k]
            return score
    return None


def predict(
    lm: LoadedModel,
    texts: Sequence[object],
    tasks: Sequence[str] = TASKS,
    batch_size: int = 8,
    constrained: bool = True,
    phrasing: dict[str, str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    generate: Callable[..., list[Answer]] | None = None,
) -> list[Prediction]:
    """One Prediction per text, in order. Empty texts get an error, never an exception.
    `generate`: another engine's generate_answers (model.vllm_engine); the prompts, parsing and columns stay ours."""
    started = time.time()
    predictions = []
    for raw_text in texts:
        text, warnings, error = clean_text(raw_text)
        predictions.append(Prediction(text=text or "", warnings=warnings, error=error))
    valid = [i for i, p in enumerate(predictions) if p.error is None]
    total_steps, done = len(valid) * len(tasks), 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, total_steps)

    for task in tasks:
        answers = (generate or generate_answers)(
            lm, [predictions[i].text for i in valid], task, batch_size, constrained,
            phrasing=(phrasing or {}).get(task), on_batch=progress,
        )
        for i, got in zip(valid, answers, strict=True):
            pred, answer = predictions[i], got.text
            pred.raw[task], pred.hit_limit[task] = answer, got.hit_limit
            if got.seen_chars is not None:
                pred.warnings.append(f"{task}: the prompt allows {lm.schema['max_source_len']} tokens, so triples "
                                     f"come from the first {got.seen_chars} of {len(pred.text)} characters")
            if task == CLASSIFICATION:
                parsed = parse_category(answer, lm.schema["labels"])
                pred.category = parsed.label
                pred.well_formed[task] = parsed.label is not None and answer == format_category(parsed.label)
                if got.choices is not None and pred.category is not None:
                    pred.category_confidence = confidence.category_confidence(got.choices)
            else:
                # Spans are copied from the text as the tokenizer sees it, then read back in the text.
                view = vocab.text_view(lm.tokenizer, pred.text)
                parsed = parse_triples(answer, lm.schema, view)
                scores = _triple_scores(lm, got)
                pred.triples = [
                    replace(t, subject=vocab.restore_span(t.subject, view, pred.text),
                                        object=vocab.restore_span(t.object, view, pred.text),
                            confidence=_take_score(scores, t.key()))
                    for t in parsed.triples
                ]
                pred.well_formed[task] = parsed.ok
            pred.warnings.extend(f"{task}: {w}" for w in parsed.warnings)
    per_text = (time.time() - started) / max(1, len(valid))
    for i in valid:
        predictions[i].seconds = per_text
    return predictions
