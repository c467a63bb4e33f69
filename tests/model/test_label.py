"""model.label: encodings, column choice, spreadsheet safety, bad rows, streaming memory and kill/resume.

Most tests drive `label_csv` / `main` with `fake_predict`, a fast deterministic stand-in for the model,
because what is tested here (reading, writing, resuming) does not depend on the model. One test runs
the real CLI on the tiny merged model.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from model import resume
from model.csv_file import FORMULA_PREFIXES, LabelError
from model.label import LabelConfig, label_csv, main
from model.parsing import Triple
from tests.model.texts import gbk_encodable_texts

ROOT = Path(__file__).resolve().parents[2]
LABELS = ("水果", "衣服", "酒店", "书籍")
# A GBK comment that charset-normalizer ranks as Korean cp949 first when it is alone in a file.
KOREAN_LOOKING_GBK = "二点卷蛾是卷蛾科鳞翅目昆虫，分布于黑龙江，吉林，欧洲。"


@dataclass
class FakePrediction:
    text: str
    category: str | None = None
    triples: list[Triple] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


def fake_predict(texts: list[str]) -> list[FakePrediction]:
    """Deterministic stand-in for model.predict: the label and triple depend only on the text.

    "BOOM" in a text makes the whole call raise (a row that crashes the model); "=CMD" makes the
    answer itself formula-like; texts over 500 characters get a warning as predict's truncation does."""
    if any("BOOM" in t for t in texts):
        raise RuntimeError("model exploded")
    preds = []
    for raw in texts:
        text = raw.strip()
        category = "=CMD()" if "=CMD" in text else LABELS[sum(map(ord, text)) % len(LABELS)]
        triple = Triple(text[:2], "作者", text[-2:], "人物", "图书作品")
        warnings = [f"text cut to its first 500 of {len(text)} characters"] if len(text) > 500 else []
        preds.append(FakePrediction(text, category, [triple], warnings))
    return preds


class Recorder:
    """fake_predict that remembers every text it was asked about, and can fail on chosen calls."""

    def __init__(self, interrupt_on_call: int | None = None):
        self.texts: list[str] = []
        self.calls = 0
        self.interrupt_on_call = interrupt_on_call

    def __call__(self, texts: list[str]) -> list[FakePrediction]:
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run; must not be swallowed as a bad row
        self.texts.extend(texts)
        return fake_predict(texts)


def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


def read_output(path: Path) -> list[list[str]]:
    raw = path.read_bytes()
    assert raw.startswith(codecs.BOM_UTF8), "output must start with a UTF-8 BOM for Excel"
    return list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))


def by_name(table: list[list[str]]) -> list[dict[str, str]]:
    """The data rows of a read_output table as {column name: cell}."""
    return [dict(zip(table[0], row, strict=True)) for row in table[1:]]


def run(tmp_path: Path, input_path: Path, predict_fn=fake_predict, name: str = "out.csv", **options):
    cfg = LabelConfig(model="unused", input=str(input_path), output=str(tmp_path / name), **options)
    messages: list[str] = []
    result = label_csv(cfg, predict_fn, log=messages.append, show_bar=False)
    return result, messages


@pytest.fixture(scope="module")
def dev_texts(data_dir) -> list[str]:
    """Dev sentences that GBK can encode (so the same rows can be written in all three encodings)."""
    return gbk_encodable_texts(data_dir, ("dev",))


# ---------------------------------------------------------------- encodings and columns


def test_utf8_bom_and_gbk_inputs_give_identical_output(tmp_path, dev_texts):
    rows = [["id", "comment"]] + [[str(i), text] for i, text in enumerate(dev_texts[:30])]
    outputs = {}
    for encoding in ("utf-8", "utf-8-sig", "gbk"):
        src = write_csv(tmp_path / f"in_{encoding}.csv", rows, encoding)
        result, _ = run(tmp_path, src, name=f"out_{encoding}.csv")
        outputs[encoding] = result.output.read_bytes()
        assert result.encoding == ("gb18030" if encoding == "gbk" else "utf-8-sig")
    assert outputs["utf-8"] == outputs["utf-8-sig"] == outputs["gbk"]
    table = read_output(tmp_path / "out_gbk.csv")
    assert table[0] == ["id", "comment", "category", "category_confidence", "triples", "error", "warnings"]
    assert [r[1] for r in table[1:]] == dev_texts[:30]  # decoded right, not just consistently wrong


def test_short_gbk_file_is_not_read_as_korean(tmp_path):
    src = write_csv(tmp_path / "one.csv", [["评论"], [KOREAN_LOOKING_GBK]], "gbk")
    result, _ = run(tmp_path, src)
    assert result.encoding == "gb18030"
    assert read_output(result.output)[1][0] == KOREAN_LOOKING_GBK


def test_encoding_is_detected_from_bytes_not_extension(tmp_path):
    src = write_csv(tmp_path / "comments.txt", [["Text"], ["苹果很甜"]], "gbk")
    result, _ = run(tmp_path, src)
    assert read_output(result.output)[1][0] == "苹果很甜"


@pytest.mark.parametrize(
    ("header", "expected"),
    [(["id", "Comment", "x"], 1), (["编号", "评论"], 1), (["REVIEW", "text"], 1), (["内容", "句子"], 0)],
)
def test_text_column_found_by_name(tmp_path, header, expected):
    row = [f"值{i}" for i in range(len(header))]
    src = write_csv(tmp_path / "in.csv", [header, row])
    result, _ = run(tmp_path, src)
    assert result.column == header[expected]
    # The fake's triple quotes the first two characters of the labelled text.
    assert json.loads(by_name(read_output(result.output))[0]["triples"])[0]["subject"] == row[expected][:2]


def test_column_option_picks_any_column(tmp_path):
    src = write_csv(tmp_path / "in.csv", [["comment", "买家留言"], ["不是这个", "衣服很好看"]])
    result, _ = run(tmp_path, src, column="买家留言")
    assert result.column == "买家留言"
    assert json.loads(by_name(read_output(result.output))[0]["triples"])[0]["subject"] == "衣服"
    with pytest.raises(LabelError, match=r"no column 'nope'.*'comment', '买家留言'"):
        run(tmp_path, src, column="nope")


def test_no_text_column_error_lists_the_columns(tmp_path):
    src = write_csv(tmp_path / "in.csv", [["id", "留言", "score"], ["1", "好", "5"]])
    with pytest.raises(LabelError, match=r"no text column.*\['id', '留言', 'score'\].*--column"):
        run(tmp_path, src)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"comment,id\n", "header but no rows"), (b"\n\n\n", "no header row")],
)
def test_empty_csv_is_a_clear_error(tmp_path, content, message):
    src = tmp_path / "empty.csv"
    src.write_bytes(content)
    with pytest.raises(LabelError, match=message):
        run(tmp_path, src)
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("kind", ["random", "png", "utf16"])
def test_binary_file_is_a_clear_error_naming_it(tmp_path, kind, capsys):
    junk = {
        "random": random.Random(0).randbytes(5000),
        "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + random.Random(1).randbytes(300),
        "utf16": "comment\n苹果\n".encode("utf-16"),
    }[kind]
    src = tmp_path / "upload.csv"
    src.write_bytes(junk)
    with pytest.raises(SystemExit) as exc:
        main(["--model", "unused", "--input", str(src), "--output", str(tmp_path / "o.csv")], fake_predict)
    assert str(src) in str(exc.value) and "not a text CSV" in str(exc.value)


# ---------------------------------------------------------------- cells and rows


def test_formulas_are_neutralised_in_original_and_new_cells(tmp_path):
    src = write_csv(
        tmp_path / "in.csv",
        [["comment", "user", "score"], ['=HYPERLINK("http://x","点我")', "@admin", "-5"], ["=CMD 好吃", "-x", "3"]],
    )
    result, _ = run(tmp_path, src)
    table = read_output(result.output)
    assert table[1][:3] == ["'=HYPERLINK(\"http://x\",\"点我\")", "'@admin", "-5"]
    assert table[2][:4] == ["'=CMD 好吃", "'-x", "3", "'=CMD()"]
    assert all(not cell.startswith(FORMULA_PREFIXES) or cell.lstrip("-").isdigit() for r in table for cell in r)


def test_empty_rows_get_an_error_and_order_and_count_are_kept(tmp_path):
    rows = [["id", "comment"], ["1", "第一条"], ["2", ""], ["3", "   "], ["4", "第四条"], ["5"], ["6", "第六条", "x,y"]]
    src = write_csv(tmp_path / "in.csv", rows)
    recorder = Recorder()
    result, _ = run(tmp_path, src, predict_fn=recorder, chunk_rows=2)
    table = read_output(result.output)
    assert result.rows == 6 and len(table) == 7
    assert [r[0] for r in table[1:]] == ["1", "2", "3", "4", "5", "6"]
    errors = {r["id"]: r["error"] for r in by_name(table)}
    assert errors == {"1": "", "2": "empty text", "3": "empty text", "4": "", "5": "empty text", "6": ""}
    assert result.error_rows == 3
    assert all(t.strip() for t in recorder.texts), "empty texts must not reach the model"
    # A ragged row keeps its data (joined into the last column) and says so.
    assert table[6][1] == "第六条,x,y" and "3 fields" in by_name(table)[5]["warnings"]


def test_a_crashing_row_does_not_stop_the_run(tmp_path):
    texts = ["好吃", "BOOM 坏行", "很好", "不错"]
    src = write_csv(tmp_path / "in.csv", [["comment"]] + [[t] for t in texts])
    result, messages = run(tmp_path, src, chunk_rows=4)
    table = read_output(result.output)
    assert [r["error"] for r in by_name(table)] == ["", "prediction failed: RuntimeError: model exploded", "", ""]
    assert all(r["category"] in LABELS for r in by_name(table) if r["comment"] != "BOOM 坏行")
    assert any("retrying one text at a time" in m for m in messages)


def test_long_text_warning_is_surfaced_without_error(tmp_path):
    src = write_csv(tmp_path / "in.csv", [["comment"], ["长" * 600]])
    table = read_output(run(tmp_path, src)[0].output)
    assert by_name(table)[0]["error"] == "" and "text cut" in by_name(table)[0]["warnings"]


def test_classification_only_leaves_triples_blank(tmp_path):
    src = write_csv(tmp_path / "in.csv", [["comment"], ["苹果很甜"]])
    table = read_output(run(tmp_path, src, tasks="classification")[0].output)
    assert by_name(table)[0]["category"] in LABELS and by_name(table)[0]["triples"] == ""


def test_existing_output_column_names_are_not_overwritten(tmp_path):
    src = write_csv(tmp_path / "in.csv", [["comment", "category", "Error"], ["苹果", "金标", "e"]])
    table = read_output(run(tmp_path, src)[0].output)
    assert table[0] == ["comment", "category", "Error", "category_2", "category_confidence", "triples", "error_2",
                        "warnings"]
    assert table[1][:3] == ["苹果", "金标", "e"]


def test_bad_options_are_reported_together(tmp_path):
    with pytest.raises(LabelError) as exc:
        LabelConfig(model="m", input="a.csv", output="a.csv", batch_size=0, chunk_rows=0, tasks="summary")
    assert all(part in str(exc.value) for part in ("--batch-size", "--chunk-rows", "--tasks", "--output"))


# ---------------------------------------------------------------- resume, in process


def test_resume_after_interrupt_and_half_written_chunk_is_byte_identical(tmp_path):
    comments = ["" if i % 10 == 0 else f"第{i}条评论，很好" for i in range(50)]  # empty rows: errors on both sides
    src = write_csv(tmp_path / "in.csv", [["id", "comment"]] + [[str(i), c] for i, c in enumerate(comments)])
    reference, _ = run(tmp_path, src, name="ref.csv", chunk_rows=7)

    interrupted = Recorder(interrupt_on_call=4)  # three chunks (21 rows) done, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, src, predict_fn=interrupted, chunk_rows=7)
    out = tmp_path / "out.csv"
    assert not out.exists(), "no out.csv until the run is complete"
    state = json.loads(resume.progress_path(out).read_text(encoding="utf-8"))
    assert state["rows_done"] == 21
    # A kill while writing the next chunk leaves bytes past the recorded offset; more of them than the
    # rest of the run writes, so overwriting alone (without truncating) would leave some behind.
    with resume.partial_path(out).open("ab") as handle:
        handle.write(("99,半行垃圾\r\n" * 2000 + "100,").encode())

    resumed = Recorder()
    result, messages = run(tmp_path, src, predict_fn=resumed, chunk_rows=7)
    assert result.resumed_rows == 21 and any("resuming after 21 rows" in m for m in messages)
    assert resumed.texts == [c for c in comments[21:] if c], "finished rows must not be relabelled"
    assert out.read_bytes() == reference.output.read_bytes()
    assert result.error_rows == reference.error_rows == 5 and result.rows == 50
    assert not resume.partial_path(out).exists() and not resume.progress_path(out).exists()


def test_changed_input_or_settings_start_over(tmp_path):
    rows = [["comment"]] + [[f"评论{i}"] for i in range(20)]
    src = write_csv(tmp_path / "in.csv", rows)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, src, predict_fn=Recorder(interrupt_on_call=3), chunk_rows=5)
    write_csv(src, rows + [["新的一行"]])  # the user edited the file before rerunning
    result, messages = run(tmp_path, src, chunk_rows=5)
    assert result.resumed_rows == 0 and any("input file changed" in m for m in messages)
    assert result.output.read_bytes() == run(tmp_path, src, name="fresh.csv", chunk_rows=5)[0].output.read_bytes()

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, src, predict_fn=Recorder(interrupt_on_call=3), chunk_rows=5)
    result, messages = run(tmp_path, src, chunk_rows=5, tasks="classification")
    assert result.resumed_rows == 0 and any("settings changed" in m and "tasks" in m for m in messages)


# ---------------------------------------------------------------- 10,000 rows in a subprocess

# These runs go through label.main (the real CLI code: argument parsing, input checks, streaming,
# resume) in a child process, with fake_predict instead of the model: on 2 shared CPU cores the tiny
# model labels a few rows per second, so 10,000 rows x 2 tasks would take far longer than this file's
# ~60 s budget, and the model is irrelevant to memory and resume. The real model runs end to end below.
DRIVER = """
import importlib.util, os, resource, sys, time
spec = importlib.util.spec_from_file_location("label_fakes", sys.argv[1])
fakes = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = fakes
spec.loader.exec_module(fakes)
from model import label
delay, seen = float(os.environ.get("FAKE_DELAY", "0")), []
def predict(texts):
    time.sleep(delay)
    seen.extend(texts)
    return fakes.fake_predict(texts)
label.main(sys.argv[2:], predict_fn=predict)
print("predicted", len(seen), "maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
CHUNK = "250"


def big_csv(path: Path, n_rows: int) -> Path:
    """Rows of ~1 KB (a short comment and a long note), so holding all 10,000 would add >10 MB."""
    rng = random.Random(n_rows)
    chars = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "comment", "note"])
        for i in range(n_rows):
            comment = "".join(rng.choice(chars) for _ in range(rng.randint(5, 40)))
            writer.writerow([i, comment, "".join(rng.choice(chars) for _ in range(330))])
    return path


def driver_cmd(src: Path, out: Path) -> list[str]:
    args = ["--model", "unused", "--input", str(src), "--output", str(out), "--chunk-rows", CHUNK]
    return [sys.executable, "-c", DRIVER, __file__, *args]


def run_driver(src: Path, out: Path, delay: float = 0.0) -> tuple[int, int, str]:
    """(texts predicted, peak RSS in KiB of the child, stderr)."""
    env = {**os.environ, "FAKE_DELAY": str(delay)}
    proc = subprocess.run(driver_cmd(src, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    return int(words[words.index("predicted") + 1]), int(words[words.index("maxrss_kb") + 1]), proc.stderr


@pytest.fixture(scope="module")
def big_runs(tmp_path_factory):
    """An uninterrupted 10,000-row run (the reference for resume) and the peak memory of 1,000 vs 10,000."""
    folder = tmp_path_factory.mktemp("big")
    peaks = {}
    for n in (1_000, 10_000):
        src = big_csv(folder / f"in_{n}.csv", n)
        predicted, peaks[n], _ = run_driver(src, folder / f"out_{n}.csv")
        assert predicted == n
    return folder, peaks


def test_memory_is_flat_in_the_number_of_rows(big_runs):
    folder, peaks = big_runs
    assert peaks[10_000] <= peaks[1_000] * 1.10, f"peak RSS KiB: {peaks}"


def test_killed_run_resumes_to_identical_bytes(big_runs, tmp_path):
    folder, _ = big_runs
    src, out = folder / "in_10000.csv", tmp_path / "out.csv"
    progress = resume.progress_path(out)
    # Slow the fake so the kill lands mid-run: 40 chunks x 0.04 s.
    env = {**os.environ, "FAKE_DELAY": "0.04"}
    log = (tmp_path / "killed.log").open("w")  # a file, not a pipe nobody reads while the child runs
    child = subprocess.Popen(driver_cmd(src, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    done, deadline = 0, time.time() + 60
    try:
        while done < 2_500 and time.time() < deadline and child.poll() is None:
            time.sleep(0.01)
            try:
                done = json.loads(progress.read_text(encoding="utf-8"))["rows_done"]
            except (OSError, ValueError, KeyError):
                continue  # not written yet
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        log.close()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert 2_500 <= done < 10_000 and not out.exists()

    predicted, _, stderr = run_driver(src, out)
    resumed_after = json.loads(progress.read_text()) if progress.exists() else None
    assert resumed_after is None, "progress file must be removed at the end"
    assert "resuming after" in stderr
    assert predicted <= 10_000 - done, "rows finished before the kill were labelled again"
    assert out.read_bytes() == (folder / "out_10000.csv").read_bytes()


# ---------------------------------------------------------------- the real CLI on the tiny model


def test_cli_end_to_end_on_tiny_merged_model(merged_model, dev_texts, tmp_path):
    # The shortest dev sentences: generation time grows with the text (spans are copied from it).
    texts = sorted(set(dev_texts), key=len)[:20]
    src = write_csv(tmp_path / "dev.csv", [["序号", "句子"]] + [[str(i), t] for i, t in enumerate(texts)], "gbk")
    out = tmp_path / "labelled.csv"
    # Two chunks of one batch each: chunked writing with the real predictor, and fewer generate() calls
    # than the default batch size of 8 would make on 2 slow cores.
    options = ["--input", str(src), "--output", str(out), "--chunk-rows", "10", "--batch-size", "10"]
    cmd = [sys.executable, "-m", "model.label", "--model", str(merged_model), *options]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    schema = json.loads((Path(merged_model) / "schema.json").read_text(encoding="utf-8"))
    table = read_output(out)
    assert table[0] == ["序号", "句子", "category", "category_confidence", "triples", "error", "warnings"]
    assert [r[1] for r in table[1:]] == texts
    n_triples = 0
    for row in by_name(table):
        assert row["error"] == "", row
        assert row["category"] in schema["labels"], "the category must be a trained label"
        assert 0 < float(row["category_confidence"]) <= 1
        for triple in json.loads(row["triples"]):
            assert list(triple) == ["predicate", "object_type", "subject_type", "object", "subject", "confidence"]
            assert triple["predicate"] in schema["predicates"]
            assert triple["subject"] in row["句子"] and triple["object"] in row["句子"], "spans come from the text"
            assert 0 <= triple["confidence"] <= 1
            n_triples += 1
    assert n_triples > 0, "the tiny model gives triples, so the filter below has something to drop"
    # No confidence reaches 1.01: every triple is dropped, the category and its confidence stay.
    strict = tmp_path / "strict.csv"
    cmd = [sys.executable, "-m", "model.label", "--model", str(merged_model), *options[:2], "--output", str(strict),
           *options[4:], "--min-confidence", "1.01"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    filtered = by_name(read_output(strict))
    assert [r["triples"] for r in filtered] == ["[]"] * len(texts)
    assert [(r["category"], r["category_confidence"]) for r in filtered] == [
        (r["category"], r["category_confidence"]) for r in by_name(table)]
