import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from numerics import rel_err
from regnet_kernels import fused_model, load_checkpoint, reference_model
from regnet_kernels.checkpoints import CheckpointError, detect_layout

# torchvision -> other layouts, written from the published key tables as ordered regex
# rewrites (block-internal parts first, then the block prefix, then stem and head).
TIMM_REWRITES = [
    (r"\.f\.a\.0\.", ".conv1.conv."), (r"\.f\.a\.1\.", ".conv1.bn."),
    (r"\.f\.b\.0\.", ".conv2.conv."), (r"\.f\.b\.1\.", ".conv2.bn."),
    (r"\.f\.c\.0\.", ".conv3.conv."), (r"\.f\.c\.1\.", ".conv3.bn."),
    (r"\.f\.se\.", ".se."),
    (r"\.proj\.0\.", ".downsample.conv."), (r"\.proj\.1\.", ".downsample.bn."),
]
PYCLS_REWRITES = [
    (r"\.f\.([abc])\.0\.", r".f.\1."), (r"\.f\.([abc])\.1\.", r".f.\1_bn."),
    (r"\.f\.se\.fc1\.", ".f.se.f_ex.0."), (r"\.f\.se\.fc2\.", ".f.se.f_ex.2."),
    (r"\.proj\.0\.", ".proj."), (r"\.proj\.1\.", ".bn."),
]
COMMON_REWRITES = [
    (r"^trunk_output\.block(\d+)\.block\d+-(\d+)\.",
     lambda m: f"s{m.group(1)}.b{int(m.group(2)) + 1}."),
    (r"^stem\.0\.", "stem.conv."), (r"^stem\.1\.", "stem.bn."), (r"^fc\.", "head.fc."),
]
REWRITES = {"torchvision": [], "timm": TIMM_REWRITES + COMMON_REWRITES,
            "pycls": PYCLS_REWRITES + COMMON_REWRITES}


def to_layout(state_dict, layout):
    converted = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in REWRITES[layout]:
            key = re.sub(pattern, replacement, key)
        converted[key] = tensor.clone()
    return converted


def trained_like(name):
    """A reference model with random BN statistics and SE biases, in eval mode."""
    model = reference_model(name, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
                m.num_batches_tracked.fill_(1234)
    return model.eval()


def assert_same_weights(model, expected_state):
    actual = model.state_dict()
    assert set(actual) == set(expected_state)
    for key, tensor in expected_state.items():
        assert torch.equal(actual[key], tensor), key


def test_layout_rewrites_produce_the_published_key_names():
    sd = reference_model("regnety_200mf").state_dict()
    assert {"s1.b1.conv1.conv.weight", "s1.b1.se.fc2.bias", "s1.b1.downsample.bn.running_var",
            "stem.conv.weight", "head.fc.bias"} <= set(to_layout(sd, "timm"))
    assert {"s1.b1.f.a.weight", "s1.b1.f.a_bn.weight", "s1.b1.f.se.f_ex.0.weight",
            "s1.b1.f.se.f_ex.2.bias", "s1.b1.proj.weight", "s1.b1.bn.running_mean",
            "stem.bn.bias", "head.fc.weight"} <= set(to_layout(sd, "pycls"))


@pytest.mark.parametrize("name", ["regnety_200mf", "regnetx_200mf"])
@pytest.mark.parametrize("layout", ["torchvision", "timm", "pycls"])
def test_round_trip_in_every_layout(name, layout):
    torch.manual_seed(0)
    source = trained_like(name)
    checkpoint = to_layout(source.state_dict(), layout)
    assert detect_layout(checkpoint) == layout
    target = reference_model(name, num_classes=10).eval()
    result = load_checkpoint(target, checkpoint, bgr_to_rgb=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert result.source == layout
    assert_same_weights(target, source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["torchvision", "timm", "pycls"])
def test_round_trip_through_the_fused_model(layout):
    """A checkpoint in each layout loads into the fused model (C++ CPU backend), which
    then computes the source's outputs and gives back the same state_dict."""
    torch.manual_seed(0)
    source = trained_like("regnety_200mf")
    fused = fused_model("regnety_200mf", backend="cpu", num_classes=10).eval()
    assert load_checkpoint(fused, to_layout(source.state_dict(), layout),
                           bgr_to_rgb=False).source == layout
    assert_same_weights(fused, source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.double()(x.double())
        assert rel_err(fused(x), expected) < 1e-5
    again = reference_model("regnety_200mf", num_classes=10)
    again.load_state_dict(fused.state_dict())
    assert_same_weights(again, fused.state_dict())


@pytest.mark.parametrize("wrapper", ["model_state", "state_dict", "model"])
def test_wrapped_checkpoints(wrapper):
    source = trained_like("regnetx_200mf")
    checkpoint = {"epoch": 100, "cfg": "MODEL:\n  TYPE: regnet\n",
                  wrapper: to_layout(source.state_dict(), "pycls")}
    target = reference_model("regnetx_200mf", num_classes=10)
    assert load_checkpoint(target, checkpoint, bgr_to_rgb=False).source == "pycls"
    assert_same_weights(target, source.state_dict())


def test_pycls_weights_are_flipped_to_rgb_by_default():
    torch.manual_seed(0)
    bgr_model = trained_like("regnety_200mf")
    rgb_model = reference_model("regnety_200mf", num_classes=10).eval()
    load_checkpoint(rgb_model, to_layout(bgr_model.state_dict(), "pycls"))
    assert torch.equal(rgb_model.stem[0].weight, bgr_model.stem[0].weight.flip(1))
    rgb = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # Equal up to summation order inside the stem conv.
        torch.testing.assert_close(rgb_model(rgb), bgr_model(rgb.flip(1)))


@pytest.mark.parametrize("layout, flip, flipped", [
    ("pycls", False, False), ("timm", None, False), ("torchvision", None, False),
    ("torchvision", True, True), ("timm", True, True),
])
def test_bgr_flip_is_explicit_for_other_layouts(layout, flip, flipped):
    source = trained_like("regnetx_200mf")
    target = reference_model("regnetx_200mf", num_classes=10)
    load_checkpoint(target, to_layout(source.state_dict(), layout), bgr_to_rgb=flip)
    expected = source.stem[0].weight.flip(1) if flipped else source.stem[0].weight
    assert torch.equal(target.stem[0].weight, expected)


def test_shape_mismatch_names_the_key_and_both_shapes():
    checkpoint = to_layout(trained_like("regnetx_200mf").state_dict(), "timm")
    checkpoint["head.fc.weight"] = torch.zeros(1000, 368)
    target = reference_model("regnetx_200mf", num_classes=10)
    for strict in (True, False):
        with pytest.raises(CheckpointError,
                           match=r"fc\.weight .*head\.fc\.weight.*\(1000, 368\).*\(10, 368\)"):
            load_checkpoint(target, checkpoint, strict=strict)


def test_wrong_model_is_a_shape_mismatch():
    checkpoint = reference_model("regnety_400mf").state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(reference_model("regnety_200mf"), checkpoint)


def test_unknown_and_missing_keys_are_reported_by_name():
    source = trained_like("regnety_200mf")
    checkpoint = to_layout(source.state_dict(), "timm")
    checkpoint["s1.b1.mystery.weight"] = torch.zeros(3)
    del checkpoint["s4.b2.conv2.bn.running_var"]
    target = reference_model("regnety_200mf", num_classes=10)
    missing = r"trunk_output\.block4\.block4-1\.f\.b\.1\.running_var"
    with pytest.raises(CheckpointError, match=missing + r".*s1\.b1\.mystery\.weight"):
        load_checkpoint(target, checkpoint)
    result = load_checkpoint(target, checkpoint, strict=False)
    assert result.missing_keys == ["trunk_output.block4.block4-1.f.b.1.running_var"]
    assert result.unexpected_keys == ["s1.b1.mystery.weight"]
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_missing_batch_counters_are_not_reported():
    source = trained_like("regnetx_200mf")
    checkpoint = {k: v for k, v in source.state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    result = load_checkpoint(reference_model("regnetx_200mf", num_classes=10), checkpoint)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_explicit_source_overrides_detection():
    checkpoint = to_layout(trained_like("regnetx_200mf").state_dict(), "timm")
    target = reference_model("regnetx_200mf", num_classes=10)
    result = load_checkpoint(target, checkpoint, source="pycls", strict=False)
    assert result.source == "pycls"
    assert "s1.b1.conv1.conv.weight" in result.unexpected_keys
    with pytest.raises(ValueError, match="source"):
        load_checkpoint(target, checkpoint, source="caffe2")


def test_undetectable_layout():
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        load_checkpoint(reference_model("regnetx_200mf"), {"conv.weight": torch.zeros(1)})


def test_file_round_trip(tmp_path: Path):
    source = trained_like("regnety_200mf")
    path = tmp_path / "RegNetY-200MF_dds_8gpu.pyth"
    torch.save({"epoch": 99, "model_state": to_layout(source.state_dict(), "pycls")}, path)
    for where in (path, str(path)):
        target = reference_model("regnety_200mf", num_classes=10)
        result = load_checkpoint(target, where, bgr_to_rgb=False)
        assert result == ([], [], "pycls")
        assert_same_weights(target, source.state_dict())


class NotATensor:
    pass


def test_files_with_arbitrary_objects_are_refused(tmp_path: Path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": reference_model("regnetx_200mf").state_dict(), "extra": NotATensor()},
               path)
    with pytest.raises(ValueError, match="holds Python objects besides tensors") as info:
        load_checkpoint(reference_model("regnetx_200mf"), path)
    assert "NotATensor" in str(info.value)
    assert_no_unsafe_advice(info.value)


def assert_no_unsafe_advice(error: BaseException) -> None:
    """Neither the error nor its cause suggests weights_only=False (unsafe for an untrusted
    file)."""
    while error is not None:
        assert "weights_only=False" not in str(error) and \
               "weights_only` set to `False" not in str(error), str(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (bytes(range(256)) * 4, "is neither a torch.save checkpoint nor a safetensors file"),
], ids=["empty", "arbitrary bytes"])
def test_unreadable_files_are_named(tmp_path: Path, content, message):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"load_checkpoint: '{re.escape(str(path))}' {message}") \
            as info:
        load_checkpoint(reference_model("regnetx_200mf"), path)
    assert_no_unsafe_advice(info.value)


def test_truncated_checkpoint_is_named(tmp_path: Path):
    path = tmp_path / "model.pth"
    torch.save(reference_model("regnetx_200mf").state_dict(), path)
    path.write_bytes(path.read_bytes()[:100_000])  # a download cut short
    with pytest.raises(ValueError, match="is a truncated or damaged torch.save checkpoint") \
            as info:
        load_checkpoint(reference_model("regnetx_200mf"), path)
    assert_no_unsafe_advice(info.value)


SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: dict) -> None:
    """The safetensors layout, written from its specification: an 8-byte little-endian header
    size, a JSON header {name: {dtype, shape, data_offsets}}, then the tensors' bytes."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[tensor.dtype],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def test_safetensors_checkpoint_loads_into_a_fused_model(tmp_path: Path):
    source = trained_like("regnety_200mf")
    path = tmp_path / "model.safetensors"
    write_safetensors(path, to_layout(source.state_dict(), "timm"))
    target = fused_model("regnety_200mf", num_classes=10)
    assert load_checkpoint(target, path) == ([], [], "timm")
    assert_same_weights(target, source.state_dict())

    path.write_bytes(path.read_bytes()[:-100])  # a download cut short
    with pytest.raises(ValueError, match="is not a valid safetensors file: tensor .* lies outside"):
        load_checkpoint(target, path)


def test_data_parallel_prefix_is_stripped():
    source = trained_like("regnetx_200mf")
    checkpoint = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = reference_model("regnetx_200mf", num_classes=10)
    assert load_checkpoint(target, checkpoint).source == "torchvision"
    assert_same_weights(target, source.state_dict())
