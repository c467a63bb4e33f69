"""Confidence of constrained answers, from the model's own token probabilities under the constraint (pure).

How it is computed
- At every step where the grammar allows several tokens, the model's logits over just those tokens are
  turned into probabilities (a softmax over the allowed tokens: the model's distribution renormalised to
  what the grammar allows). The chosen token's probability is recorded (`model.decoding.Generated.choices`,
  the same numbers on the generate() and the jump-forward paths). A forced token (the only one allowed:
  JSON skeleton, keys, the rest of a label once its first characters are chosen) has probability 1.
- Category confidence = the product over the answer's choices = the probability, under the constraint, of
  the whole label the model gave (e.g. 0.9 x 0.8 when it chose between labels at two characters).
- Triple confidence = the product over the choices whose tokens overlap the triple's part of the answer:
  from just after the previous triple (or the list's '[') through the triple's closing '}'. That covers the
  decision to give this triple at all (',' or '{' rather than closing the list), its predicate and types,
  and every character of its subject and object spans (where to start, whether to go on). It is not the
  probability that the triple is true; evaluate's precision/recall at thresholds says how it relates.
  Being a product, it is lower for a longer triple at the same certainty per choice (an untrained model's
  triples read ~0.000); a threshold is therefore best picked from evaluate's table on your own data.
Unconstrained answers carry no confidence (None): there is no allowed set to renormalise over.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

# The thresholds model.evaluate reports precision and recall at (0: every answer).
THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.9)


def constrained_logprobs(scores: Sequence[float]) -> list[float]:
    """Log-softmax over the allowed tokens' logits only. All -inf (another logits processor banned them all)
    reads as uniform, which is also how decoding picks then (the lowest id among equals)."""
    top = max(scores)
    if top == -math.inf:
        return [-math.log(len(scores))] * len(scores)
    total = top + math.log(sum(math.exp(s - top) for s in scores))
    return [s - total for s in scores]


def category_confidence(choices: Sequence[tuple[int, float]]) -> float:
    """The probability of the whole category answer under the constraint: exp(sum of its choices' log-probs)."""
    return math.exp(sum(logprob for _, logprob in choices))


def token_offsets(pieces: Sequence[str | None], lead: str = "") -> list[tuple[int, int]]:
    """(start, end) of each token in the answer text made of `pieces` (the tokens' strings), with the
    tokenizer's dummy-prefix `lead` dropped from the start as model.vocab.Vocab.decode drops it."""
    text = "".join(piece or "" for piece in pieces)
    shift = len(lead) if lead and text.startswith(lead) else 0
    offsets, at = [], -shift
    for piece in pieces:
        end = at + len(piece or "")
        offsets.append((max(0, at), max(0, end)))
        at = end
    return offsets


def object_ranges(answer: str) -> list[tuple[int, int, dict]]:
    """(start, end, object) of each top-level object in a JSON-list answer ('```json\\n[{..}, {..}]\\n```'),
    where start is just after the previous object (or the '['). [] when the answer is not such a list."""
    opening = answer.find("[")
    if opening < 0:
        return []
    decoder = json.JSONDecoder()
    ranges, at = [], opening + 1
    previous_end = at
    while True:
        while at < len(answer) and answer[at] in " \t\r\n,":
            at += 1
        if at >= len(answer) or answer[at] != "{":
            return ranges
        try:
            item, end = decoder.raw_decode(answer, at)
        except ValueError:
            return ranges
        if isinstance(item, dict):
            ranges.append((previous_end, end, item))
        at = previous_end = end


def triple_confidences(
    answer: str, offsets: Sequence[tuple[int, int]], choices: Sequence[tuple[int, float]]
) -> list[tuple[tuple[str, str, str], float]]:
    """((subject, predicate, object) as written in the answer, confidence) for each object in answer order."""
    out = []
    for start, end, item in object_ranges(answer):
        logprob = sum(lp for i, lp in choices if i < len(offsets) and offsets[i][0] < end and offsets[i][1] > start)
        key = (str(item.get("subject")), str(item.get("predicate")), str(item.get("object")))
        out.append((key, math.exp(logprob)))
    return out
