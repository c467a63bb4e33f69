"""Rebuild the exact training prompt for a text and a task from a schema.json dict (pure, no I/O).

Serving must feed the model byte-for-byte the context layout it was trained on, so the layout,
instruction and phrasings come from the schema saved with the model, never from constants here.
"""

from __future__ import annotations

import unicodedata

# One definition, in the dataset format (core.dataset is pure, so this module stays importable without torch;
# tests/model/test_prompts.py checks it).
from core.dataset import TASKS


def _prompt_section(schema: dict) -> dict:
    """schema["prompt"], checked to hold a template, an instruction and the phrasings."""
    prompt = schema.get("prompt") if isinstance(schema, dict) else None
    if not isinstance(prompt, dict):
        raise ValueError("schema has no 'prompt' section: was it written by core.dataset.derive_schema?")
    missing = [key for key in ("template", "instruction", "phrasings") if key not in prompt]
    if missing:
        raise ValueError(f"schema['prompt'] lacks {missing}: was it written by core.dataset.derive_schema?")
    return prompt


def default_phrasing(schema: dict, task: str) -> str:
    """The phrasing serving uses for a task: the first (most frequent in training) one in the schema."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    phrasings = _prompt_section(schema)["phrasings"].get(task) or []
    if not phrasings:
        raise ValueError(f"schema has no phrasing for task {task!r}: the model was not trained on it")
    return phrasings[0]


def build_prompt(schema: dict, text: str, task: str, phrasing: str | None = None) -> str:
    """The training context for `text`: the schema's template filled with its instruction, the phrasing
    (`phrasing` if given, else the task's default) and the stripped text."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, not {type(text).__name__}")
    # Only strip: the model was trained on the sentences as they were, inner characters included.
    text = text.strip()
    if not text:
        raise ValueError("empty text")
    # Validates the task (and that the schema was trained on it) even when a phrasing is given.
    chosen = default_phrasing(schema, task)
    prompt = _prompt_section(schema)
    # The text is a format *argument*, so braces inside it are never interpreted.
    return prompt["template"].format(instruction=prompt["instruction"], phrasing=phrasing or chosen, text=text)


# Spaces, separators, control and format characters (zero-width space, BOM, joiners): a text made
# only of these shows nothing to a reader, so there is nothing to label.
INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})


def is_blank(text: str) -> bool:
    """Whether a text has no visible character (str.strip keeps a zero-width space, for one)."""
    return all(ch.isspace() or unicodedata.category(ch) in INVISIBLE_CATEGORIES for ch in text)
