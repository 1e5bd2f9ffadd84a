"""What every benchmark shares: machine facts, alternating timing, JSON + Markdown output.

Machines here are shared and noisy, so each suite times loralite and its peer in turns,
in one process, and reports medians, their spread (min-max) and their ratio rather than absolute
numbers alone. Every result file records the CPU's features, since the figures differ by CPU
(bf16 matmuls run ~4x faster than float32 with AVX512-BF16, several times slower without).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from loralite import precision

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict:
    """The CPU facts that change the figures: model, the SIMD features that pick kernels, and
    the compute dtype ``"auto"`` resolves to on it."""
    features = [f for f in precision.REPORTED_FEATURES if f in precision.cpu_features()]
    return {"cpu": cpu_model(), "cpu_features": " ".join(features) or "none reported",
            "auto_dtype": str(precision.auto_dtype("cpu")).removeprefix("torch.")}


def machine_info() -> dict:
    """The facts a reader needs to compare numbers across runs."""
    info = {"torch": torch.__version__, "python": platform.python_version(), **cpu_info(),
            "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class Timing(float):
    """The median of timed samples (a float, so ratios read naturally), with the samples kept."""

    samples: list[float]

    def __new__(cls, samples: list[float]) -> Timing:
        timing = super().__new__(cls, statistics.median(samples))
        timing.samples = list(samples)
        return timing

    def scaled(self, factor: float) -> Timing:
        """The same timing in other units (e.g. 1e3 for milliseconds)."""
        return Timing([s * factor for s in self.samples])

    @property
    def spread(self) -> str:
        """``min-max`` of the samples, in the units of the median."""
        return f"{_short(min(self.samples))}-{_short(max(self.samples))}"


def _short(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux ``VmHWM``).

    Not ``ru_maxrss``: Linux carries a parent's peak over fork + exec into the child's.
    """
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_alternating(fns: dict, repeats: int = 5, warmup: int = 1, device="cpu") -> dict[str, Timing]:
    """Seconds per call of each function (median and samples), called in turns so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(s) for name, s in samples.items()}


def _cell(value) -> str:
    return _short(value) if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], meta: dict | None = None, notes: str = "",
                  folder: Path = RESULTS) -> Path:
    """Write ``folder/name.json`` (meta + rows) and ``folder/name.md`` (a table)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**machine_info(), **(meta or {})}
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    header = f"# {name}\n\n" + ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n"
    (folder / f"{name}.md").write_text(header + markdown_table(rows) + "\n" + (f"\n{notes}\n" if notes else ""))
    print(markdown_table(rows))
    return folder / f"{name}.json"
