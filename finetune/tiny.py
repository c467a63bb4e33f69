"""Build a tiny random base model and a character tokenizer, locally, in seconds.

Tests and the CPU demo need a model of an architecture transformers ships and a tokenizer that covers
every character of the data, without any download. --arch llama (the default; both lanes) or, on the
modern lane (transformers 5), the architectures of the families we support there, from transformers'
own config classes and with the special tokens of the real tokenizers (pad = eos = <|endoftext|>, no bos;
GLM's [gMASK] and <sop>):
    qwen2 (Qwen2/2.5), qwen3 (Qwen3: q/k norms, tied embeddings as in 0.6B-4B),
    glm (glm-4-9b-chat-hf: partial rotary, qkv bias), glm4 (GLM-4-9B-0414: extra norms)

    python -m finetune.tiny --output-dir /tmp/tiny [--data-dir data] [--arch qwen3]
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from core.dataset import DEV_FILE, TRAIN_FILE

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
# The special tokens of each architecture's real tokenizer that the project relies on. unk only because a
# word-level tokenizer needs one (the real Qwen/GLM tokenizers are byte-level and have none).
ENDOFTEXT_TOKENS = {"pad": "<|endoftext|>", "unk": "<unk>", "bos": None, "eos": "<|endoftext|>"}  # Qwen, GLM-4
ARCH_SPECIAL_TOKENS = {"llama": SPECIAL_TOKENS} | {arch: ENDOFTEXT_TOKENS for arch in ("qwen2", "qwen3", "glm", "glm4")}
ARCH_EXTRA_TOKENS = {"glm": ("[gMASK]", "<sop>"), "glm4": ("[gMASK]", "<sop>")}
ARCHS = tuple(ARCH_SPECIAL_TOKENS)
# Characters every tokenizer gets even if the data lacks them: ASCII and common CJK punctuation,
# so that a user's new comment rarely hits <unk>.
BASE_CHARS = string.printable + "，。！？；：、“”‘’（）《》【】…—·～￥"


@dataclass
class TinyConfig:
    output_dir: str
    data_dir: str = "data"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 2048
    seed: int = 0
    arch: str = "llama"


def corpus_chars(data_dir: str | Path) -> list[str]:
    """All characters of the train and dev files (whole lines, so keys and fences are covered)."""
    chars = set(BASE_CHARS)
    for name in (TRAIN_FILE, DEV_FILE):
        path = Path(data_dir) / name
        if path.is_file():
            for line in path.open(encoding="utf-8"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                chars.update(str(row.get("context", "")))
                chars.update(str(row.get("target", "")))
    return sorted(chars)


def build_char_tokenizer(chars: list[str], arch: str = "llama"):
    """A fast tokenizer with one token per character and decoding that joins them back exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    special = ARCH_SPECIAL_TOKENS[arch]
    vocab = {}
    for tok in (*special.values(), *ARCH_EXTRA_TOKENS.get(arch, ())):
        if tok is not None:
            vocab.setdefault(tok, len(vocab))
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special["unk"]))
    # [\s\S] so newlines are characters too; every character is its own token.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return wrap_tokenizer(core, special, ARCH_EXTRA_TOKENS.get(arch, ()))


def wrap_tokenizer(core, special: dict = SPECIAL_TOKENS, extra: tuple[str, ...] = ()):
    """A transformers fast tokenizer around a tokenizers.Tokenizer with the given special tokens."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=special["pad"],
        unk_token=special["unk"],
        bos_token=special["bos"],
        eos_token=special["eos"],
        padding_side="left",
        # transformers 4.33 returns token_type_ids otherwise, which generate() rejects.
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    if extra:  # whole tokens, never split into characters, skipped when decoding answers
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    return tokenizer


def model_config(cfg: TinyConfig, tokenizer):
    """The architecture's own transformers config at tiny widths (grouped-query attention where the real
    models have it)."""
    import transformers

    if cfg.arch not in ARCHS:
        raise SystemExit(f"--arch {cfg.arch}: expected one of {', '.join(ARCHS)}")
    shared = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.arch == "llama":
        return transformers.LlamaConfig(**shared, tie_word_embeddings=False)
    class_name = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "glm": "GlmConfig", "glm4": "Glm4Config"}[cfg.arch]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        raise SystemExit(f"--arch {cfg.arch}: transformers {transformers.__version__} has no {class_name}; "
                         "it is on the modern lane (make venv LANE=modern)")
    head_dim = cfg.hidden_size // cfg.num_heads
    kv_heads = max(1, cfg.num_heads // 2)
    if cfg.arch == "qwen2":
        return config_class(**shared, num_key_value_heads=kv_heads, tie_word_embeddings=False)
    if cfg.arch == "qwen3":
        return config_class(**shared, num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=True)
    return config_class(**shared, num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=False)


def build_tiny(cfg: TinyConfig) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(corpus_chars(cfg.data_dir), cfg.arch)
    config = model_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "tiny_config.json").write_text(json.dumps(asdict(cfg), indent=2), encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny base model ({cfg.arch}): {n_params:,} parameters, vocab {len(tokenizer)} -> {out}")
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--hidden-size", type=int, default=TinyConfig.hidden_size)
    parser.add_argument("--num-layers", type=int, default=TinyConfig.num_layers)
    parser.add_argument("--num-heads", type=int, default=TinyConfig.num_heads)
    parser.add_argument("--intermediate-size", type=int, default=TinyConfig.intermediate_size)
    parser.add_argument("--seed", type=int, default=TinyConfig.seed)
    parser.add_argument("--arch", default=TinyConfig.arch, choices=ARCHS)
    args = parser.parse_args(argv)
    return build_tiny(TinyConfig(**vars(args)))


if __name__ == "__main__":
    main()
