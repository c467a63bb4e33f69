"""Batch page helpers: an uploaded CSV -> model.label -> labelled CSV bytes (no streamlit here).

The page reuses model.csv_file's reading, column detection and writing and model.label's run, so a CSV
labelled in the browser is byte-for-byte what `python -m model.label` writes for the same file. Files are
what model.label works on, so an upload is written to a private temporary folder that lives for one
check or run; the check's findings (encoding, header, fingerprint) are kept, so labelling does not
inspect the file again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app_support.uploads import saved_upload
from model.csv_file import (
    OUTPUT_COLUMNS,
    CheckedInput,
    LabelError,
    Source,
    inspect_input,
    output_header,
    pick_text_column,
    read_header,
)
from model.label import LabelConfig, label_csv

# Rows per model.label chunk. Smaller than the CLI's 256 so the page can show the labelled rows'
# count move; still several generate() batches per chunk so rows of similar length share one.
CHUNK_ROWS = 64
# A fixed name: model.csv_file tells a CSV and its encoding from the bytes, never the name.
UPLOAD_NAME = "upload.csv"
PREVIEW_ROWS = 200


def size_problem(size_bytes: int, max_mb: int) -> str | None:
    """Why an upload is refused for its size, or None."""
    if size_bytes > max_mb * 1024 * 1024:
        return (f"文件太大 file too large: {size_bytes / 1024 / 1024:.1f} MB > {max_mb} MB. "
                f"Label big files with: python -m model.label --model DIR --input in.csv --output out.csv")
    return None


@dataclass(frozen=True)
class Upload:
    """A checked upload: its encoding, header, estimated rows and the column to preselect (or None)."""

    name: str
    source: Source
    header: list[str]
    guessed_column: str | None

    @property
    def estimated_rows(self) -> int:
        return max(1, self.source.line_count - 1)


def check_upload(name: str, data: bytes) -> Upload:
    """Check an upload once, as a CSV with a header and rows (the page keeps the result; the file is not kept).

    Raises LabelError worded for the user (empty, binary, undecodable, no header, no rows)."""
    with saved_upload(name, data, UPLOAD_NAME, LabelError) as path:
        try:
            source = inspect_input(path)
            header, has_rows = read_header(source)
        except LabelError as err:
            # model.csv_file names the file by its path: show the user's file name, not our temp path.
            raise LabelError(str(err).replace(str(path), name)) from None
    if not any(column.strip() for column in header):
        raise LabelError(f"{name}: the first row (the header) is empty; the CSV needs column names")
    if not has_rows:
        raise LabelError(f"{name} has a header but no rows to label")
    return Upload(name, source, header, guess_column(header))


def guess_column(header: Sequence[str]) -> str | None:
    """The text column model.label would pick by its name, or None when no name says so."""
    try:
        return header[pick_text_column(header, None, "upload")]
    except LabelError:
        return None


class RowProgress:
    """Turns model.label's per-chunk progress and predict's per-batch progress into rows done.

    label_csv reports after each chunk; predict reports (steps done, steps) inside a chunk, where a
    step is one batch of one task. Interpolating inside the chunk lets the bar move every batch.
    """

    def __init__(self, total_rows: int, report: Callable[[int, int], None]):
        self.total = max(1, total_rows)
        self.report = report
        self.rows_done = 0  # rows of finished chunks

    def chunk_done(self, rows_done: int, total_rows: int) -> None:
        self.rows_done, self.total = rows_done, max(self.total, total_rows)
        self.report(self.rows_done, self.total)

    def inside_chunk(self, n_texts: int) -> Callable[[int, int], None]:
        def on_progress(done: int, total: int) -> None:
            inside = n_texts * done // total if total else n_texts
            self.report(min(self.total, self.rows_done + inside), self.total)

        return on_progress


@dataclass(frozen=True)
class BatchResult:
    csv_bytes: bytes
    rows: int
    error_rows: int
    encoding: str
    column: str
    seconds: float
    output_columns: list[str]  # the header of csv_bytes: the input's columns + model.csv_file.OUTPUT_COLUMNS
    min_confidence: float = 0.0  # triples below it were dropped


def label_upload(
    upload: Upload,
    data: bytes,
    column: str,
    model_dir: str,
    predict_batch: Callable[[list[str], Callable[[int, int], None]], Sequence],
    on_progress: Callable[[int, int], None],
    min_confidence: float = 0.0,
) -> BatchResult:
    """Label the checked upload's bytes with model.label.label_csv; predict_batch(texts, on_progress) -> predictions.

    `data` must be the bytes `check_upload` checked (same fingerprint), so they are not inspected again."""
    if len(data) != upload.source.size or hashlib.sha256(data).hexdigest() != upload.source.sha256:
        raise LabelError(f"{upload.name} is not the file that was checked; upload it again")
    checked_column = pick_text_column(upload.header, column, upload.name)
    with saved_upload(upload.name, data, UPLOAD_NAME, LabelError) as path:
        checked = CheckedInput(dataclasses.replace(upload.source, path=path), upload.header, checked_column)
        tracker = RowProgress(upload.estimated_rows, on_progress)
        output = path.with_name("labelled.csv")
        cfg = LabelConfig(model=model_dir, input=str(path), output=str(output), column=column,
                          chunk_rows=CHUNK_ROWS, min_confidence=min_confidence)
        result = label_csv(
            cfg,
            lambda texts: predict_batch(list(texts), tracker.inside_chunk(len(texts))),
            checked=checked,
            log=lambda _message: None,  # the page shows progress and errors itself
            on_progress=tracker.chunk_done,
            show_bar=False,
        )
        return BatchResult(output.read_bytes(), result.rows, result.error_rows, result.encoding, result.column,
                           result.seconds, output_header(upload.header), min_confidence)


def read_labelled(csv_bytes: bytes) -> list[list[str]]:
    """The rows of a labelled CSV (header first), as model.label wrote them (UTF-8 with BOM)."""
    return list(csv.reader(io.StringIO(csv_bytes.decode("utf-8-sig"), newline="")))


def compact_triples(cell: str) -> str:
    """A triples JSON cell as '(subject, predicate, object); ...' for reading on screen."""
    try:
        triples = json.loads(cell)
    except ValueError:
        return cell
    if not isinstance(triples, list):
        return cell
    return "; ".join(
        f"({t.get('subject')}, {t.get('predicate')}, {t.get('object')})"
        + (f" {t['confidence']:.2f}" if isinstance(t.get("confidence"), (int, float)) else "")
        for t in triples if isinstance(t, dict)
    )


def preview_and_failures(result: BatchResult, limit: int = PREVIEW_ROWS):
    """(first `limit` labelled rows, every row with an error) as DataFrames; row numbers start at 1.

    The preview shows triples compactly; the download keeps model.label's JSON.
    """
    import pandas as pd

    rows = read_labelled(result.csv_bytes)
    header, body = rows[0], rows[1:]
    # Columns by position: model.label renames its columns (error_2 ...) if the input already has them.
    # (category, category_confidence, triples, error, warnings) are the last len(OUTPUT_COLUMNS) columns.
    results_at = len(header) - len(OUTPUT_COLUMNS)
    triples_at = results_at + OUTPUT_COLUMNS.index("triples")
    error_at = results_at + OUTPUT_COLUMNS.index("error")
    text_at = result.output_columns.index(result.column) if result.column in result.output_columns else 0
    # The labeller's columns first: after a wide input they were off-screen at 1280 px.

    def shown_row(row):
        cells = [*row[:triples_at], compact_triples(row[triples_at]), *row[triples_at + 1 :]]
        return cells[results_at:] + cells[:results_at]

    shown = [shown_row(row) for row in body[:limit]]
    names = unique_names(header)
    frame = pd.DataFrame(shown, columns=names[results_at:] + names[:results_at],
                         index=range(1, min(limit, len(body)) + 1))
    failed = [(n, row[text_at], row[error_at]) for n, row in enumerate(body, start=1) if row[error_at]]
    failures = pd.DataFrame([{"row": n, "text": text, "error": error} for n, text, error in failed],
                            columns=["row", "text", "error"])
    return frame, failures


def unique_names(names: Sequence[str]) -> list[str]:
    """Column names made unique for display (Arrow, behind st.dataframe, rejects duplicates)."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def encoding_label(encoding: str) -> str:
    """How model.label's codec names read to a user: utf-8-sig is plain UTF-8 (a BOM is optional)."""
    return {"utf-8-sig": "UTF-8", "gb18030": "GBK/GB18030"}.get(encoding, encoding)


def download_name(upload_name: str) -> str:
    """in.csv -> in_labelled.csv (ASCII-safe stem kept; Chinese names are fine in a download)."""
    stem = Path(upload_name).stem or "comments"
    return f"{stem}_labelled.csv"
