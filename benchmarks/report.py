"""Gather every ``benchmarks/results/*.json`` into ``benchmarks/results/report.md`` with plots.

Suites write different JSON (``{"meta", "rows"}`` from ``common.write_results``, older ones
``"results"`` or nested dicts of cases), so each file is read generically: every list of
records, and every dict of records, becomes a table. Three plots (PNG, next to the report):

- ``report_memory.png``: peak memory of QLoRA by model size (estimated, and measured where a
  ``memory*.json`` has the case) against the 24 GB line;
- ``report_speed.png``: every ratio column (loralite / peer, or speedups) of every suite;
- ``report_kernels.png``: every throughput column (GB/s, TFLOP/s) against the ceiling rows.

A cell may hold text where a number has no meaning (a method a library does not offer), and
timings come with a min-max column beside their median; plots skip both.

    python benchmarks/report.py [--folder benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_GB = 24  # the consumer-GPU target (RTX 3090 / 4090), in GB = 1e9 bytes
SIZES = ["llama-2-7b", "llama-2-13b", "llama-33b", "llama-2-70b"]
RATIO_WORDS = ("ratio", "speedup", "loralite / ")  # column names of loralite / peer figures
SPREAD_WORDS = ("min-max", "min_max")  # column names of a timing's spread, which names no row


def _flat(record: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def _is_record(value) -> bool:
    return isinstance(value, dict) and any(not isinstance(v, (dict, list)) for v in value.values())


def tables(obj, title: str = "") -> list[tuple[str, list[dict]]]:
    """Every table in a JSON value: lists of records, and dicts whose values are all records."""
    found = []
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return [(title, [_flat(r) for r in obj])]
    if isinstance(obj, dict):
        if obj and all(_is_record(v) for v in obj.values()) and len(obj) > 1:
            return [(title, [{"name": k, **_flat(v)} for k, v in obj.items()])]
        for key, value in obj.items():
            if key != "meta":
                found += tables(value, f"{title} / {key}" if title else key)
    return found


def meta_of(data) -> dict:
    """The run facts: ``meta``, or the top-level scalars of older formats."""
    if isinstance(data, dict) and isinstance(data.get("meta"), dict):
        return data["meta"]
    return {k: v for k, v in data.items() if not isinstance(v, (dict, list))} if isinstance(data, dict) else {}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(row: dict) -> str:
    """The row's text cells (what it measures), without spreads and stand-ins for numbers."""
    return ", ".join(str(v) for k, v in row.items() if isinstance(v, (str, bool)) and v != "-"
                     and not any(w in k.lower() for w in SPREAD_WORDS))[:60]


def _varying_integers(rows: list[dict]) -> list[str]:
    """Columns whose whole numbers differ between ``rows`` (threads, tokens, shapes)."""
    columns = dict.fromkeys(c for r in rows for c in r)
    return [c for c in columns
            if len({r[c] for r in rows if isinstance(r.get(c), int) and not isinstance(r[c], bool)}) > 1]


def _labels(rows: list[dict]) -> list[str]:
    """A label per row: its text, and where rows share a text, the whole numbers that tell them apart."""
    texts = [_text(row) for row in rows]
    groups: dict[str, list[dict]] = {}
    for text, row in zip(texts, rows):
        groups.setdefault(text, []).append(row)
    varying = {text: _varying_integers(group) for text, group in groups.items()}
    return [", ".join([text] + [f"{c}={row[c]}" for c in varying[text] if _is_number(row.get(c))])
            for text, row in zip(texts, rows)]


def plot_memory(suites: dict, out: Path) -> None:
    """Estimated QLoRA peaks (r=16 all linear, batch 1 x 512, checkpointing, 8-bit AdamW) + measured points."""
    import loralite as ll
    from loralite.configs import load_config
    from loralite.memory import estimate_memory

    lora = ll.LoraConfig(r=16, alpha=32, target_modules="all-linear")
    est = [estimate_memory(load_config(n), lora, ll.NF4Config(), seq_len=512, gradient_checkpointing=True,
                           optim="adamw_8bit") for n in SIZES]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(SIZES, [e.weights / 1e9 for e in est], label="NF4 weights")
    ax.bar(SIZES, [(e.total - e.weights) / 1e9 for e in est], bottom=[e.weights / 1e9 for e in est],
           label="adapters, optimizer, activations, buffers")
    for name, rows in suites.items():
        if name.startswith("memory"):
            points = [(r["model"], r["allocated_GiB"] * 2**30 / 1e9) for r in rows
                      if r.get("model") in SIZES and r.get("method") == "qlora"]
            if points:
                ax.scatter(*zip(*points), color="black", zorder=3, label=f"measured ({name})")
    ax.axhline(TARGET_GB, color="red", linestyle="--", label="24 GB")
    ax.set_ylabel("peak memory (GB)")
    ax.set_title("QLoRA r=16, all linear, 512 tokens, checkpointing, 8-bit AdamW")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _numeric_columns(rows: list[dict], words: tuple[str, ...]) -> list[str]:
    """Columns named with one of ``words`` that hold numbers, text in some rows at most."""
    columns = dict.fromkeys(c for r in rows for c in r)
    return [c for c in columns if any(w in c.lower() for w in words)
            and any(_is_number(r.get(c)) for r in rows)
            and all(_is_number(r[c]) or isinstance(r[c], str) for r in rows if c in r)]


def plot_bars(suites: dict, words: tuple[str, ...], out: Path, xlabel: str, line: float | None,
              ceiling_words: tuple[str, ...] = ()) -> bool:
    """One horizontal bar per (suite, row, column) whose column name has one of ``words``."""
    bars = []
    for name, rows in suites.items():
        labels = _labels(rows)
        for column in _numeric_columns(rows, words):
            for row, label in zip(rows, labels):
                if _is_number(row.get(column)) and math.isfinite(row[column]):
                    ceiling = any(w in label.lower() for w in ceiling_words)
                    bars.append((f"{name}: {label} [{column}]", row[column], ceiling))
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(bars) + 1.2))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=["gray" if b[2] else "tab:blue" for b in bars])
    if line is not None:
        ax.axvline(line, color="red", linestyle="--")
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def main(folder: Path = RESULTS) -> Path:
    sections, suites = [], {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            print(f"{path}: not valid JSON ({e}); left out of the report", file=sys.stderr)
            continue
        found = tables(data)
        suites.update({f"{path.stem}{' / ' + t if t else ''}": rows for t, rows in found})
        meta = ", ".join(f"{k}: {v}" for k, v in _flat(meta_of(data)).items())
        body = "\n\n".join((f"**{t}**\n\n" if t else "") + markdown(rows) for t, rows in found)
        sections.append(f"## {path.stem}\n\n{meta}\n\n{body or '(no table in this file)'}\n")
    plot_memory({k: v for k, v in suites.items() if k.startswith("memory")}, folder / "report_memory.png")
    plots = ["![memory](report_memory.png)"]
    if plot_bars(suites, RATIO_WORDS, folder / "report_speed.png", "ratio (see each column)", 1.0):
        plots.append("![speed](report_speed.png)")
    if plot_bars(suites, ("gb_per_s", "gbps", "tflop", "pct_of"), folder / "report_kernels.png",
                 "throughput (GB/s, TFLOP/s or % of the ceiling)", None, ("copy", "ceiling", "peak")):
        plots.append("![kernels](report_kernels.png)")
    text = ("# loralite benchmark report\n\nGathered by `benchmarks/report.py` from every "
            "`benchmarks/results/*.json`; each section is one suite as it was last run.\n\n"
            + "\n\n".join(plots) + "\n\n" + "\n".join(sections))
    report = folder / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, report)
    print(f"wrote {report} ({len(sections)} suites, {len(plots)} plots)")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=RESULTS,
                        help="folder of the *.json results; report.md and the plots are written there")
    main(parser.parse_args().folder)
