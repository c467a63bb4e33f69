"""Jump-forward decoding: a greedy loop over the KV cache that feeds the grammar's forced tokens in bulk.

For Llama-like decoder-only models (see model.decoding.jump_forward_unsupported). Tokens that have only
one possible value (the JSON skeleton, keys, the rest of a label or type once chosen: ~90% of answer
tokens) go into the cache without a forward pass of their own, and the prompt prefix every row shares
(instruction and phrasing) runs once and is kept for the next batches and calls (`PrefixCache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.confidence import constrained_logprobs
from model.matcher import RowMatcher
from model.prefix_cache import PREFIX_CACHE

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
    The first pass feeds the left-padded prompts plus each row's first forced run (positions =
    cumsum(attention_mask) - 1, pads at 1, as generate() builds them). Later passes feed each row up to
    `feed_width` of its queued tokens (the chosen one and the forced run after it), left-padded and masked;
    a row that has not fed its whole queue takes no decision in that pass. Finished rows leave the batch and
    the cache.

    Shared prompt prefix (prefix_cache=True): the rows of a batch start with the same instruction and
    phrasing (~75 tokens), and so do the batches of a predict() call. The first pass then starts from the
    cache of that prefix (run once, batch 1, and kept in `PREFIX_CACHE` for the next calls), expanded to
    the batch, and feeds only the rest of each prompt: left-padded, so the pads sit between the prefix and
    the row's own tokens, masked out, and positions still come from the cumulative mask.
    """

    def __init__(
        self,
        model,
        matchers: list[RowMatcher],
        pad_token_id: int,
        prefix_cache: bool = True,
        feed: str = "auto",
        stats: DecodeStats | None = None,
    ):
        if feed not in FEED_POLICIES:
            raise ValueError(f"feed must be one of {FEED_POLICIES}, not {feed!r}")
        self.model = model
        self.matchers = matchers
        self.pad_token_id = pad_token_id
        self.prefix_cache = prefix_cache
        self.feed = feed
        self.stats = stats if stats is not None else DecodeStats()
        self.head = _split_head(model)

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
        # First pass: each row's prompt (with its own padding) and its first forced run, aligned on the right.
        extra = max(len(answers[row]) for row in active)
        width = input_ids.shape[1] + extra
        ids = torch.full((len(active), width), self.pad_token_id, dtype=input_ids.dtype, device=device)
        mask = torch.zeros((len(active), width), dtype=attention_mask.dtype, device=device)
        for i, row in enumerate(active):
            run = answers[row]
            start = extra - len(run)
            ids[i, start : start + input_ids.shape[1]] = input_ids[row]
            mask[i, start : start + input_ids.shape[1]] = attention_mask[row]
            if run:
                ids[i, width - len(run) :] = torch.tensor(run, dtype=ids.dtype, device=device)
                mask[i, width - len(run) :] = 1
        past = None
        queue: dict[int, list[int]] = {}  # per row, chosen and forced tokens not fed yet
        # inference_mode skips autograd's bookkeeping on every op. Only here, not around generate(): ChatGLM-6B
        # fills its rotary cache lazily on a first forward, and tensors made in inference mode could not be
        # used by a later training step in the same process.
        with torch.inference_mode():
            if self.prefix_cache:
                ids, mask, past = self._start_from_prefix(ids, mask, input_ids, attention_mask, active)
            while True:
                logits, past = self.forward(ids, mask, past)
                # Rows that fed their whole queue are at a decision; the others go on feeding next pass.
                ready = [i for i, row in enumerate(active) if not queue.get(row)]
                queue.update(self._decide([active[i] for i in ready], logits[ready]))
                keep = [i for i, row in enumerate(active) if queue[row]]
                if not keep:
                    return answers
                if len(keep) < len(active):
                    past, mask, active = self._shrink(past, mask, keep), mask[keep], [active[i] for i in keep]
                # Next pass: up to `width` queued tokens per row, left-padded.
                width = feed_width([len(queue[row]) for row in active], self._policy(device))
                fed = []
                for row in active:
                    fed.append(queue[row][:width])
                    queue[row] = queue[row][width:]
                self.stats.fed += width * len(active)
                self.stats.padding += sum(width - len(f) for f in fed)
                ids = torch.tensor([[self.pad_token_id] * (width - len(f)) + f for f in fed], device=device)
                new_mask = torch.tensor([[0] * (width - len(f)) + [1] * len(f) for f in fed], device=device)
                mask = torch.cat([mask, new_mask.to(mask.dtype)], dim=1)

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

    # ---------------------------------------------------------------- model side

    def _start_from_prefix(self, ids, mask, input_ids, attention_mask, active):
        """The first pass's (ids, mask, cache) when the active rows' prompts share a cached prefix; else as given.

        The prefix stops one token short of the shortest prompt, so every row feeds at least one token of
        its own (its logits are read at its last column).
        """
        rows = []
        for row in active:
            real = attention_mask[row].nonzero().flatten()
            if len(real) == 0 or int(real[0]) + len(real) != input_ids.shape[1]:
                return ids, mask, None  # not left-padded: keep the plain first pass
            rows.append(input_ids[row, int(real[0]) :].tolist())
        shortest = min(len(r) for r in rows)
        common = 0
        first = rows[0]
        while common < shortest - 1 and all(r[common] == first[common] for r in rows):
            common += 1
        found = PREFIX_CACHE.get(self.model, tuple(first[:common]), len(rows) > 1, input_ids.device, self.forward)
        if found is None:
            return ids, mask, None
        length, prefix_past, ran = found
        self.stats.prefix_length = length
        if ran:
            self.stats.prefix_runs += 1
        else:
            self.stats.prefix_hits += 1
        # Each row without the prefix (prompt rest + its first forced run), left-padded to the longest.
        tails = []
        for i in range(len(active)):
            real = mask[i].nonzero().flatten()
            tails.append((ids[i, int(real[0]) + length :], mask[i, int(real[0]) + length :]))
        width = max(len(t) for t, _ in tails)
        new_ids = torch.full((len(active), width), self.pad_token_id, dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros((len(active), length + width), dtype=mask.dtype, device=mask.device)
        new_mask[:, :length] = 1
        for i, (tail_ids, tail_mask) in enumerate(tails):
            new_ids[i, width - len(tail_ids) :] = tail_ids
            new_mask[i, length + width - len(tail_mask) :] = tail_mask
        past = tuple(tuple(t.expand(len(active), *t.shape[1:]) for t in layer) for layer in prefix_past)
        return new_ids, new_mask, past

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, past) -> tuple[torch.Tensor, object]:
        """One pass over `ids` after the cache `past` (mask covers both): the logits (float) at each row's last
        column, and the new cache."""
        self.stats.passes += 1
        width = ids.shape[1]
        positions = mask.long().cumsum(-1)[:, -width:] - 1
        positions = positions.masked_fill(mask[:, -width:] == 0, 1)
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "past_key_values": past,
            "use_cache": True,
            "return_dict": True,
        }
        if self.head is not None:  # only the last position goes through the output layer
            base, head = self.head
            outputs = base(**kwargs)
            logits = head(outputs.last_hidden_state[:, -1, :]).float()
        else:
            outputs = self.model(**kwargs)
            logits = outputs.logits[:, -1, :].float()
        return logits, outputs.past_key_values

    @staticmethod
    def _shrink(past, mask: torch.Tensor, keep: list[int]):
        """The cache of the rows in `keep` (legacy tuple cache: per layer (key, value), batch first)."""
        index = torch.tensor(keep, device=mask.device)
        shrunk = []
        for layer in past:
            if not all(isinstance(t, torch.Tensor) and t.shape[0] == mask.shape[0] for t in layer):
                raise ValueError("jump-forward decoding needs a per-layer (key, value) cache with batch first")
            shrunk.append(tuple(t.index_select(0, index) for t in layer))
        return tuple(shrunk)


def _split_head(model):
    """(decoder, output layer) when logits are exactly output_layer(decoder(...)[0]) (Llama, pretraining_tp 1),
    so only the last position of each pass needs the output layer; else None (the full forward is used)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama" or getattr(config, "pretraining_tp", 1) > 1:
        return None
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(base, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    return base, head


