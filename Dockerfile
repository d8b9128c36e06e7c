# syntax=docker/dockerfile:1
# The `intentflow` operator as a container image (docs/deploy.md):
#
#   DOCKER_BUILDKIT=1 docker build -t intentflow:0.1.0 .
#
# Two stages: a Debian bookworm Rust toolchain builds the release binary (RocksDB's C++ and
# librdkafka from source, so the first build takes a while; BuildKit cache mounts keep the cargo
# registry and the target directory between builds), and a slim bookworm runtime holds the binary,
# the shared libraries it links and nothing else, run as the unprivileged user `intentflow`.
#
# The build has no `.git` (.dockerignore), so `intentflow --version` and `intentflow_build_info`
# say git `unknown`; the revision is recorded as the image label `org.opencontainers.image.revision`
# from the build argument GIT_SHA instead (`--build-arg GIT_SHA=$(git rev-parse --short=12 HEAD)`).
#
# CPU only: `device = "cuda"` needs a binary built with `--features cuda` against the CUDA
# toolkit (scripts/build-cuda) on a CUDA runtime base image, which this file does not do.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
# The native build prerequisites of scripts/setup: cmake builds librdkafka and RocksDB, libclang
# feeds bindgen, and librdkafka links OpenSSL, cyrus-sasl (GSSAPI), libcurl (OIDC) and zlib.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake libclang-dev libcurl4-openssl-dev libssl-dev libsasl2-dev pkg-config zlib1g-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The target directory is a cache mount (kept between builds, absent from the layer), so the
# binary is copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p intentflow-pipeline --bin intentflow \
 && install -D -m 0755 target/release/intentflow /out/intentflow

FROM ${RUNTIME_IMAGE}
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="intentflow" \
      org.opencontainers.image.description="Kafka stream operator scoring e-commerce clickstreams for purchase intent" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_SHA}"
# The shared libraries the binary links (librdkafka: OpenSSL, cyrus-sasl, libcurl, zlib; RocksDB:
# libstdc++) and CA certificates for TLS listeners. RocksDB's lz4 and zstd are linked statically.
# libsasl2-modules-gssapi-mit is cyrus-sasl's Kerberos plugin, for `sasl.mechanism = "GSSAPI"`.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libssl3 libsasl2-2 libsasl2-modules-gssapi-mit libcurl4 zlib1g libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 intentflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/intentflow --no-create-home \
      --shell /usr/sbin/nologin intentflow \
 && mkdir -p /var/lib/intentflow/state /var/lib/intentflow/model /etc/intentflow \
 && chown -R 10001:10001 /var/lib/intentflow
COPY --from=builder /out/intentflow /usr/local/bin/intentflow
USER 10001:10001
WORKDIR /var/lib/intentflow
# The status page (/, /status.json), /metrics, /health, /livez and /readyz (docs/metrics.md),
# when metrics_addr binds 0.0.0.0:9464
# (the binary's default is loopback only; the Helm chart sets it).
EXPOSE 9464
VOLUME ["/var/lib/intentflow/state"]
ENTRYPOINT ["intentflow"]
CMD ["run", "--config", "/etc/intentflow/intentflow.toml"]
