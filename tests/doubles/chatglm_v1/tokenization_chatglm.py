"""Test double of ChatGLM-6B (v1)'s tokenizer, written from the documented behaviour of THUDM's code.

What the project relies on, and this double reproduces: a sentencepiece model whose text pieces include
'<n>' for a newline, '<|tab|>' and '<|blank_N|>' for runs of N spaces; special tokens far above the text
pieces ([MASK] 130000, [gMASK] 130001, <sop> 130004 = bos, <eop> 130005 = eos; pad '<pad>' = 3);
build_inputs_with_special_tokens(a, b) = a + [gMASK, <sop>] + b + [<eop>]; left padding that builds the
model's own 4D boolean attention mask and 2D position ids from the <sop> position.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

SPECIALS = {
    "[MASK]": 130000, "[gMASK]": 130001, "[sMASK]": 130002, "<unused_0>": 130003,
    "<sop>": 130004, "<eop>": 130005, "<ENC>": 130006, "<dBLOCK>": 130007,
}
VOCAB_SIZE = 130344  # ids between the text pieces and the specials decode to nothing, as image tokens do
MAX_BLANK = 80


def encode_whitespace(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return re.sub(" {2," + str(MAX_BLANK) + "}", lambda m: f"<|blank_{len(m.group())}|>", text)


def decode_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, bos_token="<sop>", eos_token="<eop>", mask_token="[MASK]",
                 gmask_token="[gMASK]", pad_token="<pad>", unk_token="<unk>", padding_side="left", **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.gmask_token = gmask_token
        super().__init__(bos_token=bos_token, eos_token=eos_token, mask_token=mask_token, pad_token=pad_token,
                         unk_token=unk_token, padding_side=padding_side, **kwargs)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def gmask_token_id(self) -> int:
        return SPECIALS[self.gmask_token]

    def get_vocab(self) -> dict:
        return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text, **kwargs):
        return self.sp.encode(encode_whitespace(text), out_type=str)

    def _convert_token_to_id(self, token):
        if token in SPECIALS:
            return SPECIALS[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        for token, i in SPECIALS.items():
            if i == index:
                return token
        if index < self.sp.get_piece_size():
            return self.sp.id_to_piece(index)
        return f"<unused_{index}>"

    def convert_tokens_to_string(self, tokens):
        text_pieces = [t for t in tokens if t not in SPECIALS and not t.startswith("<unused_")]
        return decode_whitespace(self.sp.decode_pieces(text_pieces))

    def _decode(self, token_ids, **kwargs):
        token_ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return super()._decode([i for i in token_ids if i != self.pad_token_id], **kwargs)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        target = os.path.join(save_directory, self.vocab_files_names["vocab_file"])
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = list(token_ids_0) + [SPECIALS["[gMASK]"], SPECIALS["<sop>"]]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [SPECIALS["<eop>"]]
        return ids

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of=None, return_attention_mask=None, **kwargs):
        ids = list(encoded_inputs["input_ids"])
        n = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST or max_length is None:
            max_length = n
        if pad_to_multiple_of and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        sop = SPECIALS["<sop>"]
        context = ids.index(sop) if sop in ids else n
        if "attention_mask" not in encoded_inputs:
            seen = np.tril(np.ones((1, n, n)))
            seen[:, :, :context] = 1  # the prompt is seen from everywhere; the answer only causally
            encoded_inputs["attention_mask"] = seen < 0.5  # True = masked
        if "position_ids" not in encoded_inputs:
            mask_id = SPECIALS["[MASK]"] if SPECIALS["[MASK]"] in ids else SPECIALS["[gMASK]"]
            positions = np.arange(n, dtype=np.int64)
            if mask_id in ids:
                positions[context:] = ids.index(mask_id)
            block = np.concatenate([np.zeros(context, dtype=np.int64), np.arange(1, n - context + 1, dtype=np.int64)])
            encoded_inputs["position_ids"] = np.stack([positions, block])
        pad = max_length - n
        if pad > 0:
            encoded_inputs["input_ids"] = [self.pad_token_id] * pad + ids
            encoded_inputs["attention_mask"] = np.pad(encoded_inputs["attention_mask"], ((0, 0), (pad, 0), (pad, 0)),
                                                      constant_values=True)
            encoded_inputs["position_ids"] = np.pad(encoded_inputs["position_ids"], ((0, 0), (pad, 0)))
        return encoded_inputs
