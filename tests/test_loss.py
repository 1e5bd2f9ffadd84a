"""loralite.loss: the fused, chunked cross-entropy against F.cross_entropy over full logits."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

import loralite as ll
from loralite.data import IGNORE_INDEX
from loralite.loss import linear_cross_entropy
from loralite.memory import TensorMemoryTracker


def reference(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def inputs(n=13, d=24, v=50, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,))
    labels[[2, 7]] = IGNORE_INDEX
    return hidden, weight, labels


def grads(loss_fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, labels)
    (loss * 0.5).backward()  # an incoming gradient other than 1
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_loss_and_gradients_equal_full_logits_in_float32(chunk):
    hidden, weight, labels = inputs()
    ours = grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=chunk), hidden, weight, labels)
    expected = grads(reference, hidden, weight, labels)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[1][[2, 7]].abs().sum() == 0  # ignored tokens get no gradient


def test_bfloat16_and_autocast_match_the_reference_in_the_same_dtypes():
    hidden, weight, labels = inputs(dtype=torch.bfloat16, seed=1)
    ours = grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=5), hidden, weight, labels)
    expected = grads(reference, hidden, weight, labels)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    hidden, weight, labels = inputs(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(linear_cross_entropy, hidden, weight, labels)
        expected = grads(reference, hidden, weight, labels)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_frozen_weight_gets_no_gradient_and_logits_never_exist_whole():
    hidden, weight, labels = inputs(n=64, v=1000)
    weight.requires_grad_(False)
    with TensorMemoryTracker() as tracker:
        loss = linear_cross_entropy(hidden, weight, labels, chunk=8)
        loss.backward()
    assert weight.grad is None and hidden.grad is not None
    assert tracker.peak < 64 * 1000 * 4 / 2  # a chunk's logits (8 x 1000 floats) plus small tensors


def test_bad_shapes_are_refused():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match=r"hidden must be \(N, D\)"):
        linear_cross_entropy(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(hidden, weight, labels[:-1])


@pytest.mark.parametrize("tied", [True, False])
def test_llama_labels_give_transformers_loss_and_lora_gradients(tied):
    """model(ids, labels=...) is the summed next-token loss: transformers' mean loss times the targets,
    and the same LoRA gradients as cross-entropy over the full logits."""
    config = ll.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(3)
    model = ll.Llama(config)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_dict()))
    hf.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt without loss
    ll.add_lora(model, ll.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    fused = model(ids, labels=labels)
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        hf.load_state_dict(ll.merge_and_unload(copy.deepcopy(model)).state_dict())
        expected = hf(input_ids=ids, labels=labels).loss * n_targets
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    fused.backward()
    lora = [p for p in model.parameters() if p.requires_grad]
    fused_grads = [p.grad.clone() for p in lora]
    model.zero_grad()
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum").backward()
    for a, p in zip(fused_grads, lora):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_no_grad_evaluation_makes_no_gradients_and_bad_combinations_are_refused():
    hidden, weight, labels = inputs()
    with torch.no_grad(), TensorMemoryTracker() as tracker:
        loss = linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(loss, reference(hidden, weight, labels).detach(), rtol=1e-5, atol=1e-6)
    assert tracker.peak < weight.numel() * 4  # no float32 d(weight), no d(hidden)
    model = ll.Llama(ll.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2))
    ids = torch.randint(0, 50, (1, 4))
    with pytest.raises(ValueError, match="last_only"):
        model(ids, labels=ids, last_only=True)
