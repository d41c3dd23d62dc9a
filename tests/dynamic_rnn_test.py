#!/usr/bin/python3
"""Dynamic INT8 of a recurrent model, end to end through `pare compress`, checked in Python.

The fixture is a bidirectional two-layer LSTM, a GRU without biases, a plain nn.RNN and a
linear head over (batch, time, features) inputs. The result must load in Python PyTorch, run
quantized LSTM/GRU kernels on both the sequence and the packed-sequence paths, agree with the
float model, keep nn.RNN in float (named in the report), and be smaller.

Usage: dynamic_rnn_test.py  (PARE_BIN_DIR and PARE_FIXTURES from ctest)
"""
import json
import os
import subprocess
import tempfile

import torch
from torch.nn.utils.rnn import pack_padded_sequence

BIN = os.path.join(os.environ["PARE_BIN_DIR"], "client", "pare")
MODEL = os.path.join(os.environ["PARE_FIXTURES"], "sequence_classifier.pt")


def methods(module, prefix):
    return [getattr(module, n) for n in module._c._method_names() if n.startswith(prefix)]


def main():
    torch.backends.quantized.engine = "onednn" if "onednn" in torch.backends.quantized.supported_engines else "qnnpack"
    with tempfile.TemporaryDirectory() as work:
        recipe = os.path.join(work, "recipe.json")
        with open(recipe, "w") as f:
            json.dump({"steps": [{"quantize": {"dynamic": {}}}]}, f)
        out, report_path = os.path.join(work, "out.pt"), os.path.join(work, "report.json")
        r = subprocess.run([BIN, "compress", MODEL, "--recipe", recipe, "-o", out, "--report", report_path,
                            "--input-shape", "1,12,16", "--device", "cpu", "--latency-budget", "0.05"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        with open(report_path) as f:
            report = json.load(f)
        original, step = report["steps"]
        notes = " | ".join(step.get("notes", []))
        assert "1 linear, 1 LSTM, 1 GRU" in notes, notes
        assert "nn.RNN" in notes, notes
        # 12 steps x every recurrent weight matrix, plus the head (exact figure in engine_test).
        assert original["stats"]["macs"] == 12 * 44352 + 120, original["stats"]
        assert step["stats"]["size_bytes"] < 0.5 * original["stats"]["size_bytes"], step["stats"]

        float_model = torch.jit.load(MODEL).eval()
        q = torch.jit.load(out).eval()
        code = "\n".join(m.code for sub in (q.lstm, q.gru) for m in methods(sub, "forward"))
        assert "torch.quantized_lstm" in code and "torch.quantized_gru" in code, code
        assert "torch.lstm(" not in code and "torch.gru(" not in code, code
        assert [n for n, _ in q.named_parameters()] == [n for n, _ in float_model.named_parameters()
                                                        if n.startswith("rnn.")]

        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 12, 16, generator=g)
        with torch.no_grad():
            want, got = float_model(x), q(x)
        cos = torch.nn.functional.cosine_similarity(want, got, 1).mean().item()
        assert got.shape == want.shape and cos > 0.99, (got.shape, cos)

        # The packed-sequence path of the LSTM and the GRU (their second forward overload).
        lengths = torch.tensor([12, 9, 5, 1])
        for name, width in (("lstm", 16), ("gru", 64)):
            seq = pack_padded_sequence(torch.randn(4, 12, width, generator=g), lengths, batch_first=True)
            packed_paths = 0
            for fq, ff in zip(methods(getattr(q, name), "forward"), methods(getattr(float_model, name), "forward")):
                try:
                    a = fq(seq)[0].data
                except RuntimeError:
                    continue  # the plain-tensor overload
                b = ff(seq)[0].data
                c = torch.nn.functional.cosine_similarity(a, b, 1).mean().item()
                assert c > 0.99, (name, c)
                packed_paths += 1
            assert packed_paths == 1, (name, packed_paths)
        print(f"dynamic INT8 LSTM/GRU: cosine {cos:.5f}, size {original['stats']['size_bytes']} -> "
              f"{step['stats']['size_bytes']} bytes")


if __name__ == "__main__":
    main()
