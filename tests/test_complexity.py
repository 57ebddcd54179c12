import pytest
import torch
from torch import nn

from regnet_kernels import complexity, reference_model, sample_params

# pycls's published complexity at 224x224: GF (multiply-adds), params M, acts M.
PUBLISHED = {
    "regnetx_200mf": (0.199, 2.685, 2.164),
    "regnetx_400mf": (0.398, 5.158, 3.143),
    "regnetx_600mf": (0.601, 6.196, 3.975),
    "regnetx_800mf": (0.800, 7.260, 5.149),
    "regnetx_1_6gf": (1.603, 9.190, 7.934),
    "regnetx_3_2gf": (3.177, 15.297, 11.367),
    "regnetx_4gf": (3.964, 22.118, 12.202),
    "regnetx_6_4gf": (6.460, 26.209, 16.370),
    "regnetx_8gf": (7.995, 39.573, 14.060),
    "regnetx_12gf": (12.087, 46.106, 21.367),
    "regnetx_16gf": (15.941, 54.279, 25.515),
    "regnetx_32gf": (31.736, 107.812, 36.302),
    "regnety_200mf": (0.200, 3.163, 2.168),
    "regnety_400mf": (0.402, 4.344, 3.892),
    "regnety_600mf": (0.601, 6.055, 4.334),
    "regnety_800mf": (0.797, 6.263, 5.250),
    "regnety_1_6gf": (1.612, 11.202, 8.045),
    "regnety_3_2gf": (3.176, 19.436, 11.263),
    "regnety_4gf": (3.973, 20.647, 12.287),
    "regnety_6_4gf": (6.355, 30.583, 16.407),
    "regnety_8gf": (7.963, 39.180, 17.969),
    "regnety_12gf": (12.092, 51.823, 21.384),
    "regnety_16gf": (15.912, 83.590, 23.041),
    "regnety_32gf": (32.280, 145.047, 30.262),
}

# torchvision's published parameter counts (weights metadata "num_params").
TORCHVISION_NUM_PARAMS = {
    "regnet_x_400mf": 5_495_976,
    "regnet_x_800mf": 7_259_656,
    "regnet_x_1_6gf": 9_190_136,
    "regnet_x_3_2gf": 15_296_552,
    "regnet_x_8gf": 39_572_648,
    "regnet_x_16gf": 54_278_536,
    "regnet_x_32gf": 107_811_560,
    "regnet_y_400mf": 4_344_144,
    "regnet_y_800mf": 6_432_512,
    "regnet_y_1_6gf": 11_202_430,
    "regnet_y_3_2gf": 19_436_338,
    "regnet_y_8gf": 39_381_472,
    "regnet_y_16gf": 83_590_140,
    "regnet_y_32gf": 145_046_770,
    "regnet_y_128gf": 644_812_894,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_paper_models_match_pycls_published_complexity(name):
    counts = complexity(name)
    assert all(type(v) is int for v in counts.values())
    gf, params_m, acts_m = PUBLISHED[name]
    assert round(counts["flops"] / 1e9, 3) == gf
    assert round(counts["params"] / 1e6, 3) == params_m
    assert round(counts["acts"] / 1e6, 3) == acts_m


@pytest.mark.parametrize("name", TORCHVISION_NUM_PARAMS)
def test_torchvision_models_match_torchvision_parameter_counts(name):
    assert complexity(name)["params"] == TORCHVISION_NUM_PARAMS[name]


def test_regnety_128gf():
    assert round(complexity("regnety_128gf")["params"] / 1e6, 3) == 644.813
    # torchvision publishes 127.5 GF at 224 and 374.6 GF at 384.
    assert round(complexity("regnety_128gf")["flops"] / 1e9, 1) == 127.5
    assert round(complexity("regnety_128gf", resolution=384)["flops"] / 1e9, 1) == 374.6


def test_torchvision_y_8gf_is_bigger_than_the_papers():
    paper, tv = complexity("regnety_8gf"), complexity("regnet_y_8gf")
    assert round(paper["params"] / 1e6, 3) == 39.180
    assert round(tv["params"] / 1e6, 3) == 39.381
    assert round(tv["flops"] / 1e9, 2) == 8.47


def test_num_classes_changes_only_the_classifier():
    base, small = complexity("regnetx_200mf"), complexity("regnetx_200mf", num_classes=10)
    assert base["params"] - small["params"] == 368 * 990 + 990
    assert base["acts"] - small["acts"] == 990


def measured_complexity(model: nn.Module, resolution: int) -> dict[str, int]:
    """Count by running the model: conv/linear hooks see the real output shapes."""
    totals = {"flops": 0, "acts": 0}

    def count(module, inputs, output):
        per_output = module.weight[0].numel() + (module.bias is not None)
        outputs = output[0].numel()
        totals["flops"] += per_output * outputs
        totals["acts"] += outputs

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, resolution, resolution))
    for hook in hooks:
        hook.remove()
    totals["params"] = sum(p.numel() for p in model.parameters())
    return totals


@pytest.mark.parametrize(
    "name_or_seed, resolution",
    [("regnetx_200mf", 224), ("regnety_200mf", 65), ("regnet_y_400mf", 97),
     ("regnet_x_400mf", 32), (3, 47), (11, 64)],
)
def test_counts_equal_what_the_reference_model_does(name_or_seed, resolution):
    if isinstance(name_or_seed, int):
        params = sample_params(name_or_seed, se_ratio=0.25 if name_or_seed % 2 else 0.0)
    else:
        params = name_or_seed
    model = reference_model(params)
    assert complexity(params, resolution) == measured_complexity(model, resolution)
