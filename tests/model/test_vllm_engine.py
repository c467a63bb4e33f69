"""model.vllm_engine (--engine ray-vllm) without vLLM or a GPU: what can be checked here.

vLLM itself never runs in this project (no GPU; README says so). These check our side of it: the refusals a user
meets without vLLM, a GPU or a family vLLM runs, and the wiring with a stand-in for vLLM's LLM: the prompts it is
given are our training prompts, each request carries the library grammar of its text and the schema's budget,
and its answers go through our parsing into the same predictions as our engine's (confidences aside).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, replace

import pytest

from core.dataset import CLASSIFICATION, EXTRACTION, TASKS
from model import label_ray, vllm_engine
from model.label import main as label_main
from model.label_ray import RayLabelConfig
from model.library_grammar import XGRAMMAR, library_grammar
from model.load import ModelLoadError
from model.predict import generate_answers, max_new_tokens_for, predict, prompt_ids


def test_without_vllm_the_cli_says_how_to_install_it(tmp_path, merged_model, monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    (tmp_path / "in.csv").write_text("comment\n好\n", encoding="utf-8")
    with pytest.raises(SystemExit) as err:
        label_main(["--engine", "ray-vllm", "--model", str(merged_model), "--input", str(tmp_path / "in.csv"),
                    "--output", str(tmp_path / "out")])
    assert "--engine ray-vllm needs vLLM, which is not installed" in str(err.value)
    assert "requirements-vllm.txt" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_chatglm_model_is_sent_to_engine_ray(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    (tmp_path / "config.json").write_text('{"model_type": "chatglm"}', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="is a chatglm model: --engine ray-vllm runs glm, qwen, causal"):
        vllm_engine.check_vllm_usable(tmp_path)


@pytest.mark.parametrize("cluster,given,message", [
    ({"CPU": 8.0}, {}, "needs a GPU per actor; the Ray cluster has 0 GPU(s)"),
    ({"CPU": 8.0, "GPU": 2.0}, {"gpus_per_actor": 0.0}, "and --gpus-per-actor is 0"),
])
def test_ray_vllm_refuses_cpu_actors(tmp_path, cluster, given, message):
    cfg = RayLabelConfig(model="m", input="in", output=str(tmp_path), engine="ray-vllm", **given)
    with pytest.raises(label_ray.LabelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        label_ray.resolve_resources(cfg, cluster, blocks=4)
    ok = label_ray.resolve_resources(replace(cfg, gpus_per_actor=None), {"CPU": 8.0, "GPU": 2.0}, blocks=4)
    assert (ok.gpus_per_actor, ok.actors, ok.device) == (1.0, 2, "cuda")


# ---------------------------------------------------------------- the wiring, with a stand-in for vLLM


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[Completion]


class FakeLLM:
    """vLLM's LLM.generate(prompts, params, use_tqdm) answering what our engine answered for the same prompt."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], end_id: int, cut_at: int | None = None):
        self.answers, self.end_id, self.cut_at = answers, end_id, cut_at
        self.calls: list[tuple[list[dict], list]] = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = self.answers[tuple(prompt["prompt_token_ids"])]
            if self.cut_at is not None:
                outputs.append(RequestOutput([Completion(ids[: self.cut_at], "length")]))
            else:
                outputs.append(RequestOutput([Completion([*ids, self.end_id][: p.kwargs["max_tokens"]], "stop")]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm.SamplingParams and vllm.sampling_params.StructuredOutputsParams that record their arguments."""

    class Recorded:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    package = types.ModuleType("vllm")
    package.SamplingParams = type("SamplingParams", (Recorded,), {})
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = type("StructuredOutputsParams", (Recorded,), {})
    monkeypatch.setitem(sys.modules, "vllm", package)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)


@pytest.fixture(scope="module")
def ours(merged_model, data_dir):
    """The tiny merged model, some dev texts (a long one among them) and our engine's answers to each."""
    from core.dataset import load_split
    from model.load import load_merged

    lm = load_merged(merged_model, device="cpu")
    texts = sorted({e.text for e in load_split(data_dir, "dev")}, key=len)[::12][:8]
    answers = {}
    for task in TASKS:
        for text, got in zip(texts, generate_answers(lm, texts, task), strict=True):
            answers[tuple(prompt_ids(lm, text, task))] = got.ids
    return lm, texts, answers


def test_vllm_gets_our_prompts_grammar_and_budget_and_answers_parse_as_ours(fake_vllm, ours):
    lm, texts, answers = ours
    end_id = lm.family.end_token_id(lm.tokenizer)
    fake = FakeLLM(answers, end_id)
    served = replace(lm, model=fake)
    got = predict(served, texts, generate=vllm_engine.vllm_generate)
    assert [call[0] for call in fake.calls] == [
        [{"prompt_token_ids": prompt_ids(lm, t, task)} for t in texts] for task in TASKS
    ]
    for (_, params), task in zip(fake.calls, TASKS, strict=True):
        for p, text in zip(params, texts, strict=True):
            assert p.kwargs["temperature"] == 0.0 and p.kwargs["stop_token_ids"] == [end_id]
            assert p.kwargs["max_tokens"] == max_new_tokens_for(lm.schema, task)
            grammar = p.kwargs["structured_outputs"].kwargs["grammar"]
            assert grammar == library_grammar(XGRAMMAR, lm.schema, task, text)
            assert ("Substring(" in grammar) == (task == EXTRACTION)
    expected = predict(lm, texts)
    assert [p.category for p in got] == [p.category for p in expected]
    assert [[t.key() for t in p.triples] for p in got] == [[t.key() for t in p.triples] for p in expected]
    assert any(p.triples for p in got), "the texts give triples, so the comparison has something to compare"
    assert all(p.category_confidence is None and all(t.confidence is None for t in p.triples) for p in got)
    assert [p.raw for p in got] == [p.raw for p in expected]


def test_an_answer_cut_at_the_budget_is_flagged_and_gives_no_triples(fake_vllm, ours):
    lm, texts, answers = ours
    fake = FakeLLM(answers, lm.family.end_token_id(lm.tokenizer), cut_at=3)
    got = predict(replace(lm, model=fake), texts[:2], tasks=(CLASSIFICATION, EXTRACTION),
                  generate=vllm_engine.vllm_generate)
    assert all(p.hit_limit == {CLASSIFICATION: True, EXTRACTION: True} for p in got)
    assert all(p.triples == [] and not p.well_formed[EXTRACTION] for p in got)
