"""Tiny randomly initialised causal LMs of each supported family, built in the test."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# family -> (model class, config factory, target modules, adapted modules per decoder layer)
FAMILIES = {
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**COMMON), LLAMA_TARGETS, 7),
    "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**COMMON), LLAMA_TARGETS, 7),
    "mistral": (tf.MistralForCausalLM, lambda: tf.MistralConfig(**COMMON), LLAMA_TARGETS, 7),
    "gemma": (tf.GemmaForCausalLM, lambda: tf.GemmaConfig(**COMMON, head_dim=8), LLAMA_TARGETS, 7),
    "gemma2": (
        tf.Gemma2ForCausalLM,
        lambda: tf.Gemma2Config(**COMMON, head_dim=8),
        LLAMA_TARGETS,
        7,
    ),
    "gemma3": (
        tf.Gemma3ForCausalLM,
        lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8),
        LLAMA_TARGETS,
        7,
    ),
    "phi3": (
        tf.Phi3ForCausalLM,
        lambda: tf.Phi3Config(**COMMON, pad_token_id=0),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        4,
    ),
    "gpt2": (
        tf.GPT2LMHeadModel,
        lambda: tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=64),
        ["c_attn", "c_proj", "c_fc"],
        4,
    ),
}


def build(family: str, seed: int = 0):
    cls, make_config, targets, per_layer = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(make_config()).eval()
    return model, targets, per_layer
