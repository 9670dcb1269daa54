"""The embedded MNIST-5k split and a real image folder read from disk."""
import numpy as np
import torch
from PIL import Image

from qcompile.tools.data import image_folder


def test_mnist_5k_is_a_stratified_reproducible_split(mnist):
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10
    assert torch.bincount(mnist.y_train).tolist() == [400] * 10
    assert abs(float(mnist.x_train.mean())) < 0.1          # normalized with MNIST's mean and std


def test_image_folder_from_disk_trains_a_compiled_model(tmp_path):
    import qcompile
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = image_folder(str(tmp_path), image_size=32)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = zip(*[ds[i] for i in range(len(ds))])
    x, y = torch.stack(x), torch.tensor(y)
    assert x.shape == (6, 3, 32, 32)
    qm = qcompile.compile(qcompile.models.get("models:resnet20", num_classes=2), x[:2], grad_bits=8)
    loss = torch.nn.functional.cross_entropy(qm(x), y)
    loss.backward()
    assert torch.isfinite(loss)
