//! What the benchmarks share: a database made fresh for a run and removed after, and falgate's
//! configuration against the emulator. Each benchmark uses part of it.
#![allow(dead_code)]

use falgate::config::{Config, Secret};
use falgate::emulator::{EmulatorConfig, EmulatorHandle};

/// falgate on `database_url`, against the FAL emulator at `fal`, serving at `addr` with the
/// callbacks addressed to itself.
pub fn config_against(
    database_url: &str,
    fal: &EmulatorHandle,
    addr: std::net::SocketAddr,
) -> Config {
    let mut config = Config::for_database(database_url);
    config.sandbox = false;
    config.fal_key = Some(EmulatorConfig::default().key);
    config.fal_urls.queue = fal.base_url();
    config.fal_urls.rest = fal.base_url();
    config.fal_urls.jwks = fal.jwks_url();
    config.public_url = Some(format!("http://{addr}").parse().unwrap());
    config.webhook_secrets = vec![Secret::new("bench-webhook-secret-0123456789abcdef")];
    config
}

/// The database of one run: a fresh SQLite file, or, when `FALGATE_BENCH_POSTGRES_URL` names a
/// PostgreSQL server, a fresh database on it.
pub enum Database {
    SqliteFile(std::path::PathBuf),
    Postgres { admin_url: String, name: String },
}

impl Database {
    /// The database and its URL; `prefix` names it.
    pub async fn create(prefix: &str) -> (Self, String) {
        match std::env::var("FALGATE_BENCH_POSTGRES_URL") {
            Ok(admin_url) if !admin_url.is_empty() => {
                let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(&admin_url).await.expect("postgres");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .expect("create the bench database");
                admin.close().await;
                let mut url = reqwest::Url::parse(&admin_url).expect("a postgres URL");
                url.set_path(&format!("/{name}"));
                (Self::Postgres { admin_url, name }, url.to_string())
            }
            _ => {
                let path = std::env::temp_dir().join(format!(
                    "{}-{}.db",
                    prefix.replace('_', "-"),
                    uuid::Uuid::new_v4().simple()
                ));
                let url = format!("sqlite:{}", path.display());
                (Self::SqliteFile(path), url)
            }
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::SqliteFile(_) => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    pub async fn remove(self) {
        match self {
            Self::SqliteFile(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Self::Postgres { admin_url, name } => {
                let admin = sqlx::PgPool::connect(&admin_url).await.expect("postgres");
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await
                .expect("drop the bench database");
                admin.close().await;
            }
        }
    }
}
