"""estimate_memory against what real steps allocate: NF4 sizes, parameter counts, saved tensors, peaks."""

import json

import pytest
import torch

import loralite as ll
from loralite import cli, nf4, ops
from loralite.configs import NAMED_CONFIGS, load_config
from loralite.gguf import resolve_model_path
from loralite.memory import TensorMemoryTracker, estimate_memory, meta_model, nf4_nbytes

TINY = ll.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
ALL = "all-linear"


def real_model(config, lora, quant):
    """The model a run trains: random bf16 weights, frozen, quantized (QLoRA), adapters added."""
    torch.manual_seed(0)
    model = ll.Llama(config).to(torch.bfloat16).requires_grad_(False)
    if quant is not None:
        ll.quantize_model(model, quant)
    ll.add_lora(model, lora)
    return model.train()


def saved_activation_bytes(model, ids) -> int:
    """Bytes of every distinct storage autograd saves for the backward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(saved.values())


def step(model, optimizer, ids):
    """One training step, as the estimate assumes: the fused loss of ``labels=``, grads set to None."""
    loss = model(ids, labels=ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (1,), (300, 256 * 64 + 5), (7, 3, 5)])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True), (4096, True)])
def test_nf4_nbytes_matches_quantized_tensor(shape, blocksize, double_quant):
    w = torch.randn(shape)
    assert nf4_nbytes(w.numel(), blocksize, double_quant) == nf4.quantize(w, blocksize, double_quant).nbytes


@pytest.mark.parametrize("quant", [None, ll.NF4Config(), ll.NF4Config(blocksize=128, double_quant=False)])
def test_weights_and_adapters_match_a_real_model(quant):
    lora = ll.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 4})
    model = real_model(TINY, lora, quant)
    est = estimate_memory(TINY, lora, quant, device="cpu")
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(m.weight.nbytes for m in model.modules() if isinstance(m, ll.Linear4bit))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est.weights == frozen
    assert est.adapters == est.gradients == sum(p.numel() * p.element_size() for p in trainable)
    assert (est.trainable_parameters, est.total_parameters) == ll.trainable_parameters(model)


CASES = [  # (quant, target_modules, dropout, seq_len, gradient checkpointing)
    (ll.NF4Config(), ALL, 0.0, 32, False),
    (None, ALL, 0.0, 32, False),
    (ll.NF4Config(), ALL, 0.1, 16, False),
    (None, ["q_proj", "v_proj"], 0.1, 16, False),
    (ll.NF4Config(), ["o_proj", "down_proj"], 0.0, 16, False),
    (ll.NF4Config(), ALL, 0.0, 4, False),  # short: the dequantized weight, not the logits, sets the peak
    (ll.NF4Config(), ALL, 0.0, 32, True),
    (None, ALL, 0.0, 64, True),
]


@pytest.mark.parametrize("quant,targets,dropout,seq_len,checkpointing", CASES)
def test_saved_activations_and_step_peak_match_the_estimate(quant, targets, dropout, seq_len, checkpointing):
    lora = ll.LoraConfig(r=8, target_modules=targets, dropout=dropout)
    model = real_model(TINY, lora, quant)
    model.gradient_checkpointing = checkpointing
    est = estimate_memory(TINY, lora, quant, batch_size=2, seq_len=seq_len, gradient_checkpointing=checkpointing,
                          optim="adamw_8bit", device="cpu")
    ids = torch.randint(0, TINY.vocab_size, (2, seq_len))
    # the saved tensors are derived exactly (the 4-byte loss scalar aside)
    assert saved_activation_bytes(model, ids) == pytest.approx(est.activations, abs=8)
    optimizer = ll.AdamW8bit([p for p in model.parameters() if p.requires_grad])
    step(model, optimizer, ids)  # creates the optimizer states: the next step is a steady one
    ops.release_workspaces()  # the CPU matmul workspace is part of the estimate's step: allocate it inside
    with TensorMemoryTracker() as tracker:
        step(model, optimizer, ids)
    dynamic = est.total - est.weights - est.adapters - est.optimizer_states
    assert tracker.peak == pytest.approx(dynamic, rel=0.10)


def test_tracker_counts_new_storages_once_and_releases_them():
    weight = torch.randn(256, 256)  # allocated before: never counted, nor its views
    with TensorMemoryTracker() as tracker:
        a = torch.empty(1000, dtype=torch.float32)
        view = a[:10].view(2, 5)
        _ = weight.t()
        del a, view
        b = torch.zeros(500, dtype=torch.bfloat16)
        b.add_(1)
    assert tracker.peak == 4000  # a and its view were freed before b was made
    assert tracker.live == 1000


def test_checkpointing_and_8bit_states_shrink_the_7b_estimate():
    config = load_config("llama-2-7b")
    lora = ll.LoraConfig(r=16, alpha=32, target_modules=ALL)
    plain = estimate_memory(config, lora, ll.NF4Config(), seq_len=512)
    small = estimate_memory(config, lora, ll.NF4Config(), seq_len=512, gradient_checkpointing=True, optim="adamw_8bit")
    assert plain.trainable_parameters == small.trainable_parameters == 39_976_960
    assert small.activations < plain.activations / 10
    assert small.optimizer_states < plain.optimizer_states / 3
    assert small.total < plain.total
    assert 3.4 * 2**30 < plain.weights < 3.8 * 2**30  # 6.5e9 NF4 weights + 2 x 32000 x 4096 bf16


# Parameter counts of the official checkpoints (safetensors metadata / model cards).
OFFICIAL_PARAMETERS = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496, "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824, "smollm2-135m": 134_515_008,
    # Llama 1 33B: embeddings + lm_head, 60 x (attention + SwiGLU + 2 norms), the final norm
    "llama-33b": 2 * 32000 * 6656 + 60 * (4 * 6656**2 + 3 * 6656 * 17920 + 2 * 6656) + 6656,
}


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_configs_have_the_official_parameter_counts(name):
    model = meta_model(load_config(name), None, None, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[name]


def test_config_from_gguf_reads_the_header_only(monkeypatch):
    import loralite.gguf as gguf

    def no_tensors(*args, **kwargs):
        raise AssertionError("a config read must not dequantize tensors")

    monkeypatch.setattr(gguf, "_dequantize", no_tensors)
    config = load_config(resolve_model_path("smollm2-135m"))
    named = load_config("smollm2-135m")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_theta"):
        assert getattr(config, field) == getattr(named, field), field


def test_config_from_hf_folder_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    assert load_config(tmp_path) == TINY
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path / "..")
    with pytest.raises(ValueError, match="neither a known model"):
        load_config("llama-9b")
    with pytest.raises(ValueError, match="optim"):
        estimate_memory(TINY, optim="sgd")


def test_cli_estimate_prints_a_table_and_json(capsys):
    assert cli.main(["estimate", "--model", "smollm2-135m", "--qlora", "--seq-len", "256", "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    lora = ll.LoraConfig(r=16, alpha=32, target_modules=ALL)
    assert numbers["total"] == estimate_memory(load_config("smollm2-135m"), lora, ll.NF4Config(), seq_len=256).total
    assert cli.main(["estimate", "--model", "smollm2-135m", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "trainable parameters: " in out
    assert cli.main(["estimate", "--model", "no-such-model"]) == 2


def test_cuda_estimate_has_no_dense_weight_where_the_fused_kernels_run(monkeypatch):
    """Up to ops.FUSED_MAX_ROWS tokens the NF4 matmuls decode on chip; beyond, a dense weight exists."""
    config = ll.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)  # 704 = 11 blocks of 64
    lora = ll.LoraConfig(r=8, target_modules=ALL)
    quant = ll.NF4Config(compute_dtype=torch.bfloat16)
    fused = estimate_memory(config, lora, quant, batch_size=1, seq_len=64, device="cuda")
    monkeypatch.setattr(ops, "FUSED_MAX_ROWS", {8: 32, 9: 32})  # the same step past the crossover
    dense = estimate_memory(config, lora, quant, batch_size=1, seq_len=64, device="cuda")
    # the largest weight in bf16 is the difference in the backward phase; the peak phase may be another
    assert 0 < dense.temporary - fused.temporary <= 704 * 256 * 2
