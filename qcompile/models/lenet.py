"""LeNet-5-style MNIST net (28×28×1 → 10), optionally with BatchNorm after each conv/linear."""
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, batch_norm: bool = False):
        super().__init__()
        norm2d = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        norm1d = nn.BatchNorm1d if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2, bias=not batch_norm)
        self.bn1 = norm2d(6)
        self.conv2 = nn.Conv2d(6, 16, 5, bias=not batch_norm)
        self.bn2 = norm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120, bias=not batch_norm)
        self.bn3 = norm1d(120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = x.flatten(1)
        x = self.relu(self.bn3(self.fc1(x)))
        x = self.relu(self.fc2(x))
        return self.fc3(x)
