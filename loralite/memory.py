"""How much memory a LoRA / QLoRA training step needs, by part, before running it.

The peak of a training step as ``loralite train`` takes it (the loss from ``model(ids,
labels=...)``, fused with the output head; ``zero_grad(set_to_none=True)`` between steps) is

    peak = weights + adapters + optimizer states + max(activations + temporary,
                                                        gradients + optimizer temporaries)

*weights* are the frozen base (NF4 bytes from ``nf4_nbytes`` for quantized linears, ``dtype``
for the rest), *adapters* the trainable LoRA A/B, *activations* what autograd saves for the
backward pass at the end of the forward, and *temporary* the largest short-lived buffers: one
chunk of float32 logits inside the fused loss (``loralite.loss``; over an adapted or quantized
head, the gradients of all logits and log-probabilities), or one dequantized weight plus a few
(tokens, intermediate) gradients inside a layer. Gradients grow as
activations are released, so they peak separately, when the optimizer steps.

Every count comes from a model built on ``torch.device("meta")`` with the same ``add_lora`` call a
real run makes, so rank patterns, targets and tied embeddings are exact. ``TensorMemoryTracker``
measures the same quantities on any device (``torch.cuda.max_memory_allocated`` on CPU, too);
``tests/test_memory.py`` and ``benchmarks/memory.py`` check the estimate against it and against
the resident memory of real steps.

Letters in comments: N = batch * seq tokens, D hidden size, I intermediate size, H / Hkv query /
key-value heads, hd head dim, V vocabulary, e bytes per element of ``dtype``, r LoRA rank.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from loralite import nf4, ops, precision
from loralite import optim as _optim
from loralite.llama import Llama, LlamaConfig
from loralite.loss import chunk_tokens
from loralite.lora import LoraConfig, LoraLinear, add_lora, trainable_parameters
from loralite.optim import OPTIMIZERS, AdamW8bit
from loralite.quantize import Linear4bit, NF4Config, quantize_model

_ADAMW8BIT_DEFAULTS = {k: v.default for k, v in inspect.signature(AdamW8bit).parameters.items()}
PARTS = ("weights", "adapters", "gradients", "optimizer_states", "activations", "temporary")


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of an ``NF4Tensor`` of ``numel`` elements: exactly ``nf4.quantize(w).nbytes``.

    codes: (numel + 1) // 2 bytes; block scales: one per ``blocksize`` elements, uint8 with
    double quantization (plus one float32 per 256 scales and the 256-entry float32 nested
    codebook), float32 without; the 16-entry float32 codebook.
    """
    blocks = -(-numel // blocksize)
    size = (numel + 1) // 2 + 16 * 4
    if double_quant:
        return size + blocks + 4 * -(-blocks // nf4.NESTED_BLOCKSIZE) + 256 * 4
    return size + 4 * blocks


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of a training step's memory, by part; ``total`` is the peak (see the module docstring)."""

    weights: int  # frozen base model
    adapters: int  # trainable parameters (LoRA A and B)
    gradients: int  # one gradient per trainable parameter, in its dtype
    optimizer_states: int  # AdamW moments (8-bit codes + scales for adamw_8bit)
    activations: int  # tensors autograd saves in the forward pass for the backward pass
    temporary: int  # the largest short-lived buffers of the backward pass
    total: int  # the peak: static parts + the larger of the two phases
    trainable_parameters: int  # from lora.trainable_parameters on the meta model
    total_parameters: int
    explanations: dict = dataclasses.field(default_factory=dict)  # part -> one line

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A plain-text table: part, GiB, explanation."""
        rows = [f"{'part':<17} {'GiB':>8}  explanation"]
        for part in (*PARTS, "total"):
            rows.append(f"{part:<17} {getattr(self, part) / 2**30:8.3f}  {self.explanations.get(part, '')}")
        rows.append(f"trainable parameters: {self.trainable_parameters:,d} of {self.total_parameters:,d}")
        return "\n".join(rows)


def _meta_nf4(shape: torch.Size, quant: NF4Config) -> nf4.NF4Tensor:
    """An NF4Tensor on the meta device with the tensors ``nf4.quantize`` would allocate."""
    numel, meta = shape.numel(), torch.device("meta")
    blocks = -(-numel // quant.blocksize)
    dq = quant.double_quant
    return nf4.NF4Tensor(
        data=torch.empty((numel + 1) // 2, dtype=torch.uint8, device=meta),
        absmax=torch.empty(blocks, dtype=torch.uint8 if dq else torch.float32, device=meta),
        nested_absmax=torch.empty(-(-blocks // nf4.NESTED_BLOCKSIZE), device=meta) if dq else None,
        nested_code=torch.empty(256, device=meta) if dq else None, offset=0.0,
        code=torch.empty(16, device=meta), shape=shape, dtype=torch.bfloat16,
        blocksize=quant.blocksize, quant_type=quant.quant_type)


def meta_model(config: LlamaConfig, lora: LoraConfig | None, quant: NF4Config | None,
               dtype: torch.dtype, device: str = "cuda") -> nn.Module:
    """The model a run on ``device`` would train, on the meta device: ``quantize_model`` + ``add_lora``
    structure, with a compute dtype of "auto" resolved as that device would resolve it."""
    with torch.device("meta"):
        model = Llama(config).to(dtype)
    model.requires_grad_(False)
    if quant is not None:  # quantize_model's replacement, without computing any codes
        compute = precision.resolve(quant.compute_dtype, device)
        quantize_model(model, quant, make=lambda name, linear: Linear4bit(
            _meta_nf4(linear.weight.shape, quant), linear.bias, compute))
    if lora is not None:
        add_lora(model, lora)
    return model


def _weight_bytes(model: nn.Module) -> int:
    """Frozen parameters at their dtype, 4-bit weights at their NF4 size; shared tensors once."""
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return frozen + sum(m.weight.nbytes for m in model.modules() if isinstance(m, Linear4bit))


def _optimizer_bytes(params: list[nn.Parameter], optim: str) -> tuple[int, int]:
    """(state bytes, largest temporary of one step) of ``optim`` over ``params``."""
    if optim == "adamw":  # torch.optim.AdamW: exp_avg, exp_avg_sq like the parameter; one denominator
        return (sum(2 * p.numel() * p.element_size() for p in params),
                max((p.numel() * p.element_size() for p in params), default=0))
    block, small = _ADAMW8BIT_DEFAULTS["block_size"], _ADAMW8BIT_DEFAULTS["min_8bit_size"]
    states = sum(8 * p.numel() if p.numel() < small else 2 * p.numel() + 8 * math.ceil(p.numel() / block)
                 for p in params)
    # per chunk: m and v dequantized, the denominator and the re-quantization scratch, all float32
    chunk = min(max((p.numel() for p in params), default=0), _optim._CHUNK_ELEMENTS)  # elements per chunk
    return states, 4 * 4 * chunk


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What the activation formulas read: the token count and the element sizes."""

    B: int  # batch size
    T: int  # sequence length
    e: int  # bytes per activation element (the model dtype)

    @property
    def N(self) -> int:
        return self.B * self.T


def _adapters_of(layer: nn.Module) -> dict[str, LoraLinear]:
    """{"q_proj": LoraLinear, ...} for the adapted linears directly inside a decoder layer."""
    return {name.rpartition(".")[2]: m for name, m in layer.named_modules() if isinstance(m, LoraLinear)}


def _shared_input(adapted: dict[str, LoraLinear], names: tuple[str, ...], nbytes: int) -> int:
    """``nbytes`` when one of ``names`` is adapted without dropout: their common input is saved once."""
    return nbytes if any(isinstance(adapted[k].lora_dropout[adapted[k].active_adapters[0]], nn.Identity)
                         for k in names if k in adapted) else 0


def _lora_saved(m: LoraLinear, s: _Shape, input_shared: bool, input_needs_grad: bool) -> int:
    """What one ``LoraLinear`` saves: h = A x (N, r) for B's gradient, x for A's (unless shared),
    dropout's output and mask, and the A/B copies cast to the activation dtype (fp32 adapters)."""
    total = 0
    for name in m.active_adapters:
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        r = a.shape[0]
        total += s.N * r * s.e
        if a.element_size() != s.e:  # B's copy serves h's gradient; A's copy x's, if x needs one
            total += (b.numel() + (a.numel() if input_needs_grad else 0)) * s.e
        if not isinstance(m.lora_dropout[name], nn.Identity):
            # dropout's output, and its bool mask (lora_layer._Dropout) when x needs a gradient
            total += s.N * m.in_features * (s.e + (1 if input_needs_grad else 0))
        elif not input_shared:
            total += s.N * m.in_features * s.e
    return total


def _layer_activations(config: LlamaConfig, layer: nn.Module, s: _Shape, grad_in: bool) -> tuple[int, bool]:
    """(bytes autograd saves in one decoder layer, whether its output needs a gradient).

    RMSNorm saves its float32 input (N, D) and rsqrt (N, 1); attention saves the rotated q (N, H hd),
    k and v (N, Hkv hd), SDPA's output (N, H hd, also o_proj's input) and its float32 logsumexp
    (B, H, T); SwiGLU saves gate (N, I), silu(gate) and up. LoRA adds the inputs of the adapted
    linears (the normed x once for q/k/v and once for gate/up; gate*up for down_proj).
    """
    D, I, hd = config.hidden_size, config.intermediate_size, config.head_dim
    H, Hkv, N, e = config.num_attention_heads, config.num_key_value_heads, s.N, s.e
    adapted = _adapters_of(layer)
    norm = N * D * 4 + N * 4
    total = norm if grad_in else 0
    attn = {"q_proj", "k_proj", "v_proj"} & adapted.keys()
    attn_live = grad_in or bool(attn)
    if attn_live:
        total += N * (2 * H + 2 * Hkv) * hd * e + s.B * H * s.T * 4
    total += _shared_input(adapted, ("q_proj", "k_proj", "v_proj"), N * D * e)  # the normed x
    mlp_in = attn_live or "o_proj" in adapted
    for k in ("q_proj", "k_proj", "v_proj"):
        if k in adapted:
            total += _lora_saved(adapted[k], s, input_shared=True, input_needs_grad=grad_in)
    if "o_proj" in adapted:  # its input is SDPA's output, saved by SDPA when attention needs gradients
        total += _lora_saved(adapted["o_proj"], s, input_shared=attn_live, input_needs_grad=attn_live)
    mlp_live = mlp_in or bool({"gate_proj", "up_proj", "down_proj"} & adapted.keys())
    if mlp_in:
        total += norm
    if mlp_live:
        total += 3 * N * I * e
    total += _shared_input(adapted, ("gate_proj", "up_proj"), N * D * e)
    for k in ("gate_proj", "up_proj"):
        if k in adapted:
            total += _lora_saved(adapted[k], s, input_shared=True, input_needs_grad=mlp_in)
    if "down_proj" in adapted:
        total += _lora_saved(adapted["down_proj"], s, input_shared=False, input_needs_grad=mlp_live)
    return total, mlp_live


def _loss_saved(config: LlamaConfig, model: nn.Module, s: _Shape, live: bool) -> int:
    """What the loss saves for backward. Fused (``loralite.loss``): the gradients it already
    computed, d(hidden) (N, D) and, for a trained head, float32 d(weight) (V, D). Otherwise the
    float32 log-probabilities (N, V) and the int64 targets."""
    if not model.fuses_loss():
        return s.N * config.vocab_size * 4 + s.N * 8
    trained_head = model.lm_head.weight.requires_grad
    return (s.N * config.hidden_size * s.e if live else 0) + (model.lm_head.weight.numel() * 4 if trained_head else 0)


def _tail_activations(config: LlamaConfig, model: nn.Module, s: _Shape, live: bool) -> int:
    """Saved outside the layers: RoPE cos/sin (shared by all layers), the final RMSNorm, an
    adapted lm_head's input, and the loss's tensors (``_loss_saved``)."""
    total = 2 * s.B * s.T * config.head_dim * s.e + _loss_saved(config, model, s, live)
    if live:
        total += s.N * config.hidden_size * 4 + s.N * 4
    if isinstance(model.lm_head, LoraLinear):
        total += s.N * config.hidden_size * s.e + _lora_saved(model.lm_head, s, True, live)
    return total


def _loss_temporary(config: LlamaConfig, model: nn.Module, s: _Shape) -> int:
    """Largest short-lived buffers of the loss. Fused: its input, the final norm's output (N, D);
    one chunk's float32 logits (c, V), beside their 16-bit matmul output or input when the head is
    16-bit; that chunk's d(hidden) (c, D) and the (N,) targets. Otherwise float32 d(log-probs)
    and d(logits), (N, V) each."""
    V, D = config.vocab_size, config.hidden_size
    if not model.fuses_loss():
        return 8 * s.N * V
    c = min(s.N, chunk_tokens(V))
    return s.N * D * s.e + c * V * (4 + (s.e if s.e < 4 else 0)) + c * D * s.e + s.N * 8


def _largest_dense(model: nn.Module, keep=lambda layer: True, element_bytes: int | None = None) -> int:
    """Bytes of the largest dense weight of the ``Linear4bit`` layers that ``keep`` accepts, in the
    layer's compute dtype (or at ``element_bytes`` per element); 0 when there is none."""
    sizes = [m.in_features * m.out_features * (element_bytes or torch.finfo(m.compute_dtype).bits // 8)
             for m in model.modules() if isinstance(m, Linear4bit) and keep(m)]
    return max(sizes, default=0)


def _largest_dense_temporary(model: nn.Module, tokens: int, device: str) -> int:
    """Bytes of the largest dense weight a matmul of ``tokens`` rows materializes: every NF4 weight
    on CPU; on CUDA only those that the fused Triton kernels do not take (``ops.FUSED_MAX_ROWS``,
    at its smallest, and rows of whole blocks)."""
    if device != "cuda":
        return _largest_dense(model)
    fused = tokens <= min(ops.FUSED_MAX_ROWS.values())
    return _largest_dense(model, lambda m: not (fused and m.weight.rows_hold_whole_blocks))


def _check(option: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"estimate_memory: {option}={value!r} is not one of {list(allowed)}")


def estimate_memory(model_config: LlamaConfig | dict, lora: LoraConfig | None = None,
                    quant: NF4Config | None = None, batch_size: int = 1, seq_len: int = 512,
                    gradient_checkpointing: bool = False, optim: str = "adamw",
                    dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> MemoryEstimate:
    """Bytes by part of one training step, and its peak (see the module docstring).

    Args:
        model_config: a ``LlamaConfig`` or a ``config.json`` dict.
        lora: the adapters (None: nothing trains).
        quant: NF4 for the frozen linears (QLoRA); None keeps them dense in ``dtype``.
        batch_size, seq_len: tokens per step, B * T.
        gradient_checkpointing: keep only each layer's input, recompute one layer at a time.
        optim: "adamw" (torch.optim.AdamW) or "adamw_8bit" (loralite.AdamW8bit).
        dtype: dtype of the model and its activations.
        device: "cuda" or "cpu"; on CPU the largest dequantized weight stays allocated between
            steps (the matmul workspace).
    """
    _check("optim", optim, OPTIMIZERS)
    _check("device", device, ("cuda", "cpu"))
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"estimate_memory: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    config = model_config if isinstance(model_config, LlamaConfig) else LlamaConfig.from_dict(model_config)
    model = meta_model(config, lora, quant, dtype, device)
    e = torch.finfo(dtype).bits // 8
    s = _Shape(batch_size, seq_len, e)
    params = [p for p in model.parameters() if p.requires_grad]
    adapters = sum(p.numel() * p.element_size() for p in params)
    states, optim_temp = _optimizer_bytes(params, optim)

    live = any(p.requires_grad for p in model.model.embed_tokens.parameters())
    per_layer = []
    for layer in model.model.layers:
        saved, live = _layer_activations(config, layer, s, live)
        per_layer.append(saved)
    tail = _tail_activations(config, model, s, live)
    N, D, I = s.N, config.hidden_size, config.intermediate_size
    # Backward through a layer's down_proj: its dense weight, d(gate*up) from the base and the
    # adapter (N, I) each, and d(output) (N, D); the log-probs and final norm are released by then.
    layer_temp = _largest_dense_temporary(model, N, device) + 2 * N * I * e + N * D * e
    if device == "cpu":  # a 16-bit input gradient may multiply a transposed copy too (ops.nf4_matmul_t)
        layer_temp += _largest_dense(model, lambda m: precision.transposes_16bit_gradient(m.compute_dtype))
    # On CPU with loralite._C that dense weight lives in a workspace kept between matmuls (loralite.ops),
    # so it is also there while the loss is computed and while the optimizer steps. Without it, the
    # reference decodes through float32 values (4 bytes per weight) beside the dense weight.
    keeps_workspace = device == "cpu" and ops.cpu_matmuls_keep_workspace()
    workspace = _largest_dense(model) if keeps_workspace else 0
    if device == "cpu" and not keeps_workspace:
        layer_temp += _largest_dense(model, element_bytes=4)
    # the loss's and the final norm's saved tensors go first in backward
    released = _loss_saved(config, model, s, live) + (N * D * 4 + N * 4 if live else 0)
    kept = tail - released  # RoPE tables (and unfused targets), until the end of the backward pass
    if gradient_checkpointing:
        activations = config.num_hidden_layers * N * D * e + tail  # each layer's input
        first = activations - released + per_layer[-1] + layer_temp  # the last layer, recomputed
    else:
        activations = sum(per_layer) + tail
        first = activations - released + layer_temp
    # the first layer, processed last: its own activations beside every other layer's gradients
    own = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters() if p.requires_grad)
    last = kept + N * D * e + per_layer[0] + layer_temp + adapters - own
    layer_phase = max(first, last)
    loss_phase = activations + _loss_temporary(config, model, s) + workspace
    temporary = max(loss_phase, layer_phase) - activations
    static = _weight_bytes(model) + adapters + states
    total = static + max(activations + temporary, adapters + optim_temp + workspace)
    trainable, all_params = trainable_parameters(model)
    return MemoryEstimate(
        weights=_weight_bytes(model), adapters=adapters, gradients=adapters, optimizer_states=states,
        activations=activations, temporary=temporary, total=total,
        trainable_parameters=trainable, total_parameters=all_params,
        explanations=_explanations(config, model, quant, optim, gradient_checkpointing, s, loss_phase >= layer_phase))


def _explanations(config, model, quant, optim, checkpointing, s: _Shape, loss_dominates: bool) -> dict:
    base = (f"NF4 blocksize {quant.blocksize}{' + double quant' if quant.double_quant else ''} for the "
            f"quantized linears, {s.e}-byte elements for embeddings, norms and {', '.join(quant.skip_modules)}"
            if quant is not None else f"every frozen parameter at {s.e} bytes")
    kind = "layer inputs (N, D) + the final norm and log-probs; one layer is recomputed at a time" if \
        checkpointing else "norms, q/k/v, attention output + logsumexp, SwiGLU, LoRA inputs and A x, per layer"
    return {
        "weights": base,
        "adapters": "LoRA A (r, in) and B (out, r): float32 over NF4 bases, the weight dtype over dense ones",
        "gradients": "one per trainable parameter; accrues while activations are released, so it peaks "
                     "with the optimizer step, not with the activations",
        "optimizer_states": "exp_avg + exp_avg_sq like each parameter" if optim == "adamw" else
                            "8-bit exp_avg + exp_avg_sq with a float32 scale per block (float32 below "
                            f"{_ADAMW8BIT_DEFAULTS['min_8bit_size']} elements)",
        "activations": f"{kind}; N = {s.B} x {s.T} tokens",
        "temporary": ("float32 logits of one chunk of tokens in the fused loss (loralite.loss)"
                      if model.fuses_loss() else "float32 gradients of the log-probabilities and logits (2 x N x V x 4 bytes)")
                     if loss_dominates else "one dequantized weight and the SwiGLU gradients (N, I) of a layer",
        "total": "peak = weights + adapters + optimizer states + max(activations + temporary, "
                 "gradients + optimizer step scratch)",
    }


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages allocated inside the ``with`` block, on any device.

    ``torch.cuda.max_memory_allocated`` for CPU (and exact for tests): every operator's outputs
    are recorded by storage (views share one), a storage stops counting once it is freed, and the
    peak is sampled after each operator, while its inputs are still alive. Storages allocated
    before the block (the weights, say) are not counted; buffers an operator uses internally and
    frees before returning are not seen.

        with TensorMemoryTracker() as tracker:
            loss = step(...)
        tracker.peak  # bytes
    """

    def __init__(self):
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}  # data_ptr -> (weak ref, bytes)
        self.live = 0  # bytes of tracked storages still alive
        self.peak = 0  # largest ``live`` seen

    def _sweep(self) -> None:
        freed = [ptr for ptr, (ref, _) in self._storages.items() if ref.expired()]
        for ptr in freed:
            self.live -= self._storages.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()  # a view or in-place result of an input is no new memory
                if ptr not in inputs and ptr not in self._storages and storage.nbytes() > 0:
                    self._storages[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out
