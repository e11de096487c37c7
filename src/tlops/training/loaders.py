"""Training inputs: images of the manifest as tensors, the training-only augmentation, a resumable sampler.

The evaluation transform is always ``build_transform(spec)`` on the spec proven by the parity step.
Augmentation changes only which part of the decoded image reaches the network (and its orientation); the
decoder, colour conversion, scale, mean, std and channel order still come from that spec, and the spec
itself is never modified. Each image's augmentation draws from its own generator seeded by (seed, epoch,
index), so a resumed run, a DDP rank and a DataLoader worker all see exactly what one process would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from tlops.config.settings import AugmentConfig
from tlops.vision.preprocessing import PreprocessSpec, build_transform, decode

Transform = Callable[[str | Path | bytes | Image.Image], torch.Tensor]


def split_items(manifest: pd.DataFrame, classes: list[str], split: str) -> tuple[list[str], list[int], list[str]]:
    """Paths, class indices and content hashes of the usable images of one split, in manifest order."""
    from tlops.data.manifest import usable

    index = {c: i for i, c in enumerate(classes)}
    part = usable(manifest)
    part = part[part["split"] == split]
    return (list(part["path"]), [index[str(lab)] for lab in part["label"]], [str(s) for s in part["sha256"]])


def _normalise(img: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """The tensor half of the spec's transform: scale, mean, std, channel order."""
    arr = np.asarray(img, dtype=np.float32)
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous() * spec.scale
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    return x.flip(0) if spec.channel_order == "BGR" else x


def crop_box(width: int, height: int, aug: AugmentConfig, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_ratio = (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(aug.crop_scale[0], aug.crop_scale[1], generator=gen))
        ratio = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    # Fallback: the whole image, clipped to the ratio range (torchvision does the same).
    ratio = width / height
    if ratio < aug.crop_ratio[0]:
        w, h = width, round(width / aug.crop_ratio[0])
    elif ratio > aug.crop_ratio[1]:
        h, w = height, round(height * aug.crop_ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def build_train_transform(spec: PreprocessSpec, aug: AugmentConfig) -> Callable[..., torch.Tensor]:
    """``f(image, generator) -> tensor``: the eval transform when augmentation is off, else a random
    resized crop and/or flip between the spec's decoding and its normalisation."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    eval_transform = build_transform(spec)
    interp = InterpolationMode(spec.interpolation)

    def transform(data: str | Path | bytes | Image.Image, gen: torch.Generator) -> torch.Tensor:
        if not aug.active:
            return eval_transform(data)
        if aug.random_resized_crop:
            img = decode(data, spec)
            top, left, h, w = crop_box(img.width, img.height, aug, gen)
            img = F.resized_crop(img, top, left, h, w, [spec.crop_size, spec.crop_size], interpolation=interp,
                                 antialias=spec.antialias)
            x = _normalise(img, spec)
        else:
            x = eval_transform(data)
        if aug.hflip and bool(torch.rand(1, generator=gen) < 0.5):
            x = x.flip(-1)
        return x

    return transform


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A generator seed of its own for each (run seed, epoch, image)."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) & 0x7FFF_FFFF_FFFF_FFFF


class ManifestImages(Dataset):
    """(tensor, label) for each image; decoded eval tensors are kept in memory when nothing is random."""

    def __init__(self, paths: list[str], labels: list[int], spec: PreprocessSpec, aug: AugmentConfig,
                 seed: int = 0, cache_bytes: int = 0) -> None:
        self.paths, self.labels, self.seed = paths, labels, seed
        self.transform = build_train_transform(spec, aug)
        self.random = aug.active
        per_image = 4 * 3 * spec.crop_size * spec.crop_size
        self.cache_on = not self.random and cache_bytes >= per_image * len(paths)
        self.cache: dict[int, torch.Tensor] = {}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.cache_on and index in self.cache:
            return self.cache[index], self.labels[index]
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        x = self.transform(self.paths[index], gen)
        if self.cache_on:
            self.cache[index] = x
        return x, self.labels[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (the same permutation for any number of replicas: ``randperm(n)`` seeded by
    seed + epoch, rank r taking every r-th index) that can start an epoch after its first ``skip`` samples.

    With ``drop_last``, global batch k of one process holding batch B is exactly the union of batch k of W
    ranks holding B / W each, so one process and W processes see the same data in the same steps.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)
