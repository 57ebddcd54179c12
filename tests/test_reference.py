import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regnet_kernels import model_params, reference_model, sample_params
from regnet_kernels.models import Head, RegNet, ResBottleneckBlock, Stem

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# Stage (width, depth) and group width, from the published networks.
TORCHVISION_Y_400MF = ([(48, 1), (104, 3), (208, 6), (440, 6)], 8, 0.25)
PAPER_X_200MF = ([(24, 1), (56, 1), (152, 4), (368, 7)], 8, 0.0)


def bn_shapes(prefix, channels):
    return {f"{prefix}.{suffix}": () if suffix == "num_batches_tracked" else (channels,)
            for suffix in BN_SUFFIXES}


def torchvision_layout(stages, group_width, se_ratio, num_classes=1000):
    """Key -> shape of a torchvision RegNet state dict, in torchvision's order."""
    layout = {"stem.0.weight": (32, 3, 3, 3), **bn_shapes("stem.1", 32)}
    w_in = 32
    for s, (width, depth) in enumerate(stages, start=1):
        for b in range(depth):
            block = f"trunk_output.block{s}.block{s}-{b}"
            if b == 0:
                layout[f"{block}.proj.0.weight"] = (width, w_in, 1, 1)
                layout.update(bn_shapes(f"{block}.proj.1", width))
            layout[f"{block}.f.a.0.weight"] = (width, w_in, 1, 1)
            layout.update(bn_shapes(f"{block}.f.a.1", width))
            layout[f"{block}.f.b.0.weight"] = (width, group_width, 3, 3)
            layout.update(bn_shapes(f"{block}.f.b.1", width))
            if se_ratio:
                se = round(w_in * se_ratio)
                layout[f"{block}.f.se.fc1.weight"] = (se, width, 1, 1)
                layout[f"{block}.f.se.fc1.bias"] = (se,)
                layout[f"{block}.f.se.fc2.weight"] = (width, se, 1, 1)
                layout[f"{block}.f.se.fc2.bias"] = (width,)
            layout[f"{block}.f.c.0.weight"] = (width, width, 1, 1)
            layout.update(bn_shapes(f"{block}.f.c.1", width))
            w_in = width
    layout["fc.weight"] = (num_classes, w_in)
    layout["fc.bias"] = (num_classes,)
    return layout


@pytest.mark.parametrize(
    "name, spec", [("regnet_y_400mf", TORCHVISION_Y_400MF), ("regnetx_200mf", PAPER_X_200MF)]
)
def test_state_dict_is_torchvision_layout(name, spec):
    expected = torchvision_layout(*spec)
    model = reference_model(name)
    actual = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert list(actual) == list(expected)
    assert actual == expected
    # A torchvision-layout state dict loads strictly.
    torchvision_state = {key: torch.randn(shape) if shape else torch.tensor(7)
                         for key, shape in expected.items()}
    model.load_state_dict(torchvision_state, strict=True)
    assert torch.equal(model.fc.weight, torchvision_state["fc.weight"])


@pytest.mark.parametrize("name", ["regnetx_200mf", "regnety_200mf", "regnet_x_400mf",
                                  "regnet_y_800mf", "regnety_600mf"])
def test_forward_gives_logits(name):
    model = reference_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 7)
    logits = model.train()(x)
    logits.sum().backward()
    assert logits.shape == (2, 7)
    assert all(p.grad is not None for p in model.parameters())


def test_sampled_params_build_and_run():
    for seed in range(3):
        params = sample_params(seed, se_ratio=0.25)
        model = reference_model(params, num_classes=5).eval()
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)
        assert len(list(model.trunk_output)) == 4


def test_module_structure():
    params = model_params("regnety_200mf")
    model = reference_model(params)
    assert isinstance(model.stem, nn.Sequential)
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    stem_conv = model.stem[0]
    assert (stem_conv.stride, stem_conv.padding, stem_conv.bias) == ((2, 2), (1, 1), None)
    stage_names = [name for name, _ in model.trunk_output.named_children()]
    assert stage_names == ["block1", "block2", "block3", "block4"]
    blocks = [m for m in model.modules() if isinstance(m, ResBottleneckBlock)]
    specs = list(params.blocks())
    assert len(blocks) == len(specs) == params.depth
    for block, spec in zip(blocks, specs):
        assert (block.w_in, block.w_out, block.stride, block.group_width, block.se_width) == (
            spec.w_in, spec.w_out, spec.stride, spec.group_width, spec.se_width)
        a, b, c = block.f.a, block.f.b, block.f.c
        assert [type(m) for m in a] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
        assert [type(m) for m in b] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
        assert [type(m) for m in c] == [nn.Conv2d, nn.BatchNorm2d]
        assert (a[0].kernel_size, a[0].stride) == ((1, 1), (1, 1))
        assert (b[0].kernel_size, b[0].stride, b[0].padding) == ((3, 3), (spec.stride,) * 2, (1, 1))
        assert b[0].groups == b[0].out_channels // spec.group_width
        assert block.f.se.fc1.out_channels == spec.se_width
        assert block.f.se.fc1.bias is not None and block.f.se.fc2.bias is not None
        assert (block.proj is None) == (spec.w_in == spec.w_out and spec.stride == 1)
        if block.proj is not None:
            assert [type(m) for m in block.proj] == [nn.Conv2d, nn.BatchNorm2d]
            assert block.proj[0].stride == (spec.stride,) * 2
        bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all((bn.eps, bn.momentum) == (1e-5, 0.1) for bn in bns)
    x_block = reference_model("regnetx_200mf").trunk_output.block1[0]
    assert not hasattr(x_block.f, "se") and x_block.se_width == 0


def test_block_constructor_takes_keywords():
    block = ResBottleneckBlock(w_in=32, w_out=64, stride=2, group_width=16, bottleneck_ratio=0.5,
                               se_width=8)
    assert block.f.b[0].out_channels == 32 and block.f.b[0].groups == 2
    assert block(torch.randn(1, 32, 8, 8)).shape == (1, 64, 4, 4)


def test_builder_takes_stem_block_and_head_types():
    class CountingBlock(ResBottleneckBlock):
        built = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            CountingBlock.built += 1

    class MyStem(Stem):
        pass

    class MyHead(Head):
        pass

    params = model_params("regnetx_200mf")
    model = RegNet(params, num_classes=3, stem=MyStem, block=CountingBlock, head=MyHead)
    assert CountingBlock.built == params.depth
    assert isinstance(model.stem, MyStem) and isinstance(model.fc, MyHead)
    assert set(model.state_dict()) == set(reference_model(params, num_classes=3).state_dict())


def randomize_batchnorm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def functional_y_block(x, sd, prefix, stride, groups):
    """RegNet Y block written out with torch.nn.functional, from a state dict."""

    def bn(t, name):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                            sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, 1e-5)

    p = prefix
    a = F.relu(bn(F.conv2d(x, sd[f"{p}.f.a.0.weight"]), f"{p}.f.a.1"))
    b = F.relu(bn(F.conv2d(a, sd[f"{p}.f.b.0.weight"], stride=stride, padding=1, groups=groups),
                  f"{p}.f.b.1"))
    squeezed = b.mean(dim=(2, 3), keepdim=True)
    hidden = F.relu(F.conv2d(squeezed, sd[f"{p}.f.se.fc1.weight"], sd[f"{p}.f.se.fc1.bias"]))
    gate = torch.sigmoid(F.conv2d(hidden, sd[f"{p}.f.se.fc2.weight"], sd[f"{p}.f.se.fc2.bias"]))
    c = bn(F.conv2d(b * gate, sd[f"{p}.f.c.0.weight"]), f"{p}.f.c.1")
    if f"{p}.proj.0.weight" in sd:
        shortcut = bn(F.conv2d(x, sd[f"{p}.proj.0.weight"], stride=stride), f"{p}.proj.1")
    else:
        shortcut = x
    return F.relu(shortcut + c)


@pytest.mark.parametrize("stage, index", [("block2", 0), ("block3", 1)])
def test_y_block_equals_functional_forward(stage, index):
    torch.manual_seed(0)
    model = randomize_batchnorm(reference_model("regnety_200mf")).eval()
    block = getattr(model.trunk_output, stage)[index]
    prefix = f"trunk_output.{stage}.{stage}-{index}"
    sd = model.state_dict()
    x = torch.randn(2, block.w_in, 9, 9)
    expected = functional_y_block(x, sd, prefix, block.stride, block.f.b[0].groups)
    with torch.no_grad():
        actual = block(x)
    assert (block.proj is not None) == (index == 0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_initialization_matches_torchvision():
    torch.manual_seed(0)
    model = reference_model("regnety_400mf")
    conv = model.trunk_output.block4[1].f.b[0]  # grouped: 440 out, 8 in per group, 3x3
    expected_std = math.sqrt(2.0 / (3 * 3 * 440))  # fan_out, not divided by the 55 groups
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=expected_std / 20)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(model.fc.bias) == 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # SE conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in torchvision.
    fc1 = model.trunk_output.block4[1].f.se.fc1
    bound = 1 / math.sqrt(fc1.in_channels)
    assert torch.count_nonzero(fc1.bias) > 0 and fc1.bias.abs().max() <= bound
