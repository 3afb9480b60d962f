# Multi-stage build: compile in the Rust image, run in a slim Debian with only the binary.
# Migrations and Swagger UI are embedded in the binary; nothing else is needed at run time.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
COPY openapi ./openapi
COPY benches ./benches
RUN cargo build --release --locked --bin falgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/falgate --create-home falgate
COPY --from=build /src/target/release/falgate /usr/local/bin/falgate
USER falgate
WORKDIR /var/lib/falgate
ENV FALGATE_LISTEN=0.0.0.0:8080 \
    DATABASE_URL=sqlite:/var/lib/falgate/falgate.db \
    FALGATE_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["falgate"]
CMD ["serve"]
