#!/usr/bin/python3
"""Compression quality on real data: Fashion-MNIST, teachers trained by Pare itself.

Usage: bench/quality_fashion_mnist.py [--pare build/client/pare] [--threads 2] [--epochs 4] [--out DIR]

The 60k training images are split 55k (train) / 5k (validation: Pare's per-epoch evaluation
and best-epoch choice); the 10k test images are never trained or selected on, and every
row's top-1 is computed here in Python on them, independently of Pare's own report. Size,
parameters, MACs and latency come from Pare's report; each row's speed-up divides the teacher's
latency measured by the same job (its "original" step, timed in the same process just before the
steps) by the result's. Prints a markdown table per teacher.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SmallCnn, load_fashion  # noqa: E402



class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class SmallResNet(nn.Module):
    """A ResNet-style network for 28x28: stem, three stages of one residual block, pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# The hand-written recipes every teacher is compressed with (bench/auto_fashion_mnist.py compares
# the auto search with the best of them).
HAND_RECIPES = [
    ("magnitude 50% (global) + finetune 1 epoch",
     [{"prune": {"magnitude": {"amount": 0.5, "scope": "GLOBAL"}}},
      {"finetune": {"epochs": 1, "learningRate": 0.0005, "batchSize": 128, "optimizer": "ADAM"}}]),
    ("static INT8 (histogram, 16x8 calibration images)",
     [{"quantize": {"static": {"observer": "HISTOGRAM", "calibrationBatches": 16}}}]),
    ("dynamic INT8", [{"quantize": {"dynamic": {}}}]),
    ("channel pruning to 50% of the MACs (targetMacs 0.5) + distill 10 epochs",
     [{"prune": {"channel": {"targetMacs": 0.5, "roundTo": 1}}},
      {"distill": {"epochs": 10, "temperature": 4.0, "alpha": 0.7, "learningRate": 0.002, "batchSize": 128,
                   "optimizer": "ADAM"}}]),
    ("lightweight student: channel pruning 75% + distill 6 epochs",
     [{"prune": {"channel": {"amount": 0.75, "roundTo": 4}}},
      {"distill": {"epochs": 6, "temperature": 4.0, "alpha": 0.7, "learningRate": 0.002, "batchSize": 128,
                   "optimizer": "ADAM"}}]),
    ("pipeline: channel pruning to 30% of the MACs -> distill 10 epochs -> static INT8",
     [{"prune": {"channel": {"targetMacs": 0.3, "roundTo": 1}}},
      {"distill": {"epochs": 10, "temperature": 4.0, "alpha": 0.7, "learningRate": 0.002, "batchSize": 128,
                   "optimizer": "ADAM"}},
      {"quantize": {"static": {"observer": "HISTOGRAM", "calibrationBatches": 16}}}]),
    ("pipeline: magnitude 50% -> distill 1 epoch -> static INT8",
     [{"prune": {"magnitude": {"amount": 0.5, "scope": "GLOBAL"}}},
      {"distill": {"epochs": 1, "temperature": 4.0, "alpha": 0.7, "learningRate": 0.0005, "batchSize": 128,
                   "optimizer": "ADAM"}},
      {"quantize": {"static": {"observer": "HISTOGRAM", "calibrationBatches": 16}}}]),
]


def top1(path, images, labels):
    m = torch.jit.load(path).eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, images.shape[0], 500):
            correct += int((m(images[i:i + 500].float() / 255).argmax(1) == labels[i:i + 500]).sum())
    return correct / images.shape[0]


def compress(args, work, model, steps, name, data, may_fail=False):
    """Runs `steps` on `model` with `pare compress`: the result's path and the report (may_fail: a
    job that failed with a report, as auto's GOAL_UNREACHABLE, returns it too)."""
    recipe = os.path.join(work, name + ".json")
    with open(recipe, "w") as f:
        json.dump({"steps": steps}, f)
    out, report = os.path.join(work, name + ".pt"), os.path.join(work, name + ".report.json")
    cmd = [args.pare, "compress", model, "--recipe", recipe, "-o", out, "--report", report, "--threads",
           str(args.threads), "--input-shape", "1,1,28,28", "--eval", data["val"], "--train", data["train"],
           "--calibration", data["train"]]
    subprocess.run(cmd, check=not may_fail, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if may_fail else None)
    with open(report) as f:
        return out, json.load(f)


def split_data(work):
    """Fashion-MNIST's train set split 55k / 5k into files Pare reads; the 10k test set in memory."""
    images, labels = load_fashion("train")
    test_images, test_labels = load_fashion("test")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(images.shape[0], generator=g)
    data = {}
    for name, idx in (("train", order[:55000]), ("val", order[55000:])):
        data[name] = os.path.join(work, f"fashion-{name}.pt")
        torch.save({"images": images[idx], "labels": labels[idx]}, data[name])
    return data, test_images, test_labels


def train_teacher(args, work, arch, data):
    """`arch` from seeded random weights, trained by Pare (finetune, args.epochs): its file and stats."""
    torch.manual_seed(0)
    init = os.path.join(work, arch.__name__ + "-init.pt")
    torch.jit.script(arch().eval()).save(init)
    teacher, rep = compress(args, work, init, [{"finetune": {"epochs": args.epochs, "learningRate": 0.002,
                                                              "batchSize": 128, "optimizer": "ADAM"}}],
                            arch.__name__ + "-teacher", data)
    return teacher, rep["steps"][-1]["stats"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pare", default="build/client/pare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.out or tempfile.mkdtemp(prefix="pare-quality-")
    os.makedirs(work, exist_ok=True)
    data, test_images, test_labels = split_data(work)

    print(f"Fashion-MNIST: 55k train / 5k validation / 10k test (top-1 on test, computed in Python); "
          f"threads {args.threads}; teachers trained by Pare for {args.epochs} epochs\n")
    for arch in (SmallCnn, SmallResNet):
        teacher, teacher_stats = train_teacher(args, work, arch, data)
        teacher_top1 = top1(teacher, test_images, test_labels)
        rows = [("teacher (trained by Pare: finetune from random weights)", teacher_stats, teacher_top1, None)]
        cases = HAND_RECIPES
        for label, steps in cases:
            out, rep = compress(args, work, teacher, steps, arch.__name__ + "-" + str(len(rows)), data)
            # The job's own "original" measurement is the teacher timed in the same process,
            # right before the steps: the latency ratio compares the two side by side.
            rows.append((label, rep["steps"][-1]["stats"], top1(out, test_images, test_labels),
                         rep["steps"][0]["stats"]))
        print(f"### {arch.__name__}\n")
        print("| model | size | deflated | params | non-zero | MACs | p50 ms (b1) | top-1 | Δ top-1 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, s, acc, _ in rows:
            p50 = next(l["p50_ms"] for l in s["latency"] if l["batch"] == 1)
            macs = f"{s['macs'] / 1e6:.2f} M" if s.get("macs") is not None else "-"
            print(f"| {label} | {s['size_bytes']:,} | {s['deflated_bytes']:,} | {s['parameters']:,} | "
                  f"{s['nonzero_parameters']:,} | {macs} | {p50:.3f} | {acc * 100:.2f} | {(acc - teacher_top1) * 100:+.2f} |")
        t = rows[0][1]
        print("\n| relative to the teacher | deflated size | MACs | teacher p50 ms (same job) | p50 latency (b1) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, s, acc, orig in rows[1:]:
            p50 = next(l["p50_ms"] for l in s["latency"] if l["batch"] == 1)
            t50 = next(l["p50_ms"] for l in orig["latency"] if l["batch"] == 1)
            macs = f"{s['macs'] / t['macs']:.2f}" if s.get("macs") and t.get("macs") else "-"
            print(f"| {label} | {t['deflated_bytes'] / s['deflated_bytes']:.1f}x smaller | {macs} | {t50:.3f} | "
                  f"{t50 / p50:.2f}x faster |")
        print_goals(rows, teacher_top1)
        print()


def print_goals(rows, teacher_top1):
    """The engine's quality goals, judged on this run's rows (found by their labels)."""
    by = {label: (s, acc, orig) for label, s, acc, orig in rows}

    def row(prefix):
        return next(v for k, v in by.items() if k.startswith(prefix))

    def delta(prefix):
        return (row(prefix)[1] - teacher_top1) * 100

    def p50(stats):
        return next(l["p50_ms"] for l in stats["latency"] if l["batch"] == 1)

    t = rows[0][1]
    pipe, _, pipe_orig = row("pipeline: channel pruning")
    channel = row("channel pruning to 50%")[0]
    goals = [
        ("static INT8 Δ top-1 ≥ −0.3 pt", delta("static INT8"), -0.3, "pt"),
        ("magnitude 50% + fine-tune Δ top-1 ≥ −0.3 pt", delta("magnitude 50%"), -0.3, "pt"),
        (f"channel pruning to ≤ 50% MACs ({channel['macs'] / t['macs']:.2f}) + distillation Δ top-1 ≥ −0.5 pt",
         delta("channel pruning to 50%"), -0.5, "pt"),
        ("pipeline ≥ 10× smaller (deflated)", t["deflated_bytes"] / pipe["deflated_bytes"], 10, "x"),
        ("pipeline ≥ 3× faster at batch 1 (teacher timed in the same job)", p50(pipe_orig) / p50(pipe), 3, "x"),
        ("pipeline Δ top-1 ≥ −1 pt", delta("pipeline: channel pruning"), -1.0, "pt"),
    ]
    print("\n| goal | this run | verdict |")
    print("| --- | ---: | --- |")
    for goal, value, bound, unit in goals:
        met = value >= bound and (not goal.startswith("channel") or channel["macs"] <= 0.5 * t["macs"])
        shown = f"{value:+.2f} pt" if unit == "pt" else f"{value:.2f}×"
        print(f"| {goal} | {shown} | {'met' if met else '**not met**'} |")


if __name__ == "__main__":
    sys.exit(main())
