"""The app is read-only for visitors and turns OSErrors into one line without server paths (issue #11)."""

import tempfile

import pytest

from app_support.batch import check_upload
from app_support.evaluation import load_examples
from app_support.settings import ALLOW_WRITES_ENV, user_message, writes_allowed
from core.dataset import DataError
from model.label import LabelError


def test_visitors_cannot_write_into_the_model_folder_unless_the_server_allows_it():
    argv = ["app.py", "--model", "runs/demo/merged"]
    assert not writes_allowed(argv, {})
    assert not writes_allowed(argv, {ALLOW_WRITES_ENV: "0"})
    assert writes_allowed([*argv, "--allow-writes"], {})
    assert writes_allowed(argv, {ALLOW_WRITES_ENV: "1"})


def test_an_oserror_reads_as_one_line_without_the_servers_paths():
    err = OSError(30, "Read-only file system", "/srv/models/merged/metrics.json")
    message = user_message(err)
    assert "Read-only file system" in message and "/srv" not in message and "\n" not in message


def test_a_full_temp_folder_while_checking_an_upload_is_a_message(full_dir, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(full_dir))
    with pytest.raises(LabelError) as err:
        check_upload("评论.csv", "comment\n苹果很甜\n".encode() * 5000)
    assert "评论.csv" in str(err.value) and "No space left on device" in str(err.value)
    assert str(full_dir) not in str(err.value)


def test_a_full_temp_folder_while_reading_an_evaluation_upload_is_a_message(full_dir, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(full_dir))
    with pytest.raises(DataError) as err:
        load_examples(data=b'{"context": "x", "target": "y"}\n' * 5000, name="dev.jsonl")
    assert "dev.jsonl" in str(err.value) and "No space left on device" in str(err.value)
    assert str(full_dir) not in str(err.value)
