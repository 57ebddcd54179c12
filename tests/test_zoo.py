import pytest

from regnet_kernels import RegNetParams, list_models, model_params
from regnet_kernels.zoo import UnknownModelError, canonical_name, resolve_params, zoo_entry

PAPER_SIZES = ["200mf", "400mf", "600mf", "800mf", "1_6gf", "3_2gf", "4gf", "6_4gf", "8gf",
               "12gf", "16gf", "32gf"]
PAPER_MODELS = [f"regnet{f}_{s}" for f in "xy" for s in PAPER_SIZES] + [
    "regnety_64gf", "regnety_128gf", "regnety_256gf"]
TORCHVISION_MODELS = [
    f"regnet_x_{s}" for s in ["400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf"]
] + [f"regnet_y_{s}" for s in ["400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf"]]
TORCHVISION_DIFFERS = {"regnet_x_400mf", "regnet_y_800mf", "regnet_y_8gf"}


def test_list_models_is_exactly_the_paper_and_torchvision_models():
    assert list_models() == PAPER_MODELS + TORCHVISION_MODELS


@pytest.mark.parametrize(
    "name, d, w0, wa, wm, g",
    [
        ("regnetx_200mf", 13, 24, 36.44, 2.49, 8),
        ("regnetx_1_6gf", 18, 80, 34.01, 2.25, 24),
        ("regnetx_32gf", 23, 320, 69.86, 2.0, 168),
        ("regnety_8gf", 17, 192, 76.82, 2.19, 56),
        ("regnety_32gf", 20, 232, 115.89, 2.53, 232),
        ("regnety_128gf", 27, 456, 160.83, 2.52, 264),
        ("regnety_640", 20, 352, 147.48, 2.4, 328),  # timm's names
        ("regnety_2560", 27, 640, 230.83, 2.53, 373),
    ],
)
def test_published_configurations(name, d, w0, wa, wm, g):
    params = model_params(name)
    assert (params.depth, params.w0, params.wa, params.wm, params.group_width) == (d, w0, wa, wm, g)
    assert params.bottleneck_ratio == 1.0 and params.stem_width == 32
    assert params.se_ratio == (0.25 if name.startswith("regnety") else 0.0)
    assert params.rounding == "pycls"


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_names_build_the_same_config_with_torchvision_rounding(name):
    tv = model_params(name)
    paper = model_params(name.replace("regnet_x_", "regnetx_").replace("regnet_y_", "regnety_"))
    assert tv.rounding == "torchvision"
    assert tv == RegNetParams(**{**paper.__dict__, "rounding": "torchvision"})
    same_widths = [s.width for s in tv.stages()] == [s.width for s in paper.stages()]
    assert same_widths == (name not in TORCHVISION_DIFFERS)


def test_rounding_rules_agree_for_regnety_128gf():
    pycls, tv = model_params("regnety_128gf"), model_params("regnet_y_128gf")
    assert pycls.stages() == tv.stages()
    assert [s.width for s in tv.stages()] == [528, 1056, 2904, 7392]


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("regnetx_1.6gf", "regnetx_1_6gf"),
        ("regnetx_4.0gf", "regnetx_4gf"),
        ("regnetx_8.0gf", "regnetx_8gf"),
        ("REGNETY_6.4GF", "regnety_6_4gf"),
        ("  RegNetY_8GF ", "regnety_8gf"),
        ("RegNetY-8.0GF", "regnety_8gf"),
        ("RegNetX-400MF", "regnetx_400mf"),
        ("RegNetX-12GF", "regnetx_12gf"),
        ("regnety_080", "regnety_8gf"),
        ("regnetx_002", "regnetx_200mf"),
        ("regnetx_016", "regnetx_1_6gf"),
        ("regnety_320", "regnety_32gf"),
        ("regnety_1280", "regnety_128gf"),
        ("regnetx_004_tv", "regnet_x_400mf"),
        ("regnety_008_tv", "regnet_y_800mf"),
        ("regnety_080_tv", "regnet_y_8gf"),
        ("REGNET_Y_8GF", "regnet_y_8gf"),
    ],
)
def test_aliases_resolve_to_canonical_models(alias, canonical):
    assert canonical_name(alias) == canonical
    assert model_params(alias) == model_params(canonical)


def test_timm_tv_variants_are_torchvision_widths():
    assert [s.width for s in model_params("regnety_080_tv").stages()] == [224, 448, 896, 2016]
    assert [s.width for s in model_params("regnety_080").stages()] == [168, 448, 896, 2016]


def test_every_alias_names_one_model():
    seen = {}
    for name in list_models():
        for spelling in (name, *zoo_entry(name).aliases):
            assert seen.setdefault(spelling.lower(), name) == name
    assert len(seen) > 2 * len(list_models())


@pytest.mark.parametrize("typo, suggestion", [("regnety_8g", "regnety_8gf"),
                                              ("regnet_y_8gff", "regnet_y_8gf"),
                                              ("regnetx_1.6g", "regnetx_1_6gf")])
def test_unknown_name_suggests_close_names(typo, suggestion):
    with pytest.raises(KeyError) as raised:
        model_params(typo)
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, UnknownModelError)
    message = str(raised.value)
    assert repr(typo) in message and suggestion in message and "did you mean" in message


def test_unknown_name_without_close_match_still_explains():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        model_params("resnet50")


def test_resolve_params_accepts_params_or_names():
    params = model_params("regnety_400mf")
    assert resolve_params(params) is params
    assert resolve_params("RegNetY-400MF") == params


@pytest.mark.parametrize("timm_name,canonical,params_m", [
    ("regnety_640", "regnety_64gf", 281.38), ("regnety_2560", "regnety_256gf", 1282.6)])
def test_timm_seer_models_have_names(timm_name, canonical, params_m):
    """timm's largest RegNetYs, with the parameter counts timm publishes for them."""
    from regnet_kernels import complexity
    assert canonical_name(timm_name) == canonical
    assert complexity(timm_name)["params"] / 1e6 == pytest.approx(params_m, abs=0.05)


@pytest.mark.parametrize("bad", [None, 42, 3.5])
def test_a_name_that_is_not_a_string_is_a_type_error(bad):
    from regnet_kernels import fused_model, reference_model
    for build in (fused_model, reference_model, model_params):
        with pytest.raises(TypeError, match=f"got {bad!r} \\({type(bad).__name__}\\)"):
            build(bad)
