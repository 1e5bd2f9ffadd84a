"""HF checkpoint folders in and out, against transformers, and every kind of bad input."""

import json
import struct

import pytest
import torch
import transformers

from conftest import hf_llama
from loralite.loading import CheckpointError, load_model, read_safetensors_header, save_model

IDS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("shard", ["10GB", "60KB"])
@pytest.mark.parametrize("tied", [False, True])
def test_loads_transformers_checkpoints(tmp_path, shard, tied):
    hf = hf_llama(tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path, max_shard_size=shard)
    if shard == "60KB":
        assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path)
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=2e-4, rtol=0)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_folder_loads_in_transformers(tmp_path, dtype):
    hf = hf_llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src", dtype=dtype)
    save_model(model, tmp_path / "out", max_shard_size=50_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits.float(), model(IDS), atol=2e-4, rtol=0)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_resave_with_fewer_shards_removes_stale_ones(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src")
    save_model(model, tmp_path / "out", max_shard_size=50_000)
    save_model(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    load_model(tmp_path / "out")


@pytest.fixture
def checkpoint(tmp_path):
    hf_llama().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_truncated_file(checkpoint):
    f = checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(checkpoint)


def test_header_length_beyond_the_file(checkpoint):
    f = checkpoint / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10**12) + f.read_bytes()[8:])
    with pytest.raises(CheckpointError, match="header length 1000000000000 runs past the end"):
        load_model(checkpoint)


def test_overlapping_offsets(checkpoint):
    def overlap(header):
        keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        a, b = header[keys[0]], header[keys[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    _rewrite_header(checkpoint / "model.safetensors", overlap)
    with pytest.raises(CheckpointError, match="overlap"):
        load_model(checkpoint)


def test_wrong_shape_names_the_key(checkpoint):
    def grow(header):  # the same 256 bytes read as 32 float64s
        header["model.norm.weight"].update(shape=[32], dtype="F64")
    _rewrite_header(checkpoint / "model.safetensors", grow)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(32,\)"):
        load_model(checkpoint)


def test_header_size_disagreeing_with_shape(checkpoint):
    def lie(header):
        header["model.norm.weight"]["shape"] = [65]
    _rewrite_header(checkpoint / "model.safetensors", lie)
    with pytest.raises(CheckpointError, match="'model.norm.weight' holds 256 bytes"):
        load_model(checkpoint)


def test_missing_and_unexpected_keys(tmp_path):
    hf = hf_llama()
    sd = hf.state_dict()
    from safetensors.torch import save_file
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(hf.config.to_json_string())
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys.*model.norm.weight"):
        load_model(tmp_path / "a")
    save_file({**sd, "model.extra": torch.zeros(1)}, tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected key 'model.extra'"):
        load_model(tmp_path / "a")


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(OSError, match="config.json is missing"):
        load_model(checkpoint)


def test_pickles_are_refused_not_unpickled(tmp_path):
    hf = hf_llama()
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code if unpickled")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused"):
        load_model(tmp_path / "pytorch_model.bin")


def test_not_a_path():
    with pytest.raises(OSError, match="no such file or folder"):
        load_model("/nonexistent/model")


def test_header_reader_accepts_a_good_file(checkpoint):
    header = read_safetensors_header(checkpoint / "model.safetensors")
    assert "model.embed_tokens.weight" in header
