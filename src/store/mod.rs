//! The one door to the database. `Store` picks SQLite or PostgreSQL from the URL scheme; each
//! backend has its own file (`sqlite.rs`, `postgres.rs`) with its connection, its migrations
//! (native types in each), the few statements it spells its own way, and how a write
//! transaction starts. Everything else is written once, one file per resource, over `db.rs`.
//! Nothing outside this module writes SQL.

mod api_key_cache;
mod api_keys;
mod avatars;
mod batches;
mod callbacks;
mod db;
mod events;
mod history;
mod idempotency;
mod intake;
mod jobs;
mod lora_copies;
mod photos;
mod postgres;
mod retention;
mod sequencer;
mod sqlite;
mod transitions;
mod webhook_deliveries;
mod webhook_endpoints;

pub use api_key_cache::{ApiKeyCache, TRUSTED_FOR as API_KEY_TRUSTED_FOR};
pub use api_keys::*;
pub use avatars::*;
pub use batches::*;
pub use callbacks::*;
pub use events::{EndpointSnapshot, Event, EventFilter, EventSnapshot};
pub use history::*;
pub use idempotency::*;
pub use jobs::*;
pub use lora_copies::*;
pub use photos::*;
pub use retention::Pruned;
pub use sequencer::NewEvents;
pub use transitions::*;
pub use webhook_deliveries::{DeliveryOutcome, DeliveryWork, WebhookAttempt};
pub use webhook_endpoints::{EndpointChange, WebhookEndpoint};

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the connection: an outage, not a bug.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A row that does not parse back into our types: a bug or a hand-edited database.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A write would give a second row a value that must be unique (a FAL request id that
    /// another job holds, for instance).
    #[error("unique value taken: {0}")]
    UniqueTaken(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("unsupported database URL `{0}`: use sqlite:… or postgres://…")]
    UnsupportedUrl(String),
    /// The database the URL names cannot be opened at start; the message says which one,
    /// where, and why, never the password.
    #[error("DATABASE_URL: {0}")]
    Open(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => Self::Unavailable(err.to_string()),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                Self::Corrupt(err.to_string())
            }
            sqlx::Error::Database(ref db) if db.is_unique_violation() => {
                Self::UniqueTaken(db.message().to_owned())
            }
            other => Self::Database(other.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        Self::Migration(err.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Connection settings that do not belong in the URL.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// How long the first connection, made at start to say what is wrong, may take.
    pub connect_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// The database, whichever it is.
#[derive(Clone)]
pub struct Store {
    pools: Pools,
    /// The queue to the task that stores new jobs in shared transactions (`intake.rs`).
    intake: std::sync::Arc<std::sync::OnceLock<intake::Queue>>,
    /// The wake-up of the task that numbers events on PostgreSQL (`sequencer.rs`).
    sequencer: std::sync::Arc<std::sync::OnceLock<sequencer::Wake>>,
    /// The tenants whose events this process has just seen become visible (see
    /// [`Store::new_events`]).
    visible_events: std::sync::Arc<tokio::sync::broadcast::Sender<uuid::Uuid>>,
}

#[derive(Clone)]
enum Pools {
    Sqlite(sqlite::SqlitePools),
    Postgres(sqlx::PgPool),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.pools {
            Pools::Sqlite(_) => "Store::Sqlite",
            Pools::Postgres(_) => "Store::Postgres",
        })
    }
}

impl Store {
    /// Opens the database named by `url`: `sqlite:path` (created if missing) or
    /// `postgres://…`. Nothing is migrated here.
    pub async fn connect(url: &str, options: &StoreOptions) -> StoreResult<Self> {
        let pools = if url.starts_with("sqlite:") {
            Pools::Sqlite(sqlite::SqlitePools::connect(url, options).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Pools::Postgres(postgres::connect(url, options).await?)
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        Ok(Self {
            pools,
            intake: Default::default(),
            sequencer: Default::default(),
            visible_events: std::sync::Arc::new(tokio::sync::broadcast::Sender::new(
                sequencer::NEWS_BACKLOG,
            )),
        })
    }

    /// The same database, with background tasks of its own yet to start: what a background
    /// task holds, so that it does not keep its own wake-up open.
    fn without_tasks(&self) -> Self {
        Self {
            pools: self.pools.clone(),
            intake: Default::default(),
            sequencer: Default::default(),
            visible_events: self.visible_events.clone(),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.pools {
            Pools::Sqlite(_) => "sqlite",
            Pools::Postgres(_) => "postgres",
        }
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.pools {
            Pools::Sqlite(_) => &sqlite::MIGRATOR,
            Pools::Postgres(_) => &postgres::MIGRATOR,
        }
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        // Migrations write, so they take the writer's connection like any other write.
        match self.writer() {
            db::Writer::Sqlite(pool) => self.migrator().run(pool).await?,
            db::Writer::Postgres(pool) => self.migrator().run(pool).await?,
        }
        Ok(())
    }

    /// Whether the database answers and every embedded migration has been applied.
    pub async fn readiness(&self) -> StoreResult<Readiness> {
        let mut conn = self.reader().await?;
        conn.conn().execute("SELECT 1", &[]).await?;
        let applied: Vec<(i64,)> = conn
            .conn()
            .fetch_all("SELECT version FROM _sqlx_migrations WHERE success", &[])
            .await
            .unwrap_or_default();
        Ok(Readiness {
            pending_migrations: self
                .migrator()
                .iter()
                .map(|m| m.version)
                .filter(|v| !applied.contains(&(*v,)))
                .collect(),
        })
    }

    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite(pools) => pools.close().await,
            Pools::Postgres(pool) => pool.close().await,
        }
    }
}

/// What readiness found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub pending_migrations: Vec<i64>,
}

/// A URL fit for an error message: the password, if any, is replaced.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("redacted"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// A migrated SQLite store in a file of its own, for the store's unit tests.
#[cfg(test)]
pub(crate) async fn scratch_store() -> (Store, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("falgate-store-{}.db", uuid::Uuid::now_v7()));
    let store = Store::connect(
        &format!("sqlite:{}", path.display()),
        &StoreOptions::default(),
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    (store, path)
}

/// Closes a [`scratch_store`] and removes its files.
#[cfg(test)]
pub(crate) async fn forget_scratch_store(store: Store, path: std::path::PathBuf) {
    store.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_error_messages() {
        let redacted = redact_url("postgres://app:hunter2@db:5432/falgate");
        assert!(!redacted.contains("hunter2"));
        assert!(redacted.contains("db:5432"));
    }
}
