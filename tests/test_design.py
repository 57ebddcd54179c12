import dataclasses

import numpy as np
import pytest

from regnet_kernels import RegNetParams, sample_params
from regnet_kernels.design import SAMPLED_GROUP_WIDTHS, DegenerateNetworkError

X_1_6GF = dict(depth=18, w0=80, wa=34.01, wm=2.25, group_width=24)
Y_8GF = dict(depth=17, w0=192, wa=76.82, wm=2.19, group_width=56, se_ratio=0.25)


def stage_widths(params):
    return [s.width for s in params.stages()]


def test_quantized_linear_rule_rounds_the_tie_half_to_even():
    # 80 * 2.25 / 8 = 22.5 exactly: half-to-even gives 22 * 8 = 176, half-up would give 184.
    assert 80 * 2.25 / 8 == 22.5
    widths = RegNetParams(**X_1_6GF).block_widths()
    assert len(widths) == 18
    assert 176 in widths and 184 not in widths
    assert widths == sorted(widths)
    assert all(w % 8 == 0 for w in widths)


def test_regnetx_1_6gf_stages():
    stages = RegNetParams(**X_1_6GF).stages()
    assert [s.width for s in stages] == [72, 168, 408, 912]
    assert [s.depth for s in stages] == [2, 4, 10, 2]
    assert [s.group_width for s in stages] == [24] * 4
    assert [s.groups for s in stages] == [3, 7, 17, 38]
    assert [s.stride for s in stages] == [2] * 4
    assert [s.w_in for s in stages] == [32, 72, 168, 408]


@pytest.mark.parametrize(
    "config, pycls_widths, torchvision_widths",
    [
        (dict(depth=22, w0=24, wa=24.48, wm=2.54, group_width=16),
         [32, 64, 160, 384], [32, 64, 160, 400]),
        (dict(depth=14, w0=56, wa=38.84, wm=2.4, group_width=16, se_ratio=0.25),
         [64, 128, 320, 768], [64, 144, 320, 784]),
        (Y_8GF, [168, 448, 896, 2016], [224, 448, 896, 2016]),
    ],
    ids=["X-400MF", "Y-800MF", "Y-8GF"],
)
def test_rounding_rules_differ_where_torchvision_differs(config, pycls_widths, torchvision_widths):
    assert stage_widths(RegNetParams(**config)) == pycls_widths
    assert stage_widths(RegNetParams(**config, rounding="torchvision")) == torchvision_widths


def test_group_width_wider_than_the_stage_shrinks_to_a_dense_conv():
    # RegNetX-8.0GF: stage 1 is 80 wide, group width 120 -> one group of 80.
    stage1 = RegNetParams(depth=23, w0=80, wa=49.56, wm=2.88, group_width=120).stages()[0]
    assert (stage1.width, stage1.group_width, stage1.groups) == (80, 80, 1)


def test_blocks_take_se_width_from_the_block_input():
    params = RegNetParams(**Y_8GF)
    blocks = list(params.blocks())
    assert len(blocks) == params.depth
    stages = params.stages()
    for stage in stages:
        in_stage = [b for b in blocks if b.stage_index == stage.index]
        assert [b.block_index for b in in_stage] == list(range(stage.depth))
        first, rest = in_stage[0], in_stage[1:]
        assert (first.w_in, first.stride, first.se_width) == (
            stage.w_in, 2, round(stage.w_in * 0.25))
        assert all((b.w_in, b.stride, b.se_width) == (stage.width, 1, round(stage.width * 0.25))
                   for b in rest)
        assert all(b.w_out == stage.width and b.group_width == 56 for b in in_stage)
    # Stage 1 of Y-8.0GF: stem (32) -> 168; SE widths 8 then 42.
    assert [b.se_width for b in blocks[:2]] == [8, 42]


def test_blocks_without_se_have_se_width_zero():
    assert {b.se_width for b in RegNetParams(**X_1_6GF).blocks()} == {0}


def test_bottleneck_ratio_narrows_the_grouped_conv():
    params = RegNetParams(**X_1_6GF, bottleneck_ratio=0.5)
    for stage in params.stages():
        assert stage.bottleneck_width == round(stage.width * 0.5)
        assert stage.bottleneck_width % stage.group_width == 0


def test_integer_bottleneck_ratio_keeps_widths_integral():
    # pycls rounds the bottleneck width to a multiple of lcm(g, b) for integer b > 1.
    params = RegNetParams(depth=13, w0=24, wa=36.44, wm=2.49, group_width=3, bottleneck_ratio=2.0)
    for stage in params.stages():
        assert stage.bottleneck_width == 2 * stage.width
        assert stage.bottleneck_width % stage.group_width == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("depth", 0), ("depth", 2.5), ("depth", True),
        ("w0", 12), ("w0", 0), ("w0", -8), ("w0", 24.0),
        ("wa", -1.0), ("wa", float("nan")),
        ("wm", 1.0), ("wm", 0.5),
        ("group_width", 0),
        ("bottleneck_ratio", 0.0), ("bottleneck_ratio", -1.0),
        ("se_ratio", -0.1), ("se_ratio", 1.0),
        ("rounding", "half_up"),
        ("stem_width", 0),
    ],
)
def test_invalid_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RegNetParams(**{**X_1_6GF, field: value})


def test_ungroupable_bottleneck_ratio_is_rejected():
    # Stage 2 would get a 127-wide bottleneck, which 16-wide groups do not tile.
    with pytest.raises(DegenerateNetworkError, match="bottleneck_ratio=0.7 gives stage 2 .* 127"):
        RegNetParams(**{**X_1_6GF, "group_width": 16, "bottleneck_ratio": 0.7})


def test_se_ratio_too_small_for_any_channel_is_rejected():
    with pytest.raises(DegenerateNetworkError, match="se_ratio"):
        RegNetParams(**X_1_6GF, se_ratio=0.01)


def test_params_are_frozen_hashable_and_normalized():
    params = RegNetParams(depth=np.int64(18), w0=np.int64(80), wa=np.float64(34.01), wm=2.25,
                          group_width=24)
    assert params == RegNetParams(**X_1_6GF)
    assert hash(params) == hash(RegNetParams(**X_1_6GF))
    assert type(params.depth) is int and type(params.wa) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.depth = 3
    assert dataclasses.replace(params, rounding="torchvision").rounding == "torchvision"


@pytest.mark.parametrize("seed", range(40))
def test_sample_params_draws_valid_four_stage_networks(seed):
    params = sample_params(seed)
    assert 12 <= params.depth <= 28
    assert params.w0 % 8 == 0 and 8 <= params.w0 <= 256
    assert 8 <= params.wa <= 256
    assert 1.5 <= params.wm <= 3
    assert params.group_width in SAMPLED_GROUP_WIDTHS
    assert params.bottleneck_ratio == 1.0 and params.se_ratio == 0.0
    stages = params.stages()
    assert len(stages) == 4
    assert all(s.bottleneck_width % s.group_width == 0 for s in stages)


def test_sample_params_is_reproducible_and_varied():
    assert sample_params(7) == sample_params(7)
    assert sample_params(np.random.default_rng(7)) == sample_params(7)
    assert len({sample_params(seed) for seed in range(20)}) == 20


def test_sample_params_passes_se_and_rounding_through():
    params = sample_params(3, se_ratio=0.25, rounding="torchvision")
    assert params.se_ratio == 0.25 and params.rounding == "torchvision"
    assert all(b.se_width > 0 for b in params.blocks())


def test_sample_params_redraws_degenerate_networks():
    # With se_ratio 0.02 a first stage narrower than 25 gets an SE width of 0 (about 1 draw in
    # 10, 39 times over these seeds): such draws are redone instead of raising.
    for seed in range(100):
        assert all(b.se_width >= 1 for b in sample_params(seed, se_ratio=0.02).blocks())


def test_sample_params_rejects_invalid_arguments_at_once():
    with pytest.raises(ValueError, match="se_ratio"):
        sample_params(0, se_ratio=1.5)
    with pytest.raises(ValueError, match="rounding"):
        sample_params(0, rounding="half_up")


def test_sample_params_gives_up_after_max_tries():
    with pytest.raises(RuntimeError, match="no valid 9-stage network in 5 draws"):
        sample_params(0, num_stages=9, max_tries=5)


def test_sample_params_can_accept_any_stage_count():
    counts = {len(sample_params(seed, num_stages=None).stages()) for seed in range(200)}
    assert 4 in counts and len(counts) > 1
