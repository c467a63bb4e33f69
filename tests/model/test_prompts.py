"""model.prompts rebuilds the exact training context; checked on every training row."""

from __future__ import annotations

import copy

import pytest

from core import dataset
from core.dataset import TASKS
from model.prompts import build_prompt, default_phrasing


@pytest.fixture(scope="module")
def train(data_dir) -> list[dataset.Example]:
    return dataset.load_split(data_dir, "train")


@pytest.fixture(scope="module")
def schema(train) -> dict:
    return dataset.derive_schema(train)


def small_schema() -> dict:
    """A hand-written schema in the derive_schema layout, independent of the data files."""
    return {
        "labels": ["水果", "衣服"],
        "predicates": {"主演": {"subject_type": ["影视作品"], "object_type": ["人物"]}},
        "triple_keys": list(dataset.TRIPLE_KEYS),
        "prompt": {
            "template": dataset.PROMPT_TEMPLATE,
            "instruction": "指令。",
            "phrasings": {"classification": ["分类吧：", "另一种说法："], "extraction": ["抽取SPO："]},
        },
    }


def test_the_pure_modules_import_without_torch():
    """model.prompts/parsing/confidence and the core/ ground are pure: the app's light paths and the parsers' tests
    must not pay for (or need) torch."""
    import subprocess
    import sys
    from pathlib import Path

    pure = "model.prompts, model.parsing, model.confidence, finetune.data, core.dataset, core.families, core.config"
    pure += ", core.safe_io"
    code = (f"import sys; import {pure}; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
    assert TASKS == ("classification", "extraction")


def test_every_training_row_rebuilds_its_context_exactly(train, schema):
    assert len(train) == 902
    mismatches = [ex.line for ex in train if build_prompt(schema, ex.text, ex.task, ex.phrasing) != ex.context]
    assert mismatches == []


def test_every_training_row_round_trips_through_split_context(train, schema):
    # The prompt serving builds must be read back by the training parser as the same parts.
    for ex in train:
        parts = dataset.split_context(build_prompt(schema, ex.text, ex.task, ex.phrasing))
        assert parts == {"instruction": ex.instruction, "phrasing": ex.phrasing, "text": ex.text}


def test_default_phrasing_is_the_most_frequent_in_training(train, schema):
    for task in TASKS:
        phrasings = [ex.phrasing for ex in train if ex.task == task]
        most_frequent = max(set(phrasings), key=phrasings.count)
        assert default_phrasing(schema, task) == most_frequent


def test_default_phrasing_is_used_when_none_given():
    schema = small_schema()
    expected = "Instruction: 指令。\nInput: {}\n\n苹果很甜\nAnswer: "
    assert build_prompt(schema, "苹果很甜", "classification") == expected.format("分类吧：")
    assert build_prompt(schema, "苹果很甜", "extraction") == expected.format("抽取SPO：")


def test_empty_phrasing_falls_back_to_default():
    schema = small_schema()
    assert build_prompt(schema, "苹果", "classification", "") == build_prompt(schema, "苹果", "classification")


def test_explicit_phrasing_is_used():
    prompt = build_prompt(small_schema(), "苹果", "classification", "另一种说法：")
    assert prompt == "Instruction: 指令。\nInput: 另一种说法：\n\n苹果\nAnswer: "


def test_text_is_stripped_only_at_the_ends():
    prompt = build_prompt(small_schema(), "  \n苹果  很甜\t\n", "classification")
    assert prompt.endswith("\n\n苹果  很甜\nAnswer: ")


def test_braces_in_text_are_not_format_fields():
    prompt = build_prompt(small_schema(), "价格{price}和{0}以及{", "classification")
    assert "\n\n价格{price}和{0}以及{\nAnswer: " in prompt


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_raises(text):
    with pytest.raises(ValueError, match="empty text"):
        build_prompt(small_schema(), text, "classification")


def test_non_string_text_raises():
    with pytest.raises(ValueError, match="text must be a string"):
        build_prompt(small_schema(), None, "classification")


@pytest.mark.parametrize("task", ["translation", "", "Classification"])
def test_unknown_task_raises(task):
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt(small_schema(), "苹果", task)
    with pytest.raises(ValueError, match="unknown task"):
        default_phrasing(small_schema(), task)


NO_EXTRACTION = [{"classification": ["分类："], "extraction": []}, {"classification": ["分类："]}]


@pytest.mark.parametrize("phrasings", NO_EXTRACTION)
def test_task_without_phrasing_raises_even_with_explicit_phrasing(phrasings):
    schema = small_schema()
    schema["prompt"]["phrasings"] = phrasings
    with pytest.raises(ValueError, match="no phrasing for task 'extraction'"):
        build_prompt(schema, "苹果", "extraction")
    with pytest.raises(ValueError, match="no phrasing for task 'extraction'"):
        build_prompt(schema, "苹果", "extraction", "抽取：")
    assert build_prompt(schema, "苹果", "classification").startswith("Instruction: 指令。\nInput: 分类：")


def test_schema_without_prompt_section_raises_clearly():
    with pytest.raises(ValueError, match="no 'prompt' section"):
        build_prompt({"labels": []}, "苹果", "classification")
    schema = small_schema()
    del schema["prompt"]["instruction"]
    with pytest.raises(ValueError, match=r"lacks \['instruction'\]"):
        build_prompt(schema, "苹果", "classification")


def test_schema_template_is_used_not_a_constant():
    schema = copy.deepcopy(small_schema())
    schema["prompt"]["template"] = "<{instruction}|{phrasing}|{text}>"
    assert build_prompt(schema, " 苹果 ", "classification") == "<指令。|分类吧：|苹果>"


def test_build_prompt_does_not_mutate_schema():
    schema = small_schema()
    before = copy.deepcopy(schema)
    build_prompt(schema, "苹果", "extraction", "别的说法")
    assert schema == before


def test_every_dev_row_rebuilds_its_context_with_the_train_schema(schema, data_dir):
    # Serving uses the schema saved at training time; dev rows must come out identical with it.
    dev = dataset.load_split(data_dir, "dev")
    assert len(dev) == 122
    assert [ex.line for ex in dev if build_prompt(schema, ex.text, ex.task, ex.phrasing) != ex.context] == []
