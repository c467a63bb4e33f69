import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.families import CAUSAL, load_model
from finetune import merge

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nonzero_run(tmp_path_factory, tiny_base) -> Path:
    """A run dir whose adapter has random (non-zero) LoRA A and B, so merging really changes the logits."""
    run = tmp_path_factory.mktemp("merge") / "run"
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    model.save_pretrained(str(run / "adapter"), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_base)).save_pretrained(str(run / "adapter"))
    (run / "adapter" / "schema.json").write_text(json.dumps({"labels": ["水果"]}, ensure_ascii=False))
    (run / "train_config.json").write_text(json.dumps({"base_model": str(tiny_base), "method": "lora"}))
    return run


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("dtype, atol", [("fp32", 1e-4), ("fp16", 0.05)])
def test_merged_logits_equal_adapter_logits(nonzero_run, tiny_base, tmp_path, dtype, atol):
    out = merge.main(["--run", str(nonzero_run), "--output-dir", str(tmp_path / "m"), "--dtype", dtype])
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.encode("Instruction: 判断\nInput: 类别\n\n苹果很甜。\nAnswer: ", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    base_logits = logits(base, ids)
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(nonzero_run / "adapter")
    )
    adapter_logits = logits(adapter.eval(), ids)
    merged = load_model(out, CAUSAL, torch_dtype=torch.float32)
    merged_logits = logits(merged, ids)
    assert (adapter_logits - base_logits).abs().max() > 20 * atol  # the adapter matters, so the check can fail
    assert torch.allclose(merged_logits, adapter_logits, atol=atol)
    tensors = load_file(str(out / "model.safetensors"))
    assert not any("lora" in key for key in tensors)
    expected = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    assert all(t.dtype == expected for t in tensors.values())
    assert json.loads((out / "schema.json").read_text())["labels"] == ["水果"]


def test_merge_twice_is_harmless(nonzero_run, tmp_path):
    target = tmp_path / "m"
    merge.main(["--run", str(nonzero_run), "--output-dir", str(target)])
    first = load_file(str(target / "model.safetensors"))
    merge.main(["--run", str(nonzero_run), "--output-dir", str(target)])
    second = load_file(str(target / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old dirs left


def kill_mid_merge(run: Path, target: Path) -> None:
    """Start a merge and SIGKILL it as soon as its temporary output dir appears."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune.merge", "--run", str(run), "--output-dir", str(target)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(target.parent.glob(target.name + merge.TMP_MARK + "*")):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.002)
    proc.kill()
    pytest.fail("the merge finished before it could be killed mid-write")


def test_kill_during_merge_leaves_no_half_written_model(nonzero_run, tmp_path):
    target = tmp_path / "m"
    kill_mid_merge(nonzero_run, target)
    assert not target.exists()  # nothing where the app looks for a model
    merge.main(["--run", str(nonzero_run), "--output-dir", str(target)])
    before = load_file(str(target / "model.safetensors"))
    kill_mid_merge(nonzero_run, target)
    after = load_file(str(target / "model.safetensors"))  # the previous model is intact
    assert all(torch.equal(before[k], after[k]) for k in before)
    merge.main(["--run", str(nonzero_run), "--output-dir", str(target)])  # and the next merge cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_merge_leaves_no_temporary_dir(nonzero_run, tmp_path, monkeypatch):
    target = tmp_path / "m"

    def diverges(*args, **kwargs):
        raise merge.MergeError("merged model differs from the adapter model")

    monkeypatch.setattr(merge, "check_saved", diverges)
    with pytest.raises(SystemExit, match="differs"):
        merge.main(["--run", str(nonzero_run), "--output-dir", str(target)])
    assert list(tmp_path.iterdir()) == []  # no merged_tmp_<pid>, no half a model


def test_a_model_moved_aside_by_a_killed_merge_is_put_back(nonzero_run, tmp_path):
    target = tmp_path / "m"
    merge.main(["--run", str(nonzero_run), "--output-dir", str(target)])
    before = load_file(str(target / "model.safetensors"))
    # A kill between replace_dir's two renames: the old model only exists as m_old_<pid>.
    target.rename(tmp_path / f"m{merge.OLD_MARK}12345")
    (tmp_path / f"m{merge.TMP_MARK}12345").mkdir()
    merge.recover_or_clean(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    after = load_file(str(target / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_names_a_run_that_is_not_one(tmp_path):
    with pytest.raises(SystemExit, match="no train_config.json"):
        merge.main(["--run", str(tmp_path)])


def test_a_corrupt_train_config_is_named_not_a_traceback(nonzero_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").symlink_to(nonzero_run / "adapter")
    (run / "train_config.json").write_text('{"base_model": "/models/x", "meth')  # cut by a full disk
    with pytest.raises(SystemExit, match="train_config.json is unreadable or incomplete"):
        merge.main(["--run", str(run)])


def test_a_second_merge_into_the_same_folder_is_refused_naming_the_first(nonzero_run, tmp_path):
    from core.safe_io import OutputLock

    target = tmp_path / "m"
    with OutputLock(target, "finetune.merge"), pytest.raises(SystemExit, match=f"pid {os.getpid()}"):
        merge.main(["--run", str(nonzero_run), "--output-dir", str(target)])
    assert not target.exists()


def test_merge_checks_its_output_folder_before_loading_the_models(nonzero_run, readonly_dir):
    with pytest.raises(SystemExit, match="--output-dir: cannot write in .*readonly"):
        merge.main(["--run", str(nonzero_run), "--output-dir", str(readonly_dir / "m")])


def test_weight_bytes_counts_parameters_at_the_output_dtype(tiny_base):
    tensors = load_file(str(tiny_base / "model.safetensors"))
    params = sum(t.numel() for t in tensors.values())
    assert merge.weight_bytes(tiny_base, "fp16") == 2 * params
    assert merge.weight_bytes(tiny_base, "fp32") == 4 * params
