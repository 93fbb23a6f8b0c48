# Multi-stage build of every Chatify binary into one small runtime image; docker-compose.yml
# picks the binary per service with `command`.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential zlib1g-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p gateway-uring -p storage-writer -p storage-reader -p chatify-migrations \
    && mkdir -p /out \
    && cp target/release/gateway-uring target/release/storage-writer \
          target/release/storage-reader target/release/chatify-migrate /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 chatify
COPY --from=build /out/ /usr/local/bin/
USER chatify
