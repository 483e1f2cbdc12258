# The coordinator image: `otter-coord` only, built from the otter-core package (which never
# links libtorch), on a distroless runtime. From the repository root:
#
#   docker build -f cluster/docker/coordinator.Dockerfile -t otter-coord:dev .
#
# Build dependencies mirror scripts/setup.sh: protoc and the protobuf includes (build.rs
# compiles proto/otter/v1) and libjpeg62-turbo-dev (build.rs links libjpeg.a statically
# into every binary; nothing at run time). Needs BuildKit (the default builder) for the cache mounts.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev libjpeg62-turbo-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# target/ is a cache mount, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p otter-core --bin otter-coord \
 && install -D -m 0755 target/release/otter-coord /out/otter-coord

# glibc + libgcc + libstdc++ and nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/otter-coord /usr/local/bin/otter-coord
# The manifests (cluster/base) run as 10001:10001; distroless's own nonroot is 65532,
# and its WORKDIR /home/nonroot (mode 0700, owned by 65532) is closed to 10001: buildah
# and podman refuse to start the container there, runc starts it in a working directory
# it cannot read. Everything it writes goes to --state-dir and /checkpoints.
USER 10001:10001
WORKDIR /
EXPOSE 50051 9400
ENTRYPOINT ["/usr/local/bin/otter-coord"]
CMD ["--help"]
