"""Helpers shared by the Python tests that drive `pare compress` (the offline engine)."""
import json
import os
import subprocess

import torch

BIN = os.path.join(os.environ.get("PARE_BIN_DIR", "build"), "client", "pare")


def tensors(out):
    """Every tensor of a model's output, in a fixed order (dicts by key)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in tensors(out[k])]
    return []


def compress(model, steps, shapes, work, extra=(), latency_budget="0.02", threads=1):
    """Runs `pare compress MODEL` with a recipe of `steps` and one --input-shape per shape;
    returns (result path, report dict) or raises AssertionError with the CLI's last line.
    `threads` 1 by default: ctest runs two tests at once on 2 cores, and two jobs of 2 OpenMP
    threads each on them ran user_networks_test 2.3x slower; None keeps the CLI's default (the
    CPUs the process may use)."""
    recipe = os.path.join(work, "recipe.json")
    with open(recipe, "w") as f:
        json.dump({"steps": steps}, f)
    out = os.path.join(work, "out.pt")
    report = os.path.join(work, "report.json")
    cmd = [BIN, "compress", model, "--recipe", recipe, "-o", out, "--report", report, "--device", "cpu",
           "--latency-budget", latency_budget, *extra]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    for shape in shapes:  # one per input of forward
        cmd += ["--input-shape", ",".join(map(str, shape))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [""])[-1]
        raise AssertionError(f"pare compress failed ({r.returncode}): {last[-600:]}")
    with open(report) as f:
        return out, json.load(f)
