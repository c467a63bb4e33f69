"""Training rows from the dataset: negative extraction rows, tokenization with label masking, collation.

The format itself (reading, validation, schema, prompt truncation) is core.dataset, shared with serving.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from core.dataset import (
    CLASSIFICATION,
    EXTRACTION,
    JSON_FENCE_CLOSE,
    JSON_FENCE_OPEN,
    PROMPT_TEMPLATE,
    TASKS,
    Example,
    truncate_prompt,
)
from core.families import IGNORE_INDEX

NO_TRIPLES_TARGET = JSON_FENCE_OPEN + "[]" + JSON_FENCE_CLOSE


def negative_extraction_rows(examples: list[Example], share: float) -> list[Example]:
    """Extraction rows answered `[]` (no relation), made from classification texts (shop comments).

    Without them no training row ever answers the extraction task with an empty list, so a model learns
    that every text holds a relation and invents one for every comment. `share` is their number as a
    share of the real extraction rows (0.25: one per four); the texts are spread evenly over the
    classification rows and asked with the extraction phrasings in turn, so the rows are the same on
    every machine. Prompts come from the same template, instruction and phrasings as the real rows."""
    if share <= 0:
        return []
    cls = [ex for ex in examples if ex.task == CLASSIFICATION]
    ext = [ex for ex in examples if ex.task == EXTRACTION]
    if not cls or not ext:
        return []
    n = min(len(cls), round(share * len(ext)))
    phrasings = [p for p, _ in Counter(ex.phrasing for ex in ext).most_common()]
    instruction = Counter(ex.instruction for ex in ext).most_common(1)[0][0]
    rows = []
    for i in range(n):
        source = cls[i * len(cls) // n]
        phrasing = phrasings[i % len(phrasings)]
        context = PROMPT_TEMPLATE.format(instruction=instruction, phrasing=phrasing, text=source.text)
        rows.append(Example(context, NO_TRIPLES_TARGET, EXTRACTION, instruction, phrasing, source.text, [], 0))
    return rows


def tokenize_example(example: Example, tokenizer, family, max_source_len: int, max_target_len: int) -> dict:
    """input_ids and labels (-100 on the prompt and on the family's prompt-side special tokens)."""
    prompt_ids = tokenizer.encode(example.context, add_special_tokens=False)
    answer_ids = tokenizer.encode(example.target, add_special_tokens=False)
    prompt_ids = truncate_prompt(prompt_ids, max_source_len)
    # Keep the answer's start; the end-of-answer token is added by the family and always kept.
    answer_ids = answer_ids[: max(1, max_target_len - 1)]
    input_ids, labels = family.build_training_ids(tokenizer, prompt_ids, answer_ids)
    return {"input_ids": input_ids, "labels": labels}


def tokenize_examples(examples, tokenizer, family, max_source_len: int, max_target_len: int) -> list[dict]:
    return [tokenize_example(ex, tokenizer, family, max_source_len, max_target_len) for ex in examples]


def count_cut_answers(examples: list[Example], tokenizer, max_target_len: int) -> int:
    """Rows whose answer does not fit max_target_len: the model learns to stop mid-answer on them."""
    return sum(len(tokenizer.encode(ex.target, add_special_tokens=False)) + 1 > max_target_len for ex in examples)


def answer_token_budget(examples: list[Example], tokenizer) -> dict[str, int]:
    """Longest training answer per task, in tokens: serving derives max_new_tokens from it."""
    budget = {}
    for task in TASKS:
        lengths = [len(tokenizer.encode(ex.target, add_special_tokens=False)) for ex in examples if ex.task == task]
        if lengths:
            budget[task] = max(lengths) + 1  # + the end-of-answer token
    return budget


@dataclass
class PadToLongestCollator:
    """Pads each batch to its own longest row (never to a fixed length), on the right.

    Right padding in training keeps the real tokens at positions 0..n-1 for models that number
    positions by index (Llama), matching left-padded generation, which numbers from the mask.
    """

    pad_token_id: int
    with_attention_mask: bool = True

    def __call__(self, features: list[dict]) -> dict:
        import torch  # here, so the rest of this module stays importable from pure code

        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, mask = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        batch = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        if self.with_attention_mask:
            batch["attention_mask"] = torch.tensor(mask)
        return batch
