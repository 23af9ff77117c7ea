"""Tiny models built from transformers configs (no downloads), one case table for the common tests."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

VOCAB = 96
# name -> (config factory, causal LM class, sequence-classification class or None)
ARCHS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB),
    "qwen3": lambda: tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB),
    "mistral": lambda: tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        sliding_window=None),
    "gemma3": lambda: tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          vocab_size=VOCAB, sliding_window=8),
    "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                                vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=128),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=128),
}
CAUSAL = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
          "mistral": tf.MistralForCausalLM, "gemma3": tf.Gemma3ForCausalLM, "opt": tf.OPTForCausalLM,
          "gpt2": tf.GPT2LMHeadModel}
SEQ_CLS = {"llama": tf.LlamaForSequenceClassification, "qwen2": tf.Qwen2ForSequenceClassification,
           "opt": tf.OPTForSequenceClassification, "gpt2": tf.GPT2ForSequenceClassification}


def tiny_config(arch: str, **overrides):
    config = ARCHS[arch]()
    config.pad_token_id = 0
    config.eos_token_id = 1
    config.bos_token_id = 2
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return CAUSAL[arch](tiny_config(arch, **overrides)).eval()


def tiny_seq_cls(arch: str = "llama", seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    return SEQ_CLS[arch](tiny_config(arch, num_labels=num_labels)).eval()


def batch(seed: int = 1, size: int = 2, length: int = 12) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (size, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param
