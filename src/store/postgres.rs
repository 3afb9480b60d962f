//! PostgreSQL: for production and for several replicas. What differs from SQLite lives here:
//! connecting, the migrations, the spelling of a few statements (typed NULL parameters,
//! `IS NOT DISTINCT FROM`, `FOR UPDATE SKIP LOCKED`, `GREATEST`), and how a write transaction
//! starts. Writers race for real here, so every job write is a compare-and-set, claims skip
//! rows another replica holds, and idempotency claims rest on a unique key.

use super::avatars::AVATAR_COLUMNS;
use super::db::{Dialect, EventNumbering, NewJobRows};
use super::jobs::JOB_COLUMNS;
use super::{StoreError, StoreOptions, StoreResult, redact_url};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::sync::LazyLock;

pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub(super) static DIALECT: LazyLock<Dialect> = LazyLock::new(|| Dialect {
    // The jobs and their first history rows in one statement, due at once; `$2` is the rows'
    // source.
    insert_jobs: NewJobRows::Json(
        "WITH new AS (INSERT INTO jobs (id, tenant, kind, avatar_id, batch_id, \
        endpoint, input, status, attempts, next_attempt_at, sandbox, idempotency_key, \
        created_at, updated_at) \
        SELECT j.id, j.tenant, j.kind, j.avatar_id, j.batch_id, j.endpoint, j.input::jsonb, \
        j.status, 0, j.created_at, j.sandbox, j.idempotency_key, j.created_at, \
        j.created_at FROM jsonb_to_recordset($1::jsonb) AS j(id uuid, tenant uuid, kind text, \
        avatar_id uuid, batch_id uuid, endpoint text, input text, status text, \
        sandbox boolean, idempotency_key text, created_at timestamptz) \
        RETURNING id, created_at, status) \
        INSERT INTO job_events (job_id, at, to_status, source) \
        SELECT id, created_at, status, $2 FROM new",
    ),
    lock_avatar: "SELECT tenant, status, training_job_id, lora_copy_key, \
        high_noise_lora_url, high_noise_copy_key FROM avatars \
        WHERE id = $1 FOR UPDATE",
    lock_batch: "SELECT id FROM batches WHERE id = $1 FOR UPDATE",
    event_numbering: EventNumbering::AfterCommit,
    endpoints_to_plan: "SELECT e.id, e.tenant, e.event_types, e.next_sequence, e.resource_id, \
        s.last_sequence \
        FROM webhook_endpoints e \
        JOIN event_sequences s ON s.tenant = e.tenant \
        WHERE e.enabled AND NOT e.finished AND s.last_sequence >= e.next_sequence \
        ORDER BY e.next_sequence LIMIT $1 \
        FOR UPDATE OF e SKIP LOCKED",
    claim_deliveries: "UPDATE webhook_deliveries SET lease_until = $2, attempts = attempts + 1 \
        WHERE id IN (SELECT d.id FROM webhook_deliveries d \
        JOIN webhook_endpoints e ON e.id = d.endpoint_id \
        WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
        AND (d.lease_until IS NULL OR d.lease_until <= $1) AND e.enabled \
        ORDER BY d.next_attempt_at LIMIT $3 \
        FOR UPDATE OF d SKIP LOCKED) RETURNING id, tenant, endpoint_id, event_id, attempts",
    get_job: format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2::uuid IS NULL OR tenant = $2)"
    ),
    list_jobs: format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1 AND ($2::text IS NULL OR kind = $2) \
        AND ($3::text IS NULL OR status = $3) AND ($4::uuid IS NULL OR avatar_id = $4) \
        AND ($5::uuid IS NULL OR id < $5) ORDER BY id DESC LIMIT $6"
    ),
    list_avatars: format!(
        "SELECT {AVATAR_COLUMNS} FROM avatars WHERE tenant = $1 \
        AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
    ),
    update_job: "UPDATE jobs SET status = $3::text, \
        updated_at = CASE WHEN $21::boolean THEN $4 ELSE updated_at END, \
        submit_sent_at = CASE WHEN $3::text <> 'pending' OR $22::boolean THEN NULL \
        ELSE COALESCE($23, submit_sent_at) END, \
        fal_request_id = COALESCE(fal_request_id, $5), \
        status_url = COALESCE($6, status_url), \
        response_url = COALESCE($7, response_url), \
        cancel_url = COALESCE($8, cancel_url), \
        queue_position = CASE WHEN $3::text IN ('pending', 'submitted') \
        THEN COALESCE($9, queue_position) ELSE NULL END, \
        result = COALESCE($10, result), \
        error_code = CASE WHEN $11::boolean THEN $12 ELSE error_code END, \
        error_message = CASE WHEN $11::boolean THEN $13 ELSE error_message END, \
        error_detail = CASE WHEN $11::boolean THEN $14 ELSE error_detail END, \
        next_attempt_at = CASE WHEN $15::boolean THEN NULL ELSE COALESCE($16, next_attempt_at) END, \
        lease_until = CASE WHEN $15::boolean OR $17::boolean THEN NULL ELSE lease_until END, \
        cancel_requested_at = COALESCE(cancel_requested_at, $18), \
        cancel_forwarded_at = COALESCE(cancel_forwarded_at, $19), \
        submitted_at = CASE WHEN $3::text = 'submitted' THEN COALESCE(submitted_at, $4) \
        ELSE submitted_at END, \
        started_at = CASE WHEN $3::text = 'running' THEN COALESCE(started_at, $4) \
        ELSE started_at END, \
        finished_at = CASE WHEN $15::boolean THEN COALESCE(finished_at, $4) ELSE finished_at END \
        WHERE id = $1 AND status = $2 AND fal_request_id IS NOT DISTINCT FROM $20::text \
        AND (submit_sent_at IS NULL) = $24::boolean \
        AND ($25::int4 IS NULL OR attempts = $25::int4)",
    claim_submit: format!(
        "UPDATE jobs SET lease_until = $2, attempts = attempts + 1 WHERE id IN (\
        SELECT id FROM jobs WHERE status = 'pending' AND next_attempt_at <= $1 \
        AND (lease_until IS NULL OR lease_until <= $1) AND sandbox = $4::boolean \
        ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING {JOB_COLUMNS}"
    ),
    claim_poll: format!(
        "UPDATE jobs SET lease_until = $2 WHERE id IN (\
        SELECT id FROM jobs WHERE status IN ('submitted', 'running') \
        AND next_attempt_at <= $1 \
        AND (lease_until IS NULL OR lease_until <= $1) AND sandbox = $4::boolean \
        ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING {JOB_COLUMNS}"
    ),
    next_due_submit: "SELECT MIN(GREATEST(next_attempt_at, lease_until)) \
        FROM jobs WHERE status = 'pending' AND next_attempt_at IS NOT NULL \
        AND sandbox = $1::boolean",
    next_due_poll: "SELECT MIN(GREATEST(next_attempt_at, lease_until)) \
        FROM jobs WHERE status IN ('submitted', 'running') \
        AND next_attempt_at IS NOT NULL AND sandbox = $1::boolean",
});

pub(super) async fn connect(url: &str, options: &StoreOptions) -> StoreResult<PgPool> {
    let connect = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::UnsupportedUrl(format!("{}: {e}", redact_url(url))))?;
    // One connection first, alone and briefly: the pool would retry a refused connection
    // until its acquire timeout and then say only "pool timed out".
    let server = match connect.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", connect.get_host(), connect.get_port()),
    };
    let database = connect
        .get_database()
        .unwrap_or(connect.get_username())
        .to_owned();
    let opened = tokio::time::timeout(
        options.connect_timeout,
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&connect),
    )
    .await;
    let failure = match opened {
        Ok(Ok(first)) => {
            let _ = sqlx::Connection::close(first).await;
            None
        }
        Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("3D000") => {
            Some(format!(
                "the PostgreSQL server at {server} has no database `{database}`: create it, or name another in the URL"
            ))
        }
        Ok(Err(sqlx::Error::Database(db))) => Some(format!(
            "the PostgreSQL server at {server} refused the connection to database `{database}` as user `{}`: {}",
            connect.get_username(),
            db.message()
        )),
        Ok(Err(e)) => Some(format!(
            "cannot reach the PostgreSQL server at {server}: {e}"
        )),
        Err(_) => Some(format!(
            "no answer from the PostgreSQL server at {server} within {} s",
            options.connect_timeout.as_secs_f64()
        )),
    };
    if let Some(message) = failure {
        return Err(StoreError::Open(message));
    }
    PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect)
        .await
        .map_err(|e| StoreError::Open(format!("the PostgreSQL server at {server}: {e}")))
}

/// A plain `BEGIN`: rows a transaction reads before writing are locked with `FOR UPDATE`
/// (the dialect's `lock_avatar`), and job writes are compare-and-sets.
pub(super) async fn begin_write(
    pool: &PgPool,
) -> StoreResult<sqlx::Transaction<'static, sqlx::Postgres>> {
    Ok(pool.begin().await?)
}
