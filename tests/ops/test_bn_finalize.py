"""bn_finalize (the BN statistics from per-tile partials, and the running-statistics update),
the Triton backend's (the C++ backend's is inside conv_bn_train), against nn.BatchNorm2d in
training mode (float64); then the CUDA launcher rk_bn_finalize under the CPU emulation."""
import copy

import pytest
import torch

from bad_inputs import expect_rejected
from cuda_emu.harness import S, Out, assert_close, isolated, launch, ptr, ref, tile_stats
from numerics import DEVICE, rel_err
from regnet_kernels import ops


def tile_partials(y2d: torch.Tensor, rows: int):
    """Per-tile sums and centered sums of squares of a (M, C) tensor, in float64."""
    tiles = y2d.double().split(rows)
    return (torch.stack([t.sum(0) for t in tiles]).float(),
            torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles]).float())


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
# The last two have more than MERGE_ABOVE_TILES tiles (the group-merge pass runs), a last
# tile and a last group that are partial, and channel blocks that end mid-way.
@pytest.mark.parametrize("n,c,h,w,rows", [(1, 24, 7, 7, 16), (3, 56, 13, 14, 128), (2, 130, 1, 1, 1),
                                          (4, 5, 30, 31, 7), (2, 70, 17, 19, 2)])
def test_matches_batchnorm2d(n, c, h, w, rows, momentum):
    gen = torch.Generator().manual_seed(c)
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(DEVICE)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    ref = copy.deepcopy(bn).double().train()
    for step in range(3):  # three steps: exercises the cumulative average
        # a large mean: the centered partials must not lose the variance to cancellation
        y = (torch.randn(n, c, h, w, generator=gen) * 0.5 + 20.0).to(DEVICE)
        y2d = y.permute(0, 2, 3, 1).reshape(-1, c)
        s, m2 = tile_partials(y2d, rows)
        stats = ops.bn_finalize(s.to(DEVICE), m2.to(DEVICE), n * h * w, rows, bn)
        out = ref(y.double())
        mean = y2d.double().mean(0)
        var = y2d.double().var(0, unbiased=False)
        assert rel_err(stats.mean, mean) < 1e-6
        assert rel_err(stats.inv_std, (var + bn.eps).rsqrt()) < 1e-5
        assert rel_err(stats.var, var) < 1e-5
        normalized = y.double() * stats.scale.double()[:, None, None] + stats.shift.double()[:, None, None]
        # y * scale + shift cancels ~|mean| / std = 40x: fp32 rounding of scale/shift shows
        assert rel_err(normalized, out) < 40 * 2e-6
        assert rel_err(bn.running_mean, ref.running_mean) < 1e-6
        assert rel_err(bn.running_var, ref.running_var) < 1e-6
        assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_float64(momentum):
    """float64 partials: statistics and running statistics computed in float64."""
    gen = torch.Generator().manual_seed(1)
    n, c, h, w, rows = 3, 24, 7, 8, 32
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(DEVICE, torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen))
    ref = copy.deepcopy(bn).train()
    for _ in range(2):
        y = (torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) + 20.0).to(DEVICE)
        tiles = y.permute(0, 2, 3, 1).reshape(-1, c).split(rows)
        s = torch.stack([t.sum(0) for t in tiles])
        m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
        stats = ops.bn_finalize(s, m2, n * h * w, rows, bn)
        out = ref(y)
        assert all(v.dtype == torch.float64 for v in stats)
        var = y.var((0, 2, 3), unbiased=False)
        assert rel_err(stats.mean, y.mean((0, 2, 3))) < 1e-14
        assert rel_err(stats.var, var) < 1e-12
        assert rel_err(y * stats.scale[:, None, None] + stats.shift[:, None, None], out) < 1e-12
        assert rel_err(bn.running_mean, ref.running_mean) < 1e-14
        assert rel_err(bn.running_var, ref.running_var) < 1e-14


def test_no_affine_no_running_stats():
    bn = torch.nn.BatchNorm2d(16, affine=False, track_running_stats=False).to(DEVICE)
    y = torch.randn(40, 16, device=DEVICE)
    s, m2 = tile_partials(y, 16)
    stats = ops.bn_finalize(s.to(DEVICE), m2.to(DEVICE), 40, 16, bn)
    assert rel_err(stats.scale, (y.double().var(0, unbiased=False) + 1e-5).rsqrt()) < 1e-5
    assert rel_err(stats.shift, -y.double().mean(0) * stats.scale.double()) < 1e-5


def test_deterministic():
    y = torch.randn(3000, 64, device=DEVICE)
    s, m2 = tile_partials(y, 64)
    a = ops.bn_finalize(s, m2, 3000, 64)
    b = ops.bn_finalize(s, m2, 3000, 64)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("kwargs,match", [
    (dict(count=1, rows=1, t=1), "more than 1 value"),
    (dict(count=100, rows=16, t=3), "do not cover"),
    (dict(count=40, rows=16, t=3, weight=torch.ones(7), bias=torch.zeros(7)), "weight must have shape"),
    (dict(count=40, rows=16, t=3, running_mean=torch.zeros(8), running_var=torch.ones(8),
          momentum=None), "num_batches_tracked"),
])
def test_bad_input(kwargs, match):
    t = kwargs.pop("t")
    s = torch.randn(t, 8, device=DEVICE)
    count, rows = kwargs.pop("count"), kwargs.pop("rows")
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    expect_rejected("bn_finalize", "triton",
                    lambda: ops.bn_finalize(s, s.abs(), count, rows, **kwargs), ValueError, match)


def test_opcheck():
    c = 12
    s, m2 = tile_partials(torch.randn(50, c), 16)
    s, m2 = s.to(DEVICE), m2.to(DEVICE)
    torch.library.opcheck(torch.ops.regnet_triton.bn_finalize.default,
                          (s, m2, 50, 16, torch.rand(c, device=DEVICE), torch.randn(c, device=DEVICE), 1e-5))
    stats = torch.rand(5, c, device=DEVICE)
    for momentum, nbt in ((0.1, None), (None, torch.zeros((), dtype=torch.long, device=DEVICE))):
        torch.library.opcheck(torch.ops.regnet_triton.bn_update_running.default,
                              (stats, 50, torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE),
                               nbt, momentum))


# ---------------------------------------------------------------------------
# The CUDA launcher rk_bn_finalize under the CPU emulation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [True, False])
@pytest.mark.parametrize("rows,c,block_m", [(98, 24, 64), (338, 40, 64), (50, 7, 128), (256, 16, 32),
                                          (3000, 40, 32)])  # 94 tiles > 32 merge rows
@isolated
def test_cuda_emu(emu, rows, c, block_m, gamma):
    torch.manual_seed(rows + c)
    y = torch.randn(rows, c, dtype=torch.float64) * 3 + torch.randn(c, dtype=torch.float64) * 5
    partials = tile_stats(y, block_m).float().contiguous()
    g = torch.rand(c) + 0.5 if gamma else None
    b = torch.randn(c) if gamma else None
    eps = 1e-5
    stats = Out((S.RK_STAT_ROWS, c))
    args = S.rk_bn_finalize_args(partials=ptr(partials), tiles=partials.shape[0], c=c, rows=rows,
                                 block_m=block_m, gamma=ptr(g), beta=ptr(b), eps=eps,
                                 stats=stats.ptr)
    launch(emu, "rk_bn_finalize", ref(args), None)
    stats.check_guards("stats")
    mean = y.mean(0)
    var = y.var(0, unbiased=False)
    inv_std = 1 / torch.sqrt(var + eps)
    sc = (g.double() if gamma else 1) * inv_std
    sh = (b.double() if gamma else 0) - mean * sc
    for row, name, e in [(S.RK_STAT_MEAN, "mean", mean), (S.RK_STAT_VAR, "var", var),
                         (S.RK_STAT_INV_STD, "inv_std", inv_std), (S.RK_STAT_SCALE, "scale", sc),
                         (S.RK_STAT_SHIFT, "shift", sh)]:
        assert_close(name, stats.t[row], e)
