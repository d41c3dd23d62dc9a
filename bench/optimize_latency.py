#!/usr/bin/python3
"""What the `optimize` step gains: batch-1 latency of torchvision's ResNet-18 and MobileNetV2
(random weights, batch norms settled on random inputs) as scripted, after Pare's `optimize`
(frozen, batch norms folded, saved and loaded again), after Python's torch.jit.freeze of the
same scripted model, and after torch.jit.optimize_for_inference, which adds oneDNN weight
layouts on a CPU but whose result cannot be saved in torch 1.13 (timed in memory, named so).
All four run in this Python process on the same threads, rounds alternating; the table prints
each median and the speed-up over the scripted model.

    /usr/bin/python3 bench/optimize_latency.py --pare build/client/pare [--threads N] [--rounds R]
"""
import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blas_models import settle  # noqa: E402


def saveable(module):
    try:
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        torch.jit.load(buf)
        return True
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pare", default="build/client/pare")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per model per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="pare-opt-")
    shape = (1, 3, 224, 224)
    print(f"threads: {args.threads}; torch {torch.__version__}; batch 1, {shape[2]}x{shape[3]}; "
          f"{args.rounds} rounds of {args.runs} runs, alternating\n")
    print("| model | scripted ms | Pare optimize ms | torch.jit.freeze ms | optimize_for_inference ms | "
          "Pare speed-up | optimize_for_inference speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, ctor in (("ResNet-18", torchvision.models.resnet18), ("MobileNetV2", torchvision.models.mobilenet_v2)):
        torch.manual_seed(0)
        path = os.path.join(work, name + ".pt")
        torch.jit.script(settle(ctor(), shape).eval()).save(path)
        recipe = os.path.join(work, "recipe.json")
        with open(recipe, "w") as f:
            json.dump({"steps": [{"optimize": {}}]}, f)
        out = os.path.join(work, name + "-optimized.pt")
        subprocess.run([args.pare, "compress", path, "--recipe", recipe, "-o", out, "--input-shape",
                        ",".join(map(str, shape)), "--latency-budget", "0", "--threads", str(args.threads)],
                       check=True, capture_output=True, text=True)
        scripted = torch.jit.load(path).eval()
        models = {
            "scripted": scripted,
            "pare": torch.jit.load(out).eval(),
            "freeze": torch.jit.freeze(torch.jit.load(path).eval()),
            "ofi": torch.jit.optimize_for_inference(torch.jit.load(path).eval()),
        }
        ofi_saves = saveable(models["ofi"])
        x = torch.randn(shape)
        with torch.inference_mode():
            ref = scripted(x)
            for key, m in models.items():
                for _ in range(3):
                    y = m(x)
                assert torch.allclose(y, ref, atol=1e-3, rtol=1e-3), f"{name} {key} disagrees with the original"
            times = {k: [] for k in models}
            for _ in range(args.rounds):
                for key, m in models.items():
                    for _ in range(args.runs):
                        t = time.perf_counter()
                        m(x)
                        times[key].append((time.perf_counter() - t) * 1000)
        med = {k: statistics.median(v) for k, v in times.items()}
        ofi_label = f"{med['ofi']:.2f}" + ("" if ofi_saves else " (cannot be saved)")
        print(f"| {name} | {med['scripted']:.2f} | {med['pare']:.2f} | {med['freeze']:.2f} | {ofi_label} | "
              f"{med['scripted'] / med['pare']:.2f}x | {med['scripted'] / med['ofi']:.2f}x |")


if __name__ == "__main__":
    main()
