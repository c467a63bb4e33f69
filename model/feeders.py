"""How the jump-forward loop (model.jump_forward) feeds tokens to a model: positions, mask and KV cache.

A feeder owns the model side of one batch: `start` runs the first pass over the prompts, `feed` runs a
pass over each row's next tokens (several per row, left-padded to the longest) after the cache, `keep`
drops finished rows. Each returns the float logits at every row's last column.

- `CausalFeeder`, Llama-like models: a 2D 0/1 mask over past + new columns, positions from its
  cumulative sum, a cache of per-layer (key, value) with batch first, and the prompt prefix the rows
  share run once (model.prefix_cache).
- `ChatGLMFeeder`, ChatGLM-6B v1 and ChatGLM2/3 through their remote code: the first pass is exactly
  the first step of HF generate() (the model's own `prepare_inputs_for_generation` over the prompts and
  the mask and positions its tokenizer built); later positions follow the model's own
  `_update_model_kwargs_for_generation` (read once per batch: v1 keeps the [gMASK] position and counts
  up the block position, v2/3 count up by one); a pass's pads are masked out. No shared-prefix cache:
  in v1 the prompt is seen bidirectionally up to <sop>, so a prefix's keys depend on the text after it.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from core import compat
from model.prefix_cache import PREFIX_CACHE


def left_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, real) for rows of different lengths, left-padded to the longest; real is True at real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
    return ids, real


def select_rows(past, keep: list[int], batch_dim: int, batch: int, device):
    """The cache of the rows in `keep`: a per-layer (key, value) cache whose tensors have the batch at batch_dim."""
    index = torch.tensor(keep, device=device)
    shrunk = []
    for layer in past:
        if not all(isinstance(t, torch.Tensor) and t.shape[batch_dim] == batch for t in layer):
            raise ValueError(f"jump-forward needs a per-layer (key, value) cache with the batch at dim {batch_dim}")
        shrunk.append(tuple(t.index_select(batch_dim, index) for t in layer))
    return tuple(shrunk)


class CausalFeeder:
    """Llama-like decoder-only models (input_ids, 2D attention_mask over past + new, position_ids, legacy cache).

    The first pass feeds the left-padded prompts plus each row's first forced run (positions =
    cumsum(attention_mask) - 1, pads at 1, as generate() builds them). With prefix_cache, it starts from the
    cache of the prefix the rows share (run once, batch 1, kept in `PREFIX_CACHE` for the next calls),
    expanded to the batch, and feeds only the rest of each prompt: left-padded, so the pads sit between the
    prefix and the row's own tokens, masked out.
    """

    def __init__(self, model, pad_token_id: int, stats, prefix_cache: bool = True):
        self.model = model
        self.pad_token_id = pad_token_id
        self.stats = stats
        self.prefix_cache = prefix_cache
        self.head = _split_head(model)
        self.runs = pass_module(model)
        self.cache_keyword = compat.cache_keyword(self.runs)
        self.mask: torch.Tensor | None = None
        self.past = None

    def start(self, input_ids, attention_mask, runs: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
        """First pass over the prompts (left-padded, with their mask) and each row's first forced run; returns the
        logits and, per row, what is left to feed (nothing: the runs went into this pass)."""
        device = input_ids.device
        extra = max(len(run) for run in runs)
        width = input_ids.shape[1] + extra
        ids = torch.full((len(runs), width), self.pad_token_id, dtype=input_ids.dtype, device=device)
        mask = torch.zeros((len(runs), width), dtype=attention_mask.dtype, device=device)
        for i, run in enumerate(runs):
            start = extra - len(run)
            ids[i, start : start + input_ids.shape[1]] = input_ids[i]
            mask[i, start : start + input_ids.shape[1]] = attention_mask[i]
            if run:
                ids[i, width - len(run) :] = torch.tensor(run, dtype=ids.dtype, device=device)
                mask[i, width - len(run) :] = 1
        past = None
        if self.prefix_cache:
            ids, mask, past = self._start_from_prefix(ids, mask, input_ids, attention_mask)
        self.mask = mask
        logits, self.past = self.forward(ids, mask, past)
        return logits, [[] for _ in runs]

    def feed(self, rows: list[list[int]]) -> torch.Tensor:
        ids, real = left_pad(rows, self.pad_token_id, self.mask.device)
        self.mask = torch.cat([self.mask, real.to(self.mask.dtype)], dim=1)
        logits, self.past = self.forward(ids, self.mask, self.past)
        return logits

    def keep(self, keep: list[int]) -> None:
        self.past = select_rows(self.past, keep, 0, self.mask.shape[0], self.mask.device)
        self.mask = self.mask[keep]

    def _start_from_prefix(self, ids, mask, input_ids, attention_mask):
        """The first pass's (ids, mask, cache) when the prompts share a cached prefix; else as given.

        The prefix stops one token short of the shortest prompt, so every row feeds at least one token of
        its own (its logits are read at its last column).
        """
        rows = []
        for row in range(input_ids.shape[0]):
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
        for i in range(len(rows)):
            real = mask[i].nonzero().flatten()
            tails.append((ids[i, int(real[0]) + length :], mask[i, int(real[0]) + length :]))
        width = max(len(t) for t, _ in tails)
        new_ids = torch.full((len(rows), width), self.pad_token_id, dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros((len(rows), length + width), dtype=mask.dtype, device=mask.device)
        new_mask[:, :length] = 1
        for i, (tail_ids, tail_mask) in enumerate(tails):
            new_ids[i, width - len(tail_ids) :] = tail_ids
            new_mask[i, length + width - len(tail_mask) :] = tail_mask
        past = tuple(tuple(t.expand(len(rows), *t.shape[1:]) for t in layer) for layer in prefix_past)
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
            self.cache_keyword: compat.cache_for_model(self.runs, past),  # a Cache object for transformers 5
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
        return logits, compat.output_cache(outputs)


# Model types whose logits are lm_head(model(...)[0]) with nothing in between (no logit scaling or soft-capping).
SPLIT_HEAD_TYPES = ("llama", "qwen2", "qwen3", "glm", "glm4")


def pass_module(model):
    """The module every forward pass runs, whichever way it is fed: the decoder under the output layer where
    the feeder calls them apart (Llama, Qwen, GLM), else the model. Counting its calls counts passes."""
    split = _split_head(model)
    return model if split is None else split[0]


def _split_head(model):
    """(decoder, output layer) when logits are exactly output_layer(decoder(...)[0]) (Llama, pretraining_tp 1),
    so only the last position of each pass needs the output layer; else None (the full forward is used)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SPLIT_HEAD_TYPES or getattr(config, "pretraining_tp", 1) > 1:
        return None
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(base, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    return base, head


@contextlib.contextmanager
def last_position_only(model, batch: int, width: int):
    """While active, the model's output layer sees only the last sequence position of its input.

    The layer's input is (batch, seq, hidden) in some remote code and (seq, batch, hidden) in others (THUDM's v1
    applies it before moving the batch first); the layout is read from the shape, and where batch == width
    cannot tell them apart, nothing is cut (the full forward, as before). The logits then have one position,
    which is all the first pass reads.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module) or batch == width:
        yield
        return

    def cut(_module, args):
        hidden = args[0]
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == (batch, width):
            return (hidden[:, -1:], *args[1:])
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == (width, batch):
            return (hidden[-1:], *args[1:])
        return None  # already cut (v2/3's return_last_logit) or a layout we do not know: leave it

    handle = head.register_forward_pre_hook(cut)
    try:
        yield
    finally:
        handle.remove()


class ChatGLMFeeder:
    """ChatGLM-6B v1 and ChatGLM2/3 through their remote code; their KV cache is per layer (key, value) of
    (seq, batch, heads, head_dim), so the batch is at dim 1.

    State per row: which cache columns later tokens see (`seen`: the real ones) and the position of its last
    real token (`last`: (batch,) for v2/3, (batch, 2) = (position, block position) for v1).
    - v1 takes a 4D boolean mask (True = masked). The tokenizer's mask for the prompt says what the last prompt
      token (<sop>) sees: the whole prompt, never a pad. Each answer token sees that, the answer tokens before it
      and itself, as v1's own `_update_model_kwargs_for_generation` extends the mask one token at a time.
    - v2/3 take a 2D 0/1 padding mask over past + new columns and build the causal mask themselves.
    """

    def __init__(self, model, pad_token_id: int, stats, position_ids: torch.Tensor | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.stats = stats
        self.position_ids = position_ids
        self.last_logit_only = "return_last_logit" in inspect.signature(model.forward).parameters
        self.four_d = False
        self.seen: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.step: torch.Tensor | None = None
        self.past = None

    def start(self, input_ids, attention_mask, runs: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
        """The first step of HF generate() over the prompts; returns its logits and each row's first forced run,
        left to feed."""
        inputs = self.model.prepare_inputs_for_generation(
            input_ids, attention_mask=attention_mask, position_ids=self.position_ids, use_cache=True
        )
        mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
        if positions is None:
            raise ValueError("jump-forward needs the position ids the model's prepare_inputs_for_generation builds")
        self.four_d = mask is not None and mask.dtype == torch.bool and mask.dim() == 4
        if self.four_d:
            self.seen = ~mask[:, 0, -1, :]
        else:
            self.seen = torch.ones_like(input_ids) if mask is None else mask
        self.last = positions[..., -1]
        self.step = self._position_step(positions)
        self.stats.passes += 1
        # v2/3's own inputs ask for the last position's logits only (return_last_logit); v1's forward has no
        # such switch and puts every prompt position through its 130,528-row output layer, which was most of
        # the first pass's time on a CPU: the hook hands that layer the last position alone.
        with last_position_only(self.model, *input_ids.shape):
            outputs = self.model(**inputs, return_dict=True)
        self.past = outputs.past_key_values
        return outputs.logits[:, -1, :].float(), [list(run) for run in runs]

    def _position_step(self, positions: torch.Tensor) -> torch.Tensor:
        """How the model's own generate() moves a row's position from one token to the next."""
        kwargs = self.model._update_model_kwargs_for_generation(
            CausalLMOutputWithPast(), {"position_ids": positions[..., -1:].clone()}
        )
        grown = kwargs.get("position_ids")
        if grown is None or grown.shape[-1] != 2:
            raise ValueError("the model's _update_model_kwargs_for_generation does not extend position_ids")
        return grown[..., -1] - grown[..., 0]

    def feed(self, rows: list[list[int]]) -> torch.Tensor:
        ids, real = left_pad(rows, self.pad_token_id, self.seen.device)
        counted = real.long().cumsum(-1)  # 1, 2, ... over each row's real tokens (0 at its pads)
        if self.last.dim() == 1:
            positions = self.last[:, None] + self.step[:, None] * counted
        else:
            positions = self.last[:, :, None] + self.step[:, :, None] * counted[:, None, :]
        self.last = positions[..., -1]
        if self.four_d:
            width = ids.shape[1]
            causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
            new = real[:, None, :] & causal  # (batch, query, new column): earlier real tokens and itself
            sees = torch.cat([self.seen[:, None, :].expand(-1, width, -1), new], dim=-1)
            mask = ~sees[:, None]
            self.seen = torch.cat([self.seen, real], dim=-1)
        else:
            self.seen = torch.cat([self.seen, real.to(self.seen.dtype)], dim=-1)
            mask = self.seen
        kwargs = {"return_last_logit": True} if self.last_logit_only else {}
        self.stats.passes += 1
        with last_position_only(self.model, *ids.shape):  # v1: a pass may feed many forced tokens per row
            outputs = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.past,
                use_cache=True, return_dict=True, **kwargs,
            )
        self.past = outputs.past_key_values
        return outputs.logits[:, -1, :].float()

    def keep(self, keep: list[int]) -> None:
        self.past = select_rows(self.past, keep, 1, self.seen.shape[0], self.seen.device)
        self.seen, self.last, self.step = self.seen[keep], self.last[keep], self.step[keep]
