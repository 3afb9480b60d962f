//! What the benchmarks share: a database made fresh for a run and removed after, and falgate's
//! configuration against the emulator. Each benchmark uses part of it.
#![allow(dead_code)]

use falgate::config::{Config, Secret};
use falgate::emulator::{EmulatorConfig, EmulatorHandle};
use std::time::Duration;

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

/// A pool on the run's database for the benchmarks' own statements: the bare handlers'
/// inserts and the setup the product would not do. sqlx types its pools by backend; the code
/// run on them is the same, written once with [`on_pool!`].
#[derive(Clone)]
pub enum Pool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Runs the same sqlx code on whichever backend's pool `$pool` is, bound to `$conn`.
macro_rules! on_pool {
    ($pool:expr, |$conn:ident| $body:expr) => {
        match $pool {
            $crate::support::Pool::Sqlite($conn) => $body,
            $crate::support::Pool::Postgres($conn) => $body,
        }
    };
}
pub(crate) use on_pool;

impl Pool {
    /// A pool of 10 connections configured as falgate's own (WAL, a busy timeout and
    /// `synchronous = NORMAL` on SQLite).
    pub async fn connect(database: &Database, url: &str) -> Self {
        match database {
            Database::SqliteFile(_) => Self::Sqlite(
                sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(10)
                    .connect_with(
                        url.parse::<sqlx::sqlite::SqliteConnectOptions>()
                            .expect("a sqlite URL")
                            .create_if_missing(true)
                            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                            .busy_timeout(Duration::from_secs(10)),
                    )
                    .await
                    .expect("sqlite"),
            ),
            Database::Postgres { .. } => Self::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(10)
                    .connect(url)
                    .await
                    .expect("postgres"),
            ),
        }
    }

    /// Makes the bare handler's table: `columns` with `{id}`, `{json}` and `{at}` standing for
    /// the backend's types of a UUID, a JSON document and a time.
    pub async fn create_bench_rows(&self, columns: &str) {
        let [id, json, at] = match self {
            Self::Sqlite(_) => ["BLOB", "TEXT", "TEXT"],
            Self::Postgres(_) => ["UUID", "JSONB", "TIMESTAMPTZ"],
        };
        let create = format!(
            "CREATE TABLE bench_rows ({})",
            columns
                .replace("{id}", id)
                .replace("{json}", json)
                .replace("{at}", at)
        );
        on_pool!(self, |pool| sqlx::query(sqlx::AssertSqlSafe(
            create.clone()
        ))
        .execute(pool)
        .await
        .map(drop))
        .expect("the bench table");
    }

    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await)
    }
}
