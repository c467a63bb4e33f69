"""app_support.batch: uploads checked and labelled through model.label with a fake predictor."""

from __future__ import annotations

import csv
import io
import json
import tempfile

import pytest

from app_support.batch import (
    check_upload,
    compact_triples,
    download_name,
    encoding_label,
    label_upload,
    preview_and_failures,
    read_labelled,
    size_problem,
    unique_names,
)
from model.csv_file import LabelError
from model.parsing import Triple
from model.predict import Prediction

TEXTS = [f"第{i}条评论，橙子很甜" for i in range(50)]


def csv_bytes(rows, encoding="utf-8") -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode(encoding)


def fake_predict(texts, on_progress):
    """Category from the text, one triple copied from it; reports progress like predict (2 tasks)."""
    on_progress(len(texts), 2 * len(texts))
    on_progress(2 * len(texts), 2 * len(texts))
    return [Prediction(text=t, category="水果", category_confidence=0.8,
                       triples=[Triple(t[:2], "作者", t[-2:], "图书作品", "人物", confidence=0.6)])
            for t in texts]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk"])
def test_check_upload_encodings_and_column(encoding):
    data = csv_bytes([["id", "评论"], *[[str(i), t] for i, t in enumerate(TEXTS)]], encoding)
    upload = check_upload("c.csv", data)
    assert upload.header == ["id", "评论"]
    assert upload.guessed_column == "评论"
    assert upload.estimated_rows == 50
    assert ("gb" in upload.source.encoding) == (encoding == "gbk")



def label_checked(name: str, data: bytes, *args, **kwargs):
    """What the page does: check the upload once, then label the checked upload's bytes."""
    return label_upload(check_upload(name, data), data, *args, **kwargs)


def test_labelling_uses_the_checked_upload_and_refuses_other_bytes(monkeypatch):
    rows = [["comment"], *[[t] for t in TEXTS[:3]]]
    data = csv_bytes(rows)
    upload = check_upload("c.csv", data)

    def no_second_look(path):
        raise AssertionError(f"{path} was inspected again")

    monkeypatch.setattr("model.csv_file.inspect_input", no_second_look)
    monkeypatch.setattr("model.label.inspect_input", no_second_look)
    monkeypatch.setattr("app_support.batch.inspect_input", no_second_look)
    result = label_upload(upload, data, "comment", "m", fake_predict, lambda *_: None)
    assert result.rows == 3 and read_labelled(result.csv_bytes)[1][0] == TEXTS[0]
    other = csv_bytes([["comment"], *[[t] for t in TEXTS[3:6]]])
    with pytest.raises(LabelError, match="c.csv is not the file that was checked"):
        label_upload(upload, other, "comment", "m", fake_predict, lambda *_: None)
    with pytest.raises(LabelError, match="no column 'text'"):
        label_upload(upload, data, "text", "m", fake_predict, lambda *_: None)

def test_check_upload_without_a_text_column_guesses_none():
    upload = check_upload("c.csv", csv_bytes([["a", "b"], ["1", "2"]]))
    assert upload.guessed_column is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "not a text CSV"),
        (csv_bytes([["comment"]]), "no rows"),
        (b"\n\n", "header"),
    ],
)
def test_check_upload_refuses_with_the_users_file_name(data, message):
    with pytest.raises(LabelError) as err:
        check_upload("我的文件.csv", data)
    assert message in str(err.value)
    assert "upload.csv" not in str(err.value) and tempfile.gettempdir() not in str(err.value)


def test_label_upload_keeps_rows_and_columns_and_reports_progress():
    rows = [["id", "comment", "note"], *[[str(i), t, "x"] for i, t in enumerate(TEXTS)], ["50", "", "empty"]]
    reports = []
    result = label_checked("c.csv", csv_bytes(rows, "gbk"), "comment", "model-dir", fake_predict,
                          lambda done, total: reports.append((done, total)))
    out = read_labelled(result.csv_bytes)
    assert result.csv_bytes.startswith(b"\xef\xbb\xbf")  # model.label writes UTF-8 with BOM for Excel
    assert out[0] == ["id", "comment", "note", "category", "category_confidence", "triples", "error", "warnings"]
    assert len(out) == 52 and result.rows == 51 and result.error_rows == 1
    assert out[1][:5] == ["0", TEXTS[0], "x", "水果", "0.800"]
    assert '"predicate": "作者"' in out[1][5] and '"confidence": 0.6' in out[1][5]
    assert out[51][6] == "empty text"
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[-1] == 51
    assert len(reports) > 2  # moves inside a chunk, not only once per chunk


def test_preview_and_failures():
    rows = [["comment"], ["好"], [""], ["也好"]]
    result = label_checked("c.csv", csv_bytes(rows), "comment", "m", fake_predict, lambda *_: None)
    preview, failures = preview_and_failures(result, limit=2)
    assert list(preview.index) == [1, 2]
    # The labeller's columns first, so they are on screen whatever the input's width.
    assert list(preview.columns) == ["category", "category_confidence", "triples", "error", "warnings", "comment"]
    assert failures.to_dict("records") == [{"row": 2, "text": "", "error": "empty text"}]
    assert preview.loc[1, "triples"] == "(好, 作者, 好) 0.60"  # compact on screen, JSON in the download
    assert json.loads(read_labelled(result.csv_bytes)[1][3])[0]["subject"] == "好"


def test_the_confidence_slider_drops_triples_below_it_from_the_download():
    rows = [["comment"], ["好吃"], ["也好"]]
    kept = label_checked("c.csv", csv_bytes(rows), "comment", "m", fake_predict, lambda *_: None, min_confidence=0.6)
    dropped = label_checked("c.csv", csv_bytes(rows), "comment", "m", fake_predict, lambda *_: None,
                           min_confidence=0.65)
    assert [json.loads(r[3])[0]["confidence"] for r in read_labelled(kept.csv_bytes)[1:]] == [0.6, 0.6]
    assert [r[3] for r in read_labelled(dropped.csv_bytes)[1:]] == ["[]", "[]"]
    assert [r[1:3] for r in read_labelled(dropped.csv_bytes)[1:]] == [["水果", "0.800"]] * 2  # categories stay
    assert dropped.min_confidence == 0.65


def test_compact_triples_leaves_odd_cells_alone():
    assert compact_triples("") == ""
    assert compact_triples("{}") == "{}"
    assert compact_triples("[]") == ""


def test_existing_output_column_names_are_not_overwritten():
    rows = [["comment", "category"], ["好", "old"]]
    result = label_checked("c.csv", csv_bytes(rows), "comment", "m", fake_predict, lambda *_: None)
    preview, failures = preview_and_failures(result)
    assert list(preview.columns) == ["category_2", "category_confidence", "triples", "error", "warnings", "comment",
                                     "category"]
    assert preview.iloc[0]["category"] == "old" and preview.iloc[0]["category_2"] == "水果"
    assert len(failures) == 0


def test_size_problem_and_names():
    assert size_problem(20 * 1024 * 1024, 20) is None
    assert "20 MB" in size_problem(20 * 1024 * 1024 + 1, 20)
    assert encoding_label("utf-8-sig") == "UTF-8" and encoding_label("gb18030") == "GBK/GB18030"
    assert download_name("评论.csv") == "评论_labelled.csv"
    assert download_name("") == "comments_labelled.csv"
    assert unique_names(["a", "a", "b"]) == ["a", "a (2)", "b"]
