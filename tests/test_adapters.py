"""Adapter files against PEFT: PEFT-saved adapters load into loralite and back, with equal logits."""

import json

import pytest
import torch
from conftest import hf_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import loralite.lora as ll
from loralite.adapters import load_adapter, save_adapter
from loralite.llama import Llama, LlamaConfig

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))

# (PEFT keyword arguments) for each case; loralite's LoraConfig takes the same values.
CASES = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_linear_rslora": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "regex_bias_all": dict(r=2, lora_alpha=5, target_modules=r".*\.mlp\.(gate|down)_proj", bias="all"),
    "patterns_lora_only_save": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                                    bias="lora_only", modules_to_save=["lm_head"], rank_pattern={"k_proj": 2},
                                    alpha_pattern={"layers.1.self_attn.q_proj": 3}, layers_to_transform=[1]),
    "exclude_gaussian": dict(r=3, lora_alpha=7, target_modules="all-linear", exclude_modules=["down_proj"],
                             init_lora_weights="gaussian", lora_dropout=0.1),
}


def ours_config(kw: dict) -> ll.LoraConfig:
    names = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
    return ll.LoraConfig(**{names.get(k, k): v for k, v in kw.items()})


def pair(bias: bool):
    """A tiny HF Llama and a loralite Llama with the same weights (biases on every linear when ``bias``)."""
    hf = hf_llama(attention_bias=bias, mlp_bias=bias)
    ours = Llama(LlamaConfig.from_dict(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict())
    return hf, ours.eval()


@torch.no_grad()
def randomize(model, names=("lora_B", "modules_to_save", "bias")):
    """Non-zero values in every trainable tensor the adapter file carries."""
    torch.manual_seed(3)
    for n, p in model.named_parameters():
        if any(k in n for k in names) and p.requires_grad:
            p.copy_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_adapter_loads_with_peft_logits(case, tmp_path):
    kw = CASES[case]
    hf, ours = pair(bias=kw.get("bias", "none") != "none")
    peft_model = get_peft_model(hf, PeftLoraConfig(task_type="CAUSAL_LM", **kw)).eval()
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    expected = peft_model(IDS).logits
    torch.testing.assert_close(ours(IDS), expected, atol=2e-4, rtol=0)
    with peft_model.disable_adapter():
        assert (expected - peft_model(IDS).logits).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("case", CASES)
def test_loralite_saved_adapter_loads_into_peft(case, tmp_path):
    kw = CASES[case]
    hf, ours = pair(bias=kw.get("bias", "none") != "none")
    ll.add_lora(ours, ours_config(kw))
    randomize(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    peft_model = PeftModel.from_pretrained(hf, tmp_path).eval()
    torch.testing.assert_close(peft_model(IDS).logits, ours(IDS), atol=2e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_files_match_peft_keys_and_config(case, tmp_path):
    kw = CASES[case]
    hf, ours = pair(bias=kw.get("bias", "none") != "none")
    peft_model = get_peft_model(hf, PeftLoraConfig(task_type="CAUSAL_LM", **kw))
    peft_model.save_pretrained(tmp_path / "peft")
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
               for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    ll.add_lora(ours, ours_config(kw))
    save_adapter(ours, tmp_path / "ours")
    theirs_sd, ours_sd = load_file(tmp_path / "peft/adapter_model.safetensors"), load_file(
        tmp_path / "ours/adapter_model.safetensors")
    assert {k: v.shape for k, v in theirs_sd.items()} == {k: v.shape for k, v in ours_sd.items()}
    theirs_cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert set(ours_cfg) <= set(theirs_cfg)
    for key, value in ours_cfg.items():
        if key == "target_modules" and kw["target_modules"] == "all-linear":
            assert set(value) == wrapped  # PEFT lists every linear and leaves exclude_modules to the reader
        elif key == "target_modules":
            assert sorted(value) == sorted(theirs_cfg[key])
        else:
            assert value == theirs_cfg[key], key


def test_trainable_counts_equal_peft(tmp_path):
    for kw in CASES.values():
        hf, ours = pair(bias=True)
        peft_model = get_peft_model(hf, PeftLoraConfig(task_type="CAUSAL_LM", **kw))
        ll.add_lora(ours, ours_config(kw))
        assert ll.trainable_parameters(ours) == peft_model.get_nb_trainable_parameters(), kw


def test_llama2_70b_counts_on_meta():
    import transformers

    fields = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
        ours = Llama(LlamaConfig(**fields))
    assert ll.trainable_parameters(ours)[1] == 68_976_648_192
    kw = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(hf, PeftLoraConfig(task_type="CAUSAL_LM", **kw))
    ll.add_lora(ours, ours_config(kw))
    trainable, total = ll.trainable_parameters(ours)
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()
    assert total - trainable == 68_976_648_192


def test_round_trip_second_adapter_and_atomic_files(tmp_path):
    _, ours = pair(bias=False)
    ll.add_lora(ours, ll.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize(ours)
    before = ours(IDS)
    save_adapter(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    load_adapter(ours, tmp_path, name="copy")
    ll.set_adapter(ours, "copy")
    torch.testing.assert_close(ours(IDS), before, atol=0, rtol=0)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    _, ours = pair(bias=False)
    ll.add_lora(ours, ll.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(ours, tmp_path)
    return tmp_path


def fresh():
    return pair(bias=False)[1]


def assert_unchanged_after(model, exc, match, fn):
    keys = list(model.state_dict())
    with pytest.raises(exc, match=match):
        fn()
    assert list(model.state_dict()) == keys and not getattr(model, "lora_configs", {})


def test_refuses_pickled_weights(saved):
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    model = fresh()
    assert_unchanged_after(model, OSError, "adapter_model.bin", lambda: load_adapter(model, saved))


def test_missing_and_unexpected_keys(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, path)
    model = fresh()
    assert_unchanged_after(model, ValueError, "missing keys.*layers.1.self_attn.v_proj",
                           lambda: load_adapter(model, saved))
    save_file({**tensors, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}, path)
    assert_unchanged_after(model, ValueError, "unexpected keys.*up_proj", lambda: load_adapter(model, saved))


def test_rank_disagreeing_with_config(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    model = fresh()
    assert_unchanged_after(model, ValueError, "q_proj.lora_A.weight has shape \\(4, 64\\).*\\(8, 64\\)",
                           lambda: load_adapter(model, saved))


def test_other_architecture_and_bad_configs(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    model = fresh()
    for change, match in [({"target_modules": ["c_attn"]}, "c_attn.*matched no module"),
                          ({"peft_type": "IA3"}, "IA3"), ({"use_dora": True}, "use_dora"),
                          ({"bias": "some"}, "bias")]:
        (saved / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert_unchanged_after(model, ValueError, match, lambda: load_adapter(model, saved))
    (saved / "adapter_config.json").write_text("{not json")
    assert_unchanged_after(model, ValueError, "adapter_config.json", lambda: load_adapter(model, saved))
    assert_unchanged_after(model, OSError, "nowhere", lambda: load_adapter(model, saved / "nowhere"))
    with pytest.raises(ValueError, match="'other'"):
        save_adapter(model, saved, name="other")
