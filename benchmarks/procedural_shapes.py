"""A small procedural image-classification set, written as an ImageFolder tree.

Nothing can be downloaded here, so the design-space study (docs/design-space.md) trains on
images drawn by this script: up to 10 classes of motifs tiled over the whole image (disc,
horizontal bars, vertical bars, plus, checkerboard, ring, square, triangle, diagonal cross,
square outline), so that the train command's random-resized crops keep the class visible;
each image with a random period, phase, rotation (not for the bars), colors, a background
gradient and pixel noise. The same seed writes the same files byte for byte.

    python benchmarks/procedural_shapes.py OUT [--classes 10] [--train 200] [--val 50] [--size 40]
        [--seed 0]

writes OUT/train/<class>/<index>.png and OUT/val/<class>/<index>.png (PNG written with zlib
and numpy; reading them back, as `python -m regnet_kernels train --data OUT` does, needs
Pillow or torchvision).
"""
from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path

import numpy as np

# the most distinct first: --classes N takes the first N
CLASSES = ("disc", "horizontal_bars", "vertical_bars", "plus", "checkerboard", "ring", "square",
           "triangle", "diagonal_cross", "square_outline")


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an [H, W, 3] uint8 array."""
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))  # filter: none

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def shape_mask(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] coverage in {0, 1}: the class's motif tiled over the whole image (so
    that a random crop of any size still shows it), with a random period, phase and
    rotation (none for the bars)."""
    coords = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    name = CLASSES[label]
    period = rng.uniform(0.22, 0.34)
    angle = 0.0 if name.endswith("_bars") else rng.uniform(-0.35, 0.35)
    u = x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, period)
    v = -x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0, period)
    if name == "horizontal_bars":
        return (np.mod(v / period, 1) < 0.5).astype(np.float64)
    if name == "vertical_bars":
        return (np.mod(u / period, 1) < 0.5).astype(np.float64)
    if name == "checkerboard":
        return ((np.floor(u / period) + np.floor(v / period)) % 2 == 0).astype(np.float64)
    # one motif per cell, in cell coordinates from -1 to 1
    u = 2 * np.mod(u / period, 1) - 1
    v = 2 * np.mod(v / period, 1) - 1
    r = np.sqrt(u ** 2 + v ** 2)
    box = np.maximum(abs(u), abs(v))
    thickness = rng.uniform(0.22, 0.32)
    if name == "disc":
        mask = r <= 0.7
    elif name == "ring":
        mask = (r <= 0.8) & (r >= 0.8 - thickness)
    elif name == "square":
        mask = box <= 0.6
    elif name == "square_outline":
        mask = (box <= 0.75) & (box >= 0.75 - thickness)
    elif name == "triangle":  # apex up, base at v = 0.6
        mask = (v <= 0.6) & (abs(u) <= (v + 0.8) / 1.4 * 0.75)
    elif name == "plus":
        mask = ((abs(u) <= thickness) | (abs(v) <= thickness)) & (box <= 0.8)
    else:  # diagonal_cross
        mask = ((abs(u - v) <= thickness) | (abs(u + v) <= thickness)) & (box <= 0.7)
    return mask.astype(np.float64)


def draw(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One [size, size, 3] uint8 image of class ``label``."""
    background = rng.uniform(0, 1, size=3)
    foreground = rng.uniform(0, 1, size=3)
    while np.abs(foreground - background).sum() < 0.6:  # keep the shape visible
        foreground = rng.uniform(0, 1, size=3)
    ramp = np.linspace(-1, 1, size)
    direction = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(direction) * ramp[None, :] + np.sin(direction) * ramp[:, None]) * 0.15
    mask = shape_mask(label, size, rng)[..., None]
    image = background + gradient[..., None]
    image = image * (1 - mask) + foreground * mask
    image += rng.normal(0, 0.08, size=image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_split(root: Path, classes: int, per_class: int, size: int,
                rng: np.random.Generator) -> None:
    for label, name in enumerate(CLASSES[:classes]):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            (folder / f"{index:05d}.png").write_bytes(png_bytes(draw(label, size, rng)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write OUT/train and OUT/val into")
    parser.add_argument("--classes", type=int, default=len(CLASSES), choices=range(2, 11),
                        metavar="2..10", help="how many classes (default 10)")
    parser.add_argument("--train", type=int, default=200, help="training images per class")
    parser.add_argument("--val", type=int, default=50, help="validation images per class")
    parser.add_argument("--size", type=int, default=40, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    # separate streams: changing --val does not change the training images
    train_rng, val_rng = (np.random.default_rng([args.seed, split]) for split in (0, 1))
    write_split(out / "train", args.classes, args.train, args.size, train_rng)
    write_split(out / "val", args.classes, args.val, args.size, val_rng)
    print(f"wrote {args.classes} classes x ({args.train} train + {args.val} val) images of "
          f"{args.size}x{args.size} to {out}")


if __name__ == "__main__":
    main()
