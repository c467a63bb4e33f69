"""The few places where the two lanes' transformers differ, in one module (README: "Which lane").

The legacy lane pins transformers 4.33.3 (the last release ChatGLM-6B v1's remote code runs on), the
modern lane transformers 5.x. Everything else in the project is written once; what the releases name or
shape differently is translated here, by looking at what the installed release has (its fields, its
classes), not by comparing version strings.
"""

from __future__ import annotations

import dataclasses
import functools


@functools.cache
def _training_argument_fields() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def training_arguments(**kwargs):
    """transformers.TrainingArguments from 4.33-style keywords, renamed where the installed release renamed them.

    transformers 5 renamed evaluation_strategy to eval_strategy, folded warmup_ratio into warmup_steps (a
    float below 1 is a ratio), replaced group_by_length with train_sampling_strategy, and always saves
    safetensors (save_safetensors is gone).
    """
    from transformers import TrainingArguments

    fields = _training_argument_fields()
    if "evaluation_strategy" in kwargs and "evaluation_strategy" not in fields:
        kwargs["eval_strategy"] = kwargs.pop("evaluation_strategy")
    if "warmup_ratio" in kwargs and "warmup_ratio" not in fields:
        ratio = kwargs.pop("warmup_ratio")
        if ratio:
            if kwargs.get("warmup_steps"):
                raise ValueError("give warmup_ratio or warmup_steps, not both")
            kwargs["warmup_steps"] = float(ratio)
    if "group_by_length" in kwargs and "group_by_length" not in fields:
        kwargs["train_sampling_strategy"] = "group_by_length" if kwargs.pop("group_by_length") else "random"
    if "save_safetensors" in kwargs and "save_safetensors" not in fields:
        if not kwargs.pop("save_safetensors"):
            raise ValueError("this transformers release always saves safetensors")
    return TrainingArguments(**kwargs)


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def transformers_major() -> int:
    """4 on the legacy lane, 5 on the modern lane."""
    return transformers_version()[0]


def dtype_keyword() -> str:
    """The from_pretrained keyword for the weights' dtype: `dtype` from transformers 4.56 (5.x warns on every
    load that reads `torch_dtype`), `torch_dtype` before (4.33 would pass an unknown `dtype` on to the config
    and load float32)."""
    return "dtype" if transformers_version() >= (4, 56) else "torch_dtype"


def has_cache_objects() -> bool:
    """Whether the installed transformers passes the KV cache as a Cache object (4.36+; only form in 5.x)."""
    try:
        from transformers.cache_utils import DynamicCache  # noqa: F401
    except ImportError:
        return False
    return True


def cache_to_tuples(cache):
    """A model's KV cache as per-layer (key, value) tuples, whatever form the model returned it in.

    The jump-forward decoder keeps the cache as tuples (it selects rows, expands a shared prefix, checks the
    shapes); transformers 5's own models return a DynamicCache whose layers hold `.keys` and `.values`.
    Remote code (ChatGLM) returns tuples on both lanes: those pass through.
    """
    if cache is None or isinstance(cache, tuple):
        return cache
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return tuple((layer.keys, layer.values) for layer in layers)
    if hasattr(cache, "to_legacy_cache"):  # 4.36-4.5x DynamicCache
        return cache.to_legacy_cache()
    return cache


def cache_for_model(model, past):
    """Per-layer (key, value) tuples in the form `model` takes: a DynamicCache for transformers' own models where
    the release has Cache objects (5.x reads no tuples), the tuples for 4.33 and for remote code (ChatGLM)."""
    own_model = type(model).__module__.startswith("transformers.")
    if past is None or not isinstance(past, tuple) or not own_model or not has_cache_objects():
        return past
    from transformers.cache_utils import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):  # 4.36-4.5x
        return DynamicCache.from_legacy_cache(past)
    return DynamicCache(ddp_cache_data=list(past))


def cache_keyword(model) -> str:
    """The forward keyword for the KV cache: transformers 5.25 renamed `past_key_values` to `cache` in its own
    models (the old name is accepted with a warning until 5.40); remote code keeps `past_key_values`."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters and "past_key_values" not in parameters else "past_key_values"


def output_cache(outputs):
    """The KV cache a forward returned, as per-layer (key, value) tuples (`.cache` in 5.25's outputs,
    `.past_key_values` before and in remote code)."""
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    return cache_to_tuples(cache)
