//! SQLite: the embedded default. What differs from PostgreSQL lives here: connecting, the
//! migrations, the spelling of a few statements, and how a write transaction starts.
//!
//! WAL mode lets readers go on while a write is under way. Writes go through a pool of exactly
//! one connection, so writers queue fairly in the pool instead of sleeping in SQLite's busy
//! handler; readers have their own pool, whose connections may not write (`query_only`). The
//! busy timeout still covers other processes on the same file (the CLI, a second replica), and
//! every read-then-write transaction starts with `BEGIN IMMEDIATE`, so that it takes the write
//! lock before it reads rather than failing to upgrade a read lock.

use super::avatars::AVATAR_COLUMNS;
use super::db::{Dialect, EventNumbering, NewJobRows};
use super::jobs::JOB_COLUMNS;
use super::{StoreError, StoreOptions, StoreResult};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The most jobs one insert statement carries: SQLite binds values cheaply, and the text of
/// each statement is prepared once per row count.
pub(super) const ROWS_PER_INSERT: usize = 32;

/// `INSERT INTO jobs … VALUES (…), …` for `rows` new jobs.
fn insert_jobs_values(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|row| {
            let n = |k: usize| format!("${}", row * NewJobRows::JOB_VALUES + k);
            format!(
                "({}, {}, {}, {}, {}, {}, {}, {}, 0, {}, {}, {}, {}, {})",
                n(1),
                n(2),
                n(3),
                n(4),
                n(5),
                n(6),
                n(7),
                n(8),
                n(9),
                n(10),
                n(11),
                n(12),
                n(12)
            )
        })
        .collect();
    format!(
        "INSERT INTO jobs (id, tenant, kind, avatar_id, batch_id, endpoint, input, status, \
         attempts, next_attempt_at, sandbox, idempotency_key, created_at, updated_at) VALUES {}",
        values.join(", ")
    )
}

/// `INSERT INTO job_events … VALUES (…), …` for the first history rows of `rows` new jobs.
fn insert_events_values(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|row| {
            let n = |k: usize| format!("${}", row * NewJobRows::EVENT_VALUES + k);
            format!("({}, {}, {}, {})", n(1), n(2), n(3), n(4))
        })
        .collect();
    format!(
        "INSERT INTO job_events (job_id, at, to_status, source) VALUES {}",
        values.join(", ")
    )
}

pub(super) static DIALECT: LazyLock<Dialect> = LazyLock::new(|| Dialect {
    insert_jobs: NewJobRows::Values {
        jobs: (1..=ROWS_PER_INSERT).map(insert_jobs_values).collect(),
        events: (1..=ROWS_PER_INSERT).map(insert_events_values).collect(),
    },
    lock_avatar: "SELECT tenant, status, training_job_id, lora_copy_key, \
        high_noise_lora_url, high_noise_copy_key FROM avatars \
        WHERE id = $1",
    lock_batch: "SELECT id FROM batches WHERE id = $1",
    event_numbering: EventNumbering::WhenWritten,
    // One writer at a time: what is read here cannot be taken meanwhile.
    endpoints_to_plan: "SELECT e.id, e.tenant, e.event_types, e.next_sequence, e.resource_id, \
        s.last_sequence \
        FROM webhook_endpoints e \
        JOIN event_sequences s ON s.tenant = e.tenant \
        WHERE e.enabled AND NOT e.finished AND s.last_sequence >= e.next_sequence \
        ORDER BY e.next_sequence LIMIT $1",
    claim_deliveries: "UPDATE webhook_deliveries SET lease_until = $2, attempts = attempts + 1 \
        WHERE id IN (SELECT d.id FROM webhook_deliveries d \
        JOIN webhook_endpoints e ON e.id = d.endpoint_id \
        WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
        AND (d.lease_until IS NULL OR d.lease_until <= $1) AND e.enabled \
        ORDER BY d.next_attempt_at LIMIT $3) RETURNING id, tenant, endpoint_id, event_id, attempts",
    get_job: format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2 IS NULL OR tenant = $2)"
    ),
    list_jobs: format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1 AND ($2 IS NULL OR kind = $2) \
        AND ($3 IS NULL OR status = $3) AND ($4 IS NULL OR avatar_id = $4) \
        AND ($5 IS NULL OR id < $5) ORDER BY id DESC LIMIT $6"
    ),
    list_avatars: format!(
        "SELECT {AVATAR_COLUMNS} FROM avatars WHERE tenant = $1 AND ($2 IS NULL OR id < $2) \
        ORDER BY id DESC LIMIT $3"
    ),
    update_job: "UPDATE jobs SET status = $3, \
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
        AND (submit_sent_at IS NULL) = $24 AND ($25 IS NULL OR attempts = $25)",
    claim_submit: format!(
        "UPDATE jobs SET lease_until = $2, attempts = attempts + 1 WHERE id IN (\
        SELECT id FROM jobs WHERE status = 'pending' AND next_attempt_at <= $1 \
        AND (lease_until IS NULL OR lease_until <= $1) AND sandbox = $4 \
        ORDER BY next_attempt_at LIMIT $3) RETURNING {JOB_COLUMNS}"
    ),
    claim_poll: format!(
        "UPDATE jobs SET lease_until = $2 WHERE id IN (\
        SELECT id FROM jobs WHERE status IN ('submitted', 'running') \
        AND next_attempt_at <= $1 \
        AND (lease_until IS NULL OR lease_until <= $1) AND sandbox = $4 \
        ORDER BY next_attempt_at LIMIT $3) RETURNING {JOB_COLUMNS}"
    ),
    next_due_submit: "SELECT MIN(MAX(next_attempt_at, COALESCE(lease_until, next_attempt_at))) \
        FROM jobs WHERE status = 'pending' AND next_attempt_at IS NOT NULL AND sandbox = $1",
    next_due_poll: "SELECT MIN(MAX(next_attempt_at, COALESCE(lease_until, next_attempt_at))) \
        FROM jobs WHERE status IN ('submitted', 'running') \
        AND next_attempt_at IS NOT NULL AND sandbox = $1",
});

/// The two pools: one connection that writes, several that only read.
#[derive(Clone)]
pub struct SqlitePools {
    pub(super) readers: SqlitePool,
    pub(super) writer: SqlitePool,
}

impl SqlitePools {
    pub(super) async fn connect(url: &str, options: &StoreOptions) -> StoreResult<Self> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::UnsupportedUrl(format!("{url}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let path = connect.get_filename().to_path_buf();
        // The writer opens first: it creates the file and turns WAL on, which a reader may not.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            // A writer used to wait for a connection and then for the lock; it now waits only
            // for the connection, so it is given both allowances.
            .acquire_timeout(options.acquire_timeout + BUSY_TIMEOUT)
            .connect_with(connect.clone())
            .await
            .map_err(|e| open_error(&path, e))?;
        // The writer takes one of the configured connections, so the process keeps the file
        // descriptors it was sized for.
        let readers = SqlitePoolOptions::new()
            .max_connections(options.max_connections.saturating_sub(1).max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.pragma("query_only", "ON"))
            .await
            .map_err(|e| open_error(&path, e))?;
        Ok(Self { readers, writer })
    }

    pub(super) async fn close(&self) {
        // The writer closes last: the last connection to close folds the WAL into the file.
        self.readers.close().await;
        self.writer.close().await;
    }
}

/// Why the database file cannot be opened, in the operating system's words where it has any:
/// SQLite says only "unable to open database file".
fn open_error(path: &Path, error: sqlx::Error) -> StoreError {
    let reason = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Err(os) => os.to_string(),
        Ok(_) => error.to_string(),
    };
    StoreError::Open(format!(
        "cannot open the SQLite database file {}: {reason}",
        path.display()
    ))
}

/// `BEGIN IMMEDIATE`: the transaction holds the write lock from its first read, so two
/// read-then-write transactions (with another process) never deadlock upgrading a read lock.
pub(super) async fn begin_write(
    writer: &SqlitePool,
) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
    Ok(writer.begin_with("BEGIN IMMEDIATE").await?)
}
