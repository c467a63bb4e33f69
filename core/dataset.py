"""The dataset format shared by training and serving: tasks, files, the prompt template, answer fences,
{context, target} jsonl reading with validation, the schema a run is trained on, and prompt truncation.

Everything a training row must satisfy is checked here, once, with a message that names the file,
the line and the problem, so that a bad dataset fails before any model is loaded. Pure: no torch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CLASSIFICATION = "classification"
EXTRACTION = "extraction"
TASKS = (CLASSIFICATION, EXTRACTION)

TRAIN_FILE = "mixed_train_dataset.jsonl"
DEV_FILE = "mixed_dev_dataset.jsonl"

# The context layout of the reference data (and of the ChatGLM LoRA tutorial it comes from).
PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {phrasing}\n\n{text}\nAnswer: "
_CONTEXT_RE = re.compile(
    r"Instruction: (?P<instruction>.*?)\nInput: (?P<phrasing>.*?)\n\n(?P<text>.*)\nAnswer: $", re.S
)
TRIPLE_KEYS = ("predicate", "object_type", "subject_type", "object", "subject")
JSON_FENCE_OPEN = "```json\n"
JSON_FENCE_CLOSE = "\n```"


class DataError(ValueError):
    """A dataset problem, with every message naming file and line."""


@dataclass(frozen=True)
class Example:
    """One validated training row."""

    context: str
    target: str
    task: str
    instruction: str
    phrasing: str
    text: str
    answer: object  # list[str] for classification, list[dict] for extraction
    line: int


def split_context(context: str) -> dict | None:
    """Split a context into instruction, phrasing and text; None if it does not follow the layout."""
    match = _CONTEXT_RE.match(context)
    return match.groupdict() if match else None


def detect_task(target: str) -> tuple[str, object]:
    """Return (task, parsed answer) for a target, or raise ValueError saying what was expected."""
    stripped = target.strip()
    if stripped.startswith("```json"):
        body = stripped[len("```json") :]
        if not body.endswith("```"):
            raise ValueError("extraction target opens with ```json but does not end with ```")
        try:
            triples = json.loads(body[: -len("```")])
        except json.JSONDecodeError as err:
            raise ValueError(f"extraction target is not valid JSON inside the ```json fence ({err.msg})") from None
        if not isinstance(triples, list) or not all(isinstance(t, dict) for t in triples):
            raise ValueError("extraction target must be a JSON list of objects")
        for triple in triples:
            missing = [k for k in TRIPLE_KEYS if not isinstance(triple.get(k), str) or not triple.get(k)]
            if missing:
                raise ValueError(f"extraction triple {triple} lacks non-empty string keys {missing}")
        return EXTRACTION, triples
    try:
        labels = json.loads(stripped)
    except json.JSONDecodeError:
        labels = None
    if isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels):
        return CLASSIFICATION, labels
    raise ValueError(
        'unknown task: target is neither a JSON list of labels like ["水果"] (classification) '
        "nor ```json + a list of triples + ``` (extraction)"
    )


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a {context, target} jsonl file; raise DataError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples: list[Example] = []
    problems: list[str] = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                problems.append(f"{path}:{line_no}: not UTF-8 text (save the file as UTF-8)")
                continue
            if not line.strip():
                continue
            try:
                examples.append(_parse_line(line, line_no))
            except ValueError as err:
                problems.append(f"{path}:{line_no}: {err}")
    if problems:
        shown = "\n".join(problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} bad row(s) in {path}:\n{shown}{more}")
    if not examples:
        raise DataError(f'{path}: no rows (expected one JSON object {{"context", "target"}} per line)')
    return examples


def _parse_line(line: str, line_no: int) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object with keys context and target")
    missing = [key for key in ("context", "target") if key not in row]
    if missing:
        raise ValueError(f'missing key(s) {missing}; expected {{"context": ..., "target": ...}}')
    context, target = row["context"], row["target"]
    if not isinstance(context, str) or not isinstance(target, str):
        raise ValueError("context and target must be strings")
    if not context.strip():
        raise ValueError("empty context")
    if not target.strip():
        raise ValueError("empty target")
    parts = split_context(context)
    if parts is None:
        raise ValueError("context does not follow the layout 'Instruction: ...\\nInput: ...\\n\\n<text>\\nAnswer: '")
    if not parts["text"].strip():
        raise ValueError("empty text: the context has no sentence between the phrasing and 'Answer: '")
    task, answer = detect_task(target)
    return Example(context, target, task, parts["instruction"], parts["phrasing"], parts["text"], answer, line_no)


def load_split(data_dir: str | Path, name: str) -> list[Example]:
    """Read data_dir/<train or dev file>; name is 'train' or 'dev'."""
    filename = {"train": TRAIN_FILE, "dev": DEV_FILE}[name]
    return read_jsonl(Path(data_dir) / filename)


def derive_schema(examples: list[Example]) -> dict:
    """The label set, predicate types and prompt layout the model is trained on (saved as schema.json)."""
    if not examples:
        raise DataError("no training rows to derive the schema (labels, predicates, prompt layout) from")
    labels = sorted({label for ex in examples if ex.task == CLASSIFICATION for label in ex.answer})
    predicates: dict[str, dict[str, list[str]]] = {}
    for ex in examples:
        if ex.task != EXTRACTION:
            continue
        for triple in ex.answer:
            entry = predicates.setdefault(triple["predicate"], {"subject_type": [], "object_type": []})
            for key in ("subject_type", "object_type"):
                if triple[key] not in entry[key]:
                    entry[key].append(triple[key])
    phrasings = {task: Counter(ex.phrasing for ex in examples if ex.task == task) for task in TASKS}
    instructions = Counter(ex.instruction for ex in examples)
    return {
        "version": 1,
        "tasks": [task for task in TASKS if phrasings[task]],
        "labels": labels,
        "predicates": {name: predicates[name] for name in sorted(predicates)},
        "triple_keys": list(TRIPLE_KEYS),
        # Serving never emits more triples than the most a training answer had.
        "max_triples": max((len(ex.answer) for ex in examples if ex.task == EXTRACTION), default=0),
        "prompt": {
            "template": PROMPT_TEMPLATE,
            "instruction": instructions.most_common(1)[0][0],
            # Most frequent first: serving uses the first one unless told otherwise.
            "phrasings": {task: [p for p, _ in phrasings[task].most_common()] for task in TASKS},
        },
        "answer_format": {
            CLASSIFICATION: 'JSON list with one label, e.g. ["水果"]',
            EXTRACTION: "```json\\n + JSON list of {" + ", ".join(TRIPLE_KEYS) + "} + \\n```",
        },
    }


def kept_head_length(max_len: int) -> int:
    """How many tokens from its start `truncate_prompt` keeps of a prompt longer than max_len."""
    return max_len - min(16, max_len // 4)


def truncate_prompt(ids: list[int], max_len: int) -> list[int]:
    """Cut a too-long prompt in the middle (the sentence), keeping its head (the instruction)
    and its tail ('Answer: '), so the model still sees what it is asked and where to answer."""
    if len(ids) <= max_len:
        return ids
    head = kept_head_length(max_len)
    return ids[:head] + ids[len(ids) - (max_len - head) :]
