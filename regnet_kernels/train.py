"""``python -m regnet_kernels train``: train a RegNet, alone or under ``torchrun``.

The pycls recipe: SGD with momentum 0.9 and Nesterov, a linear warmup from
warmup_factor x lr, then a cosine schedule to 0 (both per step), cross entropy with label
smoothing, weight decay on every parameter but the BatchNorms'. lr defaults to pycls's
0.1 per 128 images of global batch. Under torchrun each process is one rank of a
DistributedDataParallel run (gloo on CPU, NCCL on GPUs), with --sync-bn for batch
statistics over all ranks (inside the fused ops, or nn.SyncBatchNorm for the reference
model on GPUs).

A checkpoint (model, optimizer, AMP scaler, epoch, the run's settings) is written
atomically at the end of every epoch; --resume continues from it bit-exactly: the batches
of an epoch depend only on (seed, epoch), and nothing else in the step is random.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data as datasets
from .design import params_from_dict
from .models import reference_model
from .models.fused import fused_model
from .zoo import resolve_params, zoo_entry

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT = "checkpoint.pt"


class TrainError(RuntimeError):
    """A run that cannot start or continue, with the reason."""


def add_arguments(parser: argparse.ArgumentParser, choose_model: bool = True) -> None:
    """The run's options; without --model/--params, --out and --resume when
    ``choose_model`` is False (the design-space runner gives each run its model and its
    folder, and always resumes)."""
    if choose_model:
        _add_model_arguments(parser)
    _add_recipe_arguments(parser)
    if choose_model:
        _add_output_arguments(parser)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="a model name, e.g. regnety_400mf")
    model.add_argument("--params", help="RegNetParams (or AnyNetParams) as JSON, e.g. "
                       "'{\"depth\": 4, \"w0\": 24, \"wa\": 24, \"wm\": 2, \"group_width\": 8}'")


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--fused", dest="fused", action="store_true", default=True,
                      help="the fused model (default)")
    kind.add_argument("--reference", dest="fused", action="store_false",
                      help="the plain PyTorch model")
    parser.add_argument("--backend", default="auto", help="fused backend: auto, triton, cpu, cuda")
    parser.add_argument("--data", required=True,
                        help="an ImageFolder-layout directory (DIR/train/<class>/*, optional "
                             "DIR/val/<class>/*; or DIR/<class>/* directly), or 'synthetic'")
    parser.add_argument("--synthetic-images", type=int, default=512,
                        help="images in the synthetic set (default 512)")
    parser.add_argument("--num-classes", type=int, default=10,
                        help="classes of the synthetic set (default 10)")
    parser.add_argument("--resolution", type=int, default=224, help="image size (default 224)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank and step")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default 0.1 x global batch / 128)")
    parser.add_argument("--weight-decay", type=float, default=5e-5)
    parser.add_argument("--warmup-epochs", type=float, default=5.0)
    parser.add_argument("--warmup-factor", type=float, default=0.1)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                        help="autocast dtype (fp16 with a gradient scaler)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--sync-bn", action="store_true",
                        help="BatchNorm statistics over all ranks")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if present")
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default: torch's; torchrun sets 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20, help="steps between progress lines")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/train", help="checkpoint and metrics folder")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue from OUT/{CHECKPOINT} if it exists")


# ---------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------


def model_spec(args) -> dict:
    """What identifies the network a checkpoint belongs to."""
    if args.model:
        entry = zoo_entry(args.model)
        return {"name": entry.name, "params": asdict(entry.params)}
    try:
        params = params_from_dict(json.loads(args.params))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise TrainError(f"train: --params must be a JSON object of RegNetParams (or "
                         f"AnyNetParams) fields: {error}")
    return {"name": "custom", "params": asdict(params)}


def build_model(spec: dict, num_classes: int, args) -> torch.nn.Module:
    params = resolve_params(params_from_dict(spec["params"]))
    if args.fused:
        return fused_model(params, backend=args.backend, num_classes=num_classes,
                           sync_bn=args.sync_bn)
    return reference_model(params, num_classes=num_classes)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on everything but the BatchNorms' weights and biases (pycls)."""
    norm_params = {id(p) for m in model.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters(recurse=False)}
    decay = [p for p in model.parameters() if id(p) not in norm_params]
    no_decay = [p for p in model.parameters() if id(p) in norm_params]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, steps_per_epoch: int, args) -> float:
    """Cosine from lr to 0 over the run, times a linear warmup factor (from
    warmup_factor to 1) during the first warmup_epochs; fractional epochs."""
    epoch = step / steps_per_epoch
    lr = 0.5 * args.lr * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if epoch < args.warmup_epochs:
        alpha = epoch / args.warmup_epochs
        lr *= args.warmup_factor * (1.0 - alpha) + alpha
    return lr


def datasets_for(args):
    """(train set, val set or None)."""
    if args.data == "synthetic":
        return datasets.SyntheticDataset(args.synthetic_images, args.num_classes,
                                         args.resolution, args.seed), None
    root = Path(args.data)
    train_root = root / "train" if (root / "train").is_dir() else root
    train = datasets.FolderDataset(train_root, args.resolution, train=True, seed=args.seed)
    val = None
    if (root / "val").is_dir() and train_root != root:
        val = datasets.FolderDataset(root / "val", args.resolution, train=False, seed=args.seed)
        if val.classes != train.classes:
            raise datasets.DataError(f"data: {root}/val's classes differ from {train_root}'s")
    return train, val


def save_checkpoint(path: Path, payload: dict) -> None:
    """Written to a temporary file, then renamed: a killed run leaves the old or the new
    checkpoint, never half of one."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _all_sum(values: list[float], device) -> list[float]:
    """Sums over ranks of a few numbers (the values themselves when not distributed)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (TrainError, datasets.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _setup_device(args):
    """(device, rank, world): torchrun's environment makes this process one rank."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise TrainError("train: --device cuda, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def _run(args) -> int:
    device, rank, world = _setup_device(args)
    if args.sync_bn and not args.fused and device.type != "cuda":
        raise TrainError("train: --sync-bn with --reference needs CUDA devices (torch's "
                         "SyncBatchNorm); the fused model synchronizes BN on the CPU too")
    main = rank == 0
    spec = model_spec(args)
    train_set, val_set = datasets_for(args)
    num_classes = len(train_set.classes)
    global_batch = args.batch_size * world
    args.lr = args.lr if args.lr is not None else 0.1 * global_batch / 128
    steps_per_epoch = (len(train_set) // world) // args.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"train: {len(train_set)} images make no full batch of "
                         f"{args.batch_size} x {world} ranks")

    torch.manual_seed(args.seed)
    model = build_model(spec, num_classes, args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9,
                          nesterov=True)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    settings = {"model": spec, "num_classes": num_classes, "batch_size": args.batch_size,
                "world_size": world, "seed": args.seed}

    start_epoch = 0
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        written = ckpt.get("settings", {}).get("model") if isinstance(ckpt, dict) else None
        if written is None:
            raise TrainError(f"train: {ckpt_path} is not a checkpoint of this command")
        if written != spec:
            raise TrainError(f"train: {ckpt_path} is a checkpoint of {written['name']} "
                             f"{written['params']}, not of {spec['name']} {spec['params']}")
        if ckpt["settings"] != settings:
            raise TrainError(f"train: {ckpt_path} was written by a run with {ckpt['settings']}; "
                             f"this one has {settings} (resuming would not continue it)")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"]
        if main:
            print(f"resumed from {ckpt_path} at epoch {start_epoch}", flush=True)

    if args.sync_bn and not args.fused and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    runner = model
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if main:
        print(f"train: {spec['name']} ({'fused' if args.fused else 'reference'}), "
              f"{len(train_set)} images, {num_classes} classes, {world} rank(s) x "
              f"{args.batch_size}, {steps_per_epoch} steps/epoch, lr {args.lr:g}, "
              f"amp {args.amp}, {device.type}", flush=True)
    from_folder = args.data != "synthetic"  # images may be unreadable
    workers = args.workers if from_folder else 0
    skipped = seen = 0
    run_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        runner.train()
        train_set.epoch = epoch
        batches = datasets.epoch_batches(len(train_set), args.batch_size, epoch, args.seed, rank,
                                         world)
        # loss sum, correct, images of the epoch, on the device: no host sync per step
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        tick, tick_images = time.perf_counter(), 0
        for step, (x, y, bad) in enumerate(datasets.loader(train_set, batches, workers,
                                                           pin_memory=device.type == "cuda")):
            skipped += bad
            # a rank whose whole batch was unreadable has nothing to step on: every rank
            # skips the step together (DDP's backward is collective)
            if from_folder and _all_sum([x is None], device)[0] > 0:
                continue
            global_step = epoch * steps_per_epoch + step
            for group in opt.param_groups:
                group["lr"] = learning_rate(global_step, steps_per_epoch, args)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = runner(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            totals += torch.stack([loss.detach().double() * len(y),
                                   (logits.argmax(1) == y).sum().double(),
                                   totals.new_tensor(len(y))])
            tick_images += len(y)
            seen += len(y)
            if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                loss_sum, images, rate_images = _all_sum(
                    [float(loss.detach()) * len(y), len(y), tick_images], device)
                now = time.perf_counter()
                rate = rate_images / max(now - tick, 1e-9)
                left = (args.epochs - epoch) * steps_per_epoch - step - 1
                if main:
                    print(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} "
                          f"loss {loss_sum / max(images, 1):.4f} "
                          f"lr {opt.param_groups[0]['lr']:.4g} {rate:.1f} images/s "
                          f"eta {_eta(left * global_batch / max(rate, 1e-9))}", flush=True)
                tick, tick_images = now, 0
        metrics = _epoch_metrics(runner, val_set, args, device, rank, world, workers,
                                 totals.tolist() + [skipped])
        if main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "scaler": scaler.state_dict(), "epoch": epoch + 1,
                                        "settings": settings, "metrics": metrics})
            print(f"epoch {epoch + 1}/{args.epochs} done: {json.dumps(metrics)}; "
                  f"checkpoint: epoch {epoch + 1} saved to {ckpt_path}", flush=True)
        if dist.is_initialized():
            dist.barrier()  # no rank runs ahead of the checkpoint

    elapsed = time.perf_counter() - run_start
    total_seen = _all_sum([seen], device)[0]
    final = {"model": spec["name"], "fused": args.fused, "epochs": args.epochs,
             "world_size": world, "device": device.type, "amp": args.amp,
             "images_per_s": total_seen / elapsed if elapsed > 0 else None,
             "time_s": elapsed, "checkpoint": str(ckpt_path)}
    if ckpt_path.exists():
        final.update(torch.load(ckpt_path, map_location="cpu", weights_only=False)["metrics"])
    if main:
        (out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        print(json.dumps(final), flush=True)
    return 0


def _epoch_metrics(runner, val_set, args, device, rank, world, workers, local) -> dict:
    """The epoch's train loss and top-1 over all ranks, unreadable images so far, and
    val top-1/top-5 when there is a val folder."""
    loss, correct, images, skipped = _all_sum(local, device)
    metrics = {"train_loss": loss / max(images, 1), "train_top1": correct / max(images, 1),
               "skipped_images": int(skipped)}
    if val_set is None:
        return metrics
    runner.eval()
    batches = datasets.epoch_batches(len(val_set), args.batch_size, 0, args.seed, rank, world,
                                     shuffle=False, drop_last=False)
    top1 = top5 = count = bad = 0
    amp_dtype = AMP_DTYPES[args.amp]
    with torch.no_grad():
        for x, y, b in datasets.loader(val_set, batches, workers):
            bad += b
            if x is None:
                continue
            x, y = x.to(device), y.to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = getattr(runner, "module", runner)(x)
            best = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += int((best[:, 0] == y).sum())
            top5 += int((best == y[:, None]).any(1).sum())
            count += len(y)
    top1, top5, count, bad = _all_sum([top1, top5, count, bad], device)
    metrics.update(val_top1=top1 / max(count, 1), val_top5=top5 / max(count, 1),
                   val_images=int(count), val_skipped_images=int(bad))
    return metrics
