"""Checkpoints: layout (safetensors + JSON only), rotation, and bit-identical resume.

A run of 20 steps is compared with runs interrupted after checkpoint 10 (by an exception,
and by SIGKILL in a real subprocess) and resumed: losses and adapter tensors must be equal
bit for bit (CPU, fp32, dropout on, so the RNG states matter too).
"""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralite import checkpoint as ckpt
from loralite.train import NonFiniteLossError, train
from test_train import CharTokenizer, adapter_tensors, config, make_rows, tiny_model

TESTS = Path(__file__).resolve().parent


def run_config(out, **overrides):
    return config(out, **{"max_steps": 20, "save_steps": 10, "per_device_train_batch_size": 3,
                          "gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine", "warmup_steps": 3,
                          **overrides})


@pytest.fixture(scope="module", params=["adamw", "adamw_8bit"])
def straight(request, tmp_path_factory):
    """20 uninterrupted steps: (optim, history, final adapter tensors)."""
    model = tiny_model(dropout=0.1)
    history = train(model, CharTokenizer(), make_rows(), run_config(tmp_path_factory.mktemp("straight"),
                                                                    optim=request.param))
    return request.param, history, adapter_tensors(model)


def assert_same_run(history, model, straight):
    _, expected_history, expected_tensors = straight
    assert [r["step"] for r in history] == list(range(1, 21))
    assert [r["loss"] for r in history] == [r["loss"] for r in expected_history]  # exact
    assert [r["grad_norm"] for r in history] == [r["grad_norm"] for r in expected_history]
    tensors = adapter_tensors(model)
    assert tensors.keys() == expected_tensors.keys()
    for name, value in expected_tensors.items():
        assert torch.equal(tensors[name], value), name


def test_resume_after_an_exception_is_bit_identical(straight, tmp_path):
    optim = straight[0]
    model = tiny_model(dropout=0.1)
    calls = 0

    def crash_in_step_13(module, args, output):
        nonlocal calls
        calls += 1
        if calls == 2 * 12 + 1:  # the first micro-batch of step 13
            raise RuntimeError("injected failure")

    hook = model.register_forward_hook(crash_in_step_13)
    with pytest.raises(RuntimeError, match="injected"):
        train(model, CharTokenizer(), make_rows(), run_config(tmp_path, optim=optim))
    hook.remove()
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-10"]
    fresh = tiny_model(dropout=0.1, adapter_seed=99)  # other initial weights: all must come from the checkpoint
    history = train(fresh, CharTokenizer(), make_rows(), run_config(tmp_path, optim=optim, resume_from_checkpoint=True))
    assert_same_run(history, fresh, straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # the crashed run's lines after step 10 were dropped


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import loralite.checkpoint as ckpt
    from loralite.train import train
    from test_checkpoint import run_config
    from test_train import CharTokenizer, make_rows, tiny_model

    save = ckpt.save_checkpoint
    def save_then_die(*args, **kwargs):
        path = save(*args, **kwargs)
        if path.name == "checkpoint-10":
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    ckpt.save_checkpoint = save_then_die
    train(tiny_model(dropout=0.1), CharTokenizer(), make_rows(), run_config({out!r}, optim={optim!r}))
""")


def test_resume_after_sigkill_is_bit_identical(straight, tmp_path):
    optim = straight[0]
    child = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(TESTS), out=str(tmp_path), optim=optim)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-10"]
    model = tiny_model(dropout=0.1, adapter_seed=5)
    history = train(model, CharTokenizer(), make_rows(), run_config(tmp_path, optim=optim,
                                                                    resume_from_checkpoint=str(tmp_path / "checkpoint-10")))
    assert_same_run(history, model, straight)


def test_checkpoint_layout_and_rotation(tmp_path):
    train(tiny_model(), CharTokenizer(), make_rows(), config(tmp_path, max_steps=7, save_steps=2, save_total_limit=2))
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-7"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    folder = tmp_path / "checkpoint-6"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors",
         "trainer_state.json"])
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6 and state["data"]["index"] > 0
    assert {k.rsplit(".", 1)[0] for k in load_file(folder / "optimizer.safetensors")} == {"exp_avg", "exp_avg_sq",
                                                                                         "step"}
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_resume_with_another_adapter_shape_is_refused(tmp_path):
    train(tiny_model(), CharTokenizer(), make_rows(), config(tmp_path, max_steps=2, save_steps=2))
    other = tiny_model(targets=("q_proj",))
    with pytest.raises(ValueError, match="LoRA config"):
        train(other, CharTokenizer(), make_rows(), config(tmp_path, max_steps=4, resume_from_checkpoint=True))
    with pytest.raises(OSError, match="trainer_state.json"):
        train(tiny_model(), CharTokenizer(), make_rows(),
              config(tmp_path, max_steps=4, resume_from_checkpoint=str(tmp_path / "nowhere")))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()
    calls = 0

    def poison_from_step_5(module, args, output):
        nonlocal calls
        calls += 1
        return output * float("nan") if calls >= 5 else output

    model.register_forward_hook(poison_from_step_5)
    with pytest.raises(NonFiniteLossError, match=r"step 5.*checkpoint-4"):
        train(model, CharTokenizer(), make_rows(), config(tmp_path, max_steps=8, save_steps=2))
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    saved = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied
