"""Jump-forward decoding: a greedy loop over the KV cache that feeds the grammar's forced tokens in bulk.

For Llama-like decoder-only models (see model.decoding.jump_forward_unsupported). Tokens that have only
one possible value (the JSON skeleton, keys, the rest of a label or type once chosen: ~90% of answer
tokens) go into the cache without a forward pass of their own, and the prompt prefix every row shares
(instruction and phrasing) runs once and is kept for the next batches and calls (`PrefixCache`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from model.confidence import constrained_logprobs
from model.grammar import CHOICE, State

if TYPE_CHECKING:
    from model.decoding import GrammarLogitsProcessor


FEED_POLICIES = ("auto", "all", "median")


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
    the previous pass plus the run of forced tokens after it, and the next token is picked greedily,
    among the allowed ones, from the logits at the row's last fed position. A token is forced when
    - the automaton is inside literal text (a choice with one live option): the option's rest is
      spelled with its cheapest token split (`Vocab.split`: exactly the tokens `tok_cost` charged to the
      budget), one option after the other. Where a token could run past the literal into what follows
      ('```json\n[{"' when the literal ends at '[') and the grammar allows one, that boundary is left
      to the model (`Vocab.spell`), as token-by-token decoding would;
    - or exactly one token is allowed (what GrammarLogitsProcessor would leave: e.g. the budget only
      lets a span close);
    - or none is: the end token, which finishes the row without being fed.
    With a vocabulary where each literal character has one token (the tiny char models) this picks
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
        processor: GrammarLogitsProcessor,
        max_new_tokens: int,
        pad_token_id: int,
        prefix_cache: bool = True,
        feed: str = "auto",
    ):
        if feed not in FEED_POLICIES:
            raise ValueError(f"feed must be one of {FEED_POLICIES}, not {feed!r}")
        self.model = model
        self.p = processor
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = pad_token_id
        self.prefix_cache = prefix_cache
        self.feed = feed
        self.out: list[list[int]] = [[] for _ in processor.automata]
        self.passes = 0  # forward passes run, for measurements
        self.fed = self.padding = 0  # tokens fed after the first pass, and the pads among them
        self.prefix_length = 0  # prompt tokens taken from the shared-prefix cache in the first pass
        self.head = _split_head(model)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
        if input_ids.shape[0] != len(self.out):
            raise ValueError(f"batch has {input_ids.shape[0]} rows but {len(self.out)} constraints")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = input_ids.device
        active = [row for row in range(len(self.out)) if self._force(row)]
        if not active:
            return self.out
        # First pass: each row's prompt (with its own padding) and its first forced run, aligned on the right.
        extra = max(len(self.out[row]) for row in active)
        width = input_ids.shape[1] + extra
        ids = torch.full((len(active), width), self.pad_token_id, dtype=input_ids.dtype, device=device)
        mask = torch.zeros((len(active), width), dtype=attention_mask.dtype, device=device)
        for i, row in enumerate(active):
            run = self.out[row]
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
                logits, past = self._forward(ids, mask, past)
                # Rows that fed their whole queue are at a decision; the others go on feeding next pass.
                ready = [i for i, row in enumerate(active) if not queue.get(row)]
                queue.update(self._decide([active[i] for i in ready], logits[ready]))
                keep = [i for i, row in enumerate(active) if queue[row]]
                if not keep:
                    return self.out
                if len(keep) < len(active):
                    past, mask, active = self._shrink(past, mask, keep), mask[keep], [active[i] for i in keep]
                # Next pass: up to `width` queued tokens per row, left-padded.
                width = feed_width([len(queue[row]) for row in active], self._policy(device))
                fed = []
                for row in active:
                    fed.append(queue[row][:width])
                    queue[row] = queue[row][width:]
                self.fed += width * len(active)
                self.padding += sum(width - len(f) for f in fed)
                ids = torch.tensor([[self.pad_token_id] * (width - len(f)) + f for f in fed], device=device)
                new_mask = torch.tensor([[0] * (width - len(f)) + [1] * len(f) for f in fed], device=device)
                mask = torch.cat([mask, new_mask.to(mask.dtype)], dim=1)

    def _policy(self, device: torch.device) -> str:
        if self.feed != "auto":
            return self.feed
        return "median" if device.type == "cpu" else "all"

    # ---------------------------------------------------------------- grammar side

    def _force(self, row: int) -> bool:
        """Append the row's forced tokens; True if it then needs a choice (its allowed set is in p.pending)."""
        p, out = self.p, self.out[row]
        automaton = p.automata[row]
        while True:
            state = p.states[row]
            room = self.max_new_tokens - len(out)
            if state is None or room <= 0 or automaton.is_final(state):  # the end token, or out of budget
                p.states[row] = None
                return False
            allowed = None
            literal = self._literal(row, state)
            if literal is not None:
                text, after = literal
                tokens, n_chars = p.vocab.spell(text, automaton.is_final(after))
                if not tokens:
                    # A token running past the literal could start here: a choice if the grammar allows one.
                    allowed = p._allowed(row, state, room)
                    spelled = p.vocab.split(text)
                    if spelled and allowed and all(len(p.vocab.strings[t]) <= len(text) for t in allowed):
                        tokens = spelled[:1]
                        n_chars = len(p.vocab.strings[tokens[0]])
                if tokens:
                    out += tokens[:room]
                    p.counts[row] += min(room, len(tokens))
                    if len(tokens) > room:
                        p.states[row] = None
                    else:
                        p.states[row] = after if n_chars == len(text) else automaton.feed(state, text[:n_chars])
                    continue
            if allowed is None:
                allowed = p._allowed(row, state, room)
            if len(allowed) == 1:
                ((token, nxt),) = allowed.items()
                out.append(token)
                p.counts[row] += 1
                p.states[row] = nxt
                continue
            if not allowed:  # no way on: the end token
                p.states[row] = None
                return False
            p.pending[row] = allowed
            return True

    def _literal(self, row: int, state: State) -> tuple[str, State] | None:
        """(the rest of the literal the row is in, the state after it), if it is inside one.

        One node's option at a time, so the tokens spent on it are exactly what Automaton.cost charged."""
        p = self.p
        if p.counts[row] == 0 and p.vocab.lead:
            return None  # the first token follows _allowed's rule about the dummy-prefix space
        automaton = p.automata[row]
        node = automaton.nodes[state.node]
        if node.kind != CHOICE or len(state.alive) != 1:
            return None
        option = node.options[state.alive[0]]
        return option.text[state.off :], automaton._complete(state, option)

    def _decide(self, active: list[int], logits: torch.Tensor) -> dict[int, list[int]]:
        """Pick each row's token greedily among its allowed ones; return what each row feeds next ([]: done).

        Ties go to the lowest id and rows whose allowed tokens all score -inf take the lowest allowed id,
        exactly as argmax over GrammarLogitsProcessor's masked scores does.
        """
        if not active:
            return {}
        p = self.p
        choices = [sorted(p.pending[row]) for row in active]
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
            token = ids[best]
            if len(ids) > 1:  # the confidence record GrammarLogitsProcessor keeps on the generate() path
                p.choices[row].append((len(self.out[row]), constrained_logprobs(scores)[best]))
            self.out[row].append(token)
            p.counts[row] += 1
            p.states[row] = p.pending[row][token]
            p.pending[row] = {}
            before = len(self.out[row]) - 1
            feeds[row] = self.out[row][before:] if self._force(row) else []
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
        found = PREFIX_CACHE.get(self, tuple(first[:common]), len(rows) > 1, input_ids.device)
        if found is None:
            return ids, mask, None
        length, prefix_past = found
        self.prefix_length = length
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

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, past) -> tuple[torch.Tensor, object]:
        """Logits (float) at each row's last column, and the new cache."""
        self.passes += 1
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


class PrefixCache:
    """KV caches of prompt prefixes (batch 1), least recently used out, per model object.

    A batch's rows share their prompt up to the text (instruction, phrasing); so do the batches of a call and
    the calls of a task. `get` returns the longest cached prefix of the batch's common prefix, after running
    (and caching) a longer one when that is worth a pass of its own:
    - the common part of this batch's prefix and a cached one that it does not extend: the part that every
      call shares (the template), found as soon as two batches differ in their first text characters;
    - else, for a batch of several rows, its whole common prefix when it is at least `min_extend` tokens
      longer than the cached one (the first batch of a task, whose phrasing no cached prefix holds yet).
    A single row's whole prompt is never cached when a cached prefix serves it (nothing else would reuse it).
    An entry belongs to one model object, dtype and device and to its weights' in-place version counters, so
    it is never used after the model changes.
    """

    def __init__(self, size: int = 4, min_length: int = 4, min_extend: int = 8):
        self.size = size
        self.min_length = min_length
        self.min_extend = min_extend
        self._lock = threading.Lock()
        self._entries: list[tuple[object, tuple, tuple[int, ...], tuple]] = []  # (model ref, stamp, ids, cache)
        self.hits = self.runs = 0  # for measurements and tests

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _stamp(model) -> tuple:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        first = params[0] if params else None
        return (
            None if first is None else (first.dtype, first.device),
            sum(p._version for p in params),
        )

    def get(self, decoder: JumpForwardDecoder, prefix: tuple[int, ...], several_rows: bool, device):
        """(prefix length, its cache: per layer (key, value), batch 1) to start `decoder`'s first pass, or None."""
        if len(prefix) < self.min_length:
            return None
        model = decoder.model
        stamp = self._stamp(model)
        with self._lock:
            self._entries = [e for e in self._entries if e[0]() is not None]
            mine = [e for e in self._entries if e[0]() is model and e[1] == stamp]
            best = max((e for e in mine if prefix[: len(e[2])] == e[2]), key=lambda e: len(e[2]), default=None)
            have = 0 if best is None else len(best[2])
            shared = max((_common_length(prefix, e[2]) for e in mine if e is not best), default=0)
            if shared > have and shared >= self.min_length:
                target = shared
            elif best is None or (several_rows and len(prefix) - have >= self.min_extend):
                target = len(prefix)
            else:
                target = have
            if target == have:
                self.hits += 1
                self._touch(best)
                return have, best[3]
        # Run the missing part on top of the best cached one (outside the lock: a forward pass).
        key = prefix[:target]
        ids = torch.tensor([key[have:]], device=device)
        mask = torch.ones((1, target), dtype=torch.long, device=device)
        _, past = decoder._forward(ids, mask, None if best is None else best[3])
        if not _batch_first_pairs(past, 1, target):
            return None
        past = tuple(tuple(t for t in layer) for layer in past)
        with self._lock:
            self.runs += 1
            self._entries = [e for e in self._entries if not (e[0]() is model and e[2] == key)]
            self._entries.append((weakref.ref(model), stamp, key, past))
            del self._entries[: max(0, len(self._entries) - self.size)]
        return target, past

    def _touch(self, entry) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
            self._entries.append(entry)


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _batch_first_pairs(past, batch: int, length: int) -> bool:
    """Whether `past` is a legacy cache: per layer a (key, value) of tensors (batch, heads, length, dim)."""
    if not isinstance(past, (tuple, list)) or not past:
        return False
    for layer in past:
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            return False
        for t in layer:
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != batch or t.shape[2] != length:
                return False
    return True


PREFIX_CACHE = PrefixCache()


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


