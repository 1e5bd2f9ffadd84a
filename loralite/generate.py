"""Text generation with a preallocated KV cache: greedy or sampled, batched with left padding."""

from __future__ import annotations

from typing import Callable

import torch

from loralite.llama import Llama


def _as_batch(prompt) -> tuple[list, bool]:
    """Normalise the accepted prompt forms to a list; also say whether it was a batch.

    A str or a list of message dicts is one prompt; a list of those is a batch.
    """
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
        return [prompt], False
    if isinstance(prompt, list) and prompt:
        return list(prompt), True
    raise ValueError("prompt must be a string, a list of {'role', 'content'} messages, "
                     "or a non-empty list of either")


def encode_prompt(tok, prompt, raw: bool = False) -> list[int]:
    """Token ids for one prompt.

    With a chat template (and not ``raw``), a plain string becomes one user message and the
    messages are rendered with the generation prompt; otherwise the text is encoded as is,
    with the tokenizer's BOS when it asks for one.
    """
    if isinstance(prompt, list):
        if tok.chat_template is None:
            raise ValueError("messages were given but the tokenizer has no chat template; "
                             "pass a plain string with raw=True")
        text = tok.apply_chat_template(prompt, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)
    if tok.chat_template is not None and not raw:
        return encode_prompt(tok, [{"role": "user", "content": prompt}])
    return tok.encode(prompt, add_special_tokens=True)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the smallest set of tokens whose probability reaches top_p (nucleus sampling).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def generate_ids(model: Llama, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                 pad_id: int, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
    """Decode up to ``max_new_tokens`` per prompt; returns the new ids, each cut at its stop id."""
    device = model.model.embed_tokens.weight.device
    ids, mask = _left_pad(prompts, pad_id, device)  # (B, T0)
    B, T0 = ids.shape
    cache = model.make_cache(B, T0 + max_new_tokens)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(stop_ids), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    if bool(mask.all()):
        mask = None  # no padding: plain causal attention, no mask to build at each step
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, pad_id, nxt)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        done |= torch.isin(nxt, stop)
        if bool(done.all()):
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(nxt[:, None], attention_mask=mask, cache=cache, last_only=True)[:, -1]
    rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    result = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[:cut])
    return result


def generate(model: Llama, tok, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, raw: bool = False,
             stream: Callable[[str], None] | None = None):
    """Continue ``prompt`` and return the new text (a list of texts for a batch of prompts).

    Args:
        prompt: a string, a list of chat messages, or a list of either (a batch, left-padded).
        temperature: 0 is greedy; otherwise sample from softmax(logits / temperature),
            restricted to the ``top_k`` most likely tokens and the ``top_p`` nucleus.
        raw: send a string as is even when the tokenizer has a chat template.
        stream: called with each new piece of text as it is decoded (single prompt only).
    """
    prompts, batched = _as_batch(prompt)
    if stream is not None and batched:
        raise ValueError("stream= works with a single prompt, not a batch")
    encoded = [encode_prompt(tok, p, raw) for p in prompts]
    stop_ids = set(tok.eos_token_ids)
    eos = model.config.eos_token_id
    stop_ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stop_ids))
    on_token = None
    if stream is not None:
        generated, shown = [], ""

        def on_token(nxt):
            nonlocal shown
            if int(nxt[0]) in stop_ids:
                return
            generated.append(int(nxt[0]))
            text = tok.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                stream(text[len(shown):])
                shown = text

    new = generate_ids(model, encoded, max_new_tokens, stop_ids, pad_id,
                       temperature, top_k, top_p, seed, on_token)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in new]
    return texts if batched else texts[0]
