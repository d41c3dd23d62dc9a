#!/usr/bin/env bash
# Regenerates bench/RESULTS.md: every table in it is printed by a script in bench/, under a header
# that names the machine (CPU model, vector extensions, usable CPUs, LibTorch, BLAS) and the commit.
#
#   bench/run_all.sh [--quick] [--threads N] [--out FILE] [--build DIR] [--only KEY,...]
#
# --only: just these sections (keys: speed, blas, optimize, quality, auto, auto-tv, soak,
# control-plane), into
# --out (a file of their own, with the machine header: RESULTS.md is rewritten only by a full run).
# --quick: one repeat per timed row, one BLAS round on two models, one Fashion-MNIST epoch and a
# 20 s soak, 300 s searches; its file says so at the top. On this repo's 2-CPU AMD EPYC the quick
# pass took about 43 minutes (RESULTS.md's section times: the auto searches most of it); a full
# run, with 900 s searches at two goals on two teachers and 600 s ones on two torchvision models,
# should take about two and a half hours (an estimate from those section times: not yet run here).
# bench/COVERAGE.md (torchvision's 86 models, hours) has its own command: bench/coverage.py.
# Run it on a quiet machine: the figures that matter are ratios measured side by side in one run,
# but a neighbour that starts halfway through moves them too.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
quick=0 threads=$(nproc) out="$here/RESULTS.md" build="$root/build" only=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) quick=1; shift ;;
    --threads) threads=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --only) only=",$2,"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -n $only && $out == "$here/RESULTS.md" ]]; then
  echo "run_all.sh: --only writes a file of its own: give --out" >&2
  exit 2
fi
py=/usr/bin/python3
pare="$build/client/pare"
for bin in "$pare" "$build/bench/pare-soak" "$build/tests/fixtures/small_cnn.pt"; do
  [[ -e $bin ]] || { echo "run_all.sh: $bin is missing: run scripts/build.sh (and ctest's make_fixtures) first" >&2; exit 2; }
done
work=$(mktemp -d /tmp/pare-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
tmp="$work/RESULTS.md"
failed=()

if ((quick)); then repeat=1 rounds=1 epochs=1 soak=20 warm=5 models_flag=--quick auto_budget=300 tv_models=resnet18 cp_seconds=5
else repeat=3 rounds=2 epochs=4 soak=120 warm=20 models_flag= auto_budget=900 tv_models=resnet18,mobilenet_v2 cp_seconds=10; fi

# section KEY TITLE INTRO COMMAND...: the section's heading, what it measures, the command line
# and what the command printed; a failing command is recorded as such and the others still run.
# With --only, sections whose KEY is not listed are left out.
section() {
  local key=$1 title=$2 intro=$3; shift 3
  [[ -z $only || $only == *",$key,"* ]] || return 0
  echo "== $title" >&2
  local start=$SECONDS
  {
    printf '\n## %s\n\n%s\n\nCommand: `%s`\n\n' "$title" "$intro" "${*/#$root\//}"
  } >>"$tmp"
  if "$@" >"$work/section.out" 2>"$work/section.err"; then
    cat "$work/section.out" >>"$tmp"
    printf '\n(%d s)\n' $((SECONDS - start)) >>"$tmp"
  else
    local rc=$?
    cat "$work/section.out" >>"$tmp"
    if ((rc == 77)); then  # the benchmark cannot run on this machine: said, not failed
      printf '\n**SKIPPED**: %s\n' "$(tail -n 3 "$work/section.err" | tr '\n' ' ')" >>"$tmp"
    else
      printf '\n**FAILED** (exit %d): %s\n' "$rc" "$(tail -n 3 "$work/section.err" | tr '\n' ' ')" >>"$tmp"
      failed+=("$title")
    fi
  fi
}

{
  echo "# Benchmark results"
  echo
  echo "Written by \`bench/run_all.sh$( ((quick)) && echo ' --quick')\`: every table below is printed by the command"
  echo "above it. What each measures and how to read it: bench/README.md."
  ((quick)) && { echo; echo "**Quick pass**: one repeat per row, one BLAS round, one training epoch, a short soak: noisier than a full run."; }
  [[ -n $only ]] && { echo; echo "**Only these sections** (\`--only ${only:1:-1}\`)."; }
  echo
  "$py" "$here/machine.py"
} >"$tmp"

cd "$root"
# Pare's job processes fix glibc's allocator thresholds (InitProcess in worker/engine/engine.cc:
# mmap 32 MiB, trim 256 MiB); Python's side of every timing gets the same, so that both sides
# allocate alike (glibc's moving mmap threshold alone changes a batch-1 latency by up to 1.6x).
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456
section speed "Speed against Python PyTorch, side by side in one run" \
  "The same work on both sides, same observer, same threads ($threads), both on Debian's LibTorch 1.13 with the onednn quantized engine; each side's fastest of $repeat runs. Pare's time is the step's wall_seconds from its report (apply + save) unless the row says the whole command." \
  "$py" bench/speed_vs_pytorch.py --pare "$pare" --threads "$threads" --repeat "$repeat" --out "$work/speed"

if [[ -n $only && $only != *",blas,"* ]]; then
  models=""
elif ! models=$("$py" bench/blas_models.py --pare "$pare" --out "$work/blas" --threads "$threads" $models_flag \
    2>"$work/models.err"); then
  models="(bench/blas_models.py failed: $(tail -n 2 "$work/models.err" | tr '\n' ' '))"
fi
section blas "Latency on each of Debian's OpenBLAS builds" \
  "Batch-1 p50 ms in Python PyTorch ($threads intra-op threads), each build in fresh child processes, rounds alternating. Models: bench/blas_models.py (random weights, settled batch norms; -pruned = Pare's prune.channel amount 0.5)." \
  "$py" bench/blas_latency.py --threads "$threads" --rounds "$rounds" $models

section optimize "Freezing for inference: the optimize step" \
  "Batch-1 p50 ms in Python PyTorch ($threads threads), all four variants in one process, rounds alternating: the scripted model, Pare's optimize result (saved and loaded), Python's torch.jit.freeze, and torch.jit.optimize_for_inference (in memory: its oneDNN layouts cannot be saved in torch 1.13)." \
  "$py" bench/optimize_latency.py --pare "$pare" --threads "$threads" --rounds "$((rounds * 3))"

section quality "Quality on real data: Fashion-MNIST" \
  "Teachers trained by Pare; every top-1 computed in Python on the 10k test images, never trained or selected on." \
  "$py" bench/quality_fashion_mnist.py --pare "$pare" --threads "$threads" --epochs "$epochs" --out "$work/quality"

section auto "Automatic compression to a goal: auto against the best hand recipe" \
  "The Fashion-MNIST teachers of the quality section (trained again here), every hand recipe of it and \`auto\` (objective LATENCY, a $auto_budget s budget) at two accuracy goals; test top-1 in Python on the 10k test images neither sees." \
  "$py" bench/auto_fashion_mnist.py --pare "$pare" --threads "$threads" --epochs "$epochs" --budget "$auto_budget" --out "$work/auto"

section auto-tv "Automatic compression of torchvision models at 224x224" \
  "Random weights (batch norms settled), top-1 agreement with the original as the accuracy; a 600 s budget. Target: at least 3x faster at batch 1." \
  "$py" bench/auto_torchvision.py --pare "$pare" --threads "$threads" --budget 600 --models "$tv_models" --out "$work/auto-tv"

section soak "Load and leaks: pare-soak" \
  "16 clients loop upload, a deliberately rejected recipe, a 2:4 pruning job, polling and download against one server with 2 local workers; RSS from /proc (server, and every process below it). Target: growth < 50 MB after warm-up, zero errors." \
  "$build/bench/pare-soak" --bin-dir "$build" --model "$build/tests/fixtures/small_cnn.pt" --seconds "$soak" \
  --warmup "$warm" --clients 16 --workers 2

section control-plane "The control plane on SQLite and PostgreSQL" \
  "pare-control-plane (C++, gRPC) against servers without workers: 16 and 64 clients (GetJob, ListJobs, SubmitJob, a WatchJob's first message), then 1,000 jobs handed to 8 worker-protocol clients, then 45 MB models uploaded and fetched back on each blob store (a folder, or the PostgreSQL database with --blob-store postgresql). Targets: PostgreSQL with one replica at least 0.5x SQLite's GetJob rate at 64 clients; two replicas with zero errors and zero lost or duplicated jobs." \
  "$py" bench/control_plane.py --bin-dir "$build" --seconds "$cp_seconds" --no-machine

cp "$tmp" "$out"
echo "run_all.sh: wrote $out" >&2
if ((${#failed[@]})); then
  echo "run_all.sh: failed sections: ${failed[*]}" >&2
  exit 1
fi
