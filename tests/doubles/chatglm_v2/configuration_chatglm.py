"""Test double of ChatGLM2/3-6B's config: the field names and defaults the project and its code read."""

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, num_layers=2, padded_vocab_size=4096, hidden_size=64, ffn_hidden_size=128, kv_channels=16,
                 num_attention_heads=4, seq_length=1024, layernorm_epsilon=1e-5, add_qkv_bias=True,
                 multi_query_attention=True, multi_query_group_num=2, original_rope=True, pre_seq_len=None,
                 **kwargs):
        self.num_layers = num_layers
        self.vocab_size = padded_vocab_size  # the output layer's rows; more than the tokenizer has ids
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.original_rope = original_rope
        self.pre_seq_len = pre_seq_len
        super().__init__(**kwargs)
