"""bitsandbytes 4-bit checkpoints in and out, and quantize-while-loading, against transformers + bitsandbytes.

transformers + bitsandbytes write and read the checkpoints; the stored tensors must be the same
bytes. The logits are checked against transformers' dense Llama on the weights the stored bytes
encode (``conftest.dequantize_by_definition``), not against bitsandbytes' CPU forward: on CPUs
with AVX-512, bitsandbytes 0.50.2's ``Linear4bit`` raises in ``_convert_weight_packed_for_cpu``
when a layer's in_features is not a multiple of the blocksize (here 96), and its dequantize is
wrong for such rows (see ``test_nf4``).
"""

import json

import pytest
import torch
import transformers

import loralite as ll
from conftest import dequantize_by_definition, hf_llama
from loralite.loading import CheckpointError, load_model, save_model
from loralite.quantize import Linear4bit

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
FP32_NF4 = ll.NF4Config(compute_dtype=torch.float32)


def hf_4bit(folder, double_quant=True, quant_type="nf4"):
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=double_quant,
                                          bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb, device_map="cpu", dtype=torch.float32).eval()


_QUANT_STATE_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.")


def dense_reference(state_dict: dict, config) -> transformers.LlamaForCausalLM:
    """transformers' dense Llama holding the weights that a bnb-4bit ``state_dict`` encodes."""
    dense = {}
    for key, value in state_dict.items():
        if any(part in key for part in _QUANT_STATE_PARTS):
            continue
        quantized = any(k.startswith(key + ".quant_state.") for k in state_dict)
        dense[key] = dequantize_by_definition(state_dict, key).float() if quantized else value.float()
    config = transformers.LlamaConfig.from_dict({k: v for k, v in config.to_dict().items()
                                                 if k != "quantization_config"})
    model = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def assert_same_4bit_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def dense(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    hf_llama(tie_word_embeddings=request.param).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("double_quant, quant_type", [(True, "nf4"), (False, "nf4"), (True, "fp4")])
def test_reads_bitsandbytes_checkpoints_as_stored(dense, tmp_path, double_quant, quant_type):
    ref = hf_4bit(dense, double_quant, quant_type)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert isinstance(ours.model.layers[0].mlp.up_proj, Linear4bit)
    assert not isinstance(ours.lm_head, Linear4bit)  # transformers keeps the head dense
    assert_same_4bit_tensors(ours.state_dict(), ref.state_dict())  # no dequantize/requantize round trip
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), dense_reference(ref.state_dict(), ref.config)(IDS).logits,
                                   atol=1e-5, rtol=0)


def test_quantize_while_loading_equals_bitsandbytes(dense):
    ours = load_model(dense, quantize=FP32_NF4)
    ref = hf_4bit(dense)
    assert_same_4bit_tensors(ours.state_dict(), ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), dense_reference(ref.state_dict(), ref.config)(IDS).logits,
                                   atol=1e-5, rtol=0)
    later = ll.quantize_model(load_model(dense), FP32_NF4)
    with torch.no_grad():
        assert torch.equal(ours(IDS), later(IDS))


def test_saved_4bit_folder_loads_in_transformers(dense, tmp_path):
    ours = load_model(dense, quantize=FP32_NF4)
    save_model(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    assert type(back.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    assert_same_4bit_tensors(ours.state_dict(), back.state_dict())  # what transformers loaded
    with torch.no_grad():
        torch.testing.assert_close(dense_reference(back.state_dict(), back.config)(IDS).logits, ours(IDS),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(load_model(tmp_path)(IDS), ours(IDS), atol=0, rtol=0)


def test_auto_compute_dtype_is_resolved_for_the_load_device(dense, monkeypatch):
    from loralite import precision

    for prefers_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda: prefers_bf16)
        model = load_model(dense, quantize=ll.NF4Config())  # compute_dtype="auto"
        assert {m.compute_dtype for m in model.modules() if isinstance(m, Linear4bit)} == {expected}


def test_already_quantized_with_quantize_is_an_error(dense, tmp_path):
    save_model(load_model(dense, quantize=FP32_NF4), tmp_path)
    with pytest.raises(ValueError, match="already 4-bit"):
        load_model(tmp_path, quantize=FP32_NF4)


def test_bad_quantization_config_names_the_file(dense, tmp_path):
    save_model(load_model(dense, quantize=FP32_NF4), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*not bitsandbytes 4-bit"):
        load_model(tmp_path)


def test_quantize_command_writes_a_folder_transformers_loads(tmp_path):
    from loralite.cli import main

    hf = hf_llama()
    hf.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer.json").write_text(_tiny_tokenizer_json())
    assert main(["quantize", str(tmp_path / "dense"), str(tmp_path / "q"), "--dtype", "float32",
                 "--compute-dtype", "float32"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu", dtype=torch.float32)
    ours = load_model(tmp_path / "q")
    assert_same_4bit_tensors(ours.state_dict(), back.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dense_reference(back.state_dict(), back.config)(IDS).logits, ours(IDS),
                                   atol=1e-5, rtol=0)


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0")).to_str()
