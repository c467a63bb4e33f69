"""--engine ray-vllm: vLLM as the engine inside each Ray actor, held to our answer format by vLLM's structured
outputs (its xgrammar backend). NOT RUN in this project: it needs an NVIDIA GPU and vLLM's own install set
(requirements-vllm.txt); README "Labelling many files" says what was and was not checked.

What stays ours: the prompts (model.predict.prompt_ids: the training rows, cut as training cuts them), the part
of a long text that spans may come from (seen_text), and everything after generation: model.predict.predict
parses the answers into the same Prediction, so model.label_ray writes the same columns and cells.
What vLLM does: batching, its paged KV cache, and the grammar: model.library_grammar's xgrammar EBNF (a label;
the triple format with each predicate's types and spans as Substring of the text), the grammar
bench.grammar_engines measured with xgrammar 0.2.9 under HF generate().
Stated differences from --engine ray: no confidences (vLLM does not give our constrained probabilities:
category_confidence stays empty, triples carry none, so --min-confidence above 0 drops every triple); the
grammar has no token budget (an answer that runs into --max-tokens does not parse: it gets a warning and no
triples), no ban on repeating a triple, and allows an empty span.
Families: vLLM 0.34 runs GLM-4 (glm, glm4), Qwen2/3 and Llama-shaped models. It also has ChatGLM2/3, but their
tokenizer is THUDM's remote code, which does not run on the transformers 5 that vLLM 0.34 requires; ChatGLM-6B
v1 is not in vLLM at all. Those stay on --engine ray.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from core.dataset import EXTRACTION
from core.families import CAUSAL, GLM, QWEN, family_of_dir, load_tokenizer
from model import vocab
from model.library_grammar import XGRAMMAR, library_grammar
from model.load import LoadedModel, ModelLoadError, check_model_dir, read_schema
from model.predict import Answer, max_new_tokens_for, predict, prompt_ids, seen_text

VLLM_FAMILIES = (GLM.name, QWEN.name, CAUSAL.name)
INSTALL_HINT = ("pip install -r requirements-vllm.txt in its own venv on the GPU machines (vLLM pins its own torch "
                "and transformers; README: Labelling many files)")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_usable(model_dir: str | Path) -> None:
    """Before Ray starts: vLLM importable here and the model's family one vLLM runs, or a ModelLoadError."""
    if not vllm_installed():
        raise ModelLoadError(f"--engine ray-vllm needs vLLM, which is not installed in this Python: {INSTALL_HINT}")
    family = family_of_dir(model_dir)
    if family.name not in VLLM_FAMILIES:
        raise ModelLoadError(f"{model_dir} is a {family.name} model: --engine ray-vllm runs {', '.join(VLLM_FAMILIES)} "
                             "models (see model/vllm_engine.py why not ChatGLM); use --engine ray")


def load_vllm(model_dir: str | Path, seed: int = 0) -> LoadedModel:
    """The merged model in vLLM (fp16 on the actor's GPU) with its HF tokenizer and our schema."""
    from vllm import LLM

    path = Path(model_dir)
    check_model_dir(path)
    check_vllm_usable(path)
    started = time.time()
    family = family_of_dir(path)
    tokenizer = load_tokenizer(path, family)  # ours, for prompts, spans and decoding, as --engine ray has it
    llm = LLM(model=str(path), tokenizer=str(path), dtype="float16", seed=seed)
    return LoadedModel(path, llm, tokenizer, read_schema(path), family, "cuda", "fp16", 0, time.time() - started)


def structured(schema: dict, task: str, text: str, tokenizer) -> str:
    """The grammar of one answer: spans from the text as the tokenizer sees it, as our decoder copies them."""
    return library_grammar(XGRAMMAR, schema, task, vocab.text_view(tokenizer, text) if task == EXTRACTION else text)


def vllm_generate(lm: LoadedModel, texts: Sequence[str], task: str, batch_size: int = 8, constrained: bool = True,
                  phrasing: str | None = None, on_batch: Callable[[int], None] | None = None) -> list[Answer]:
    """model.predict.generate_answers' contract on vLLM: the answer to each text, in input order, greedy, under
    the grammar. vLLM batches on its own (batch_size is not used)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    tok = lm.tokenizer
    budget = max_new_tokens_for(lm.schema, task)
    end_id = lm.family.end_token_id(tok)
    seen = [seen_text(lm, text, task, phrasing) if task == EXTRACTION else text for text in texts]
    prompts = [{"prompt_token_ids": prompt_ids(lm, text, task, phrasing)} for text in texts]
    params = [
        SamplingParams(temperature=0.0, max_tokens=budget, stop_token_ids=[end_id], seed=0,
                       structured_outputs=StructuredOutputsParams(grammar=structured(lm.schema, task, s, tok))
                       if constrained else None)
        for s in seen
    ]
    outputs = lm.model.generate(prompts, params, use_tqdm=False)
    answers = []
    for text, s, output in zip(texts, seen, outputs, strict=True):
        completion = output.outputs[0]
        ids = [t for t in completion.token_ids if t != end_id]
        answers.append(Answer(vocab.decode_answer(tok, ids), completion.finish_reason == "length", ids, None,
                              len(s) if s != text else None))
    if on_batch:
        on_batch(len(texts))
    return answers


def vllm_predictor(model_dir: str | Path, tasks: Sequence[str]):
    """texts -> Predictions through vLLM; what a ray-vllm actor labels its blocks with."""
    lm = load_vllm(model_dir)
    return lambda texts: predict(lm, texts, tasks=tasks, generate=vllm_generate)
