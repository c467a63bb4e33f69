"""Per model family: how a (prompt, answer) pair becomes token ids, which modules LoRA targets.

The same functions serve training (finetune.data) and generation (model/), so the prompt a
served model sees is token for token the one it was trained on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

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
        if self.name == "causal" and tokenizer.bos_token_id is not None:
            return [tokenizer.bos_token_id]
        return []

    def end_token_id(self, tokenizer) -> int:
        return tokenizer.eos_token_id


CHATGLM = Family("chatglm", ("query_key_value",), trust_remote_code=True, attention_mask_in_training=False)
CHATGLM2 = Family("chatglm2", ("query_key_value",), trust_remote_code=True, attention_mask_in_training=True)
CAUSAL = Family(
    "causal", ("q_proj", "k_proj", "v_proj", "o_proj"), trust_remote_code=False, attention_mask_in_training=True
)
FAMILIES = {f.name: f for f in (CHATGLM, CHATGLM2, CAUSAL)}


def detect_family(config) -> Family:
    """ChatGLM-6B v1 and ChatGLM2/3 share model_type 'chatglm'; v2/3 use multi-query attention."""
    if getattr(config, "model_type", None) == "chatglm":
        return CHATGLM2 if getattr(config, "multi_query_attention", False) else CHATGLM
    return CAUSAL


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


def load_tokenizer(model_dir: str | Path, family: Family):
    """Tokenizer from a local dir only: remote code is trusted for the dir the user named, never a hub id."""
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
    if family.trust_remote_code:
        forget_remote_code(model_dir)
    model = loader.from_pretrained(
        str(model_dir), trust_remote_code=family.trust_remote_code, torch_dtype=torch_dtype, local_files_only=True
    )
    return model
