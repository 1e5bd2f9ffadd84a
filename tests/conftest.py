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
