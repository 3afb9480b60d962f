//! falgate: a durable REST gateway in front of FAL.

pub mod app;
pub mod blobs;
pub mod config;
pub mod domain;
pub mod emulator;
pub mod error;
pub mod fal;
pub mod http;
pub mod state;
pub mod store;
pub mod webhooks;
pub mod worker;

/// Installs the one TLS crypto provider (ring) for every TLS client in the process. Idempotent;
/// call it before building an HTTP or database client.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// mimalloc instead of the system allocator, for the server, its tests and its benchmarks
/// alike: a request makes and frees many small values (the parsed body, the job, its JSON), and
/// glibc's allocator spent a sixth of intake's CPU time on them (`cargo bench --bench
/// throughput` under `perf`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
