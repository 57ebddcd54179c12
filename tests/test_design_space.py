"""Design spaces (AnyNetX A-E, RegNet), their analysis (EDF, KS, quantized-linear fit) and the
`designspace` study runner."""
from __future__ import annotations

import collections
import csv
import dataclasses
import itertools
import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from regnet_kernels import complexity, fused_model, reference_model
from regnet_kernels.__main__ import main
from regnet_kernels.design import (AnyNetParams, DegenerateNetworkError, RegNetParams,
                                   params_from_dict, sample_params)
from regnet_kernels.design_analysis import (complexity_bin_edges, complexity_weights,
                                            error_edf, fit_quantized_linear, ks_bootstrap,
                                            ks_distance, quantized_linear_widths)
from regnet_kernels.design_space import SPACE_NAMES, AnyNetSpace, design_space
from regnet_kernels.design_study import edf_tables, load_results
from regnet_kernels.zoo import list_models, model_params

SEEDS = range(40)


# ---------------------------------------------------------------------------
# spaces: constraints, reproducibility, size, regime, models
# ---------------------------------------------------------------------------


def check_anynet_paper_ranges(net: AnyNetParams) -> None:
    assert len(net.depths) == 4
    assert all(1 <= d <= 16 for d in net.depths)
    assert all(8 <= w <= 1024 and w % 8 == 0 for w in net.widths)
    assert all(b in (1, 2, 4) for b in (round(1 / r) for r in net.bottleneck_ratios))
    assert all(g in (1, 2, 4, 8, 16, 32) for g in net.group_widths)
    for stage in net.stages():  # every stage groups exactly, nothing adjusted
        assert stage.bottleneck_width == stage.width * stage.bottleneck_ratio
        assert stage.bottleneck_width % stage.group_width == 0


@pytest.mark.parametrize("name", [n for n in SPACE_NAMES if n.startswith("anynetx")])
def test_anynet_samples_satisfy_their_space(name):
    space = design_space(name)
    for seed in SEEDS:
        for net in space.sample(5, seed=seed):
            check_anynet_paper_ranges(net)
            assert space.contains(net)
            b = net.bottleneck_ratios
            g = net.group_widths
            if name >= "anynetx_b":
                assert len(set(b)) == 1
            if name >= "anynetx_c":
                assert len(set(g)) == 1
            if name >= "anynetx_d":
                assert list(net.widths) == sorted(net.widths)
            if name >= "anynetx_e":
                assert list(net.depths) == sorted(net.depths)


@pytest.mark.parametrize("name", ["regnetx", "regnety"])
def test_regnet_samples_satisfy_the_paper_ranges(name):
    space = design_space(name)
    for seed in SEEDS:
        for net in space.sample(5, seed=seed):
            assert isinstance(net, RegNetParams) and space.contains(net)
            assert 1 <= net.depth < 64 and 8 <= net.w0 < 256 and net.w0 % 8 == 0
            assert 0 < net.wa < 256 and 1.5 <= net.wm <= 3
            assert math.isclose(net.wa * 100, round(net.wa * 100), abs_tol=1e-6)
            assert round(1 / net.bottleneck_ratio) in (1, 2, 4)
            assert net.group_width in (1, 2, 4, 8, 16, 32)
            assert len(net.stages()) == 4
            assert net.se_ratio == (0.25 if name == "regnety" else 0.0)


def test_spaces_reject_what_they_do_not_contain():
    a, e = design_space("anynetx_a"), design_space("anynetx_e")
    decreasing = AnyNetParams((4, 3, 2, 1), (64, 48, 32, 16), (1,) * 4, (8,) * 4)
    assert a.contains(decreasing) and not e.contains(decreasing)
    too_deep = AnyNetParams((17, 1, 1, 1), (8, 16, 24, 32), (1,) * 4, (8,) * 4)
    assert not a.contains(too_deep)
    assert not a.contains(AnyNetParams((1, 1, 1), (8, 16, 24), (1,) * 3, (8,) * 3))
    assert not a.contains(model_params("regnetx_400mf"))
    regnet = design_space("regnetx")
    assert regnet.contains(model_params("regnetx_400mf"))  # d 22, w0 24, wa 24.48, wm 2.54
    assert not regnet.contains(model_params("regnety_400mf"))  # SE blocks: regnety's
    assert not regnet.contains(model_params("regnetx_32gf"))  # w0 = 320 >= 256


def test_sampling_is_reproducible_and_extends():
    for name in SPACE_NAMES:
        space = design_space(name)
        first = space.sample(8, seed=3)
        assert first == space.sample(8, seed=3)
        assert space.sample(12, seed=3)[:8] == first
        assert first != space.sample(8, seed=4)


def tiny_anynet(name: str, **overrides) -> AnyNetSpace:
    return design_space(name, depths=(1, 2), widths=(8, 16, 24),
                        bottleneck_ratios=(1, 0.5, 0.25), group_widths=(1, 2, 4, 8),
                        num_stages=2, **overrides)


def enumerate_points(space: AnyNetSpace) -> set:
    """Every valid network of a small AnyNet space, by brute force."""
    points = set()
    per_stage = itertools.product(space.depths, space.widths, space.bottleneck_ratios,
                                  space.group_widths)
    for stages in itertools.product(list(per_stage), repeat=space.num_stages):
        try:
            net = AnyNetParams(*zip(*stages), se_ratio=space.se_ratio)
        except DegenerateNetworkError:
            continue
        if space.contains(net):
            points.add(net)
    return points


@pytest.mark.parametrize("name", [n for n in SPACE_NAMES if n.startswith("anynetx")])
def test_anynet_size_counts_every_point_and_sampling_is_uniform(name):
    space = tiny_anynet(name)
    points = enumerate_points(space)
    assert space.size() == len(points)
    draws = 40 * len(points) if len(points) < 400 else 4000
    counts = collections.Counter(space.sample(draws, seed=11))
    assert set(counts) <= points
    if len(points) < 400:  # every point drawn, none far more often than the others
        assert set(counts) == points
        expected = draws / len(points)
        chi2 = sum((counts[p] - expected) ** 2 / expected for p in points)
        dof = len(points) - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


def test_paper_anynetx_a_size_is_below_the_unadjusted_count():
    a = design_space("anynetx_a")
    paper = (16 * 128 * 3 * 6) ** 4  # the paper's count, ~1.8e18, before group compatibility
    assert 1e17 < a.size() < paper
    sizes = [design_space(n).size() for n in SPACE_NAMES if n.startswith("anynetx")]
    assert sizes == sorted(sizes, reverse=True)  # every refinement shrinks the space


def test_regnet_size_is_the_parameter_grid():
    space = design_space("regnetx", depth_range=(3, 5), w0_range=(8, 24), wa_range=(1, 1.05),
                         wm_range=(2, 2.02), num_stages=None)
    # depths 3..5, w0 8/16/24, wa 1.01..1.04 (open ends), wm 2.00..2.02, b 3 values, g 6
    assert space.size() == 3 * 3 * 4 * 3 * 3 * 6
    draws = space.sample(300, seed=0)
    assert {round(n.wa, 2) for n in draws} == {1.01, 1.02, 1.03, 1.04}
    assert {n.wm for n in draws} == {2.0, 2.01, 2.02}


def test_regime_restricts_complexity():
    space = design_space("anynetx_c", depths=range(1, 5), widths=range(8, 129, 8))
    low, high = 1e6, 3e6
    regime = space.restrict(flops=(low, high), params=(0, 2e5), resolution=32, num_classes=10)
    nets = regime.sample(30, seed=5)
    for net in nets:
        counts = complexity(net, 32, 10)
        assert low <= counts["flops"] <= high and counts["params"] <= 2e5
        assert space.contains(net)
    unrestricted = [complexity(n, 32, 10)["flops"] for n in space.sample(30, seed=5)]
    assert not all(low <= f <= high for f in unrestricted)  # the regime did something
    with pytest.raises(RuntimeError, match="too narrow"):
        space.restrict(flops=(1, 2), resolution=32).sample(2, seed=0, max_draws=200)


def test_sampled_models_build_reference_and_fused_alike():
    space = design_space("anynetx_a", depths=range(1, 3), widths=range(8, 65, 8), se_ratio=0.25)
    net = space.restrict(flops=(2e5, 2e6), resolution=32, num_classes=7).sample(1, seed=2)[0]
    reference = space.build(net, fused=False, num_classes=7)
    fused = space.build(net, num_classes=7)
    assert type(fused) is type(fused_model(net, num_classes=7))
    fused.load_state_dict(reference.state_dict())
    assert sum(p.numel() for p in reference.parameters()) == complexity(net, 32, 7)["params"]
    x = torch.randn(3, 3, 32, 32)
    reference.train(), fused.train()
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)
    # per-stage bottleneck ratios reach the blocks
    for stage, module in zip(net.stages(), reference.trunk_output):
        assert module[0].f.b[0].out_channels == stage.bottleneck_width


def test_anynet_params_round_trip_through_json_and_the_builders():
    net = AnyNetParams([1, 2, 1, 1], [16, 32, 48, 64], [1, 0.5, 0.25, 1], [4, 8, 4, 16])
    fields = json.loads(json.dumps(dataclasses.asdict(net)))
    assert params_from_dict(fields) == net
    assert reference_model(net, num_classes=3).fc.in_features == 64


@pytest.mark.parametrize("call, field", [
    (lambda: design_space("anynetx_z"), "space"),
    (lambda: design_space("anynetx_a", depths=[]), "depths"),
    (lambda: design_space("anynetx_a", widths=[8, -8]), "widths"),
    (lambda: design_space("anynetx_a", colour=3), "colour"),
    (lambda: design_space("regnetx", wm_range=(0.5, 3)), "wm_range"),
    (lambda: design_space("regnetx", w0_range=(1, 7)), "w0_range"),
    (lambda: design_space("anynetx_a").restrict(flops=(3, 1)), "flops"),
    (lambda: design_space("anynetx_a").sample(-1), "n"),
    (lambda: AnyNetParams((1, 1), (8,), (1, 1), (8, 8)), "widths"),
    (lambda: AnyNetParams((1,), (8,), (0.3,), (1,)), "stage 1"),
    (lambda: AnyNetParams((1,), (8,), (1,), (16,)), "group width 16"),
    (lambda: AnyNetParams((0,), (8,), (1,), (8,)), "depths"),
])
def test_bad_input_raises_value_error_naming_it(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# ---------------------------------------------------------------------------
# analysis: EDF, normalization, KS, quantized linear fit
# ---------------------------------------------------------------------------


def random_errors(rng, n):
    # rounded so that ties (equal errors, as a small val set gives) occur
    return np.round(rng.uniform(0.2, 0.8, size=n), 2)


def test_edf_equals_numpy():
    rng = np.random.default_rng()
    for _ in range(20):
        errors = random_errors(rng, int(rng.integers(1, 60)))
        at = np.concatenate([errors, rng.uniform(0, 1, size=30)])
        expected = np.array([np.mean(errors < e) for e in at])
        np.testing.assert_allclose(error_edf(errors, at), expected, rtol=0, atol=1e-12)
        weights = rng.uniform(0, 2, size=errors.size)
        expected = np.array([np.sum(weights * (errors < e)) / weights.sum() for e in at])
        np.testing.assert_allclose(error_edf(errors, at, weights), expected, atol=1e-12)


def plain_ks(a, b, wa=None, wb=None):
    """sup over a dense grid (every sample, and points between and around them)."""
    wa = np.full(a.size, 1 / a.size) if wa is None else wa / wa.sum()
    wb = np.full(b.size, 1 / b.size) if wb is None else wb / wb.sum()
    pooled = np.unique(np.concatenate([a, b]))
    grid = np.concatenate([pooled, pooled + 1e-9, pooled - 1e-9,
                           (pooled[1:] + pooled[:-1]) / 2])
    fa = np.array([np.sum(wa * (a < e)) for e in grid])
    fb = np.array([np.sum(wb * (b < e)) for e in grid])
    return np.max(np.abs(fa - fb))


def test_ks_distance_equals_numpy():
    rng = np.random.default_rng()
    for _ in range(20):
        a = random_errors(rng, int(rng.integers(1, 50)))
        b = random_errors(rng, int(rng.integers(1, 50))) + rng.choice([0, 0.05])
        assert math.isclose(ks_distance(a, b), plain_ks(a, b), abs_tol=1e-12)
        wa, wb = rng.uniform(0.1, 1, a.size), rng.uniform(0.1, 1, b.size)
        assert math.isclose(ks_distance(a, b, wa, wb), plain_ks(a, b, wa, wb), abs_tol=1e-12)


def test_ks_bootstrap_brackets_and_separates():
    rng = np.random.default_rng()
    a, b = rng.uniform(0.1, 0.2, 30), rng.uniform(0.5, 0.6, 20)
    result = ks_bootstrap(a, b, resamples=200, seed=1)
    assert result.distance == result.low == result.high == 1.0
    same = rng.uniform(0, 1, 40)
    assert ks_bootstrap(same, same, resamples=50).distance == 0.0
    c, d = rng.normal(0.3, 0.05, 40), rng.normal(0.33, 0.05, 40)
    result = ks_bootstrap(c, d, resamples=300, seed=2)
    assert 0 <= result.low <= result.high <= 1 and result.high > result.low
    assert result == ks_bootstrap(c, d, resamples=300, seed=2)


def test_complexity_weights_even_out_the_bins():
    rng = np.random.default_rng()
    flops = np.exp(rng.uniform(np.log(1e6), np.log(1e8), 50))
    edges = complexity_bin_edges(flops, 4)
    weights = complexity_weights(flops, edges)
    bins = np.clip(np.digitize(flops, edges) - 1, 0, 3)
    assert math.isclose(weights.sum(), 1)
    per_bin = [weights[bins == k].sum() for k in np.unique(bins)]
    np.testing.assert_allclose(per_bin, 1 / len(per_bin))
    with pytest.raises(ValueError, match="outside the bins"):
        complexity_weights([1e9], edges)


@pytest.mark.parametrize("name", list_models()[:24])
def test_fit_recovers_the_paper_models(name):
    params = model_params(name)
    widths = params.block_widths()
    fit = fit_quantized_linear(widths)
    assert fit.e_fit == 0 and list(fit.widths) == widths
    assert fit.w0 == params.w0
    assert abs(fit.wm - params.wm) <= 0.01 + 1e-9
    assert fit.wa_range[0] <= params.wa <= fit.wa_range[1]
    assert fit.wm_range[0] - 1e-9 <= params.wm <= fit.wm_range[1] + 1e-9
    assert abs(fit.wa - params.wa) / params.wa < 0.1
    assert RegNetParams(params.depth, fit.w0, fit.wa, fit.wm, 8).block_widths() == widths


def test_fit_of_random_regnets_is_exact_and_of_anynets_is_not():
    rng = np.random.default_rng()
    for _ in range(5):
        params = sample_params(rng)
        fit = fit_quantized_linear(params.block_widths())
        assert fit.e_fit == 0
        np.testing.assert_array_equal(
            quantized_linear_widths(params.depth, fit.w0, fit.wa, fit.wm), params.block_widths())
    # widths going down then up: no quantized linear function makes them
    fit = fit_quantized_linear([64, 64, 32, 32, 128, 128])
    assert fit.e_fit > 0.1


# ---------------------------------------------------------------------------
# the study runner, end to end
# ---------------------------------------------------------------------------

TINY_TRAIN = ["--data", "synthetic", "--synthetic-images", "24", "--num-classes", "3",
              "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0.5", "--threads", "1"]


def test_six_model_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    populations = {
        "anynetx_e": ["--set", "depths=1:2", "--set", "widths=8:32:8"],
        "regnetx": ["--set", "depth_range=[2,5]", "--set", "w0_range=[8,24]",
                    "--set", "wa_range=[0,16]"],
    }
    for space, ranges in populations.items():
        assert main(["designspace", "sample", "--space", space, "--n", "3", "--seed", "1",
                     "--resolution", "16", "--num-classes", "3", *ranges,
                     "--out", str(tmp_path / f"{space}.json")]) == 0
        population = json.loads((tmp_path / f"{space}.json").read_text())
        assert len(population["models"]) == 3 and population["space"] == space
        for model in population["models"]:
            net = params_from_dict(model["params"])
            assert model["complexity"] == complexity(net, 16, 3)
    capsys.readouterr()

    for space in populations:
        assert main(["designspace", "train", str(tmp_path / f"{space}.json"), *TINY_TRAIN]) == 0
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 6 and all("trained in" in line for line in progress)

    # a model whose run was cut after its checkpoint resumes; the others are not retrained
    run = tmp_path / "regnetx" / "regnetx-001"
    (run / "metrics.json").unlink()
    before = (tmp_path / "regnetx" / "regnetx-000" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["designspace", "train", str(tmp_path / "regnetx.json"), *TINY_TRAIN]) == 0
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert ["done before" in line for line in progress] == [True, False, True]
    assert "resumed from" in (run / "train.log").read_text()
    assert (tmp_path / "regnetx" / "regnetx-000" / "checkpoint.pt").stat().st_mtime_ns == before

    results = [load_results(tmp_path / space) for space in populations]
    for result in results:
        for model in result["models"]:
            metrics = json.loads((tmp_path / result["space"] / model["id"] /
                                  "metrics.json").read_text())
            assert model["metric"] == "train_top1"  # the synthetic set has no val split
            assert model["error"] == pytest.approx(1 - metrics["train_top1"])
    curves, summary = edf_tables(results, list(populations), resamples=50)
    assert [row[0] for row in summary] == list(populations)
    errors = {space: np.array([m["error"] for m in r["models"]])
              for space, r in zip(populations, results)}
    assert summary[1][5] == pytest.approx(ks_distance(errors["anynetx_e"], errors["regnetx"]))
    assert len(curves) == 6 and all(0 < row[5] <= 1 for row in curves)

    out = tmp_path / "edf.png"
    edf_command = ["designspace", "edf", str(tmp_path / "anynetx_e"),
                   str(tmp_path / "regnetx"), "--resamples", "50", "--out", str(out)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # matplotlib is optional: a clear error, and nothing written
        assert main(edf_command) == 2
        assert "matplotlib" in capsys.readouterr().err and not out.exists()
        return
    assert main(edf_command) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["population"] for r in rows} == set(populations)


def test_a_longer_population_keeps_the_shorter_ones_models(tmp_path):
    def sample(n):
        out = tmp_path / f"{n}.json"
        assert main(["designspace", "sample", "--space", "regnety", "--n", str(n), "--seed",
                     "7", "--out", str(out)]) == 0
        return json.loads(out.read_text())["models"]
    short, long = sample(4), sample(12)
    assert short == long[:4]
    assert len({m["id"] for m in long}) == 12


def test_edf_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code = main(["designspace", "edf", str(tmp_path), "--out", str(tmp_path / "e.png")])
    assert code == 2 and "matplotlib" in capsys.readouterr().err


def test_study_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": [{"params": {"depth": 0}}]}')
    assert main(["designspace", "train", str(bad), *TINY_TRAIN]) == 2
    assert "not a population" in capsys.readouterr().err
    assert main(["designspace", "sample", "--space", "anynetx_a", "--n", "2",
                 "--set", "depths", "--out", str(tmp_path / "p.json")]) == 2
    assert "name=value" in capsys.readouterr().err
    assert main(["designspace", "sample", "--space", "anynetx_a", "--n", "2",
                 "--set", "widths=[]", "--out", str(tmp_path / "p.json")]) == 2
    assert "widths" in capsys.readouterr().err


def read_png(data: bytes) -> np.ndarray:
    """[H, W, 3] pixels of an 8-bit RGB PNG without filters (what the generator writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, offset = {}, 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[offset + 8 + length:
                                                                    offset + 12 + length])[0]
        chunks[kind] = chunks.get(kind, b"") + body
        offset += 12 + length
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:].reshape(height, width, 3)


def test_procedural_shapes_are_deterministic_valid_pngs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "procedural_shapes.py"
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(script), str(tmp_path / out), "--classes", "3",
                        "--train", "2", "--val", "1", "--size", "24", "--seed", "5"],
                       check=True, capture_output=True, timeout=120)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 3 * (2 + 1)
    assert {f.parts[0] for f in files} == {"train", "val"}
    assert len({f.parts[1] for f in files}) == 3
    images = []
    for f in files:
        data = (tmp_path / "a" / f).read_bytes()
        assert data == (tmp_path / "b" / f).read_bytes()
        images.append(read_png(data))
        assert images[-1].shape == (24, 24, 3) and images[-1].std() > 10
    assert len({image.tobytes() for image in images}) == len(images)
