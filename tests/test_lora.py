"""LoRA layers against PEFT (the reference) on small modules and a tiny Llama."""

import math

import pytest
import torch
from conftest import hf_llama
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn

import loralite.lora as ll
from loralite.llama import Linear, Llama, LlamaConfig
from loralite.quantize import Linear4bit, NF4Config, quantize_model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 8, bias=False)
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(16, 32), "down_proj": nn.Linear(32, 16)})

    def forward(self, x):
        x = x + torch.cat([self.q_proj(x)[..., :8], self.v_proj(x)], -1)
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](x)))


class Tiny(nn.Module):
    """A custom (non-transformers) model: an embedding, two blocks and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 16)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 20, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)


IDS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
TARGETS = [
    dict(target_modules=["q_proj", "up_proj"]),
    dict(target_modules=r"model\.layers\.\d\.(q|v)_proj"),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "v_proj", "mlp.up_proj"], exclude_modules=["layers.0.v_proj"]),
    dict(target_modules=["up_proj", "down_proj"], exclude_modules=r".*0\.mlp\.up_proj"),
]


def wrapped(model) -> set[str]:
    return {n.removeprefix("base_model.model.").removesuffix(".lora_A")
            for n, _ in model.named_modules() if n.endswith(".lora_A")}


def copy_adapter(peft_model, ours, name="default"):
    """Give loralite the same (random, non-zero) adapter weights as the PEFT model."""
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
        ref = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items()}
        for n, p in ours.named_parameters():
            if ".lora_" in n:
                p.copy_(ref[n.replace(f".{name}.", ".default.")])


@pytest.mark.parametrize("targets", TARGETS)
def test_targeting_and_outputs_match_peft(targets):
    peft_model = get_peft_model(Tiny(), PeftLoraConfig(r=4, lora_alpha=6, **targets))
    ours = ll.add_lora(Tiny(), ll.LoraConfig(r=4, alpha=6, **targets))
    assert wrapped(ours) == wrapped(peft_model)
    copy_adapter(peft_model, ours)
    torch.testing.assert_close(ours(IDS), peft_model(IDS), atol=1e-5, rtol=0)
    assert ll.trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()


def test_all_linear_skips_the_head_and_keeps_names():
    ours = ll.add_lora(Tiny(), ll.LoraConfig(r=2, target_modules="all-linear"))
    assert wrapped(ours) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("q_proj", "v_proj", "mlp.up_proj",
                                                                         "mlp.down_proj")}
    keys = set(ours.state_dict())
    assert "model.layers.0.q_proj.base_layer.weight" in keys and "model.layers.0.q_proj.lora_A.default.weight" in keys
    assert "lm_head.weight" in keys
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n in keys if ".lora_A." in n or ".lora_B." in n}


def test_init_matches_peft_distributions():
    torch.manual_seed(0)
    layer = ll.add_lora(Tiny(), ll.LoraConfig(r=64, target_modules=["up_proj"])).model.layers[0].mlp["up_proj"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert torch.all(b == 0) and a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    layer = ll.add_lora(Tiny(), ll.LoraConfig(r=64, init="gaussian", target_modules=["up_proj"])).model.layers[0].mlp[
        "up_proj"]
    assert abs(layer.lora_A["default"].weight.std().item() - 1 / 64) < 0.15 / 64


def test_rslora_and_patterns_set_scale():
    config = ll.LoraConfig(r=4, alpha=8, use_rslora=True, rank_pattern={"layers.1.q_proj": 16},
                           alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"])
    model = ll.add_lora(Tiny(), config)
    assert model.model.layers[0].q_proj.scaling["default"] == 8 / 2
    assert model.model.layers[1].q_proj.scaling["default"] == 8 / 4
    assert model.model.layers[1].q_proj.lora_A["default"].out_features == 16
    assert model.model.layers[0].v_proj.scaling["default"] == 3 / 2


def test_dropout_only_in_training():
    model = ll.add_lora(Tiny(), ll.LoraConfig(r=4, dropout=0.5, target_modules=["q_proj"]))
    copy_lora_b_random(model)
    model.eval()
    torch.testing.assert_close(model(IDS), model(IDS), atol=0, rtol=0)
    model.train()
    assert not torch.equal(model(IDS), model(IDS))
    with ll.disable_adapters(model):  # the base path has no dropout
        torch.testing.assert_close(model(IDS), model(IDS), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["auto", "reference"])  # loralite._C's operator when built; torch's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_dropout_statistics_gradient_and_seeding(mode, dtype, monkeypatch):
    """Inverted dropout: P(keep) = 1 - p, kept values scaled by 1 / (1 - p), the gradient through the
    same mask, bool masks saved for backward, and torch.manual_seed reproducing the masks."""
    from loralite.lora_layer import _Dropout

    monkeypatch.setenv("LORALITE_KERNELS", mode)
    p, n = 0.3, 200_000
    x = (torch.rand(n) + 1).to(dtype).requires_grad_()  # no zeros: a zero output means dropped
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _Dropout.apply(x, p)
    assert [t.dtype for t in saved] == [torch.bool]  # the mask, one byte an element
    keep = y != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5  # 4 sigma
    expected = (x.detach().float() / (1 - p)).to(dtype)
    torch.testing.assert_close(y[keep], expected[keep], rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=0)
    g = torch.randn(n).to(dtype)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(keep, g.float() / (1 - p), 0).to(dtype),
                               rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=0)
    torch.manual_seed(7)
    first = _Dropout.apply(x.detach(), p)
    second = _Dropout.apply(x.detach(), p)
    torch.manual_seed(7)
    assert torch.equal(_Dropout.apply(x.detach(), p), first) and not torch.equal(first, second)


def test_lora_dropout_masks_are_independent_of_the_thread_count():
    from loralite.lora_layer import _Dropout

    x = torch.ones(100_003)
    masks = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(3)
            masks.append(_Dropout.apply(x, 0.1))
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(*masks)


def test_lora_dropout_masks_repeat_under_gradient_checkpointing():
    """Checkpointing recomputes each layer in backward; the dropout seeds come from torch's generator,
    whose state checkpointing restores, so the recomputed masks are the forward's: same gradients."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    base = Llama(config)
    ids = torch.randint(0, 64, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = Llama(config)
        model.load_state_dict(base.state_dict())
        torch.manual_seed(1)
        ll.add_lora(model, ll.LoraConfig(r=4, dropout=0.3, target_modules="all-linear", init=False))
        model.train().gradient_checkpointing = checkpointing
        torch.manual_seed(5)
        model(ids).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(grads[0]) == 28
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def copy_lora_b_random(model):
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.copy_(torch.randn_like(p) * 0.3)


def test_bf16_autocast_and_bf16_inputs():
    model = ll.add_lora(Tiny(), ll.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"]))
    copy_lora_b_random(model)
    layer, x = model.model.layers[0].q_proj, torch.randn(5, 16)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    layer.base_layer.to(torch.bfloat16)  # bf16 base and input, float32 adapter weights
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


def test_several_adapters_set_disable_delete():
    model = Tiny()
    base_keys, base_out = list(model.state_dict()), model(IDS)
    ll.add_lora(model, ll.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), "a")
    ll.add_lora(model, ll.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "up_proj"]), "b")
    copy_lora_b_random(model)
    q = model.model.layers[0].q_proj
    x = torch.randn(4, 16)
    delta = {n: q.delta_weight(n) for n in ("a", "b")}
    base = q.base_layer(x)
    torch.testing.assert_close(q(x), base + x @ delta["a"].T)  # only the first adapter is active
    ll.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(q(x), base + x @ (delta["a"] + delta["b"]).T)
    ll.set_adapter(model, "b")
    assert not q.lora_A["a"].weight.requires_grad and q.lora_A["b"].weight.requires_grad
    with ll.disable_adapters(model):
        torch.testing.assert_close(model(IDS), base_out)
    ll.delete_adapter(model, "b")
    ll.delete_adapter(model, "a")
    assert list(model.state_dict()) == base_keys
    torch.testing.assert_close(model(IDS), base_out)


@pytest.mark.parametrize("kind", ["linear", "cat"])
def test_add_weighted_adapter_matches_peft(kind):
    peft_model = get_peft_model(Tiny(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    peft_model.add_adapter("b", PeftLoraConfig(r=4 if kind == "linear" else 2, lora_alpha=3, target_modules=["q_proj"]))
    ours = ll.add_lora(Tiny(), ll.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    ll.add_lora(ours, ll.LoraConfig(r=4 if kind == "linear" else 2, alpha=3, target_modules=["q_proj"]), "b")
    with torch.no_grad():
        ref = dict(peft_model.named_parameters())
        for n, p in ref.items():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
        for n, p in ours.named_parameters():
            if ".lora_" in n:
                p.copy_(ref["base_model.model." + n])
    peft_model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "mix", combination_type=kind)
    ll.add_weighted_adapter(ours, ["a", "b"], [0.7, -1.3], "mix", combination_type=kind)
    peft_model.set_adapter("mix")
    ll.set_adapter(ours, "mix")
    for n, layer in ll.lora_layers(ours):
        torch.testing.assert_close(layer.delta_weight("mix"), peft_model.get_submodule(
            "base_model.model." + n).get_delta_weight("mix"))
    torch.testing.assert_close(ours(IDS), peft_model(IDS), atol=1e-5, rtol=0)


def test_merge_unmerge_identity_and_idempotent():
    model = ll.add_lora(Tiny(), ll.LoraConfig(r=4, alpha=8, target_modules="all-linear", bias="all"))
    copy_lora_b_random(model)
    w0 = model.model.layers[0].q_proj.base_layer.weight.clone()
    out = model(IDS)
    ll.merge(model)
    merged_w = model.model.layers[0].q_proj.base_layer.weight.clone()
    torch.testing.assert_close(model(IDS), out, atol=1e-5, rtol=0)
    ll.merge(model)  # twice: no change
    assert torch.equal(model.model.layers[0].q_proj.base_layer.weight, merged_w)
    torch.testing.assert_close(merged_w, w0 + model.model.layers[0].q_proj.delta_weight("default"))
    ll.unmerge(model)
    ll.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].q_proj.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(IDS), out, atol=1e-5, rtol=0)


def test_merge_and_unload_gives_plain_linears():
    model = ll.add_lora(Tiny(), ll.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                              modules_to_save=["lm_head"]))
    copy_lora_b_random(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(2)
    out = model(IDS)
    plain = ll.merge_and_unload(model)
    plain_types = (Tiny, Block, nn.Module, nn.ModuleList, nn.ModuleDict, nn.Linear, nn.Embedding)
    assert all(type(m) in plain_types for m in plain.modules())
    assert set(plain.state_dict()) == set(Tiny().state_dict())
    torch.testing.assert_close(plain(IDS), out, atol=1e-5, rtol=0)


def test_only_adapter_parameters_get_gradients_and_train():
    hf = hf_llama()
    model = Llama(LlamaConfig.from_dict(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    ll.add_lora(model, ll.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or ".modules_to_save." in n}
    assert len(trainable) == 2 * 2 * 2 + 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 128, (2, 12))
    loss = nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    b = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.all(b == 0)
    optimizer.step()
    assert b.abs().max() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="target_modules"):
        ll.LoraConfig(r=4)
    for bad, match in [(dict(r=0), "positive"), (dict(bias="some"), "bias"), (dict(dropout=1.0), "dropout"),
                       (dict(init="pissa"), "init"), (dict(rank_pattern={"q_proj": -1}), "rank_pattern")]:
        with pytest.raises(ValueError, match=match):
            ll.LoraConfig(**{"target_modules": ["q_proj"], **bad})
    model = Tiny()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="'c_attn'.*matched no module"):
        ll.add_lora(model, ll.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="'embed', a Embedding"):
        ll.add_lora(model, ll.LoraConfig(target_modules=["embed", "q_proj"]))
    with pytest.raises(ValueError, match="'mlp'.*ModuleDict"):
        ll.add_lora(model, ll.LoraConfig(target_modules=["mlp"]))
    assert list(model.state_dict()) == keys
    ll.add_lora(model, ll.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'default' already exists"):
        ll.add_lora(model, ll.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'nope'"):
        ll.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="equal ranks"):
        ll.add_lora(model, ll.LoraConfig(r=2, target_modules=["q_proj"]), "b")
        ll.add_weighted_adapter(model, ["default", "b"], [1, 1], "mix")


def qlora_pair():
    """The same LoRA over an NF4 base and over that base dequantized (float32 compute)."""
    torch.manual_seed(0)
    nf4_model = quantize_model(Tiny(), NF4Config(compute_dtype=torch.float32, skip_modules=("lm_head",)))
    dense = Tiny()
    for name, module in nf4_model.named_modules():
        if isinstance(module, Linear4bit):
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(module.dequantize_weight())
    config = ll.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"])
    ll.add_lora(nf4_model, config), ll.add_lora(dense, config)
    copy_lora_b_random(dense)
    with torch.no_grad():
        reference = dict(dense.named_parameters())
        for name, p in nf4_model.named_parameters():
            p.copy_(reference[name])  # the adapters, biases and the dense head
    return nf4_model, dense


def test_qlora_parity_counts_and_gradients():
    nf4_model, dense = qlora_pair()
    assert isinstance(nf4_model.model.layers[0].q_proj.base_layer, Linear4bit)
    torch.testing.assert_close(nf4_model(IDS), dense(IDS), atol=1e-5, rtol=0)
    assert ll.trainable_parameters(nf4_model) == ll.trainable_parameters(dense)  # 4-bit weights count logically
    nf4_model(IDS).square().mean().backward()
    dense(IDS).square().mean().backward()
    reference = dict(dense.named_parameters())
    for n, p in nf4_model.named_parameters():
        q = reference[n]
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_merge_over_nf4_dense_or_requantized(caplog):
    nf4_model, dense = qlora_pair()
    out = dense(IDS)
    with caplog.at_level("INFO", logger="loralite.lora"):
        ll.merge(nf4_model)
    assert "max |error|" in caplog.text
    assert type(nf4_model.model.layers[0].q_proj.base_layer) is Linear  # dense again: loralite's nn.Linear
    torch.testing.assert_close(nf4_model(IDS), out, atol=1e-5, rtol=0)
    ll.unmerge(nf4_model)
    torch.testing.assert_close(nf4_model(IDS), out, atol=1e-5, rtol=0)

    nf4_model, dense = qlora_pair()
    ll.merge(nf4_model, requantize=True)
    layer = nf4_model.model.layers[0].q_proj
    assert isinstance(layer.base_layer, Linear4bit)
    merged = dense.model.layers[0].q_proj.base_layer.weight + layer.delta_weight("default")
    error = (layer.base_layer.dequantize_weight() - merged).abs()
    assert 0 < error.max() < 0.25 * merged.abs().max()  # one NF4 rounding: under half a code step
    plain = ll.merge_and_unload(nf4_model)
    assert not any(isinstance(m, (Linear4bit, ll.LoraLinear)) for m in plain.modules())
