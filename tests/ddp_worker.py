"""One rank of the multi-process runs of tests/test_distributed.py.

python tests/ddp_worker.py OUT_DIR DEVICE SCENARIO[,SCENARIO...] with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set: joins the process group (gloo on CPU, NCCL on CUDA), runs
each scenario and saves what it measured to OUT_DIR/<scenario>-<rank>.pt; the test
compares. Inputs come from `rank_batch`, so the test can rebuild any rank's batch.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import regnet_kernels as rk

# Two stages (8 and 16 channels; a projection block and an identity block), Y blocks
TINY = rk.RegNetParams(depth=3, w0=8, wa=8, wm=2.0, group_width=8, se_ratio=0.25)
CLASSES = 10
SIZE = 32


def rank_batch(rank: int, step: int, batch: int):
    """The (images, labels) rank `rank` trains on at `step`."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randn(batch, 3, SIZE, SIZE, generator=gen),
            torch.randint(0, CLASSES, (batch,), generator=gen))


def models(seed: int = 0):
    """A float64 reference model with non-trivial BN parameters, and a float32 fused copy
    (so the comparisons measure the fused model's error, not the fp32 reference's: tiny
    batches make BN's backward amplify rounding)."""
    torch.manual_seed(seed)
    ref = rk.reference_model(TINY, num_classes=CLASSES)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in ref.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5, generator=gen)
                bn.bias.normal_(0, 0.2, generator=gen)
    fused = rk.fused_model(TINY, num_classes=CLASSES)
    fused.load_state_dict(ref.state_dict())
    return ref.double(), fused


def grads(model: torch.nn.Module) -> dict:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(model, opt, rank, device, steps, batch):
    """SGD steps; per step the loss and the gradients (after DDP's all-reduce)."""
    record = []
    dtype = next(model.parameters()).dtype
    for step in range(steps):
        x, y = (t.to(device) for t in rank_batch(rank, step, batch))
        x = x.to(dtype)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        record.append({"loss": loss.detach().cpu(), "grads": {
            k: v.cpu() for k, v in grads(getattr(model, "module", model)).items()}})
        opt.step()
    return record


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def scenario_ddp(rank, device):
    """Fused vs reference under DDP: static graph, small gradient buckets (several per
    step), find_unused_parameters=False; two SGD steps."""
    out = {}
    for kind, model in zip(("ref", "fused"), models()):
        model = model.to(device).train()
        ddp = DDP(model, bucket_cap_mb=0.01, static_graph=True, find_unused_parameters=False)
        out[kind] = {"steps": train_steps(ddp, sgd(ddp), rank, device, 2, 2),
                     "state": {k: v.cpu() for k, v in state(model).items()}}
    return out


def scenario_frozen(rank, device):
    """Frozen BN under DDP, detection style: the stem's BN in eval mode with
    requires_grad False (DDP leaves its parameters out), stage 1's BNs in eval mode but
    trainable; the rest in training mode."""
    out = {}
    for kind, model in zip(("ref", "fused"), models()):
        model = model.to(device).train()
        for name, m in model.named_modules():
            frozen = name.startswith(("stem", "trunk_output.block1"))
            if isinstance(m, torch.nn.BatchNorm2d) and frozen:
                m.eval()
                if name.startswith("stem"):
                    m.requires_grad_(False)
        ddp = DDP(model, bucket_cap_mb=0.01)
        out[kind] = {"steps": train_steps(ddp, sgd(ddp), rank, device, 2, 2),
                     "state": {k: v.cpu() for k, v in state(model).items()}}
    return out


def uneven_batch(rank: int) -> int:
    return 2 + rank  # ranks see different batch sizes, as at the end of an epoch


def one_step(model, rank, device):
    """Forward and backward on this rank's uneven batch, no optimizer step."""
    x, y = (t.to(device) for t in rank_batch(rank, 0, uneven_batch(rank)))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach().cpu()


def scenario_sync(rank, device):
    """SyncBatchNorm in the fused ops, uneven batches: sync_bn=True under DDP, and
    nn.SyncBatchNorm.convert_sync_batchnorm without DDP (DDP refuses a CPU module holding
    SyncBatchNorm), whose gradients are averaged by hand as DDP would."""
    out = {}
    _, fused = models()
    fused = rk.fuse(fused.to(device).train(), sync_bn=True)
    ddp = DDP(fused, bucket_cap_mb=0.01)
    loss = one_step(ddp, rank, device)
    out["sync_bn"] = {"loss": loss, "grads": {k: v.cpu() for k, v in grads(fused).items()},
                      "state": {k: v.cpu() for k, v in state(fused).items()}}

    _, fused = models()
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused.to(device).train())
    loss = one_step(converted, rank, device)
    for p in converted.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
    out["converted"] = {"loss": loss, "grads": {k: v.cpu() for k, v in grads(converted).items()},
                        "state": {k: v.cpu() for k, v in state(converted).items()}}
    return out


def scenario_sync_vs_torch(rank, device):
    """On GPUs: the fused model with SyncBatchNorm against the reference with
    nn.SyncBatchNorm, both under DDP, same uneven batches; two SGD steps."""
    out = {}
    for kind, model in zip(("ref", "fused"), models()):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device).train()
        ddp = DDP(model, device_ids=[device.index])
        opt = sgd(ddp)
        steps = []
        for step in range(2):
            x, y = (t.to(device) for t in rank_batch(rank, step, uneven_batch(rank)))
            x = x.to(next(model.parameters()).dtype)
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            steps.append({"loss": loss.detach().cpu(),
                          "grads": {k: v.cpu() for k, v in grads(model).items()}})
            opt.step()
        out[kind] = {"steps": steps, "state": {k: v.cpu() for k, v in state(model).items()}}
    return out


def scenario_compile(rank, device):
    """torch.compile of the DDP-wrapped fused model (the default buckets: dynamo's DDP
    optimizer splits the graph at their boundaries) against the eager DDP reference."""
    out = {}
    for kind, model in zip(("ref", "fused"), models()):
        model = model.to(device).train()
        ddp = DDP(model)
        runner = torch.compile(ddp) if kind == "fused" else ddp
        out[kind] = {"steps": train_steps(runner, sgd(ddp), rank, device, 2, 2),
                     "state": {k: v.cpu() for k, v in state(model).items()}}
    return out


def op_case(rank: int):
    """One rank's inputs of a single conv_bn_train with SyncBatchNorm: a grouped 3x3 conv
    reading a lazy BN output through the prologue (affine, ReLU, SE gate), uneven batches,
    and the upstream gradient of its output."""
    gen = torch.Generator().manual_seed(50 + rank)
    n = uneven_batch(rank)
    return {"x": torch.randn(n, 8, 6, 6, generator=gen),
            "gate": torch.rand(n, 8, generator=gen),
            "dv": torch.randn(n, 16, 6, 6, generator=gen)}


def op_params():
    """The op's weights and BN, the same on every rank."""
    gen = torch.Generator().manual_seed(7)
    bn = torch.nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0, 0.2, generator=gen)
    return {"weight": torch.randn(16, 4, 3, 3, generator=gen) / 6,
            "in_scale": torch.rand(8, generator=gen) + 0.5,
            "in_shift": torch.randn(8, generator=gen) * 0.3, "bn": bn}


def scenario_sync_op(rank, device):
    """conv_bn_train(sync_group=WORLD) of both backends (the C++ ops and the Triton ops):
    the BN output, every gradient and the running statistics."""
    from regnet_kernels import ops
    from regnet_kernels.ops import cpp
    out = {}
    for name, backend in (("cpu", cpp), ("triton", ops)):
        case, params = op_case(rank), op_params()
        x = case["x"].to(device).requires_grad_()
        gate = case["gate"].to(device).requires_grad_()
        weight = params["weight"].to(device).requires_grad_()
        bn = params["bn"].to(device).train()
        res = backend.conv_bn_train(x, weight, bn, groups=2, in_scale=params["in_scale"],
                                    in_shift=params["in_shift"], in_relu=True, gate=gate,
                                    sync_group=dist.group.WORLD)
        v = res.y * res.scale[:, None, None] + res.shift[:, None, None]
        res.y.backward(case["dv"].to(device))
        out[name] = {"v": v.detach().cpu(), "x": x.grad.cpu(), "gate": gate.grad.cpu(),
                     "weight": weight.grad.cpu(), "gamma": bn.weight.grad.cpu(),
                     "beta": bn.bias.grad.cpu(), "running_mean": bn.running_mean.cpu(),
                     "running_var": bn.running_var.cpu()}
    return out


SCENARIOS = {"ddp": scenario_ddp, "frozen": scenario_frozen, "sync": scenario_sync,
             "sync_vs_torch": scenario_sync_vs_torch, "compile": scenario_compile,
             "sync_op": scenario_sync_op}


def main(out_dir: str, device_type: str, scenarios: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)  # the ranks share the machine's cores
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cudnn.allow_tf32 = False  # fp32 references exact in fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        for name in scenarios.split(","):
            torch.save(SCENARIOS[name](rank, device), os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
