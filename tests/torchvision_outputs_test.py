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
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pare_cli import compress, tensors  # noqa: E402

warnings.filterwarnings("ignore")
FIXTURES = os.environ["PARE_FIXTURES"]
MODELS = ["tv_resnet18.pt", "tv_mobilenet_v3_small.pt", "tv_efficientnet_b0.pt", "tv_densenet_small.pt",
          "tv_regnet_y_400mf.pt", "tv_shufflenet_v2_x0_5.pt", "tv_googlenet.pt", "tv_squeezenet1_1.pt",
          "tv_convnext_small.pt", "tv_lraspp_small.pt"]
SHAPE = (1, 3, 64, 64)


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
                    out, report = compress(os.path.join(FIXTURES, model), recipe["steps"], [SHAPE], work,
                                           latency_budget="0.05")
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
