# syntax=docker/dockerfile:1
# The health-monitor image: one service, one binary, nothing to build with at run time.
#
#   docker build -f docker/health-monitor.Dockerfile -t concierge/health-monitor .
#   cargo xtask build-images health-monitor          (Docker buildx or Podman, tags and sizes)
#
# Stages:
#   chef     the Rust toolchain, the C libraries the binary links, and cargo-chef;
#   planner  the dependency recipe (manifests and Cargo.lock only);
#   builder  the dependencies in a layer of their own (rebuilt only when the recipe
#            changes), then the health-monitor binary, then its root filesystem in /out
#            by docker/rootfs.sh: the binary, exactly the shared libraries it links,
#            CA certificates and the non-root user;
#   runtime  FROM scratch with /out and nothing else: no shell, no package manager.
#
# Where no base image can be pulled, the builder stage is replaced by a directory the
# host prepares with the same docker/rootfs.sh from its own release build:
#   buildah build --build-context builder=target/images/health-monitor -f docker/health-monitor.Dockerfile .
# (`cargo xtask build-images --prebuilt` does that; `cargo xtask test` proves the images.)

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS chef
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq-dev libsqlite3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --bin health-monitor --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --bin health-monitor --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin health-monitor \
    && sh docker/rootfs.sh target/release/health-monitor /out

FROM scratch AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
COPY --from=builder /out/ /
ENV LISTEN_ADDR=0.0.0.0:8083 LOG_FORMAT=json
USER 65532:65532
EXPOSE 8083
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/health-monitor", "healthcheck"]
LABEL org.opencontainers.image.title="concierge-health-monitor" \
      org.opencontainers.image.description="Concierge health monitor: active checks, health states, alerts and recovery" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/health-monitor"]
