# Pare: pare-server, pare-worker and the pare CLI in one image.
#   docker build -t pare .                          (CPU: Debian's LibTorch 1.13)
#   docker build -t pare-cuda --build-arg LIBTORCH=cuda --build-context libtorch=/path/to/libtorch .
#   buildah bud --layers --force-rm -t pare .       (the same image without a Docker engine)
# The base images are build args, so that machines without a registry can use local ones made
# from Debian's packages by scripts/make-base-images.sh (debootstrap):
#   buildah bud --layers --force-rm --build-arg BUILD_BASE=localhost/debian:bookworm \
#     --build-arg RUNTIME_BASE=localhost/debian:bookworm-slim -t pare .
# The CUDA variant builds against a CUDA LibTorch given as the `libtorch` build context (a
# folder with include/, lib/ and share/cmake/: the cxx11-ABI LibTorch archive from pytorch.org,
# which carries its CUDA libraries, or torch/ inside a PyTorch wheel: see docs/gpu.md); it
# replaces the empty `libtorch` stage below, and its lib/ is copied into the image. The node
# needs the NVIDIA container toolkit. Named build contexts need BuildKit (Docker 23+) or
# buildah 1.31+. The CUDA variant has not been built.
# tests/docker_test.sh builds the Debian variant with buildah, checks `ldd` of the three
# binaries in the image and runs a job through the CLI against pare-server inside it
# (deploy/README.md has the build's time and the image's size).
# One build stage whose RUN steps branch on LIBTORCH (not `FROM build-${LIBTORCH}`: buildah
# 1.28 skips a stage that only an ARG selects).
# No HEALTHCHECK: Kubernetes probes the gRPC health service directly (deploy/k8s); with plain
# Docker use `grpc_health_probe`-style checks or `pare list` against the server.
ARG BUILD_BASE=debian:bookworm
ARG RUNTIME_BASE=debian:bookworm-slim

# The CUDA LibTorch (--build-context libtorch=DIR replaces this stage); empty for Debian's.
FROM scratch AS libtorch

FROM ${BUILD_BASE} AS build
ARG LIBTORCH=debian
RUN case "$LIBTORCH" in debian) torch=libtorch-dev ;; cuda) torch= ;; \
      *) echo "LIBTORCH must be debian or cuda, not '$LIBTORCH'" >&2; exit 1 ;; esac \
    && apt-get update && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config ca-certificates $torch \
      libopenblas0-openmp libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      prometheus-cpp-dev libspdlog-dev libsqlite3-dev libpq-dev libssl-dev libcli11-dev nlohmann-json3-dev \
      libarchive-dev zlib1g-dev libdeflate-dev libpng-dev libjpeg-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=libtorch . /opt/libtorch/
WORKDIR /src
# What CMake reads (bench/ is configured, but only the three binaries are built).
COPY CMakeLists.txt ./
COPY proto proto
COPY common common
COPY server server
COPY worker worker
COPY client client
COPY bench bench
RUN if [ "$LIBTORCH" = cuda ]; then \
      [ -d /opt/libtorch/share/cmake/Torch ] || { echo "LIBTORCH=cuda needs --build-context libtorch=DIR" \
        "(DIR/share/cmake/Torch, DIR/lib, DIR/include)" >&2; exit 1; }; \
      prefix=-DCMAKE_PREFIX_PATH=/opt/libtorch/share/cmake; \
    else \
      [ ! -e /opt/libtorch/lib ] || { echo "a libtorch build context needs --build-arg LIBTORCH=cuda" >&2; exit 1; }; \
      prefix=; \
    fi \
    && cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPARE_BUILD_TESTS=OFF $prefix \
    && cmake --build /build --target pare-server pare-worker pare \
    && install -D -m 0755 /build/server/pare-server /out/bin/pare-server \
    && install -D -m 0755 /build/worker/pare-worker /out/bin/pare-worker \
    && install -D -m 0755 /build/client/pare /out/bin/pare \
    && mkdir -p /out/libtorch \
    && if [ "$LIBTORCH" = cuda ]; then cp -a /opt/libtorch/lib/. /out/libtorch/; fi \
    && rm -rf /build

FROM ${RUNTIME_BASE} AS runtime
# runtime-packages: the shared libraries the three binaries load (tests/docker_test.sh checks
# `ldd` of the binaries in the image; tests/deploy_test.py checks this list against the host's
# build).
RUN apt-get update && apt-get install -y --no-install-recommends \
      libtorch1.13 libopenblas0-openmp libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 \
      libprometheus-cpp-pull1.0 libprometheus-cpp-core1.0 libspdlog1.10 libsqlite3-0 libpq5 libssl3 libarchive13 zlib1g libdeflate0 libpng16-16 libjpeg62-turbo libstdc++6 libgcc-s1 libc6 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 pare && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pare
COPY --from=build /out/bin/ /usr/local/bin/
# Empty for the Debian variant; the CUDA LibTorch's libraries otherwise.
COPY --from=build /out/libtorch/ /opt/libtorch/lib/
ENV LD_LIBRARY_PATH=/opt/libtorch/lib
USER 10001:10001
# gRPC and metrics.
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/pare-server"]
CMD ["--listen=0.0.0.0:50051", "--metrics-listen=0.0.0.0:9090", "--data-dir=/data"]
