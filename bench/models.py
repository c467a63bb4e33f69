"""One trained tiny model per family, built once and reused by every benchmark run that asks for it.

    python -m bench.models causal|chatglm_v1|chatglm2|qwen3 [--data-dir data] [--root runs/bench/models] [--rebuild]

The labelling benchmarks need a model that answers in the training format and stops, or the tutorial's
unconstrained way would run to its 300-token limit on every answer and the ratio would flatter us. A
briefly trained model is that. Training one costs minutes, so it is done once per family and kept at
ROOT/FAMILY/FAMILY_merged with the recipe it was made by (recipe.json); a later run reuses it while the recipe is
the same, and trains again when the recipe changed or with --rebuild (`rm -rf runs/bench/models` works too).

Families (the base models are random, so every recipe is a full fine-tune: LoRA has nothing to adapt):
  causal      finetune.tiny (Llama, character tokenizer), the demo preset, as the CPU demo trains it
  chatglm_v1  the ChatGLM-6B test double (tests/doubles: THUDM-shaped remote code, sentencepiece
              tokenizer, 130,528-row vocabulary), loaded through trust_remote_code like a user's dir
  chatglm2    the ChatGLM2-6B test double (multi-query attention, [seq, batch, groups, dim] KV cache)
  qwen3       finetune.tiny --arch qwen3 (transformers' own Qwen3 at the causal model's widths), the demo
              preset: the modern lane (transformers 5) only
The ChatGLM doubles train fewer steps on shorter rows: their 130k-row (v1) output layer makes a CPU step
several times dearer than the causal model's, and the benchmark needs the answer shape, not accuracy.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FAMILIES = ("causal", "chatglm_v1", "chatglm2", "qwen3")
TINY_ARCH = {"causal": "llama", "qwen3": "qwen3"}  # families built by finetune.tiny
MERGED = {family: f"{family}_merged" for family in FAMILIES}
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights; a cached model is reused only if its recipe equals this one."""

    family: str
    train_args: tuple[str, ...]
    hidden_size: int = 0  # finetune.tiny families only; the doubles have their own fixed widths
    num_layers: int = 0
    intermediate_size: int = 0


_DOUBLE_ARGS = ("--config", "finetune/configs/demo_cpu.yaml", "--seed", "0", "--sample-decode", "16")

RECIPES = {
    "causal": Recipe("causal", ("--config", "finetune/configs/demo_cpu.yaml", "--seed", "0"),
                     hidden_size=128, num_layers=2, intermediate_size=256),
    "qwen3": Recipe("qwen3", ("--config", "finetune/configs/demo_cpu.yaml", "--seed", "0"),
                    hidden_size=128, num_layers=2, intermediate_size=256),
    # lens 128/64 keep most comments whole and the first triple of an answer; 300 steps reach eval loss ~1.1
    # and answers that stop (16 s of training on 2 cores).
    "chatglm2": Recipe("chatglm2", _DOUBLE_ARGS + ("--max-steps", "300", "--eval-steps", "300", "--learning-rate",
                                                  "0.003", "--max-source-len", "128", "--max-target-len", "64")),
    # v1's 130,528-row output layer makes each step ~6 s on 2 cores; fewer steps on shorter rows at a higher rate.
    "chatglm_v1": Recipe("chatglm_v1", _DOUBLE_ARGS + ("--max-steps", "240", "--eval-steps", "240",
                                                      "--learning-rate", "0.005", "--max-source-len", "96",
                                                      "--max-target-len", "48")),
}


def build_base(recipe: Recipe, out: Path, data_dir: str) -> Path:
    if recipe.family in TINY_ARCH:
        from finetune.tiny import TinyConfig, build_tiny

        return build_tiny(TinyConfig(output_dir=str(out), data_dir=data_dir, hidden_size=recipe.hidden_size,
                                     num_layers=recipe.num_layers, num_heads=max(1, recipe.hidden_size // 32),
                                     intermediate_size=recipe.intermediate_size, arch=TINY_ARCH[recipe.family]))
    from tests.doubles.build import build

    return build(recipe.family, out, Path(data_dir))


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def trained_model(family: str, data_dir: str = "data", root: str | Path = "runs/bench/models",
                  rebuild: bool = False, log=print) -> Path:
    """The merged model dir of FAMILY's recipe: reused from ROOT if it was made by the same recipe, else trained.

    Built under a side name and renamed into place, so a killed build never leaves a model that looks done.
    """
    from core.safe_io import OLD_MARK, TMP_MARK, recover_dir, replace_dir, side_dir

    if family not in RECIPES:
        raise SystemExit(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    recipe = RECIPES[family]
    target = Path(root) / family
    recover_dir(target, log=log)
    wanted = asdict(recipe) | {"data_dir": str(data_dir)}
    marker = target / "recipe.json"
    if not rebuild and marker.is_file() and (target / MERGED[family] / "schema.json").is_file():
        made = json.loads(marker.read_text(encoding="utf-8"))
        if made.get("recipe") == json.loads(json.dumps(wanted)):
            log(f"reusing the {family} model {target / MERGED[family]} (trained at commit {made.get('commit')}, "
                f"{made.get('train_seconds', 0):.0f} s; --rebuild or rm -rf {target} to train it again)")
            return target / MERGED[family]
    work = side_dir(target, TMP_MARK)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    log(f"training the {family} benchmark model once (kept at {target}; log: {target / 'train.log'})")
    merged = _train(recipe, work, data_dir)
    seconds = time.perf_counter() - started
    (work / "recipe.json").write_text(json.dumps({"recipe": wanted, "commit": commit(), "train_seconds": seconds},
                                                 indent=2), encoding="utf-8")
    # Only the merged model and the logs are kept; the run's checkpoints are tens of MB of no further use.
    shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)
    replace_dir(work, target, side_dir(target, OLD_MARK))
    log(f"trained the {family} model in {seconds:.0f} s")
    return target / Path(merged).relative_to(work)


def _train(recipe: Recipe, work: Path, data_dir: str) -> Path:
    from finetune import merge, train

    # Names unique per family: transformers imports a remote-code model's files as a module named after its
    # directory (transformers_modules/<dir name>/), so two families' dirs of one name would share code.
    base = build_base(recipe, work / f"{recipe.family}_base", data_dir)
    with (work / "train.log").open("w", encoding="utf-8") as handle, contextlib.redirect_stdout(handle):
        run = work / "run"
        train.main(["--base-model", str(base), "--data-dir", data_dir, "--output-dir", str(run), *recipe.train_args])
        out = work / MERGED[recipe.family]
        return Path(merge.main(["--run", str(run), "--dtype", "fp32", "--output-dir", str(out)]))


def main(argv=None) -> Path:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--root", default="runs/bench/models")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args(argv)
    merged = trained_model(args.family, args.data_dir, args.root, args.rebuild)
    print(merged)
    return merged


if __name__ == "__main__":
    main()
