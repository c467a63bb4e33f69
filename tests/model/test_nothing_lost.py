"""model.label and model.evaluate lose nothing: one run per output, inputs never overwritten, outputs
checked before the model loads, invisible texts are empty (issue #11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from core.safe_io import OutputBusy, OutputLock, atomic_write, lock_path
from model import evaluate, label, resume
from model.label import LabelError
from model.predict import clean_text
from tests.model.test_label import ROOT, big_csv, driver_cmd, fake_predict, read_output, run_driver, write_csv

HOLD_LOCK = """
import sys, time
from core.safe_io import OutputLock
with OutputLock(sys.argv[1], "holder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_two_label_runs_on_one_output_the_second_is_refused_and_the_first_is_whole(tmp_path):
    a, b = big_csv(tmp_path / "a.csv", 2_000), big_csv(tmp_path / "b.csv", 1_500)
    out, reference = tmp_path / "out.csv", tmp_path / "reference.csv"
    run_driver(a, reference)
    env = {**os.environ, "FAKE_DELAY": "0.05"}  # 8 chunks: the first run is still going when the second starts
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(driver_cmd(a, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 60
        while not lock_path(out).exists() and time.time() < deadline:
            time.sleep(0.01)
        second = subprocess.run(driver_cmd(b, out), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"pid {first.pid}" in second.stderr and "being written by model.label" in second.stderr
    finally:
        first.wait(timeout=120)
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()
    assert out.read_bytes() == reference.read_bytes()  # only the first input's rows, all of them
    assert not resume.progress_path(out).exists() and not lock_path(out).exists()


def test_a_killed_run_releases_its_lock(tmp_path):
    target = tmp_path / "out.csv"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusy, match=f"pid {holder.pid}"):
            OutputLock(target, "test").acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    with OutputLock(target, "test"):  # the kernel dropped the dead run's flock
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    assert not lock_path(target).exists()


@pytest.mark.parametrize("side", [".partial", ".progress.json", ".lock"])
def test_label_refuses_an_input_that_is_a_side_file_of_the_output(tmp_path, side):
    out = tmp_path / "x.csv"
    src = write_csv(tmp_path / f"x.csv{side}", [["comment"], ["苹果很甜"]])
    before = src.read_bytes()
    with pytest.raises(SystemExit, match=f"would write {src}, which is the --input file"):
        label.main(["--model", "unused", "--input", str(src), "--output", str(out)], predict_fn=fake_predict)
    assert src.read_bytes() == before and not out.exists()


def test_evaluate_refuses_to_write_over_its_data(tmp_path, data_dir):
    data = tmp_path / "dev.jsonl"
    data.write_bytes((data_dir / "mixed_dev_dataset.jsonl").read_bytes())
    before = data.read_bytes()
    with pytest.raises(SystemExit, match="--output .* is the --data file"):
        evaluate.main(["--model", str(tmp_path / "no-model"), "--data", str(data), "--output", str(data)])
    # The predictions file beside the metrics would be the data too.
    preds = tmp_path / "m.predictions.jsonl"
    preds.write_bytes(before)
    with pytest.raises(SystemExit, match="predictions file .* is the --data file"):
        evaluate.main(["--model", str(tmp_path / "no-model"), "--data", str(preds),
                       "--output", str(tmp_path / "m.json")])
    assert data.read_bytes() == before and preds.read_bytes() == before


def test_label_checks_a_read_only_output_folder_before_loading_the_model(tmp_path, readonly_dir):
    src = write_csv(tmp_path / "in.csv", [["comment"], ["苹果很甜"]])
    # No predict_fn: reaching the model load would fail on --model "unused" with another message.
    with pytest.raises(SystemExit, match="cannot write in .*readonly"):
        label.main(["--model", "unused", "--input", str(src), "--output", str(readonly_dir / "out.csv")])


def test_evaluate_checks_a_read_only_output_folder_before_loading_the_model(tmp_path, readonly_dir, data_dir):
    with pytest.raises(SystemExit, match="cannot write in .*readonly"):
        evaluate.main(["--model", str(tmp_path / "no-model"), "--data", str(data_dir / "mixed_dev_dataset.jsonl"),
                       "--output", str(readonly_dir / "metrics.json")])


def test_label_says_when_the_output_disk_is_full_before_loading_the_model(tmp_path, full_dir):
    src = write_csv(tmp_path / "in.csv", [["comment"], ["苹果很甜"]])
    with pytest.raises(SystemExit, match="cannot write in .*full: No space left on device"):
        label.main(["--model", "unused", "--input", str(src), "--output", str(full_dir / "out.csv")])


def test_an_atomic_write_that_fails_on_a_full_disk_keeps_the_old_file(full_dir):
    target = full_dir / "filler"  # the file that fills the disk is the old content
    size = target.stat().st_size
    with pytest.raises(OSError):
        atomic_write(target, b"1" * 100_000)
    assert target.stat().st_size == size
    assert [p.name for p in full_dir.iterdir()] == ["filler"]  # no temporary file left behind


@pytest.mark.parametrize("text", ["\u200b", "\u3000\u3000", "\ufeff \u200d", "\u2028\t"])
def test_a_comment_of_invisible_characters_is_empty_text(tmp_path, text):
    assert clean_text(text) == (None, [], "empty text")
    src = write_csv(tmp_path / "in.csv", [["comment"], [text], ["苹果很甜"]])
    label.main(["--model", "unused", "--input", str(src), "--output", str(tmp_path / "out.csv")],
               predict_fn=fake_predict)
    header, invisible, visible = read_output(tmp_path / "out.csv")
    assert invisible[header.index("error")] == "empty text" and visible[header.index("error")] == ""


def test_label_and_evaluate_messages_are_label_errors_not_tracebacks(tmp_path):
    with pytest.raises(LabelError, match="is the --input file"):
        label.LabelConfig(model="m", input=str(tmp_path / "a.csv"), output=str(tmp_path / "a.csv"))
