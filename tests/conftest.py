import os

import pytest
import torch
from torch import nn

# Every model any test compiles is checked after every pass against the invariant the pass states
# (qcompile.passes.pipeline.VERIFIERS). Set at import so it also holds in subprocesses tests start.
os.environ["QCOMPILE_VERIFY"] = "1"


class SmallNet(nn.Module):
    """conv → relu → maxpool → conv → relu → flatten → linear: one of each placement case."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return SmallNet()


@pytest.fixture(scope="session")
def mnist():
    from qcompile.tools.data import mnist_5k
    return mnist_5k()
