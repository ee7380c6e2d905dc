# syntax=docker/dockerfile:1
#
# Sessionizer container image (used by docker-compose.yml).
#
#   docker build -t sessionizer:local .
#   docker run --rm sessionizer:local check --brokers kafka:9092     # print the effective config
#   docker run --rm -p 9464:9464 -v sessionizer-state:/var/lib/sessionizer \
#       -e SESSIONIZER_BROKERS=kafka:9092 sessionizer:local          # `sessionizer run`
#
# The builder installs the same build dependencies as scripts/setup.sh (cmake, libclang for
# RocksDB's bindgen, the -dev packages librdkafka's cmake build asks for) and builds exactly
# what scripts/demo.sh builds (`cargo build --release --locked`). The first build compiles
# RocksDB and librdkafka from source (about 20 minutes on 2 cores); BuildKit cache mounts keep
# the cargo registry and the target directory between builds, so later builds only recompile
# what changed.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config libclang-dev libssl-dev libsasl2-dev \
      libcurl4-openssl-dev zlib1g-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Everything but what .dockerignore leaves out (target/, target-demo/, .git/, deploy/...).
# Cargo.toml declares [[bench]] targets, so benches/ must be there for the manifest to load.
COPY . .

RUN --mount=type=cache,id=sessionizer-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=sessionizer-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=sessionizer-target,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/sessionizer /out/sessionizer

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}

# Shared libraries the binary may link: OpenSSL (librdkafka's ssl feature), zlib and zstd
# (compression), SASL and curl (librdkafka options), libstdc++ (RocksDB, librdkafka's C++
# parts). ca-certificates for TLS to the brokers (security.protocol=SSL/SASL_SSL).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libssl3 libsasl2-2 libcurl4 zlib1g libzstd1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/*

# Non-root user with a fixed numeric id (Kubernetes runAsNonRoot can check it). The state
# directory is created here, owned by that user, so a fresh named volume mounted on it
# inherits the ownership. Mode 0755: the compose demo lets the (other-uid) Kafka tools read
# the generated events file from a volume mounted there.
RUN groupadd --system --gid 10001 sessionizer \
 && useradd --system --uid 10001 --gid sessionizer --home-dir /var/lib/sessionizer \
      --no-create-home --shell /usr/sbin/nologin sessionizer \
 && install -d -o sessionizer -g sessionizer -m 0755 /var/lib/sessionizer

COPY --from=builder /out/sessionizer /usr/local/bin/sessionizer
# Fails the build if a shared library the binary needs is missing from this stage.
RUN sessionizer --version

# Container defaults: state in the volume, metrics reachable from outside the container.
# Precedence is flag > environment > config file > default, so these two also win over a
# config file passed with --config / SESSIONIZER_CONFIG: set them (or the flags) to change.
ENV SESSIONIZER_STATE_DIR=/var/lib/sessionizer \
    SESSIONIZER_METRICS_ADDR=0.0.0.0:9464

USER 10001:10001
WORKDIR /var/lib/sessionizer
VOLUME ["/var/lib/sessionizer"]

# /metrics, /healthz, /readyz
EXPOSE 9464

# SIGTERM: finish the batch, commit, leave the group, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sessionizer"]
CMD ["run"]
