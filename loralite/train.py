"""Supervised fine-tuning of the trainable (LoRA) parameters: ``TrainConfig`` and ``train``.

One optimizer step takes ``gradient_accumulation_steps`` micro-batches of
``per_device_train_batch_size`` rows on each of ``world_size`` processes. Its loss is the mean
token loss of that whole global batch,

    L = sum over micro-batches m, ranks r, target tokens t of CE_t  /  N,
    N = number of target tokens (labels != -100, after the shift) in the whole global batch,

so each micro-batch back-propagates ``sum_t CE_t / N`` and the gradients simply add up
(summed over ranks by one all-reduce): accumulation and data parallelism equal one big
batch exactly, whatever the padding or the number of target tokens per micro-batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loralite import checkpoint as ckpt
from loralite import data as data_lib
from loralite import precision
from loralite.files import atomic_write, atomic_write_bytes
from loralite.optim import OPTIMIZERS, AdamW8bit

SCHEDULES = ("linear", "cosine", "constant")


class NonFiniteLossError(ValueError):
    """The loss or the gradient norm became NaN or infinite; training stopped before the update."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train; field names and defaults follow Hugging Face ``TrainingArguments`` / TRL ``SFTConfig``."""

    output_dir: str = "output"  # checkpoints, metrics.jsonl and loss.png go here
    num_train_epochs: float = 1.0  # passes over the data, used when max_steps <= 0
    max_steps: int = -1  # optimizer steps; > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8  # rows per micro-batch on each process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-4  # peak learning rate (after warmup)
    lr_scheduler_type: str = "linear"  # "linear" / "cosine" decay to 0 after warmup, or "constant"
    warmup_steps: int = 0  # steps of linear warmup from 0; wins over warmup_ratio when > 0
    warmup_ratio: float = 0.0  # warmup as a fraction of all steps (rounded up)
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    adam_beta1: float = 0.9  # first-moment decay
    adam_beta2: float = 0.999  # second-moment decay
    adam_epsilon: float = 1e-8  # added to the denominator
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; <= 0 disables clipping
    optim: str = "adamw"  # "adamw" (torch.optim.AdamW) or "adamw_8bit" (loralite.AdamW8bit)
    # autocast the forward and backward to bfloat16 (parameters stay in their dtype); "auto": where
    # bf16 is the fast compute dtype of the model's device (loralite.precision: CUDA, CPUs with bf16 units)
    bf16: bool | str = precision.AUTO
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~30% slower
    max_seq_length: int = 1024  # tokens per row; longer examples are truncated from the right
    packing: bool = False  # concatenate examples into rows of max_seq_length (attention stays per example)
    train_on_inputs: bool = False  # also learn the prompt / user tokens
    eval_fraction: float = 0.0  # rows held out (chosen by seed) for the eval loss, when no eval_data is given
    logging_steps: int = 10  # write metrics.jsonl and update the progress bar every this many steps
    eval_steps: int = 0  # evaluate every this many steps (and at the end); 0: only at the end, if eval data
    save_steps: int = 500  # write a checkpoint every this many steps; 0: never
    save_total_limit: int | None = None  # keep only the newest this many checkpoints; None: all
    seed: int = 42  # data order and dropout
    resume_from_checkpoint: str | bool | None = None  # a checkpoint folder, or True: the newest in output_dir
    disable_tqdm: bool = False  # no progress bar

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "max_seq_length")
        for option in positive:
            if not isinstance(getattr(self, option), int) or getattr(self, option) < 1:
                raise ValueError(f"TrainConfig.{option} must be a positive integer, got {getattr(self, option)!r}")
        for option in ("warmup_steps", "eval_steps", "save_steps"):
            if not isinstance(getattr(self, option), int) or getattr(self, option) < 0:
                raise ValueError(f"TrainConfig.{option} must be an integer >= 0, got {getattr(self, option)!r}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError("TrainConfig: set max_steps > 0 or num_train_epochs > 0 so training has a length")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if not self.learning_rate >= 0 or not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.learning_rate and weight_decay must be >= 0, got "
                             f"{self.learning_rate}, {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio and eval_fraction must lie in [0, 1), got "
                             f"{self.warmup_ratio}, {self.eval_fraction}")
        if self.bf16 not in (True, False, precision.AUTO):
            raise ValueError(f"TrainConfig.bf16 must be true, false or 'auto', got {self.bf16!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"TrainConfig.save_total_limit must be None or >= 1, got {self.save_total_limit}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        """Build from a JSON-like dict; an unknown key is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown TrainConfig options {unknown}; valid ones are {sorted(names)}")
        return cls(**d)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    As transformers' ``get_{linear,cosine}_schedule_with_warmup``: ``step / warmup`` during warmup,
    then ``(total - step) / (total - warmup)`` (linear) or ``0.5 (1 + cos(pi p))`` with
    ``p = (step - warmup) / (total - warmup)`` (cosine); "constant" stays at 1 after warmup.
    """
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` with the config's hyper-parameters (fp32 or 8-bit states)."""
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    return AdamW8bit(params, **kwargs) if config.optim == "adamw_8bit" else torch.optim.AdamW(params, **kwargs)


def autocasts_bf16(bf16: bool | str, device: torch.device | str) -> bool:
    """``TrainConfig.bf16`` on ``device``: as given, or for "auto" whether bf16 is its fast dtype."""
    return precision.auto_dtype(device) == torch.bfloat16 if bf16 == precision.AUTO else bool(bf16)


def token_loss_sum(model: nn.Module, batch: dict, bf16: bool | str) -> torch.Tensor:
    """Sum of the next-token cross-entropies over the target tokens of ``batch`` (fp32 scalar)."""
    device = model.lm_head.weight.device
    bf16 = autocasts_bf16(bf16, device)
    # Right padding comes after every real token, so causal attention alone keeps real tokens
    # from seeing it (padding positions have no loss); only packed rows need the segment mask.
    segment_ids = batch["segment_ids"].to(device) if "segment_ids" in batch else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        # token t + 1 is predicted at position t; the loss is fused with the output head (loralite.loss)
        return model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                     segment_ids=segment_ids, labels=batch["labels"].to(device))


def target_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())


def _world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) unless torch.distributed is initialized."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _datasets(data, eval_data, tokenizer, config: TrainConfig):
    """Train and eval ``SFTDataset``s from paths, row lists or datasets (eval split by ``eval_fraction``)."""
    build = lambda src: src if isinstance(src, data_lib.SFTDataset) else data_lib.build_dataset(  # noqa: E731
        src, tokenizer, config.max_seq_length, config.packing, config.train_on_inputs)
    if config.eval_fraction > 0:
        if eval_data is not None or isinstance(data, data_lib.SFTDataset):
            raise ValueError("TrainConfig.eval_fraction splits rows of a file or list; it cannot be combined "
                             "with eval_data or a pre-built SFTDataset")
        rows, eval_rows = data_lib.split_rows(data_lib.load_rows(data), config.eval_fraction, config.seed)
        return build(rows), build(eval_rows)
    return build(data), None if eval_data is None else build(eval_data)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: data_lib.SFTDataset, config: TrainConfig) -> float:
    """Mean token loss over all of ``dataset`` (the same on every rank)."""
    was_training = model.training
    model.eval()
    batches = data_lib.BatchIterator(dataset, config.per_device_train_batch_size, shuffle=False)
    total, count = 0.0, 0
    for _ in range(len(batches)):
        batch = next(batches)
        total += float(token_loss_sum(model, batch, config.bf16))
        count += target_tokens(batch)
    model.train(was_training)
    return total / max(1, count)


class _Metrics:
    """``output_dir/metrics.jsonl``: one JSON object per logged step (rank 0 only)."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        kept = []
        if keep_until > 0 and path.is_file():  # resuming: drop what the interrupted run logged after the checkpoint
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= keep_until]
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss(history: list[dict], path: Path) -> Path | None:
    """Draw the training (and eval) loss over steps to ``path``; None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss (mean token cross-entropy)")
    ax.legend()
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def train(model: nn.Module, tokenizer, data, config: TrainConfig, eval_data=None) -> list[dict]:
    """Train the parameters of ``model`` that require grad (its active LoRA adapter) on ``data``.

    Args:
        model: a ``Llama`` with an active adapter (``add_lora``), on the device to train on.
        tokenizer: renders and tokenizes the rows (``load_tokenizer``).
        data: a ``.jsonl``/``.json`` path, a list of row dicts, or an ``SFTDataset``.
        config: the ``TrainConfig``.
        eval_data: optional held-out rows in the same forms, evaluated every ``eval_steps``.

    Returns:
        One record per optimizer step, from the first step of the run (also those restored from
        a checkpoint): ``step``, ``epoch``, ``loss`` (mean token loss of the global batch),
        ``lr``, ``grad_norm`` (before clipping), ``tokens``, ``tokens_per_s`` and, on eval
        steps, ``eval_loss``.

    Raises:
        NonFiniteLossError: the loss or gradient norm was NaN/inf; the last checkpoint is kept.
    """
    config = dataclasses.replace(config, bf16=autocasts_bf16(config.bf16, model.lm_head.weight.device))
    run = _Run(model, tokenizer, data, eval_data, config)
    try:
        return run.loop()
    finally:
        run.close()


class _Run:
    """The state of one call of ``train``: model, optimizer, data position, logs."""

    def __init__(self, model, tokenizer, data, eval_data, config: TrainConfig):
        self.model, self.config = model, config
        self.rank, self.world = _world()
        self.adapter = ckpt.trained_adapter(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dataset, self.eval_dataset = _datasets(data, eval_data, tokenizer, config)
        self.batches = data_lib.BatchIterator(self.dataset, config.per_device_train_batch_size, seed=config.seed,
                                              world_size=self.world, rank=self.rank)
        accum = config.gradient_accumulation_steps
        self.total_steps = config.max_steps if config.max_steps > 0 else \
            math.ceil(config.num_train_epochs * len(self.batches) / accum)
        self.warmup = config.warmup_steps or math.ceil(config.warmup_ratio * self.total_steps)
        self.optimizer = make_optimizer(self.params, config)
        self.output_dir = Path(config.output_dir)
        self.step, self.history = 0, []
        self._start(model)
        self.metrics = _Metrics(self.output_dir / "metrics.jsonl", self.step) if self.rank == 0 else None
        self.bar = None
        if self.rank == 0 and not config.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step")

    def _start(self, model) -> None:
        """Seed and synchronise a fresh run, or restore a checkpoint."""
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt.resolve_checkpoint(config.resume_from_checkpoint, self.output_dir) \
            if config.resume_from_checkpoint else None
        if path is None:
            torch.manual_seed(config.seed)
            random.seed(config.seed)
            np.random.seed(config.seed)
            if self.world > 1:  # every rank starts from rank 0's adapter weights, as DDP does
                for p in self.params:
                    torch.distributed.broadcast(p.data, src=0)
            return
        state = ckpt.load_checkpoint(path, model, self.optimizer, self.rank, self.world)
        self.batches.load_state_dict(state.data)
        self.step, self.history = state.step, state.history

    def loop(self) -> list[dict]:
        was_training = self.model.training
        self.model.train()
        self.model.gradient_checkpointing = self.config.gradient_checkpointing
        while self.step < self.total_steps:
            record = self.train_step()
            self.step += 1
            config = self.config
            if self.eval_dataset is not None and ((config.eval_steps and self.step % config.eval_steps == 0)
                                                  or self.step == self.total_steps):
                record["eval_loss"] = evaluate(self.model, self.eval_dataset, config)
            self.history.append(record)
            self.log(record)
            if config.save_steps and (self.step % config.save_steps == 0 or self.step == self.total_steps):
                self.save()
        if self.rank == 0 and self.history:
            plot_loss(self.history, self.output_dir / "loss.png")
        self.model.train(was_training)
        return self.history

    def train_step(self) -> dict:
        """Accumulate the gradient of one global batch, clip it, and take one optimizer step."""
        start = time.perf_counter()
        micro = [next(self.batches) for _ in range(self.config.gradient_accumulation_steps)]
        # (target tokens, input tokens) of the whole global batch, summed over ranks
        counts = _all_reduce_sum(torch.tensor([sum(target_tokens(b) for b in micro),
                                               sum(int(b["attention_mask"].sum()) for b in micro)],
                                              dtype=torch.float64, device=self._reduce_device()), self.world)
        n_targets = max(1.0, float(counts[0]))
        loss_sum = 0.0
        for batch in micro:
            loss = token_loss_sum(self.model, batch, self.config.bf16)
            (loss / n_targets).backward()
            loss_sum += float(loss.detach())
        loss_sum = float(_all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64,
                                                      device=self._reduce_device()), self.world)[0])
        self._all_reduce_grads()
        grad_norm = self._clip()
        mean_loss = loss_sum / n_targets
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            self._fail(mean_loss, grad_norm)
        lr = self.config.learning_rate * lr_factor(self.step, self.total_steps, self.warmup,
                                                   self.config.lr_scheduler_type)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        epoch = (self.batches.epoch * len(self.batches) + self.batches.index) / len(self.batches)
        return {"step": self.step + 1, "epoch": round(epoch, 4), "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": int(counts[1]), "tokens_per_s": float(counts[1]) / seconds}

    def _reduce_device(self) -> torch.device:
        """Where collectives run: CUDA for NCCL, else the CPU (gloo)."""
        return self.params[0].device if self.world > 1 and self.params[0].is_cuda else torch.device("cpu")

    def _all_reduce_grads(self) -> None:
        """Sum the gradients over ranks in one collective (each already divided by the global N)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (total trainable elements,)
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()

    def _clip(self) -> float:
        """Global L2 norm of the gradients (before clipping), clipped to ``max_grad_norm`` if set."""
        if self.config.max_grad_norm > 0:
            return float(nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        grads = [p.grad for p in self.params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _fail(self, loss: float, grad_norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        found = ckpt.checkpoints(self.output_dir)
        kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
        raise NonFiniteLossError(f"training stopped at step {self.step + 1}: loss {loss}, gradient norm {grad_norm} "
                                 f"(not finite); no update was applied and {kept}. Lower learning_rate, check "
                                 f"the data, or train in float32 (bf16=False)")

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        if self.step % self.config.logging_steps == 0 or self.step == self.total_steps or "eval_loss" in record:
            self.metrics.write(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def save(self) -> None:
        state = ckpt.TrainerState(self.step, self.batches.state_dict(), self.history, self.world)
        ckpt.save_checkpoint(self.output_dir, self.model, self.optimizer, state, self.rank,
                             self.config.save_total_limit)
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
