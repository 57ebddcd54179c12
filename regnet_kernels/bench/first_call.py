"""The first GPU call (benchmarks/gpu_first_call.sh): the evidence that matters in one device
call of at most 10 minutes, one subcommand per step:

    OUT=DIR python -m regnet_kernels.bench.first_call STEP [--cap SECONDS]

Steps, in the script's order:

    env      versions, GPU, clocks, CPU count, pytest plugins            -> env.txt
    build    the C++ extension's CUDA kernels for sm_90 only (the script
             runs it in the background)                                  -> env.txt
    warm     the Triton kernels of the steps below, compiled in parallel
             processes into Triton's cache                               -> log.txt
    parity   fused model (Triton, then CUDA) and eager, in bf16, against
             the fp32 reference: logits and every stage's output          -> parity.md
    eval     eval throughput: eager NCHW, eager channels_last, fused
             Triton, fused CUDA; CUDA-graph replays at batch 1           -> eval.md, results.csv
    static   (in the background of train and stage3) the static report of the model's eval:
             `python -m regnet_kernels bench --static` (its predictions, beside stage3's times)
    train    one training step: parity and time, Triton vs eager_cl      -> train.md, results.csv
    stage3   the grouped 3x3 conv of stage 3 alone, Triton vs CUDA vs
             cuDNN, beside the static report's prediction (or why none)  -> stage3.md
    compile  torch.compile (default mode) of the reference, if time is left -> eval.md, results.csv

Each step appends to its file under $OUT a line at a time (flushed), and one row to the summary
table ($OUT/00-summary.md): ok with its headline numbers, skipped (why) or FAILED (why). A
failing step prints its traceback to stderr (the script's log.txt) and exits 3, and the script
goes on with the next step; the script writes the row itself for a step it had to stop.

DRY_RUN=1: the same steps on the CPU, on a tiny model at 16x16, batches 1-2, fp32, the Triton
kernels in the interpreter (TRITON_INTERPRET=1 and REGNET_BENCH_INTERPRETER=1): the mechanics,
not the numbers; what needs a CUDA device says "skipped: no CUDA device".
FIRST_CALL_FAIL=STEP makes STEP raise once it has done its work (the check that a failure is
reported, the step's files stay and the next step runs).
FIRST_CALL_STATE=DIR: where the background steps (build, static) leave word and files for the
others (the script makes one); without it, the steps that need the CUDA kernels build or wait
for them themselves, and stage3 runs the static report itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

SUMMARY = "00-summary.md"
ENV = "env.txt"
PARITY = "parity.md"
EVAL = "eval.md"
TRAIN = "train.md"
STAGE3 = "stage3.md"
CSV = "results.csv"

EVAL_PROVIDERS = ("eager", "eager_cl", "triton", "cuda")
TRAIN_PROVIDERS = ("eager_cl", "triton")
STAGE3_PROVIDERS = ("eager", "eager_cl", "triton", "cuda")
# A fused result is flagged when its error passes twice eager's in the same dtype, or this floor.
ERROR_FLOOR = {"bf16": 1e-3, "fp16": 1e-3, "fp32": 1e-5}


class Skipped(Exception):
    """A step (or part of one) that cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the steps run: the real first call, or its dry run on the CPU."""

    dry: bool
    device: str
    model: object  # a zoo name, or RegNetParams for the dry run
    label: str
    resolution: int
    dtype: str
    ref_dtype: str
    eval_batches: tuple[int, ...]
    graph_batch: int
    train_batch: int
    stage: int
    static_batch: int
    workers: int


def dry_model():
    """The dry run's network: two stages of one Y block each, 8 and 16 channels."""
    from ..design import RegNetParams
    return RegNetParams(depth=2, w0=8, wa=8, wm=2.0, group_width=8, se_ratio=0.25,
                        stem_width=8)


def make_plan() -> Plan:
    if os.environ.get("DRY_RUN", "0") not in ("", "0"):
        model = dry_model()
        return Plan(True, "cpu", model, "tiny RegNetY (2 blocks, 8-16 channels)", 16, "fp32",
                    "fp32", (2, 1), 1, 2, min(3, len(model.stages())), 2, 2)
    return Plan(False, "cuda", "regnety_8gf", "regnety_8gf", 224, "bf16", "fp32", (256, 1), 1,
                64, 3, 256, max(1, min(16, (os.cpu_count() or 2) - 2)))


# ---------------------------------------------------------------------------
# Output: files under $OUT, a line at a time
# ---------------------------------------------------------------------------


def out_dir() -> Path:
    out = Path(os.environ.get("OUT") or "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def append(name: str, *lines: str) -> None:
    """Append lines to $OUT/name, flushed (a call stopped at its limit keeps them)."""
    with open(out_dir() / name, "a") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()


def say(message: str) -> None:
    """A progress line in the log (stdout)."""
    print(message, flush=True)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def summary_row(step: str, status: str, seconds: float, result: str = "") -> None:
    append(SUMMARY, f"| {step} | {_cell(status)} | {seconds:.0f} | {_cell(result)} |")


def _state(name: str) -> Path | None:
    state = os.environ.get("FIRST_CALL_STATE")
    return Path(state) / name if state else None


def seconds_left(deadline: float) -> float:
    return deadline - time.monotonic()


# ---------------------------------------------------------------------------
# Helpers over the bench harness
# ---------------------------------------------------------------------------


def _torch():
    import torch
    return torch


def bench_config(plan: Plan, level: str, mode: str, batches, providers):
    """(config, args) of the bench harness, as the CLI would build them."""
    from dataclasses import replace

    from ..__main__ import build_parser
    from . import cli

    argv = ["bench", "--device", plan.device, "--level", level, "--resolution",
            str(plan.resolution), "--batch", ",".join(map(str, batches)), "--op-batch",
            ",".join(map(str, batches)), "--dtype",
            plan.dtype, "--mode", mode, "--provider", ",".join(providers), "--min-run-time",
            "0.001" if plan.dry else "1"]
    args = build_parser().parse_args(argv)
    config = cli.make_config(args)
    return replace(config, models=(plan.model,), model=plan.model), args


def harness_rows(plan: Plan, mode: str, batches, providers, out_file: str,
                 title: str) -> list[dict]:
    """The bench harness's model-level rows (its progress lines go to the log as it runs): a
    markdown table in out_file, the rows appended to results.csv."""
    from . import cli, report
    from .machine import machine_info

    config, args = bench_config(plan, "model", mode, batches, providers)
    info = machine_info(plan.device)
    rows = cli.run_cases(config, args, info)
    for row in rows:
        row["model"] = row["case"] = plan.label if plan.dry else row["model"]
    report.append_csv(out_dir() / CSV, rows)
    append(out_file, f"### {title}", "", report.markdown_table(rows), "")
    return rows


def brief(rows: list[dict]) -> str:
    """One line per batch of rows: each provider's time, the fused ones' speedup."""
    from .providers import FUSED

    batches = {}
    for r in rows:
        text = f"{r['provider']} {r['status']}"
        if r["status"] == "ok":
            text = f"{r['provider']} {r['ms']:.3g} ms"
            if r["provider"] in FUSED and r.get("speedup"):
                text += f" ({r['speedup']:.2f}x)"
        batches.setdefault(r["batch"], []).append(text)
    return "; ".join(f"b{b}: " + ", ".join(parts) for b, parts in batches.items())


def cuda_kernels_ready(wait_s: float) -> str | None:
    """None when the CUDA kernels are built (or this process may build them: no build step
    state), else why not: the build step failed, or has not finished within wait_s."""
    done = _state("build.done")
    if done is None:
        return None
    deadline = time.monotonic() + max(0.0, wait_s)
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(1)
    if not done.exists():
        return f"the CUDA build had not finished after waiting {wait_s:.0f} s"
    word = done.read_text().strip()
    return None if word == "ok" else f"the CUDA build failed ({word})"


def providers_here(plan: Plan, providers, wait_s: float) -> tuple[tuple[str, ...], list[str]]:
    """The providers to run now, and notes on those left out (the CUDA kernels not built)."""
    if "cuda" not in providers or plan.device != "cuda":
        return tuple(providers), []
    reason = cuda_kernels_ready(wait_s)
    if reason is None:
        return tuple(providers), []
    return tuple(p for p in providers if p != "cuda"), [f"cuda: skipped ({reason})"]


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has NaN or inf."""
    torch = _torch()
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def verdict(err: float, yardstick: float, dtype: str) -> tuple[str, str]:
    """(ratio to the yardstick, ok / CHECK): CHECK past twice the yardstick and the floor."""
    ratio = f"{err / yardstick:.2f}" if yardstick > 0 else "-"
    return ratio, ("ok" if err <= max(2 * yardstick, ERROR_FLOOR[dtype]) else "CHECK")


def worst_text(worst: tuple[str, float], base: str) -> str:
    name, ratio = worst
    return f", worst {ratio:.2f}x {base}'s ({name})" if name else ""


def failure(e: BaseException) -> str:
    """An exception's type and first line."""
    return f"{type(e).__name__}: {e}".splitlines()[0]


def model_parts(model):
    """(name, module) of what the parity steps compare: the stem and each stage."""
    return [("stem", model.stem)] + [(f"s{i + 1}", stage)
                                     for i, stage in enumerate(model.trunk_output)]


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def _command(argv: list[str], timeout: float = 30) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{argv[0]}: {e}"
    return (p.stdout + p.stderr).strip()


def step_env(plan: Plan, deadline: float) -> str:
    import importlib.metadata
    import platform

    torch = _torch()
    from .machine import machine_info

    append(ENV, f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
                f"{' (dry run)' if plan.dry else ''}")
    append(ENV, f"python {platform.python_version()} ({sys.executable}), "
                f"{os.cpu_count()} CPUs, {platform.platform()}")
    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    append(ENV, *(f"{k}: {v}" for k, v in info.items()))
    query = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
             "power.draw,power.limit,temperature.gpu,pstate")
    append(ENV, "", "$ nvidia-smi --query-gpu=...",
           _command(["nvidia-smi", f"--query-gpu={query}", "--format=csv"]))
    append(ENV, "", "$ nvcc --version", _command(["nvcc", "--version"]))
    plugins = []
    for dist in ("pytest", "pytest-xdist", "pytest-timeout", "triton", "numpy"):
        try:
            plugins.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            plugins.append(f"{dist} missing")
    append(ENV, "", "packages: " + ", ".join(plugins), "")
    gpu = info["device_name"] if torch.cuda.is_available() else "no CUDA device"
    return (f"{gpu}; torch {info['torch']}, triton {info['triton'] or '-'}, CUDA "
            f"{info['cuda'] or '-'}, cuDNN {info['cudnn'] or '-'}; clocks {info['clocks'] or '-'}")


def step_build(plan: Plan, deadline: float) -> str:
    done = _state("build.done")
    try:
        torch = _torch()
        if not torch.cuda.is_available():
            raise Skipped("no CUDA device")
        from ..backends.cpp import build
        from ..ops.dispatch import environment_report

        start = time.monotonic()
        build.load_cuda()
        seconds = time.monotonic() - start
        append(ENV, "$ python -m regnet_kernels env", environment_report(), "")
        word = "ok"
        return f"CUDA kernels (sm_90 only) built and loaded in {seconds:.0f} s"
    except BaseException as e:
        word = failure(e)[:300]
        raise
    finally:
        if done is not None:
            done.write_text(word + "\n")


# --- warm: the Triton kernels compiled in parallel processes ------------------


def warm_jobs(plan: Plan) -> list[tuple[str, int, str]]:
    """(mode, batch, part) for every piece whose kernels a later step launches: the stem and
    each distinct block of the model per eval batch and for the training step, and the stage-3
    grouped convs alone. Training first: its pieces compile the most kernels. The dry run
    (nothing to compile in the interpreter: the mechanics) takes the last block alone."""
    from .shapes import block_shapes

    parts = ["stem"] + [s.name for s in block_shapes(plan.model, plan.resolution)]
    if plan.dry:
        parts = parts[-1:]
    jobs = [("train", plan.train_batch, p) for p in parts]
    jobs += [("eval", b, p) for b in plan.eval_batches for p in parts]
    jobs += [("op", plan.static_batch, name) for name in stage3_cases(plan)]
    return jobs


def stage3_cases(plan: Plan) -> tuple[str, ...]:
    from .shapes import block_shapes

    prefix = f"s{plan.stage}."
    return tuple(f"{s.name}.b" for s in block_shapes(plan.model, plan.resolution)
                 if s.name.startswith(prefix))


def _part_and_input(plan: Plan, model, part: str, batch: int, dtype):
    """The model's module for a warm job's part, and a random input of its shape."""
    torch = _torch()
    from .shapes import block_shapes

    if part == "stem":
        module, channels, size = model.stem, 3, plan.resolution
    else:
        shape = next(s for s in block_shapes(plan.model, plan.resolution) if s.name == part)
        stage = model.trunk_output[shape.spec.stage_index]
        module = stage[0 if shape.kind == "first" else 1]
        channels, size = shape.spec.w_in, shape.size
    x = torch.randn(batch, channels, size, size, device=plan.device, dtype=dtype)
    return module, x.contiguous(memory_format=torch.channels_last)


def warm_one(plan: Plan, job: tuple[str, int, str]) -> tuple[str, float, str | None]:
    """Run one piece through the Triton kernels once (a worker process's job)."""
    start = time.monotonic()
    mode, batch, part = job
    label = f"{mode} b{batch} {part}"
    try:
        torch = _torch()
        from .cases import model_case, op_cases
        from .providers import DTYPES, make_step, prepare

        if mode == "op":
            case = next(c for c in op_cases(plan.model, plan.resolution) if c.name == part)
            prepared = prepare(case, "triton", plan.dtype, "eval", plan.device)
            with torch.no_grad():
                make_step(prepared, case, batch, plan.dtype, "eval", plan.device)()
        else:
            case = model_case(plan.model, plan.resolution)
            prepared = prepare(case, "triton", plan.dtype, mode, plan.device)
            module, x = _part_and_input(plan, prepared.module, part, batch, DTYPES[plan.dtype])
            if mode == "eval":
                with torch.no_grad():
                    module(x)
            else:
                x.requires_grad_(part != "stem")  # as in the model: the image needs no grad
                out = module(x)
                out.backward(torch.randn_like(out))
        if plan.device == "cuda":
            torch.cuda.synchronize()
        return label, time.monotonic() - start, None
    except Exception as e:  # noqa: BLE001 - a failed job is reported, the others go on
        return label, time.monotonic() - start, failure(e)


def step_warm(plan: Plan, deadline: float) -> str:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .providers import unavailable_reason

    reason = unavailable_reason("triton", plan.device)
    if reason:
        raise Skipped(reason)
    jobs = warm_jobs(plan)
    workers = min(plan.workers, len(jobs))
    say(f"warm: {len(jobs)} jobs in {workers} processes")
    failed, longest = [], ("", 0.0)
    start = time.monotonic()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(warm_one, plan, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                label, seconds, error = future.result()
            except Exception as e:  # noqa: BLE001 - a worker that died (a crash in a kernel)
                label, seconds, error = " ".join(map(str, futures[future])), 0.0, failure(e)
            say(f"warm: {label}: {seconds:.1f} s" + (f" FAILED {error}" if error else ""))
            if error:
                failed.append(f"{label} ({error})")
            longest = max(longest, (label, seconds), key=lambda t: t[1])
    result = (f"{len(jobs) - len(failed)}/{len(jobs)} pieces in {time.monotonic() - start:.0f} s "
              f"on {workers} processes (longest: {longest[0]}, {longest[1]:.0f} s)")
    if failed:
        raise RuntimeError(f"{result}; failed: {'; '.join(failed)}")
    return result


# --- parity ------------------------------------------------------------------


def eval_outputs(plan: Plan, case, provider: str, dtype: str, batch: int) -> dict:
    """{stem, s1.., logits: float32 output} of one eval forward of a provider's model."""
    torch = _torch()
    from .providers import make_step, prepare

    prepared = prepare(case, provider, dtype, "eval", plan.device)
    outputs = {}

    def keep(name):
        return lambda module, inputs, out: outputs.__setitem__(name, out.detach().float())

    hooks = [m.register_forward_hook(keep(name)) for name, m in model_parts(prepared.module)]
    try:
        with torch.no_grad():
            step = make_step(prepared, case, batch, dtype, "eval", plan.device)
            outputs["logits"] = step().float()
    finally:
        for h in hooks:
            h.remove()
    return outputs


def error_table(title: str, names, errors: dict, base: str, tested: str, dtype: str) -> tuple:
    """Markdown lines comparing ``tested``'s errors with ``base``'s (the yardstick); returns
    (lines, worst ratio name, worst ratio, CHECK count)."""
    lines = [f"### {title}", "", f"| output | {base} vs reference | {tested} vs reference | "
             f"{tested} / {base} | verdict |", "|---|---|---|---|---|"]
    worst, checks = ("", 0.0), 0
    for name in names:
        e_base, e_test = errors[base][name], errors[tested][name]
        ratio, word = verdict(e_test, e_base, dtype)
        checks += word != "ok"
        if e_base > 0:
            worst = max(worst, (name, e_test / e_base), key=lambda t: t[1])
        lines.append(f"| {name} | {e_base:.3g} | {e_test:.3g} | {ratio} | {word} |")
    return lines + [""], worst, checks


def step_parity(plan: Plan, deadline: float) -> str:
    torch = _torch()
    from .cases import model_case
    from .providers import Unavailable

    if plan.device == "cuda":  # an fp32 reference in fp32, not TF32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    case = model_case(plan.model, plan.resolution)
    append(PARITY, f"## Eval parity: {plan.label} at {plan.resolution}x{plan.resolution}, fused "
                   f"and eager {plan.dtype} against the eager {plan.ref_dtype} reference",
           "", "Relative error ||out - ref|| / ||ref|| of each stage's output and the logits; "
               f"eager {plan.dtype}'s own error is the yardstick (verdict CHECK past twice it "
               f"and {ERROR_FLOOR[plan.dtype]:g}).", "")
    references, errors, headline, failed = {}, {}, [], []
    for batch in plan.eval_batches:
        references[batch] = eval_outputs(plan, case, "eager", plan.ref_dtype, batch)
        eager = eval_outputs(plan, case, "eager", plan.dtype, batch)
        errors[batch] = {"eager": {k: rel_err(v, references[batch][k]) for k, v in eager.items()}}
        del eager
    for provider in ("triton", "cuda"):
        if provider == "cuda" and plan.device == "cuda":
            reason = cuda_kernels_ready(seconds_left(deadline) - 30)
            if reason:
                append(PARITY, f"{provider}: skipped ({reason})", "")
                headline.append(f"{provider} skipped ({reason})")
                continue
        for batch in plan.eval_batches:
            try:
                outputs = eval_outputs(plan, case, provider, plan.dtype, batch)
            except Unavailable as e:
                append(PARITY, f"{provider}: unavailable ({e})", "")
                headline.append(f"{provider} unavailable ({e})")
                break
            except Exception as e:  # noqa: BLE001 - the other provider still runs
                traceback.print_exc()
                append(PARITY, f"{provider}, batch {batch}: FAILED ({failure(e)})", "")
                failed.append(f"{provider} b{batch}: {failure(e)}")
                continue
            ref = references[batch]
            errors[batch][provider] = {k: rel_err(v, ref[k]) for k, v in outputs.items()}
            del outputs
            lines, worst, checks = error_table(
                f"{provider} {plan.dtype}, batch {batch}", list(ref), errors[batch], "eager",
                provider, plan.dtype)
            append(PARITY, *lines)
            logits = errors[batch][provider]["logits"]
            headline.append(f"{provider} b{batch}: logits {logits:.2g} (eager "
                            f"{errors[batch]['eager']['logits']:.2g})" + worst_text(worst, "eager")
                            + (f", {checks} CHECK" if checks else ""))
    if failed:
        raise RuntimeError("; ".join(failed + headline))
    return "; ".join(headline)


# --- eval throughput ---------------------------------------------------------


def graph_replays(plan: Plan, batch: int, providers) -> tuple[list[str], list[str]]:
    """Each provider's eval forward captured in a CUDA graph, its replay timed: (markdown
    lines, headline parts)."""
    torch = _torch()
    from .cases import model_case
    from .providers import make_step, prepare
    from .timing import time_cuda

    case = model_case(plan.model, plan.resolution)
    lines, parts = ["| provider | graph replay ms | img/s |", "|---|---|---|"], []
    for provider in providers:
        try:
            prepared = prepare(case, provider, plan.dtype, "eval", plan.device)
            step = make_step(prepared, case, batch, plan.dtype, "eval", plan.device)
            with torch.no_grad():
                side = torch.cuda.Stream()  # warm-up (compiles, cuDNN autotuning, BN folding)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                    step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
            t = time_cuda(graph.replay)
            lines.append(f"| {provider} | {t.median_ms:.3f} | {batch / t.median_ms * 1e3:,.0f} |")
            parts.append(f"{provider} {t.median_ms:.3g} ms")
        except Exception as e:  # noqa: BLE001 - one provider's failure is a result
            lines.append(f"| {provider} | error: {_cell(failure(e))} | |")
            parts.append(f"{provider} error")
    return lines + [""], parts


def step_eval(plan: Plan, deadline: float) -> str:
    append(EVAL, f"## Eval throughput: {plan.label}, {plan.dtype}, "
                 f"{plan.resolution}x{plan.resolution}", "")
    providers, notes = providers_here(plan, EVAL_PROVIDERS, seconds_left(deadline) / 3)
    rows = harness_rows(plan, "eval", plan.eval_batches, providers, EVAL,
                        "batch " + " and ".join(map(str, plan.eval_batches)))
    append(EVAL, *notes, "")
    headline = [brief(rows), *notes]
    batch = plan.graph_batch
    if plan.device != "cuda":
        append(EVAL, f"### CUDA-graph replay, batch {batch}", "", "skipped: no CUDA device", "")
        headline.append("graphs: skipped (no CUDA device)")
    else:
        providers, notes = providers_here(plan, EVAL_PROVIDERS, 0)
        lines, parts = graph_replays(plan, batch, providers)
        append(EVAL, f"### CUDA-graph replay, batch {batch}", "", *lines, *notes)
        headline.append(f"graph b{batch}: " + ", ".join(parts))
    return "; ".join(headline)


def step_compile(plan: Plan, deadline: float) -> str:
    if plan.dry:
        raise Skipped("dry run: compiling even the tiny model takes minutes on 2 CPU cores")
    headline = []
    for batch in plan.eval_batches:
        rows = harness_rows(plan, "eval", (batch,), ("eager_cl", "compile"), EVAL,
                            f"torch.compile (default mode), batch {batch}")
        headline.append(brief(rows))
    return "; ".join(headline)


# --- training step -----------------------------------------------------------


def train_results(plan: Plan, case, provider: str, dtype: str, batch: int) -> dict:
    """One training step's logits and the gradients of each part's parameters (float64)."""
    torch = _torch()
    from .providers import DTYPES, prepare

    prepared = prepare(case, provider, dtype, "train", plan.device)
    x = case.make_inputs(batch, DTYPES[dtype], prepared.fused_inputs)[0].to(plan.device)
    if prepared.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = prepared.fn(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad.to(plan.device, out.dtype))
    model = prepared.module
    results = {"logits": out.detach().float()}
    for name, part in model_parts(model) + [("fc", model.fc)]:
        results[f"{name} grads"] = torch.cat([p.grad.detach().double().flatten()
                                              for p in part.parameters() if p.grad is not None])
    return results


def step_train(plan: Plan, deadline: float) -> str:
    torch = _torch()
    from .cases import model_case

    if plan.device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    batch = plan.train_batch
    case = model_case(plan.model, plan.resolution)
    append(TRAIN, f"## Training step: {plan.label}, batch {batch}, {plan.dtype}", "",
           f"Parity: one step (forward, backward of a fixed random output gradient) against "
           f"eager {plan.ref_dtype}; eager_cl {plan.dtype}'s error is the yardstick.", "")
    reference = train_results(plan, case, "eager", plan.ref_dtype, batch)
    base, tested = TRAIN_PROVIDERS
    try:
        errors = {}
        for provider in TRAIN_PROVIDERS:
            results = train_results(plan, case, provider, plan.dtype, batch)
            errors[provider] = {k: rel_err(v, reference[k]) for k, v in results.items()}
            del results
        lines, worst, checks = error_table(f"parity, batch {batch}", list(reference), errors,
                                           base, tested, plan.dtype)
        append(TRAIN, *lines)
        parity = (f"logits err {errors[tested]['logits']:.2g} ({base} "
                  f"{errors[base]['logits']:.2g})" + worst_text(worst, base)
                  + (f", {checks} CHECK" if checks else ""))
    except Exception as e:  # noqa: BLE001 - the timing still runs; the step fails after it
        traceback.print_exc()
        append(TRAIN, f"parity: FAILED ({failure(e)})", "")
        parity = None
    rows = harness_rows(plan, "train", (batch,), TRAIN_PROVIDERS, TRAIN, f"time, batch {batch}")
    if parity is None:
        raise RuntimeError(f"parity failed (train.md, log.txt); step {brief(rows)}")
    return f"{parity}; step {brief(rows)}"


# --- stage 3's grouped conv, measured and predicted ---------------------------


def static_command(plan: Plan) -> list[str]:
    """The static report of the model's eval launches (`bench --static`); run_static adds
    --markdown and --csv."""
    return [sys.executable, "-m", "regnet_kernels", "bench", "--static", str(plan.model),
            "--batch", str(plan.static_batch), "--dtype", plan.dtype, "--mode", "eval"]


def predictions(rows: list[dict], cases) -> dict:
    """{case: {"triton": (column, value)}} from the static report's CSV rows: for "sN.first.b"
    the eval row of block sN.b1 whose weight is 3x3, for "sN.rest.b" that of sN.b2 (the
    report groups identical launches: "sN.b2..sN.b10 (9)"). The report predicts the Triton
    kernels only."""
    found = {}
    for case in cases:
        stage, kind, _ = case.split(".")
        block = f"{stage}.b1" if kind == "first" else f"{stage}.b2"
        for row in rows:
            names = row.get("layers", "")
            if (row.get("mode") == "eval" and (names == block or names.startswith(block + ".."))
                    and "x3x3 " in row.get("shape", "") + " " and row.get("predicted_us")):
                found[case] = {"triton": ("predicted us", f"{float(row['predicted_us']):.0f}")}
                break
    return found


def run_static(plan: Plan, folder: Path, timeout: float, argv: list[str] | None = None) -> dict:
    """Run the static report (argv: static_command's, or a stand-in), its markdown, CSV and
    stdout into folder (static.md, static.csv, static.out), and read stage 3's predictions;
    raises Skipped with the reason when there are none: no --static option yet, a timeout, no
    matching row."""
    if argv is None:
        if plan.dry:
            raise Skipped("dry run: the static report is for the real model")
        argv = static_command(plan)
    if timeout < 5:
        raise Skipped("no time left for the static report")
    try:
        p = subprocess.run(argv + ["--markdown", str(folder / "static.md"), "--csv",
                                   str(folder / "static.csv")],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Skipped(f"the static report took over {timeout:.0f} s") from None
    (folder / "static.out").write_text(p.stdout)
    if p.returncode != 0:
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        raise Skipped(f"`bench --static` exit {p.returncode}: "
                      f"{lines[-1] if lines else 'no message'}")
    return read_predictions(plan, folder)


def read_predictions(plan: Plan, folder: Path) -> dict:
    """Stage 3's predictions from what run_static left in folder (raises Skipped if none)."""
    import csv

    rows = []
    if (folder / "static.csv").exists():
        with open(folder / "static.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    layers = stage3_cases(plan)
    found = predictions(rows, layers)
    if not found:
        raise Skipped(f"no row for {', '.join(layers)} in the static report")
    return found


def static_predictions(plan: Plan, timeout: float, argv: list[str] | None = None) -> dict:
    """run_static into a temporary folder: stage 3's predictions, or Skipped with the reason."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return run_static(plan, Path(tmp), timeout, argv)


def step_static(plan: Plan, deadline: float) -> str:
    """The static report, in the background of the train and stage3 steps (it compiles: kept
    away from the eval step's launch-bound batch-1 timings); stage3 reads it."""
    done = _state("static.done")
    if done is None:
        raise Skipped("no FIRST_CALL_STATE: the stage3 step runs the static report itself")
    word = "ok"
    try:
        found = run_static(plan, done.parent, seconds_left(deadline) - 5)
        return "stage 3 predictions: " + "; ".join(
            f"{layer} {p}: {value}" for layer, columns in found.items()
            for p, (_, value) in columns.items())
    except BaseException as e:
        word = str(e) if isinstance(e, Skipped) else failure(e)
        raise
    finally:
        done.write_text(word + "\n")


def stage3_predictions(plan: Plan, deadline: float) -> tuple[dict, str, str]:
    """(predictions, reason there are none, the static report's markdown): from the static
    step (waiting for it while this step has time), else the report run now."""
    done = _state("static.done")
    if done is None:
        try:
            return static_predictions(plan, seconds_left(deadline) - 5), "", ""
        except Skipped as e:
            return {}, str(e), ""
    while not done.exists() and seconds_left(deadline) > 5:
        time.sleep(1)
    word = done.read_text().strip() if done.exists() else \
        "the static report had not finished when this step had to end"
    if word != "ok":
        return {}, word, ""
    md = done.parent / "static.md"
    return read_predictions(plan, done.parent), "", md.read_text() if md.exists() else ""


def _range_ratio(measured_us: float, text: str) -> str:
    """measured / predicted, against a range's ends ("1338-2175") or a single value."""
    try:
        ends = [float(v) for v in text.replace(",", "").replace("us", "").split("-") if v.strip()]
    except ValueError:
        return ""
    if not ends:
        return ""
    if len(ends) == 1:
        return f"{measured_us / ends[0]:.2f}x"
    low, high = min(ends), max(ends)
    where = "inside" if low <= measured_us <= high else (
        f"{measured_us / high:.2f}x above" if measured_us > high else
        f"{low / measured_us:.2f}x below")
    return where


def step_stage3(plan: Plan, deadline: float) -> str:
    torch = _torch()
    from . import cli
    from .cases import op_cases
    from .providers import prepare

    names = stage3_cases(plan)
    if not names:
        raise Skipped(f"{plan.label} has no stage {plan.stage}")
    if plan.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the harness times cuDNN
    batch = plan.static_batch
    providers, notes = providers_here(plan, STAGE3_PROVIDERS, seconds_left(deadline) / 4)
    config, _ = bench_config(plan, "op", "eval", (batch,), providers)
    cases = [c for c in op_cases(plan.model, plan.resolution) if c.name in names]
    measured = {}
    for case in cases:  # the harness's timing loop, for these cases alone
        prepared = {}
        for provider in providers:
            try:
                prepared[provider] = prepare(case, provider, plan.dtype, "eval", plan.device)
            except Exception as e:  # noqa: BLE001 - a provider that cannot run is a result
                prepared[provider] = cli._failure(e)
        measured[case.name] = cli._time_batch(case, "eval", plan.dtype, batch, prepared, config)
        for provider in providers:
            result = measured[case.name][provider]
            shown = f"{result.median_ms:.4f} ms" if hasattr(result, "median_ms") else result[0]
            say(f"stage3: {case.name} b{batch} {provider}: {shown}")
    found, reason, static_md = stage3_predictions(plan, deadline)
    library = "cuDNN" if plan.device == "cuda" else "ATen / oneDNN on the CPU"
    append(STAGE3, f"## Stage {plan.stage} grouped 3x3 conv alone: {plan.label}, batch {batch}, "
                   f"{plan.dtype}", "", f"eager / eager_cl: {library} (NCHW / channels_last). "
                   "Predicted: the static report (`python -m regnet_kernels bench --static`) "
                   "for the same kernels" + (f"; prediction: unavailable ({reason})" if reason
                                             else "") + ".", "",
           "| case | provider | ms | us | TFLOP/s | GB/s | predicted | measured vs predicted |",
           "|---|---|---|---|---|---|---|---|")
    headline = []
    for case in cases:
        cost = case.cost(batch, plan.dtype)
        for provider in providers:
            result = measured[case.name][provider]
            if not hasattr(result, "median_ms"):
                append(STAGE3, f"| {case.name} | {provider} | {result[0]}: {_cell(result[1])} "
                               "| | | | | |")
                continue
            s = result.median_ms / 1e3
            column, value = found.get(case.name, {}).get(provider, ("", ""))
            append(STAGE3, f"| {case.name} | {provider} | {result.median_ms:.4f} | {s * 1e6:.1f} "
                           f"| {cost.flops / s / 1e12:.2f} | {cost.bytes / s / 1e9:.0f} | "
                           f"{_cell(f'{value} ({column})') if value else ''} | "
                           f"{_range_ratio(s * 1e6, value) if value else ''} |")
            headline.append(f"{case.name} {provider} {s * 1e6:.0f} us"
                            + (f" (predicted {value})" if value else ""))
    append(STAGE3, "", *notes)
    if static_md:
        append(STAGE3, "## The static report (prediction, not measurement)", "", static_md)
    if reason:
        headline.append(f"prediction: unavailable ({reason})")
    return "; ".join(headline)


STEPS = {"env": step_env, "build": step_build, "warm": step_warm, "parity": step_parity,
         "eval": step_eval, "static": step_static, "train": step_train, "stage3": step_stage3,
         "compile": step_compile}


def run_step(name: str, cap: float) -> int:
    """Run one step; its summary row either way. 0: ok or skipped, 3: failed."""
    start = time.monotonic()
    deadline = start + cap
    say(f"first_call {name}: start (cap {cap:.0f} s)")
    try:
        result = STEPS[name](make_plan(), deadline)
        if os.environ.get("FIRST_CALL_FAIL") == name:  # after its work: its files stay
            raise RuntimeError(f"injected failure (FIRST_CALL_FAIL={name}) after: {result}")
        status, code = "ok", 0
    except Skipped as e:
        status, result, code = f"skipped ({e})", "", 0
    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported, and the script goes on
        traceback.print_exc()
        message = str(e).splitlines()[0] if str(e) else ""
        status, result, code = f"FAILED ({type(e).__name__}: {message[:300]})", "", 3
    seconds = time.monotonic() - start
    summary_row(name, status, seconds, result)
    say(f"first_call {name}: {status} in {seconds:.0f} s" + (f": {result}" if result else ""))
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regnet_kernels.bench.first_call",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=tuple(STEPS))
    parser.add_argument("--cap", type=float, default=600.0,
                        help="seconds this step may take (the script's timeout for it)")
    args = parser.parse_args(argv)
    return run_step(args.step, args.cap)


if __name__ == "__main__":
    sys.exit(main())
