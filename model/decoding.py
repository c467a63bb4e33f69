"""Constrained decoding: every answer is well-formed, even from an untrained model.

A category answer can only be one of the schema's labels in the training format (`["水果"]`);
a triple answer is always the training format ("```json\\n" + a JSON list of
{predicate, object_type, subject_type, object, subject} + "\\n```") with predicates and types
from the schema and subject/object copied verbatim from the input text, and it always closes
within the new-token budget.

How it works
- Each batch row gets a character-level automaton built from its `Constraint`: a small graph of
  CHOICE nodes (emit one of several strings; a literal is a choice of one) and SPAN nodes (copy a
  non-empty substring of the text, tracking every position where the copied string ends), ending
  in END. The automaton state is an immutable tuple, so it can branch cheaply.
- The tokenizer's vocabulary is turned once into a character trie of token strings (`model.vocab`,
  cached per tokenizer). Each step, a DFS walks the trie and the automaton together, so it visits
  only token strings that are valid continuations and collects exactly the allowed token ids
  (with the state each would lead to); every other logit becomes -inf.
- Each row's state, answer tokens and confidence record live in one `RowMatcher` (model.matcher),
  advanced with the state recorded for the chosen token (nothing is re-decoded) and driven by both
  paths: `GrammarLogitsProcessor` inside HF generate(), and the jump-forward loop.
- Budget: `Automaton.cost(state)` is an upper bound on the tokens still needed to finish (before
  the end token) that is reachable one token at a time: each literal piece costs the fewest tokens
  that spell it (DP over the trie), a span costs one single-character token per character. A token
  is allowed only if `cost(state after it) + 1 <= tokens left after it`; since some allowed token
  always lowers the cost by one, an answer can never run into max_new_tokens unfinished. Near the
  end of the budget this leaves only the closing moves: finish the current span, no new triple.
- The schema part of an automaton (its nodes and their static costs, `Skeleton`) is built once per
  schema and vocabulary; only the text tables are built per row.
- Generation (`constrained_generate`): `JumpForwardDecoder` runs its own greedy loop over the KV
  cache. Tokens that have only one possible value (the JSON skeleton, keys, the rest of a label or
  type once chosen: ~90% of answer tokens) are appended without a forward pass of their own; each
  pass feeds a row's chosen token plus the forced run after it. With a char vocabulary it picks
  exactly the tokens of token-by-token decoding. The model side is a feeder (model.feeders): Llama-like
  models, where the prompt prefix the rows share runs once and its KV cache is kept for the next
  batches and calls (model.prefix_cache), and ChatGLM-6B v1 / ChatGLM2/3, whose first pass and
  position rule come from their own remote code. Calls with generate() options keep HF generate()
  with GrammarLogitsProcessor, one token per pass (`jump_forward=False` forces it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from model.confidence import constrained_logprobs
from model.grammar import INF, Constraint
from model.jump_forward import JumpForwardDecoder
from model.matcher import RowMatcher, row_matchers

# --------------------------------------------------------------------------- logits processor


class GrammarLogitsProcessor(LogitsProcessor):
    """HF generate()'s side of the rows' matchers (model.matcher): masks every token that would leave a row's
    automaton, or its budget, to -inf, and hands each chosen token to its row's matcher.

    One matcher per batch row (greedy or sampling, no beams); prompt_length is the padded prompt width, so the
    row's generated tokens are input_ids[:, prompt_length:].
    """

    def __init__(self, matchers: list[RowMatcher], prompt_length: int):
        self.matchers = matchers
        self.prompt_length = prompt_length
        self.consumed = 0
        # Per row, each allowed token's log-probability among the allowed, when the row had a real choice.
        self.pending_logprobs: list[dict[int, float]] = [{} for _ in matchers]

    @property
    def choices(self) -> list[list[tuple[int, float]]]:
        return [m.choices for m in self.matchers]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """scores: (batch, vocab) next-token logits; returns them with every disallowed token at -inf."""
        if input_ids.shape[0] != len(self.matchers):
            raise ValueError(f"batch has {input_ids.shape[0]} rows but {len(self.matchers)} constraints (no beams)")
        self._advance(input_ids)
        rows: list[int] = []
        cols: list[int] = []
        counts: list[int] = []
        live, free_rows = [], []
        for row, matcher in enumerate(self.matchers):
            if matcher.done:
                free_rows.append(row)  # finished: generate() overwrites its token with padding anyway
                continue
            ids = list(matcher.allowed()) or [matcher.end_token_id]  # none: final, or no way on
            live.append(row)
            rows += [row] * len(ids)
            cols += ids
            counts.append(len(ids))
        index = (torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device))
        values = scores[index]
        if torch.isneginf(values).any():
            values = _revive(values, counts)
        self._note_logprobs(live, cols, values, counts)
        masked = torch.full_like(scores, -INF)
        masked[index] = values
        masked[free_rows] = scores[free_rows]
        return masked

    def _advance(self, input_ids: torch.LongTensor) -> None:
        """Hand the tokens chosen since the last call to each row's matcher."""
        generated = input_ids.shape[1] - self.prompt_length
        if generated <= self.consumed:
            return
        new = input_ids[:, self.prompt_length + self.consumed : self.prompt_length + generated].tolist()
        for row, tokens in enumerate(new):
            matcher = self.matchers[row]
            for token in tokens:
                if matcher.done:
                    break
                matcher.accept(token, self.pending_logprobs[row].get(token))
                self.pending_logprobs[row] = {}
        self.consumed = generated

    def _note_logprobs(self, rows: list[int], cols: list[int], values: torch.Tensor, counts: list[int]) -> None:
        """Remember, for rows with a real choice, each allowed token's log-probability among the allowed."""
        start = 0
        for row, n in zip(rows, counts, strict=True):
            if n > 1:
                logprobs = constrained_logprobs(values[start : start + n].float().tolist())
                self.pending_logprobs[row] = dict(zip(cols[start : start + n], logprobs, strict=True))
            start += n

    def finish(self, sequences: torch.Tensor) -> None:
        """Hand over the last chosen tokens (generate() returns without a further call)."""
        self._advance(sequences)


def grammar_processor(
    tokenizer, constraints: list[Constraint], prompt_length: int, max_new_tokens: int, end_token_id: int
) -> GrammarLogitsProcessor:
    """A GrammarLogitsProcessor over fresh matchers, one per constraint."""
    return GrammarLogitsProcessor(row_matchers(tokenizer, constraints, max_new_tokens, end_token_id), prompt_length)


def _revive(values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Give 0 to the allowed tokens of a row whose allowed tokens all have -inf scores (an earlier
    processor banned them all); otherwise greedy argmax would pick token 0 from an all -inf row."""
    values = values.clone()
    start = 0
    for n in counts:
        if torch.isneginf(values[start : start + n]).all():
            values[start : start + n] = 0
        start += n
    return values


# --------------------------------------------------------------------------- generation


def answers_of(sequences: torch.Tensor, prompt_length: int, end_token_id: int, pad_token_id: int) -> list[list[int]]:
    """Generated ids per row, cut at the end token (generate() pads finished rows after it)."""
    out = []
    for row in sequences[:, prompt_length:].tolist():
        cut = len(row)
        for i, token in enumerate(row):
            if token == end_token_id or token == pad_token_id:
                cut = i
                break
        out.append(row[:cut])
    return out


# Generation settings of a model's generation_config that change which token greedy decoding picks
# (value = the neutral default). HF generate() applies them on its own; the jump-forward loop does not,
# so a model that sets any of them is decoded through generate() instead.
_LOGITS_SETTINGS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_decoder_ids": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


def jump_forward_unsupported(model) -> str | None:
    """Why `model` must be decoded through HF generate() + GrammarLogitsProcessor (None: jump-forward works).

    Jump-forward needs a decoder-only model whose forward takes several new tokens after its cache: Llama-like
    (input_ids, a 2D attention_mask over past + new tokens, position_ids, past_key_values) or ChatGLM through
    its remote code, whose own generate() steps say how masks and positions go on (model.feeders).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "chatglm" and not all(
        hasattr(model, name) for name in ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation")
    ):
        return "this ChatGLM code has no prepare_inputs_for_generation / _update_model_kwargs_for_generation"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    generation_config = getattr(model, "generation_config", None)
    for name, neutral in _LOGITS_SETTINGS.items():
        if getattr(generation_config, name, neutral) not in (neutral, None, [], ()):
            return f"its generation_config sets {name}, which only generate() applies"
    return None


@dataclass
class Generated:
    """One row's answer ids (no prompt, no end token) and its choices: (answer index, log-probability under
    the constraint) for every token picked among several allowed ones. Forced tokens have probability 1."""

    ids: list[int]
    choices: list[tuple[int, float]] = field(default_factory=list)


def constrained_generate(*args, **kwargs) -> list[list[int]]:
    """`constrained_generate_scored` (same arguments), the answer ids only."""
    return [g.ids for g in constrained_generate_scored(*args, **kwargs)]


def constrained_generate_scored(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    constraints: list[Constraint],
    max_new_tokens: int,
    end_token_id: int,
    pad_token_id: int,
    jump_forward: bool | None = None,
    prefix_cache: bool = True,
    **generate_kwargs,
) -> list[Generated]:
    """Greedy generation of a LEFT-padded batch, one constraint per row; per row its answer ids (without prompt or end
    token) and its choices with their log-probabilities (`Generated`, model.confidence).

    jump_forward: None (default) = the jump-forward loop (`JumpForwardDecoder`) when the model supports it
    (`jump_forward_unsupported`) and no generate() options are given, else HF generate() with the
    GrammarLogitsProcessor, one token per forward pass; True = require jump-forward; False = always generate().
    prefix_cache: let jump-forward run the prompt prefix its rows share once (`PrefixCache`, Llama-like models);
    False = each row's whole prompt goes through the first pass.
    position_ids (in generate_kwargs): the ones ChatGLM's tokenizer built with its padding; both paths take them.
    """
    matchers = row_matchers(tokenizer, constraints, max_new_tokens, end_token_id)
    position_ids = generate_kwargs.pop("position_ids", None)
    reason = jump_forward_unsupported(model) or (
        f"generate() options {sorted(generate_kwargs)}" if generate_kwargs else None
    )
    if jump_forward is None:
        jump_forward = reason is None
    if jump_forward:
        if reason is not None:
            raise ValueError(f"jump-forward decoding is not available: {reason}")
        answers = JumpForwardDecoder(
            model, matchers, pad_token_id, prefix_cache=prefix_cache, position_ids=position_ids
        ).run(input_ids, attention_mask)
    else:
        if position_ids is not None:
            generate_kwargs["position_ids"] = position_ids
        processor = GrammarLogitsProcessor(matchers, input_ids.shape[1])
        sequences = _generate(
            model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id,
            logits_processor=LogitsProcessorList([processor]), **generate_kwargs,
        )
        processor.finish(sequences)
        answers = answers_of(sequences, input_ids.shape[1], end_token_id, pad_token_id)
    # A choice past the cut (an end or pad token chosen among others) is not part of the answer.
    return [
        Generated(ids, [(i, lp) for i, lp in choices if i < len(ids)])
        for ids, choices in zip(answers, (m.choices for m in matchers), strict=True)
    ]


def unconstrained_generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    end_token_id: int,
    pad_token_id: int,
    **generate_kwargs,
) -> list[list[int]]:
    """The same greedy generation without constraints, for comparison."""
    return _greedy_generate(model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id,
                            **generate_kwargs)


def _greedy_generate(model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id, **generate_kwargs):
    """HF generate, greedy with the KV cache; the answers without prompt, padding or end token."""
    sequences = _generate(model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id,
                          **generate_kwargs)
    return answers_of(sequences, input_ids.shape[1], end_token_id, pad_token_id)


def generate_with(model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id, processors,
                  **generate_kwargs) -> torch.Tensor:
    """Greedy HF generate() with the given logits processors: the whole sequences, prompts included."""
    return _generate(model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id,
                     logits_processor=LogitsProcessorList(processors), **generate_kwargs)


def _generate(model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id, **generate_kwargs):
    """HF generate, greedy with the KV cache: the whole sequences, prompts included."""
    with torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=end_token_id,
            pad_token_id=pad_token_id,
            **generate_kwargs,
        )
    return sequences
