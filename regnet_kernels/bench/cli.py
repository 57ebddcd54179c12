"""``python -m regnet_kernels bench``: options, presets, the run loop and the traffic table.

Presets fill in every option the user did not give:
- cuda:  ops and blocks of regnety_8gf at batch 32, whole models at batch 1..256, bf16, eval
         and training, every provider;
- cpu:   the same levels in fp32, eval, batches 1 and 8, eager (NCHW, channels_last) against
         the fused C++ CPU ops;
- smoke: the cpu preset at 64x64 and small batches, a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .cases import block_cases, model_case, op_cases
from .machine import machine_info
from .providers import DTYPES, PROVIDERS, Unavailable, make_step, prepare
from .report import (add_speedups, append_csv, machine_header, markdown_table, plot,
                     require_matplotlib)
from .timing import Timing, time_cpu, time_cpu_per_call, time_cuda
from .traffic import DTYPE_BYTES, H200_PEAKS, Cost, model_traffic, roofline_floor_s

LEVELS = ("op", "block", "model")
MODES = ("eval", "train")
DEFAULT_MODELS = ("regnety_8gf", "regnetx_400mf", "regnety_32gf")


@dataclass
class Config:
    """Everything a run depends on (after the preset filled in the defaults)."""

    device: str
    levels: tuple[str, ...]
    model: str
    models: tuple[str, ...]
    resolution: int
    batches: tuple[int, ...]
    op_batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    providers: tuple[str, ...]
    ops: tuple[str, ...]
    min_run_time: float
    repeat: int
    threads: int
    cpu_time: bool
    per_call: bool
    warmup_ms: float
    rep_ms: float

    def command(self) -> str:
        """The command line that reruns exactly this configuration."""
        parts = ["python -m regnet_kernels bench"]
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + {"batches": "batch", "op_batches": "op-batch", "dtypes": "dtype",
                           "levels": "level", "modes": "mode", "providers": "provider",
                           "ops": "op"}.get(f.name, f.name).replace("_", "-")
            if isinstance(value, bool):
                if value:
                    parts.append(flag)
            elif isinstance(value, tuple):
                if value:
                    parts.append(f"{flag} {','.join(map(str, value))}")
            else:
                parts.append(f"{flag} {value}")
        return " ".join(parts)


PRESETS = {
    "cuda": dict(levels=LEVELS, model="regnety_8gf", models=DEFAULT_MODELS, resolution=224,
                 batches=(1, 8, 32, 128, 256), op_batches=(32,), dtypes=("bf16",),
                 modes=MODES, providers=PROVIDERS, min_run_time=1.0),
    "cpu": dict(levels=LEVELS, model="regnety_8gf", models=DEFAULT_MODELS[:2], resolution=224,
                batches=(1, 8), op_batches=(8,), dtypes=("fp32",), modes=("eval",),
                providers=("eager", "eager_cl", "triton", "cuda", "cpu"), min_run_time=1.0),
    "smoke": dict(levels=LEVELS, model="regnety_8gf", models=("regnetx_400mf", "regnety_8gf"),
                  resolution=64, batches=(1, 4), op_batches=(2,), dtypes=("fp32",),
                  modes=("eval",), providers=("eager", "eager_cl", "triton", "cuda", "cpu"),
                  min_run_time=0.1),
}


def _csv_list(kind=str):
    def parse(text: str) -> tuple:
        return tuple(kind(v) for v in text.split(",") if v)
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    add = parser.add_argument
    add("--device", choices=("auto", "cuda", "cpu"), default="auto",
        help="auto: cuda when a GPU is present, else cpu")
    add("--preset", choices=tuple(PRESETS), help="defaults for the options below "
        "(default: the device's preset, cuda or cpu)")
    add("--cpu-smoke", action="store_true", help="same as --device cpu --preset smoke")
    add("--level", dest="levels", type=_csv_list(), help=f"comma list of {', '.join(LEVELS)}")
    add("--model", help="model whose layer shapes the op and block levels run "
        "(default regnety_8gf); also run as a whole model")
    add("--models", type=_csv_list(), help="whole models (default "
        f"{','.join(DEFAULT_MODELS)}; cpu: the first two)")
    add("--resolution", type=int, help="input size (default 224; smoke 64)")
    add("--batch", dest="batches", type=_csv_list(int), help="batch sizes of the model level")
    add("--op-batch", dest="op_batches", type=_csv_list(int), help="batch sizes of the op and "
        "block levels")
    add("--dtype", dest="dtypes", type=_csv_list(), help="comma list of bf16, fp16, fp32")
    add("--mode", dest="modes", type=_csv_list(), help="eval and/or train (block and model "
        "levels; the fused ops are eval ops)")
    add("--provider", dest="providers", type=_csv_list(),
        help=f"comma list of {', '.join(PROVIDERS)}")
    add("--op", dest="ops", type=_csv_list(), default=(), help="only these fused ops at the op "
        "level (conv_bn_act, se_excite, conv1x1_gate_residual)")
    add("--min-run-time", type=float, help="CPU: seconds per measurement (default 1; smoke 0.1)")
    add("--repeat", type=int, default=1, help="rounds in which the providers take turns; "
        "each row is the median of the rounds' medians (for machines with a varying load)")
    add("--threads", type=int, help="CPU threads for torch (default: torch's, the core count)")
    add("--cpu-time", action="store_true", help="CPU: time the process's CPU time, not the wall "
        "clock (needs --threads 1; robust to other jobs sharing the cores)")
    add("--per-call", action="store_true", help="CPU: each of the --repeat rounds calls every "
        "provider once (order rotated), each call timed alone; each row is the median over the "
        "rounds (for a machine whose speed drifts within seconds; use --repeat 10 or more)")
    add("--warmup-ms", type=float, default=25.0, help="CUDA: do_bench warm-up (ms)")
    add("--rep-ms", type=float, default=100.0, help="CUDA: do_bench measuring time (ms)")
    add("--peak-gbps", type=float, help="peak bandwidth for the roofline, GB/s (default: "
        "H200 4300 on an H200; none on other devices)")
    add("--peak-tflops", type=float, help="peak FLOP/s for the roofline, TFLOP/s (default: "
        "H200 790 bf16/fp16, 395 fp32 TF32)")
    add("--csv", type=Path, help="append rows here (default benchmarks/results/bench-<device>.csv; "
        "smoke runs: none)")
    add("--markdown", type=Path, help="also write the table, with the machine and command, here")
    add("--plot", nargs="?", type=Path, const=True, default=None, metavar="DIR",
        help="write PNG charts of this run (default: next to the CSV)")
    add("--static", metavar="MODEL", help="static kernel report, no GPU needed: compile every "
        "Triton kernel MODEL's eval forward and training step launch (at --batch, default 256; "
        "--dtype, default bf16; --mode, default eval,train) and the CUDA .cu kernels for "
        "--arch, read registers, spills, shared memory, loads, MMAs and the main loop from "
        "the SASS, and predict each launch's time from a model (not a measurement); markdown "
        "on stdout, --markdown / --csv files")
    add("--arch", default="sm_90", help="--static: target GPU architecture (default sm_90)")
    add("--jobs", type=int, default=2, help="--static: compiler processes (default 2)")
    add("--no-cuda-sources", action="store_true", help="--static: skip the .cu kernels")
    add("--ddp", type=int, metavar="N", help="with --mode train: time a DDP training step, "
        "fused against eager channels_last, on N ranks (N GPUs with NCCL, else N CPU processes "
        "with gloo); the first of --models/--model (default regnety_400mf), --batch per rank "
        "(default 32), --resolution, --dtype")
    add("--ddp-steps", type=int, default=10, help="--ddp: timed steps (default 10)")
    add("--traffic", nargs="*", metavar="MODEL", help="print the analytic traffic table of these "
        f"models (default {', '.join(DEFAULT_MODELS)}) and exit; uses --dtype and --resolution")


def _resolve_device(args: argparse.Namespace) -> str:
    if args.cpu_smoke:
        return "cpu"
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    return args.device


def make_config(args: argparse.Namespace) -> Config:
    """Options over the preset's defaults, checked."""
    device = _resolve_device(args)
    preset = PRESETS["smoke" if args.cpu_smoke else args.preset or device]
    chosen = {k: getattr(args, k) for k in ("levels", "model", "models", "resolution", "batches",
                                           "op_batches", "dtypes", "modes", "providers",
                                           "min_run_time")}
    values = {k: v if v not in (None, ()) else preset[k] for k, v in chosen.items()}
    models = tuple(dict.fromkeys(values["models"] + ((args.model,) if args.model else ())))
    config = Config(device=device, models=models, ops=tuple(args.ops), repeat=args.repeat,
                    threads=args.threads or torch.get_num_threads(), cpu_time=args.cpu_time,
                    per_call=args.per_call, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                    **{k: v for k, v in values.items() if k != "models"})
    if config.cpu_time and (config.device != "cpu" or config.threads != 1):
        raise SystemExit("error: --cpu-time needs --device cpu and --threads 1 (with more threads "
                         "the CPU time adds up every thread, spin-waits included)")
    if config.repeat < 1:
        raise SystemExit(f"error: --repeat must be at least 1, got {config.repeat}")
    if config.per_call and config.device != "cpu":
        raise SystemExit("error: --per-call times CPU calls one by one (a GPU call returns before "
                         "its kernels finish; do_bench times CUDA)")
    for name, given, known in (("level", config.levels, LEVELS), ("mode", config.modes, MODES),
                               ("dtype", config.dtypes, tuple(DTYPES)),
                               ("provider", config.providers, PROVIDERS)):
        unknown = set(given) - set(known)
        if unknown:
            raise SystemExit(f"error: unknown {name} {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(known)}")
    return config


def peaks(args: argparse.Namespace, device_name: str, dtype: str) -> tuple[float | None, ...]:
    """(bytes/s, FLOP/s) for the roofline: the flags, else H200's on an H200, else none."""
    h200 = "H200" in device_name
    bandwidth = args.peak_gbps * 1e9 if args.peak_gbps else (
        H200_PEAKS["bandwidth"] if h200 else None)
    flops = args.peak_tflops * 1e12 if args.peak_tflops else (
        H200_PEAKS["flops"][dtype] if h200 else None)
    return bandwidth, flops


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _cases(config: Config) -> list:
    cases = []
    if "op" in config.levels:
        cases += [c for c in op_cases(config.model, config.resolution)
                  if not config.ops or c.op in config.ops]
    if "block" in config.levels:
        cases += block_cases(config.model, config.resolution)
    if "model" in config.levels:
        cases += [model_case(m, config.resolution) for m in config.models]
    return cases


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measure(step, config: Config):
    if config.device == "cuda":
        return time_cuda(step, config.warmup_ms, config.rep_ms)
    return time_cpu(step, config.min_run_time, config.cpu_time)


def _timed_fields(case, mode: str, dtype: str, batch: int, timing, bandwidth, flops) -> dict:
    """Throughput and roofline columns of a timed row."""
    cost = case.cost(batch, dtype)
    if mode == "train":  # forward + input and weight gradients; train traffic not modelled
        cost = Cost(0, 3 * cost.flops)
    seconds = timing.median_ms / 1e3
    floor = roofline_floor_s(cost, bandwidth if cost.bytes else None, flops)
    return {"ms": timing.median_ms, "ms_low": timing.low_ms, "ms_high": timing.high_ms,
            "images_per_s": batch / seconds,
            "gbps": cost.bytes / seconds / 1e9 if cost.bytes else None,
            "tflops": cost.flops / seconds / 1e12, "peak_mem_mb": timing.peak_mem_mb,
            "floor_ms": floor * 1e3 if floor else None,
            "x_floor": seconds / floor if floor else None,
            "bytes": cost.bytes or None, "flops": cost.flops}


def _failure(error: Exception) -> tuple[str, str]:
    """(status, reason) of a provider that could not be prepared or run."""
    if isinstance(error, Unavailable):
        return "unavailable", str(error)
    first = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, NotImplementedError):
        return "unsupported", first
    return "error", f"{type(error).__name__}: {first}"


def _combine(timings: list):
    """One timing from several rounds: the median of the rounds' medians, and their range as
    the spread (a single round keeps its own spread)."""
    if len(timings) == 1:
        return timings[0]
    medians = [t.median_ms for t in timings]
    peaks_mb = [t.peak_mem_mb for t in timings if t.peak_mem_mb is not None]
    return Timing(statistics.median(medians), min(medians), max(medians),
                  max(peaks_mb) if peaks_mb else None)


def _time_batch(case, mode: str, dtype: str, batch: int, prepared: dict,
                config: Config) -> dict:
    """Time every prepared provider at one batch size: a Timing, or (status, reason) per
    provider. Providers take turns for ``config.repeat`` rounds, so a machine whose load
    changes (other jobs on a shared CPU) slows every provider alike; with ``per_call``, one
    call each per round."""
    results, steps = {}, {}
    with torch.set_grad_enabled(mode == "train"):
        for provider, ready in prepared.items():
            if isinstance(ready, tuple):  # (status, reason) from prepare
                results[provider] = ready
                continue
            try:
                steps[provider] = make_step(ready, case, batch, dtype, mode, config.device)
            except Exception as e:  # noqa: BLE001 - a failing provider is a result
                results[provider] = _failure(e)
        timings = {provider: [] for provider in steps}
        if config.per_call:
            for provider, timed in time_cpu_per_call(steps, config.repeat,
                                                     config.cpu_time).items():
                if isinstance(timed, Exception):
                    results[provider] = _failure(timed)
                else:
                    timings[provider].append(timed)
        else:
            for _ in range(config.repeat):
                for provider, step in steps.items():
                    if provider in results:  # failed in an earlier round
                        continue
                    try:
                        timings[provider].append(_measure(step, config))
                    except Exception as e:  # noqa: BLE001
                        results[provider] = _failure(e)
    for provider in steps:
        results.setdefault(provider, _combine(timings[provider]))
    return results


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_cases(config: Config, args: argparse.Namespace, info: dict) -> list[dict]:
    """Every (case, mode, dtype, batch, provider): one row, timed or with the reason."""
    if config.device == "cuda":
        torch.backends.cudnn.benchmark = True
    groups = [(c, m, d) for c in _cases(config) for m in config.modes if m in c.modes
              for d in config.dtypes]
    rows = []
    total = sum(len(config.batches if c.level == "model" else config.op_batches)
                for c, *_ in groups) * len(config.providers)
    for case, mode, dtype in groups:
        prepared = {}
        for provider in config.providers:
            try:
                prepared[provider] = prepare(case, provider, dtype, mode, config.device)
            except Exception as e:  # noqa: BLE001 - a failing provider is a result, not a crash
                prepared[provider] = _failure(e)
        bandwidth, flops = peaks(args, info["device_name"], dtype)
        for batch in config.batches if case.level == "model" else config.op_batches:
            results = _time_batch(case, mode, dtype, batch, prepared, config)
            for provider in config.providers:
                row = dict(info, level=case.level, case=case.name, op=case.op,
                           model=case.model, resolution=config.resolution, mode=mode,
                           dtype=dtype, batch=batch, provider=provider,
                           command=config.command())
                result = results[provider]
                if isinstance(result, Timing):
                    row.update(status="ok", reason="", **_timed_fields(
                        case, mode, dtype, batch, result, bandwidth, flops))
                else:
                    row.update(status=result[0], reason=result[1])
                rows.append(row)
                shown = f"{row['ms']:.3f} ms" if row["status"] == "ok" else row["status"]
                _progress(f"[{len(rows)}/{total}] {case.level} {case.name} {mode} {dtype} "
                          f"b{batch} {provider}: {shown}")
            _free_memory(config.device)
        del prepared
        _free_memory(config.device)
    add_speedups(rows)
    return rows


def traffic_table(models: list[str], resolution: int, dtype: str, bandwidth: float,
                  flops: float) -> str:
    """Markdown: per-image activation bytes eager vs fused, launches, weights, FLOP, floors."""
    lines = [f"Eval forward at {resolution}x{resolution}, {dtype}; floors at "
             f"{bandwidth / 1e12:.2f} TB/s and {flops / 1e12:.0f} TFLOP/s "
             "(per image, weights excluded: a large batch).", "",
             "| model | eager MB/img | fused MB/img | eager/fused | launches eager | "
             "launches fused | weights MB | GFLOP/img | floor ms/img eager | fused | "
             "fused floor img/s |", "|" + "---|" * 11]
    for name in models:
        t = model_traffic(name, resolution, dtype)
        eager_ms, fused_ms = t.floor_ms(bandwidth, flops, False), t.floor_ms(bandwidth, flops)
        lines.append(
            f"| {name} | {t.eager_bytes / 1e6:.1f} | {t.fused_bytes / 1e6:.1f} | "
            f"{t.eager_bytes / t.fused_bytes:.2f} | {t.eager_launches} | {t.fused_launches} | "
            f"{t.weight_bytes / 1e6:.1f} | {t.flops / 1e9:.2f} | {eager_ms:.4f} | "
            f"{fused_ms:.4f} | {1e3 / fused_ms:,.0f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command."""
    if args.static:
        from .static import run_static
        return run_static(args)
    if args.traffic is not None:
        dtype = (args.dtypes or ("bf16",))[0]
        if dtype not in DTYPE_BYTES:
            raise SystemExit(f"error: unknown dtype {dtype}; known: {', '.join(DTYPE_BYTES)}")
        bandwidth = args.peak_gbps * 1e9 if args.peak_gbps else H200_PEAKS["bandwidth"]
        flops = args.peak_tflops * 1e12 if args.peak_tflops else H200_PEAKS["flops"][dtype]
        print(traffic_table(args.traffic or list(DEFAULT_MODELS), args.resolution or 224, dtype,
                            bandwidth, flops))
        return 0
    if args.ddp is not None:
        if tuple(args.modes or ("train",)) != ("train",):
            raise SystemExit("error: --ddp times training steps: use it with --mode train")
        from .ddp import run_ddp
        return run_ddp(args)
    config = make_config(args)
    if args.plot is not None:
        if (args.cpu_smoke or args.preset == "smoke") and args.csv is None:
            raise SystemExit("error: --plot draws from the CSV, which a smoke run writes only "
                             "with --csv")
        try:
            require_matplotlib()  # before the sweep, not after it
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # restored after: main() may run inside a process
    try:
        info = machine_info(config.device)
        if config.device == "cpu" and not (args.peak_gbps or args.peak_tflops):
            _progress("note: CPU run, no roofline floor (give --peak-gbps / --peak-tflops)")
        rows = run_cases(config, args, info)
    finally:
        torch.set_num_threads(threads)
    # A smoke run checks the harness; its numbers are no results: a CSV only when asked for.
    smoke = args.cpu_smoke or args.preset == "smoke"
    csv_path = args.csv or (None if smoke else
                            Path("benchmarks/results") / f"bench-{config.device}.csv")
    if csv_path is not None:
        append_csv(csv_path, rows)
    header = machine_header(info, config.command())
    table = markdown_table(rows)
    print(header + "\n\n" + table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(header + "\n\n" + table + "\n")
    _progress(f"rows appended to {csv_path}" if csv_path else "smoke run: no CSV written "
              "(give --csv to keep the rows)")
    if args.plot is not None:
        out_dir = csv_path.parent if args.plot is True else args.plot
        for path in plot(csv_path, out_dir):
            _progress(f"plot written to {path}")
    return 0 if any(r["status"] == "ok" for r in rows) or not rows else 1
