#!/usr/bin/env bash
# The Dockerfile, built for real with buildah (no Docker engine or registry needed): the image
# builds from the working tree on local Debian base images (scripts/make-base-images.sh makes
# them with debootstrap when missing), every library of the three binaries resolves in it, and
# pare-server with one local worker, started inside the image as its user, runs a magnitude-prune
# + dynamic-INT8 job submitted by the pare CLI inside the image; the result loads in Python on
# the host. Exits 77 (ctest: SKIPPED) where buildah cannot run: not installed, not root, or
# `buildah info` fails. Layers are cached (--layers): a rerun rebuilds only what changed.
#   PARE_DOCKER_IMAGE   tag to build (default localhost/pare:test)
#   PARE_PYTHON         Python with torch, for the test model and the checks (default /usr/bin/python3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PARE_PYTHON:-/usr/bin/python3}
IMAGE=${PARE_DOCKER_IMAGE:-localhost/pare:test}
BUILD_BASE=localhost/debian:bookworm
RUNTIME_BASE=localhost/debian:bookworm-slim
skip() { echo "SKIPPED: $*"; exit 77; }
fail() { echo "FAIL: $*" >&2; exit 1; }
log() { echo "docker_test: $*"; }

command -v buildah >/dev/null 2>&1 || skip "buildah is not installed (scripts/install-deps.sh installs it)"
[ "$(id -u)" -eq 0 ] || skip "not root (buildah --isolation chroot builds and runs as root here)"
buildah info >/dev/null 2>&1 || skip "buildah cannot run here: $(buildah info 2>&1 | tail -1)"

work=$(mktemp -d)
ctr=""
mounted=""
cleanup() {
  [ -n "$mounted" ] && buildah umount "$ctr" >/dev/null 2>&1
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# 1. Base images from Debian's packages (kept in buildah's storage for later runs).
if ! buildah inspect --type image "$BUILD_BASE" >/dev/null 2>&1 \
   || ! buildah inspect --type image "$RUNTIME_BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null 2>&1 || skip "no $BUILD_BASE / $RUNTIME_BASE and no debootstrap to make them"
  log "making the base images (scripts/make-base-images.sh)"
  "$ROOT/scripts/make-base-images.sh" || fail "scripts/make-base-images.sh could not make the base images"
fi

# 2. The image, from the repository root (.dockerignore keeps build folders out of the context).
log "buildah bud $IMAGE (log: $work/build.log while it runs)"
start=$SECONDS
if ! buildah bud --layers --force-rm --isolation chroot --build-arg BUILD_BASE="$BUILD_BASE" \
     --build-arg RUNTIME_BASE="$RUNTIME_BASE" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$work/build.log" 2>&1; then
  tail -40 "$work/build.log" >&2
  fail "the image did not build (buildah bud exited non-zero; the end of its log is above)"
fi
log "image built in $((SECONDS - start)) s: $(buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE")"
user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
[ "$user" = "10001:10001" ] || fail "the image's user is '$user', expected 10001:10001"
entry=$(buildah inspect --type image --format '{{.OCIv1.Config.Entrypoint}}' "$IMAGE")
[ "$entry" = "[/usr/local/bin/pare-server]" ] || fail "the image's entrypoint is $entry"

# 3. A small TorchScript model and a recipe, made here (the image has no Python).
mkdir -p "$work/in"
"$PY" - "$work/in/model.pt" <<'PYEOF' || fail "could not make the test model with $PY (needs torch)"
import sys, torch
torch.manual_seed(0)
m = torch.nn.Sequential(
    torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
torch.jit.script(m).save(sys.argv[1])
PYEOF
cat >"$work/in/recipe.json" <<'JSON'
{"steps": [
  {"prune":    {"magnitude": {"amount": 0.5, "scope": "GLOBAL"}}},
  {"quantize": {"dynamic":   {}}}
]}
JSON
# Runs inside the image, as its user: ldd, then server + one local worker, then the CLI.
cat >"$work/in/inside.sh" <<'EOF'
set -euo pipefail
bad() { echo "FAIL (inside the image): $*" >&2; [ -f /tmp/server.log ] && tail -20 /tmp/server.log >&2; exit 1; }
[ "$(id -u)" = 10001 ] || bad "running as uid $(id -u), not the image's user 10001"
for b in pare-server pare-worker pare; do
  out=$(ldd /usr/local/bin/$b) || bad "ldd $b failed"
  if grep -q "not found" <<<"$out"; then grep "not found" <<<"$out" >&2; bad "ldd $b: libraries not found"; fi
done
grep -q "openblas-openmp/libblas.so.3" <<<"$(ldd /usr/local/bin/pare-worker)" || bad "pare-worker does not load OpenBLAS's OpenMP build"
echo "ldd: every library of pare-server, pare-worker and pare resolves"
cd /tmp
pare-server --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir /tmp/pare-data --local-workers 1 \
  --worker-threads 1 >/tmp/server.out 2>/tmp/server.log &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q "listening on" /tmp/server.out 2>/dev/null && break; sleep 0.1; done
export PARE_SERVER=$(grep -o 'listening on 127.0.0.1:[0-9]*' /tmp/server.out | grep -o '127.0.0.1:[0-9]*' || true)
[ -n "$PARE_SERVER" ] || bad "pare-server did not start"
echo "pare-server listening on $PARE_SERVER"
model=$(pare upload-model /in/model.pt --name small --input-shape 1,1,28,28) || bad "upload-model failed"
[[ $model == mdl_* ]] || bad "upload-model printed '$model'"
pare submit --model "$model" --recipe /in/recipe.json --wait >/tmp/submit.out || { cat /tmp/submit.out >&2; bad "submit --wait failed"; }
job=$(head -1 /tmp/submit.out)
grep -q SUCCEEDED /tmp/submit.out || { cat /tmp/submit.out >&2; bad "job $job did not succeed"; }
mkdir -p /tmp/out
pare download "$job" -o /tmp/out/result.pt --report /tmp/out/report.json || bad "download $job failed"
pare --json status "$job" >/tmp/out/status.json || bad "status $job failed"
kill $server
wait $server || true
echo "job $job SUCCEEDED and its result downloaded"
EOF

# 4. A container of the image: the script, then the results read from its filesystem.
ctr=$(buildah from "$IMAGE") || fail "buildah from $IMAGE failed"
buildah copy --chown 10001:10001 "$ctr" "$work/in" /in >/dev/null || fail "buildah copy into the container failed"
log "running pare-server, one worker and the CLI inside $ctr"
timeout 900 buildah run --isolation chroot "$ctr" -- bash /in/inside.sh \
  || fail "the job did not run inside the image (exit $?)"
mnt=$(buildah mount "$ctr") || fail "buildah mount $ctr failed"
mounted=1
for f in result.pt report.json status.json; do
  [ -s "$mnt/tmp/out/$f" ] || fail "$f is missing from the container"
done
"$PY" - "$mnt/tmp/out" <<'PYEOF' || fail "the result, its report or the job status is wrong"
import json, sys, torch
d = sys.argv[1]
m = torch.jit.load(f"{d}/result.pt")
y = m(torch.randn(2, 1, 28, 28))
assert tuple(y.shape) == (2, 10), y.shape
r = json.load(open(f"{d}/report.json"))
steps = [s["step"] for s in r["steps"]]
assert steps == ["original", "prune.magnitude", "quantize.dynamic"], steps
sparsity = r["steps"][1]["stats"]["sparsity"]
assert 0.4 < sparsity < 0.6, sparsity
j = json.load(open(f"{d}/status.json"))
assert j["state"] == "SUCCEEDED", j
print(f"result loads and runs on the host; sparsity {sparsity:.3f}; steps {steps}")
PYEOF
log "ok: the image builds, its binaries' libraries resolve, and a job runs through the CLI inside it"
