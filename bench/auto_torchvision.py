#!/usr/bin/python3
"""The auto step on torchvision's ResNet-18 and MobileNetV2 at 224x224: how much faster at batch 1
a search with a time budget makes them, on this machine.

Usage: bench/auto_torchvision.py [--pare build/client/pare] [--threads 2] [--budget 600]
                                 [--goal 5] [--models resnet18,mobilenet_v2] [--train N] [--out DIR]

Random weights (nothing can be downloaded), batch norms settled on random inputs so the outputs
depend on the input (bench/blas_models.py's settle); no labels, so the search's accuracy is
top-1 *agreement* with the original on 128 random inputs of the model's shape, and --goal is the
agreement points it may lose. --train N (default 0) gives the search N other random inputs
labelled with the original's own top class, as a team without labels would (self-labelled data):
then pruned candidates can be recovered by distillation; with none, the search leans on INT8
and freezing. "Job" divides the original's batch-1 p50 by the result's as the job's report has
them (the original at its start, the result after the search: the search's length apart, and
after a long search the same process times everything slower); the search's ratio is the chosen
trial's, its original re-timed right after it; "side by side" is the job's own re-timing at the
end of the original and the leading candidates, in turn (`search.side_by_side`; the result is the
fastest there), and the verdict's figure.

Target (issue 15): with a 10-minute budget, a result at least 3x faster at batch 1.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blas_models import settle  # noqa: E402
from common import report_p50 as p50  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pare", default="build/client/pare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=600, help="the search's timeBudgetSeconds")
    ap.add_argument("--goal", type=float, default=5.0, help="maxAccuracyDrop: top-1 agreement points")
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--train", type=int, default=0,
                    help="random train inputs labelled with the original's top class (0: no train data)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="pare-auto-tv-")
    os.makedirs(work, exist_ok=True)
    shape = (1, 3, 224, 224)
    g = torch.Generator().manual_seed(11)
    inputs = os.path.join(work, "random-inputs.pt")
    torch.save({"images": torch.randn(128, *shape[1:], generator=g)}, inputs)
    recipe = os.path.join(work, "auto.json")
    with open(recipe, "w") as f:
        json.dump({"steps": [{"auto": {"maxAccuracyDrop": args.goal, "objective": "LATENCY",
                                       "timeBudgetSeconds": args.budget}}]}, f)
    print(f"torchvision models at 224x224, random weights (batch norms settled); auto with maxAccuracyDrop "
          f"{args.goal} (top-1 agreement points, 128 random inputs), objective LATENCY, budget {args.budget} s; "
          f"threads {args.threads}; train data: " +
          (f"{args.train} other random inputs labelled with the original's top class" if args.train else "none") +
          "\n")
    print("| model | original p50 ms (b1, job) | result p50 ms (b1, job) | speed-up (job) | search's ratio | "
          "side by side at the end | agreement drop | wall s | trials | chosen recipe |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    verdicts = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = settle(getattr(torchvision.models, name)(), shape)
        path = os.path.join(work, name + ".pt")
        torch.jit.script(model).save(path)
        train_args = []
        if args.train:
            images = torch.randn(args.train, *shape[1:], generator=torch.Generator().manual_seed(12))
            with torch.no_grad():
                labels = torch.cat([model(images[i:i + 64]).argmax(1) for i in range(0, args.train, 64)])
            train = os.path.join(work, name + "-train.pt")
            torch.save({"images": images, "labels": labels}, train)
            train_args = ["--train", train]
        out, report = os.path.join(work, name + "-auto.pt"), os.path.join(work, name + "-auto.json")
        start = time.monotonic()
        subprocess.run([args.pare, "compress", path, "--recipe", recipe, "-o", out, "--report", report,
                        "--threads", str(args.threads), "--input-shape", ",".join(map(str, shape)),
                        "--eval", inputs, *train_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - start
        with open(report) as f:
            rep = json.load(f)
        search = rep.get("search", {})
        before, after = p50(rep["steps"][0]["stats"]), p50(rep["steps"][-1]["stats"])
        chosen = search.get("trials", [{}])[search["chosen"]] if "chosen" in search else {}
        failed = rep.get("failure")
        recipe_text = "GOAL_UNREACHABLE: " + failed["message"] if failed else \
            " -> ".join(next(iter(s)) for s in search.get("recipe", {}).get("steps", []))
        side = search.get("side_by_side", {}).get("ratio")
        speed = side if side else before / after
        print(f"| {name} | {before:.2f} | {after:.2f} | {before / after:.2f}x | {chosen.get('ratio', 0):.2f}x | "
              + (f"{side:.2f}x" if side else "-") + f" | {chosen.get('drop', 0):.2f} | "
              f"{wall:.0f} | {len(search.get('trials', [])) - 1} | {recipe_text} |")
        verdicts.append((f"{name}: ≥ 3x faster at batch 1 within a {args.budget} s budget"
                         + (" (side by side)" if side else " (job)"),
                         f"{speed:.2f}x", not failed and speed >= 3.0))
    print("\n| goal | this run | verdict |")
    print("| --- | ---: | --- |")
    for goal, value, met in verdicts:
        print(f"| {goal} | {value} | {'met' if met else '**not met**'} |")


if __name__ == "__main__":
    sys.exit(main())
