import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.tiny import corpus_chars


def test_tiny_model_reloads_offline_and_covers_every_data_character(tiny_base, data_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    assert (tiny_base / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert "token_type_ids" not in tok("abc")  # generate() rejects them
    assert tok.padding_side == "left"
    for name in ("mixed_train_dataset.jsonl", "mixed_dev_dataset.jsonl"):
        for line in (data_dir / name).open(encoding="utf-8"):
            row = json.loads(line)
            for text in (row["context"], row["target"]):
                ids = tok.encode(text, add_special_tokens=False)
                assert tok.unk_token_id not in ids
                assert tok.decode(ids) == text  # exact round trip, newlines and spaces included
    assert len(tok) >= len(corpus_chars(data_dir)) + 4
