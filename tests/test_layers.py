"""The layers of the project, read from every import (lazy ones inside functions too).

    core/          the shared ground: model families, CLI config, the dataset format, safe file writes
    finetune/      training, merging, tiny models, the demo          -> core (+ model only via sample_decode)
    model/         loading, prompting, constrained decoding, CLIs    -> core
    app_support/, pages/, app.py   the Streamlit app                 -> model, core

docs/ARCHITECTURE.md draws the same picture; this test keeps it true.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "finetune", "model", "app_support", "pages")
# The one place training code calls serving code: decoding a few dev rows at each evaluation, the way serving does.
FINETUNE_TO_MODEL_SEAM = "finetune/sample_decode.py"


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return "app" if rel.as_posix() == "app.py" else rel.parts[0]


def imported_layers(path: Path) -> set[str]:
    """The project packages a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def violations(files: list[Path]) -> list[str]:
    forbidden = {
        "core": {"finetune", "model", "app_support", "pages"},
        "model": {"finetune", "app_support", "pages"},
        "app_support": {"finetune", "pages"},
        "pages": {"finetune"},
        "app": {"finetune"},
        "finetune": {"app_support", "pages"},
    }
    found = []
    for path in files:
        layer = layer_of(path)
        bad = imported_layers(path) & forbidden.get(layer, set())
        if layer == "finetune" and "model" in imported_layers(path):
            if path.relative_to(ROOT).as_posix() != FINETUNE_TO_MODEL_SEAM:
                bad.add("model")
        found += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(bad)]
    return found


def project_files() -> list[Path]:
    files = [ROOT / "app.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def test_no_layer_imports_upward():
    files = project_files()
    assert len(files) > 40, "the walk found the project's modules"
    assert violations(files) == []


def test_the_check_sees_lazy_and_upward_imports(tmp_path, monkeypatch):
    """A lazy `from model import ...` inside a core function, and a finetune module other than the seam
    reaching model, are both reported."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "core").mkdir()
    (tmp_path / "finetune").mkdir()
    core_file = tmp_path / "core" / "x.py"
    core_file.write_text("import json\n\ndef f():\n    from model.predict import predict\n    return predict\n")
    seam = tmp_path / FINETUNE_TO_MODEL_SEAM
    seam.write_text("from model.predict import predict\n")
    other = tmp_path / "finetune" / "train.py"
    other.write_text("import model.load\nfrom core.dataset import TASKS\n")
    assert violations([core_file, seam, other]) == ["core/x.py imports model", "finetune/train.py imports model"]
