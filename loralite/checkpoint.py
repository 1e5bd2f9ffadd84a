"""Training checkpoints: everything needed to continue a run bit-identically, without pickle.

``output_dir/checkpoint-STEP/`` holds::

    adapter_config.json, adapter_model.safetensors   the trained adapter, PEFT's layout (save_adapter)
    optimizer.safetensors                             every optimizer state tensor, keyed "STATE.INDEX"
    rng.safetensors                                   torch CPU (and CUDA) generator states, one row per rank;
                                                      numpy's MT19937 key
    trainer_state.json                                step, optimizer hyper-parameters and integer states,
                                                      parameter names, schedule, data position,
                                                      python ``random`` state, loss history

A checkpoint is written into a hidden temporary folder beside its final place and renamed
into it once complete, so a crash (even SIGKILL) never leaves a half-written ``checkpoint-*``;
only ``save_total_limit`` checkpoints are kept, the newest by step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loralite import adapters

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
_PATTERN = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainerState:
    """What a checkpoint holds besides tensors of the model (read back by ``load_checkpoint``)."""

    step: int  # optimizer steps taken
    data: dict  # BatchIterator.state_dict()
    history: list[dict]  # one loss record per step so far
    world_size: int = 1  # processes of the run; a resume must use as many


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete ``checkpoint-STEP`` folders of ``output_dir``, oldest step first."""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if _PATTERN.fullmatch(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_PATTERN.fullmatch(p.name).group(1)))


def resolve_checkpoint(resume: str | bool, output_dir: str | os.PathLike) -> Path | None:
    """``resume_from_checkpoint`` as a folder: True picks the newest in ``output_dir``."""
    if resume is True:
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise OSError(f"resume_from_checkpoint={str(resume)!r}: {path / STATE_NAME} not found; "
                      f"pass a checkpoint-STEP folder or True for the newest in output_dir")
    return path


def trained_adapter(model: nn.Module) -> str:
    """The name of the one active adapter, checking that it holds every trainable parameter."""
    active = list(model.__dict__.get("lora_active", []))
    if len(active) != 1:
        raise ValueError(f"training needs exactly one active LoRA adapter on the model, found {active}; "
                         f"call add_lora (or set_adapter) first")
    owned = {id(p) for p in adapters.adapter_state_dict(model, active[0]).values()}
    strays = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if strays:
        raise ValueError(f"parameters {strays[:3]} require grad but are not part of adapter {active[0]!r}, so "
                         f"checkpoints could not restore them; freeze them or add them to modules_to_save")
    return active[0]


def _rng_rows(world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's torch generator states, as (world_size, n) uint8 rows gathered to all ranks."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    if world_size == 1:
        return {k: v[None] for k, v in states.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    rows = {}
    for key, state in states.items():
        gathered = [torch.empty_like(state, device=device) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, state.to(device))
        rows[key] = torch.stack(gathered).cpu()
    return rows


def save_checkpoint(output_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainerState, rank: int = 0, save_total_limit: int | None = None) -> Path | None:
    """Write ``output_dir/checkpoint-STEP`` (rank 0 only; every rank must call: RNG states are gathered)."""
    rng = _rng_rows(state.world_size)
    if rank != 0:
        return None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{state.step}"
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".{final.name}."))
    try:
        adapters.save_adapter(model, tmp, name=trained_adapter(model))
        tensors, optim_json = _optimizer_parts(model, optimizer)
        save_file(tensors, tmp / OPTIMIZER_NAME, metadata={"format": "pt"})
        np_state = np.random.get_state()  # ("MT19937", key (624,) uint32, pos, has_gauss, cached_gaussian)
        save_file({**rng, "numpy_key": torch.from_numpy(np_state[1].astype(np.int64))}, tmp / RNG_NAME)
        py_version, py_state, py_gauss = random.getstate()
        trainer = {"step": state.step, "world_size": state.world_size, "data": state.data, "history": state.history,
                   "optimizer": optim_json, "numpy": list(np_state[2:]),
                   "python_random": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss}}
        (tmp / STATE_NAME).write_text(json.dumps(trainer, indent=1) + "\n")
        if final.exists():  # an older run's checkpoint of the same step (training restarted before it)
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if save_total_limit:
        for old in checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    return final


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's names of the optimizer's parameters, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _optimizer_parts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and everything else (for JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{key}.{index}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{key}.{index}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars,
                     "param_names": _param_names(model, optimizer),
                     "type": type(optimizer).__name__}


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int = 0, world_size: int = 1) -> TrainerState:
    """Restore adapter weights, optimizer and RNG states from ``path``; return the trainer state.

    Raises:
        ValueError: the checkpoint was made for other trainable parameters, another optimizer or
            another number of processes.
    """
    path = Path(path)
    trainer = json.loads((path / STATE_NAME).read_text())
    if trainer["world_size"] != world_size:
        raise ValueError(f"{path} was written by a run of {trainer['world_size']} processes; resume it with "
                         f"the same number (now {world_size}), since the data order depends on it")
    _load_adapter_weights(path, model)
    _load_optimizer(path, model, optimizer, trainer["optimizer"])
    rng = load_file(path / RNG_NAME)
    torch.set_rng_state(rng["torch_cpu"][rank].clone())
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"][rank].clone())
    key = rng["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, *trainer["numpy"]))
    py = trainer["python_random"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    return TrainerState(trainer["step"], trainer["data"], trainer["history"], trainer["world_size"])


@torch.no_grad()
def _load_adapter_weights(path: Path, model: nn.Module) -> None:
    """Copy ``path/adapter_model.safetensors`` into the trained adapter's parameters, in place."""
    expected = adapters.adapter_state_dict(model, trained_adapter(model))
    tensors = load_file(path / adapters.WEIGHTS_NAME)
    if set(tensors) != set(expected):
        raise ValueError(f"{path / adapters.WEIGHTS_NAME} holds other tensors than this model's adapter "
                         f"(missing {sorted(set(expected) - set(tensors))[:3]}, unexpected "
                         f"{sorted(set(tensors) - set(expected))[:3]}); resume with the same LoRA config")
    for key, param in expected.items():
        if tensors[key].shape != param.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, the model {tuple(param.shape)}")
        param.copy_(tensors[key])


def _load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    params = _param_names(model, optimizer)
    if saved["param_names"] != params or saved["type"] != type(optimizer).__name__:
        raise ValueError(f"{path / STATE_NAME}: the optimizer state is for a {saved['type']} over "
                         f"{len(saved['param_names'])} parameters, not this {type(optimizer).__name__} over "
                         f"{len(params)}; resume with the same optim and LoRA config")
    state: dict[int, dict] = {}
    for key, value in [*load_file(path / OPTIMIZER_NAME).items(), *saved["scalars"].items()]:
        name, index = key.rsplit(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
