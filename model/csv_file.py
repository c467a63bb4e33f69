"""The labeller's CSV files: the input checked and read (encoding, header, text column, rows fitted to the
header) and the output written (header with the added columns, spreadsheet-safe cells, UTF-8 with BOM).

Shared by the CLI (model.label) and the app's batch page (app_support.batch), so a CSV labelled in the
browser is byte-for-byte what `python -m model.label` writes for the same file.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

# Header names (lower case) that hold the text to label, most specific first.
TEXT_COLUMN_NAMES = ("comment", "text", "review", "content", "sentence", "评论", "内容", "文本", "句子")
OUTPUT_COLUMNS = ("category", "category_confidence", "triples", "error", "warnings")
# Cells starting with these are formulas (or become one) in Excel/LibreOffice: OWASP "CSV injection".
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
GB_ENCODINGS = {"gb2312", "gbk", "gb18030", "hz"}
DETECT_SAMPLE_BYTES = 1 << 20  # charset-normalizer sees this much; the whole file is then decoded strictly
READ_BLOCK_BYTES = 1 << 20
# A long review is far below this; the csv module's default (128 KiB) would crash on a pasted article.
csv.field_size_limit(64 << 20)


class LabelError(ValueError):
    """A problem with the input, the output path or the options, worded for the user."""


@dataclass(frozen=True)
class Source:
    """An input file checked to be text: how to decode it and a fingerprint to recognise it on resume."""

    path: Path
    encoding: str
    size: int
    sha256: str
    line_count: int  # newlines: an estimate of the row count for the progress bar


@dataclass(frozen=True)
class CheckedInput:
    """An input ready to label: its source, its header exactly as written and the text column's index."""

    source: Source
    header: list[str]
    text_index: int

    @property
    def column(self) -> str:
        return self.header[self.text_index]


# ---------------------------------------------------------------- reading


def _is_gb(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name in GB_ENCODINGS
    except LookupError:
        return False


def guess_encoding(sample: bytes) -> str | None:
    """charset-normalizer's guess for non-UTF-8 bytes; any GB candidate wins as gb18030 (the GBK superset),
    because short GBK comments are sometimes ranked as Korean cp949 first."""
    import charset_normalizer

    matches = charset_normalizer.from_bytes(sample)
    for match in matches:
        if any(_is_gb(name) for name in [match.encoding, *match.could_be_from_charset]):
            return "gb18030"
    best = matches.best()
    return best.encoding if best else None


def _looks_binary(sample: bytes) -> bool:
    """NUL bytes or many control characters: not a CSV (UTF-16 too, which we ask users to re-save)."""
    if b"\x00" in sample:
        return True
    controls = sum(1 for b in sample if b < 32 and b not in (9, 10, 13))
    return controls > max(2, len(sample) // 100)


def _scan(path: Path, encoding: str) -> tuple[bool, str, int]:
    """One pass over the file: (whether it all decodes strictly as `encoding`, sha256, newline count).

    Strict decoding of the whole file means no row can fail to decode halfway through a run; the digest
    and the count come from the same blocks, so the input is read once before labelling."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    digest, newlines, decodes = hashlib.sha256(), 0, True
    with path.open("rb") as handle:
        while block := handle.read(READ_BLOCK_BYTES):
            digest.update(block)
            newlines += block.count(b"\n")
            if decodes:
                try:
                    decoder.decode(block)
                except UnicodeDecodeError:
                    decodes = False
    if decodes:
        try:
            decoder.decode(b"", final=True)  # a multi-byte character cut off at the end
        except UnicodeDecodeError:
            decodes = False
    return decodes, digest.hexdigest(), newlines


def _utf8_start(sample: bytes) -> bool:
    """Whether the first bytes are UTF-8 (a character cut at the sample's end is fine)."""
    try:
        codecs.getincrementaldecoder("utf-8-sig")(errors="strict").decode(sample)
    except UnicodeDecodeError:
        return False
    return True


def inspect_input(path: str | Path) -> Source:
    """Check that `path` is a readable text file and find its encoding from its bytes (never its name)."""
    path = Path(path)
    if not path.exists():
        raise LabelError(f"input file not found: {path}")
    if not path.is_file():
        raise LabelError(f"input is not a file: {path}")
    with path.open("rb") as handle:
        sample = handle.read(DETECT_SAMPLE_BYTES)
    size = path.stat().st_size
    if size == 0:
        raise LabelError(f"{path} is empty: expected a CSV with a header row and at least one row")
    if _looks_binary(sample):
        raise LabelError(f"{path} is not a text CSV (binary data or UTF-16); save it as CSV in UTF-8 or GBK")
    # UTF-8 (BOM or not) first and strictly: charset-normalizer can rank valid UTF-8 Chinese as something else.
    # The guess comes from the first bytes, so the whole file is read once (twice only when UTF-8 bytes
    # at its start turn into something else further on).
    encoding = "utf-8-sig" if _utf8_start(sample) else guess_encoding(sample)
    if encoding is None:
        raise LabelError(f"{path}: cannot tell its text encoding; save it as CSV in UTF-8 or GBK")
    decodes, sha, lines = _scan(path, encoding)
    if not decodes and encoding == "utf-8-sig":
        encoding = guess_encoding(sample)
        if encoding is None:
            raise LabelError(f"{path}: cannot tell its text encoding; save it as CSV in UTF-8 or GBK")
        decodes = _scan(path, encoding)[0]
    if not decodes:
        raise LabelError(f"{path} is neither UTF-8 nor valid {encoding}; save it as CSV in UTF-8 or GBK")
    return Source(path, encoding, size, sha, lines)


def csv_records(handle) -> Iterator[list[str]]:
    """CSV records, blank lines skipped (they are not rows, as in pandas and Excel)."""
    for record in csv.reader(handle):
        if record:
            yield record


def check_input(source: Source, column: str | None) -> CheckedInput:
    """The source with its header and text column (--column, else found by name), or a LabelError."""
    header, has_rows = read_header(source)
    if not has_rows:
        raise LabelError(f"{source.path} has a header but no rows to label")
    return CheckedInput(source, header, pick_text_column(header, column, source.path))


def read_header(source: Source) -> tuple[list[str], bool]:
    """(header names exactly as written, whether any data row follows)."""
    with source.path.open(encoding=source.encoding, newline="") as handle:
        records = csv_records(handle)
        header = next(records, None)
        if header is None:
            raise LabelError(f"{source.path} has no header row (only blank lines)")
        return header, next(records, None) is not None


def pick_text_column(header: Sequence[str], column: str | None, path: Path | str) -> int:
    """Index of the text column: --column (exact, then any case), else the first known name."""
    folded = [name.strip().casefold() for name in header]
    if column is not None:
        for candidates in ([name.strip() for name in header], folded):
            wanted = column.strip() if candidates is not folded else column.strip().casefold()
            if wanted in candidates:
                return candidates.index(wanted)
        raise LabelError(f"{path} has no column {column!r}; columns found: {list(header)}")
    for name in TEXT_COLUMN_NAMES:
        if name in folded:
            return folded.index(name)
    raise LabelError(
        f"{path}: no text column found; columns found: {list(header)}. "
        f"Name it one of {', '.join(TEXT_COLUMN_NAMES)} or pass --column NAME"
    )


def fit_row(record: list[str], width: int) -> tuple[list[str], str | None]:
    """A record made as wide as the header, so every input row gives exactly one aligned output row.

    Short rows are padded. Long ones usually come from an unquoted comma in the last field, so the
    extra fields are joined back into it (nothing is dropped) and the row gets a warning."""
    if len(record) <= width:
        return record + [""] * (width - len(record)), None
    joined = record[: width - 1] + [",".join(record[width - 1 :])]
    return joined, f"row has {len(record)} fields, the header {width}: the extra ones were joined into the last column"


def read_chunks(source: Source, width: int, size: int, skip: int) -> Iterator[list[tuple[list[str], str | None]]]:
    """Lists of (row fitted to the header, warning) of `size` rows, after the header and `skip` rows."""
    with source.path.open(encoding=source.encoding, newline="") as handle:
        records = csv_records(handle)
        next(records)  # the header
        for _ in islice(records, skip):
            pass
        while chunk := list(islice(records, size)):
            yield [fit_row(record, width) for record in chunk]


@dataclass(frozen=True)
class Block:
    """A run of consecutive data rows of one file: the unit that model.label_ray labels, writes and resumes."""

    index: int
    first_row: int  # 0-based among the data rows (the header and blank lines not counted)
    rows: int
    start: int  # the text handle's tell() just before its first record: where read_block seeks to


def _lines(handle) -> Iterator[str]:
    """The handle's lines through readline(), not iteration, so handle.tell() stays usable between records."""
    while line := handle.readline():
        yield line


def plan_blocks(source: Source, block_rows: int) -> list[Block]:
    """The file's data rows cut into blocks of `block_rows` (the last one shorter), in one pass.

    The csv module reads no further than the record it returns, so tell() after a record is where the next
    one starts; it is asked once per block (tell() on a text handle re-decodes its buffer, too slow per row)."""
    blocks: list[Block] = []
    with source.path.open(encoding=source.encoding, newline="") as handle:
        records = csv_records(_lines(handle))
        next(records)  # the header
        count, start = 0, handle.tell()
        for _ in records:
            count += 1
            if count % block_rows == 0:
                blocks.append(Block(len(blocks), count - block_rows, block_rows, start))
                start = handle.tell()
        if count % block_rows:
            blocks.append(Block(len(blocks), count - count % block_rows, count % block_rows, start))
    return blocks


def read_block(source: Source, width: int, block: Block) -> list[tuple[list[str], str | None]]:
    """The block's rows fitted to the header, as read_chunks gives them; a LabelError if the file changed."""
    with source.path.open(encoding=source.encoding, newline="") as handle:
        handle.seek(block.start)
        rows = [fit_row(record, width) for record in islice(csv_records(_lines(handle)), block.rows)]
    if len(rows) != block.rows:
        raise LabelError(f"{source.path} changed while it was being labelled: block {block.index} "
                         f"(rows {block.first_row + 1}-{block.first_row + block.rows}) has {len(rows)} rows now")
    return rows


# ---------------------------------------------------------------- writing


def neutralise(cell: str) -> str:
    """Prefix a formula-like cell with a single quote (OWASP CSV injection); plain numbers such as -5 stay."""
    if cell.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def output_header(header: Sequence[str]) -> list[str]:
    """The input header plus the labeller's columns; a name already taken gets _2, _3 ... (never overwritten)."""
    taken = {name.strip().casefold() for name in header}
    added = []
    for name in OUTPUT_COLUMNS:
        candidate, n = name, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate.casefold())
        added.append(candidate)
    return list(header) + added


def header_bytes(header: Sequence[str]) -> bytes:
    """How every labelled CSV starts: the UTF-8 BOM (Excel reads the Chinese text right) and the output header."""
    return codecs.BOM_UTF8 + render_rows([output_header(header)])


def render_rows(rows: Sequence[Sequence[str]]) -> bytes:
    """CSV bytes (UTF-8, CRLF as RFC 4180 and Excel expect), every cell neutralised."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows([[neutralise(cell) for cell in row] for row in rows])
    # Input was decoded strictly and answers are decoded tokens, so nothing here is unencodable;
    # "replace" only guarantees a stray surrogate can never abort a run.
    return buffer.getvalue().encode("utf-8", errors="replace")
