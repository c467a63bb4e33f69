"""model.csv_file: the input inspected in one pass, its header and column, spreadsheet-safe cells.

The whole labelling run (encodings, columns, errors, resume) is tested through model.label in test_label.py;
here what the CSV module alone promises."""

from __future__ import annotations

import pathlib

import pytest

from model import csv_file
from model.csv_file import LabelError, inspect_input, neutralise
from model.label import main
from tests.model.test_label import fake_predict, write_csv

# One "comment" column of plain Chinese rows, about 3 MB: several read blocks and more than the detection sample.
ROW = "这本书的纸张很好，印刷清晰，物流也快，下次还会再买"


def _counting_reads(monkeypatch, target: pathlib.Path) -> list[int]:
    """Bytes read from `target` through Path.open, kept in a one-item list."""
    read = [0]
    original = pathlib.Path.open

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def _count(self, data):  # text is counted in the file's own encoding (utf-8-sig would add a BOM to each)
            encoding = getattr(self.handle, "encoding", "utf-8").replace("utf-8-sig", "utf-8")
            read[0] += len(data.encode(encoding) if isinstance(data, str) else data)
            return data

        def read(self, *args):
            return self._count(self.handle.read(*args))

        def __iter__(self):
            for line in self.handle:
                yield self._count(line)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    def counting_open(self, *args, **kwargs):
        handle = original(self, *args, **kwargs)
        return Counting(handle) if self == target else handle

    monkeypatch.setattr(pathlib.Path, "open", counting_open)
    return read


@pytest.mark.parametrize("encoding", ["utf-8", "gbk"])
def test_the_cli_reads_the_input_once_before_labelling(tmp_path, monkeypatch, encoding):
    """Encoding check, fingerprint and line count share one pass; the header is read once; only then the rows."""
    src = write_csv(tmp_path / "in.csv", [["comment"], *[[f"{ROW}{i}"] for i in range(60_000)]], encoding)
    size = src.stat().st_size
    assert size > 3 * csv_file.DETECT_SAMPLE_BYTES
    read = _counting_reads(monkeypatch, src)
    before_labelling = []

    def predict(texts):
        if not before_labelling:
            before_labelling.append(read[0])
        return fake_predict(texts)

    main(["--model", "unused", "--input", str(src), "--output", str(tmp_path / "out.csv"), "--chunk-rows", "4096"],
         predict_fn=predict)
    # The detection sample, one whole pass, the header (and the rows of the first chunk, read before predict).
    first_chunk = 4096 * (len(f"{ROW}00000\n".encode(encoding)) + 1)
    assert before_labelling[0] <= csv_file.DETECT_SAMPLE_BYTES + size + first_chunk + (1 << 16) * 2, (
        before_labelling[0], size)
    assert read[0] <= csv_file.DETECT_SAMPLE_BYTES + 2 * size + (1 << 17)  # ... and the rows once more


def test_utf8_at_the_start_and_gbk_further_on_is_refused_clearly(tmp_path):
    """The guess comes from the first bytes; a file that turns into another encoding later is not half-read."""
    head = "comment\n" + "\n".join(f"{ROW}{i}" for i in range(30_000)) + "\n"
    path = tmp_path / "mixed.csv"
    path.write_bytes(head.encode("utf-8") + "后面是GBK编码的评论\n".encode("gbk"))
    assert len(head.encode()) > csv_file.DETECT_SAMPLE_BYTES
    with pytest.raises(LabelError, match=r"mixed\.csv is neither UTF-8 nor valid"):
        inspect_input(path)


def test_the_fingerprint_and_line_count_come_from_the_bytes(tmp_path):
    import hashlib

    path = write_csv(tmp_path / "in.csv", [["comment"], ["苹果很甜"], ["衣服不错"]], "gbk")
    source = inspect_input(path)
    assert source.encoding == "gb18030" and source.size == path.stat().st_size
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and source.line_count == 3


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("=1+1", "'=1+1"), ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"), ("\r=1", "'\r=1"), ("-5", "-5"), ("+3.5", "+3.5"), ("-1e3", "-1e3"), ("苹果=好", "苹果=好"),
        ("", ""),
    ],
)
def test_neutralise(cell, expected):
    assert neutralise(cell) == expected




# ---------------------------------------------------------------- blocks (model.label_ray's unit)


def _awkward_csv(path: pathlib.Path, encoding: str, newline: str, bom: bool = False) -> pathlib.Path:
    """Quoted commas, quotes and newlines, blank lines between records, a ragged row and an empty text."""
    import codecs
    import csv
    import io
    import random

    rng = random.Random(encoding + newline)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=newline)
    writer.writerow(["id", "comment"])
    for i in range(103):
        writer.writerow([str(i), "".join(rng.choice('好的,\n"中文测试') for _ in range(rng.randint(0, 12)))])
        if i % 9 == 0:
            buffer.write(newline)  # a blank line: not a row
        if i == 50:
            writer.writerow(["50b", "多", "出来的"])
    data = buffer.getvalue().encode(encoding)
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + data)
    return path


@pytest.mark.parametrize("encoding,newline,bom", [("utf-8", "\n", False), ("utf-8", "\r\n", True),
                                                  ("gbk", "\r\n", False)])
def test_blocks_cover_the_rows_read_chunks_gives_in_order(tmp_path, encoding, newline, bom):
    source = inspect_input(_awkward_csv(tmp_path / "in.csv", encoding, newline, bom))
    whole = [row for chunk in csv_file.read_chunks(source, 2, 1000, skip=0) for row in chunk]
    assert len(whole) == 104
    for block_rows in (1, 7, 52, 104, 500):
        blocks = csv_file.plan_blocks(source, block_rows)
        assert [b.first_row for b in blocks] == list(range(0, 104, block_rows))
        assert sum(b.rows for b in blocks) == 104 and all(b.rows <= block_rows for b in blocks)
        assert [row for b in blocks for row in csv_file.read_block(source, 2, b)] == whole, block_rows


def test_a_block_of_a_file_that_lost_rows_is_an_error_naming_it(tmp_path):
    path = _awkward_csv(tmp_path / "in.csv", "utf-8", "\n")
    source = inspect_input(path)
    last = csv_file.plan_blocks(source, 100)[-1]
    path.write_text("id,comment\n1,短\n", encoding="utf-8")
    with pytest.raises(LabelError, match=r"in.csv changed while it was being labelled: block 1 \(rows 101-104\)"):
        csv_file.read_block(source, 2, csv_file.Block(last.index, last.first_row, last.rows, 0))
