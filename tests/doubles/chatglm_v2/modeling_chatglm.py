"""Test double of ChatGLM2/3-6B's model, written from the documented behaviour of THUDM's code.

What it reproduces because the project relies on it: the module names LoRA targets
(self_attention.query_key_value, with a bias), multi-query attention (multi_query_group_num key/value
groups), rotary embedding on the first half of each head, RMSNorm whose weights the code leaves
uninitialised (torch.empty, and _init_weights does nothing: a checkpoint must hold them), an untied output
layer with padded_vocab_size rows (more than the tokenizer has ids), a 0/1 padding mask turned into a
boolean one inside the model, position ids counted per row, a KV cache laid out (seq, batch, groups,
head_dim), and generation that returns only the last position's logits. Small and slow-path only.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_chatglm import ChatGLMConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))  # as upstream: left uninitialised
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rotate_half_of_head(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first half of each head of x (seq, batch, heads, dim), adjacent pairs."""
    dim = x.shape[-1] // 2
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions.transpose(0, 1).float()[..., None] * inv  # (seq, batch, dim/2)
    cos, sin = angles.cos()[:, :, None, :].to(x.dtype), angles.sin()[:, :, None, :].to(x.dtype)
    rot, keep = x[..., :dim], x[..., dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    return torch.cat([torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2), keep], -1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.heads, self.groups, self.head_dim = (config.num_attention_heads, config.multi_query_group_num,
                                                  config.kv_channels)
        qkv = (self.heads + 2 * self.groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv, bias=config.add_qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden, mask, positions, past):
        seq, batch, _ = hidden.shape
        q, k, v = self.query_key_value(hidden).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1)
        q = rotate_half_of_head(q.view(seq, batch, self.heads, self.head_dim), positions)
        k = rotate_half_of_head(k.view(seq, batch, self.groups, self.head_dim), positions)
        v = v.view(seq, batch, self.groups, self.head_dim)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=0), torch.cat([past[1], v], dim=0)
        present = (k, v)
        repeat = self.heads // self.groups
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        scores = torch.einsum("sbhd,tbhd->bhst", q, k).float() / math.sqrt(self.head_dim)
        if mask is None:  # no padding: causal over the whole (past + new) sequence
            mask = torch.ones(seq, k.shape[0], dtype=torch.bool, device=q.device).tril(k.shape[0] - seq).logical_not()
        scores = scores.masked_fill(mask, torch.finfo(torch.float32).min)
        out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1).to(v.dtype), v).reshape(seq, batch, -1)
        return self.dense(out), present


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(nn.functional.silu(gate) * up)  # SwiGLU


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden, mask, positions, past):
        attended, present = self.self_attention(self.input_layernorm(hidden), mask, positions, past)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), present


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids).transpose(0, 1)  # (seq, batch, hidden)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        return  # as upstream: every weight must come from the checkpoint

    def get_masks(self, input_ids, past_key_values, padding_mask):
        """(batch, 1, seq, past + seq) bool, True = masked: causal, and never a pad."""
        batch, seq = input_ids.shape
        past = past_key_values[0][0].shape[0] if past_key_values else 0
        seen = torch.ones(batch, seq, seq, device=input_ids.device).tril()
        if past:
            seen = torch.cat([torch.ones(batch, seq, past, device=input_ids.device), seen], dim=-1)
        seen = seen * padding_mask.unsqueeze(1)
        if not past:
            seen -= padding_mask.unsqueeze(-1) - 1  # a pad row sees everything (its output is unused)
        return (seen < 0.5).unsqueeze(1)

    def get_position_ids(self, input_ids):
        batch, seq = input_ids.shape
        return torch.arange(seq, device=input_ids.device).unsqueeze(0).repeat(batch, 1)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init: bool = True):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=True):
        seq = input_ids.shape[1]
        hidden = inputs_embeds.transpose(0, 1) if inputs_embeds is not None else self.embedding(input_ids)
        mask = None
        if (attention_mask is not None and not attention_mask.all()) or (past_key_values and seq != 1):
            mask = self.get_masks(input_ids, past_key_values, attention_mask if attention_mask is not None
                                  else torch.ones_like(input_ids))
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids)
        presents = []
        for i, layer in enumerate(self.encoder.layers):
            hidden, present = layer(hidden, mask, position_ids, past_key_values[i] if past_key_values else None)
            presents.append(present)
        return self.encoder.final_layernorm(hidden), tuple(presents) if use_cache else None


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init: bool = True):
        super().__init__(config)
        self.transformer = ChatGLMModel(config, empty_init=empty_init)

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, return_last_logit=False):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        hidden, presents = self.transformer(input_ids, position_ids, attention_mask, past_key_values, inputs_embeds,
                                            use_cache)
        if return_last_logit:
            hidden = hidden[-1:]
        logits = self.transformer.output_layer(hidden).transpose(0, 1)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                                               ignore_index=-100).to(hidden.dtype)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=presents)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, position_ids=None,
                                      use_cache=None, is_first_forward=True, **kwargs):
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids)
        if not is_first_forward and past_key_values is not None:
            position_ids, input_ids = position_ids[..., -1:], input_ids[:, -1:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "position_ids": position_ids,
                "attention_mask": attention_mask, "return_last_logit": True, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            standardize_cache_format=False):
        model_kwargs["past_key_values"] = outputs.past_key_values
        if "attention_mask" in model_kwargs:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if "position_ids" in model_kwargs:
            positions = model_kwargs["position_ids"]
            model_kwargs["position_ids"] = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        model_kwargs["is_first_forward"] = False
        return model_kwargs
