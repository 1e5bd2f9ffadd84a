"""Data parallelism: ``torchrun --nproc_per_node=2 -m loralite train`` (two CPU processes, gloo)
equals one process with the same global batch, and only rank 0 writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import loralite as ll


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An HF checkpoint folder of a tiny random Llama with the default model's tokenizer, and 16 chat rows."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = ll.Llama(ll.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                    initializer_range=0.2, eos_token_id=2, bos_token_id=1))
    ll.save_model(model, folder / "model", tokenizer=ll.load_tokenizer("smollm2-135m"))
    rows = open("examples/persona.jsonl").read().splitlines()[:16]
    (folder / "rows.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def run_train(folder, out, batch_size, launcher):
    args = ["-m", "loralite", "train", "--model", str(folder / "model"), "--data", str(folder / "rows.jsonl"),
            "--output-dir", str(out), "--per-device-train-batch-size", str(batch_size), "--dtype", "float32",
            "--gradient-accumulation-steps", "2", "--max-steps", "3", "--lora-r", "4", "--learning-rate", "1e-2",
            "--logging-steps", "1", "--save-steps", "3", "--max-seq-length", "96", "--target-modules", "q_proj",
            "v_proj", "up_proj"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launcher + args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_with_the_same_global_batch(tiny_folder, tmp_path):
    single = run_train(tiny_folder, tmp_path / "one", 4, [sys.executable])
    ddp = run_train(tiny_folder, tmp_path / "two", 2,
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert [r["step"] for r in ddp] == [1, 2, 3]
    for a, b in zip(single, ddp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]  # every rank read its own half of each global batch
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert not torch.equal(one[key], torch.zeros_like(one[key])), key
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)
    # rank 0 alone wrote: one checkpoint, one metrics file, no partial folders
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == ["adapter", "checkpoint-3", "loss.png", "metrics.jsonl"]
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_merge_command_folds_the_adapter_in(tiny_folder, tmp_path):
    from loralite import cli

    model = ll.load_model(tiny_folder / "model")
    torch.manual_seed(1)
    ll.add_lora(model, ll.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], init=False))
    ll.save_adapter(model, tmp_path / "adapter")
    assert cli.main(["merge", "--model", str(tiny_folder / "model"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged")]) == 0
    merged = ll.load_model(tmp_path / "merged")
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ll.load_model(tiny_folder / "model")(ids), model(ids), atol=1e-3)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
