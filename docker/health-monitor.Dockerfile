# syntax=docker/dockerfile:1
# The health-monitor image: one service, one binary, no shell or compiler at run time.
# Build from the repository root: docker build -f docker/health-monitor.Dockerfile -t concierge/health-monitor .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
ENV CARGO_INCREMENTAL=0
WORKDIR /src
COPY . .
RUN cargo build --release --locked --package health-monitor \
    && mkdir -p /out/usr/local/bin \
    && cp target/release/health-monitor /out/usr/local/bin/ \
    # Exactly the shared libraries the binary links (libpq and its own dependencies).
    && ldd target/release/health-monitor | awk '$3 ~ /^\// { print $3 }' | xargs -I{} cp -L --parents {} /out/

# distroless/cc: glibc, CA certificates and a nonroot user; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/ /
ENV LISTEN_ADDR=0.0.0.0:8083 LOG_FORMAT=json
EXPOSE 8083
USER 65532:65532
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["/usr/local/bin/health-monitor", "healthcheck"]
LABEL org.opencontainers.image.title="concierge-health-monitor" \
      org.opencontainers.image.description="Concierge health-monitor" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/health-monitor"]
