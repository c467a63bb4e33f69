"""model.label_ray: CSV files labelled on Ray Data into a folder of block CSVs, resumable after a kill.

The folder logic (plan, checks, resume, tidy, manifest) runs first with a serial stand-in for Ray and the fast
fake predictor; then the real thing: `python -m model.label --engine ray` with 2 CPU actors on the tiny merged
model, against the single-process CLI, killed halfway and rerun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model import label_ray
from model.csv_file import LabelError
from model.label import main as label_main
from model.label_ray import CHECKS, MANIFEST, RayLabelConfig, label_block, label_files
from tests.model.test_label import fake_predict, read_output, run, write_csv
from tests.model.texts import gbk_encodable_texts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gbk_texts(data_dir) -> list[str]:
    """Reference sentences (train and dev) that GBK can encode, so any of them can go into a GBK file."""
    return gbk_encodable_texts(data_dir, ("train", "dev"))


ENCODINGS = ("utf-8", "gbk", "utf-8-sig", "gbk")


def write_dump(folder: Path, texts: list[str], files: int, rows: int) -> list[Path]:
    """`files` CSVs of `rows` rows each, in the encodings above by turn; with an empty comment, a formula-like
    cell and a comment holding a comma, a quote and a newline, as real dumps have."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        table = [["id", "comment", "note"]]
        for i in range(rows):
            n = f * rows + i
            text = texts[n % len(texts)]
            if n % 101 == 7:
                text = ""
            elif n % 101 == 8:
                text = f'他说，"好"\n{text}'
            table.append([str(n), text, "=SUM(A1)" if n % 97 == 0 else ""])
        paths.append(write_csv(folder / f"dump_{f}.csv", table, ENCODINGS[f % len(ENCODINGS)]))
    return paths


def data_rows(path: Path) -> list[list[str]]:
    return read_output(path)[1:]


def blocks_of(out_dir: Path, name: str) -> list[Path]:
    return sorted(out_dir.glob(f"{name}.part-*.csv"))


def visible(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------- the folder logic, without Ray


class SerialRay:
    """Stands in for run_on_ray: the blocks in order in this process; `stop_after` blocks, then a 'kill'."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.labelled: list[str] = []

    def __call__(self, cfg, out_dir, todo, log, show_bar):
        for task in todo:
            if self.stop_after is not None and len(self.labelled) == self.stop_after:
                raise KeyboardInterrupt
            label_block(out_dir, task, fake_predict, cfg, log)
            self.labelled.append(task.file)
        return cfg


def serial_run(monkeypatch, tmp_path, input_spec, out_dir, stop_after=None, **options):
    engine = SerialRay(stop_after)
    monkeypatch.setattr(label_ray, "run_on_ray", engine)
    messages: list[str] = []
    cfg = RayLabelConfig(model=str(tmp_path / "model"), input=str(input_spec), output=str(out_dir), **options)
    try:
        result = label_files(cfg, log=messages.append, show_bar=False)
    except KeyboardInterrupt:
        result = None
    return result, engine, messages


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """What check_model_dir wants to see; the fake predictor never reads it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"0")
    (folder / "schema.json").write_text('{"labels": [], "predicates": []}', encoding="utf-8")
    return folder


def test_blocks_hold_what_the_single_process_cli_writes(monkeypatch, tmp_path, fake_model, gbk_texts):
    inputs = write_dump(tmp_path / "in", gbk_texts, files=3, rows=70)
    result, engine, _ = serial_run(monkeypatch, tmp_path, tmp_path / "in", tmp_path / "out",
                                   block_rows=20, chunk_rows=10)
    assert (result.files, result.blocks, result.rows) == (3, 12, 210)
    for path in inputs:
        single, _ = run(tmp_path, path, name=f"single_{path.stem}.csv", chunk_rows=10)
        parts = blocks_of(tmp_path / "out", path.stem)
        assert len(parts) == 4
        assert all(read_output(p)[0] == read_output(single.output)[0] for p in parts), "each block has the header"
        assert [row for p in parts for row in data_rows(p)] == data_rows(single.output)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text(encoding="utf-8"))
    assert [Path(f["input"]).name for f in manifest["inputs"]] == [p.name for p in inputs]
    assert [f["encoding"] for f in manifest["inputs"]] == ["utf-8-sig", "gb18030", "utf-8-sig"]
    first = manifest["inputs"][0]
    assert [b["file"] for b in first["blocks"]] == [f"dump_0.part-0000{i}.csv" for i in range(4)]
    assert [b["first_row"] for b in first["blocks"]] == [0, 20, 40, 60]
    assert manifest["rows"] == 210 and manifest["error_rows"] == result.error_rows == 3  # empty: rows 7, 108, 209


def test_a_killed_run_resumes_keeping_finished_blocks_and_ends_identical(monkeypatch, tmp_path, fake_model,
                                                                          gbk_texts):
    write_dump(tmp_path / "in", gbk_texts, files=2, rows=50)
    options = {"block_rows": 20, "chunk_rows": 10}
    serial_run(monkeypatch, tmp_path, tmp_path / "in", tmp_path / "whole", **options)
    out = tmp_path / "out"
    _, killed, _ = serial_run(monkeypatch, tmp_path, tmp_path / "in", out, stop_after=2, **options)
    assert killed.labelled == ["dump_0.part-00000.csv", "dump_0.part-00001.csv"]
    assert visible(out) == killed.labelled, "no manifest and no partial block before the run is complete"
    stamps = {name: (out / name).stat().st_mtime_ns for name in killed.labelled}
    result, rerun, messages = serial_run(monkeypatch, tmp_path, tmp_path / "in", out, **options)
    assert "2 block(s) done already, kept" in messages[0]
    assert rerun.labelled == ["dump_0.part-00002.csv", *(f"dump_1.part-0000{i}.csv" for i in range(3))]
    assert {name: (out / name).stat().st_mtime_ns for name in killed.labelled} == stamps, "not rewritten"
    assert result.resumed_blocks == 2
    assert visible(out) == visible(tmp_path / "whole")
    for name in visible(out):
        if name != MANIFEST:
            assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert strip(json.loads((out / MANIFEST).read_text())) == strip(json.loads((tmp_path / "whole" / MANIFEST)
                                                                              .read_text()))


def test_a_damaged_block_or_changed_settings_are_labelled_again(monkeypatch, tmp_path, fake_model, gbk_texts):
    write_dump(tmp_path / "in", gbk_texts, files=1, rows=60)
    out = tmp_path / "out"
    serial_run(monkeypatch, tmp_path, tmp_path / "in", out, block_rows=20, chunk_rows=10)
    good = (out / "dump_0.part-00001.csv").read_bytes()
    (out / "dump_0.part-00001.csv").write_bytes(good[:-5])  # a file cut short, e.g. copied back from a backup
    (out / ".dump_0.part-00002.csv.tmp-123-abcdef").write_bytes(b"half")  # what a kill mid-write leaves
    _, again, _ = serial_run(monkeypatch, tmp_path, tmp_path / "in", out, block_rows=20, chunk_rows=10)
    assert again.labelled == ["dump_0.part-00001.csv"]
    assert (out / "dump_0.part-00001.csv").read_bytes() == good
    assert not list(out.glob(".*.tmp-*")), "the temporary file a killed write left is removed"
    # Other settings: every block again, and the blocks of the old plan that the new one lacks are removed.
    _, changed, _ = serial_run(monkeypatch, tmp_path, tmp_path / "in", out, block_rows=40, chunk_rows=10)
    assert changed.labelled == ["dump_0.part-00000.csv", "dump_0.part-00001.csv"]
    assert visible(out) == ["dump_0.part-00000.csv", "dump_0.part-00001.csv", MANIFEST]
    assert sorted(p.name for p in (out / CHECKS).iterdir()) == ["dump_0.part-00000.json", "dump_0.part-00001.json"]
    assert sum(len(data_rows(p)) for p in blocks_of(out, "dump_0")) == 60


def test_a_folder_of_other_files_is_refused_and_kept(monkeypatch, tmp_path, fake_model, gbk_texts):
    write_dump(tmp_path / "in", gbk_texts, files=1, rows=5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.xlsx").write_bytes(b"mine")
    with pytest.raises(LabelError, match=r"holds files this command did not write \(report.xlsx\)"):
        serial_run(monkeypatch, tmp_path, tmp_path / "in", out)
    assert visible(out) == ["report.xlsx"]
    with pytest.raises(LabelError, match="is a file; --engine ray writes a folder"):
        serial_run(monkeypatch, tmp_path, tmp_path / "in", out / "report.xlsx")
    with pytest.raises(LabelError, match="matches files inside --output"):
        serial_run(monkeypatch, tmp_path, tmp_path / "in" / "*.csv", tmp_path / "in")


def test_a_second_run_on_the_same_folder_is_refused(monkeypatch, tmp_path, fake_model, gbk_texts):
    from core.safe_io import OutputLock

    write_dump(tmp_path / "in", gbk_texts, files=1, rows=5)
    with OutputLock(tmp_path / "out", "model.label --engine ray"):
        with pytest.raises(LabelError, match=r"out is being written by model.label --engine ray pid \d+"):
            serial_run(monkeypatch, tmp_path, tmp_path / "in", tmp_path / "out")


def test_a_bad_input_file_is_named_before_anything_is_labelled(monkeypatch, tmp_path, fake_model, gbk_texts):
    write_dump(tmp_path / "in", gbk_texts, files=2, rows=5)
    (tmp_path / "in" / "dump_1.csv").write_text("id,note\n1,x\n", encoding="utf-8")
    with pytest.raises(LabelError, match=r"dump_1.csv: no text column found; columns found: \['id', 'note'\]"):
        serial_run(monkeypatch, tmp_path, tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is created for a run that cannot start"


# ---------------------------------------------------------------- inputs, names, options, resources


def test_inputs_are_a_file_a_folder_or_a_glob(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.csv", "a.CSV", "notes.txt", ".hidden.csv"):
        (folder / name).write_text("comment\nx\n", encoding="utf-8")
    out = tmp_path / "out"
    assert [p.name for p in label_ray.resolve_inputs(str(folder), out)] == ["a.CSV", "b.csv"]
    assert [p.name for p in label_ray.resolve_inputs(str(folder / "*.txt"), out)] == ["notes.txt"]
    assert [p.name for p in label_ray.resolve_inputs(str(folder / "notes.txt"), out)] == ["notes.txt"]
    with pytest.raises(LabelError, match="no such file or folder"):
        label_ray.resolve_inputs(str(tmp_path / "nope"), out)
    with pytest.raises(LabelError, match="no CSV files found"):
        label_ray.resolve_inputs(str(folder / "*.tsv"), out)
    with pytest.raises(LabelError, match="object-storage URIs are not supported yet"):
        label_ray.resolve_inputs("s3://bucket/dumps/", out)


def test_inputs_with_the_same_name_get_distinct_block_names(tmp_path):
    files = [tmp_path / "2026-11" / "dump.csv", tmp_path / "2026-12" / "dump.csv", tmp_path / "other.csv"]
    assert label_ray.output_names(files[2:]) == ["other"]
    assert label_ray.output_names(files) == ["2026-11__dump.csv", "2026-12__dump.csv", "other.csv"]


def test_bad_options_are_reported_together(tmp_path):
    with pytest.raises(LabelError) as err:
        RayLabelConfig(model="m", input="in", output=str(tmp_path), actors=0, block_rows=100, chunk_rows=64,
                       min_confidence=-1)
    message = str(err.value)
    assert "--actors must be >= 1, got 0" in message
    assert "--block-rows (100) must be a multiple of --chunk-rows (64)" in message
    assert "--min-confidence must be a number >= 0" in message


@pytest.mark.parametrize("cluster,given,expected", [
    ({"CPU": 2.0}, {}, (0.0, 1, "cpu")),
    ({"CPU": 64.0, "GPU": 8.0}, {}, (1.0, 8, "cuda")),
    ({"CPU": 64.0, "GPU": 8.0}, {"gpus_per_actor": 2.0}, (2.0, 4, "cuda")),
    ({"CPU": 64.0, "GPU": 8.0}, {"gpus_per_actor": 0.0, "actors": 4}, (0.0, 4, "cpu")),
    ({"CPU": 64.0, "GPU": 8.0}, {"actors": 20}, (1.0, 3, "cuda")),  # never more actors than blocks
])
def test_actors_and_gpus_follow_the_cluster(tmp_path, cluster, given, expected):
    cfg = RayLabelConfig(model="m", input="in", output=str(tmp_path), **given)
    resolved = label_ray.resolve_resources(cfg, cluster, blocks=3 if given.get("actors") == 20 else 100)
    assert (resolved.gpus_per_actor, resolved.actors, resolved.device) == expected


def test_the_cli_hands_engine_ray_to_label_ray(tmp_path, capsys):
    with pytest.raises(SystemExit):
        label_main(["--engine", "ray", "--help"])
    assert "--gpus-per-actor" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        label_main(["--engine=ray", "--model", str(tmp_path / "none"), "--input", str(tmp_path), "--output",
                    str(tmp_path / "out")])
    assert "no CSV files found" in str(err.value)


# ---------------------------------------------------------------- Ray itself, on the tiny model


FILES, ROWS, BLOCK_ROWS = 4, 500, 250  # 2,000 rows, 8 blocks


def ray_cmd(model: Path, inputs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "model.label", "--engine", "ray", "--model", str(model), "--input", str(inputs),
            "--output", str(out), "--actors", "2", "--block-rows", str(BLOCK_ROWS), "--chunk-rows", "250"]


def run_ray(model: Path, inputs: Path, out: Path) -> str:
    proc = subprocess.run(ray_cmd(model, inputs, out), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, gbk_texts, merged_model):
    """The 4 input files, each labelled by the single-process CLI (its entry point, --chunk-rows as Ray's),
    and one uninterrupted Ray run over their folder."""
    folder = tmp_path_factory.mktemp("ray")
    inputs = write_dump(folder / "in", gbk_texts, files=FILES, rows=ROWS)
    for path in inputs:
        label_main(["--model", str(merged_model), "--input", str(path), "--output", str(folder / "single" / path.name),
                    "--chunk-rows", "250"])
    run_ray(merged_model, folder / "in", folder / "ray")
    return folder


@pytest.mark.slow
def test_two_ray_actors_label_every_row_once_as_the_single_process_cli(dumps):
    out = dumps / "ray"
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["rows"] == FILES * ROWS
    assert [f["encoding"] for f in manifest["inputs"]] == ["utf-8-sig", "gb18030", "utf-8-sig", "gb18030"]
    ids = []
    for f in range(FILES):
        parts = blocks_of(out, f"dump_{f}")
        assert len(parts) == ROWS // BLOCK_ROWS
        rows = [row for p in parts for row in data_rows(p)]
        assert rows == data_rows(dumps / "single" / f"dump_{f}.csv"), f"dump_{f}: Ray and the CLI differ"
        ids += [row[0] for row in rows]
    assert sorted(ids, key=int) == [str(n) for n in range(FILES * ROWS)], "every row once"
    assert sum(1 for f in range(FILES) for p in blocks_of(out, f"dump_{f}") for row in data_rows(p)
               if row[-2] == "empty text") == manifest["error_rows"] > 0


@pytest.mark.slow
def test_ray_driver_killed_halfway_then_rerun_gives_the_same_folder(dumps, merged_model, tmp_path):
    out = tmp_path / "out"
    log = (tmp_path / "killed.log").open("w")
    child = subprocess.Popen(ray_cmd(merged_model, dumps / "in", out), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=log, start_new_session=True)
    checks, deadline = [], time.time() + 300
    try:
        while len(checks) < 2 and time.time() < deadline and child.poll() is None:
            time.sleep(0.1)
            checks = list((out / CHECKS).glob("*.json")) if (out / CHECKS).is_dir() else []
        os.kill(child.pid, signal.SIGKILL)  # the driver
        child.wait(timeout=30)
    finally:
        log.close()
        try:  # and what it started (Ray's processes share its session): a machine that went down
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert child.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    blocks = FILES * ROWS // BLOCK_ROWS
    done = sorted(p.name for p in out.glob("*.part-*.csv"))
    assert 2 <= len(done) < blocks, f"the kill was not halfway: {done}"
    assert visible(out) == done, "no manifest, no partial block: only finished blocks are visible"
    for name in done:  # each visible block is whole
        assert len(data_rows(out / name)) == BLOCK_ROWS
    checked = {p.stem: (out / f"{p.stem}.csv").stat().st_mtime_ns for p in (out / CHECKS).glob("*.json")}
    stderr = run_ray(merged_model, dumps / "in", out)
    assert f"{len(checked)} block(s) done already, kept" in stderr, stderr[-2000:]
    assert f"{blocks - len(checked)} block(s) labelled now" in stderr, "finished blocks are not labelled again"
    assert {name: (out / f"{name}.csv").stat().st_mtime_ns for name in checked} == checked
    assert visible(out) == visible(dumps / "ray") and not list(out.glob(".*.tmp-*"))
    for name in visible(out):
        if name != MANIFEST:
            assert (out / name).read_bytes() == (dumps / "ray" / name).read_bytes(), name
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert strip(json.loads((out / MANIFEST).read_text())) == strip(json.loads((dumps / "ray" / MANIFEST).read_text()))
