"""Test double of ChatGLM2-6B / ChatGLM3-6B's tokenizer, written from the documented behaviour of THUDM's code.

What the project relies on, and this double reproduces: a BPE sentencepiece model with byte fallback
(a newline is the piece '<0x0A>'); unk = pad = 0, bos 1, eos 2 ('</s>'); special tokens appended after the
sentencepiece ids ([MASK], [gMASK], [sMASK], sop, eop, and for ChatGLM3 the role tokens); get_prefix_tokens()
= [gMASK, sop]; build_inputs_with_special_tokens(a, b) = prefix + a + b + [eos]; left padding with a 0/1
attention mask and position ids counted from 0 after the pads. ChatGLM2 turns its special ids (and eos,
bos, pad) into the empty token string; ChatGLM3 names its special tokens ("[gMASK]") and only turns eos, bos
and pad into "". Set by `chatglm3` in tokenizer_config.json.
"""

from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, chatglm3=False, **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.chatglm3 = chatglm3
        names = SPECIALS + (ROLE_TOKENS if chatglm3 else [])
        self.special_ids = {name: self.sp.get_piece_size() + k for k, name in enumerate(names)}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         chatglm3=chatglm3, **kwargs)

    # The special tokens are properties, as upstream: they are not registered added tokens.
    @property
    def unk_token(self):
        return "<unk>"

    @property
    def pad_token(self):
        return "<unk>"

    @property
    def pad_token_id(self):
        return self.sp.unk_id()

    @property
    def eos_token(self):
        return "</s>"

    @property
    def eos_token_id(self):
        return self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.special_ids)

    def get_command(self, token: str) -> int:
        return {"<bos>": self.sp.bos_id(), "<eos>": self.sp.eos_id(), "<pad>": self.sp.unk_id()}.get(
            token, self.special_ids.get(token))

    def get_prefix_tokens(self) -> list[int]:
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def get_vocab(self) -> dict:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        if token in self.special_ids:
            return self.special_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        if index in self.special_names:
            return self.special_names[index] if self.chatglm3 else ""
        if index in (self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id()) or index < 0:
            return ""
        if self.chatglm3 and index > self.sp.get_piece_size():
            return ""  # ChatGLM3 maps ids past its tokens to ""; ChatGLM2's sentencepiece raises on them
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        return self.sp.decode_pieces([t for t in tokens if t and t not in self.special_ids])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        target = os.path.join(save_directory, self.vocab_files_names["vocab_file"])
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of=None, return_attention_mask=None, **kwargs):
        ids = list(encoded_inputs["input_ids"])
        n = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST or max_length is None:
            max_length = n
        if pad_to_multiple_of and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        encoded_inputs.setdefault("attention_mask", [1] * n)
        encoded_inputs.setdefault("position_ids", list(range(n)))
        pad = max_length - n if padding_strategy != PaddingStrategy.DO_NOT_PAD else 0
        if pad > 0:
            encoded_inputs["input_ids"] = [self.pad_token_id] * pad + ids
            encoded_inputs["attention_mask"] = [0] * pad + list(encoded_inputs["attention_mask"])
            encoded_inputs["position_ids"] = [0] * pad + list(encoded_inputs["position_ids"])
        return encoded_inputs
