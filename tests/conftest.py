"""Shared fixtures: tiny random Llama checkpoints built with transformers (the reference)."""

import copy

import pytest
import torch


def hf_llama(**overrides):
    """A tiny random ``transformers.LlamaForCausalLM`` in fp32 (the independent reference)."""
    import transformers

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(copy.deepcopy(overrides))  # transformers edits rope dicts in place
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a missed norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def tiny_hf():
    return hf_llama()
