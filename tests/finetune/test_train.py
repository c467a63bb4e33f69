import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import train

ROOT = Path(__file__).resolve().parents[2]


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_acceptance_run_logs_falling_loss_and_saves_everything(trained_run):
    log = read_log(trained_run)
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(losses) >= 5 and losses[-1] < losses[0]
    assert len(evals) >= 3 and min(evals) < evals[0]
    assert all({"step", "epoch", "lr"} <= set(r) for r in log if "loss" in r)
    cfg = json.loads((trained_run / "train_config.json").read_text())
    assert 0 < cfg["trainable_params"] < cfg["total_params"] and cfg["family"] == "causal"
    assert cfg["max_steps"] == 30 and cfg["precision"] == "fp32"
    assert (trained_run / "adapter" / "adapter_model.safetensors").is_file()
    schema = json.loads((trained_run / "adapter" / "schema.json").read_text())
    assert len(schema["labels"]) == 8 and schema["answer_tokens"]["extraction"] > 100
    # After each evaluation a few dev rows are answered and parsed (finetune/sample_decode.py).
    eval_steps = [r["step"] for r in log if "eval_loss" in r]
    samples = [r for r in log if "sample_n" in r]
    assert [r["step"] for r in samples] == eval_steps
    assert all(r["sample_n"] == 4 and 0 <= r["sample_correct"] <= r["sample_well_formed"] <= 1 for r in samples)


def run_args(base, data, out, steps, *extra):
    return [
        "--base-model",
        str(base),
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        str(steps),
        "--lr-scheduler",
        "constant",
        "--eval-steps",
        "2",
        "--logging-steps",
        "1",
        "--batch-size",
        "4",
        "--save-total-limit",
        "5",
        *extra,
    ]


def adapter_weights(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_resume_continues_from_saved_step_with_same_optimizer_state(tmp_path, tiny_base, small_data):
    straight = tmp_path / "straight"
    train.main(run_args(tiny_base, small_data, straight, 4))

    resumed = tmp_path / "resumed"
    train.main(run_args(tiny_base, small_data, resumed, 2))  # "interrupted" after step 2
    fresh_optimizer = tmp_path / "fresh_optimizer"
    shutil.copytree(resumed, fresh_optimizer)
    # Adam's moments zeroed: a resume that restored the step but not the optimizer state.
    optimizer_file = fresh_optimizer / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    state = torch.load(optimizer_file, weights_only=False)
    for moments in state["state"].values():
        moments["exp_avg"].zero_()
        moments["exp_avg_sq"].zero_()
    torch.save(state, optimizer_file)
    train.main(run_args(tiny_base, small_data, resumed, 4, "--resume"))

    steps = [r["step"] for r in read_log(resumed) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # continued at step 3, no step repeated
    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # The check can fail: resuming without the optimizer's moments lands elsewhere.
    train.main(run_args(tiny_base, small_data, fresh_optimizer, 4, "--resume"))
    c = adapter_weights(fresh_optimizer)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, tiny_base, small_data, capsys):
    train.main(run_args(tiny_base, small_data, tmp_path / "r", 1, "--resume"))
    assert "no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in read_log(tmp_path / "r") if "loss" in r] == [1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_base, small_data):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "finetune.train",
        *run_args(tiny_base, small_data, out, 3),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "[rank 0/2] finished at step 3" in output and "[rank 1/2] finished at step 3" in output
    assert sorted(p.name for p in (out / "adapter").glob("adapter_model*")) == ["adapter_model.safetensors"]
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2


def test_a_nan_model_stops_training_with_the_step_and_saves_no_adapter(tmp_path, tiny_base, small_data):
    """A base model whose weights hold NaN used to train to the end, log loss 0.0 and save eval_loss nan
    as the best; now the first non-finite loss stops the run with a message naming the step."""
    from safetensors.torch import save_file

    broken = tmp_path / "nan_base"
    shutil.copytree(tiny_base, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(run_args(broken, small_data, out, 4))
    message = str(stopped.value)
    assert "training loss is nan at step 1" in message and "nothing was saved" in message
    assert not (out / "adapter").exists()


def test_a_non_finite_eval_loss_stops_before_the_checkpoint_is_saved():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    _, stop = train.make_trainer_class("fp16")
    state = TrainerState(global_step=12)
    args = TrainingArguments(output_dir="unused", report_to=[])
    stop().on_log(args, state, TrainerControl(), logs={"eval_loss": 1.5})  # finite: nothing happens
    with pytest.raises(train.NonFiniteLoss, match="eval loss is inf at step 12.*bf16/fp32"):
        stop().on_log(args, state, TrainerControl(), logs={"eval_loss": float("inf")})
