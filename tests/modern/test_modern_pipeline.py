"""The modern lane's families end to end, on tiny random models of transformers' own architectures (Qwen2,
Qwen3, GLM as in glm-4-9b-chat-hf, GLM-4-0414) with the special tokens of their real tokenizers: train with
the family's preset, merge (its logits check), evaluate, label a CSV, and decode exactly as plain
constrained generate() does."""

from __future__ import annotations

import json

import pytest

from core.dataset import DEV_FILE, read_jsonl
from core.families import GLM, QWEN, family_of_dir
from model import decode_check, evaluate
from model.load import load_merged
from tests.conftest import MODERN_ARCHS
from tests.model.decoding_support import assert_jump_forward_equals_generate
from tests.pipeline_checks import assert_batched_equals_one_at_a_time, assert_labels_a_csv

pytestmark = [pytest.mark.slow, pytest.mark.modern_lane]


@pytest.mark.parametrize("arch", MODERN_ARCHS)
def test_train_merge_evaluate_label(arch, modern_merged, small_data, tmp_path):
    merged = modern_merged(arch)
    assert family_of_dir(merged) is (QWEN if arch.startswith("qwen") else GLM)
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["max_logit_diff_saved"] <= info["tolerance"]  # merge reloaded what it wrote and compared
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == arch and "auto_map" not in config  # transformers' own code, no remote code

    dev = str(small_data / DEV_FILE)
    metrics = evaluate.main(["--model", str(merged), "--data", dev, "--output", str(tmp_path / "m.json")])
    assert metrics["parse_rate"] == 1.0 and metrics["n"] == 16

    assert_labels_a_csv(merged, small_data / DEV_FILE, tmp_path)


@pytest.mark.parametrize("arch", MODERN_ARCHS)
def test_the_prompt_starts_as_the_family_expects(arch, modern_merged):
    """GLM: [gMASK]<sop> before the plain prompt, as its chat template starts; Qwen: nothing (no bos token)."""
    lm = load_merged(modern_merged(arch), device="cpu")
    prefix = lm.family.prompt_prefix(lm.tokenizer)
    if arch.startswith("glm"):
        assert lm.tokenizer.convert_ids_to_tokens(prefix) == ["[gMASK]", "<sop>"]
    else:
        assert prefix == [] and lm.tokenizer.bos_token_id is None
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id  # as in the real tokenizers: pads are masked


@pytest.mark.parametrize("arch", MODERN_ARCHS)
def test_batched_predictions_equal_one_at_a_time(arch, modern_merged, small_data):
    lm = load_merged(modern_merged(arch), device="cpu")
    assert_batched_equals_one_at_a_time(lm, [ex.text for ex in read_jsonl(small_data / DEV_FILE)][::2])


@pytest.mark.parametrize("arch", MODERN_ARCHS)
def test_jump_forward_gives_the_answers_of_generate(arch, modern_merged, small_data):
    """Jump-forward (the cache handed over as a transformers 5 DynamicCache at each pass, the output layer on
    the last position only) against HF generate() under the same rules: every answer token-identical."""
    lm = load_merged(modern_merged(arch), device="cpu")
    assert_jump_forward_equals_generate(lm, read_jsonl(small_data / DEV_FILE))


def test_decode_check_cli_counts_the_passes_of_both_ways(modern_merged, small_data):
    reports = decode_check.main(["--model", str(modern_merged("qwen3")), "--data", str(small_data / DEV_FILE),
                                 "--n", "4"])
    assert [r["identical"] for r in reports] == [4, 4]
    assert all(0 < r["passes"]["jump"] <= r["passes"]["generate"] for r in reports)
