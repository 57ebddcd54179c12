"""``bench --mode train --ddp N``: one DistributedDataParallel training step (forward,
cross entropy, backward with the gradient all-reduce), the fused model against the
eager reference (channels_last), on N ranks of this machine: one GPU per rank with NCCL
when there are N GPUs, else N CPU processes with gloo (the cores split between them).

The parent starts the ranks (this module, run as a script) and prints the table; each
rank times its steps between barriers, and a step's time is the slowest rank's.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .providers import DTYPES

PROVIDERS = ("eager_cl", "fused")


def _plan(args) -> dict:
    """What every rank runs, from the bench options (first model, batch and dtype)."""
    device = "cpu" if args.device == "cpu" else (
        "cuda" if torch.cuda.device_count() >= args.ddp else "cpu")
    if args.device == "cuda" and device != "cuda":
        raise SystemExit(f"error: --ddp {args.ddp} --device cuda needs {args.ddp} CUDA devices, "
                         f"torch sees {torch.cuda.device_count()}")
    model = args.models or ((args.model,) if args.model else ("regnety_400mf",))
    dtype = (args.dtypes or ("fp32" if device == "cpu" else "bf16",))[0]
    if dtype not in DTYPES:
        raise SystemExit(f"error: unknown dtype {dtype}; known: {', '.join(DTYPES)}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.ddp)
    return {"device": device, "model": model[0], "batch": (args.batches or (32,))[0],
            "resolution": args.resolution or 224, "dtype": dtype, "steps": args.ddp_steps,
            "threads": threads, "world": args.ddp}


def run_ddp(args) -> int:
    """Start the ranks, print the table (and write --markdown)."""
    if args.ddp < 1:
        raise SystemExit("error: --ddp needs a number of ranks >= 1")
    plan = _plan(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                    WORLD_SIZE=str(plan["world"]), OMP_NUM_THREADS=str(plan["threads"]))
        procs = [subprocess.Popen([sys.executable, "-m", "regnet_kernels.bench.ddp",
                                   json.dumps(plan), str(result)],
                                  env=dict(base, RANK=str(r), LOCAL_RANK=str(r)))
                 for r in range(plan["world"])]
        codes = [p.wait() for p in procs]
        if any(codes):
            print(f"error: a rank failed (exit codes {codes})", file=sys.stderr)
            return 1
        rows = json.loads(result.read_text())
    table = ddp_table(plan, rows)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    return 0


def ddp_table(plan: dict, rows: list[dict]) -> str:
    global_batch = plan["batch"] * plan["world"]
    lines = [f"DDP training step: {plan['model']}, {plan['world']} rank(s) on {plan['device']} "
             f"({'NCCL' if plan['device'] == 'cuda' else 'gloo'}), batch {plan['batch']} per "
             f"rank at {plan['resolution']} px, {plan['dtype']}, {plan['steps']} timed steps",
             "", "| provider | ms/step | images/s | vs eager_cl |", "|---|---|---|---|"]
    eager = next((r["ms"] for r in rows if r["provider"] == "eager_cl"), None)
    for r in rows:
        speedup = f"{eager / r['ms']:.2f}x" if eager else "-"
        lines.append(f"| {r['provider']} | {r['ms']:.2f} | {global_batch * 1e3 / r['ms']:,.1f} | "
                     f"{speedup} |")
    return "\n".join(lines)


def _rank(plan: dict, result_path: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..models import reference_model
    from ..models.fused import fused_model

    rank = int(os.environ["RANK"])
    torch.set_num_threads(plan["threads"])
    if plan["device"] == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cudnn.benchmark = True
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = DTYPES[plan["dtype"]]
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(plan["batch"], 3, plan["resolution"], plan["resolution"], generator=gen)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (plan["batch"],), generator=gen).to(device)
    rows = []
    for provider in PROVIDERS:
        torch.manual_seed(0)
        build = fused_model if provider == "fused" else reference_model
        model = build(plan["model"]).to(device).to(memory_format=torch.channels_last).train()
        ddp = DDP(model, device_ids=[rank] if device.type == "cuda" else None)

        def step():
            ddp.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = F.cross_entropy(ddp(x).float(), y)
            loss.backward()

        for _ in range(2):  # warm-up: allocations, oneDNN primitives, kernel compilation
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(plan["steps"]):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank's does
        rows.append({"provider": provider, "ms": float(elapsed) * 1e3 / plan["steps"]})
        del ddp, model
    if rank == 0:
        Path(result_path).write_text(json.dumps(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank(json.loads(sys.argv[1]), sys.argv[2])
