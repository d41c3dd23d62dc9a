#!/usr/bin/env python3
"""Batch-1 latency of TorchScript models on each of Debian's OpenBLAS builds, side by side.

Pare's engine links OpenBLAS's OpenMP build first (worker/engine/CMakeLists.txt); with the
pthread build it sets one BLAS thread. This times the same models, in Python PyTorch with the
same intra-op threads, under both settings, alternating rounds in fresh child processes:

    /usr/bin/python3 bench/blas_latency.py --threads 2 \
        MODEL.pt:1,3,224,224 OTHER.pt:1,1,28,28 ...

Needs libopenblas0-openmp and libopenblas0-pthread installed; prints a markdown table of p50
milliseconds (one column per round and build).
"""
import argparse
import os
import subprocess
import sys

LIBDIR = "/usr/lib/x86_64-linux-gnu"
BUILDS = {
    "pthread, 1 BLAS thread": {"LD_LIBRARY_PATH": f"{LIBDIR}/openblas-pthread", "OPENBLAS_NUM_THREADS": "1"},
    "OpenMP": {"LD_LIBRARY_PATH": f"{LIBDIR}/openblas-openmp"},
}


def child(models, threads, calls):
    import torch
    from common import p50_ms
    torch.set_num_threads(threads)
    out = []
    for spec in models:
        path, shape = spec.rsplit(":", 1)
        m = torch.jit.load(path).eval()
        x = torch.randn(*[int(d) for d in shape.split(",")])
        once = p50_ms(m, x, runs=1, warmup=1)  # after the call that optimises the graph
        n = max(20, min(calls, int(2000 / max(once, 1e-3))))  # about 2 s a model
        out.append(p50_ms(m, x, runs=n, warmup=max(5, n // 20)))
    print(" ".join(f"{v:.4f}" for v in out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="PATH:SHAPE, e.g. resnet50.pt:1,3,224,224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.models, args.threads, args.calls)
    for name, env in BUILDS.items():
        if not os.path.exists(os.path.join(env["LD_LIBRARY_PATH"], "libblas.so.3")):
            # Nothing to compare: exit 77, which run_all.sh records as skipped, not failed.
            print(f"blas_latency: the {name} build is not installed ({env['LD_LIBRARY_PATH']}); "
                  f"apt-get install libopenblas0-pthread libopenblas0-openmp to compare the two", file=sys.stderr)
            sys.exit(77)
    columns, results = [], []
    for r in range(args.rounds):
        for name, env in BUILDS.items():
            e = dict(os.environ)
            e.pop("OPENBLAS_NUM_THREADS", None)
            e.update(env)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--threads",
                                  str(args.threads), "--calls", str(args.calls)] + args.models,
                                 env=e, check=True, capture_output=True, text=True).stdout
            columns.append(f"{name} #{r + 1}")
            results.append([float(v) for v in out.split()])
    print(f"threads: {args.threads}; p50 ms at the given shape\n")
    print("| model | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for i, spec in enumerate(args.models):
        name = os.path.basename(spec.rsplit(":", 1)[0]) + " " + spec.rsplit(":", 1)[1]
        print(f"| {name} | " + " | ".join(f"{col[i]:.3f}" for col in results) + " |")


if __name__ == "__main__":
    main()
