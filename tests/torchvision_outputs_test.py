#!/usr/bin/python3
"""Every compressed torchvision model loads and runs in Python PyTorch, as users will use it.

Runs `pare compress` (the offline engine) on the small torchvision fixtures with channel
pruning, alone and followed by static INT8 quantization, and with low-rank factorization,
and checks in Python that each
result loads, keeps the original's output shapes, has fewer parameters and MACs, and still
trains (train-mode forward and backward) where it is a float model.

Usage: torchvision_outputs_test.py  (PARE_BIN_DIR and PARE_FIXTURES from ctest)
"""
import json
import os
import subprocess
import sys
import tempfile
import warnings

import torch

warnings.filterwarnings("ignore")
BIN = os.path.join(os.environ["PARE_BIN_DIR"], "client", "pare")
FIXTURES = os.environ["PARE_FIXTURES"]
MODELS = ["tv_resnet18.pt", "tv_mobilenet_v3_small.pt", "tv_efficientnet_b0.pt", "tv_densenet_small.pt",
          "tv_regnet_y_400mf.pt", "tv_shufflenet_v2_x0_5.pt", "tv_googlenet.pt", "tv_squeezenet1_1.pt",
          "tv_convnext_small.pt", "tv_lraspp_small.pt"]
SHAPE = (1, 3, 64, 64)


def tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    if isinstance(out, dict):  # segmentation models: {"out": ...}
        return [t for k in sorted(out) for t in tensors(out[k])]
    return []


def compress(model, recipe, work):
    recipe_path = os.path.join(work, "recipe.json")
    with open(recipe_path, "w") as f:
        json.dump(recipe, f)
    out = os.path.join(work, "out.pt")
    report = os.path.join(work, "report.json")
    cmd = [BIN, "compress", os.path.join(FIXTURES, model), "--recipe", recipe_path, "-o", out, "--report", report,
           "--device", "cpu", "--input-shape", ",".join(map(str, SHAPE)), "--latency-budget", "0.05"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"{model}: pare compress failed ({r.returncode}): {r.stderr[-2000:]}")
    with open(report) as f:
        return out, json.load(f)


def main():
    failures = []
    x = torch.randn(2, *SHAPE[1:])
    with tempfile.TemporaryDirectory() as work:
        for model in MODELS:
            original = torch.jit.load(os.path.join(FIXTURES, model)).eval()
            with torch.no_grad():
                want = [t.shape for t in tensors(original(x))]
            params = sum(p.numel() for p in original.parameters())
            for recipe, quantized in [
                ({"steps": [{"prune": {"channel": {"amount": 0.5}}}]}, False),
                ({"steps": [{"prune": {"channel": {"amount": 0.4, "scope": "GLOBAL"}}},
                            {"quantize": {"static": {"calibrationBatches": 2}}}]}, True),
                ({"steps": [{"factorize": {"rankRatio": 0.25}}]}, False),
            ]:
                name = f"{model} {json.dumps(recipe['steps'][0])[:40]}{' +int8' if quantized else ''}"
                try:
                    out, report = compress(model, recipe, work)
                    m = torch.jit.load(out).eval()
                    with torch.no_grad():
                        got = [t.shape for t in tensors(m(x))]
                    assert got == want, f"output shapes {got} != {want}"
                    pruned = report["steps"][1]
                    assert pruned["stats"]["macs"] < 0.8 * report["steps"][0]["stats"]["macs"], "MACs not reduced"
                    if quantized:
                        assert "quantized::" in str(m.graph) or any("quantized" in str(c.graph) for c in m.modules()), \
                            "no quantized ops"
                    else:
                        assert sum(p.numel() for p in m.parameters()) < 0.8 * params, "parameters not reduced"
                        m.train()
                        loss = sum(t.float().sum() for t in tensors(m(x)))
                        loss.backward()
                        assert any(p.grad is not None for p in m.parameters()), "no gradients"
                    print(f"ok   {name}: MACs {report['steps'][0]['stats']['macs']:.3g} -> {pruned['stats']['macs']:.3g}")
                except Exception as e:  # report every model, then fail
                    failures.append(f"{name}: {e}")
                    print(f"FAIL {name}: {e}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
