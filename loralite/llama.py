"""A minimal Llama: the decoder of Llama 1/2/3, SmolLM and friends.

Module names and ``state_dict()`` keys are exactly those of Hugging Face's
``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj.weight``, ...), so checkpoints and
PEFT adapters load with no renaming. q, k and v stay separate linears for the same reason.

Shapes in comments: B batch, T new tokens, S keys (cached + new), D hidden size,
H query heads, Hkv key/value heads, hd head dimension, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loralite import ops
from loralite.data import IGNORE_INDEX
from loralite.loss import linear_cross_entropy


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters, named as in Hugging Face ``config.json``."""

    vocab_size: int = 32000  # number of token embeddings (V)
    hidden_size: int = 4096  # residual stream width (D)
    intermediate_size: int = 11008  # SwiGLU inner width
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads (H)
    num_key_value_heads: int | None = None  # key/value heads (Hkv); < H is grouped-query attention
    head_dim: int | None = None  # per-head width; D // H when unset
    max_position_embeddings: int = 2048  # context the model was trained for (sizes the KV cache)
    rms_norm_eps: float = 1e-6  # added to the mean square in RMSNorm
    rope_theta: float = 10000.0  # RoPE base: frequencies are theta^(-2i/hd)
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (small models)
    attention_bias: bool = False  # biases on q, k, v, o (some derivatives use them)
    mlp_bias: bool = False  # biases on gate, up, down
    initializer_range: float = 0.02  # std of the normal init of fresh weights
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        # Derived values are computed here, once.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it"
            )
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind not in (None, "default", "linear", "dynamic", "llama3"):
            raise ValueError(
                f"rope_scaling type {kind!r} is not supported; use 'linear', 'dynamic' or 'llama3'"
            )

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "LlamaConfig":
        """Build from a ``config.json`` dict; unknown keys are ignored.

        Reads both the transformers 4 spelling (``rope_theta`` + ``rope_scaling``) and the
        transformers 5 one (``rope_parameters`` holding both).
        """
        if d.get("model_type", "llama") not in ("llama", "smollm", "smollm2"):
            raise ValueError(
                f"{source}: model_type {d['model_type']!r} is not a Llama model; "
                "loralite reads Llama-architecture checkpoints only"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"{source}: required keys {missing} are missing from the config")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters")
        if rope:
            kwargs.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if rope.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
                kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """The ``config.json`` transformers reads (both rope spellings, for v4 and v5)."""
        d = dataclasses.asdict(self)
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_act": "silu", **d, "rope_parameters": rope}


def rope_frequencies(config: LlamaConfig, seq_len: int, device=None) -> torch.Tensor:
    """Inverse frequencies (hd/2,) of rotary embeddings, with the configured scaling.

    Base: ``inv_freq_i = theta^(-2i/hd)``. ``linear`` divides them by ``factor`` (positions
    stretched); ``dynamic`` (NTK-aware) raises theta once ``seq_len`` passes the trained
    context; ``llama3`` divides only the low frequencies and blends the middle band.
    """
    hd, theta = config.head_dim, config.rope_theta
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "dynamic":
        factor, trained = scaling["factor"], config.max_position_embeddings
        seq_len = max(seq_len, trained)
        theta = theta * ((factor * seq_len / trained) - (factor - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, computed in fp32 (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same keys) whose decoding-sized products on CPU take
    ``ops.linear``'s GEMV: at batch 1 a token is bound by how fast the weights are read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """``[m(x) for m in linears]``. While decoding (no autograd), plain ``Linear``s without hooks
    share one ``ops.linears`` call: at batch 1 each call costs about as much in dispatch and thread
    wake-ups as a small weight takes to read."""
    if not torch.is_grad_enabled() and all(type(m) is Linear and not (m._forward_hooks or m._forward_pre_hooks)
                                           for m in linears):
        return ops.linears(x, [m.weight for m in linears], [m.bias for m in linears])
    return [m(x) for m in linears]


@dataclass
class KVCache:
    """Preallocated keys and values, so decoding the n-th token costs O(n), not O(n^2).

    ``k[i]``, ``v[i]``: (B, Hkv, max_len, hd) for layer i; ``length`` tokens are filled.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0
    max_len: int = field(init=False)

    def __post_init__(self):
        self.max_len = self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new (B, Hkv, T, hd) keys/values; return all filled ones (B, Hkv, S, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full; ask for a longer one")
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, self.length, k.shape[2]).copy_(k)
        values.narrow(2, self.length, v.shape[2]).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads and rotary positions."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = (config.num_attention_heads,
                                            config.num_key_value_heads, config.head_dim)
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(D, self.n_heads * self.hd, bias=bias)
        self.k_proj = Linear(D, self.n_kv * self.hd, bias=bias)
        self.v_proj = Linear(D, self.n_kv * self.hd, bias=bias)
        self.o_proj = Linear(self.n_heads * self.hd, D, bias=bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = ops.rotary(q.view(B, T, self.n_heads, self.hd), cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k = ops.rotary(k.view(B, T, self.n_kv, self.hd), cos, sin).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd)
        y = ops.attention(q, k, v, mask)  # (B, H, T, hd); no mask: causal over these T tokens
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(D, I, bias=bias)
        self.up_proj = Linear(D, I, bias=bias)
        self.down_proj = Linear(I, D, bias=bias)

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``x += attn(norm(x)); x += mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def attention_mask_4d(attention_mask, segment_ids, q_pos, k_len):
    """A boolean (B, 1, T, S) mask, True where a query may attend to a key.

    Causal in cache positions (key index <= query index), minus padded keys
    (``attention_mask`` (B, S) == 0), and block-diagonal over ``segment_ids`` (B, T) for
    packed sequences. Each query may always see itself, so no row is empty (padding rows
    would otherwise give NaN).
    """
    k_idx = torch.arange(k_len, device=q_pos.device)
    mask = k_idx[None, :] <= q_pos[:, None]  # (T, S)
    mask = mask[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :k_len].bool()
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask | (k_idx[None, :] == q_pos[:, None])[None, None]


class Llama(nn.Module):
    """A causal language model: ``logits = lm_head(norm(layers(embed(ids))))``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each layer in backward (saves activations)
        if not self.lm_head.weight.is_meta:
            self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def tie_weights(self):
        """Re-point ``lm_head`` at the embeddings (after ``load_state_dict(assign=True)``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        ref = self.model.embed_tokens.weight
        c = self.config
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)  # noqa: E731
        return KVCache([make() for _ in range(c.num_hidden_layers)],
                       [make() for _ in range(c.num_hidden_layers)])

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                cache: KVCache | None = None, last_only: bool = False, labels=None) -> torch.Tensor:
        """Logits (B, T, V) in fp32 for ``input_ids`` (B, T), or with ``labels`` the training loss.

        Args:
            attention_mask: (B, S) with 0 at padded positions, S = cached + new tokens.
            position_ids: (B, T) rotary positions; by default counted from the cache length
                (and past the left padding when ``attention_mask`` is given).
            segment_ids: (B, T) example index of each token of a packed row; attention stays
                inside each example.
            cache: a ``KVCache`` from ``make_cache``; filled in place and advanced by T.
            last_only: compute the logits of the last position only (B, 1, V), as decoding
                needs; the output head is the largest matmul of a small model.
            labels: (B, T) token ids aligned with ``input_ids`` (``IGNORE_INDEX`` where no loss);
                position t predicts ``labels[:, t + 1]``. Returns the summed next-token
                cross-entropy (float32 scalar) instead of logits, through
                ``loss.linear_cross_entropy`` when the head is a plain linear: no (B, T, V) logits.
        """
        if labels is not None and (last_only or cache is not None):
            raise ValueError("Llama.forward: labels (training loss) cannot be combined with last_only or "
                             "cache (decoding); pass one or the other")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        inv_freq = rope_frequencies(self.config, int(position_ids.max()) + 1, device)
        angles = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = None
        if attention_mask is not None or segment_ids is not None or (past > 0 and T > 1):
            q_pos = torch.arange(past, past + T, device=device)
            mask = attention_mask_4d(attention_mask, segment_ids, q_pos, past + T)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if labels is not None:
            return self._loss_sum(x, labels)
        return self.lm_head(x).float()

    def fuses_loss(self) -> bool:
        """Whether ``labels=`` takes ``loss.linear_cross_entropy``: the head is a plain, bias-free linear."""
        return type(self.lm_head) is Linear and self.lm_head.bias is None

    def _loss_sum(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the next token at every position of x (B, T, D)."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # (B T,); the last predicts nothing
        if self.fuses_loss():
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets)
        logits = self.lm_head(x).float().flatten(0, 1)  # an adapted or quantized head: (B T, V) logits
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
