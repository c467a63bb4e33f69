import json

import pytest
import torch

from finetune import data as D
from finetune.families import CAUSAL

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
    with pytest.raises(D.DataError) as err:
        D.read_jsonl(path)
    text = str(err.value)
    assert f"{path}:2:" in text  # file and line of the bad row
    assert message in text
    assert f"{path}:1:" not in text  # the good row is not blamed


def test_every_bad_row_is_reported_at_once(tmp_path):
    path = write_lines(tmp_path, ["{bad", row(), row(target="?"), "nope"])
    with pytest.raises(D.DataError) as err:
        D.read_jsonl(path)
    assert "3 bad row(s)" in str(err.value)
    assert all(f"{path}:{n}:" in str(err.value) for n in (1, 3, 4))


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(row().encode("utf-8") + b"\n" + row(target='["水果"]').encode("gbk") + b"\n")
    with pytest.raises(D.DataError, match=f"{path}:2: not UTF-8"):
        D.read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(D.DataError, match="file not found"):
        D.read_jsonl(tmp_path / "nope.jsonl")
    empty = write_lines(tmp_path, [""])
    with pytest.raises(D.DataError, match="no rows"):
        D.read_jsonl(empty)


def test_detect_task():
    assert D.detect_task('["水果"]') == (D.CLASSIFICATION, ["水果"])
    task, triples = D.detect_task(GOOD_TRIPLES)
    assert task == D.EXTRACTION and triples[0]["subject"] == "喜剧之王"
    assert D.detect_task("```json\n[]\n```") == (D.EXTRACTION, [])


def test_reference_data_tasks_and_schema(data_dir):
    train = D.load_split(data_dir, "train")
    dev = D.load_split(data_dir, "dev")
    assert (len(train), len(dev)) == (902, 122)
    assert sum(ex.task == D.CLASSIFICATION for ex in train) == 402
    assert sum(ex.task == D.EXTRACTION for ex in dev) == 59
    schema = D.derive_schema(train)
    assert schema["labels"] == sorted(["水果", "衣服", "洗浴", "平板", "酒店", "书籍", "电脑", "蒙牛"])
    assert len(schema["predicates"]) == 44
    assert schema["predicates"]["主演"] == {"subject_type": ["影视作品"], "object_type": ["人物"]}
    assert schema["max_triples"] == 10
    assert len(schema["prompt"]["phrasings"][D.CLASSIFICATION]) == 3
    assert len(schema["prompt"]["phrasings"][D.EXTRACTION]) == 12
    # Every training context is rebuilt exactly from the stored layout.
    for ex in train:
        assert (
            schema["prompt"]["template"].format(
                instruction=schema["prompt"]["instruction"], phrasing=ex.phrasing, text=ex.text
            )
            == ex.context
        )


def test_label_masking_causal(tiny_base, data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    ex = D.load_split(data_dir, "train")[0]
    row_ = D.tokenize_example(ex, tok, CAUSAL, 400, 300)
    ids, labels = row_["input_ids"], row_["labels"]
    n_prompt = 1 + len(tok.encode(ex.context, add_special_tokens=False))  # bos + prompt
    assert all(label == D.IGNORE_INDEX for label in labels[:n_prompt])  # no prompt token is a target
    first_answer = tok.encode(ex.target, add_special_tokens=False)[0]
    assert labels[n_prompt] == first_answer == ids[n_prompt]  # the first answer token is
    assert labels[-1] == tok.eos_token_id
    assert tok.decode([t for t in labels if t != D.IGNORE_INDEX], skip_special_tokens=True) == ex.target


def test_truncation_keeps_instruction_answer_marker_and_answer_start(tiny_base, data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    extraction = [e for e in D.load_split(data_dir, "train") if e.task == D.EXTRACTION]
    ex = max(extraction, key=lambda e: len(e.context))
    row_ = D.tokenize_example(ex, tok, CAUSAL, max_source_len=60, max_target_len=20)
    prompt_ids = row_["input_ids"][1:61]
    assert tok.decode(prompt_ids).startswith("Instruction: ")
    assert tok.decode(prompt_ids).endswith("\nAnswer: ")
    targets = [t for t in row_["labels"] if t != D.IGNORE_INDEX]
    assert len(targets) == 20 and targets[-1] == tok.eos_token_id
    assert tok.decode(targets[:-1]) == ex.target[:19]


def test_collator_pads_to_longest_row_of_the_batch():
    collate = D.PadToLongestCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].shape == (2, 3)  # longest row, not a fixed length
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    no_mask = D.PadToLongestCollator(pad_token_id=3, with_attention_mask=False)
    assert "attention_mask" not in no_mask([{"input_ids": [1], "labels": [1]}])


def test_schema_needs_rows_and_cut_answers_are_counted(tiny_base, data_dir):
    from transformers import AutoTokenizer

    with pytest.raises(D.DataError, match="no training rows"):
        D.derive_schema([])
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    train = D.load_split(data_dir, "train")
    longest = max(len(tok.encode(ex.target, add_special_tokens=False)) for ex in train)
    assert D.count_cut_answers(train, tok, longest + 1) == 0
    assert D.count_cut_answers(train, tok, longest) >= 1  # the longest answer plus its end token no longer fit
    # '["水果"]' is 6 tokens + end token: fits in 8; every extraction answer is longer.
    assert D.count_cut_answers(train, tok, 8) == 500


def test_negative_extraction_rows_answer_no_triple_from_comment_texts(data_dir):
    from finetune.data import NO_TRIPLES_TARGET, detect_task, negative_extraction_rows, split_context

    rows = D.read_jsonl(data_dir / D.TRAIN_FILE)
    cls = [ex for ex in rows if ex.task == "classification"]
    ext = [ex for ex in rows if ex.task == "extraction"]
    negatives = negative_extraction_rows(rows, 0.25)
    assert len(negatives) == round(0.25 * len(ext))
    assert negative_extraction_rows(rows, 0.25) == negatives  # the same rows on every machine
    assert negative_extraction_rows(rows, 0) == []
    assert {ex.text for ex in negatives} <= {ex.text for ex in cls}
    assert len({ex.text for ex in negatives}) == len(negatives)
    assert {ex.phrasing for ex in negatives} == {ex.phrasing for ex in ext}  # every extraction phrasing
    for ex in negatives:
        assert ex.task == "extraction" and ex.answer == [] and ex.target == NO_TRIPLES_TARGET
        assert detect_task(ex.target) == ("extraction", [])  # the data format accepts it as a row too
        assert split_context(ex.context) == {"instruction": ex.instruction, "phrasing": ex.phrasing, "text": ex.text}
