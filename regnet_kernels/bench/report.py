"""Results: rows -> speedups, a markdown table, CSV rows appended, PNG charts.

Columns of a row (CSV and table):
  ms            median time of one call (a batch); ms_low / ms_high the spread: percentiles
                (CUDA) or quartiles (CPU) of one round, the range of the rounds' medians with
                --repeat
  images_per_s  batch / median time
  speedup       best baseline's median / this median, in the same (case, mode, dtype, batch)
                group; baselines are eager, eager_cl, compile, compile_freeze,
                compile_max
  gbps, tflops  the bytes / FLOP the call must move / do (see traffic) over the median time
  floor_ms      roofline floor max(bytes / peak bandwidth, FLOP / peak FLOP/s); x_floor is
                measured / floor (1.0 = at the roofline)
  peak_mem_mb   peak CUDA memory one call allocates beyond what was resident (activations,
                workspaces, gradients; not weights and inputs); empty on CPU
  status        ok, unavailable, unsupported or error; reason says why
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from .providers import BASELINES, PROVIDERS

#: One color per provider in every chart.
COLORS = {provider: f"C{i}" for i, provider in enumerate(PROVIDERS)}

MACHINE_FIELDS = ["timestamp", "device", "device_name", "clocks", "torch", "triton", "cuda",
                  "cudnn", "threads"]
FIELDS = MACHINE_FIELDS + [
    "level", "case", "op", "model", "resolution", "mode", "dtype", "batch", "provider", "status",
    "reason", "ms", "ms_low", "ms_high", "images_per_s", "speedup", "gbps", "tflops", "floor_ms",
    "x_floor", "peak_mem_mb", "bytes", "flops", "command",
]
GROUP = ("level", "case", "mode", "dtype", "batch")
TABLE = [("level", "level"), ("case", "case"), ("mode", "mode"), ("dtype", "dtype"),
         ("batch", "batch"), ("provider", "provider"), ("status", "status"), ("ms", "ms"),
         ("images_per_s", "img/s"), ("speedup", "vs best baseline"), ("gbps", "GB/s"),
         ("tflops", "TFLOP/s"), ("floor_ms", "floor ms"), ("x_floor", "x floor"),
         ("peak_mem_mb", "peak MB")]


def add_speedups(rows: list[dict]) -> None:
    """Fill ``speedup`` of every timed row against the fastest baseline of its group."""
    best: dict[tuple, float] = {}
    for row in rows:
        if row["status"] == "ok" and row["provider"] in BASELINES:
            key = tuple(row[k] for k in GROUP)
            best[key] = min(best.get(key, math.inf), row["ms"])
    for row in rows:
        key = tuple(row[k] for k in GROUP)
        if row["status"] == "ok" and key in best:
            row["speedup"] = best[key] / row["ms"]


def _cell(value: object) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """The results as a markdown table; reasons of rows that did not run are listed below it."""
    lines = ["| " + " | ".join(title for _, title in TABLE) + " |",
             "|" + "---|" * len(TABLE)]
    reasons: dict[str, int] = {}
    for row in rows:
        cells = [_cell(row.get(key)) for key, _ in TABLE]
        if row["status"] != "ok":
            note = reasons.setdefault(f"{row['provider']}: {row['reason']}", len(reasons) + 1)
            cells[[k for k, _ in TABLE].index("status")] += f" [{note}]"
        lines.append("| " + " | ".join(cells) + " |")
    if reasons:
        lines.append("")
        lines += [f"[{n}] {reason}" for reason, n in reasons.items()]
    return "\n".join(lines)


def machine_header(info: dict[str, str], command: str) -> str:
    """Markdown lines saying where, when and how the table was measured."""
    return "\n".join([
        f"- date: {info['timestamp']}",
        f"- device: {info['device_name']} ({info['device']}; clocks: {info['clocks'] or 'n/a'})",
        f"- threads: {info['threads']}",
        f"- torch {info['torch']}, triton {info['triton'] or 'n/a'}, CUDA {info['cuda'] or 'n/a'}, "
        f"cuDNN {info['cudnn'] or 'n/a'}",
        f"- command: `{command}`",
    ])


def append_csv(path: Path, rows: Iterable[dict]) -> None:
    """Append rows to a CSV, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            raise ValueError(f"{path} has other columns (an older harness?); pass a new --csv")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in FIELDS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def require_matplotlib():
    """matplotlib's pyplot on the file-only backend; RuntimeError saying how to get it."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib "
                           "(or pip install -e '.[plot]')") from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _latest_run(rows: list[dict]) -> list[dict]:
    """The timed rows of the CSV's last run (one run's rows share its start timestamp)."""
    last = rows[-1]
    return [r for r in rows if r["timestamp"] == last["timestamp"]
            and r["device"] == last["device"] and r["status"] == "ok"]


def plot(csv_path: Path, out_dir: Path) -> list[Path]:
    """PNG charts of the CSV's last run: images/s against batch per whole model, and the
    speedup over the best baseline per op / block case. Returns the files written."""
    plt = require_matplotlib()
    rows = _latest_run(read_csv(csv_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    models = [r for r in rows if r["level"] == "model"]
    if models:
        written.append(_plot_models(plt, models, out_dir / f"{csv_path.stem}-models.png"))
    parts = [r for r in rows if r["level"] in ("op", "block") and r["speedup"]]
    if parts:
        written.append(_plot_speedups(plt, parts, out_dir / f"{csv_path.stem}-ops.png"))
    return written


def _plot_models(plt, rows: list[dict], path: Path) -> Path:
    panels = sorted({(r["case"], r["mode"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (case, mode, dtype) in zip(axes[0], panels):
        series = defaultdict(list)
        for r in rows:
            if (r["case"], r["mode"], r["dtype"]) == (case, mode, dtype):
                series[r["provider"]].append((int(r["batch"]), float(r["images_per_s"])))
        for provider, points in sorted(series.items()):
            batches, ips = zip(*sorted(points))
            ax.plot(batches, ips, marker="o", label=provider, color=COLORS[provider])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(r["batch"]) for r in rows}))
        ax.set_xticklabels(sorted({int(r["batch"]) for r in rows}))
        ax.set_title(f"{case} {mode} {dtype}", fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"{rows[0]['device_name']} ({rows[0]['timestamp']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_speedups(plt, rows: list[dict], path: Path) -> Path:
    """Horizontal bars, one group per case, on a log axis (speedups span decades)."""
    labels = list(dict.fromkeys(f"{r['case']} {r['mode']} {r['dtype']} b{r['batch']}"
                                for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    height = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.12 * len(labels) * len(providers)))
    for i, provider in enumerate(providers):
        values = {f"{r['case']} {r['mode']} {r['dtype']} b{r['batch']}": float(r["speedup"])
                  for r in rows if r["provider"] == provider}
        ys = [j + i * height for j, label in enumerate(labels) if label in values]
        ax.barh(ys, [values[label] for label in labels if label in values], height,
                label=provider, color=COLORS[provider])
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the best baseline (log)")
    ax.set_title(f"{rows[0]['device_name']} ({rows[0]['timestamp']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
