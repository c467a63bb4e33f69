"""Why labelling is only a few times faster than the tutorial's loop on a CPU: the evidence, reproducible.

    python -m bench.label_profile [--model DIR] [--n-texts 64]

Not a benchmark with a target; a diagnostic for bench.label_throughput (same tiny model unless
--model is given). Prints:
  1. the cost of one decode step (KV cache on) at batch 1, 8, 32: the per-row floor batching can reach;
     and of one pass that feeds 4-16 tokens per row (how jump-forward decoding would run);
  2. model.predict comments/s at batch sizes 1, 8, 16, 32;
  3. how many decode steps of constrained decoding had exactly one allowed token (forced), and how
     many forward passes a decoder that feeds forced runs in one pass ("jump-forward") would need;
  4. the top functions of a cProfile of predict (internal time).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

from bench.common import machine_line, set_threads
from bench.label_throughput import BenchConfig as LabelConfig
from bench.label_throughput import get_model


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


def forced_steps(lm, texts: list[str]) -> dict:
    """Per task: decode row-steps, those with >1 allowed token (decisions), forward passes now vs jump-forward."""
    from model import decoding
    from model.predict import TASKS, predict

    log: list[tuple[int, int, int]] = []
    processors: list = []
    original = decoding.GrammarLogitsProcessor._allowed

    def recording(self, row, state, remaining):
        allowed = original(self, row, state, remaining)
        if not hasattr(self, "_bench_tag"):
            self._bench_tag = len(processors)
            processors.append(self)
        log.append((self._bench_tag, row, len(allowed)))
        return allowed

    out = {}
    decoding.GrammarLogitsProcessor._allowed = recording
    try:
        for task in TASKS:
            log.clear()
            processors.clear()
            predict(lm, texts, tasks=(task,))
            steps, decisions = collections.Counter(), collections.Counter()
            for tag, row, n_allowed in log:
                steps[(tag, row)] += 1
                decisions[(tag, row)] += n_allowed > 1
            batches = collections.defaultdict(list)
            for key, n in steps.items():
                batches[key[0]].append((n, decisions[key]))
            out[task] = {
                "row_steps": sum(steps.values()),
                "decisions": sum(decisions.values()),
                "forward_passes": sum(max(n for n, _ in rows) for rows in batches.values()),
                # Each pass feeds a row's forced run plus one decided token: passes = decisions + 1 per batch.
                "jump_forward_passes": sum(max(d for _, d in rows) + 1 for rows in batches.values()),
            }
    finally:
        decoding.GrammarLogitsProcessor._allowed = original
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-texts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from finetune.data import load_split
    from model.load import load_merged
    from model.predict import predict

    cfg = LabelConfig(model=args.model)
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_merged(get_model(cfg, Path(tmp)))
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

    print("\n3. constrained decoding: forced steps (batch 8)")
    for task, s in forced_steps(lm, texts).items():
        fewer = s["forward_passes"] / s["jump_forward_passes"]
        print(f"   {task}: {s['row_steps']} row-steps, {s['decisions']} with a choice "
              f"({s['decisions'] / s['row_steps']:.0%}); forward passes {s['forward_passes']}, "
              f"with jump-forward ~{s['jump_forward_passes']} ({fewer:.1f}x fewer)")

    print("\n4. cProfile of predict(texts), top 15 by internal time")
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
