"""The two lanes (README: "Which lane"): each family is placed on the lane whose transformers runs it, and a
model on the wrong lane gets one line naming the lane to use, before any remote code runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core import compat
from core.families import CAUSAL, CHATGLM, CHATGLM2, GLM, QWEN, LaneError, check_lane, detect_family
from finetune.tiny import TinyConfig, build_tiny

MODERN = compat.transformers_major() >= 5


@pytest.mark.parametrize(
    "model_type, family",
    [("glm", GLM), ("glm4", GLM), ("qwen2", QWEN), ("qwen3", QWEN), ("llama", CAUSAL), ("mistral", CAUSAL)],
)
def test_model_types_map_to_their_family(model_type, family):
    assert detect_family(SimpleNamespace(model_type=model_type)) is family
    assert family.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj")  # stated, not peft's default


@pytest.mark.parametrize("family", [CHATGLM, CHATGLM2])
def test_chatglm_remote_code_is_refused_on_the_modern_lane_only(family, tmp_path):
    if MODERN:
        with pytest.raises(LaneError) as err:
            check_lane(tmp_path, family)
        assert "legacy lane" in str(err.value) and "make venv LANE=legacy" in str(err.value)
        assert str(tmp_path) in str(err.value)
    else:
        check_lane(tmp_path, family)  # transformers 4.33 runs it


@pytest.mark.modern_lane
def test_a_chatglm_model_on_the_modern_lane_is_one_clear_line_from_the_cli(tmp_path, small_data):
    """finetune.train on a ChatGLM2 directory: the lane error, not a traceback from inside remote code (on the
    legacy lane such a directory trains: tests/chatglm)."""
    from finetune import train

    base = tmp_path / "chatglm2"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "chatglm", "multi_query_attention": true}')
    (base / "model.safetensors").write_bytes(b"")
    (base / "tokenizer_config.json").write_text("{}")
    (base / "tokenizer.model").write_bytes(b"")
    with pytest.raises(SystemExit) as err:
        train.main(["--base-model", str(base), "--data-dir", str(small_data), "--output-dir", str(tmp_path / "r"),
                    "--max-steps", "1"])
    assert str(err.value).startswith("error: ") and "legacy lane" in str(err.value)


def test_a_modern_architecture_is_built_on_the_modern_lane_and_named_on_the_legacy_one(tmp_path, data_dir):
    cfg = TinyConfig(output_dir=str(tmp_path / "t"), data_dir=str(data_dir), arch="qwen3")
    if MODERN:
        out = build_tiny(cfg)
        assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    else:
        with pytest.raises(SystemExit) as err:
            build_tiny(cfg)
        assert "no Qwen3Config" in str(err.value) and "modern lane" in str(err.value)
