"""Training data for `python -m regnet_kernels train`: an ImageFolder-layout directory
(decoded by torchvision's loader when torchvision is installed, else by Pillow) or a
synthetic set, and the per-epoch batches of each rank.

Everything random (the shuffle, the crops and flips) is drawn from generators seeded by
(seed, epoch, index), so an epoch's batches depend only on those: a run resumed from a
checkpoint sees exactly the batches the uninterrupted run saw.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# ImageNet's channel statistics (RGB), which pycls and torchvision normalize with
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A data folder or image that cannot be used, with the reason."""


def find_images(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, class index)]) of an ImageFolder-layout directory:
    one sub-folder per class (sorted by name), images anywhere below it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data: {root} is not a directory (expected one sub-folder of "
                        f"images per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"data: {root} has no class sub-folders (expected {root}/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise DataError(f"data: {root} has class folders ({', '.join(classes[:5])}"
                        f"{', ...' if len(classes) > 5 else ''}) but no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def image_reader() -> Callable[[str], "object"]:
    """path -> RGB PIL image: torchvision's ImageFolder loader when torchvision is
    installed, else Pillow's."""
    try:
        from torchvision.datasets.folder import default_loader
        return default_loader
    except ImportError:
        pass
    try:
        from PIL import Image
    except ImportError:
        raise DataError("data: reading an image folder needs Pillow (pip install pillow) or "
                        "torchvision; --data synthetic needs neither") from None

    def read(path: str):
        with Image.open(path) as image:
            return image.convert("RGB")
    return read


def _generator(*seeds: int) -> torch.Generator:
    value = 0
    for s in seeds:  # a fixed mix of the seeds into one 63-bit value
        value = (value * 1_000_003 + s) % (2 ** 63)
    return torch.Generator().manual_seed(value)


def _to_tensor(image) -> torch.Tensor:
    """RGB PIL image -> normalized float (3, H, W)."""
    w, h = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
    x = pixels.permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def random_resized_crop_box(width: int, height: int, gen: torch.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of an Inception-style crop: area a random share of the
    image's, aspect ratio log-uniform; the center crop of the largest valid ratio after 10
    misses (torchvision's rule, drawn from gen)."""
    area = width * height
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=gen)))
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(
            torch.rand((), generator=gen))
        w = round(math.sqrt(target * math.exp(log_r)))
        h = round(math.sqrt(target / math.exp(log_r)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            return left, top, left + w, top + h
    r = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / r)) if width / height < r else (round(height * r), height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class FolderDataset:
    """Images of an ImageFolder-layout directory. Training: random resized crop to
    resolution x resolution and a random horizontal flip; evaluation: resize so that the
    center crop of resolution is 224/256 of the shorter side. An image that cannot be
    decoded gives None (the batch skips it and counts it)."""

    def __init__(self, root, resolution: int, train: bool, seed: int = 0,
                 read: Optional[Callable] = None):
        self.classes, self.samples = find_images(root)
        self.read = read or image_reader()
        self.resolution, self.train, self.seed = resolution, train, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = self.read(path)
            image.load()
        except Exception:  # a corrupt or unreadable file: skipped and counted, not fatal
            return None
        return self.transform(image, index), label

    def transform(self, image, index: int) -> torch.Tensor:
        from PIL import Image  # only reached with an image, i.e. with Pillow installed
        size = self.resolution
        if self.train:
            gen = _generator(self.seed, self.epoch, index)
            box = random_resized_crop_box(*image.size, gen)
            image = image.resize((size, size), Image.BILINEAR, box=box)
            if float(torch.rand((), generator=gen)) < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            w, h = image.size
            crop = size * min(w, h) / (size * 256 / 224)  # source pixels of the center crop
            left, top = (w - crop) / 2, (h - crop) / 2
            image = image.resize((size, size), Image.BILINEAR,
                                 box=(left, top, left + crop, top + crop))
        return _to_tensor(image)


class SyntheticDataset:
    """`size` random images of `num_classes` classes, image i of class i % num_classes:
    noise plus a class-dependent pattern, so that a model can learn it; the same image for
    the same index on every rank and in every run."""

    def __init__(self, size: int, num_classes: int, resolution: int, seed: int = 0):
        self.size, self.resolution, self.seed = size, resolution, seed
        self.classes = [f"class{c}" for c in range(num_classes)]
        gen = _generator(seed, -1)
        self.patterns = torch.randn(num_classes, 3, resolution, resolution, generator=gen)
        self.epoch = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        label = index % len(self.classes)
        noise = torch.randn(3, self.resolution, self.resolution,
                            generator=_generator(self.seed, index))
        return noise + self.patterns[label], label


def collate(samples):
    """(images, labels, skipped): the decodable samples of a batch, and how many were not."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return None, None, skipped
    return (torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped)


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0,
                  world: int = 1, shuffle: bool = True, drop_last: bool = True) -> list[list[int]]:
    """This rank's batches of sample indices for an epoch: one permutation drawn from
    (seed, epoch), dealt out to the ranks in turn; with drop_last every rank gets the same
    number of full batches (training), else the last batch may be short and some ranks may
    have one batch fewer (evaluation: every sample once)."""
    order = (torch.randperm(num_samples, generator=_generator(seed, epoch)) if shuffle
             else torch.arange(num_samples)).tolist()
    mine = order[rank::world]
    if drop_last:
        steps = (num_samples // world) // batch_size
        return [mine[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def loader(dataset, batches: list[list[int]], workers: int, pin_memory: bool = False):
    """Batches of (images, labels, skipped) in order; decoding in `workers` processes."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       collate_fn=collate, pin_memory=pin_memory)
