"""Jump-forward decoding: a greedy loop over the KV cache that feeds the grammar's forced tokens in bulk.

For Llama-like decoder-only models and ChatGLM-6B v1 / ChatGLM2/3 (model.feeders; see
model.decoding.jump_forward_unsupported). Tokens that have only one possible value (the JSON skeleton,
keys, the rest of a label or type once chosen: ~90% of answer tokens) go into the cache without a
forward pass of their own; for Llama-like models the prompt prefix every row shares (instruction and
phrasing) runs once and is kept for the next batches and calls (model.prefix_cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.confidence import constrained_logprobs
from model.feeders import CausalFeeder, ChatGLMFeeder
from model.matcher import RowMatcher

FEED_POLICIES = ("auto", "all", "median")


@dataclass
class DecodeStats:
    """What a JumpForwardDecoder did, for benchmarks and tests (pass one in to read it; it adds to the counts)."""

    passes: int = 0  # forward passes run
    fed: int = 0  # tokens fed after the first pass
    padding: int = 0  # pads among them
    prefix_length: int = 0  # prompt tokens the last first pass took from the shared-prefix cache
    prefix_runs: int = 0  # prefixes run (and cached) for a first pass
    prefix_hits: int = 0  # first passes served by a cached prefix as it was


def feed_width(queued: list[int], policy: str) -> int:
    """How many queued tokens each row may feed in the next jump-forward pass (every row is padded to it).

    Rows reach their runs out of step: one copies a span character (one token) while another has just
    chosen a predicate and has ~60 forced tokens to feed.
    - "all": the longest queue, whole. Fewest passes; the right choice where a pass costs about the same
      whatever it feeds (a GPU decoding a big model at a small batch: weight reads dominate). Not measured
      here: no GPU.
    - "median": the lower median queue. A long run goes on over the passes the other rows need anyway for
      their own choices, instead of padding them all to its length. On a CPU a pass costs in proportion to
      the tokens it feeds, pads included: on bench.label_throughput's model (extraction of 200 dev texts,
      batches of 8, after the first pass) "all" fed 39.4k tokens for 19.0k real ones in 264 passes,
      "median" 22.0k in 374 passes; 1.29 s -> 0.95 s, same answers (bench/README.md).
    "auto" (JumpForwardDecoder's default) = "median" on a CPU, else "all".
    """
    if policy == "all":
        return max(queued)
    ordered = sorted(queued)
    return ordered[(len(ordered) - 1) // 2]


class JumpForwardDecoder:
    """Constrained greedy decoding that feeds forced tokens without a forward pass of their own.

    Most answer tokens have only one possible value (the JSON skeleton, keys, the rest of a label or
    type once its first characters are chosen). Each forward pass feeds, per row, the token chosen from
    the previous pass plus the run of forced tokens after it (`RowMatcher.run_forced` says which), and
    the next token is picked greedily, among the allowed ones, from the logits at the row's last fed
    position. The end token finishes a row without being fed. With a vocabulary where each literal
    character has one token (the tiny char models) this picks
    exactly the tokens of token-by-token decoding. With multi-character tokens, token-by-token decoding
    lets the model choose among the splits of a literal (' "' or ' ' + '"'); this spells the cheapest,
    so answers may differ (always valid, in budget).

    The budget rule is unchanged (forced tokens count like any other: a row stops at max_new_tokens).
    Each pass after the first feeds each row up to `feed_width` of its queued tokens (the chosen one and
    the forced run after it), left-padded and masked; a row that has not fed its whole queue takes no
    decision in that pass. Finished rows leave the batch and the cache. The model side (positions, masks,
    cache layout, the shared-prefix cache) is a feeder's (model.feeders): `CausalFeeder` for Llama-like
    models, `ChatGLMFeeder` for ChatGLM-6B v1 and ChatGLM2/3.
    """

    def __init__(
        self,
        model,
        matchers: list[RowMatcher],
        pad_token_id: int,
        prefix_cache: bool = True,
        feed: str = "auto",
        stats: DecodeStats | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        if feed not in FEED_POLICIES:
            raise ValueError(f"feed must be one of {FEED_POLICIES}, not {feed!r}")
        self.model = model
        self.matchers = matchers
        self.pad_token_id = pad_token_id
        self.prefix_cache = prefix_cache
        self.feed = feed
        self.stats = stats if stats is not None else DecodeStats()
        self.position_ids = position_ids

    def feeder(self, rows: list[int]):
        """The model side of a batch of these rows (model.feeders)."""
        if getattr(getattr(self.model, "config", None), "model_type", None) == "chatglm":
            positions = None if self.position_ids is None else self.position_ids[rows]
            return ChatGLMFeeder(self.model, self.pad_token_id, self.stats, positions)
        if self.position_ids is not None:
            raise ValueError("position_ids are only taken for ChatGLM; other models number positions from the mask")
        return CausalFeeder(self.model, self.pad_token_id, self.stats, prefix_cache=self.prefix_cache)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
        """Each row's answer ids (no prompt, no end token)."""
        matchers = self.matchers
        if input_ids.shape[0] != len(matchers):
            raise ValueError(f"batch has {input_ids.shape[0]} rows but {len(matchers)} constraints")
        answers = [m.tokens for m in matchers]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = input_ids.device
        active = [row for row, m in enumerate(matchers) if m.run_forced()]
        if not active:
            return answers
        feeder = self.feeder(active)
        # inference_mode skips autograd's bookkeeping on every op. Only here, not around generate(): ChatGLM-6B
        # fills its rotary cache lazily on a first forward, and tensors made in inference mode could not be
        # used by a later training step in the same process.
        with torch.inference_mode():
            logits, left = feeder.start(input_ids[active], attention_mask[active], [list(answers[r]) for r in active])
            queue: dict[int, list[int]] = dict(zip(active, left, strict=True))  # chosen and forced tokens not fed yet
            while True:
                # Rows that fed their whole queue are at a decision; the others go on feeding next pass.
                ready = [i for i, row in enumerate(active) if not queue.get(row)]
                queue.update(self._decide([active[i] for i in ready], logits[ready]))
                keep = [i for i, row in enumerate(active) if queue[row]]
                if not keep:
                    return answers
                if len(keep) < len(active):
                    feeder.keep(keep)
                    active = [active[i] for i in keep]
                # Next pass: up to `width` queued tokens per row, left-padded.
                width = feed_width([len(queue[row]) for row in active], self._policy(device))
                fed = []
                for row in active:
                    fed.append(queue[row][:width])
                    queue[row] = queue[row][width:]
                self.stats.fed += width * len(active)
                self.stats.padding += sum(width - len(f) for f in fed)
                logits = feeder.feed(fed)

    def _policy(self, device: torch.device) -> str:
        if self.feed != "auto":
            return self.feed
        return "median" if device.type == "cpu" else "all"

    def _decide(self, active: list[int], logits: torch.Tensor) -> dict[int, list[int]]:
        """Pick each row's token greedily among its allowed ones; return what each row feeds next ([]: done).

        Ties go to the lowest id and rows whose allowed tokens all score -inf take the lowest allowed id,
        exactly as argmax over GrammarLogitsProcessor's masked scores does.
        """
        if not active:
            return {}
        choices = [sorted(self.matchers[row].waiting_on) for row in active]
        rows = [i for i, ids in enumerate(choices) for _ in ids]
        cols = [token for ids in choices for token in ids]
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        values = logits[index].tolist()  # a few floats per row: Python beats a tensor op per row here
        feeds: dict[int, list[int]] = {}
        start = 0
        for row, ids in zip(active, choices, strict=True):
            scores = values[start : start + len(ids)]
            start += len(ids)
            # max() keeps the first of equal scores (the lowest id, as argmax does), also when all are -inf.
            best = max(range(len(ids)), key=scores.__getitem__)
            # The confidence record GrammarLogitsProcessor keeps on the generate() path.
            matcher = self.matchers[row]
            matcher.accept(ids[best], constrained_logprobs(scores)[best] if len(ids) > 1 else None)
            chosen = len(matcher.tokens) - 1
            feeds[row] = matcher.tokens[chosen:] if matcher.run_forced() else []
        return feeds
