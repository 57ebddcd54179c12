"""Whole-model parity: every standard model, and random points of the design space,
fused (C++ CPU backend) against the float64 reference with the same weights."""
import numpy as np
import pytest
import torch

import regnet_kernels as rk
from numerics import randomize_bn, rel_err
from regnet_kernels.models.fused import fuse

# fp32 through up to ~30 blocks against float64: a few e-6 in practice.
MODEL_TOL = 1e-5
# 281 M to 1.28 G parameters: seconds to build, GBs to hold
HUGE = {"regnety_64gf", "regnety_128gf", "regnet_y_128gf", "regnety_256gf"}


def fused_vs_float64(params, size=32, batch=2, seed=0):
    """(fused fp32 eval output, float64 reference eval output) for one random model."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = rk.reference_model(params, num_classes=10)
    randomize_bn(model, gen)
    model.eval()
    x = torch.randn(batch, 3, size, size, generator=gen)
    with torch.no_grad():
        ref = model.double()(x.double())
        fused = fuse(model.float(), backend="cpu")
        out = fused(x)
    return out, ref


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HUGE else n
                                  for n in rk.list_models()])
def test_every_standard_model_eval(name):
    out, ref = fused_vs_float64(name)
    assert out.dtype == torch.float32 and out.shape == (2, 10)
    assert rel_err(out, ref) < MODEL_TOL


def small_sample(seed, se_ratio, max_params=20e6):
    """A random valid RegNetParams with at most max_params parameters (draws above it,
    up to ~100 M, only cost test time: they exercise the same stage and block shapes)."""
    rng = np.random.default_rng(seed)
    while True:
        params = rk.sample_params(rng, se_ratio=se_ratio)
        if rk.complexity(params, 32)["params"] <= max_params:
            return params


@pytest.mark.parametrize("seed", range(20))
def test_random_design_space_points(seed):
    """20 random valid RegNetParams (half with SE, group widths from the sampled set)."""
    params = small_sample(seed, se_ratio=0.25 if seed % 2 else 0.0)
    out, ref = fused_vs_float64(params, seed=seed)
    assert rel_err(out, ref) < MODEL_TOL, params
