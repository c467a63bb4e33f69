"""Test double of ChatGLM-6B (v1)'s model, written from the documented behaviour of THUDM's code.

What it reproduces because the project relies on it: the module names LoRA targets (query_key_value),
2D position ids (position, block position) and a 4D boolean mask (True = masked: the prompt up to <sop>
is seen bidirectionally, the answer causally), both built from the <sop> and [gMASK] positions when the
caller passes none; generate() that extends them itself; an output layer tied to the input embeddings;
a KV cache laid out (seq, batch, heads, head_dim). It is small and slow-path only (no quantization,
no chat(), no gradient checkpointing).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_chatglm import ChatGLMConfig


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (seq, batch, heads, dim) at positions (batch, seq)."""
    dim = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions.transpose(0, 1).float()[..., None] * inv  # (seq, batch, dim/2)
    cos, sin = angles.cos()[:, :, None, :].to(x.dtype), angles.sin()[:, :, None, :].to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden, position_ids, mask, past):
        seq, batch, _ = hidden.shape
        q, k, v = self.query_key_value(hidden).view(seq, batch, self.heads, 3 * self.head_dim).chunk(3, dim=-1)
        half = self.head_dim // 2  # 2D positions: one half of each head rotates by position, one by block
        q = torch.cat([rotate(q[..., :half], position_ids[:, 0]), rotate(q[..., half:], position_ids[:, 1])], -1)
        k = torch.cat([rotate(k[..., :half], position_ids[:, 0]), rotate(k[..., half:], position_ids[:, 1])], -1)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=0), torch.cat([past[1], v], dim=0)
        scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(self.head_dim)
        scores = scores.float().masked_fill(mask, torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1).to(v.dtype)
        out = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(seq, batch, -1)
        return self.dense(out), (k, v)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)
        self.alpha = (2 * config.num_layers) ** 0.5  # v1 scales the residual branch (DeepNorm)

    def forward(self, hidden, position_ids, mask, past):
        normed = self.input_layernorm(hidden)
        attended, present = self.attention(normed, position_ids, mask, past)
        hidden = normed * self.alpha + attended
        normed = self.post_attention_layernorm(hidden)
        return normed * self.alpha + self.dense_4h_to_h(nn.functional.gelu(self.dense_h_to_4h(normed))), present


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def get_masks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, 1, seq, seq) bool, True = masked: bidirectional up to <sop>, causal after it."""
        batch, seq = input_ids.shape
        seen = torch.ones(batch, seq, seq, device=input_ids.device).tril()
        for row, ids in enumerate(input_ids.tolist()):
            context = ids.index(self.config.bos_token_id) if self.config.bos_token_id in ids else seq
            seen[row, :, :context] = 1
        return (seen < 0.5).unsqueeze(1)

    def get_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, 2, seq): position (the [gMASK] position for the answer) and block position."""
        batch, seq = input_ids.shape
        out = torch.zeros(batch, 2, seq, dtype=torch.long, device=input_ids.device)
        for row, ids in enumerate(input_ids.tolist()):
            context = ids.index(self.config.bos_token_id) if self.config.bos_token_id in ids else seq
            mask_id = self.config.mask_token_id if self.config.mask_token_id in ids else self.config.gmask_token_id
            out[row, 0] = torch.arange(seq)
            if mask_id in ids:
                out[row, 0, context:] = ids.index(mask_id)
            out[row, 1, context:] = torch.arange(1, seq - context + 1)
        return out


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None):
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids)
        if attention_mask is None or attention_mask.dtype != torch.bool:
            attention_mask = self.get_masks(input_ids)  # v1 ignores a 0/1 mask and builds its own
        embeds = inputs_embeds if inputs_embeds is not None else self.word_embeddings(input_ids)
        hidden = embeds.transpose(0, 1)  # (seq, batch, hidden)
        presents = []
        for i, layer in enumerate(self.layers):
            hidden, present = layer(hidden, position_ids, attention_mask,
                                    past_key_values[i] if past_key_values is not None else None)
            presents.append(present)
        return self.final_layernorm(hidden).transpose(0, 1), tuple(presents)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: ChatGLMConfig, empty_init: bool = True):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        hidden, presents = self.transformer(input_ids, position_ids, attention_mask, past_key_values, inputs_embeds)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=presents if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, **kwargs):
        if attention_mask is None or attention_mask.dtype != torch.bool:
            attention_mask = self.get_masks(input_ids)
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids)
        if past_key_values is not None:  # only the newest token, its mask row and its positions
            return {"input_ids": input_ids[:, -1:], "past_key_values": past_key_values, "use_cache": True,
                    "attention_mask": attention_mask[:, :, -1:], "position_ids": position_ids[..., -1:]}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "use_cache": True}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            standardize_cache_format=False):
        model_kwargs["past_key_values"] = outputs.past_key_values
        mask = model_kwargs.get("attention_mask")
        if mask is not None and mask.dtype == torch.bool:
            # Old rows do not see the new token; the new row sees what the last one saw, and itself.
            mask = torch.cat([mask, mask.new_ones((*mask.shape[:3], 1))], dim=3)
            row = mask[:, :, -1:].clone()
            row[..., -1] = False
            model_kwargs["attention_mask"] = torch.cat([mask, row], dim=2)
        positions = model_kwargs.get("position_ids")
        if positions is not None:
            new = positions[..., -1:].clone()
            new[:, 1] += 1  # the answer keeps the [gMASK] position and counts up its block position
            model_kwargs["position_ids"] = torch.cat([positions, new], dim=-1)
        return model_kwargs
