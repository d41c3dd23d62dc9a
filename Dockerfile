# Pare: pare-server, pare-worker and the pare CLI in one image.
#   docker build -t pare .                          (CPU: Debian's LibTorch 1.13)
#   docker build -t pare-cuda --build-arg LIBTORCH=cuda --build-context libtorch=/path/to/libtorch .
# The CUDA variant builds against a CUDA LibTorch given as the `libtorch` build context (a
# folder with include/, lib/ and share/cmake/, e.g. torch/ inside a PyTorch wheel: see
# docs/gpu.md) and copies its lib/ into the image; the node needs the NVIDIA container toolkit.
# No Docker engine runs where Pare is developed: tests/docker_test.py checks what can be checked
# without one (the runtime libraries); the CUDA variant has not been built.
# No HEALTHCHECK: Kubernetes probes the gRPC health service directly (deploy/k8s); with plain
# Docker use `grpc_health_probe`-style checks or `pare list` against the server.
ARG LIBTORCH=debian

FROM debian:bookworm AS build-base
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config ca-certificates \
      libtorch-dev libopenblas0-openmp libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      prometheus-cpp-dev libspdlog-dev libsqlite3-dev libssl-dev libcli11-dev nlohmann-json3-dev \
      libarchive-dev zlib1g-dev libpng-dev libjpeg-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY proto proto
COPY common common
COPY server server
COPY worker worker
COPY client client
COPY tests tests

FROM build-base AS build-debian
RUN mkdir -p /opt/libtorch/lib \
    && cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPARE_BUILD_TESTS=OFF \
    && cmake --build /build

FROM build-base AS build-cuda
COPY --from=libtorch . /opt/libtorch
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPARE_BUILD_TESTS=OFF \
      -DCMAKE_PREFIX_PATH=/opt/libtorch/share/cmake \
    && cmake --build /build

FROM build-${LIBTORCH} AS build
RUN install -D -m 0755 /build/server/pare-server /out/bin/pare-server \
    && install -D -m 0755 /build/worker/pare-worker /out/bin/pare-worker \
    && install -D -m 0755 /build/client/pare /out/bin/pare \
    && mkdir -p /out/libtorch && cp -a /opt/libtorch/lib/. /out/libtorch/

FROM debian:bookworm-slim AS runtime
# runtime-packages: the shared libraries the three binaries load (tests/docker_test.py checks
# this list against `ldd` of the binaries built here).
RUN apt-get update && apt-get install -y --no-install-recommends \
      libtorch1.13 libopenblas0-openmp libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 \
      libprometheus-cpp-pull1.0 libprometheus-cpp-core1.0 libspdlog1.10 libsqlite3-0 libssl3 libarchive13 zlib1g libpng16-16 libjpeg62-turbo libstdc++6 libgcc-s1 libc6 \
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
