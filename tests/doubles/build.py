"""Build a tiny ChatGLM directory from a test double: remote code + a locally trained sentencepiece model +
config.json with an auto_map + random weights, loaded by the project exactly as a user's ChatGLM dir is
(AutoModel/AutoTokenizer with trust_remote_code from a local path).

    python -m tests.doubles.build chatglm_v1|chatglm2|chatglm3 OUT_DIR [--data-dir data]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from core.dataset import DEV_FILE, TRAIN_FILE

HERE = Path(__file__).resolve().parent
KINDS = {"chatglm_v1": "chatglm_v1", "chatglm2": "chatglm_v2", "chatglm3": "chatglm_v2"}
DOUBLES = list(KINDS)
MAX_BLANK = 80


def write_corpus(data_dir: Path, path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for name in (TRAIN_FILE, DEV_FILE):
            for line in (data_dir / name).open(encoding="utf-8"):
                row = json.loads(line)
                for text in (row["context"], row["target"]):
                    out.writelines(part + "\n" for part in text.split("\n") if part.strip())


def train_sentencepiece(kind: str, data_dir: Path, out: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        write_corpus(data_dir, corpus)
        if kind == "chatglm_v1":
            # ChatGLM-6B: unigram, NFKC-normalised (full-width punctuation becomes ASCII), newline/tab/blank
            # runs as their own pieces, pad 3.
            prefix = Path(tmp) / "ice_text"
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
                character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                pad_piece="<pad>", minloglevel=2,
                user_defined_symbols=["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)])
            target = out / "ice_text.model"
        else:
            # ChatGLM2/3: BPE with byte fallback, no normalisation, whitespace kept.
            prefix = Path(tmp) / "tokenizer"
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
                character_coverage=0.9995, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
            target = out / "tokenizer.model"
        shutil.copyfile(str(prefix) + ".model", target)
    return target


def configs(kind: str, n_pieces: int) -> tuple[dict, dict]:
    if kind == "chatglm_v1":
        config = {
            "model_type": "chatglm", "architectures": ["ChatGLMForConditionalGeneration"],
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "vocab_size": 130528, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
            "inner_hidden_size": 64, "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000,
            "gmask_token_id": 130001, "pad_token_id": 3, "position_encoding_2d": True, "torch_dtype": "float32",
        }
        tokenizer = {"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left",
                     "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
        return config, tokenizer
    n_special = 9 if kind == "chatglm3" else 5
    config = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        # Rounded up past the tokenizer, as in the real 65024-row models: rows no token maps to.
        "padded_vocab_size": (n_pieces + n_special + 64) // 64 * 64, "hidden_size": 32, "num_layers": 2,
        "num_attention_heads": 4, "kv_channels": 8, "multi_query_attention": True, "multi_query_group_num": 2,
        "ffn_hidden_size": 64, "seq_length": 1024, "add_qkv_bias": True, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    }
    tokenizer = {"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left", "chatglm3": kind == "chatglm3",
                 "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    return config, tokenizer


def init_weights(model, seed: int) -> None:
    """Every weight explicitly: ChatGLM2/3 leave theirs (RMSNorm included) to the checkpoint."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.fill_(1.0) if name.endswith("weight") else param.zero_()
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def build(kind: str, out: Path, data_dir: Path, vocab_size: int = 4000, seed: int = 0) -> Path:
    import sentencepiece as spm
    from transformers import AutoConfig, AutoModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for code in (HERE / KINDS[kind]).glob("*.py"):
        shutil.copyfile(code, out / code.name)
    sp_model = train_sentencepiece(kind, Path(data_dir), out, vocab_size)
    config, tokenizer = configs(kind, spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(out), trust_remote_code=True),
                                  trust_remote_code=True)
    init_weights(model, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("out")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args(argv)
    out = build(args.kind, Path(args.out), Path(args.data_dir))
    print(f"built {args.kind} double at {out}")
    return out


if __name__ == "__main__":
    main()
