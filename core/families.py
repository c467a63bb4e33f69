"""Per model family: how a (prompt, answer) pair becomes token ids, which modules LoRA targets.

The same functions serve training (finetune.data) and generation (model/), so the prompt a
served model sees is token for token the one it was trained on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from core import compat

IGNORE_INDEX = -100
# Where a model folder keeps its weights (sharded or not); checked before transformers would look elsewhere.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class Family:
    name: str
    lora_targets: tuple[str, ...]
    trust_remote_code: bool
    # ChatGLM-6B v1 builds its own 2D masks from the <sop> position; a 2D attention_mask breaks it.
    attention_mask_in_training: bool

    def build_training_ids(
        self, tokenizer, prompt_ids: list[int], answer_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        """input_ids and labels; only answer tokens and the end-of-answer token are targets."""
        if self.name == "chatglm":
            # v1: prompt + [gMASK, <sop>] + answer + [<eop>]; the model locates <sop> in every row.
            ids = list(tokenizer.build_inputs_with_special_tokens(list(prompt_ids), list(answer_ids)))
            sop = ids.index(tokenizer.bos_token_id)
            return ids, [IGNORE_INDEX] * (sop + 1) + ids[sop + 1 :]
        prefix = self.prompt_prefix(tokenizer)
        end = [tokenizer.eos_token_id]
        ids = prefix + list(prompt_ids) + list(answer_ids) + end
        n_prompt = len(prefix) + len(prompt_ids)
        return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]

    def build_generation_ids(self, tokenizer, prompt_ids: list[int]) -> list[int]:
        """The ids a generate() call starts from: exactly the training row up to the answer."""
        if self.name == "chatglm":
            return list(tokenizer.build_inputs_with_special_tokens(list(prompt_ids)))
        return self.prompt_prefix(tokenizer) + list(prompt_ids)

    def prompt_prefix(self, tokenizer) -> list[int]:
        if self.name == "chatglm2":
            return list(tokenizer.get_prefix_tokens())  # [gMASK], sop
        if self.name == "glm":
            # GLM-4's own chat template opens every conversation with these two tokens; its tokenizer does not
            # add them to a plain encode, so the plain prompt starts with them as the model was trained.
            ids = [tokenizer.convert_tokens_to_ids(token) for token in GLM_PREFIX_TOKENS]
            if any(i is None or i == tokenizer.unk_token_id for i in ids):
                raise ValueError(f"a glm model's tokenizer needs the tokens {GLM_PREFIX_TOKENS}; this one lacks them")
            return list(ids)
        if self.name == "causal" and tokenizer.bos_token_id is not None:
            return [tokenizer.bos_token_id]
        return []  # Qwen2/3: no bos token

    def end_token_id(self, tokenizer) -> int:
        return tokenizer.eos_token_id


GLM_PREFIX_TOKENS = ("[gMASK]", "<sop>")
# LoRA on the attention projections, named explicitly for every family (peft has no default for some of them).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

CHATGLM = Family("chatglm", ("query_key_value",), trust_remote_code=True, attention_mask_in_training=False)
CHATGLM2 = Family("chatglm2", ("query_key_value",), trust_remote_code=True, attention_mask_in_training=True)
CAUSAL = Family("causal", ATTENTION_PROJECTIONS, trust_remote_code=False, attention_mask_in_training=True)
# The modern lane's families (transformers' own code, no remote code): GLM-4 (model types glm: glm-4-9b-chat-hf;
# glm4: GLM-4-9B-0414) and Qwen2/2.5/3 (qwen2, qwen3).
GLM = Family("glm", ATTENTION_PROJECTIONS, trust_remote_code=False, attention_mask_in_training=True)
QWEN = Family("qwen", ATTENTION_PROJECTIONS, trust_remote_code=False, attention_mask_in_training=True)
FAMILIES = {f.name: f for f in (CHATGLM, CHATGLM2, CAUSAL, GLM, QWEN)}
FAMILY_OF_MODEL_TYPE = {"glm": GLM, "glm4": GLM, "qwen2": QWEN, "qwen3": QWEN}


def detect_family(config) -> Family:
    """ChatGLM-6B v1 and ChatGLM2/3 share model_type 'chatglm'; v2/3 use multi-query attention."""
    model_type = getattr(config, "model_type", None)
    if model_type == "chatglm":
        return CHATGLM2 if getattr(config, "multi_query_attention", False) else CHATGLM
    return FAMILY_OF_MODEL_TYPE.get(model_type, CAUSAL)


def read_model_config(model_dir: str | Path):
    """Read config.json of a local model dir without running any remote code."""
    from transformers import PretrainedConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json here; expected a local model directory")
    config_dict, _ = PretrainedConfig.get_config_dict(str(model_dir))
    return PretrainedConfig(**config_dict)


def family_of_dir(model_dir: str | Path) -> Family:
    return detect_family(read_model_config(model_dir))


# The directory whose remote code each transformers_modules.<dir name> package was imported from.
_REMOTE_CODE_FROM: dict[str, Path] = {}


def _code_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.glob("*.py"))}


def forget_remote_code(model_dir: str | Path) -> None:
    """Drop the imported remote code of an earlier directory of the same name whose code differs.

    transformers imports a local dir's code as transformers_modules.<dir name>.<file>; a second dir with
    the same name (runs/a/merged, then runs/b/merged of another family) would otherwise get the first
    one's classes, because Python returns the module it already imported. Modules of the same code are
    kept: objects loaded from them (a tokenizer about to be saved) still need them.
    """
    model_dir = Path(model_dir).resolve()
    name = model_dir.name
    earlier = _REMOTE_CODE_FROM.get(name)
    if earlier is not None and earlier != model_dir and (
        not earlier.is_dir() or _code_files(earlier) != _code_files(model_dir)
    ):
        prefix = f"transformers_modules.{name}"
        for module in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
            del sys.modules[module]
    _REMOTE_CODE_FROM[name] = model_dir


class LaneError(RuntimeError):
    """The model's family does not run on the installed transformers (README: "Which lane")."""


def check_lane(model_dir: str | Path, family: Family) -> None:
    """ChatGLM-6B v1 and ChatGLM2/3 run through THUDM's remote code, written for transformers 4.x: on 5.x it
    fails (THUDM's ChatGLM3 code at model construction: its config has no max_length). Say so before it does."""
    if family.trust_remote_code and compat.transformers_major() >= 5:
        import transformers

        raise LaneError(
            f"{model_dir} is a {family.name} model: its remote code runs on the legacy lane (transformers 4.33.3, "
            f"Python 3.10/3.11), not on transformers {transformers.__version__}. Install it with "
            "`make venv LANE=legacy` and run this command with .venv/bin/python."
        )


def load_tokenizer(model_dir: str | Path, family: Family):
    """Tokenizer from a local dir only: remote code is trusted for the dir the user named, never a hub id."""
    check_lane(model_dir, family)
    from transformers import AutoTokenizer

    if family.trust_remote_code:
        forget_remote_code(model_dir)
    return AutoTokenizer.from_pretrained(
        str(model_dir), trust_remote_code=family.trust_remote_code, local_files_only=True
    )


DTYPE_NAMES = ("fp16", "bf16", "fp32")


def torch_dtype(name: str):
    """The torch dtype for a precision name of our CLIs ('fp16', 'bf16', 'fp32')."""
    import torch  # here, so this module stays importable from pure code

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_model(model_dir: str | Path, family: Family, torch_dtype=None):
    from transformers import AutoModel, AutoModelForCausalLM

    # ChatGLM-6B registers its LM-head class under AutoModel in its auto_map (v1 has no
    # AutoModelForCausalLM entry), so both ChatGLM families load through AutoModel.
    loader = AutoModel if family.name.startswith("chatglm") else AutoModelForCausalLM
    check_lane(model_dir, family)
    if family.trust_remote_code:
        forget_remote_code(model_dir)
    dtype = {compat.dtype_keyword(): torch_dtype} if torch_dtype is not None else {}
    model = loader.from_pretrained(
        str(model_dir), trust_remote_code=family.trust_remote_code, local_files_only=True, **dtype
    )
    return model
