//! Jobs: creating them, reading them, and the leases workers claim them with. How news moves a
//! job is in `transitions.rs`.

use super::db::{Arg, NewJobRows, Tx};
use super::idempotency::complete_idempotency;
use super::{IdempotencyCompletion, Store, StoreError, StoreResult};
use crate::domain::job::{EventSource, JobKind, JobStatus};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use std::sync::LazyLock;
use std::time::Duration;
use uuid::Uuid;

pub use crate::domain::job::JobError;

/// The columns every job query selects, in `JobRow`'s order.
pub(super) const JOB_COLUMNS: &str = "id, tenant, kind, avatar_id, batch_id, endpoint, input, \
    status, fal_request_id, status_url, response_url, cancel_url, queue_position, result, \
    error_code, error_message, error_detail, attempts, next_attempt_at, lease_until, \
    cancel_requested_at, cancel_forwarded_at, submit_sent_at, sandbox, idempotency_key, \
    created_at, updated_at, submitted_at, started_at, finished_at";

pub(super) static SELECT_JOB_BY_ID: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"));

/// A job as stored.
///
/// Events keep it as their snapshot (`store/events.rs`), and read it back for weeks: a field
/// added here needs `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub tenant: Uuid,
    pub kind: JobKind,
    pub avatar_id: Option<Uuid>,
    /// The generation batch the job belongs to.
    pub batch_id: Option<Uuid>,
    pub endpoint: String,
    /// The exact input sent (or to be sent) to FAL.
    pub input: Value,
    pub status: JobStatus,
    pub fal_request_id: Option<String>,
    pub status_url: Option<String>,
    pub response_url: Option<String>,
    pub cancel_url: Option<String>,
    pub queue_position: Option<i64>,
    pub result: Option<Value>,
    pub error: Option<JobError>,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub lease_until: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// When the cancel was passed on to FAL.
    pub cancel_forwarded_at: Option<DateTime<Utc>>,
    /// When a submit was sent whose answer was never recorded: FAL may hold a request for
    /// this job.
    pub submit_sent_at: Option<DateTime<Utc>>,
    pub sandbox: bool,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What the API hands the store to create a job.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub tenant: Uuid,
    pub kind: JobKind,
    pub avatar_id: Option<Uuid>,
    pub batch_id: Option<Uuid>,
    pub endpoint: String,
    pub input: Value,
    pub sandbox: bool,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl NewJob {
    /// The job as it stands once stored: `pending`, due at once.
    pub fn to_pending_job(&self) -> Job {
        Job {
            id: self.id,
            tenant: self.tenant,
            kind: self.kind,
            avatar_id: self.avatar_id,
            batch_id: self.batch_id,
            endpoint: self.endpoint.clone(),
            input: self.input.clone(),
            status: JobStatus::Pending,
            fal_request_id: None,
            status_url: None,
            response_url: None,
            cancel_url: None,
            queue_position: None,
            result: None,
            error: None,
            attempts: 0,
            next_attempt_at: Some(self.created_at),
            lease_until: None,
            cancel_requested_at: None,
            cancel_forwarded_at: None,
            submit_sent_at: None,
            sandbox: self.sandbox,
            idempotency_key: self.idempotency_key.clone(),
            created_at: self.created_at,
            updated_at: self.created_at,
            submitted_at: None,
            started_at: None,
            finished_at: None,
        }
    }
}

/// FAL's handle on a request: its id and the URLs its submit answer gave (absent when the id
/// was learned from a callback).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FalRequest {
    pub request_id: String,
    pub status_url: Option<String>,
    pub response_url: Option<String>,
    pub cancel_url: Option<String>,
}

/// Which due jobs a worker claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// `pending` jobs due for a submit attempt.
    Submit,
    /// `submitted`/`running` jobs due for a look at FAL (or with a cancel to pass on).
    Poll,
}

/// Which jobs to list: filters and a keyset cursor (the id of the last job already seen).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub kind: Option<JobKind>,
    pub status: Option<JobStatus>,
    pub avatar_id: Option<Uuid>,
    pub after: Option<Uuid>,
    pub limit: u32,
}

#[derive(sqlx::FromRow)]
pub(super) struct JobRow {
    id: Uuid,
    tenant: Uuid,
    kind: String,
    avatar_id: Option<Uuid>,
    batch_id: Option<Uuid>,
    endpoint: String,
    input: Json<Value>,
    status: String,
    fal_request_id: Option<String>,
    status_url: Option<String>,
    response_url: Option<String>,
    cancel_url: Option<String>,
    queue_position: Option<i64>,
    result: Option<Json<Value>>,
    error_code: Option<String>,
    error_message: Option<String>,
    error_detail: Option<Json<Value>>,
    attempts: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    lease_until: Option<DateTime<Utc>>,
    cancel_requested_at: Option<DateTime<Utc>>,
    cancel_forwarded_at: Option<DateTime<Utc>>,
    submit_sent_at: Option<DateTime<Utc>>,
    sandbox: bool,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    submitted_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, Self::Error> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Corrupt(format!("job {}: {what}: {e}", row.id))
        };
        let kind = row.kind.parse().map_err(|e| corrupt("kind", &e))?;
        let status = row.status.parse().map_err(|e| corrupt("status", &e))?;
        let error = match row.error_code.as_deref() {
            Some(code) => Some(JobError {
                code: code.parse().map_err(|e| corrupt("error code", &e))?,
                message: row.error_message.clone().unwrap_or_default(),
                detail: row.error_detail.clone().map(|j| j.0),
            }),
            None => None,
        };
        Ok(Job {
            id: row.id,
            tenant: row.tenant,
            kind,
            avatar_id: row.avatar_id,
            batch_id: row.batch_id,
            endpoint: row.endpoint,
            input: row.input.0,
            status,
            fal_request_id: row.fal_request_id,
            status_url: row.status_url,
            response_url: row.response_url,
            cancel_url: row.cancel_url,
            queue_position: row.queue_position,
            result: row.result.map(|j| j.0),
            error,
            attempts: row.attempts,
            next_attempt_at: row.next_attempt_at,
            lease_until: row.lease_until,
            cancel_requested_at: row.cancel_requested_at,
            cancel_forwarded_at: row.cancel_forwarded_at,
            submit_sent_at: row.submit_sent_at,
            sandbox: row.sandbox,
            idempotency_key: row.idempotency_key,
            created_at: row.created_at,
            updated_at: row.updated_at,
            submitted_at: row.submitted_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
        })
    }
}

/// Rows read back into jobs; the first that does not parse spoils the lot.
pub(super) fn jobs_from_rows(rows: Vec<JobRow>) -> StoreResult<Vec<Job>> {
    rows.into_iter().map(Job::try_from).collect()
}

impl Store {
    /// A job of this tenant.
    pub async fn get_job(&self, tenant: Uuid, id: Uuid) -> StoreResult<Option<Job>> {
        self.find_job(Some(tenant), id).await
    }

    /// A job, of `tenant` when one is given.
    pub(super) async fn find_job(
        &self,
        tenant: Option<Uuid>,
        id: Uuid,
    ) -> StoreResult<Option<Job>> {
        let row: Option<JobRow> = self
            .fetch_optional(&self.dialect().get_job, &[id.into(), tenant.into()])
            .await?;
        row.map(Job::try_from).transpose()
    }

    /// How many jobs there are in each state, across tenants (for metrics).
    pub async fn count_jobs_by_status(&self) -> StoreResult<Vec<(String, i64)>> {
        self.fetch_all(
            "SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status",
            &[],
        )
        .await
    }

    /// A page of this tenant's jobs, newest first, starting after `filter.after`.
    pub async fn list_jobs(&self, tenant: Uuid, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        let rows = self
            .fetch_all(
                &self.dialect().list_jobs,
                &[
                    tenant.into(),
                    filter.kind.map(|k| k.as_str()).into(),
                    filter.status.map(|s| s.as_str()).into(),
                    filter.avatar_id.into(),
                    filter.after.into(),
                    i64::from(filter.limit).into(),
                ],
            )
            .await?;
        jobs_from_rows(rows)
    }

    /// Leases due jobs for a worker: only the sandbox's jobs in the sandbox, only real ones
    /// elsewhere, so that a database shared by both never sends a sandbox job to the real FAL
    /// nor a real job to the emulator. A lease that ran out (its holder died) makes the job
    /// claimable again.
    pub async fn claim_jobs(
        &self,
        kind: ClaimKind,
        sandbox: bool,
        now: DateTime<Utc>,
        lease: Duration,
        limit: u32,
    ) -> StoreResult<Vec<Job>> {
        let lease_until =
            now + chrono::TimeDelta::from_std(lease).unwrap_or(chrono::TimeDelta::MAX);
        let dialect = self.dialect();
        let claim = match kind {
            ClaimKind::Submit => &dialect.claim_submit,
            ClaimKind::Poll => &dialect.claim_poll,
        };
        let mut tx = self.writer().begin().await?;
        let rows = tx
            .conn()
            .fetch_all(
                claim,
                &[
                    now.into(),
                    lease_until.into(),
                    i64::from(limit).into(),
                    sandbox.into(),
                ],
            )
            .await?;
        tx.commit().await?;
        jobs_from_rows(rows)
    }

    /// When the next job of this kind of work falls due, if any is waiting.
    pub async fn next_due(
        &self,
        kind: ClaimKind,
        sandbox: bool,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let dialect = self.dialect();
        let due = match kind {
            ClaimKind::Submit => dialect.next_due_submit,
            ClaimKind::Poll => dialect.next_due_poll,
        };
        let (at,) = self.fetch_one(due, &[sandbox.into()]).await?;
        Ok(at)
    }

    /// The job holding a FAL request, if any.
    pub async fn job_holding_request(&self, request_id: &str) -> StoreResult<Option<Uuid>> {
        let row: Option<(Uuid,)> = self
            .fetch_optional(
                "SELECT id FROM jobs WHERE fal_request_id = $1",
                &[request_id.into()],
            )
            .await?;
        Ok(row.map(|(id,)| id))
    }
}

/// Inserts jobs as `pending` with their first history row and, when the request carried an
/// Idempotency-Key, completes it: inside the caller's transaction, so that all land or none
/// does. A few statements for many jobs, not two per job (see [`insert_new_jobs`]), so that a
/// generation of many images or a shared intake transaction costs few round trips.
pub(super) async fn insert_jobs(
    tx: &mut Tx,
    jobs: &[NewJob],
    idempotency: Option<&IdempotencyCompletion>,
) -> StoreResult<Vec<Job>> {
    insert_new_jobs(tx, jobs).await?;
    if let Some(done) = idempotency {
        complete_idempotency(tx, done).await?;
    }
    Ok(jobs.iter().map(NewJob::to_pending_job).collect())
}

/// Inserts jobs as `pending` with their first history rows, inside the caller's transaction:
/// on SQLite as rows of bound values, 32 jobs to a statement, jobs and history rows apart; on
/// PostgreSQL as JSON arrays of a few kilobytes that the database unpacks
/// (`jsonb_to_recordset`), jobs and history rows in one statement.
pub(super) async fn insert_new_jobs<'j>(
    tx: &mut Tx,
    jobs: impl IntoIterator<Item = &'j NewJob>,
) -> StoreResult<()> {
    let jobs: Vec<&NewJob> = jobs.into_iter().collect();
    let source = EventSource::Api.as_str();
    match &tx.dialect().insert_jobs {
        NewJobRows::Values {
            jobs: insert_jobs,
            events: insert_events,
        } => {
            for chunk in jobs.chunks(insert_jobs.len()) {
                let statement = chunk.len() - 1;
                let mut values: Vec<Arg> = Vec::with_capacity(chunk.len() * NewJobRows::JOB_VALUES);
                let mut history: Vec<Arg> =
                    Vec::with_capacity(chunk.len() * NewJobRows::EVENT_VALUES);
                for job in chunk {
                    let pending = JobStatus::Pending.as_str();
                    let row: [Arg; NewJobRows::JOB_VALUES] = [
                        job.id.into(),
                        job.tenant.into(),
                        job.kind.as_str().into(),
                        job.avatar_id.into(),
                        job.batch_id.into(),
                        (&job.endpoint).into(),
                        Arg::Json(Some(&job.input)),
                        pending.into(),
                        // Due at once.
                        job.created_at.into(),
                        job.sandbox.into(),
                        (&job.idempotency_key).into(),
                        job.created_at.into(),
                    ];
                    values.extend(row);
                    let row: [Arg; NewJobRows::EVENT_VALUES] = [
                        job.id.into(),
                        job.created_at.into(),
                        pending.into(),
                        source.into(),
                    ];
                    history.extend(row);
                }
                tx.conn().execute(&insert_jobs[statement], &values).await?;
                tx.conn()
                    .execute(&insert_events[statement], &history)
                    .await?;
            }
        }
        NewJobRows::Json(insert) => {
            let rows = jobs
                .into_iter()
                .map(InsertedJob::of)
                .collect::<StoreResult<Vec<_>>>()?;
            for chunk in rows_in_small_messages(&rows)? {
                tx.conn()
                    .execute(insert, &[chunk.as_str().into(), source.into()])
                    .await?;
            }
        }
    }
    Ok(())
}

/// Inserts new jobs with their first history rows in one statement with no transaction around
/// it, where the backend allows (PostgreSQL, when they fit one message): a single statement is
/// atomic by itself, so the BEGIN and COMMIT round trips are saved. Answers `false`, having
/// written nothing, where it does not (SQLite needs two statements; many jobs need several).
pub(super) async fn insert_new_jobs_in_one_statement(
    store: &Store,
    jobs: &[&NewJob],
) -> StoreResult<bool> {
    let NewJobRows::Json(insert) = &store.dialect().insert_jobs else {
        return Ok(false);
    };
    let rows = jobs
        .iter()
        .map(|job| InsertedJob::of(job))
        .collect::<StoreResult<Vec<_>>>()?;
    let Ok([rows]) = <[String; 1]>::try_from(rows_in_small_messages(&rows)?) else {
        return Ok(false);
    };
    store
        .writer()
        .execute(
            insert,
            &[rows.as_str().into(), EventSource::Api.as_str().into()],
        )
        .await?;
    Ok(true)
}

/// The most bytes of JSON one insert statement carries, unless a single job is larger.
///
/// The PostgreSQL driver (sqlx 0.9.0) leaves Nagle's algorithm on: a message larger than the
/// socket's send buffer goes out in two writes, the second waits for an ACK that the server
/// delays, and the statement takes 40 ms more. Messages kept well under the default 16 KiB
/// buffer are sent in one write.
const MOST_JSON_PER_STATEMENT: usize = 8 << 10;

/// The rows as JSON arrays of at most [`MOST_JSON_PER_STATEMENT`] bytes (one row at least).
fn rows_in_small_messages(rows: &[InsertedJob<'_>]) -> StoreResult<Vec<String>> {
    let mut chunks = Vec::new();
    let mut current = String::from("[");
    for row in rows {
        let one = serde_json::to_string(row)
            .map_err(|e| StoreError::Database(format!("a new job as JSON: {e}")))?;
        if current.len() > 1 && current.len() + one.len() + 1 > MOST_JSON_PER_STATEMENT {
            current.push(']');
            chunks.push(std::mem::replace(&mut current, String::from("[")));
        }
        if current.len() > 1 {
            current.push(',');
        }
        current.push_str(&one);
    }
    if current.len() > 1 {
        current.push(']');
        chunks.push(current);
    }
    Ok(chunks)
}

/// A new job as PostgreSQL's insert statement reads it from its JSON parameter: pending and due
/// at once, as [`NewJob::to_pending_job`] describes it.
#[derive(serde::Serialize)]
struct InsertedJob<'a> {
    id: Uuid,
    tenant: Uuid,
    kind: &'static str,
    avatar_id: Option<Uuid>,
    batch_id: Option<Uuid>,
    endpoint: &'a str,
    /// The input as JSON text, stored as is.
    input: String,
    status: &'static str,
    sandbox: bool,
    idempotency_key: Option<&'a str>,
    created_at: DateTime<Utc>,
}

impl<'a> InsertedJob<'a> {
    fn of(job: &'a NewJob) -> StoreResult<Self> {
        Ok(Self {
            id: job.id,
            tenant: job.tenant,
            kind: job.kind.as_str(),
            avatar_id: job.avatar_id,
            batch_id: job.batch_id,
            endpoint: &job.endpoint,
            input: serde_json::to_string(&job.input)
                .map_err(|e| StoreError::Database(format!("a job's input as JSON: {e}")))?,
            status: JobStatus::Pending.as_str(),
            sandbox: job.sandbox,
            idempotency_key: job.idempotency_key.as_deref(),
            created_at: job.created_at,
        })
    }
}
