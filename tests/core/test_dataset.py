"""core.dataset: reading and validating {context, target} jsonl, task detection, the schema."""

import json

import pytest

from core import dataset

GOOD_CONTEXT = (
    "Instruction: 你是阅读理解器。\nInput: 下面句子可能是一条关于什么的评论，用列表形式回答：\n\n苹果很甜。\nAnswer: "
)
GOOD_TRIPLES = (
    '```json\n[{"predicate": "主演", "object_type": "人物", "subject_type": "影视作品", '
    '"object": "周星驰", "subject": "喜剧之王"}]\n```'
)


def write_lines(tmp_path, lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(context=GOOD_CONTEXT, target='["水果"]'):
    return json.dumps({"context": context, "target": target}, ensure_ascii=False)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"context": "x", ', "invalid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        (json.dumps({"target": '["水果"]'}), "missing key(s) ['context']"),
        (json.dumps({"context": GOOD_CONTEXT}), "missing key(s) ['target']"),
        (row(context="   "), "empty context"),
        (row(target=""), "empty target"),
        (row(context=GOOD_CONTEXT.replace("苹果很甜。", " ")), "empty text"),
        (row(context="just a sentence"), "does not follow the layout"),
        (row(target="水果"), "unknown task"),
        (row(target="[]"), "unknown task"),
        (row(target='```json\n[{"predicate": "主演"\n```'), "not valid JSON"),
        (row(target='```json\n[{"predicate": "主演"}]\n```'), "lacks non-empty string keys"),
        (json.dumps({"context": 1, "target": 2}), "must be strings"),
    ],
)
def test_bad_rows_name_file_line_and_problem(tmp_path, line, message):
    path = write_lines(tmp_path, [row(), line])
    with pytest.raises(dataset.DataError) as err:
        dataset.read_jsonl(path)
    text = str(err.value)
    assert f"{path}:2:" in text  # file and line of the bad row
    assert message in text
    assert f"{path}:1:" not in text  # the good row is not blamed


def test_every_bad_row_is_reported_at_once(tmp_path):
    path = write_lines(tmp_path, ["{bad", row(), row(target="?"), "nope"])
    with pytest.raises(dataset.DataError) as err:
        dataset.read_jsonl(path)
    assert "3 bad row(s)" in str(err.value)
    assert all(f"{path}:{n}:" in str(err.value) for n in (1, 3, 4))


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(row().encode("utf-8") + b"\n" + row(target='["水果"]').encode("gbk") + b"\n")
    with pytest.raises(dataset.DataError, match=f"{path}:2: not UTF-8"):
        dataset.read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(dataset.DataError, match="file not found"):
        dataset.read_jsonl(tmp_path / "nope.jsonl")
    empty = write_lines(tmp_path, [""])
    with pytest.raises(dataset.DataError, match="no rows"):
        dataset.read_jsonl(empty)


def test_detect_task():
    assert dataset.detect_task('["水果"]') == (dataset.CLASSIFICATION, ["水果"])
    task, triples = dataset.detect_task(GOOD_TRIPLES)
    assert task == dataset.EXTRACTION and triples[0]["subject"] == "喜剧之王"
    assert dataset.detect_task("```json\n[]\n```") == (dataset.EXTRACTION, [])


def test_reference_data_tasks_and_schema(data_dir):
    train = dataset.load_split(data_dir, "train")
    dev = dataset.load_split(data_dir, "dev")
    assert (len(train), len(dev)) == (902, 122)
    assert sum(ex.task == dataset.CLASSIFICATION for ex in train) == 402
    assert sum(ex.task == dataset.EXTRACTION for ex in dev) == 59
    schema = dataset.derive_schema(train)
    assert schema["labels"] == sorted(["水果", "衣服", "洗浴", "平板", "酒店", "书籍", "电脑", "蒙牛"])
    assert len(schema["predicates"]) == 44
    assert schema["predicates"]["主演"] == {"subject_type": ["影视作品"], "object_type": ["人物"]}
    assert schema["max_triples"] == 10
    assert len(schema["prompt"]["phrasings"][dataset.CLASSIFICATION]) == 3
    assert len(schema["prompt"]["phrasings"][dataset.EXTRACTION]) == 12
    # Every training context is rebuilt exactly from the stored layout.
    for ex in train:
        assert (
            schema["prompt"]["template"].format(
                instruction=schema["prompt"]["instruction"], phrasing=ex.phrasing, text=ex.text
            )
            == ex.context
        )
