"""tools.figures: every README demo figure is found once, compared with metrics.json and rewritten when asked."""

import json
import shutil

import pytest

from tools import figures


@pytest.fixture
def measured() -> dict[str, dict]:
    """Metrics as the two demo runs would write them, equal to what the README states now."""
    readme = figures.ROOT.joinpath("README.md").read_text(encoding="utf-8")
    runs: dict[str, dict] = {"demo": {"cls_n": 63}, "demo_no_negatives": {"cls_n": 63}}
    for figure in figures.FIGURES:
        stated = figures.locate(readme, figure).group(1)
        if figure.metric == "hallucinated_comments":
            continue
        runs[figure.run][figure.metric] = float(stated)
    return runs


def test_every_figure_is_stated_once_and_matches_what_was_measured(measured):
    readme = figures.ROOT.joinpath("README.md").read_text(encoding="utf-8")
    rows, updated = figures.compare(readme, measured)
    assert len(rows) == len(figures.FIGURES) and updated == readme
    assert all(stated == value for _, stated, value in rows)
    # The count follows the rate: 0.016 of 63 comments is 1.
    count = [value for figure, _, value in rows if figure.metric == "hallucinated_comments"]
    assert count == [str(round(measured["demo"]["hallucination_rate"] * 63))] * 2


def test_a_changed_metric_is_reported_and_written_into_the_readme(tmp_path, measured, capsys):
    readme = tmp_path / "README.md"
    shutil.copy(figures.ROOT / "README.md", readme)
    measured["demo"]["cls_accuracy"] = 0.8412
    measured["demo_no_negatives"]["hallucination_rate"] = 0.5
    for run, metrics in measured.items():
        (tmp_path / run / "merged").mkdir(parents=True)
        (tmp_path / run / "merged" / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    argv = ["--runs-dir", str(tmp_path), "--reuse", "--readme", str(readme)]
    assert figures.main(argv) == 1
    out = capsys.readouterr().out
    assert "CHANGED  demo               cls_accuracy           README 0.730  measured 0.841" in out
    assert "4 of 24 README figures changed" in out
    assert readme.read_bytes() == (figures.ROOT / "README.md").read_bytes(), "no --write: README untouched"
    assert figures.main([*argv, "--write"]) == 0
    text = readme.read_text(encoding="utf-8")
    assert "on the dev set it reaches category accuracy 0.841" in text and "类别准确率 0.841" in text
    assert "hallucination rate 0.500 (every comment" in text
    assert figures.main(argv) == 0, "after --write every figure is the measured one"


def test_an_edited_sentence_is_noticed_before_any_training(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("category accuracy about 0.7\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected once"):
        figures.main(["--runs-dir", str(tmp_path / "runs"), "--readme", str(readme)])
    assert not (tmp_path / "runs").exists()
