"""bench.models keeps one trained model per family: reused while its recipe holds, never half-built.

Training is replaced by a stand-in that writes a model-shaped directory, so these check the keeping, not
the training (the benchmarks themselves train through finetune.train and finetune.merge).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench import models


@pytest.fixture
def fake_training(monkeypatch):
    calls = []

    def train(recipe, work, data_dir):
        calls.append(recipe.family)
        merged = work / models.MERGED[recipe.family]
        merged.mkdir(parents=True)
        (merged / "schema.json").write_text(json.dumps({"built": len(calls)}), encoding="utf-8")
        (work / "run" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
        return merged

    monkeypatch.setattr(models, "_train", train)
    return calls


def built(merged) -> int:
    return json.loads((merged / "schema.json").read_text(encoding="utf-8"))["built"]


def test_a_model_is_trained_once_and_then_reused(tmp_path, fake_training):
    first = models.trained_model("chatglm2", "data", tmp_path, log=lambda _: None)
    again = models.trained_model("chatglm2", "data", tmp_path, log=lambda _: None)
    assert first == again == tmp_path / "chatglm2" / "chatglm2_merged"
    assert fake_training == ["chatglm2"]
    assert built(again) == 1
    made = json.loads((tmp_path / "chatglm2" / "recipe.json").read_text(encoding="utf-8"))
    assert made["recipe"]["family"] == "chatglm2" and made["recipe"]["data_dir"] == "data"
    # The run's checkpoints are not kept, and no side directory is left behind.
    assert not (tmp_path / "chatglm2" / "run" / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chatglm2"]


def test_a_changed_recipe_or_rebuild_trains_again(tmp_path, fake_training, monkeypatch):
    models.trained_model("causal", "data", tmp_path, log=lambda _: None)
    models.trained_model("causal", "data", tmp_path, rebuild=True, log=lambda _: None)
    assert fake_training == ["causal", "causal"]
    changed = dataclasses.replace(models.RECIPES["causal"], hidden_size=64)
    monkeypatch.setitem(models.RECIPES, "causal", changed)
    merged = models.trained_model("causal", "data", tmp_path, log=lambda _: None)
    assert fake_training == ["causal"] * 3 and built(merged) == 3
    # Another data dir is another recipe too.
    models.trained_model("causal", "other-data", tmp_path, log=lambda _: None)
    assert len(fake_training) == 4


def test_a_failed_build_keeps_the_model_that_was_there(tmp_path, fake_training, monkeypatch):
    merged = models.trained_model("chatglm_v1", "data", tmp_path, log=lambda _: None)

    def broken(recipe, work, data_dir):
        (work / "half-written").write_text("x", encoding="utf-8")
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(models, "_train", broken)
    with pytest.raises(RuntimeError):
        models.trained_model("chatglm_v1", "data", tmp_path, rebuild=True, log=lambda _: None)
    assert built(merged) == 1
    assert not (tmp_path / "chatglm_v1" / "half-written").exists()


def test_an_unknown_family_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="unknown family 'llama'.*causal, chatglm_v1, chatglm2"):
        models.trained_model("llama", "data", tmp_path)
