#!/usr/bin/env bash
# Installs Pare's build and test dependencies from Debian bookworm (apt), only if missing.
set -euo pipefail
# libopenblas0-openmp: LibTorch's float conv fallback (small spatial inputs) and linear layers go
# through BLAS; Debian's reference BLAS makes them several times slower, and OpenBLAS's pthread
# build fights LibTorch's OpenMP threads (the engine links the OpenMP build first, by RPATH).
# clang-format: scripts/check-format.sh (run by scripts/test.sh) checks the C++ against .clang-format.
# buildah, podman, debootstrap: tests/docker_test.sh builds the Dockerfile without a Docker engine,
# on base images made from Debian's packages (scripts/make-base-images.sh).
# chromium: tests/report_html_test.py renders the HTML report in a headless browser.
# libpq-dev: the PostgreSQL store (pare-server --store postgresql://...); postgresql: the server
# store_pg_test starts (as an unprivileged user) to run the store's contract against.
packages=(
  build-essential cmake ninja-build ccache pkg-config clang clang-format libclang-rt-14-dev openssl
  libopenblas0-openmp libtorch-dev libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev libspdlog-dev libgtest-dev libsqlite3-dev libpq-dev libssl-dev libcli11-dev
  nlohmann-json3-dev libarchive-dev zlib1g-dev libdeflate-dev libpng-dev libjpeg-dev
  python3-torch python3-torchvision python3-grpcio python3-yaml dataset-fashion-mnist prometheus
  buildah podman debootstrap debian-archive-keyring chromium postgresql
)
# kubectl renders the kustomize overlays in tests/deploy_test.py: Debian's where the machine has none.
command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
