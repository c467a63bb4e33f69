"""GPU benchmark: LoRA training and generation at ChatGLM-6B's size, in one command, no downloads.

    python -m bench.gpu.run_gpu_bench                          # random-weight 6B stand-in (Llama layout)
    python -m bench.gpu.run_gpu_bench --model-dir /path/to/chatglm-6b   # the real model (and data/)
    python -m bench.gpu.run_gpu_bench --dry-run                # the same code on a tiny model, on CPU

Measures, on one GPU:
  training    LoRA tokens/s and peak GPU memory at batch 1 and at the largest batch that fits
              (doubling, then bisection, until out of memory or --max-batch), through the project's
              own finetune.train.build_model (LoRA on the family's targets, the frozen base in
              bf16/fp16, gradient checkpointing, fp32 logits) and the yaml's LoRA settings;
  generation  greedy decode tokens/s at batch 1 and batched (KV cache), next to the memory-bandwidth
              bound at batch 1: every new token reads all weights once, so tokens/s <= bandwidth /
              weight bytes (--bandwidth-tbs, default 4.8 TB/s = H200 HBM3e).
The random-weight stand-in (see README.md for the mapping): Llama, hidden 4096, 28 layers, 32 heads
(full multi-head attention, head dim 128), vocab 130528, tied embeddings, SwiGLU intermediate 10944
(ChatGLM-6B's GELU MLP has 2 matrices of 4096 x 16384; SwiGLU has 3, so 2 * 16384 / 3 ~ 10923,
rounded to a multiple of 64 keeps the parameter count and FLOPs per token): 6.18e9 parameters, as
ChatGLM-6B. Speed of random weights equals speed of trained ones; only the numbers in them differ.
Import-safe on a machine without CUDA; nothing touches the GPU until main() runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from core.config import parse_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # also runnable as `python bench/gpu/run_gpu_bench.py`
    sys.path.insert(0, str(ROOT))

# ChatGLM-6B (v1) as a Llama config transformers 4.33.3 ships; --dry-run shrinks it.
STAND_IN = {
    "hidden_size": 4096,
    "num_hidden_layers": 28,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 10944,
    "vocab_size": 130528,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
DRY_RUN = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 176,
    "vocab_size": 1000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


@dataclass
class GpuBenchConfig:
    model_dir: str | None = None
    dry_run: bool = False
    data_dir: str = "data"  # real rows for --model-dir (its tokenizer); the stand-in uses random ids
    train_config: str = "finetune/configs/chatglm6b_lora.yaml"
    seq_len: int = 256  # training row length for the stand-in (ChatGLM-6B tokens: the data's rows are ~100-400)
    train_steps: int = 3  # timed steps per batch size (after one warm-up step)
    max_batch: int = 512
    prompt_len: int = 128
    gen_tokens: int = 128
    gen_batches: str = "1,8,32,128"
    bandwidth_tbs: float = 4.8
    time_budget_s: float = 540.0  # stop searching bigger batches past this (the command must end < 10 min)
    output: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dry_run:
            # Small enough for 2 CPU cores in well under a minute; the same code path.
            self.seq_len, self.max_batch, self.train_steps = min(self.seq_len, 64), min(self.max_batch, 4), 1
            self.prompt_len, self.gen_tokens, self.gen_batches = 16, 8, "1,4"

    def batches(self) -> list[int]:
        return [int(b) for b in self.gen_batches.split(",") if b.strip()]


def parse_args(argv=None) -> GpuBenchConfig:
    return parse_config(GpuBenchConfig, argv, __doc__)


# --------------------------------------------------------------------------- setup


def pick_device(cfg: GpuBenchConfig):
    import torch

    if cfg.dry_run:
        torch.set_num_threads(1)  # small shared CPU boxes: see bench.common.set_threads
        return torch.device("cpu"), torch.float32, "fp32"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run to exercise the code on CPU")
    if torch.cuda.is_bf16_supported():
        return torch.device("cuda"), torch.bfloat16, "bf16"
    return torch.device("cuda"), torch.float16, "fp16"


def random_model(cfg: GpuBenchConfig, device, dtype):
    """A random-weight Llama of ChatGLM-6B's size, built directly on the device in the half dtype."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(**(DRY_RUN if cfg.dry_run else STAND_IN), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never materialise 25 GB of fp32 first
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def train_config(cfg: GpuBenchConfig, base_model: str):
    from core.config import load_yaml
    from finetune.train import TrainConfig

    values = load_yaml(ROOT / cfg.train_config, TrainConfig)
    return TrainConfig(base_model=base_model, output_dir="unused", data_dir=cfg.data_dir, **values)


def lora_model(cfg: GpuBenchConfig, base, family, precision: str, model_dir: str | None, device):
    """finetune.train.build_model, the project's code: for the stand-in it gets the in-memory model
    instead of loading a directory (its only disk access is that load_model call)."""
    from finetune import train

    tcfg = train_config(cfg, model_dir or "in-memory")
    tcfg.gradient_checkpointing = None if not cfg.dry_run else True  # on for GPU (default); forced on CPU
    if model_dir is None:
        original = train.load_model
        train.load_model = lambda *args, **kwargs: base
        try:
            model = train.build_model(tcfg, family, precision)
        finally:
            train.load_model = original
    else:
        model = train.build_model(tcfg, family, precision)  # loads on the CPU, as from_pretrained does
    return model.to(device).train(), tcfg


# --------------------------------------------------------------------------- training


def stand_in_batch(cfg: GpuBenchConfig, vocab: int, batch: int, device):
    """Random rows of seq_len tokens; the first 60% are the prompt (-100 labels), as in the data."""
    import torch

    ids = torch.randint(10, vocab, (batch, cfg.seq_len), device=device)
    labels = ids.clone()
    labels[:, : int(cfg.seq_len * 0.6)] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}, ids.numel()


def real_batches(cfg: GpuBenchConfig, tokenizer, family, tcfg):
    """A batch maker over the real training rows, median-length rows first, padded as the collator does."""
    from core import dataset
    from finetune import data as D

    rows = dataset.load_split(cfg.data_dir, "train")
    feats = D.tokenize_examples(rows, tokenizer, family, tcfg.max_source_len, tcfg.max_target_len)
    feats.sort(key=lambda f: len(f["input_ids"]))
    mid = len(feats) // 2
    collator = D.PadToLongestCollator(tokenizer.pad_token_id, with_attention_mask=family.attention_mask_in_training)

    def make(batch: int, device):
        lo = max(0, mid - batch // 2)
        chosen = [feats[(lo + i) % len(feats)] for i in range(batch)]
        real = sum(len(f["input_ids"]) for f in chosen)
        return {k: v.to(device) for k, v in collator(chosen).items()}, real

    return make


def time_training(model, optimizer, make_batch, batch: int, steps: int, device, dtype, autocast: bool) -> dict:
    """Warm-up step + `steps` timed steps; real tokens/s and peak memory of this batch size."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    data, real = make_batch(batch, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model(**data).loss
        loss.backward()
        optimizer.step()
        return loss

    step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"batch": batch, "tokens_per_step": real, "tokens_per_s": real / seconds, "step_s": seconds,
            "peak_gib": peak, "loss": float(loss.detach())}


def free_memory(model) -> None:
    import gc

    import torch

    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def unless_oom(model, step):
    """step()'s result, or None after freeing memory when it ran out of (GPU) memory; other errors propagate."""
    import torch

    try:
        return step()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
    # Outside the except block, so the traceback no longer pins the failed step's tensors.
    free_memory(model)
    return None


def search_batches(cfg: GpuBenchConfig, model, optimizer, make_batch, device, dtype, autocast, started) -> list:
    """Batch 1, then doubling until OOM / --max-batch / the time budget, then bisection to the largest fit."""

    results, good, bad = [], 0, None
    batch = 1
    while batch <= cfg.max_batch and time.perf_counter() - started < cfg.time_budget_s:
        r = unless_oom(
            model,
            lambda b=batch: time_training(model, optimizer, make_batch, b, cfg.train_steps, device, dtype, autocast),
        )
        if r is None:
            print(f"  batch {batch}: out of memory", flush=True)
            bad = batch
        else:
            results.append(r)
            good = batch
            print(f"  batch {batch}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_s']:.2f} s, "
                  f"peak {fmt_gib(r['peak_gib'])}", flush=True)
        if bad is None:
            batch *= 2
        elif bad - good <= max(1, good // 8):  # within 12.5%: close enough, and saves minutes
            break
        else:
            batch = (good + bad) // 2
    return results


# --------------------------------------------------------------------------- generation


def time_generation(model, cfg: GpuBenchConfig, batch: int, vocab: int, device, prompt_ids=None,
                    pass_mask: bool = True) -> dict:
    """Greedy decode of exactly gen_tokens new tokens per row (min = max), KV cache on."""
    import torch

    if prompt_ids is None:
        prompt = torch.randint(10, vocab, (batch, cfg.prompt_len), device=device)
    else:
        prompt = torch.tensor([prompt_ids] * batch, device=device)
    cuda = device.type == "cuda"
    kwargs = {"do_sample": False, "use_cache": True, "pad_token_id": 0}
    if pass_mask:  # ChatGLM-6B v1 builds its own masks from <sop>; the others take the plain mask
        kwargs["attention_mask"] = torch.ones_like(prompt)
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = model.generate(input_ids=prompt, max_new_tokens=cfg.gen_tokens, min_new_tokens=cfg.gen_tokens, **kwargs)
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    new = (out.shape[1] - prompt.shape[1]) * batch
    return {"batch": batch, "new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


# --------------------------------------------------------------------------- main


def fmt_gib(value) -> str:
    return "-" if value is None else f"{value:.1f} GiB"


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    import torch

    from core.families import CAUSAL, family_of_dir, load_tokenizer

    started = time.perf_counter()
    device, dtype, precision = pick_device(cfg)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    print(f"config: {json.dumps(asdict(cfg))}\ndevice: {gpu}, {precision}, torch {torch.__version__}", flush=True)

    tokenizer = None
    if cfg.model_dir:
        family = family_of_dir(cfg.model_dir)
        tokenizer = load_tokenizer(cfg.model_dir, family)
        base = None  # build_model loads it (the product path)
    else:
        family = CAUSAL
        base = random_model(cfg, device, dtype)
    t0 = time.perf_counter()
    model, tcfg = lora_model(cfg, base, family, precision, cfg.model_dir, device)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    vocab = model.get_base_model().config.vocab_size
    print(f"model: {n_params:,} params ({trainable:,} LoRA trainable), frozen weights "
          f"{weight_bytes / 1e9:.2f} GB, family {family.name}, ready in {time.perf_counter() - t0:.0f} s", flush=True)

    # ---- training
    if cfg.model_dir:
        make_batch = real_batches(cfg, tokenizer, family, tcfg)
    else:
        def make_batch(batch, dev):
            return stand_in_batch(cfg, vocab, batch, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate)
    autocast = device.type == "cuda"  # what Trainer's bf16/fp16=True does
    print(f"LoRA training ({cfg.train_steps} timed steps per batch size):", flush=True)
    train_results = search_batches(cfg, model, optimizer, make_batch, device, dtype, autocast, started)
    del optimizer
    free_memory(model)

    # ---- generation (the LoRA model merged, as served)
    model = model.merge_and_unload().eval()
    model.config.use_cache = True
    if device.type == "cuda":
        torch.cuda.empty_cache()
    prompt_ids = None
    if cfg.model_dir:  # a real prompt in the training layout, through the family's special tokens
        from core.dataset import PROMPT_TEMPLATE

        context = PROMPT_TEMPLATE.format(instruction="你现在是一个很厉害的阅读理解器，严格按照人类指令进行回答。",
                                         phrasing="下面句子包含了哪些三元组，用json列表的形式回答。",
                                         text="《琅琊榜》是由孔笙、李雪执导，胡歌、刘涛、王凯等主演的古装剧。")
        prompt_ids = family.build_generation_ids(tokenizer, tokenizer.encode(context, add_special_tokens=False))
    bound = cfg.bandwidth_tbs * 1e12 / weight_bytes
    print(f"generation ({cfg.prompt_len if prompt_ids is None else len(prompt_ids)}-token prompt, "
          f"{cfg.gen_tokens} new tokens; batch-1 bandwidth bound {bound:,.0f} tokens/s at "
          f"{cfg.bandwidth_tbs} TB/s):", flush=True)
    gen_results = []
    for batch in cfg.batches():
        if time.perf_counter() - started > cfg.time_budget_s + 30:
            print(f"  batch {batch}: skipped (time budget)", flush=True)
            continue
        r = unless_oom(
            model, lambda b=batch: time_generation(model, cfg, b, vocab, device, prompt_ids, family.name != "chatglm")
        )
        if r is None:
            print(f"  batch {batch}: out of memory", flush=True)
            continue
        gen_results.append(r)
        share = f", {r['tokens_per_s'] / bound:.0%} of the batch-1 bound" if batch == 1 else ""
        print(f"  batch {batch}: {r['tokens_per_s']:,.0f} tokens/s{share}, peak {fmt_gib(r['peak_gib'])}", flush=True)

    result = {
        "device": gpu, "precision": precision, "params": n_params, "weight_bytes": weight_bytes,
        "model": cfg.model_dir or ("tiny dry-run stand-in" if cfg.dry_run else "random-weight ChatGLM-6B stand-in"),
        "bandwidth_tbs": cfg.bandwidth_tbs, "batch1_bandwidth_bound_tokens_per_s": bound,
        "train": train_results, "generate": gen_results, "seconds": time.perf_counter() - started,
    }
    print_summary(result)
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def print_summary(result: dict) -> None:
    train, gen = result["train"], result["generate"]
    print("\nsummary")
    if train:
        first, largest = train[0], max(train, key=lambda r: r["batch"])
        gain = largest["tokens_per_s"] / first["tokens_per_s"]
        print(f"  LoRA train batch {first['batch']}: {first['tokens_per_s']:,.0f} tokens/s, peak "
              f"{fmt_gib(first['peak_gib'])}; largest batch {largest['batch']}: {largest['tokens_per_s']:,.0f} "
              f"tokens/s, peak {fmt_gib(largest['peak_gib'])} (RATIO {gain:.2f}x)")
    one = next((r for r in gen if r["batch"] == 1), None)
    if one:
        print(f"  generate batch 1: {one['tokens_per_s']:,.0f} tokens/s = "
              f"{one['tokens_per_s'] / result['batch1_bandwidth_bound_tokens_per_s']:.0%} of the bandwidth bound "
              f"({result['batch1_bandwidth_bound_tokens_per_s']:,.0f})")
    best = max(gen, key=lambda r: r["tokens_per_s"], default=None)
    if one and best and best["batch"] != 1:
        print(f"  generate batch {best['batch']}: {best['tokens_per_s']:,.0f} tokens/s "
              f"(RATIO {best['tokens_per_s'] / one['tokens_per_s']:.1f}x batch 1)")
    print(f"  total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
