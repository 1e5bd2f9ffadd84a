"""Tokenizers (loralite/tokenizer.py) against transformers' tokenizers and chat templates."""

import json

import gguf
import pytest
import regex
from conftest import hf_llama
from test_gguf import write_llama_gguf

from loralite.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world!",
    "héllo wörld — naïve café, Ångström",
    "日本語のテキストと中文，한국어",
    "emoji 🤗🚀 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "tabs\tand\n\nnewlines\r\nand\n\n\n",
    "multiple     spaces   between words   ",
    "def f(x):\n    return x * 2  # doubled\n\n\tpass",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<repo_name>",
    "don't you're I'll WE'VE",
    "x=1+2; y = 3.14; z=[10,20]",
    "CamelCaseHTTPServer snake_case_name kebab-case",
    "",
    " leading space",
]
# Whitespace before a digit: llama.cpp's `smollm` split cuts every digit out first, so "  1" is
# ["  ", "1"]; transformers' GGUF converter applies GPT-2's split alone (" ", " 1").
DIGIT_TEXTS = ["  1", "Total:  42 items\n    12. twelve", "a\n 3 b  456", "year 2024,   in 3 days"]


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def reference(hf_default_tokenizer):
    return hf_default_tokenizer


def test_special_tokens_of_default_model(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_ids == {2}
    assert ours.vocab_size == 49152 and not ours.add_bos_token
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi")  # SmolLM2 adds no BOS


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_gguf_tokenizer(ours, reference, text):
    expected = reference.encode(text, add_special_tokens=False)
    assert ours.encode(text) == expected
    assert ours.encode(text, add_special_tokens=True) == reference.encode(text)
    assert ours.decode(expected) == reference.decode(expected)
    assert ours.decode(expected, skip_special_tokens=True) == reference.decode(expected, skip_special_tokens=True)


def llama_cpp_smollm_split(text):
    """llama.cpp's pre-tokenizer for `smollm` (llama-vocab.cpp): each digit alone, then GPT-2's split."""
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    pieces = []
    for fragment in regex.split(r"(\p{N})", text):
        pieces += regex.findall(gpt2, fragment)
    return pieces


@pytest.mark.parametrize("text", DIGIT_TEXTS + TEXTS[:7])
def test_ids_follow_llama_cpp_split(ours, reference, text):
    """Each llama.cpp pre-token, BPE-merged alone by transformers, concatenated."""
    expected = [i for piece in llama_cpp_smollm_split(text) for i in reference.encode(piece, add_special_tokens=False)]
    assert ours.encode(text) == expected
    assert ours.decode(expected) == text


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?\n  Show work."}],
    [{"role": "user", "content": "héllo 🤗"}, {"role": "assistant", "content": "ok"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(ours, reference, messages, add_generation_prompt):
    expected = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    ids = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True) == ids


CUSTOM_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(count=0) -%}
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
    {% set ns.count = ns.count + 1 %}
    [{{ message['role'] | upper }}] {{ message['content'] | trim }}{% if not loop.last %}{{ eos_token }}{% endif %}

{% endfor %}
{{ messages | tojson }} {{ {'k': '<b>é</b>'} | tojson(indent=1) }} {{ ns.count }}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


def test_custom_template_semantics_equal_transformers(ours, reference):
    messages = [{"role": "user", "content": "  a <tag> & \"q\"  "}, {"role": "assistant", "content": "b"}]
    expected = reference.apply_chat_template(messages, chat_template=CUSTOM_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    ours_custom = load_tokenizer("smollm2-135m")
    ours_custom.chat_template = CUSTOM_TEMPLATE
    assert ours_custom.apply_chat_template(messages) == expected
    with pytest.raises(ValueError, match="bad role tool"):
        ours_custom.apply_chat_template([{"role": "tool", "content": "x"}])
    ours_custom.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ours_custom.apply_chat_template(messages)


def test_saved_folder_loads_in_transformers(ours, tmp_path):
    from transformers import AutoTokenizer

    ours.save(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + DIGIT_TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == ours.encode(text)
        assert loaded.encode(text) == ours.encode(text, add_special_tokens=True)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
    for messages in CONVERSATIONS:
        assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            ours.apply_chat_template(messages)
    again = load_tokenizer(tmp_path)
    assert [again.encode(t) for t in TEXTS + DIGIT_TEXTS] == [ours.encode(t) for t in TEXTS + DIGIT_TEXTS]
    assert again.chat_template == ours.chat_template and again.eos_token_ids == {2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_folder_saved_by_transformers(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False)
    assert ours.apply_chat_template(CONVERSATIONS[1]) == reference.apply_chat_template(
        CONVERSATIONS[1], add_generation_prompt=True, tokenize=False)
    assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)


def test_special_tokens_map_and_generation_config(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = load_tokenizer(tmp_path)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, None)
    assert ours.eos_token_ids == {0, 2} and ours.chat_template is None


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    path = tmp_path / "bert.gguf"
    write_llama_gguf(path, hf_llama(), metadata=lambda w: (w.add_tokenizer_model("bert"),
                                                          w.add_token_list(["a", "b"])))
    with pytest.raises(ValueError, match="'bert' is not supported"):
        load_tokenizer(path)
    path = tmp_path / "pre.gguf"
    write_llama_gguf(path, hf_llama(), metadata=lambda w: (
        w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("mystery"), w.add_token_list(["a", "b", "ab"]),
        w.add_token_merges(["a b"])))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'mystery'"):
        load_tokenizer(path)


# --- a llama-style SentencePiece vocabulary --------------------------------------------------

SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "a", "é", "▁h", "▁he", "ll", "llo", "▁hello",
              "▁w", "or", "ld", "▁wor", "▁world", "▁t", "▁a", "▁the", "th", "he", "▁▁", "▁▁▁"]


def write_spm_gguf(path):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<tool>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(SPM_PIECES) + [gguf.TokenType.USER_DEFINED]
    # Longer, more frequent pieces score higher, as a trained SentencePiece model would.
    scores = [0.0] * 259 + [-float(i) + 2 * len(p) for i, p in enumerate(SPM_PIECES)] + [0.0]

    def tokenizer(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)

    write_llama_gguf(path, hf_llama(vocab_size=len(tokens)), metadata=tokenizer)


def test_sentencepiece_gguf_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_spm_gguf(tmp_path / "spm.gguf")
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    ours = load_tokenizer(tmp_path / "spm.gguf")
    assert ours.add_bos_token and ours.bos_token_id == 1 and ours.eos_token_id == 2
    for text in ["hello world", "Hello World!", "the   hello  ", "héllo wörld 🤗", "hello\nworld",
                 "a<s>b</s>", "x<tool>y", "  hello", ""]:
        expected = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected, text
        assert ours.encode(text, add_special_tokens=True) == reference.encode(text), text
        assert ours.decode(expected) == reference.decode(expected), text
        assert ours.decode(expected, skip_special_tokens=True) == reference.decode(expected, skip_special_tokens=True)
