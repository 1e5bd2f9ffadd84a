"""loralite.quantize: Linear4bit forward/backward, saved tensors, state dicts vs bitsandbytes, quantize_model."""

import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from conftest import dequantize_by_definition  # noqa: E402
from loralite import nf4  # noqa: E402
from loralite.quantize import Linear4bit, NF4Config, quantize_model  # noqa: E402


def make_layer(in_features=128, out_features=96, bias=True, compute_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, Linear4bit.from_linear(linear, NF4Config(compute_dtype=compute_dtype))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_equal_dequantized_dense_linear(compute_dtype):
    linear, layer = make_layer(compute_dtype=compute_dtype)
    layer.bias.requires_grad_(True)
    w = layer.weight.dequantize(compute_dtype)
    x = torch.randn(3, 5, 128, dtype=compute_dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = linear.bias.detach().to(compute_dtype).requires_grad_(True)

    y = layer(x)
    y_ref = x_ref @ w.T + bias_ref  # matmul, then the bias add (rounded separately in bf16)
    assert y.dtype == compute_dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.allclose(layer.bias.grad.to(compute_dtype), bias_ref.grad, rtol=1e-2, atol=1e-2)


def test_output_takes_the_input_dtype():
    _, layer = make_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(2, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    w = layer.weight.dequantize(torch.bfloat16)
    assert torch.equal(y, (x.bfloat16() @ w.T + layer.bias.bfloat16()).float())


def test_output_under_autocast_takes_the_autocast_dtype_as_nn_linear():
    linear, layer = make_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(2, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), linear(x)
    assert y.dtype == expected.dtype == torch.bfloat16


def test_no_dequantized_weight_is_saved_for_backward():
    _, layer = make_layer(in_features=256, out_features=192, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    weight_shaped = [t for t in saved if t.is_floating_point() and t.numel() >= 192 * 256]
    assert weight_shaped == []
    y.sum().backward()
    assert x.grad.shape == x.shape

    # The same hook does see the weight when a naive layer dequantizes under autograd.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x @ layer.weight.dequantize(torch.bfloat16).T
    assert any(t.is_floating_point() and t.numel() == 192 * 256 for t in saved)


def test_state_dict_equals_bitsandbytes_linear4bit():
    linear, layer = make_layer(in_features=130, out_features=64)  # odd in_features
    ref = bnb.nn.Linear4bit(130, 64, bias=True, compress_statistics=True, quant_type="nf4")
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")  # quantization happens on the move, as in bitsandbytes
    ours, theirs = layer.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_bitsandbytes_state_dict_loads_and_round_trips():
    linear, _ = make_layer(in_features=64, out_features=48)
    ref = bnb.nn.Linear4bit(64, 48, bias=True, quant_type="fp4", compress_statistics=False)
    ref.load_state_dict(linear.state_dict())
    sd = ref.to("cpu").state_dict()

    layer = Linear4bit.from_bnb_state_dict(sd, "", compute_dtype=torch.float32)
    assert layer.weight.quant_type == "fp4" and not layer.weight.double_quant
    x = torch.randn(2, 64)
    # the definition, not bitsandbytes' CPU forward (see the test below)
    expected = x @ dequantize_by_definition(sd, "weight").T + sd["bias"]
    assert torch.allclose(layer(x), expected, atol=1e-5)

    _, other = make_layer(in_features=64, out_features=48, seed=1)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.weight.dequantize(), layer.weight.dequantize())
    assert torch.equal(other.bias, layer.bias)


@pytest.mark.parametrize("training", [False, True])
def test_forward_follows_the_format_where_bitsandbytes_cpu_does_not(training):
    """in_features = 96, not a multiple of the blocksize 64, so blocks span rows.

    On CPUs with AVX512-BF16, bitsandbytes 0.50.2's ``Linear4bit.forward`` in eval mode without
    gradients first repacks the weight (``_convert_weight_packed_for_cpu``) and raises for such
    shapes; in training its dequantize misreads the scales of such rows (see ``test_nf4``).
    loralite's layer must equal the definition on every CPU.
    """
    linear = nn.Linear(96, 64)
    ref = bnb.nn.Linear4bit(96, 64, bias=True, compress_statistics=True, quant_type="nf4",
                            compute_dtype=torch.float32)
    ref.load_state_dict(linear.state_dict())
    sd = ref.to("cpu").state_dict()
    layer = Linear4bit.from_bnb_state_dict(sd, "", compute_dtype=torch.float32).train(training)
    x = torch.randn(3, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ dequantize_by_definition(sd, "weight").T + sd["bias"],
                                   atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.state_dict()["weight"], sd["weight"])


def test_load_state_dict_errors():
    _, layer = make_layer()
    _, smaller = make_layer(in_features=64, out_features=96)
    with pytest.raises(RuntimeError, match="shape"):
        layer.load_state_dict(smaller.state_dict())
    sd = layer.state_dict()
    sd["weight.unexpected"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="weight.unexpected"):
        layer.load_state_dict(sd)
    del sd["weight.unexpected"], sd["weight.absmax"]
    with pytest.raises(RuntimeError, match="weight.absmax"):
        layer.load_state_dict(sd)


def test_load_state_dict_assign_on_meta():
    _, layer = make_layer()
    with torch.device("meta"):
        empty = Linear4bit(nf4.quantize(torch.empty(96, 128)), torch.empty(96), torch.float32)
    empty.load_state_dict(layer.state_dict(), assign=True)
    assert empty.weight.device.type == "cpu" and empty.bias.device.type == "cpu"
    assert torch.equal(empty(torch.ones(1, 128)), layer(torch.ones(1, 128)))


def test_module_to_moves_weight_and_keeps_scales_float32():
    _, layer = make_layer()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert layer.weight.code.dtype == torch.float32 and layer.weight.nested_absmax.dtype == torch.float32
    layer.to("meta")
    assert layer.weight.data.device.type == "meta" and layer.bias.device.type == "meta"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64, bias=False))
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, ids):
        return self.lm_head(self.mlp(self.embed(ids)))


def dequantized_copy(model, skip=("lm_head",)):
    """A dense copy of ``model`` whose linears hold their NF4-rounded weights: the exact reference."""
    reference = copy.deepcopy(model)
    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip:
            module.weight.data = nf4.quantize(module.weight.data).dequantize()
    return reference


def test_quantize_model_swaps_linears_in_place_except_skipped():
    torch.manual_seed(0)
    model = Tiny()
    reference = dequantized_copy(model)
    assert quantize_model(model, NF4Config(compute_dtype=torch.float32)) is model
    assert isinstance(model.mlp[0], Linear4bit) and isinstance(model.mlp[2], Linear4bit)
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.mlp[0].dequantize_weight(), reference.mlp[0].weight)
    assert model.mlp[2].bias is None
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids), atol=1e-6)
    keys = model.state_dict().keys()
    assert "mlp.0.weight.quant_state.bitsandbytes__nf4" in keys and "lm_head.weight" in keys

    whole = quantize_model(Tiny(), NF4Config(skip_modules=()))
    assert isinstance(whole.lm_head, Linear4bit)
    with pytest.raises(ValueError, match="from_linear"):
        quantize_model(nn.Linear(64, 64))


def test_quantize_model_on_llama():
    llama = pytest.importorskip("loralite.llama")
    config = llama.LlamaConfig.from_dict(dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    torch.manual_seed(0)
    model = llama.Llama(config)
    reference = dequantized_copy(model)
    quantize_model(model, NF4Config(compute_dtype=torch.float32))
    swapped = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(swapped) == 2 * 7 and not isinstance(model.lm_head, Linear4bit)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids), atol=1e-5)


def test_config_validation_and_hf_quantization_config():
    with pytest.raises(ValueError, match="blocksize"):
        NF4Config(blocksize=100)
    with pytest.raises(ValueError, match="quant_type"):
        NF4Config(quant_type="int8")
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="compute_dtype"):
        NF4Config(compute_dtype="fast")
    ours = NF4Config(compute_dtype=torch.bfloat16).to_hf_quantization_config()
    theirs = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"]).to_dict()
    assert ours == theirs
    assert NF4Config.from_hf_quantization_config(theirs) == NF4Config(compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="load_in_4bit"):
        NF4Config.from_hf_quantization_config({"quant_method": "bitsandbytes", "load_in_8bit": True})


@pytest.mark.parametrize("prefers_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_compute_dtype_is_fixed_when_the_layer_is_built(monkeypatch, prefers_bf16, expected):
    from loralite import precision

    monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda: prefers_bf16)
    assert NF4Config().compute_dtype == "auto"
    layer = Linear4bit.from_linear(nn.Linear(64, 32), NF4Config())
    assert layer.compute_dtype == expected
    written = NF4Config().to_hf_quantization_config()["bnb_4bit_compute_dtype"]
    assert written == str(expected).removeprefix("torch.")


def test_quantize_model_refuses_a_model_with_lora():
    import loralite as ll

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    ll.add_lora(model, ll.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    with pytest.raises(ValueError, match="'0' already carries LoRA adapters"):
        ll.quantize_model(model, ll.NF4Config())


def test_non_finite_weights_are_refused_with_the_module_name_under_double_quant():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight[3, 5] = float("nan")
    wrapper = torch.nn.Module()
    wrapper.body = model
    with pytest.raises(ValueError, match=r"'body.1'.*1 of 64 blocks.*inf or NaN.*double_quant=False"):
        quantize_model(wrapper, NF4Config())
