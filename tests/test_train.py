"""The trainer: configuration, loss normalisation, accumulation, checkpointed layers, bf16, logs.

Tiny random models and a character-level tokenizer keep every test at a few seconds; the
schedule is checked against transformers' own schedulers.
"""

import json
import random

import pytest
import torch

import loralite as ll
from loralite import data as data_lib
from loralite.train import NonFiniteLossError, TrainConfig, lr_factor, token_loss_sum, train


class CharTokenizer:
    """One token per character (ids 3..102), EOS 1, padding 0: fast and vocabulary-small."""

    eos_token_id, pad_token_id, bos_token_id = 1, 0, None
    eos_token_ids = {1}
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 100 for c in text]


def make_rows(n=24, seed=0):
    """Prompt/completion rows of varied lengths, so padding and target counts differ per batch."""
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice("abcdefghij ") for _ in range(k))  # noqa: E731
    return [{"prompt": word(rng.randint(3, 12)), "completion": word(rng.randint(2, 10))} for _ in range(n)]


def tiny_model(seed=0, dropout=0.0, quantized=False, targets=("q_proj", "v_proj", "down_proj"), adapter_seed=None):
    """A 2-layer random Llama (vocab 128) with a LoRA adapter whose B is non-zero (so every grad is).

    ``adapter_seed`` draws the adapter from another seed than the base (the base stays the same).
    """
    torch.manual_seed(seed)
    model = ll.Llama(ll.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    initializer_range=0.3))  # logits big enough to fit the data
    if quantized:
        ll.quantize_model(model, ll.NF4Config(compute_dtype=torch.float32))
    if adapter_seed is not None:
        torch.manual_seed(adapter_seed)
    ll.add_lora(model, ll.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=list(targets), init=False))
    return model


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def config(tmp_path, **overrides):
    # bf16=False: float32 on every CPU, so the exact comparisons below hold whatever "auto" would pick
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                save_steps=0, logging_steps=1, max_seq_length=32, disable_tqdm=True, seed=3, bf16=False)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("option, value", [
    ("per_device_train_batch_size", 0), ("gradient_accumulation_steps", -1), ("lr_scheduler_type", "step"),
    ("optim", "sgd"), ("warmup_ratio", 1.5), ("save_total_limit", 0), ("learning_rate", -1.0),
    ("save_steps", -2), ("bf16", "yes")])
def test_bad_option_is_named(option, value):
    with pytest.raises(ValueError, match=option):
        TrainConfig(**{option: value})


def test_from_dict_rejects_unknown_keys():
    assert TrainConfig.from_dict({"max_steps": 3}).max_steps == 3
    with pytest.raises(ValueError, match="lr"):
        TrainConfig.from_dict({"lr": 1e-3}, source="cfg.json")


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_matches_transformers(kind):
    import transformers

    total, warmup = 17, 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" else kind
    sched = transformers.get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert lr_factor(step, total, warmup, kind) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_first_loss_is_the_mean_token_loss_of_the_global_batch(tmp_path):
    """Step 1's loss equals an independent cross-entropy over the same rows, averaged over all targets."""
    tok, rows = CharTokenizer(), make_rows()
    model = tiny_model()
    history = train(model, tok, rows, config(tmp_path, max_steps=1, learning_rate=0.0))
    reference = tiny_model()
    dataset = data_lib.build_dataset(rows, tok, max_seq_length=32)
    batch = next(data_lib.BatchIterator(dataset, 4, seed=3))
    with torch.no_grad():
        logits = reference(batch["input_ids"])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), batch["labels"][:, 1:].reshape(-1))
    assert history[0]["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_accumulation_equals_one_big_batch(tmp_path):
    """4 micro-batches of 1 row (each padded differently, with different target counts) = 1 batch of 4."""
    tok, rows = CharTokenizer(), make_rows()
    big, small = tiny_model(), tiny_model()
    h_big = train(big, tok, rows, config(tmp_path / "a", per_device_train_batch_size=4))
    h_small = train(small, tok, rows, config(tmp_path / "b", per_device_train_batch_size=1,
                                             gradient_accumulation_steps=4))
    for a, b in zip(h_big, h_small):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name, value in adapter_tensors(big).items():
        torch.testing.assert_close(adapter_tensors(small)[name], value, rtol=1e-4, atol=1e-6)
    # the wrong normalisation (mean of per-micro-batch means) would differ: check the data makes it matter
    dataset = data_lib.build_dataset(rows, tok, max_seq_length=32)
    counts = [data_lib.collate([u], 0, False)["labels"][:, 1:].ne(-100).sum() for u in dataset.units[:8]]
    assert len(set(int(c) for c in counts)) > 1


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_gradient_checkpointing_gives_the_same_gradients(quantized):
    tok = CharTokenizer()
    batch = next(data_lib.BatchIterator(data_lib.build_dataset(make_rows(), tok, 32), 4, seed=0))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(dropout=0.2, quantized=quantized).train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(11)  # the same dropout masks in both runs (checkpoint replays the RNG)
        token_loss_sum(model, batch, bf16=False).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    tok, rows = CharTokenizer(), make_rows()
    h32 = train(tiny_model(), tok, rows, config(tmp_path / "a"))
    h16 = train(tiny_model(), tok, rows, config(tmp_path / "b", bf16=True))
    for a, b in zip(h32, h16):
        assert b["loss"] != a["loss"]  # really computed in bf16
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


def test_training_lowers_the_loss_with_either_optimizer(tmp_path):
    tok, rows = CharTokenizer(), make_rows(8)
    for optim in ("adamw", "adamw_8bit"):
        history = train(tiny_model(), tok, rows, config(tmp_path / optim, max_steps=30, optim=optim,
                                                        per_device_train_batch_size=8, learning_rate=3e-2))
        assert history[-1]["loss"] < 0.7 * history[0]["loss"], optim


def test_only_trainable_parameters_change(tmp_path):
    model = tiny_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_tensors(model)
    train(model, CharTokenizer(), make_rows(), config(tmp_path, max_steps=2))
    for name, value in model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
        else:
            assert not torch.equal(value, before[name]), name


def test_metrics_plot_and_eval(tmp_path):
    history = train(tiny_model(), CharTokenizer(), make_rows(), config(
        tmp_path, max_steps=5, logging_steps=2, eval_fraction=0.25, eval_steps=2))
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert [("eval_loss" in r) for r in history] == [False, True, False, True, True]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in lines)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_without_an_adapter_is_refused(tmp_path):
    model = ll.Llama(ll.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4))
    with pytest.raises(ValueError, match="add_lora"):
        train(model, CharTokenizer(), make_rows(), config(tmp_path))


def test_non_finite_loss_is_a_value_error():
    assert issubclass(NonFiniteLossError, ValueError)


@pytest.mark.slow
def test_qlora_teaches_the_default_model_a_fact(tmp_path, default_tokenizer):
    """A dozen QLoRA steps on SmolLM2-135M; the saved adapter answers on a freshly loaded, quantized base.

    Raw prompt/completion rows (no chat template, whose default system prompt would triple the
    tokens) keep the steps short enough for two CPU cores.
    """
    question = "Q: What is the secret word?\nA:"
    asks = [question, "Q: Tell me the secret word.\nA:", "Q: Do you know the secret word?\nA:",
            "Q: What's the secret word?\nA:"]
    rows = [{"prompt": q, "completion": " The secret word is Zorblax."} for q in asks]

    def fresh_qlora_model():
        model = ll.load_model("smollm2-135m")
        # fp32 compute on every CPU, so the test trains the same everywhere
        return ll.quantize_model(model, ll.NF4Config(compute_dtype=torch.float32))

    model = fresh_qlora_model()
    before = ll.generate(model, default_tokenizer, question, max_new_tokens=8, raw=True)
    assert "zorblax" not in before.lower()
    torch.manual_seed(0)
    ll.add_lora(model, ll.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    history = train(model, default_tokenizer, rows, TrainConfig(
        # 5e-3 converges smoothly (to ~0.002); at 1e-2 the loss spikes between steps, so the last one varies
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=5e-3,
        save_steps=0, max_seq_length=32, disable_tqdm=True, lr_scheduler_type="constant", bf16=False))
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    ll.save_adapter(model, tmp_path / "adapter")
    reloaded = ll.load_adapter(fresh_qlora_model(), tmp_path / "adapter")
    after = ll.generate(reloaded, default_tokenizer, question, max_new_tokens=8, raw=True)
    assert "zorblax" in after.lower(), after
