"""Tokenizers: a Hugging Face `tokenizer.json` or a GGUF vocabulary, plus chat templates.

The byte-pair encoding itself runs in the `tokenizers` library. This module builds its
pipeline (normalizer -> pre-tokenizer -> BPE -> post-processor -> decoder) from what a
checkpoint stores, and renders chat templates the way transformers does.

A GGUF file stores no `tokenizer.json`, only llama.cpp's description of one:

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE. Every byte is spelled as one printable
  character (GPT-2's byte alphabet, space -> "Ġ"), text is first split by a regular expression
  named by ``tokenizer.ggml.pre``, then merged by the ``tokenizer.ggml.merges`` ranks.
- ``tokenizer.ggml.model = "llama"``: a SentencePiece BPE vocabulary. Spaces become "▁", one is
  prepended to the text, pieces merge best score first, and characters outside the vocabulary
  fall back to their UTF-8 bytes ``<0x41>``. The merges are recovered from the scores: splitting
  each piece in two, a pair whose halves are both pieces merges with the piece's score.

``tokenizer.ggml.token_type`` marks control tokens (3, such as ``<|im_end|>``; matched whole and
skipped by ``decode(skip_special_tokens=True)``) and user-defined ones (4; matched whole).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from loralite.files import atomic_write_text
from loralite.gguf import read_metadata, resolve_model_path

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                     "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
# llama.cpp's end-of-generation ids beyond eos (end of turn, end of message).
_GGUF_END_IDS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# llama.cpp's pre-tokenizer splits (`llama-vocab.cpp`), by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais")  # GPT-2's own split, built into ByteLevel
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_SPLIT_PRE = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model.

    Attributes:
        backend: the `tokenizers.Tokenizer` doing the work.
        bos_token, eos_token, unk_token, pad_token: special token strings (or None).
        bos_token_id, eos_token_id, unk_token_id, pad_token_id: their ids (or None).
        eos_token_ids: every id that ends generation (eos, and end-of-turn tokens).
        add_bos_token, add_eos_token: whether ``encode(add_special_tokens=True)`` adds them.
        chat_template: a jinja2 template turning messages into a prompt, or None.
    """

    def __init__(self, backend: Backend, special_tokens: dict, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, chat_template: str | None = None,
                 extra_eos_ids=(), source: str = "tokenizer"):
        self.backend, self.chat_template, self.source = backend, chat_template, source
        for name in _SPECIAL_NAMES:
            token = special_tokens.get(name)
            setattr(self, name, token)
            if token is not None and backend.token_to_id(token) is None:  # as transformers does
                backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            setattr(self, f"{name}_id", None if token is None else backend.token_to_id(token))
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        specials = backend.encode("", add_special_tokens=True).ids  # what the post-processor adds
        self.add_bos_token = self.bos_token_id is not None and self.bos_token_id in specials
        self.add_eos_token = self.eos_token_id is not None and self.eos_token_id in specials
        self.eos_token_ids = {i for i in (self.eos_token_id, *extra_eos_ids) if i is not None}

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """`encode(add_special_tokens=True)` = [bos] + ids + [eos], each where asked."""
        add_bos, add_eos = add_bos and self.bos_token is not None, add_eos and self.eos_token is not None
        single = " ".join([f"{self.bos_token}:0"] * add_bos + ["$A:0"] + [f"{self.eos_token}:0"] * add_eos)
        pair = " ".join([single] + [f"{self.bos_token}:1"] * add_bos + ["$B:1"] + [f"{self.eos_token}:1"] * add_eos)
        special = [(self.bos_token, self.bos_token_id)] * add_bos + [(self.eos_token, self.eos_token_id)] * add_eos
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                    special_tokens=special)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; bos/eos only with `add_special_tokens` (and the model's flags)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs):
        """The prompt for `messages` (``[{"role": ..., "content": ...}]``), as text or ids.

        Rendered as transformers renders it: sandboxed jinja2 with ``trim_blocks`` and
        ``lstrip_blocks``, the special tokens as variables, ``raise_exception`` and ``tojson``.
        Extra keyword arguments (``tools``, ``documents``, ...) reach the template as variables.
        """
        if self.chat_template is None:
            raise ValueError(f"{self.source}: the tokenizer has no chat template; pass raw text instead, "
                             "or use a checkpoint whose tokenizer_config.json has a chat_template")
        variables = {name: getattr(self, name) for name in _SPECIAL_NAMES if getattr(self, name) is not None}
        try:
            text = _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **{**variables, **kwargs})
        except jinja2.TemplateError as err:
            raise ValueError(f"{self.source}: chat template failed: {err}") from None
        return self.encode(text) if tokenize else text

    def save(self, directory) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json`, loadable by transformers."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token}
        config.update({name: getattr(self, name) for name in _SPECIAL_NAMES if getattr(self, name) is not None})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for masking): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def load_tokenizer(path_or_name) -> Tokenizer:
    """The tokenizer of a checkpoint: an HF folder with `tokenizer.json`, a `.gguf` file, or a model name."""
    path = resolve_model_path(path_or_name)
    if path.is_dir():
        return _from_folder(path)
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.name == "tokenizer.json":
        return _from_folder(path.parent)
    raise ValueError(f"{path}: not a tokenizer; pass a folder with tokenizer.json or a .gguf file")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _token_string(value):
    """A special token as stored by transformers: a string or ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


def _from_folder(folder: Path) -> Tokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: has no tokenizer.json (a sentencepiece tokenizer.model alone is not "
                                "read); save the tokenizer with transformers' fast tokenizer to create one")
    try:
        backend = Backend.from_file(str(folder / "tokenizer.json"))
    except Exception as err:  # the Rust parser raises a plain Exception on malformed files
        raise ValueError(f"{folder / 'tokenizer.json'}: cannot be read by the tokenizers library ({err})") from None
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
        if (folder / name).is_file():
            config.update(_read_json(folder / name))
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the "default" one is the chat template
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra_eos = []
    if (folder / "generation_config.json").is_file():
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra_eos = eos if isinstance(eos, list) else [eos]
    specials = {name: _token_string(config.get(name)) for name in _SPECIAL_NAMES}
    return Tokenizer(backend, specials, config.get("add_bos_token"), config.get("add_eos_token"),
                     template, extra_eos, str(folder))


def _from_gguf(path: Path) -> Tokenizer:
    metadata = read_metadata(path)
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path}: has no tokenizer.ggml.tokens; the file carries no vocabulary")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        backend, tokens = _byte_level_backend(metadata, tokens, path)
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", False)
    elif kind == "llama":
        backend = _sentencepiece_backend(metadata, tokens, path)
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for SentencePiece
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported ('gpt2' or 'llama')")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED])
    specials = {}
    for name, key in _GGUF_SPECIAL_IDS.items():
        index = metadata.get(f"tokenizer.ggml.{key}")
        if index is not None and not 0 <= index < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key} = {index} is outside the {len(tokens)}-token vocabulary")
        specials[name] = None if index is None else tokens[index]
    end_ids = [metadata[key] for key in _GGUF_END_IDS if key in metadata]
    return Tokenizer(backend, specials, add_bos, metadata.get("tokenizer.ggml.add_eos_token", False),
                     metadata.get("tokenizer.chat_template"), end_ids, str(path))


def _byte_level_backend(metadata: dict, tokens: list[str], path: Path) -> tuple[Backend, list[str]]:
    """GPT-2 style BPE; returns the backend and the tokens as spelled in its vocabulary."""
    spelling = _byte_alphabet()
    alphabet = set(spelling)
    # A token with characters outside the byte alphabet is respelled byte by byte.
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.merges, which is missing")
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2 or p[0] + p[1] not in vocab), None)
    if bad is not None:
        raise ValueError(f"{path}: tokenizer.ggml.merges entry {bad!r} does not merge two tokens into a token")
    backend = Backend(BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), path)
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of bytes 0..255: printable Latin-1 stays, the rest maps to U+0100..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {b: chr(b) for b in printable}, 0
    for byte in range(256):
        if byte not in spelled:
            spelled[byte], extra = chr(256 + extra), extra + 1
    return [spelled[b] for b in range(256)]


def _byte_level_pre_tokenizer(pre: str, path: Path):
    """llama.cpp's split for `tokenizer.ggml.pre`, followed by the byte-to-character mapping."""
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRE:  # each digit alone, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = sorted({*_GPT2_PRE, *_DIGITS_THEN_GPT2_PRE, *_SPLIT_PRE})
    raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (known: {', '.join(known)})")


def _sentencepiece_backend(metadata: dict, tokens: list[str], path: Path) -> Backend:
    """SentencePiece BPE with byte fallback, merges recovered from the scores."""
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"{path}: a llama tokenizer needs one tokenizer.ggml.scores entry per token")
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(BPE(vocab, _merges_from_scores(vocab, dict(zip(tokens, scores))), unk_token=unk,
                          fuse_unk=True, byte_fallback=True))
    add_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_prefix
                                                     else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] * add_prefix)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best piece score first.

    Ties are ordered as transformers' `generate_merges` orders them (longer left half first,
    then by id), so both build identical BPE models.
    """
    merges = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(left, right, score) for left, right in sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
