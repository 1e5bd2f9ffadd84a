"""generate() on the embedded default model and on tiny models, against transformers."""

import pytest
import torch

from conftest import hf_llama
from loralite.generate import generate, generate_ids, sample_next
from loralite.llama import Llama, LlamaConfig

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


def test_capital_of_france(default_model, default_tokenizer):
    answer = generate(default_model, default_tokenizer, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(default_model, default_tokenizer, hf_default):
    hf, hf_tok = hf_default
    enc = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = default_tokenizer.encode(default_tokenizer.apply_chat_template(CHAT))
    assert prompt == enc["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf.generate(**enc, max_new_tokens=20, do_sample=False, min_new_tokens=20)
        ids = torch.tensor([prompt])
        torch.testing.assert_close(default_model(ids), hf(ids).logits, atol=2e-4, rtol=0)
    ours = generate_ids(default_model, [prompt], 20, stop_ids=set(), pad_id=2)
    assert ours[0] == ref[0, len(prompt):].tolist()


def test_stream_pieces_add_up_to_the_answer(default_model, default_tokenizer):
    pieces = []
    answer = generate(default_model, default_tokenizer, "Name three colors.", max_new_tokens=12,
                      stream=pieces.append)
    assert "".join(pieces) == answer and len(pieces) > 1


@pytest.fixture(scope="module")
def tiny():
    hf = hf_llama()
    model = Llama(LlamaConfig.from_dict(hf.config.to_dict())).eval()
    model.load_state_dict(hf.state_dict())
    return hf, model


def test_left_padded_batch_equals_one_by_one(tiny):
    hf, model = tiny
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
    batch = generate_ids(model, prompts, 12, stop_ids={127}, pad_id=0)
    for prompt, row in zip(prompts, batch):
        assert row == generate_ids(model, [prompt], 12, stop_ids={127}, pad_id=0)[0]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          eos_token_id=127, pad_token_id=0)
        assert row == ref[0, len(prompt):].tolist()[:len(row)]


def test_stops_at_eos(tiny):
    _, model = tiny
    free = generate_ids(model, [[1, 2, 3]], 10, stop_ids=set(), pad_id=0)[0]
    stopped = generate_ids(model, [[1, 2, 3]], 10, stop_ids={free[3]}, pad_id=0)[0]
    assert stopped == free[:free.index(free[3])]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    _, model = tiny
    a = generate_ids(model, [[1, 2]], 8, set(), 0, temperature=1.0, seed=7)
    b = generate_ids(model, [[1, 2]], 8, set(), 0, temperature=1.0, seed=7)
    assert a == b
    greedy = generate_ids(model, [[1, 2]], 8, set(), 0)
    assert generate_ids(model, [[1, 2]], 8, set(), 0, temperature=0.7, top_k=1, seed=3) == greedy


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}


def test_bad_prompt_is_a_value_error(tiny, default_tokenizer):
    _, model = tiny
    with pytest.raises(ValueError, match="prompt must be"):
        generate(model, default_tokenizer, [])


@pytest.mark.slow
def test_converted_default_model_loads_in_transformers(tmp_path, default_model, default_tokenizer):
    """`loralite convert` of the GGUF: an HF folder transformers reads with the same logits and ids."""
    import transformers

    from loralite.cli import main

    assert main(["convert", "smollm2-135m", str(tmp_path)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = default_tokenizer.apply_chat_template(CHAT)
    ids = default_tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == text
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, default_model(torch.tensor([ids])),
                                   atol=2e-4, rtol=0)
