"""Data pipeline: loss masks, EOS, truncation, packing, shuffling, resume, bad rows."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from loralite.data import (IGNORE_INDEX, PAD_SEGMENT, BatchIterator, build_dataset, collate, load_rows,
                           split_rows)
from loralite.llama import Llama, LlamaConfig


class CharTokenizer:
    """A tiny ChatML tokenizer: one id per character, three special tokens.

    ids: 0 <pad>, 1 <|im_start|>, 2 <|im_end|> (EOS), ASCII character c -> ord(c) + 3 (< 128).
    ``pad_token_id`` may be set equal to the EOS id, as many real tokenizers do.
    """

    specials = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    eos_token_id, bos_token_id = 2, None
    chat_template = "chatml"

    def __init__(self, pad_token_id=0):
        self.pad_token_id = pad_token_id

    def encode(self, text, add_special_tokens=False):
        ids = []
        for piece in re.split(r"(<pad>|<\|im_start\|>|<\|im_end\|>)", text):
            ids += [self.specials[piece]] if piece in self.specials else [ord(c) + 3 for c in piece]
        return ids

    def decode(self, ids):
        names = {v: k for k, v in self.specials.items()}
        return "".join(names.get(i, chr(i - 3) if i >= 3 else "") for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def learned_text(tok, batch, row=0):
    """The labelled tokens of one batch row, decoded, one string per contiguous run."""
    labels = batch["labels"][row].tolist()
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(tok.decode(current))
            current = []
        else:
            current.append(label)
    return runs


CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Arr! Hello."},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "Four. Yo ho!"}]}


def test_chat_rows_learn_only_assistant_turns_through_eos():
    tok = CharTokenizer()
    ds = build_dataset([CHAT], tok, max_seq_length=512)
    batch = collate(ds.units, ds.pad_token_id, packed=False)
    assert learned_text(tok, batch) == ["Arr! Hello.<|im_end|>", "Four. Yo ho!<|im_end|>"]
    full = tok.apply_chat_template(CHAT["messages"], add_generation_prompt=False)
    assert batch["input_ids"][0].tolist() == tok.encode(full)  # no second EOS appended
    with_inputs = collate(build_dataset([CHAT], tok, 512, train_on_inputs=True).units, 0, False)
    assert with_inputs["labels"][0, 1:].tolist() == tok.encode(full)[1:]
    assert with_inputs["labels"][0, 0] == IGNORE_INDEX  # nothing predicts the first token


def test_prompt_completion_and_text_rows_append_a_learned_eos():
    tok = CharTokenizer()
    ds = build_dataset([{"prompt": "Q: sky? A:", "completion": " blue"}, {"text": "plain words"}], tok, 512)
    batch = collate(ds.units, ds.pad_token_id, packed=False)
    assert tok.decode(batch["input_ids"][0, :16].tolist()) == "Q: sky? A: blue<|im_end|>"
    assert learned_text(tok, batch, 0) == [" blue<|im_end|>"]
    assert learned_text(tok, batch, 1) == ["lain words<|im_end|>"]  # all but the first token


def test_padding_equal_to_eos_never_masks_the_real_eos():
    tok = CharTokenizer(pad_token_id=2)  # pad id == EOS id
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "long prompt", "completion": "long answer"}]
    ds = build_dataset(rows, tok, 512)
    batch = collate(ds.units, ds.pad_token_id, packed=False)
    short = batch["attention_mask"][0].sum().item()
    assert short == 3 and batch["input_ids"].shape[1] > short  # row 0 is padded with id 2
    assert batch["labels"][0, short - 1] == tok.eos_token_id and batch["attention_mask"][0, short - 1] == 1
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["input_ids"][0, short:] == 2).all()


def test_the_real_default_tokenizer_masks_smollm2_chat():
    from loralite.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    batch = collate(build_dataset([CHAT], tok, 512).units, tok.pad_token_id, packed=False)
    full = tok.apply_chat_template(CHAT["messages"], add_generation_prompt=False, tokenize=False)
    assert batch["input_ids"][0].tolist() == tok.encode(full)
    assert learned_text(tok, batch) == ["Arr! Hello.<|im_end|>", "Four. Yo ho!<|im_end|>"]


def test_long_rows_are_truncated_from_the_right_or_dropped():
    tok = CharTokenizer()
    rows = [{"prompt": "p", "completion": "x" * 40}, {"prompt": "q" * 40, "completion": "y"}, {"text": "ok"}]
    with pytest.warns(UserWarning, match="2 of 3 rows were longer than max_seq_length=16"):
        ds = build_dataset(rows, tok, max_seq_length=16)
    assert (ds.stats.rows, ds.stats.truncated, ds.stats.dropped) == (3, 2, 1)  # row 1 kept no answer
    assert [len(u[0].input_ids) for u in ds.units] == [16, 3]
    assert tok.decode(ds.units[0][0].input_ids) == "p" + "x" * 15  # the start is kept
    assert ds.stats.label_tokens == 15 + 2


def _tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Llama(config).eval()


def _token_losses(model, batch):
    """Per-token cross-entropy of the labelled tokens, in row-major order."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], segment_ids=batch.get("segment_ids"))
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
    return losses[labels != IGNORE_INDEX]


def test_packed_and_unpacked_batches_give_the_same_loss():
    tok = CharTokenizer()
    rows = [{"prompt": f"Q{i}: " + "w" * (i % 7), "completion": "answer " * (1 + i % 3)} for i in range(10)]
    rows.append(CHAT)
    packed = build_dataset(rows, tok, max_seq_length=128, packing=True)
    plain = build_dataset(rows, tok, max_seq_length=128)
    assert len(packed.units) < len(plain.units) and all(len(u) > 1 for u in packed.units[:-1])
    packed_batch = collate(packed.units, packed.pad_token_id, packed=True)
    plain_batch = collate(plain.units, plain.pad_token_id, packed=False)
    row = packed_batch["segment_ids"][0]
    starts = (row[1:] != row[:-1]).nonzero().flatten() + 1
    assert (packed_batch["position_ids"][0, starts] == 0).all()  # positions restart per example
    assert (packed_batch["segment_ids"][packed_batch["attention_mask"] == 0] == PAD_SEGMENT).all()
    assert packed_batch["input_ids"].shape[1] <= 128
    model = _tiny_model()
    with torch.no_grad():
        a, b = _token_losses(model, packed_batch), _token_losses(model, plain_batch)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # same tokens, same order, same losses
    assert a.numel() == packed.stats.label_tokens


def test_batch_iterator_is_deterministic_covers_every_row_and_resumes():
    tok = CharTokenizer()
    ds = build_dataset([{"text": f"row {i}"} for i in range(10)], tok, 64)

    def first_ids(batch):
        return [tok.decode(r[:5].tolist()) for r in batch["input_ids"]]

    it = BatchIterator(ds, batch_size=4, seed=3)
    assert len(it) == 3  # 4 + 4 + 2
    epoch0 = [first_ids(next(it)) for _ in range(3)]
    assert sorted(x for b in epoch0 for x in b) == sorted(f"row {i}" for i in range(10))
    epoch1 = [first_ids(next(it)) for _ in range(3)]
    assert epoch1 != epoch0 and it.epoch == 1
    same = BatchIterator(ds, batch_size=4, seed=3)
    assert [first_ids(next(same)) for _ in range(3)] == epoch0
    assert [first_ids(next(BatchIterator(ds, 4, seed=4))) for _ in range(1)] != epoch0[:1]

    straight = BatchIterator(ds, 4, seed=3)
    expected = [next(straight) for _ in range(8)]
    first = BatchIterator(ds, 4, seed=3)
    [next(first) for _ in range(4)]  # into epoch 1
    state = json.loads(json.dumps(first.state_dict()))  # plain numbers only
    resumed = BatchIterator(ds, 4, seed=3)
    resumed.load_state_dict(state)
    for want in expected[4:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(ds, 4, seed=5).load_state_dict(state)


def test_batch_iterator_ranks_split_each_global_batch():
    tok = CharTokenizer()
    ds = build_dataset([{"text": f"row {i}"} for i in range(10)], tok, 64)
    single = BatchIterator(ds, batch_size=4, seed=1, drop_last=True)
    ranks = [BatchIterator(ds, batch_size=2, seed=1, world_size=2, rank=r) for r in range(2)]
    assert len(single) == len(ranks[0]) == 2  # the incomplete third global batch is dropped
    for _ in range(2):
        whole = next(single)["input_ids"]
        parts = [next(r)["input_ids"] for r in ranks]
        width = whole.shape[1]
        padded = [F.pad(p, (0, width - p.shape[1]), value=0) for p in parts]
        assert torch.equal(torch.cat(padded), whole)


def test_split_rows_is_deterministic_and_disjoint():
    rows = load_rows([{"text": str(i)} for i in range(20)])
    train, held = split_rows(rows, 0.2, seed=7)
    assert len(held) == 4 and len(train) == 16
    assert {r.data["text"] for r in train} | {r.data["text"] for r in held} == {str(i) for i in range(20)}
    assert split_rows(rows, 0.2, seed=7)[1] == held and split_rows(rows, 0.2, seed=8)[1] != held


def test_jsonl_json_and_list_sources_agree(tmp_path):
    rows = [CHAT, {"prompt": "a", "completion": "b"}, {"text": "c"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    tok = CharTokenizer()
    datasets = [build_dataset(src, tok, 512) for src in (rows, tmp_path / "d.jsonl", str(tmp_path / "d.json"))]
    assert datasets[0].units == datasets[1].units == datasets[2].units


@pytest.mark.parametrize("line, message", [
    ({"question": "x"}, "needs exactly one of"),
    ({"text": "x", "prompt": "y", "completion": "z"}, "found prompt_completion and text"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "empty"),
    ({"messages": []}, "non-empty list"),
    ({"prompt": "x"}, "'completion' must be a non-empty string"),
    ({"text": ""}, "'text' must be a non-empty string"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl line 3: .*{re.escape(message)}"):
        load_rows(path)


def test_bad_files_raise(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="x.jsonl line 2: not valid JSON"):
        load_rows(tmp_path / "x.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported dataset file"):
        load_rows(tmp_path / "x.csv")
    (tmp_path / "x.json").write_text('{"text": "a"}')
    with pytest.raises(ValueError, match="JSON array"):
        load_rows(tmp_path / "x.json")
    with pytest.raises(OSError):
        load_rows(tmp_path / "missing.jsonl")
