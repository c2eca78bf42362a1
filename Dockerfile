# syntax=docker/dockerfile:1
#
# Static, non-root image of the appconn operator:
#   docker build -t ghcr.io/appconn/appconn:0.1.0 .
#
# Build stage: Alpine's Rust targets musl, which links statically, so the binary needs no libc
# from the runtime image. The toolchain version matches rust-toolchain.toml.
ARG RUST_VERSION=1.95.0
FROM rust:${RUST_VERSION}-alpine AS build
# A C compiler and musl headers for the crates that build C (SQLite, ring).
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and build artefacts between builds; the binary is
# copied out because the target/ mount does not outlive this step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
    && cargo build --release --locked --bin appconn --target "$target" \
    && cp "target/$target/release/appconn" /appconn

# Runtime: distroless "static" has no shell and no libc, only CA certificates (for backends
# over HTTPS), tzdata and the nonroot user 65532. A binary that was not static would not start
# here, which is the point.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /appconn /usr/local/bin/appconn
USER 65532:65532
# mimalloc gives freed memory back to the system at once rather than after 10 ms: a burst (a
# restart's first pass over 10,000 connections) then peaks about 10 MiB lower, at no CPU cost
# the scale benchmark can see. The benchmark starts its operator with the same setting.
ENV MIMALLOC_PURGE_DELAY=0
# Admin server (/livez, /readyz, /metrics) and the store read API.
EXPOSE 8080 8081
ENTRYPOINT ["appconn"]
CMD ["run"]
