# One image with all four binaries: ingest-api, ingest-proxy, stream-processor, load-generator.
# docker-compose.yml picks the binary per service with `command`.

FROM rust:1.95.0-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependency layer: manifests and empty crate roots, so source edits do not rebuild it.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY crates/telemetry-core/Cargo.toml crates/telemetry-core/Cargo.toml
COPY crates/service-common/Cargo.toml crates/service-common/Cargo.toml
COPY crates/test-support/Cargo.toml crates/test-support/Cargo.toml
COPY crates/ingest-api/Cargo.toml crates/ingest-api/Cargo.toml
COPY crates/ingest-proxy/Cargo.toml crates/ingest-proxy/Cargo.toml
COPY crates/stream-processor/Cargo.toml crates/stream-processor/Cargo.toml
COPY crates/load-generator/Cargo.toml crates/load-generator/Cargo.toml
RUN for c in telemetry-core service-common test-support ingest-api ingest-proxy stream-processor load-generator; do \
      mkdir -p crates/$c/src && echo "" > crates/$c/src/lib.rs && echo "fn main() {}" > crates/$c/src/main.rs; \
    done \
 && cargo build --release --locked --bins \
 && rm -rf crates/*/src

COPY crates crates
RUN find crates -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/ingest-api target/release/ingest-proxy target/release/stream-processor target/release/load-generator /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin telemetry \
 && mkdir -p /data && chown telemetry:telemetry /data
COPY --from=builder /out/ /usr/local/bin/
USER telemetry
WORKDIR /data
ENV LOG_FORMAT=json
CMD ["ingest-api"]
