"""finetune.sample_decode: which dev rows are decoded, how they are scored, and that a failure never stops a run."""

import json
from types import SimpleNamespace

from core.dataset import CLASSIFICATION, EXTRACTION, load_split
from finetune import sample_decode
from model.parsing import Triple
from model.predict import Prediction


def test_pick_samples_alternates_the_tasks(data_dir):
    dev = load_split(data_dir, "dev")
    picked = sample_decode.pick_samples(dev, 4)
    assert [row.task for row in picked] == [CLASSIFICATION, EXTRACTION] * 2
    assert picked[0] is next(row for row in dev if row.task == CLASSIFICATION)  # fixed rows: comparable over steps
    only_cls = [row for row in dev if row.task == CLASSIFICATION][:3]
    assert sample_decode.pick_samples(only_cls, 5) == only_cls
    assert sample_decode.pick_samples(dev, 0) == []


def test_decode_samples_scores_with_the_real_parser_records(data_dir, monkeypatch):
    """Well-formed comes from predict's own check; correct = the category, or the whole triple set, equals the gold."""
    dev = load_split(data_dir, "dev")
    cls = [row for row in dev if row.task == CLASSIFICATION][:2]
    ie = [row for row in dev if row.task == EXTRACTION][:2]
    gold_triples = [Triple(t["subject"], t["predicate"], t["object"]) for t in ie[0].answer]

    def fake_predict(lm, texts, tasks, constrained):
        assert constrained is False  # what the model learnt, not what the grammar forces
        (task,) = tasks
        if task == CLASSIFICATION:  # the first right, the second a well-formed wrong label
            return [Prediction(text=texts[0], category=cls[0].answer[0], well_formed={task: True}),
                    Prediction(text=texts[1], category="not-a-label", well_formed={task: True})]
        # the first exactly the gold triples (any order), the second malformed
        return [Prediction(text=texts[0], triples=list(reversed(gold_triples)), well_formed={task: True}),
                Prediction(text=texts[1], well_formed={task: False})]

    monkeypatch.setattr("model.predict.predict", fake_predict)
    record = sample_decode.decode_samples(object(), cls + ie)
    assert record["sample_n"] == 4
    assert record["sample_well_formed"] == 0.75 and record["sample_correct"] == 0.5


def test_a_failing_sample_decode_warns_and_logs_nothing(tmp_path, data_dir, capsys):
    dev = load_split(data_dir, "dev")
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    callback = sample_decode.make_sample_decode_callback(dev, 2, None, {}, None, log, "fp32")
    state = SimpleNamespace(is_world_process_zero=True, global_step=7)
    callback.on_evaluate(None, state, None, model=object())  # no parameters: cannot be dressed as a model
    assert "step 7 sample decode skipped" in capsys.readouterr().out
    assert log.read_text().count("\n") == 1
    assert sample_decode.make_sample_decode_callback(dev, 0, None, {}, None, log, "fp32") is None
