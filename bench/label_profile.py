"""Where labelling's time goes on a CPU: the evidence behind bench/README.md, reproducible.

    python -m bench.label_profile [--family causal|chatglm_v1|chatglm2] [--model DIR] [--n-texts 64]

Not a benchmark with a target; a diagnostic for bench.label_throughput (the same benchmark model,
bench.models, unless --model is given). Prints:
  1. the cost of one decode step (KV cache on) at batch 1, 8, 32: the per-row floor batching can reach;
     and of one pass that feeds 4-16 tokens per row (what jump-forward decoding feeds);
  2. model.predict comments/s at batch sizes 1, 8, 16, 32;
  3. jump-forward decoding of the extraction answers: forward passes, tokens fed and the padding among
     them, feeding whole runs ("all") vs at most the median queue ("median", the CPU default);
  4. predict's time split into prompt passes, decode passes and the rest (grammar, batching, parsing),
     and the minor page faults it takes (see model/allocator.py);
  5. the top functions of a cProfile of predict (internal time).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import time
from pathlib import Path

from bench.common import machine_line, set_threads
from bench.label_throughput import BenchConfig as LabelConfig
from bench.label_throughput import get_model
from bench.models import FAMILIES


def step_cost(lm, batch: int, new: int = 1, context: int = 200, steps: int = 50) -> float:
    """Seconds of one cached forward pass feeding `new` tokens to each of `batch` rows after `context` tokens."""
    import torch

    vocab = len(lm.tokenizer)
    ids = torch.randint(10, vocab, (batch, context))
    with torch.no_grad():
        past = lm.model(input_ids=ids, use_cache=True).past_key_values
        nxt = torch.randint(10, vocab, (batch, new))
        started = time.perf_counter()
        for _ in range(steps):
            lm.model(input_ids=nxt, past_key_values=past, use_cache=True)
    return (time.perf_counter() - started) / steps


def feed_policies(lm, texts: list[str]) -> dict:
    """Per feed policy: forward passes, tokens fed after the first pass, pads among them, seconds (extraction)."""
    from core.dataset import EXTRACTION
    from model import jump_forward
    from model.predict import generate_answers

    decoder_class = jump_forward.JumpForwardDecoder
    original_init, original_run = decoder_class.__init__, decoder_class.run
    out = {}
    try:
        for policy in ("all", "median"):
            totals = collections.Counter()

            def init(self, *args, policy=policy, **kwargs):
                original_init(self, *args, **{**kwargs, "feed": policy})

            def run(self, *args, totals=totals):
                result = original_run(self, *args)
                totals.update(passes=self.stats.passes, fed=self.stats.fed, padding=self.stats.padding)
                return result

            decoder_class.__init__, decoder_class.run = init, run
            started = time.perf_counter()
            answers = generate_answers(lm, texts, EXTRACTION)
            out[policy] = {**totals, "seconds": time.perf_counter() - started, "answers": answers}
    finally:
        decoder_class.__init__, decoder_class.run = original_init, original_run
    return out


def time_split(lm, texts: list[str]) -> dict:
    """Seconds of predict(texts) in first (prompt) passes, later (decode) passes and the rest; minor faults."""
    import resource

    from model import feeders
    from model.predict import predict

    decoder_class = feeders.CausalFeeder
    original = decoder_class.forward
    split = collections.Counter()

    def forward(self, ids, mask, past):
        started = time.perf_counter()
        result = original(self, ids, mask, past)
        first = not getattr(self, "_profiled", False)
        self._profiled = True
        split["prompt passes" if first or past is None else "decode passes"] += time.perf_counter() - started
        return result

    decoder_class.forward = forward
    try:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        predict(lm, texts)
        total = time.perf_counter() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    finally:
        decoder_class.forward = original
    split["rest"] = total - sum(split.values())
    return {"total": total, "split": dict(split), "minor_faults": faults}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--family", default="causal", choices=FAMILIES)
    parser.add_argument("--n-texts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from core.dataset import load_split
    from model.load import load_merged
    from model.predict import predict

    cfg = LabelConfig(model=args.model, family=args.family)
    lm = load_merged(get_model(cfg))
    print(machine_line())
    texts = [ex.text for ex in load_split(cfg.data_dir, "dev")][: args.n_texts]
    predict(lm, texts[:2])  # warm-up

    print("\n1. one decode step (KV cache, 200-token context)")
    one = step_cost(lm, 1)
    for batch in (1, 8, 32):
        cost = one if batch == 1 else step_cost(lm, batch)
        print(f"   batch {batch:>2}: {cost * 1e3:6.2f} ms/step, {cost * 1e3 / batch:.3f} ms/row "
              f"(batch-1 row cost / this = {one * batch / cost:.1f}x)")

    print("   batch 8, several forced tokens per row in one pass (what jump-forward would feed):")
    for new in (4, 8, 16):
        cost = step_cost(lm, 8, new)
        print(f"   {new:>2} tokens/row: {cost * 1e3:6.2f} ms/pass = {cost * 1e3 / new:.3f} ms per token-step")

    print("\n2. model.predict, both tasks")
    for batch in (1, 8, 16, 32):
        sub = texts[:16] if batch == 1 else texts
        started = time.perf_counter()
        predict(lm, sub, batch_size=batch)
        print(f"   batch_size {batch:>2}: {len(sub) / (time.perf_counter() - started):6.2f} comments/s")

    print("\n3. jump-forward decoding of the extraction answers (batches of 8)")
    policies = feed_policies(lm, texts)
    for policy, r in policies.items():
        real = r["fed"] - r["padding"]
        print(f"   feed {policy:>6}: {r['passes']} forward passes, {r['fed']:,} tokens fed after the first pass, "
              f"{r['padding']:,} of them padding ({r['padding'] / max(1, r['fed']):.0%}; real {real:,}), "
              f"{r['seconds']:.2f} s")
    same = policies["all"]["answers"] == policies["median"]["answers"]
    print(f"   same answers both ways: {same}")

    print("\n4. where predict's time goes (both tasks)")
    split = time_split(lm, texts)
    parts = ", ".join(f"{name} {sec:.2f} s ({sec / split['total']:.0%})" for name, sec in split["split"].items())
    print(f"   {len(texts)} texts in {split['total']:.2f} s: {parts}; {split['minor_faults']:,} minor page faults")

    print("\n5. cProfile of predict(texts), top 15 by internal time")
    profile = cProfile.Profile()
    profile.enable()
    predict(lm, texts)
    profile.disable()
    buffer = io.StringIO()
    pstats.Stats(profile, stream=buffer).sort_stats("tottime").print_stats(15)
    lines = buffer.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join("   " + line.replace(str(Path.cwd()) + "/", "") for line in lines[start - 1 :] if line.strip()))


if __name__ == "__main__":
    main()
