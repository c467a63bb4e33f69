"""finetune.data: tokenization with label masking, truncation, collation, negative rows."""

import pytest
import torch

from core import dataset, families
from core.families import CAUSAL
from finetune import data as D


def test_label_masking_causal(tiny_base, data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    ex = dataset.load_split(data_dir, "train")[0]
    row_ = D.tokenize_example(ex, tok, CAUSAL, 400, 300)
    ids, labels = row_["input_ids"], row_["labels"]
    n_prompt = 1 + len(tok.encode(ex.context, add_special_tokens=False))  # bos + prompt
    assert all(label == families.IGNORE_INDEX for label in labels[:n_prompt])  # no prompt token is a target
    first_answer = tok.encode(ex.target, add_special_tokens=False)[0]
    assert labels[n_prompt] == first_answer == ids[n_prompt]  # the first answer token is
    assert labels[-1] == tok.eos_token_id
    assert tok.decode([t for t in labels if t != families.IGNORE_INDEX], skip_special_tokens=True) == ex.target


def test_truncation_keeps_instruction_answer_marker_and_answer_start(tiny_base, data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    extraction = [e for e in dataset.load_split(data_dir, "train") if e.task == dataset.EXTRACTION]
    ex = max(extraction, key=lambda e: len(e.context))
    row_ = D.tokenize_example(ex, tok, CAUSAL, max_source_len=60, max_target_len=20)
    prompt_ids = row_["input_ids"][1:61]
    assert tok.decode(prompt_ids).startswith("Instruction: ")
    assert tok.decode(prompt_ids).endswith("\nAnswer: ")
    targets = [t for t in row_["labels"] if t != families.IGNORE_INDEX]
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

    with pytest.raises(dataset.DataError, match="no training rows"):
        dataset.derive_schema([])
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    train = dataset.load_split(data_dir, "train")
    longest = max(len(tok.encode(ex.target, add_special_tokens=False)) for ex in train)
    assert D.count_cut_answers(train, tok, longest + 1) == 0
    assert D.count_cut_answers(train, tok, longest) >= 1  # the longest answer plus its end token no longer fit
    # '["水果"]' is 6 tokens + end token: fits in 8; every extraction answer is longer.
    assert D.count_cut_answers(train, tok, 8) == 500


def test_negative_extraction_rows_answer_no_triple_from_comment_texts(data_dir):
    from core.dataset import detect_task, split_context
    from finetune.data import NO_TRIPLES_TARGET, negative_extraction_rows

    rows = dataset.read_jsonl(data_dir / dataset.TRAIN_FILE)
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
