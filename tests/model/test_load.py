import json
import shutil

import pytest

from model.load import ModelLoadError, load_merged


def test_loads_merged_model_with_schema_and_lock(merged_model):
    lm = load_merged(merged_model)
    assert lm.family.name == "causal" and lm.device == "cpu" and lm.dtype == "fp32"
    assert lm.tokenizer.padding_side == "left"
    info = lm.info()
    assert len(info["labels"]) == 8 and len(info["predicates"]) == 44 and info["parameters"] > 0
    assert lm.lock.acquire(blocking=False)
    lm.lock.release()


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: shutil.rmtree(d), "no model at"),
        (lambda d: (d / "schema.json").unlink(), "no schema.json"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "schema.json").write_text("{not json"), "schema.json is unreadable"),
        (lambda d: (d / "schema.json").write_text(json.dumps({"labels": []})), "lacks 'predicates'"),
    ],
)
def test_clear_message_for_each_unusable_dir(merged_model, tmp_path, breakage, message):
    broken = copy_model(merged_model, tmp_path / "m")
    breakage(broken)
    with pytest.raises(ModelLoadError, match=message):
        load_merged(broken)


def test_half_written_merge_dir_is_refused(merged_model, tmp_path):
    tmp = copy_model(merged_model, tmp_path / "merged.tmp-1234")
    with pytest.raises(ModelLoadError, match="unfinished merge"):
        load_merged(tmp)


def test_unknown_family_is_named(merged_model, tmp_path):
    broken = copy_model(merged_model, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "no_such_family"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no_such_family|could not load"):
        load_merged(broken)
