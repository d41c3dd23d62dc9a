#!/usr/bin/python3
"""The auto step against the best hand-written recipe: Fashion-MNIST teachers trained by Pare.

Usage: bench/auto_fashion_mnist.py [--pare build/client/pare] [--threads 2] [--epochs 4]
                                   [--budget 900] [--goals 0.5,1.0] [--archs SmallCnn,SmallResNet]
                                   [--out DIR]

For each teacher of bench/quality_fashion_mnist.py (SmallCnn, SmallResNet), trained here by Pare:
every hand recipe of that benchmark (HAND_RECIPES) and `auto` (objective LATENCY, the given
time budget, maxAccuracyDrop each of --goals) run on the same teacher with the same data: 55k
train (distillation, calibration), 5k validation (what the search scores candidates on), and the
10k test images, which neither the hand recipes nor the search ever see: every top-1 below is
computed here in Python on them. Speed-ups are batch-1 p50s: "same job" divides the teacher's
p50 from the job's report (its "original" step) by the result's, for hand recipes and search
alike, but a search's job times the two its budget apart, on a machine whose speed drifts; so
the verdicts use "side by side": the teacher, every hand recipe's result within the goal and the
search's result timed here in Python, in turn, in one process (median of 5 rounds of 50 runs
each). Per goal, the best hand recipe is the fastest side by side whose test Δ top-1 is within
the goal.

Targets (issue 15): the search's result at least as fast as the best hand recipe, within the
budget, with its test drop within the goal + 0.3 points.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SmallCnn, p50_ms, report_p50 as p50  # noqa: E402
from quality_fashion_mnist import HAND_RECIPES, SmallResNet, compress, split_data, top1, train_teacher  # noqa: E402


def side_by_side(paths, rounds=5, runs=50):
    """Batch-1 p50 ms of each model file, timed in turn round after round (the median of each's
    round medians), so that all see the same machine."""
    torch.backends.quantized.engine = "onednn"  # Pare's quantized engine
    models = [torch.jit.load(p).eval() for p in paths]
    x = torch.rand(1, 1, 28, 28)
    ms = [[] for _ in paths]
    for _ in range(rounds):
        for k, m in enumerate(models):
            ms[k].append(p50_ms(m, x, runs, warmup=3))
    return [sorted(v)[len(v) // 2] for v in ms]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pare", default="build/client/pare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4, help="teacher training epochs")
    ap.add_argument("--budget", type=int, default=900, help="the search's timeBudgetSeconds")
    ap.add_argument("--goals", default="0.5,1.0", help="maxAccuracyDrop values, top-1 points")
    ap.add_argument("--archs", default="SmallCnn,SmallResNet", help="teachers to run (a shorter pass: SmallCnn)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    goals = [float(g) for g in args.goals.split(",")]
    torch.set_num_threads(args.threads)
    work = args.out or tempfile.mkdtemp(prefix="pare-auto-")
    os.makedirs(work, exist_ok=True)
    data, test_images, test_labels = split_data(work)
    print(f"Fashion-MNIST: 55k train / 5k validation (the search's eval set) / 10k test (top-1 here, in Python); "
          f"threads {args.threads}; teachers trained by Pare for {args.epochs} epochs; search budget {args.budget} s\n")
    verdicts = []
    for arch in (SmallCnn, SmallResNet):
        name = arch.__name__
        if name not in args.archs.split(","):
            continue
        teacher, _ = train_teacher(args, work, arch, data)
        base = top1(teacher, test_images, test_labels)
        hand = []
        for i, (label, steps) in enumerate(HAND_RECIPES):
            out, rep = compress(args, work, teacher, steps, f"{name}-hand{i}", data)
            hand.append((label, (top1(out, test_images, test_labels) - base) * 100,
                         p50(rep["steps"][0]["stats"]) / p50(rep["steps"][-1]["stats"]), out))
        print(f"### {name} (teacher test top-1 {base * 100:.2f})\n")
        print("| goal (max drop) | candidate | test Δ top-1 | speed-up (b1, same job) | side by side (b1) | wall s | "
              "trials | chosen recipe |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for goal in goals:
            within = [h for h in hand if h[1] >= -goal]
            steps = [{"auto": {"maxAccuracyDrop": goal, "objective": "LATENCY", "timeBudgetSeconds": args.budget}}]
            start = time.monotonic()
            out, rep = compress(args, work, teacher, steps, f"{name}-auto{goal}", data, may_fail=True)
            wall = time.monotonic() - start
            search = rep.get("search", {})
            failed = rep.get("failure")
            drop = (top1(out, test_images, test_labels) - base) * 100
            speed = p50(rep["steps"][0]["stats"]) / p50(rep["steps"][-1]["stats"])
            recipe = search.get("recipe", {}).get("steps", [])
            chosen = "GOAL_UNREACHABLE: " + failed["message"] if failed else \
                " -> ".join(next(iter(s)) for s in recipe)
            ratio = search["trials"][search["chosen"]]["ratio"] if "chosen" in search else 0
            timed = side_by_side([teacher, out] + [h[3] for h in within])
            auto_side = timed[0] / timed[1]
            best = None
            if within:
                best_side, k = max((timed[0] / ms, k) for k, ms in enumerate(timed[2:]))
                best = within[k]
                print(f"| {goal} | best hand recipe: {best[0]} | {best[1]:+.2f} | {best[2]:.2f}x | {best_side:.2f}x | "
                      "- | - | - |")
            else:
                print(f"| {goal} | no hand recipe within the goal | - | - | - | - | - | - |")
            print(f"| {goal} | auto | {drop:+.2f} | {speed:.2f}x (search: {ratio:.2f}x) | {auto_side:.2f}x | "
                  f"{wall:.0f} | {len(search.get('trials', [])) - 1} | {chosen} |")
            verdicts.append((f"{name}, goal {goal}: auto at least as fast as the best hand recipe (side by side)",
                             f"{auto_side:.2f}x vs {best_side:.2f}x" if best else
                             f"{auto_side:.2f}x (no hand recipe)",
                             not failed and (best is None or auto_side >= best_side)))
            verdicts.append((f"{name}, goal {goal}: test drop within the goal + 0.3", f"{drop:+.2f} pt",
                             not failed and drop >= -(goal + 0.3)))
            verdicts.append((f"{name}, goal {goal}: within the budget (+ measuring the result)", f"{wall:.0f} s",
                             wall <= args.budget + 60))
        print()
    print("| goal | this run | verdict |")
    print("| --- | ---: | --- |")
    for goal, value, met in verdicts:
        print(f"| {goal} | {value} | {'met' if met else '**not met**'} |")


if __name__ == "__main__":
    sys.exit(main())
