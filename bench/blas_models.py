#!/usr/bin/python3
"""The models bench/blas_latency.py times, made here: torchvision's ResNet-18, MobileNetV2 and
ResNet-50 (random weights, batch norms settled on random inputs so the outputs depend on the
input) and the fixtures' small CNN, each dense and channel-pruned by Pare (`prune.channel`
amount 0.5). Prints the PATH:SHAPE arguments for blas_latency.py, one line.

    /usr/bin/python3 bench/blas_models.py --pare build/client/pare --out DIR [--quick]
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SmallCnn  # noqa: E402


def settle(model, shape):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    g = torch.Generator().manual_seed(3)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, *shape[1:], generator=g))
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pare", default="build/client/pare")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the small CNN and ResNet-18 only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    models = [("small_cnn", SmallCnn, (1, 1, 28, 28)), ("resnet18", torchvision.models.resnet18, (1, 3, 224, 224))]
    if not args.quick:
        models += [("mobilenet_v2", torchvision.models.mobilenet_v2, (1, 3, 224, 224)),
                   ("resnet50", torchvision.models.resnet50, (1, 3, 224, 224))]
    recipe = os.path.join(args.out, "channel.json")
    with open(recipe, "w") as f:
        json.dump({"steps": [{"prune": {"channel": {"amount": 0.5}}}]}, f)
    specs = []
    for name, ctor, shape in models:
        torch.manual_seed(0)
        dense = os.path.join(args.out, name + ".pt")
        torch.jit.script(settle(ctor(), shape)).save(dense)
        pruned = os.path.join(args.out, name + "-pruned.pt")
        subprocess.run([args.pare, "compress", dense, "--recipe", recipe, "-o", pruned, "--input-shape",
                        ",".join(map(str, shape)), "--threads", str(args.threads), "--latency-budget", "0"],
                       check=True, capture_output=True)
        dims = ",".join(map(str, shape))
        specs += [f"{dense}:{dims}", f"{pruned}:{dims}"]
    print(" ".join(specs))


if __name__ == "__main__":
    main()
