"""loralite.Llama against transformers' LlamaForCausalLM (the reference), fp32."""

import dataclasses

import pytest
import torch

from conftest import hf_llama
from loralite.llama import Llama, LlamaConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CONFIGS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "llama3-rope": {"rope_scaling": LLAMA3_ROPE},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "dynamic-rope": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "head-dim": {"head_dim": 32},
}


def twin(**overrides):
    """The same random weights in transformers and in loralite."""
    hf = hf_llama(**overrides)
    model = Llama(LlamaConfig.from_dict(hf.config.to_dict())).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return hf, model


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    hf, model = twin(**CONFIGS[name])
    assert set(model.state_dict()) == set(hf.state_dict())
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=2e-4, rtol=0)


def test_scaled_rope_changes_logits():
    """Guards the test above: the scaling really reaches the rotary frequencies."""
    hf, model = twin(**CONFIGS["llama3-rope"])
    plain = Llama(dataclasses.replace(model.config, rope_scaling=None)).eval()
    plain.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        assert (plain(ids) - model(ids)).abs().max() > 1e-3


def test_left_padded_batch_matches_transformers():
    hf, model = twin()
    ids = torch.randint(0, 128, (3, 24))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=2e-4, rtol=0)
    assert torch.isfinite(ours).all()


def test_kv_cache_decode_equals_full_forward():
    _, model = twin()
    ids = torch.randint(0, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.make_cache(2, 64)
        steps = [model(ids[:, :20], attention_mask=mask[:, :20], cache=cache)]
        for t in range(20, 30):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    assert cache.length == 30
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=0)


def test_kv_cache_overflow_is_a_clear_error():
    _, model = twin()
    cache = model.make_cache(1, 8)
    with pytest.raises(ValueError, match="KV cache of 8 positions is full"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_packed_segments_equal_separate_sequences():
    _, model = twin()
    a, b = torch.randint(0, 128, (1, 11)), torch.randint(0, 128, (1, 6))
    packed = torch.cat([a, b], 1)
    segments = torch.tensor([[0] * 11 + [1] * 6])
    positions = torch.tensor([list(range(11)) + list(range(6))])
    with torch.no_grad():
        out = model(packed, position_ids=positions, segment_ids=segments)
        torch.testing.assert_close(out[:, :11], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 11:], model(b), atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = twin()
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_meta_device_sizes_llama2_70b_for_free():
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)
    with torch.device("meta"):
        model = Llama(config)
    assert sum(p.numel() for p in model.parameters()) == 68_976_648_192


def test_config_reads_both_transformers_rope_spellings():
    v5 = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "rope_parameters": {"rope_theta": 5e5, **LLAMA3_ROPE}}
    v4 = {**v5, "rope_theta": 5e5, "rope_scaling": LLAMA3_ROPE}
    del v4["rope_parameters"]
    assert LlamaConfig.from_dict(v5) == LlamaConfig.from_dict(v4)
    assert LlamaConfig.from_dict(v5).rope_scaling == LLAMA3_ROPE


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "gpt2"}, "not a Llama model"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn' is not supported"),
])
def test_config_errors_name_the_problem(bad, message):
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 4}
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_dict({**base, **bad})


def test_config_missing_field_is_named():
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.from_dict({"vocab_size": 10}, source="x/config.json")
