"""What the benchmark scripts share: the classic small CNN and the Fashion-MNIST reader."""
import gzip
import os

import torch
import torch.nn as nn

FASHION = "/usr/share/datasets/fashion-mnist"


class SmallCnn(nn.Module):
    """The classic MNIST CNN: conv 1->10 k5, conv 10->20 k5, linear 320->50, linear 50->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = torch.relu(torch.max_pool2d(self.conv1(x), 2))
        x = torch.relu(torch.max_pool2d(self.conv2(x), 2))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def load_fashion(split):
    """Fashion-MNIST as Debian ships it: uint8 images N x 1 x 28 x 28 and int64 labels."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(FASHION, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = torch.frombuffer(bytearray(f.read()[16:]), dtype=torch.uint8).view(-1, 1, 28, 28).clone()
    with gzip.open(os.path.join(FASHION, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = torch.frombuffer(bytearray(f.read()[8:]), dtype=torch.uint8).long().clone()
    return images, labels
