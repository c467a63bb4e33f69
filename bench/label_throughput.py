"""Labelling throughput: the tutorial playground's one-at-a-time generate vs model.predict as the app uses it.

    python -m bench.label_throughput [--family causal|chatglm_v1|chatglm2|qwen3] [--n-texts 200] [--rounds 6]
                                     [--model DIR]

Every text gets both answers (category and triples), both ways, on the same merged model:
  baseline  HarderThenHarder/transformers_tasks LLM/finetune inference.py / playground: one text and
            one task per generate() call, batch 1, greedy, unconstrained, max_new_tokens=300 (the
            tutorial's max target length). It is given the exact training prompt (model.predict's
            prompt_ids), so only the decoding differs.
  ours      model.predict.predict(lm, texts) with its defaults, as the app and model.label call it:
            rows sorted by length, left-padded batches, KV cache, constrained decoding, max_new_tokens
            from the schema's longest training answer.
Without --model, the family's benchmark model is used (bench.models: a tiny model trained briefly
through the real pipeline, finetune.train -> finetune.merge, once, then kept in runs/bench/models), so its
answers are realistic-ish: the right shape for the task, often wrong in content. chatglm_v1 and chatglm2
are the ChatGLM-6B / ChatGLM2-6B test doubles, loaded through trust_remote_code as a user's model is.
The texts are labelled in rounds (one chunk per round, each way, first way alternating), so machine
noise hits both alike; the RATIO is the median of the rounds' ratios, printed with their spread.
Latency of a single comment: baseline = its two generate() calls; ours = predict(lm, [text]) on a few
texts per round (the app's single-comment page). Parse rate = answers
in the exact training format (the check model.predict records in Prediction.well_formed).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import (
    machine_line,
    parse_checked,
    percentile,
    print_comparison,
    refuse_invalid,
    set_threads,
    verdict,
)
from bench.models import FAMILIES, trained_model

TARGET_RATIO = 10.0
BASELINE, OURS = "baseline", "ours"


@dataclass
class BenchConfig:
    data_dir: str = "data"
    # The dev file has 122 rows; the list cycles through them to reach n_texts (duplicates are labelled
    # again and counted again: the model is not told, and neither way caches answers).
    n_texts: int = 200
    rounds: int = 6
    latency_samples_per_round: int = 4
    baseline_max_new_tokens: int = 300  # the tutorial's inference.py / max_target_seq_len
    family: str = field(default="causal", metadata={"choices": list(FAMILIES)})
    model: str | None = None  # a merged model dir; default: the family's benchmark model (bench.models)
    models_root: str = "runs/bench/models"  # where bench.models keeps the trained benchmark models
    threads: int = 1  # torch intra-op threads; 0 = torch's default (see bench.common.set_threads)

    def validate(self) -> None:
        problems = []
        if not (Path(self.data_dir) / "mixed_dev_dataset.jsonl").is_file():
            problems.append(f"--data-dir {self.data_dir}: no mixed_dev_dataset.jsonl (run `make data`)")
        if self.n_texts < self.rounds or self.rounds < 1:
            problems.append(f"--n-texts ({self.n_texts}) must be >= --rounds ({self.rounds}) >= 1")
        if self.model and not (Path(self.model) / "schema.json").is_file():
            problems.append(f"--model {self.model}: not a merged model dir (no schema.json)")
        refuse_invalid(problems)


def parse_args(argv=None) -> BenchConfig:
    return parse_checked(BenchConfig, argv, __doc__)


# --------------------------------------------------------------------------- the two ways


def baseline_answer(lm, text: str, task: str, max_new_tokens: int) -> tuple[str, int]:
    """The tutorial's inference(): one prompt, generate(max_new_tokens), decode. (answer, new tokens)."""
    import torch

    from model.predict import prompt_ids

    tok = lm.tokenizer
    ids = torch.tensor([prompt_ids(lm, text, task)], device=lm.device)
    with torch.no_grad():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,  # the tutorial's temperature=0
            eos_token_id=lm.family.end_token_id(tok),
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new)


def well_formed(lm, task: str, answer: str, text: str) -> bool:
    """The same test model.predict stores in Prediction.well_formed, applied to any answer text."""
    from core.dataset import CLASSIFICATION
    from model.parsing import format_category, parse_category, parse_triples

    if task == CLASSIFICATION:
        label = parse_category(answer, lm.schema["labels"]).label
        return label is not None and answer == format_category(label)
    return parse_triples(answer, lm.schema, text).ok


# --------------------------------------------------------------------------- scoring


@dataclass
class Answers:
    """What one way produced for every text, in input order."""

    categories: list
    triples: list
    ok: list  # per (text, task): well-formed
    new_tokens: dict  # task -> list of generated-token counts (end token excluded)
    hit_limit: dict  # task -> list of bools


def score(lm, answers: Answers, gold: list) -> dict:
    """Category accuracy on classification rows, triple P/R/F1 on extraction rows, parse rate on all answers."""
    from core.dataset import CLASSIFICATION
    from model.metrics import classification_metrics, triple_metrics
    from model.parsing import Triple

    cls = [i for i, ex in enumerate(gold) if ex.task == CLASSIFICATION]
    ie = [i for i, ex in enumerate(gold) if ex.task != CLASSIFICATION]
    cm = classification_metrics([gold[i].answer[0] for i in cls], [answers.categories[i] for i in cls],
                                lm.schema["labels"])
    gold_triples = [[Triple(t["subject"], t["predicate"], t["object"]) for t in gold[i].answer] for i in ie]
    tm = triple_metrics(gold_triples, [answers.triples[i] for i in ie])
    return {
        "parse_rate": sum(answers.ok) / len(answers.ok),
        "cls_accuracy": cm["accuracy"],
        "triple_f1": tm["f1"],
        "mean_new_tokens": {t: sum(v) / len(v) for t, v in answers.new_tokens.items()},
        "hit_limit_rate": {t: sum(v) / len(v) for t, v in answers.hit_limit.items()},
    }


# --------------------------------------------------------------------------- main


def load_texts(cfg: BenchConfig):
    from core.dataset import load_split

    dev = load_split(cfg.data_dir, "dev")
    return [dev[i % len(dev)] for i in range(cfg.n_texts)]


def get_model(cfg: BenchConfig) -> Path:
    if cfg.model:
        return Path(cfg.model)
    return trained_model(cfg.family, cfg.data_dir, cfg.models_root, log=lambda line: print(line, flush=True))


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    set_threads(cfg.threads)
    wall = time.perf_counter()
    print("resolved config:", json.dumps(asdict(cfg)), flush=True)
    from core.dataset import CLASSIFICATION
    from model.load import load_merged
    from model.predict import TASKS, max_new_tokens_for, predict

    lm = load_merged(get_model(cfg))
    print(machine_line(), flush=True)
    gold = load_texts(cfg)
    texts = [ex.text for ex in gold]
    budgets = {task: max_new_tokens_for(lm.schema, task) for task in TASKS}
    print(f"model: {cfg.family}, {lm.n_params:,} params; {len(texts)} texts x {len(TASKS)} tasks; "
          f"baseline max_new_tokens {cfg.baseline_max_new_tokens}, ours from schema {budgets}", flush=True)

    # Untimed warm-up of both paths (first-call costs: the constrained decoder's vocabulary trie, lazy inits).
    baseline_answer(lm, texts[0], CLASSIFICATION, 4)
    predict(lm, texts[:2])

    n = len(texts)
    base = Answers([None] * n, [[] for _ in range(n)], [], {t: [] for t in TASKS}, {t: [] for t in TASKS})
    ours = Answers([None] * n, [[] for _ in range(n)], [], {t: [] for t in TASKS}, {t: [] for t in TASKS})
    seconds = {BASELINE: 0.0, OURS: 0.0}
    round_ratios = []  # per round: ours comments/s / baseline comments/s on the same chunk
    latency = {BASELINE: [], OURS: []}
    bounds = [round(r * n / cfg.rounds) for r in range(cfg.rounds + 1)]
    for r in range(cfg.rounds):
        chunk = list(range(bounds[r], bounds[r + 1]))
        order = (BASELINE, OURS) if r % 2 == 0 else (OURS, BASELINE)
        for way in order:
            if way == BASELINE:
                base_before = seconds[BASELINE]
                for i in chunk:
                    started = time.perf_counter()
                    got = [(task, *baseline_answer(lm, texts[i], task, cfg.baseline_max_new_tokens)) for task in TASKS]
                    latency[BASELINE].append(time.perf_counter() - started)
                    # Parsed outside the clock (the tutorial only ran a regex); ours is timed with its parsing.
                    for task, answer, n_new in got:
                        record(lm, base, i, task, answer, texts[i], n_new, cfg.baseline_max_new_tokens)
                seconds[BASELINE] += sum(latency[BASELINE][-len(chunk):])
            else:
                started = time.perf_counter()
                preds = predict(lm, [texts[i] for i in chunk])
                ours_seconds = time.perf_counter() - started
                seconds[OURS] += ours_seconds
                for i, pred in zip(chunk, preds, strict=True):
                    for task in TASKS:
                        answer = pred.raw[task]
                        n_new = len(lm.tokenizer.encode(answer, add_special_tokens=False))
                        record(lm, ours, i, task, answer, texts[i], n_new, budgets[task], pred.hit_limit[task],
                               pred.well_formed[task])
                # Single-comment latency, the way the app's first page calls it.
                for i in chunk[: cfg.latency_samples_per_round]:
                    started = time.perf_counter()
                    predict(lm, [texts[i]])
                    latency[OURS].append(time.perf_counter() - started)
        round_ratios.append((seconds[BASELINE] - base_before) / ours_seconds)
        done = bounds[r + 1]
        print(f"round {r + 1}/{cfg.rounds}: {done} texts; comments/s so far baseline {done / seconds[BASELINE]:.2f}, "
              f"ours {done / seconds[OURS]:.2f}; this round's ratio {round_ratios[-1]:.2f}x", flush=True)

    results = {}
    for way, answers in ((BASELINE, base), (OURS, ours)):
        results[way] = {
            "comments_per_s": n / seconds[way],
            "seconds": seconds[way],
            "latency_p50_s": percentile(latency[way], 50),
            "latency_p95_s": percentile(latency[way], 95),
            "latency_samples": len(latency[way]),
            **score(lm, answers, gold),
        }
    results["round_ratios"] = round_ratios
    results["family"] = cfg.family
    print_report(results)
    print(f"(whole benchmark: {time.perf_counter() - wall:.0f} s wall)")
    return results


def record(lm, answers: Answers, i: int, task: str, answer: str, text: str, n_new: int, limit: int,
           hit: bool | None = None, ok: bool | None = None) -> None:
    """Parse one answer as the app would; hit/ok are model.predict's own records when it made the answer."""
    from core.dataset import CLASSIFICATION
    from model.parsing import parse_category, parse_triples

    if task == CLASSIFICATION:
        answers.categories[i] = parse_category(answer, lm.schema["labels"]).label
    else:
        answers.triples[i] = list(parse_triples(answer, lm.schema, text).triples)
    answers.ok.append(ok if ok is not None else well_formed(lm, task, answer, text))
    answers.new_tokens[task].append(n_new)
    answers.hit_limit[task].append(hit if hit is not None else n_new >= limit)


def print_report(results: dict) -> None:
    def fmt(value, spec):
        if value is None:
            return "-"
        if isinstance(value, dict):
            return " / ".join(format(v, spec) for v in value.values())
        return format(value, spec)

    rows = [
        ("comments/s (both tasks each)", "comments_per_s", ".2f"),
        ("labelling seconds", "seconds", ".1f"),
        ("single-comment latency p50 s", "latency_p50_s", ".3f"),
        ("single-comment latency p95 s", "latency_p95_s", ".3f"),
        ("latency samples", "latency_samples", "d"),
        ("parse rate", "parse_rate", ".1%"),
        ("category accuracy", "cls_accuracy", ".3f"),
        ("triple F1", "triple_f1", ".3f"),
        ("new tokens/answer cls / ie", "mean_new_tokens", ".1f"),
        ("hit token limit cls / ie", "hit_limit_rate", ".1%"),
    ]
    print_comparison(
        [(label, fmt(results[BASELINE][key], spec), fmt(results[OURS][key], spec)) for label, key, spec in rows], 34, 18
    )
    ratios = results["round_ratios"]
    ratio = statistics.median(ratios)
    overall = results[OURS]["comments_per_s"] / results[BASELINE]["comments_per_s"]
    parse_ok = results[OURS]["parse_rate"] == 1.0
    print(f"\nRATIO label {results['family']} comments/s ours/baseline = {ratio:.2f}x median of {len(ratios)} rounds "
          f"(spread {min(ratios):.2f}-{max(ratios):.2f}x, all texts {overall:.2f}x) (target >= {TARGET_RATIO:.0f}x: "
          f"{verdict(ratio, TARGET_RATIO)}); ours parse rate {results[OURS]['parse_rate']:.1%} "
          f"(target 100%: {'PASS' if parse_ok else 'SHORT'}); baseline hit its 300-token limit on "
          f"{sum(results[BASELINE]['hit_limit_rate'].values()) / 2:.0%} of answers")


if __name__ == "__main__":
    main()
