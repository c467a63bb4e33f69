"""Input layouts per family. ChatGLM-6B's own code cannot run here, so its layout is tested with a
tokenizer double that has the same special tokens and build_inputs_with_special_tokens."""

from types import SimpleNamespace

import pytest

from core import dataset, families
from core.families import CAUSAL, CHATGLM, CHATGLM2, detect_family
from finetune import data as D

GMASK, SOP, EOP, PAD = 130001, 130004, 130005, 3


class ChatGLM6BTokenizerDouble:
    """Same ids and layout as ChatGLM-6B v1's tokenizer: a + [gMASK, <sop>] + b + [<eop>]."""

    bos_token_id, eos_token_id, pad_token_id = SOP, EOP, PAD

    def encode(self, text, add_special_tokens=True):
        ids = [20 + ord(ch) % 100000 for ch in text]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = token_ids_0 + [GMASK, SOP]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [EOP]
        return ids


class ChatGLM2TokenizerDouble(ChatGLM6BTokenizerDouble):
    bos_token_id, eos_token_id = None, 2

    def get_prefix_tokens(self):
        return [64790, 64792]  # [gMASK], sop


@pytest.fixture(scope="module")
def examples(data_dir):
    return dataset.load_split(data_dir, "train")


@pytest.mark.parametrize("max_source, max_target", [(400, 300), (50, 30), (20, 5), (8, 2)])
def test_chatglm_v1_layout_survives_truncation(examples, max_source, max_target):
    tok = ChatGLM6BTokenizerDouble()
    for ex in examples:
        row = D.tokenize_example(ex, tok, CHATGLM, max_source, max_target)
        ids, labels = row["input_ids"], row["labels"]
        assert ids.count(GMASK) == 1 and ids.count(SOP) == 1  # the model locates <sop> in every row
        sop = ids.index(SOP)
        assert ids[sop - 1] == GMASK
        assert all(label == families.IGNORE_INDEX for label in labels[: sop + 1])  # prompt, [gMASK], <sop>
        answer = tok.encode(ex.target, add_special_tokens=False)
        assert labels[sop + 1] == answer[0]  # the first target is the first answer token
        assert labels[-1] == EOP and ids[-1] == EOP
        assert len(ids) <= max_source + 2 + max_target


def test_chatglm_generation_ids_end_with_gmask_sop():
    tok = ChatGLM6BTokenizerDouble()
    assert CHATGLM.build_generation_ids(tok, [50, 51]) == [50, 51, GMASK, SOP]


def test_chatglm2_layout_prefix_then_prompt_then_answer_then_eos():
    tok = ChatGLM2TokenizerDouble()
    ids, labels = CHATGLM2.build_training_ids(tok, [50, 51], [60, 61])
    assert ids == [64790, 64792, 50, 51, 60, 61, 2]
    assert labels == [families.IGNORE_INDEX] * 4 + [60, 61, 2]
    assert CHATGLM2.build_generation_ids(tok, [50]) == [64790, 64792, 50]


def test_detect_family():
    assert detect_family(SimpleNamespace(model_type="chatglm")) is CHATGLM
    assert detect_family(SimpleNamespace(model_type="chatglm", multi_query_attention=True)) is CHATGLM2
    assert detect_family(SimpleNamespace(model_type="llama")) is CAUSAL
    assert CHATGLM.lora_targets == ("query_key_value",) and not CHATGLM.attention_mask_in_training
