"""Build a tiny random base model and a character tokenizer, locally, in seconds.

Tests and the CPU demo need a model of an architecture transformers 4.33.3 ships (Llama here)
and a tokenizer that covers every character of the data, without any download.

    python -m finetune.tiny --output-dir /tmp/tiny [--data-dir data]
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from core.dataset import DEV_FILE, TRAIN_FILE

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
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


def build_char_tokenizer(chars: list[str]):
    """A fast tokenizer with one token per character and decoding that joins them back exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    # [\s\S] so newlines are characters too; every character is its own token.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return wrap_tokenizer(core)


def wrap_tokenizer(core):
    """A transformers fast tokenizer around a tokenizers.Tokenizer with the project's special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        padding_side="left",
        # transformers 4.33 returns token_type_ids otherwise, which generate() rejects.
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def build_tiny(cfg: TinyConfig) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(corpus_chars(cfg.data_dir))
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "tiny_config.json").write_text(json.dumps(asdict(cfg), indent=2), encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny base model: {n_params:,} parameters, vocab {len(tokenizer)} -> {out}")
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
    args = parser.parse_args(argv)
    return build_tiny(TinyConfig(**vars(args)))


if __name__ == "__main__":
    main()
