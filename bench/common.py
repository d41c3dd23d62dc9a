"""What the benchmark scripts share: the classic small CNN, the Fashion-MNIST reader, latency timers."""
import gzip
import os
import sys
import time

import torch

FASHION = "/usr/share/datasets/fashion-mnist"


# The classic small CNN is the one the test fixtures script: one definition for both.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from make_fixtures import SmallCnn  # noqa: E402,F401


def load_fashion(split):
    """Fashion-MNIST as Debian ships it: uint8 images N x 1 x 28 x 28 and int64 labels."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(FASHION, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = torch.frombuffer(bytearray(f.read()[16:]), dtype=torch.uint8).view(-1, 1, 28, 28).clone()
    with gzip.open(os.path.join(FASHION, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = torch.frombuffer(bytearray(f.read()[8:]), dtype=torch.uint8).long().clone()
    return images, labels


def report_p50(stats):
    """The batch-1 p50 ms of a step's stats in a Pare report."""
    return next(l["p50_ms"] for l in stats["latency"] if l["batch"] == 1)


def p50_ms(module, x, runs, warmup):
    """Median of `runs` timed calls after `warmup` untimed ones, in milliseconds."""
    with torch.no_grad():
        for _ in range(warmup):
            module(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000
