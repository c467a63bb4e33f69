"""Our constrained decoder against xgrammar and llguidance, on the same model, texts, prompts and budget.

    python -m bench.grammar_engines [--family qwen3] [--n-texts 32] [--rounds 3] [--model DIR]

Modern lane only, and the two libraries are not in requirements-modern.txt (this script is what decided
that): `.venv-modern/bin/pip install xgrammar==0.2.9 llguidance==1.9.1` first.

Each text gets both answers (category and triples), greedy, with the schema's budget, three ways:
  ours        model.predict.generate_answers, as model.label and the app call it: jump-forward (forced runs
              fed several tokens per pass), the shared-prefix cache, a grammar that closes the answer
              within the budget, spans from the text the model saw
  xgrammar    HF generate() + xgrammar.contrib.hf.LogitsProcessor, one EBNF grammar per row: the label
              set; the triple format with each predicate's own types (schema.json), spans
              Substring(...) of the text's characters
  llguidance  HF generate() + a logits processor over llguidance.LLMatcher with the same grammar in Lark,
              spans %regex {"substring_chars": ...}
Both libraries are given the grammar of our training format, built here from the same schema; neither
knows the budget (an answer cut at the budget does not parse) nor our ban on repeating a triple, and their
substring rules also allow an empty span. Grammar compilation per text is timed with the decoding.
Prints per way: answers identical to ours, parse rate (exact training format), comments/s, and a RATIO
line per library (ours / theirs, median of the rounds with the spread).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from bench.common import machine_line, set_threads
from bench.models import FAMILIES, trained_model
from model.library_grammar import LLGUIDANCE, XGRAMMAR, library_grammar

OURS = "ours"


@dataclass
class EnginesConfig:
    data_dir: str = "data"
    n_texts: int = 32  # per task
    rounds: int = 3
    batch_size: int = 8
    family: str = field(default="qwen3", metadata={"choices": list(FAMILIES)})
    model: str | None = None  # a merged model dir; default: the family's benchmark model (bench.models)
    models_root: str = "runs/bench/models"
    threads: int = 1


class LLGuidanceProcessor:
    """HF logits processor over one llguidance.LLMatcher per row (the library ships none for transformers)."""

    def __init__(self, matchers, vocab_size: int):
        import llguidance.torch as llt

        self.matchers = matchers
        self.bitmask = llt.allocate_token_bitmask(len(matchers), vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        import llguidance.torch as llt

        for i, matcher in enumerate(self.matchers):
            if self.started and not matcher.is_stopped():
                matcher.consume_token(int(input_ids[i, -1]))
            llt.fill_next_token_bitmask(matcher, self.bitmask, i)
        self.started = True
        llt.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores


class Engines:
    """What each library needs once per model: its view of the tokenizer and a compiler."""

    def __init__(self, lm):
        import llguidance
        import llguidance.hf
        import xgrammar as xgr

        tok = lm.tokenizer
        self.end_id = lm.family.end_token_id(tok)
        self.vocab_size = lm.model.get_output_embeddings().weight.shape[0]
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size, stop_token_ids=[self.end_id])
        self.xgr_compiler = xgr.GrammarCompiler(info)
        self.ll_tokenizer = self._ll_tokenizer(llguidance, tok)
        self.llguidance = llguidance

    def _ll_tokenizer(self, llguidance, tok):
        """llguidance's tokenizer: from the HF tokenizer where it reads its decoder (byte-level BPE, as in the
        real Qwen/GLM tokenizers), else from each token's text (the tiny models' character tokenizer)."""
        import llguidance.hf

        try:
            return llguidance.hf.from_tokenizer(tok, n_vocab=self.vocab_size, eos_token=self.end_id)
        except ValueError:
            from model.vocab import vocab_for

            strings = vocab_for(tok).strings
            special = [i for i, text in enumerate(strings) if text is None]

            class Tokens:
                eos_token_id = self.end_id
                bos_token_id = tok.bos_token_id
                tokens = [(text if text is not None else f"<special_{i}>").encode("utf-8")
                          for i, text in enumerate(strings)]
                special_token_ids = special

                def __call__(self, text: str) -> list[int]:
                    return tok.encode(text, add_special_tokens=False)

            return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Tokens()), n_vocab=self.vocab_size)

    def processor(self, engine: str, schema: dict, task: str, texts: list[str]):
        if engine == XGRAMMAR:
            import xgrammar as xgr

            compiled = [self.xgr_compiler.compile_grammar(library_grammar(XGRAMMAR, schema, task, t)) for t in texts]
            return xgr.contrib.hf.LogitsProcessor(compiled)
        matchers = []
        for text in texts:
            matcher = self.llguidance.LLMatcher(self.ll_tokenizer, library_grammar(LLGUIDANCE, schema, task, text))
            if matcher.is_error():
                raise SystemExit(f"llguidance rejected the grammar: {matcher.get_error()}")
            matchers.append(matcher)
        return LLGuidanceProcessor(matchers, self.vocab_size)


def library_answers(lm, engines: Engines, engine: str, texts: list[str], task: str,
                    batch_size: int) -> tuple[list[str], int]:
    """Each text's answer through HF generate() with the library's processor, in input order, and how many
    stopped at the budget."""
    import torch
    from transformers import LogitsProcessorList

    from model import vocab
    from model.decoding import answers_of
    from model.predict import left_padded_batch, max_new_tokens_for, prompt_ids

    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else engines.end_id
    budget = max_new_tokens_for(lm.schema, task)
    rows = [prompt_ids(lm, t, task) for t in texts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    answers = [""] * len(rows)
    cut = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask, extra = left_padded_batch(lm, [rows[i] for i in chunk], pad_id)
        processor = engines.processor(engine, lm.schema, task, [texts[i] for i in chunk])
        with torch.no_grad():
            out = lm.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                    eos_token_id=engines.end_id, pad_token_id=pad_id,
                                    logits_processor=LogitsProcessorList([processor]), **extra)
        for i, ids in zip(chunk, answers_of(out, input_ids.shape[1], engines.end_id, pad_id), strict=True):
            answers[i] = vocab.decode_answer(tok, ids)
            cut += len(ids) >= budget
    return answers, cut


def run_way(lm, engines, way: str, texts: list[str], batch_size: int) -> tuple[dict, float, int]:
    """(answers per task, seconds, answers stopped at the budget) of one way over the texts."""
    from core.dataset import TASKS
    from model.predict import generate_answers

    started = time.perf_counter()
    answers, cut = {}, 0
    for task in TASKS:
        if way == OURS:
            generated = generate_answers(lm, texts, task, batch_size=batch_size)
            answers[task] = [a.text for a in generated]
            cut += sum(a.hit_limit for a in generated)
        else:
            answers[task], stopped = library_answers(lm, engines, way, texts, task, batch_size)
            cut += stopped
    return answers, time.perf_counter() - started, cut


def main(argv=None) -> dict:
    from bench.label_throughput import well_formed
    from core.config import parse_config
    from core.dataset import DEV_FILE, read_jsonl
    from model.load import load_merged

    cfg = parse_config(EnginesConfig, argv, __doc__)
    set_threads(cfg.threads)
    try:
        import llguidance  # noqa: F401
        import xgrammar  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"error: {err.name} is not installed: .venv-modern/bin/pip install xgrammar==0.2.9 "
                         "llguidance==1.9.1") from None
    model_dir = cfg.model or trained_model(cfg.family, cfg.data_dir, cfg.models_root)
    lm = load_merged(model_dir, device="cpu")
    engines = Engines(lm)
    examples = read_jsonl(f"{cfg.data_dir}/{DEV_FILE}")
    texts = [ex.text for ex in examples][: cfg.n_texts]
    print(machine_line(), flush=True)
    print(f"model: {model_dir} ({lm.family.name}, {lm.n_params:,} params); {len(texts)} texts x 2 tasks; "
          f"batch {cfg.batch_size}; {cfg.rounds} rounds", flush=True)
    ways = [OURS, XGRAMMAR, LLGUIDANCE]
    seconds = {way: [] for way in ways}
    answers, cut = {}, {}
    run_way(lm, engines, OURS, texts[:2], cfg.batch_size)  # warm-up: caches, first-call costs
    for r in range(cfg.rounds):
        for way in ways[r % 3:] + ways[: r % 3]:  # rotate the order so machine noise hits all alike
            answers[way], took, cut[way] = run_way(lm, engines, way, texts, cfg.batch_size)
            seconds[way].append(took)
    results = {"n_texts": len(texts), "family": lm.family.name}
    for way in ways:
        same = sum(a == b for task in answers[way] for a, b in zip(answers[way][task], answers[OURS][task],
                                                                      strict=True))
        parsed = sum(well_formed(lm, task, a, t) for task in answers[way]
                     for a, t in zip(answers[way][task], texts, strict=True))
        total = 2 * len(texts)
        rate = len(texts) / statistics.median(seconds[way])
        results[way] = {"identical_to_ours": same / total, "parse_rate": parsed / total, "comments_per_s": rate,
                        "seconds": seconds[way]}
        stopped = f"; stopped at the budget {cut[way]}/{total}" if way != OURS else ""
        print(f"{way:10s} comments/s {rate:8.2f}  parse rate {parsed / total:6.1%}  answers identical to ours "
              f"{same}/{total}{stopped}", flush=True)
    for way in (XGRAMMAR, LLGUIDANCE):
        ratios = sorted(b / a for a, b in zip(seconds[OURS], seconds[way], strict=True))
        print(f"RATIO label {cfg.family} comments/s ours/{way} = {statistics.median(ratios):.2f}x median of "
              f"{len(ratios)} rounds (spread {ratios[0]:.2f}-{ratios[-1]:.2f}x); {way} answers identical to ours "
              f"{results[way]['identical_to_ours']:.0%}, its parse rate {results[way]['parse_rate']:.0%}")
    first = next(((task, i) for task in answers[OURS] for i, (a, b) in enumerate(
        zip(answers[OURS][task], answers[XGRAMMAR][task], strict=True)) if a != b), None)
    if first:
        task, i = first
        print(f"first difference ({task}, text {i}):\n  ours     {answers[OURS][task][i]}\n"
              f"  xgrammar {answers[XGRAMMAR][task][i]}\n  llguid.  {answers[LLGUIDANCE][task][i]}")
    return results


if __name__ == "__main__":
    main()
