"""finetune.train loses nothing: a kill while a checkpoint is written, a torn log line, a second run on
the same run folder, bad data or a base folder without weights (issue #11)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.dataset import TRAIN_FILE
from core.safe_io import OutputLock
from finetune import train
from tests.finetune.test_train import adapter_weights, read_log, run_args

ROOT = Path(__file__).resolve().parents[2]

# Runs finetune.train and SIGKILLs itself the moment the Trainer starts writing trainer_state.json of
# checkpoint-4: the weights and optimizer of that checkpoint are on disk, its state and RNG are not.
KILL_IN_CHECKPOINT = r"""
import os, signal, sys
from transformers.trainer_callback import TrainerState
from finetune import train
save = TrainerState.save_to_json
def save_then_die(self, path):
    if "checkpoint-4" in path:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, path)
TrainerState.save_to_json = save_then_die
train.main(sys.argv[1:])
"""


@pytest.fixture()
def killed_in_checkpoint(tmp_path, tiny_base, small_data) -> Path:
    """A run killed (SIGKILL) while writing checkpoint-4 of 6; checkpoint-2 is complete."""
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, *run_args(tiny_base, small_data, run, 6)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    checkpoint = run / "checkpoints" / "checkpoint-4"
    assert checkpoint.is_dir() and not (checkpoint / "trainer_state.json").exists()
    return run


@pytest.mark.slow
def test_resume_skips_the_checkpoint_a_kill_left_incomplete(killed_in_checkpoint, tiny_base, small_data, tmp_path,
                                                             capsys):
    straight = tmp_path / "straight"
    train.main(run_args(tiny_base, small_data, straight, 6))
    capsys.readouterr()
    train.main(run_args(tiny_base, small_data, killed_in_checkpoint, 6, "--resume"))
    out = capsys.readouterr().out
    assert "skipping" in out and "checkpoint-4: incomplete (no trainer_state.json)" in out
    assert "resuming from" in out and "checkpoint-2 (step 2)" in out
    assert [r["step"] for r in read_log(killed_in_checkpoint) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    a, b = adapter_weights(straight), adapter_weights(killed_in_checkpoint)
    assert all(float((a[k] - b[k]).abs().max()) < 1e-6 for k in a)


@pytest.mark.slow
def test_a_torn_last_log_line_does_not_stop_resume(killed_in_checkpoint, tiny_base, small_data):
    log = killed_in_checkpoint / "train_log.jsonl"
    with log.open("a", encoding="utf-8") as handle:
        handle.write('{"step": 4, "epoch": 0.2, "lo')  # what a kill mid-write leaves
    train.main(run_args(tiny_base, small_data, killed_in_checkpoint, 6, "--resume"))
    records = read_log(killed_in_checkpoint)  # every line parses again
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_true_mean_train_loss_after_a_resume(tmp_path, tiny_base, small_data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(run_args(tiny_base, small_data, straight, 4))
    train.main(run_args(tiny_base, small_data, resumed, 2))
    train.main(run_args(tiny_base, small_data, resumed, 4, "--resume"))

    def mean_of(run):
        return [r["train_loss_mean"] for r in read_log(run) if "train_loss_mean" in r][-1]

    losses = [r["loss"] for r in read_log(straight) if "loss" in r]
    assert mean_of(straight) == pytest.approx(sum(losses) / len(losses), abs=1e-3)
    assert mean_of(resumed) == pytest.approx(mean_of(straight), abs=1e-4)


def test_a_second_run_on_the_same_run_folder_is_refused_naming_the_first(tmp_path, tiny_base, small_data):
    run = tmp_path / "r"
    with OutputLock(run / "train", "finetune.train"), pytest.raises(SystemExit) as err:
        train.main(run_args(tiny_base, small_data, run, 2))
    assert f"pid {os.getpid()}" in str(err.value) and "being written by finetune.train" in str(err.value)
    assert not (run / "adapter").exists()


def test_bad_training_data_is_one_clear_line(tmp_path, tiny_base, small_data):
    with (small_data / TRAIN_FILE).open("a", encoding="utf-8") as handle:
        handle.write('{"context": "no target here"}\n')
    with pytest.raises(SystemExit) as err:
        train.main(run_args(tiny_base, small_data, tmp_path / "r", 2))
    message = str(err.value)
    assert message.startswith("error: ") and f"{TRAIN_FILE}:65" in message


def test_a_base_folder_with_only_config_json_says_what_is_missing(tmp_path, tiny_base, small_data):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(tiny_base / "config.json", base / "config.json")
    with pytest.raises(SystemExit) as err:
        train.main(run_args(base, small_data, tmp_path / "r", 2))
    assert "config.json but no weights" in str(err.value) and "no tokenizer files" in str(err.value)
    assert "hub" not in str(err.value)


def test_an_adapter_is_saved_beside_and_renamed_into_place(tmp_path, tiny_base, small_data, monkeypatch):
    """A save that fails (a full disk) leaves the previous adapter as it was and no temporary folder."""
    run = tmp_path / "r"
    train.main(run_args(tiny_base, small_data, run, 2))
    before = adapter_weights(run)
    from transformers import PreTrainedTokenizerBase

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        train.main(run_args(tiny_base, small_data, run, 4))
    after = adapter_weights(run)
    assert all(float((before[k] - after[k]).abs().max()) == 0 for k in before)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("adapter")) == ["adapter"]
    assert "labels" in json.loads((run / "adapter" / "schema.json").read_text())
