# The worker image: `otter-worker` (the per-node agent, which starts one rank process per
# GPU) and the `otter` tool, linked against the PyPI torch wheel's libtorch with the NCCL
# backend (feature `nccl`). From the repository root:
#
#   docker build -f cluster/docker/worker.Dockerfile -t otter-worker:dev .
#
# The build environment mirrors scripts/setup.sh: a venv holding torch==2.13.0, numpy
# and the two CUDA header wheels the NCCL shim compiles against; LIBTORCH points
# torch-sys at the wheel's torch package (the wheel is built with the C++11 ABI);
# OTTER_TORCH_SITE tells build.rs where the nvidia/* header wheels are. The image is large
# (the CUDA torch wheel and its nvidia-* libraries, several GB). Needs BuildKit.

ARG TORCH_VERSION=2.13.0

# The venv: torch and the header wheels, in a stage of its own that does not see the
# sources, so that a source change rebuilds neither it nor the runtime's copy of it.
FROM rust:1-bookworm AS venv
ARG TORCH_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev libjpeg62-turbo-dev libtcmalloc-minimal4 python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# Debian bookworm's python3 is 3.11: the path below (and the runtime stage's) depends on it.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      "torch==${TORCH_VERSION}" numpy "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
 && /opt/venv/bin/python -c "import torch, sys; sys.exit(0 if torch._C._GLIBCXX_USE_CXX11_ABI else 1)"

FROM venv AS build
ENV LIBTORCH=/opt/venv/lib/python3.11/site-packages/torch \
    LIBTORCH_CXX11_ABI=1 \
    OTTER_TORCH_SITE=/opt/venv/lib/python3.11/site-packages
WORKDIR /src
COPY . .
# build.rs bakes LIBTORCH/lib into the binaries' rpath: the runtime stage keeps the venv
# at the same path (and LD_LIBRARY_PATH below names it too). target/ is a cache mount,
# so the binaries are copied out here.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features nccl --bin otter-worker --bin otter \
 && install -D -m 0755 target/release/otter-worker /out/otter-worker \
 && install -D -m 0755 target/release/otter /out/otter

# What the runtime takes of the venv: not the headers (the C++ shims are compiled in the
# build stage) nor triton (torch.compile's kernel compiler: libtorch never loads it;
# `import torch` works without it), nor static libraries. About 0.8 GB less.
FROM venv AS venv-runtime
RUN cd /opt/venv/lib/python3.11/site-packages \
 && rm -rf triton triton-*.dist-info torch/include nvidia/*/include \
 && rm -f nvidia/*/lib/*.a

FROM debian:bookworm-slim
# python3 (3.11, the venv's interpreter) so the venv stays usable for debugging
# (`/opt/venv/bin/python -c 'import torch'`); libtorch itself needs only libstdc++/libgomp,
# which the wheel and the base image bring.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 otter \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin otter
COPY --from=venv-runtime /opt/venv /opt/venv
COPY --from=build /out/otter-worker /out/otter /usr/local/bin/
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/torch/lib \
    PATH=/usr/local/bin:/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 10001:10001
EXPOSE 9401
ENTRYPOINT ["/usr/local/bin/otter-worker"]
CMD ["--help"]
