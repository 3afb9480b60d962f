//! Tells the integration tests whether a PostgreSQL server was configured for them, so that
//! without one `cargo test` lists their PostgreSQL variants as ignored instead of passing them
//! empty. `FALGATE_REQUIRE_POSTGRES=1` turns them on too, so that a missing server fails them.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(falgate_postgres_tests)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=FALGATE_TEST_POSTGRES_URL");
    println!("cargo::rerun-if-env-changed=FALGATE_REQUIRE_POSTGRES");
    let configured = std::env::var("FALGATE_TEST_POSTGRES_URL").is_ok_and(|url| !url.is_empty());
    let required = std::env::var("FALGATE_REQUIRE_POSTGRES").as_deref() == Ok("1");
    if configured || required {
        println!("cargo::rustc-cfg=falgate_postgres_tests");
    }
}
