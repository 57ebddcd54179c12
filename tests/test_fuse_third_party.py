"""fuse() on other libraries' RegNets: torchvision's (rebuilt here with its module classes,
names and forwards, since torchvision is not installed beside this torch), and what it says
for models it cannot fuse; the fused model reports the backend it resolves to."""
import copy
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import regnet_kernels as rk
from blocks import OpRecorder
from numerics import randomize_bn, rel_err

TINY = rk.RegNetParams(depth=4, w0=24, wa=24, wm=2.0, group_width=8, se_ratio=0.25)


# torchvision.models.regnet's classes (torchvision 0.2x), with their names, children and
# forwards: Conv2dNormActivation is a Sequential (conv, norm, activation).
def Conv2dNormActivation(w_in, w_out, k, stride=1, groups=1, activation=True):
    layers = [nn.Conv2d(w_in, w_out, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(w_out)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if activation else []))


class SimpleStemIN(nn.Sequential):
    def __init__(self, w_in, w_out):
        super().__init__(*Conv2dNormActivation(w_in, w_out, 3, stride=2))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze_channels, activation=nn.ReLU):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = activation()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class ResBottleneckBlock(nn.Module):
    def __init__(self, w_in, w_out, stride, group_width, se_width, activation=nn.ReLU):
        super().__init__()
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = Conv2dNormActivation(w_in, w_out, 1, stride, activation=False)
        layers = OrderedDict(a=Conv2dNormActivation(w_in, w_out, 1),
                             b=Conv2dNormActivation(w_out, w_out, 3, stride,
                                                    groups=w_out // group_width))
        if se_width:
            layers["se"] = SqueezeExcitation(w_out, se_width)
        layers["c"] = Conv2dNormActivation(w_out, w_out, 1, activation=False)
        self.f = nn.Sequential(layers)  # torchvision's BottleneckTransform
        self.activation = activation(inplace=True)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    def __init__(self, params, num_classes=10, block_activation=nn.ReLU):
        super().__init__()
        self.stem = SimpleStemIN(3, params.stem_width)
        stages = OrderedDict()
        for stage in params.stages():
            stages[f"block{stage.index + 1}"] = nn.Sequential(OrderedDict(
                (f"block{b.stage_index + 1}-{b.block_index}",
                 ResBottleneckBlock(b.w_in, b.w_out, b.stride, b.group_width, b.se_width,
                                    block_activation))
                for b in stage.blocks()))
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(params.stages()[-1].width, num_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.trunk_output(self.stem(x))).flatten(1))


def torchvision_like(params=TINY):
    reference = rk.reference_model(params, num_classes=10)
    randomize_bn(reference, torch.Generator().manual_seed(0))
    model = RegNet(params)
    model.load_state_dict(reference.state_dict())  # the same keys and shapes
    return model.eval()


def test_fuse_a_torchvision_regnet():
    model = torchvision_like()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(x)
        assert rk.fuse(model) is model
        with OpRecorder() as rec:
            fused = model(x)
    assert rel_err(fused, eager) < 1e-5
    assert "regnet_kernels.conv1x1_gate_residual" in rec.ops
    assert not [op for op in rec.ops if "conv" in op and not op.startswith("regnet_kernels.")]
    assert rk.resolved_backend(model, "cpu") == "cpu"

    x_grad = x.clone().requires_grad_()  # training: the fused training ops, same gradients
    reference = rk.unfuse(copy.deepcopy(model))
    x_ref = x.clone().requires_grad_()
    model.train()(x_grad).sum().backward()
    reference.train()(x_ref).sum().backward()
    assert rel_err(x_grad.grad, x_ref.grad) < 1e-5

    rk.unfuse(model)
    assert type(model.stem) is SimpleStemIN
    assert type(model.trunk_output.block1[0]) is ResBottleneckBlock


def test_a_lookalike_block_with_another_activation_is_refused():
    model = RegNet(TINY, block_activation=nn.SiLU)
    with pytest.raises(ValueError, match=r"fuse: trunk_output\.block1\.block1-0 "
                                         r"\(.*ResBottleneckBlock\) is not what the fused ops "
                                         r"compute: its output activation SiLU.* is not a ReLU"):
        rk.fuse(model)
    assert type(model.stem) is SimpleStemIN, "nothing is converted when fuse raises"


def test_nothing_to_fuse_is_an_error():
    timm_like = nn.Sequential(OrderedDict(stem=nn.Sequential(nn.Conv2d(3, 8, 3)),
                                          s1=nn.Sequential(nn.Conv2d(8, 8, 1))))
    with pytest.raises(ValueError, match="fuse: found no RegNet stem or block in Sequential.*"
                                         "rk.load_checkpoint"):
        rk.fuse(timm_like)


def test_resolved_backend_and_repr():
    model = rk.fused_model(TINY)
    assert rk.resolved_backend(model, "cpu") == "cpu"
    assert rk.resolved_backend(model, torch.device("cuda")) in ("triton", "cuda")
    assert "backend='auto' (CPU tensors: 'cpu', CUDA tensors: " in repr(model)
    on_cpu = rk.fused_model(TINY, backend="cpu")
    assert "backend='cpu'" in repr(on_cpu)
    with pytest.raises(RuntimeError, match="backend='cpu' runs CPU tensors"):
        rk.resolved_backend(on_cpu, "cuda")
    with pytest.raises(ValueError, match="resolved_backend: RegNet has no fused modules"):
        rk.resolved_backend(rk.reference_model(TINY), "cpu")


def test_cpp_ops_are_reachable_after_import_regnet_kernels():
    code = "import regnet_kernels as rk; print(callable(rk.ops.cpp.available))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
