"""Shared fixtures: tiny random Llama checkpoints built with transformers (the reference)."""

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU tensors. It must be on before the
    # first `import loralite.kernels` decorates them, whichever test module imports it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct, loaded by loralite in fp32 (shared: it takes seconds)."""
    from loralite.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def default_tokenizer():
    from loralite.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def hf_default_tokenizer():
    """transformers' tokenizer built from the default GGUF vocabulary (shared: it takes ~25 s)."""
    import transformers

    from loralite.gguf import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_default(hf_default_tokenizer):
    """transformers' own reading of the same GGUF file: (model, tokenizer), the reference."""
    import transformers

    from loralite.gguf import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = hf_default_tokenizer
    return model, tok


def dequantize_by_definition(state_dict: dict, key: str) -> torch.Tensor:
    """The dense tensor of the bnb-4bit entry ``key``, computed from the format's definition alone.

    The reference for every dequantized value in the tests: ``code[nibble_j] * absmax[j // blocksize]``
    in float32, rounded once to the stored dtype, with two nibbles a byte (the first element in the
    high nibble) and, under double quantization,
    ``absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[b // nested_blocksize] + nested_offset``.
    It reads only the stored tensors and the JSON quant state, never bitsandbytes' kernels: on CPUs
    with AVX-512, bitsandbytes 0.50.2's own CPU dequantize is wrong for blocks that span rows
    (see ``test_nf4.test_dequantize_follows_the_format_where_bitsandbytes_cpu_does_not``).
    """
    import json

    state_key = next(k for k in state_dict if k.startswith(key + ".quant_state.bitsandbytes__"))
    state = json.loads(bytes(state_dict[state_key].tolist()))
    packed = state_dict[key].reshape(-1)
    numel = 1
    for size in state["shape"]:
        numel *= size
    nibbles = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:numel].long()  # (numel,)
    absmax = state_dict[key + ".absmax"]
    if "nested_offset" in state:  # double quantization: 8-bit block scales
        nested = state_dict[key + ".nested_quant_map"][absmax.long()]  # (blocks,)
        per_block = state_dict[key + ".nested_absmax"].repeat_interleave(state["nested_blocksize"])
        absmax = nested * per_block[:nested.numel()] + state["nested_offset"]
    values = state_dict[key + ".quant_map"][nibbles]  # (numel,) float32
    scales = absmax.float().repeat_interleave(state["blocksize"])[:numel]
    dtype = getattr(torch, state["dtype"])
    return (values * scales).to(dtype).reshape(state["shape"])
