"""Loading torchvision, timm and pycls RegNet checkpoints into torchvision-layout models.

The three layouts hold the same tensors under different names (S = stage from 1, B = block
from 1 in timm/pycls, from 0 in torchvision)::

    part          torchvision                          timm                   pycls
    stem          stem.0 / stem.1                      stem.conv / stem.bn    stem.conv / stem.bn
    block         trunk_output.blockS.blockS-(B-1).    sS.bB.                 sS.bB.
    conv a / BN   f.a.0 / f.a.1                        conv1.conv / conv1.bn  f.a / f.a_bn
    conv b / BN   f.b.0 / f.b.1                        conv2.conv / conv2.bn  f.b / f.b_bn
    SE fc1 / fc2  f.se.fc1 / f.se.fc2                  se.fc1 / se.fc2        f.se.f_ex.0 / .2
    conv c / BN   f.c.0 / f.c.1                        conv3.conv / conv3.bn  f.c / f.c_bn
    shortcut      proj.0 / proj.1                      downsample.conv / .bn  proj / bn
    classifier    fc                                   head.fc                head.fc

pycls weights were trained on BGR images; :func:`load_checkpoint` flips the stem conv's input
channels for them by default so the model takes RGB like the others.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
from torch import nn

SOURCES = ("torchvision", "timm", "pycls")
STEM_CONV_WEIGHT = "stem.0.weight"

# Module paths inside a block, one row per part: torchvision -> (timm, pycls).
_BLOCK_PARTS = {
    "f.a.0": ("conv1.conv", "f.a"),
    "f.a.1": ("conv1.bn", "f.a_bn"),
    "f.b.0": ("conv2.conv", "f.b"),
    "f.b.1": ("conv2.bn", "f.b_bn"),
    "f.se.fc1": ("se.fc1", "f.se.f_ex.0"),
    "f.se.fc2": ("se.fc2", "f.se.f_ex.2"),
    "f.c.0": ("conv3.conv", "f.c"),
    "f.c.1": ("conv3.bn", "f.c_bn"),
    "proj.0": ("downsample.conv", "proj"),
    "proj.1": ("downsample.bn", "bn"),
}
# The same, per source layout: source path -> torchvision path.
_BLOCK_MODULES = {
    source: {paths[column]: torchvision for torchvision, paths in _BLOCK_PARTS.items()}
    for column, source in enumerate(("timm", "pycls"))
}
# Module paths outside the blocks; timm and pycls agree on them.
_OUTER_MODULES = {"stem.conv": "stem.0", "stem.bn": "stem.1", "head.fc": "fc"}
_BLOCK_PATH = re.compile(r"s(\d+)\.b(\d+)\.(.+)")

# A key that only its own layout has.
_SIGNATURES = {
    "torchvision": re.compile(r"trunk_output\.block\d+\.block\d+-\d+\..+"),
    "timm": re.compile(r"s\d+\.b\d+\.conv1\.conv\.weight"),
    "pycls": re.compile(r"s\d+\.b\d+\.f\.a\.weight"),
}
# Keys that wrap the state dict in training checkpoints (pycls: model_state).
_WRAPPER_KEYS = ("model_state", "state_dict", "model")
# BatchNorm step counters: older checkpoints lack them, and inference never reads them.
_OPTIONAL_SUFFIX = ".num_batches_tracked"


class LoadResult(NamedTuple):
    """What :func:`load_checkpoint` did: the keys it could not match, and the layout it read.

    ``missing_keys`` are model keys (torchvision names) the checkpoint did not provide;
    ``unexpected_keys`` are checkpoint keys (the checkpoint's own names) the model has no
    place for.
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    source: str


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model: wrong shapes, or missing/unexpected keys."""


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which layout ("torchvision", "timm" or "pycls") a RegNet state dict uses."""
    found = [
        source for source, signature in _SIGNATURES.items()
        if any(signature.fullmatch(key) for key in state_dict)
    ]
    if len(found) != 1:
        sample = ", ".join(list(state_dict)[:5])
        raise ValueError(
            f"cannot tell the checkpoint layout (matches: {found or 'none'}; keys start with "
            f"{sample}); pass source= one of {SOURCES}"
        )
    return found[0]


def torchvision_key(key: str, source: str) -> str | None:
    """The torchvision name of a ``source``-layout key, or None if it has none."""
    if source == "torchvision":
        return key
    module, _, tensor = key.rpartition(".")
    block = _BLOCK_PATH.fullmatch(module)
    if block is None:
        outer = _OUTER_MODULES.get(module)
        return None if outer is None else f"{outer}.{tensor}"
    stage, index, inner = block.groups()
    mapped = _BLOCK_MODULES[source].get(inner)
    if mapped is None:
        return None
    return f"trunk_output.block{stage}.block{stage}-{int(index) - 1}.{mapped}.{tensor}"


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, "Format").
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _is_safetensors(path: Path, head: bytes) -> bool:
    """A .safetensors name, or the format's start: an 8-byte header size, then a JSON object."""
    return path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"
                                             and 0 < int.from_bytes(head[:8], "little") < 2**32)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, read here (the format is an 8-byte little-endian header size, a
    JSON header of dtype, shape and byte offsets per tensor, then the little-endian data), so
    that it needs no extra package and never runs code."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + size])
        body = memoryview(data)[8 + size:]
        state = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key!r} has dtype {info['dtype']}, which is not one of "
                                 f"{', '.join(_SAFETENSORS_DTYPES)}")
            begin, end = info["data_offsets"]
            if not 0 <= begin <= end <= len(body):
                raise ValueError(f"tensor {key!r} lies outside the file (truncated?)")
            flat = (torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if end > begin
                    else torch.empty(0, dtype=dtype))
            state[key] = flat.reshape(info["shape"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"load_checkpoint: {str(path)!r} is not a valid safetensors file: "
                         f"{error}") from None
    return state


def _read_file(path: Path) -> object:
    """A torch.save file (read with weights_only=True: tensors and plain containers only) or a
    safetensors file, with errors that say what the file is instead of torch's."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError(f"load_checkpoint: {str(path)!r} is empty")
    if _is_safetensors(path, head):
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        # torch's own message advises weights_only=False, unsafe for an untrusted file: not
        # repeated (nor chained) here. A zip or a pickle is a checkpoint holding other objects.
        if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
            raise ValueError(f"load_checkpoint: {str(path)!r} is a truncated or damaged "
                             "torch.save checkpoint (its zip directory is missing)") from None
        if zipfile.is_zipfile(path) or head[:1] == b"\x80":
            found = re.search(r"Unsupported global: [^\n]*", str(error))
            raise ValueError(
                f"load_checkpoint: {str(path)!r} holds Python objects besides tensors "
                f"({found.group(0) if found else type(error).__name__}); it reads only tensors "
                "and plain containers. Save the model's state_dict() and load that file."
            ) from None
        raise ValueError(f"load_checkpoint: {str(path)!r} is neither a torch.save checkpoint "
                         "nor a safetensors file") from None


def _read_state_dict(
    path_or_state_dict: str | os.PathLike | Mapping[str, object],
) -> Mapping[str, torch.Tensor]:
    """The state dict in a file or mapping, unwrapped from a training checkpoint if needed."""
    checkpoint = path_or_state_dict
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _read_file(Path(checkpoint))
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a state dict or a path, got {type(checkpoint).__name__}")
    for wrapper in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"not a state dict: {not_tensors[:5]} are not tensors")
    # Models saved from DistributedDataParallel carry a "module." prefix.
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    return checkpoint


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, object],
    source: str = "auto",
    bgr_to_rgb: bool | None = None,
    strict: bool = True,
) -> LoadResult:
    """Load a torchvision, timm or pycls RegNet checkpoint into a torchvision-layout model.

    Args:
        model: a model with torchvision's module names, e.g. from
            :func:`~regnet_kernels.reference_model`.
        path_or_state_dict: a file written by ``torch.save`` (read with ``weights_only=True``),
            a ``.safetensors`` file (read without the safetensors package), or a mapping: a
            state dict, or a checkpoint wrapping one under ``model_state`` (pycls),
            ``state_dict`` or ``model``.
        source: "torchvision", "timm", "pycls", or "auto" to tell from the keys.
        bgr_to_rgb: flip the stem conv's input channels. None (default) flips for pycls
            checkpoints only, whose weights expect BGR input; timm's converted pycls weights
            are RGB already.
        strict: raise :class:`CheckpointError` if keys are missing or unexpected; otherwise
            load what matches and report the rest. Missing ``num_batches_tracked`` buffers are
            never reported (older checkpoints lack them).

    Returns:
        A :class:`LoadResult` with the missing and unexpected keys and the layout read.

    Raises:
        CheckpointError: a tensor's shape differs from the model's (always), or keys are
            missing or unexpected (with ``strict``).
    """
    state_dict = _read_state_dict(path_or_state_dict)
    if source == "auto":
        source = detect_layout(state_dict)
    elif source not in SOURCES:
        raise ValueError(f"source must be 'auto' or one of {SOURCES}, got {source!r}")
    if bgr_to_rgb is None:
        bgr_to_rgb = source == "pycls"

    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state_dict.items():
        target = torchvision_key(key, source)
        if target not in expected:
            unexpected.append(key)
            continue
        if tensor.shape != expected[target].shape:
            raise CheckpointError(
                f"shape mismatch for {target} (checkpoint key {key}): checkpoint "
                f"{tuple(tensor.shape)}, model {tuple(expected[target].shape)}"
            )
        converted[target] = tensor
    missing = [
        key for key in expected
        if key not in converted and not key.endswith(_OPTIONAL_SUFFIX)
    ]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} checkpoint does not fit the model: missing keys [{_listing(missing)}]; "
            f"unexpected keys [{_listing(unexpected)}]"
        )
    if bgr_to_rgb and STEM_CONV_WEIGHT in converted:
        converted[STEM_CONV_WEIGHT] = converted[STEM_CONV_WEIGHT].flip(1)
    model.load_state_dict(converted, strict=False)
    return LoadResult(missing, unexpected, source)
