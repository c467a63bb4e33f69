"""Training throughput: the ChatGLM-6B tutorial's fixed padding vs the project's training data path.

    python -m bench.train_throughput [--family causal|chatglm_v1|chatglm2] [--steps 28] [--rounds 4]

Both ways train the same tiny model with the same LoRA (finetune.train.build_model, settings from the
family's GPU preset: finetune/configs/chatglm6b_lora.yaml, chatglm2_lora.yaml for chatglm2), the same
AdamW, the same 902 tokenized training rows and the same number of optimizer steps, in one plain training
loop. The model: causal = finetune.tiny (Llama, --hidden-size/--num-layers); chatglm_v1 / chatglm2 = the
ChatGLM-6B / ChatGLM2-6B test doubles (tests/doubles: THUDM-shaped remote code and tokenizers, random
weights; v1 trains without an attention mask, as finetune.train does for it). Only padding and batching
differ:
  baseline  the tutorial (HarderThenHarder/transformers_tasks LLM/finetune): every row padded to
            400 prompt + 300 answer + 1 tokens, batch 1, shuffled, no accumulation (train.sh).
  ours      what finetune.train hands the Trainer: finetune.data.tokenize_examples rows,
            PadToLongestCollator, transformers' LengthGroupedSampler over batch_size * grad_accum
            rows (as Trainer._get_train_sampler builds it), batch_size and grad_accum from the yaml.
The steps run interleaved in rounds (and the first way alternates per round), so machine noise hits both
alike; the RATIO is the median of the rounds' ratios, printed with their spread. Real tokens are the
rows' own tokens (counted from the rows, not from a mask, which v1 does not get). Peak memory is measured
per way in a fresh subprocess (RSS; tracemalloc cannot see torch tensors). Final losses: the mean
training loss of the last round, and the loss of each final model on the same dev rows computed the same
way (padding does not change a row's loss; see the check).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import (
    current_rss_mb,
    machine_line,
    parse_checked,
    peak_rss_mb,
    print_comparison,
    refuse_invalid,
    set_threads,
    verdict,
)

TARGET_RATIO = 3.0
BASELINE, OURS = "baseline", "ours"
FAMILIES = ("causal", "chatglm_v1", "chatglm2")
# The family's GPU preset: the values a user trains that model with (batch size, accumulation, LoRA, lr).
PRESETS = {
    "causal": "finetune/configs/chatglm6b_lora.yaml",
    "chatglm_v1": "finetune/configs/chatglm6b_lora.yaml",
    "chatglm2": "finetune/configs/chatglm2_lora.yaml",
}


@dataclass
class BenchConfig:
    data_dir: str = "data"
    family: str = field(default="causal", metadata={"choices": list(FAMILIES)})
    train_config: str | None = None  # default: the family's preset (PRESETS)
    hidden_size: int = 256  # causal only: finetune.tiny's widths (the doubles have their own)
    num_layers: int = 4
    intermediate_size: int = 688
    # 28 steps of batch 4 x accumulation 2 = 224 rows = exactly one of the sampler's mega-batches
    # (min(902 // 32, 50) = 28 batches of 8), so "ours" sees a representative mix of lengths.
    steps: int = 28
    rounds: int = 4
    baseline_source_len: int = 400  # the tutorial's max_source_seq_len
    baseline_target_len: int = 300  # the tutorial's max_target_seq_len (+1 for eos, as it does)
    baseline_batch_size: int = 1
    dev_rows: int = 122
    seed: int = 0
    threads: int = 1  # torch intra-op threads; 0 = torch's default (see bench.common.set_threads)
    memory: bool = True
    base_dir: str | None = None  # reuse a built tiny base (the memory subprocesses get the parent's)
    memory_probe: str | None = None  # internal: run only a few steps of one way and print its memory
    memory_probe_steps: int = 2

    def validate(self) -> None:
        if self.train_config is None:
            self.train_config = PRESETS[self.family]
        problems = []
        if not (Path(self.data_dir) / "mixed_train_dataset.jsonl").is_file():
            problems.append(f"--data-dir {self.data_dir}: no mixed_train_dataset.jsonl (run `make data`)")
        if not Path(self.train_config).is_file():
            problems.append(f"--train-config {self.train_config}: not found")
        if self.steps < 1 or self.rounds < 1 or self.steps % self.rounds:
            problems.append(f"--steps ({self.steps}) must be a positive multiple of --rounds ({self.rounds})")
        if self.memory_probe not in (None, BASELINE, OURS):
            problems.append(f"--memory-probe must be {BASELINE} or {OURS}")
        refuse_invalid(problems)


def parse_args(argv=None) -> BenchConfig:
    return parse_checked(BenchConfig, argv, __doc__)


# --------------------------------------------------------------------------- setup (shared by both ways)


def make_base(cfg: BenchConfig, workdir: Path) -> Path:
    if cfg.base_dir:
        return Path(cfg.base_dir)
    if cfg.family != "causal":
        from tests.doubles.build import build

        return build(cfg.family, workdir / "base", Path(cfg.data_dir))
    from finetune.tiny import TinyConfig, build_tiny

    return build_tiny(
        TinyConfig(
            output_dir=str(workdir / "base"),
            data_dir=cfg.data_dir,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=max(1, cfg.hidden_size // 64),
            intermediate_size=cfg.intermediate_size,
        )
    )


def train_config_for(cfg: BenchConfig, base: Path, workdir: Path):
    """The project's TrainConfig with the GPU preset's values (batch size, accumulation, LoRA, lr)."""
    from core.config import load_yaml
    from finetune.train import TrainConfig

    values = load_yaml(cfg.train_config, TrainConfig)
    return TrainConfig(base_model=str(base), output_dir=str(workdir / "unused"), data_dir=cfg.data_dir, **values)


def build_lora_model(train_cfg, family, seed: int):
    """finetune.train.build_model in fp32 (CPU); the seed makes both ways start from identical LoRA weights."""
    import torch

    from finetune.train import build_model

    torch.manual_seed(seed)
    model = build_model(train_cfg, family, "fp32")
    model.train()
    return model


def make_optimizer(model, train_cfg):
    import torch

    # Constant lr (no schedule): both ways take the same steps, a schedule would not change the comparison.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)


# --------------------------------------------------------------------------- the two data paths


def pad_fixed(feature: dict, length: int, pad_token_id: int, with_mask: bool = True) -> dict:
    """The tutorial's convert_example: right-pad input_ids/labels to one fixed length, mask padding.

    with_mask=False for ChatGLM-6B v1, which builds its own mask from the ids (as finetune.train trains it).
    """
    import torch

    from core.families import IGNORE_INDEX

    ids, labels = list(feature["input_ids"])[:length], list(feature["labels"])[:length]
    pad = length - len(ids)
    batch = {
        "input_ids": torch.tensor([ids + [pad_token_id] * pad]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * pad]),
    }
    if with_mask:
        batch["attention_mask"] = torch.tensor([[1] * len(ids) + [0] * pad])
    return batch


def baseline_steps(train_set, cfg: BenchConfig, family, pad_token_id: int):
    """Yields one optimizer step's micro-batches as (batch, real tokens): batch 1, fixed length, shuffled."""
    import torch

    length = cfg.baseline_source_len + cfg.baseline_target_len + 1
    generator = torch.Generator().manual_seed(cfg.seed)
    while True:
        for i in torch.randperm(len(train_set), generator=generator).tolist():
            feature = train_set[i]
            batch = pad_fixed(feature, length, pad_token_id, family.attention_mask_in_training)
            yield [(batch, min(length, len(feature["input_ids"])))]


def ours_collator(family, pad_token_id: int):
    """finetune.train's collator, built with the same arguments."""
    from finetune.data import PadToLongestCollator

    return PadToLongestCollator(pad_token_id=pad_token_id, with_attention_mask=family.attention_mask_in_training)


def ours_steps(train_set, train_cfg, family, pad_token_id: int, seed: int):
    """Yields one optimizer step's micro-batches, as (batch, real tokens), as finetune.train's Trainer builds them."""
    import torch
    from torch.utils.data import DataLoader
    from transformers.trainer_pt_utils import LengthGroupedSampler

    collator = ours_collator(family, pad_token_id)
    # Trainer._get_train_sampler (transformers 4.33.3): LengthGroupedSampler(train_batch_size *
    # gradient_accumulation_steps, dataset=...), the dataloader then cuts it into per-device batches.
    sampler = LengthGroupedSampler(
        train_cfg.batch_size * train_cfg.grad_accum, dataset=train_set, generator=torch.Generator().manual_seed(seed)
    )
    def collate(features):
        return collator(features), sum(len(f["input_ids"]) for f in features)

    loader = DataLoader(train_set, batch_size=train_cfg.batch_size, sampler=sampler, collate_fn=collate)
    while True:
        micro = []
        for batch in loader:
            micro.append(batch)
            if len(micro) == train_cfg.grad_accum:
                yield micro
                micro = []


# --------------------------------------------------------------------------- training loop (identical for both)


@dataclass
class WayStats:
    seconds: float = 0.0
    steps: int = 0
    samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    losses: list = field(default_factory=list)

    def add(self, micro: list[tuple[dict, int]], seconds: float, loss: float) -> None:
        self.seconds += seconds
        self.steps += 1
        for batch, n_real in micro:
            self.samples += batch["input_ids"].shape[0]
            self.padded_tokens += batch["input_ids"].numel()
            self.real_tokens += n_real
        self.losses.append(loss)


def optimizer_step(model, optimizer, micro: list[tuple[dict, int]]) -> float:
    """One step over its micro-batches, the loss averaged as Trainer does with accumulation."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for batch, _ in micro:
        loss = model(**batch).loss / len(micro)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def warm_up(model, micro: list[dict]) -> None:
    """One untimed forward/backward so lazy initialisation is not billed to the first timed step."""
    for batch in micro:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def dev_loss(model, dev_set, family, pad_token_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean loss on the dev rows, padded to the longest per batch: the same for both models."""
    import torch

    from core.families import IGNORE_INDEX
    from finetune.data import PadToLongestCollator

    collator = PadToLongestCollator(pad_token_id=pad_token_id, with_attention_mask=family.attention_mask_in_training)
    total, n_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dev_set), batch_size):
            batch = collator(dev_set[start : start + batch_size])
            # HF's loss is the mean over predicted tokens (labels shifted by one): weight by their count.
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n
            n_tokens += n
    model.train()
    return total / max(1, n_tokens)


def padding_invariance(model, feature: dict, length: int, family, pad_token_id: int) -> float:
    """|loss(row padded to the fixed length) - loss(row alone)|: both ways optimise the same objective."""
    import torch

    with_mask = family.attention_mask_in_training
    model.eval()
    with torch.no_grad():
        alone = model(**pad_fixed(feature, len(feature["input_ids"]), pad_token_id, with_mask)).loss
        padded = model(**pad_fixed(feature, length, pad_token_id, with_mask)).loss
    model.train()
    return float((alone - padded).abs())


# --------------------------------------------------------------------------- main


def prepare(cfg: BenchConfig, workdir: Path):
    from core import dataset
    from core.families import family_of_dir, load_tokenizer
    from finetune import data as D

    base = make_base(cfg, workdir)
    train_cfg = train_config_for(cfg, base, workdir)
    family = family_of_dir(base)
    tokenizer = load_tokenizer(base, family)
    rows = dataset.load_split(cfg.data_dir, "train")
    train_set = D.tokenize_examples(rows, tokenizer, family, train_cfg.max_source_len, train_cfg.max_target_len)
    dev_rows = dataset.load_split(cfg.data_dir, "dev")[: cfg.dev_rows]
    dev_set = D.tokenize_examples(dev_rows, tokenizer, family, train_cfg.max_source_len, train_cfg.max_target_len)
    return base, train_cfg, family, tokenizer, train_set, dev_set


def memory_probe(cfg: BenchConfig) -> None:
    """Subprocess mode: peak RSS of a few steps of one way, printed as one JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        _, train_cfg, family, tokenizer, train_set, _ = prepare(cfg, Path(tmp))
        pad = tokenizer.pad_token_id
        model = build_lora_model(train_cfg, family, cfg.seed)
        optimizer = make_optimizer(model, train_cfg)
        stream = (
            baseline_steps(train_set, cfg, family, pad)
            if cfg.memory_probe == BASELINE
            else ours_steps(train_set, train_cfg, family, pad, cfg.seed)
        )
        before = current_rss_mb()
        # The sampler puts the longest batch first, so the first steps hold the largest activations.
        for _ in range(cfg.memory_probe_steps):
            optimizer_step(model, optimizer, next(stream))
        print(json.dumps({"way": cfg.memory_probe, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}))


def measure_memory(cfg: BenchConfig, base: Path) -> dict:
    out = {}
    for way in (BASELINE, OURS):
        args = [sys.executable, "-m", "bench.train_throughput", "--memory-probe", way, "--base-dir", str(base)]
        args += ["--family", cfg.family, "--data-dir", cfg.data_dir, "--train-config", cfg.train_config,
                 "--seed", str(cfg.seed), "--threads", str(cfg.threads)]
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        out[way] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    set_threads(cfg.threads)
    if cfg.memory_probe:
        memory_probe(cfg)
        return {}
    wall = time.perf_counter()
    print("resolved config:", json.dumps(asdict(cfg)), flush=True)
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base, train_cfg, family, tokenizer, train_set, dev_set = prepare(cfg, Path(tmp))
        pad = tokenizer.pad_token_id
        fixed_len = cfg.baseline_source_len + cfg.baseline_target_len + 1
        longest = max(len(f["input_ids"]) for f in train_set)
        if longest > fixed_len:
            raise SystemExit(f"a training row has {longest} tokens > the baseline's fixed {fixed_len}: not comparable")
        models = {way: build_lora_model(train_cfg, family, cfg.seed) for way in (BASELINE, OURS)}
        optimizers = {way: make_optimizer(models[way], train_cfg) for way in models}
        streams = {
            BASELINE: baseline_steps(train_set, cfg, family, pad),
            OURS: ours_steps(train_set, train_cfg, family, pad, cfg.seed),
        }
        trainable = sum(p.numel() for p in models[OURS].parameters() if p.requires_grad)
        total = sum(p.numel() for p in models[OURS].parameters())
        print(
            f"model: {cfg.family}, {total:,} params ({trainable:,} LoRA trainable), {len(train_set)} train rows, "
            f"{sum(len(f['input_ids']) for f in train_set) / len(train_set):.0f} tokens/row mean, {longest} max; "
            f"baseline: fixed {fixed_len} tokens x batch {cfg.baseline_batch_size}; "
            f"ours: pad-to-longest, length-grouped, batch {train_cfg.batch_size} x accumulation {train_cfg.grad_accum}",
            flush=True,
        )
        diff = padding_invariance(models[BASELINE], train_set[0], fixed_len, family, pad)
        print(f"padding check: |loss(row padded to {fixed_len}) - loss(row alone)| = {diff:.2e}", flush=True)
        # Same seed, same LoRA init: one evaluation stands for both starting points.
        initial_dev = dict.fromkeys(models, dev_loss(models[OURS], dev_set, family, pad))

        warm_up(models[BASELINE], [pad_fixed(train_set[0], fixed_len, pad, family.attention_mask_in_training)])
        warm_up(models[OURS], [ours_collator(family, pad)(train_set[: train_cfg.batch_size])])
        stats = {way: WayStats() for way in models}
        round_ratios = []  # per round: ours real tokens/s / baseline real tokens/s over that round's steps
        per_round = cfg.steps // cfg.rounds
        for r in range(cfg.rounds):
            order = (BASELINE, OURS) if r % 2 == 0 else (OURS, BASELINE)
            rate = {}
            for way in order:
                tokens, seconds = stats[way].real_tokens, stats[way].seconds
                for _ in range(per_round):
                    started = time.perf_counter()
                    micro = next(streams[way])
                    loss = optimizer_step(models[way], optimizers[way], micro)
                    stats[way].add(micro, time.perf_counter() - started, loss)
                rate[way] = (stats[way].real_tokens - tokens) / (stats[way].seconds - seconds)
            round_ratios.append(rate[OURS] / rate[BASELINE])
            line = "  ".join(f"{way} {rate[way]:,.0f} real tok/s" for way in (BASELINE, OURS))
            print(f"round {r + 1}/{cfg.rounds}: {line}  ratio {round_ratios[-1]:.2f}x", flush=True)
        final_dev = {way: dev_loss(models[way], dev_set, family, pad) for way in models}
        memory = measure_memory(cfg, base) if cfg.memory else {}

    results = {}
    for way in (BASELINE, OURS):
        s = stats[way]
        last = s.losses[-per_round:]
        results[way] = {
            "real_tokens_per_s": s.real_tokens / s.seconds,
            "samples_per_s": s.samples / s.seconds,
            "padding_fraction": 1 - s.real_tokens / s.padded_tokens,
            "seconds": s.seconds,
            "steps": s.steps,
            "samples": s.samples,
            "real_tokens": s.real_tokens,
            "train_loss_last_round": sum(last) / len(last),
            "dev_loss_initial": initial_dev[way],
            "dev_loss_final": final_dev[way],
            "peak_rss_mb": memory.get(way, {}).get("peak_rss_mb"),
            "rss_before_steps_mb": memory.get(way, {}).get("rss_before_mb"),
        }
    results["round_ratios"] = round_ratios
    results["family"] = cfg.family
    print_report(results, cfg)
    print(f"(whole benchmark: {time.perf_counter() - wall:.0f} s wall)")
    return results


def print_report(results: dict, cfg: BenchConfig) -> None:
    def mb(value):
        return "-" if value is None else f"{value:,.0f} MB"

    rows = [
        ("real tokens/s", "real_tokens_per_s", "{:,.0f}"),
        ("samples/s", "samples_per_s", "{:.2f}"),
        ("padding fraction", "padding_fraction", "{:.1%}"),
        ("optimizer steps", "steps", "{}"),
        ("samples trained", "samples", "{}"),
        ("timed seconds", "seconds", "{:.1f}"),
        ("train loss (last round)", "train_loss_last_round", "{:.4f}"),
        ("dev loss before", "dev_loss_initial", "{:.4f}"),
        ("dev loss after", "dev_loss_final", "{:.4f}"),
    ]
    table = [(label, fmt.format(results[BASELINE][key]), fmt.format(results[OURS][key])) for label, key, fmt in rows]
    table.append(("peak RSS (own subprocess)", mb(results[BASELINE]["peak_rss_mb"]), mb(results[OURS]["peak_rss_mb"])))
    print_comparison(table, 28, 16)
    ratios = results["round_ratios"]
    tok_ratio = statistics.median(ratios)
    overall = results[OURS]["real_tokens_per_s"] / results[BASELINE]["real_tokens_per_s"]
    sample_ratio = results[OURS]["samples_per_s"] / results[BASELINE]["samples_per_s"]
    print(f"\nRATIO train {results['family']} real tokens/s ours/baseline = {tok_ratio:.2f}x median of {len(ratios)} "
          f"rounds (spread {min(ratios):.2f}-{max(ratios):.2f}x, all steps {overall:.2f}x) "
          f"(target >= {TARGET_RATIO:.0f}x: {verdict(tok_ratio, TARGET_RATIO)}); samples/s {sample_ratio:.2f}x")
    if not math.isfinite(tok_ratio):
        raise SystemExit("non-finite ratio")


if __name__ == "__main__":
    main()
