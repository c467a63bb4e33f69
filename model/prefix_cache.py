"""KV caches of shared prompt prefixes, kept across batches and calls (model.jump_forward's first pass)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, object], tuple[torch.Tensor, object]]


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

    def get(self, model, prefix: tuple[int, ...], several_rows: bool, device, forward: Forward):
        """(prefix length, its cache: per layer (key, value), batch 1, whether a pass ran for it) to start a first
        pass of `model` on rows sharing `prefix`, or None. forward(ids, mask, past) -> (logits, cache) runs the
        missing part."""
        if len(prefix) < self.min_length:
            return None
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
                self._touch(best)
                return have, best[3], False
        # Run the missing part on top of the best cached one (outside the lock: a forward pass).
        key = prefix[:target]
        ids = torch.tensor([key[have:]], device=device)
        mask = torch.ones((1, target), dtype=torch.long, device=device)
        _, past = forward(ids, mask, None if best is None else best[3])
        if not _batch_first_pairs(past, 1, target):
            return None
        past = tuple(tuple(t for t in layer) for layer in past)
        with self._lock:
            self._entries = [e for e in self._entries if not (e[0]() is model and e[2] == key)]
            self._entries.append((weakref.ref(model), stamp, key, past))
            del self._entries[: max(0, len(self._entries) - self.size)]
        return target, past, True

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
