//! SQLite: the embedded default. WAL mode so readers never wait for the writer, a busy timeout
//! so writers queue instead of failing, and `BEGIN IMMEDIATE` for every read-then-write
//! transaction so that two writers never deadlock upgrading a read lock. The logic is shared
//! with PostgreSQL (`shared.rs`); only what differs lives here.

use super::records::{
    AvatarRow, IdempotencyRow, JobEventRow, JobRow, avatar_columns, job_columns, photo_columns,
};
use super::shared::{shared_store_helpers, shared_store_methods};
use super::*;
use crate::domain::avatar::TrainedArtifact;
use crate::domain::job::EventSource;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use std::str::FromStr;

type Db = sqlx::Sqlite;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// The queries whose SQLite spelling differs from PostgreSQL's.
mod sql {
    use super::{avatar_columns, job_columns};

    /// An avatar's owner and training, read under a lock on its row.
    pub const LOCK_AVATAR: &str =
        "SELECT tenant, status, training_job_id, lora_copy_key FROM avatars WHERE id = $1";

    pub const GET_JOB: &str = concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE id = $1 AND ($2 IS NULL OR tenant = $2)"
    );
    pub const LIST_JOBS: &str = concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE tenant = $1 AND ($2 IS NULL OR kind = $2) \
        AND ($3 IS NULL OR status = $3) AND ($4 IS NULL OR avatar_id = $4) \
        AND ($5 IS NULL OR id < $5) ORDER BY id DESC LIMIT $6"
    );
    pub const LIST_AVATARS: &str = concat!(
        "SELECT ",
        avatar_columns!(),
        " FROM avatars WHERE tenant = $1 AND ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
    );
    pub const UPDATE_JOB: &str = "UPDATE jobs SET status = $3, \
        updated_at = CASE WHEN $21 THEN $4 ELSE updated_at END, \
        submit_sent_at = CASE WHEN $3 <> 'pending' OR $22 THEN NULL \
        ELSE COALESCE($23, submit_sent_at) END, \
        fal_request_id = COALESCE(fal_request_id, $5), \
        status_url = COALESCE($6, status_url), \
        response_url = COALESCE($7, response_url), \
        cancel_url = COALESCE($8, cancel_url), \
        queue_position = CASE WHEN $3 IN ('pending', 'submitted') \
        THEN COALESCE($9, queue_position) ELSE NULL END, \
        result = COALESCE($10, result), \
        error_code = CASE WHEN $11 THEN $12 ELSE error_code END, \
        error_message = CASE WHEN $11 THEN $13 ELSE error_message END, \
        error_detail = CASE WHEN $11 THEN $14 ELSE error_detail END, \
        next_attempt_at = CASE WHEN $15 THEN NULL ELSE COALESCE($16, next_attempt_at) END, \
        lease_until = CASE WHEN $15 OR $17 THEN NULL ELSE lease_until END, \
        cancel_requested_at = COALESCE(cancel_requested_at, $18), \
        cancel_forwarded_at = COALESCE(cancel_forwarded_at, $19), \
        submitted_at = CASE WHEN $3 = 'submitted' THEN COALESCE(submitted_at, $4) \
        ELSE submitted_at END, \
        started_at = CASE WHEN $3 = 'running' THEN COALESCE(started_at, $4) \
        ELSE started_at END, \
        finished_at = CASE WHEN $15 THEN COALESCE(finished_at, $4) ELSE finished_at END \
        WHERE id = $1 AND status = $2 AND fal_request_id IS $20 \
        AND (submit_sent_at IS NULL) = $24 AND ($25 IS NULL OR attempts = $25)";
    pub const CLAIM_SUBMIT: &str = concat!(
        "UPDATE jobs SET lease_until = $2, attempts = attempts + 1 WHERE id IN (\
        SELECT id FROM jobs WHERE status = 'pending' AND next_attempt_at <= $1 \
        AND (lease_until IS NULL OR lease_until <= $1) AND sandbox = $4 \
        ORDER BY next_attempt_at LIMIT $3) RETURNING ",
        job_columns!()
    );
    pub const CLAIM_POLL: &str = concat!(
        "UPDATE jobs SET lease_until = $2 WHERE id IN (\
        SELECT id FROM jobs WHERE status IN ('submitted', 'running') \
        AND next_attempt_at <= $1 \
        AND (lease_until IS NULL OR lease_until <= $1) AND sandbox = $4 \
        ORDER BY next_attempt_at LIMIT $3) RETURNING ",
        job_columns!()
    );
    pub const NEXT_DUE_SUBMIT: &str = "SELECT MIN(MAX(next_attempt_at, COALESCE(lease_until, next_attempt_at))) \
        FROM jobs WHERE status = 'pending' AND next_attempt_at IS NOT NULL AND sandbox = $1";
    pub const NEXT_DUE_POLL: &str = "SELECT MIN(MAX(next_attempt_at, COALESCE(lease_until, next_attempt_at))) \
        FROM jobs WHERE status IN ('submitted', 'running') \
        AND next_attempt_at IS NOT NULL AND sandbox = $1";
}

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(url: &str, options: &StoreOptions) -> StoreResult<Self> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::UnsupportedUrl(format!("{url}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let path = connect.get_filename().to_path_buf();
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| {
                // SQLite says only "unable to open database file"; opening the file ourselves
                // gives the operating system's reason (no such directory, permission denied).
                let reason = match std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                {
                    Err(os) => os.to_string(),
                    Ok(_) => e.to_string(),
                };
                StoreError::Open(format!(
                    "cannot open the SQLite database file {}: {reason}",
                    path.display()
                ))
            })?;
        Ok(Self { pool })
    }

    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, Db>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    shared_store_methods!();
}

shared_store_helpers!();
