"""The fused model under torch.distributed: two-process runs (gloo on CPU, NCCL on GPUs)
spawned by the test with a timeout (tests/ddp_worker.py is one rank), compared with the
reference model under DDP, or, for SyncBatchNorm on CPU, with one process training
plain BN on the ranks' concatenated batch with the mean of their losses."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ddp_worker
import regnet_kernels as rk
from regnet_kernels.models.reference import ResBottleneckBlock
from numerics import rel_err

TESTS = Path(__file__).resolve().parent
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out_dir: Path, scenarios: list[str], device: str = "cpu", world: int = WORLD,
              timeout: float = 300) -> dict:
    """Run the scenarios on `world` ranks; returns {scenario: [rank 0's results, ...]}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS),
                                           os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(TESTS / "ddp_worker.py"), str(out_dir), device,
                               ",".join(scenarios)], env=dict(env, RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return {name: [torch.load(out_dir / f"{name}-{rank}.pt") for rank in range(world)]
            for name in scenarios}


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    """One two-process gloo run of the default CPU scenarios (process start-up, the
    extension's loading and gloo's rendezvous paid once)."""
    return run_ranks(tmp_path_factory.mktemp("ddp"), ["ddp", "frozen", "sync", "sync_op"])


def assert_fused_matches_reference(ranks, tol=1e-5):
    """Per rank: fused and reference losses and all-reduced gradients of every step, and
    the final parameters and buffers; the all-reduced gradients and the trained
    parameters are the same on every rank."""
    for rank, result in enumerate(ranks):
        ref, fused = result["ref"], result["fused"]
        for step, (s_ref, s_fused) in enumerate(zip(ref["steps"], fused["steps"])):
            assert rel_err(s_fused["loss"], s_ref["loss"]) < tol, (rank, step)
            assert s_fused["grads"].keys() == s_ref["grads"].keys()
            for key, g_ref in s_ref["grads"].items():
                assert rel_err(s_fused["grads"][key], g_ref) < tol, (rank, step, key)
        for key, v_ref in ref["state"].items():
            assert rel_err(fused["state"][key], v_ref) < tol, (rank, key)
    first = ranks[0]["fused"]
    for other in ranks[1:]:
        for step, s0 in enumerate(first["steps"]):
            for key, g in s0["grads"].items():  # after DDP's all-reduce: one gradient
                assert torch.equal(g, other["fused"]["steps"][step]["grads"][key]), key
        for key in first["steps"][0]["grads"]:  # buffers differ: each rank's last forward
            assert torch.equal(first["state"][key], other["fused"]["state"][key]), key  # own


def test_ddp_fused_matches_reference_ddp(cpu_runs):
    """Static graph, several gradient buckets, find_unused_parameters=False, two SGD
    steps with momentum and weight decay; the ranks' batches differ."""
    ranks = cpu_runs["ddp"]
    assert_fused_matches_reference(ranks)
    losses = [r["fused"]["steps"][0]["loss"] for r in ranks]
    assert not torch.equal(losses[0], losses[1])  # the ranks really saw different data


def test_ddp_with_frozen_batchnorm(cpu_runs):
    ranks = cpu_runs["frozen"]
    assert_fused_matches_reference(ranks)
    ref, fused = ranks[0]["ref"]["state"], ranks[0]["fused"]["state"]
    assert "stem.1.weight" not in ranks[0]["fused"]["steps"][0]["grads"]
    # frozen statistics stayed as they were; training ones moved
    _, initial = ddp_worker.models()
    for key in ("stem.1.running_mean", "trunk_output.block1.block1-0.f.b.1.running_var"):
        assert torch.equal(fused[key], initial.state_dict()[key]), key
    key = "trunk_output.block2.block2-0.f.b.1.running_mean"
    assert not torch.equal(fused[key], initial.state_dict()[key])


def sync_reference():
    """One process, plain BN, on the ranks' concatenated (uneven) batches; the loss is
    the mean of the ranks' mean losses, as DDP averages their gradients."""
    ref, _ = ddp_worker.models()
    ref.train()
    batches = [ddp_worker.rank_batch(r, 0, ddp_worker.uneven_batch(r)) for r in range(WORLD)]
    out = ref(torch.cat([x for x, _ in batches]).double())
    losses, start = [], 0
    for x, y in batches:
        losses.append(F.cross_entropy(out[start:start + len(x)], y))
        start += len(x)
    torch.stack(losses).mean().backward()
    return ref, [loss.detach() for loss in losses]


@pytest.mark.parametrize("variant", ["sync_bn", "converted"])
def test_sync_batchnorm_on_cpu_equals_one_process_on_the_whole_batch(cpu_runs, variant):
    """fused_model(sync_bn=True) under DDP, and convert_sync_batchnorm(fused): BN
    statistics over both ranks' uneven batches (2 and 3 images), in forward (outputs,
    running statistics with the total count) and backward (gradients)."""
    ref, ref_losses = sync_reference()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    ref_state = ref.state_dict()
    for rank, result in enumerate(cpu_runs["sync"]):
        got = result[variant]
        assert rel_err(got["loss"], ref_losses[rank]) < 1e-5, rank
        assert got["grads"].keys() == ref_grads.keys()
        for key, g in ref_grads.items():
            assert rel_err(got["grads"][key], g) < 1e-5, (rank, key)
        for key, v in ref_state.items():
            assert rel_err(got["state"][key], v) < 1e-5, (rank, key)
    # without synchronization the statistics would differ: the check can fail
    alone, _ = ddp_worker.models()
    alone.train()(ddp_worker.rank_batch(0, 0, ddp_worker.uneven_batch(0))[0].double())
    key = "trunk_output.block2.block2-0.f.b.1.running_mean"
    assert rel_err(alone.state_dict()[key], ref_state[key]) > 1e-3


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_sync_conv_bn_train_op_equals_float64_batchnorm_on_the_whole_batch(cpu_runs, backend):
    """One conv_bn_train with sync_group on each backend against float64 conv + BN on
    the concatenated batch: the BN output, the input (dL/dv_prev), gate and weight gradients (the
    upstream gradient is the ranks' dv together), gamma/beta gradients (each rank's
    share: they sum to the whole batch's), running statistics."""
    cases = [ddp_worker.op_case(r) for r in range(WORLD)]
    params = ddp_worker.op_params()
    x = torch.cat([c["x"] for c in cases]).double()
    # x is read as the lazy BN output v_prev = x * in_scale + in_shift: its gradient is dL/dv_prev
    v_prev = (x * params["in_scale"].double()[:, None, None]
              + params["in_shift"].double()[:, None, None]).requires_grad_()
    gate = torch.cat([c["gate"] for c in cases]).double().requires_grad_()
    weight = params["weight"].double().requires_grad_()
    bn = params["bn"].double().train()
    u = torch.relu(v_prev) * gate[:, :, None, None]
    v = bn(F.conv2d(u, weight, padding=1, groups=2))
    v.backward(torch.cat([c["dv"] for c in cases]).double())
    ranks = [r[backend] for r in cpu_runs["sync_op"]]
    start = 0
    for rank, got in enumerate(ranks):
        rows = slice(start, start + len(cases[rank]["x"]))
        start = rows.stop
        assert rel_err(got["v"], v[rows]) < 1e-5, rank
        assert rel_err(got["x"], v_prev.grad[rows]) < 1e-5, rank
        assert rel_err(got["gate"], gate.grad[rows]) < 1e-5, rank
        assert rel_err(got["running_mean"], bn.running_mean) < 1e-6, rank
        assert rel_err(got["running_var"], bn.running_var) < 1e-6, rank
    for key, ref in (("weight", weight.grad), ("gamma", bn.weight.grad), ("beta", bn.bias.grad)):
        assert rel_err(sum(r[key] for r in ranks), ref) < 1e-5, key


@pytest.mark.slow
def test_torch_compile_of_the_ddp_model(tmp_path):
    """torch.compile(DDP(fused)) on CPU (the DDP optimizer splits the graph at bucket
    boundaries) against the eager reference under DDP."""
    assert_fused_matches_reference(run_ranks(tmp_path, ["compile"], timeout=900)["compile"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ddp_and_sync_batchnorm_on_gpus_equal_torch(tmp_path):
    """NCCL, one GPU per rank (two ranks with two GPUs, else one): the fused model against
    the reference under DDP, then both converted to SyncBatchNorm (nn.SyncBatchNorm for
    the reference) under DDP with uneven batches; two SGD steps each. A second run gives
    bit-identical fused results (deterministic collectives and merges)."""
    world = min(2, torch.cuda.device_count())
    runs = run_ranks(tmp_path / "a", ["ddp", "sync_vs_torch"], device="cuda", world=world)
    for ranks in runs.values():
        assert_fused_matches_reference(ranks)
    again = run_ranks(tmp_path / "b", ["sync_vs_torch"], device="cuda", world=world)
    for first, second in zip(runs["sync_vs_torch"], again["sync_vs_torch"]):
        for s1, s2 in zip(first["fused"]["steps"], second["fused"]["steps"]):
            assert torch.equal(s1["loss"], s2["loss"])
            assert all(torch.equal(g, s2["grads"][k]) for k, g in s1["grads"].items())
        assert all(torch.equal(v, second["fused"]["state"][k])
                   for k, v in first["fused"]["state"].items())


def test_unsupported_norm_layers_are_refused_by_name():
    class OtherBatchNorm(torch.nn.BatchNorm2d):  # a BN-like layer with its own forward
        pass

    model = rk.reference_model(ddp_worker.TINY, num_classes=ddp_worker.CLASSES)
    block = model.trunk_output.block1[0]
    block.f.b[1] = OtherBatchNorm(block.f.b[1].num_features)
    with pytest.raises(TypeError, match=r"trunk_output\.block1\.block1-0\.f\.b\.1 "
                                        r"\(OtherBatchNorm\)"):
        rk.fuse(model)
    assert type(block) is ResBottleneckBlock  # left unfused
    fused = rk.fused_model(ddp_worker.TINY, num_classes=ddp_worker.CLASSES)
    fused.stem[1] = torch.nn.GroupNorm(2, fused.stem[1].num_features)
    x = torch.randn(2, 3, 16, 16)
    for training in (True, False):  # never a silent fallback, in either mode
        with pytest.raises(TypeError, match=r"1 \(GroupNorm\)"), torch.no_grad():
            fused.train(training)(x)


def test_sync_bn_without_a_process_group_is_plain_batchnorm():
    """As nn.SyncBatchNorm: no initialized process group, the rank's own statistics."""
    ref, fused = ddp_worker.models()
    fused = rk.fuse(fused, sync_bn=True).train()
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(fused(x), ref.train()(x.double())) < 1e-5
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ddp_worker.models()[1]).train()
    assert rel_err(converted(x), ref(x.double())) < 1e-5
    with torch.no_grad():  # training-mode SyncBatchNorm: batch statistics, not the eval fusion
        assert rel_err(converted(x), ref(x.double())) < 1e-5
