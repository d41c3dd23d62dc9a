#!/usr/bin/python3
"""The machine a benchmark ran on, as a markdown paragraph: CPU model, the vector extensions
that decide LibTorch's speed (AVX2, AVX-512, VNNI, AMX), the CPUs this process may use, memory,
LibTorch and BLAS, the commit. INT8 speed-ups depend on these: quote them with every figure."""
import datetime
import os
import platform
import subprocess


def cpu():
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    names = [("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
             ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX-512 BF16"), ("amx_int8", "AMX-INT8")]
    have = [name for flag, name in names if flag in flags]
    fast_int8 = "avx512_vnni" in flags or "amx_int8" in flags
    return model, have, fast_int8


def package_version(name):
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def blas():
    try:
        target = os.path.realpath("/etc/alternatives/libblas.so.3-" + platform.machine() + "-linux-gnu")
    except OSError:
        target = "unknown"
    return target


def memory_gib():
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return kb / 2**20
    except (OSError, StopIteration, ValueError):
        return 0.0


def commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    model, ext, fast_int8 = cpu()
    usable = len(os.sched_getaffinity(0))
    libtorch = package_version("libtorch1.13") or "not from Debian"
    openmp_blas = package_version("libopenblas0-openmp")
    print(f"Run of {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on commit {commit()}.\n")
    print(f"- CPU: {model}; {os.cpu_count()} logical CPUs, {usable} usable by this process; "
          f"{memory_gib():.0f} GiB memory")
    print(f"- vector extensions: {', '.join(ext) or 'none of AVX2/AVX-512/VNNI/AMX'}"
          + ("" if fast_int8 else " — no AVX-512 VNNI or AMX: INT8 has no fast path on this CPU"))
    print(f"- LibTorch: Debian libtorch1.13 {libtorch} (CPU; quantized engines onednn, qnnpack)")
    print(f"- BLAS: Pare's engine links OpenBLAS's OpenMP build ({openmp_blas or 'not installed'}); "
          f"Python PyTorch uses the system alternative {blas()}")
    print(f"- kernel: {platform.release()}; GPU: " + ("none" if not os.path.exists("/dev/nvidia0") else "present"))


if __name__ == "__main__":
    main()
