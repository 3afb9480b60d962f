//! The one door to the database. `Store` picks SQLite or PostgreSQL from the URL scheme; each
//! backend has its own file and its own migrations with native types. Nothing outside this
//! module writes SQL.

pub mod blobs;
mod postgres;
mod records;
mod shared;
mod sqlite;

pub use records::*;

use crate::domain::api_key::NewApiKey;
use crate::domain::avatar::artifact_from_output;
use crate::domain::job::{
    Decision, EventSource, FalOutcome, JobErrorCode, JobEvent, JobKind, JobStatus,
};
use chrono::{DateTime, Utc};
use std::time::Duration;
use uuid::Uuid;

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
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sqlite(_) => "Store::Sqlite",
            Self::Postgres(_) => "Store::Postgres",
        })
    }
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Sqlite($store) => $call,
            Store::Postgres($store) => $call,
        }
    };
}

impl Store {
    /// Opens the database named by `url`: `sqlite:path` (created if missing) or
    /// `postgres://…`. Nothing is migrated here.
    pub async fn connect(url: &str, options: &StoreOptions) -> StoreResult<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(
                sqlite::SqliteStore::connect(url, options).await?,
            ))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(
                postgres::PgStore::connect(url, options).await?,
            ))
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        dispatch!(self, s => s.migrate().await)
    }

    /// Whether the database answers and every embedded migration has been applied.
    pub async fn readiness(&self) -> StoreResult<Readiness> {
        dispatch!(self, s => s.readiness().await)
    }

    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    // API keys.

    /// Makes a new key named `name`; its secret is in the answer and nowhere else.
    pub async fn issue_api_key(&self, name: &str) -> StoreResult<(ApiKeyRecord, NewApiKey)> {
        let new = NewApiKey::generate();
        let record = ApiKeyRecord {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            prefix: new.prefix.clone(),
            created_at: crate::domain::now(),
            revoked_at: None,
        };
        dispatch!(self, s => s.create_api_key(&record, &new.hash.0).await)?;
        Ok((record, new))
    }

    pub async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        dispatch!(self, s => s.list_api_keys().await)
    }

    /// Revokes the key whose id or prefix is given; false when none matches or it was already
    /// revoked.
    pub async fn revoke_api_key(&self, id_or_prefix: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        dispatch!(self, s => s.revoke_api_key(id_or_prefix, at).await)
    }

    /// The live (not revoked) key with this hash.
    pub async fn find_live_api_key(&self, hash: &str) -> StoreResult<Option<ApiKeyCredential>> {
        dispatch!(self, s => s.find_live_api_key(hash).await)
    }

    // Jobs.

    /// Stores new jobs as `pending`, each with its first history row, and the idempotency
    /// record of the request that made them, all in one transaction.
    pub async fn create_jobs(
        &self,
        jobs: &[NewJob],
        idempotency: Option<&IdempotencyCompletion>,
    ) -> StoreResult<Vec<Job>> {
        dispatch!(self, s => s.create_jobs(jobs, idempotency).await)
    }

    /// A job of this tenant.
    pub async fn get_job(&self, tenant: Uuid, id: Uuid) -> StoreResult<Option<Job>> {
        dispatch!(self, s => s.get_job(Some(tenant), id).await)
    }

    /// How many jobs there are in each state, across tenants.
    pub async fn count_jobs_by_status(&self) -> StoreResult<Vec<(String, i64)>> {
        dispatch!(self, s => s.count_jobs_by_status().await)
    }

    pub async fn job_events(&self, job_id: Uuid) -> StoreResult<Vec<JobEventRecord>> {
        dispatch!(self, s => s.job_events(job_id).await)
    }

    /// A page of this tenant's jobs, newest first, starting after `filter.after`.
    pub async fn list_jobs(&self, tenant: Uuid, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        dispatch!(self, s => s.list_jobs(tenant, filter).await)
    }

    /// Applies news to a job with compare-and-set on its status, so that two writers racing
    /// cannot both move it. `tenant` limits the job to one key when the news comes from a client.
    pub async fn apply(
        &self,
        tenant: Option<Uuid>,
        job_id: Uuid,
        transition: &Transition,
    ) -> StoreResult<Option<Applied>> {
        // A lost compare-and-set means someone else moved the job between our read and our
        // write; deciding again on the fresh state is always right, and the rank order bounds
        // how often that can happen.
        for _ in 0..8 {
            let Some(job) = dispatch!(self, s => s.get_job(tenant, job_id).await)? else {
                return Ok(None);
            };
            let decision = crate::domain::job::decide_for(
                job.status,
                job.submit_sent_at.is_some(),
                transition.event,
            );
            let Some(update) = transition.update_for(&job, decision) else {
                return Ok(Some(Applied { decision, job }));
            };
            if let Some(job) = self.update_job(&update).await? {
                return Ok(Some(Applied { decision, job }));
            }
        }
        Err(StoreError::Database(format!(
            "job {job_id} kept changing under a transition"
        )))
    }

    pub(crate) async fn update_job(&self, update: &JobUpdate) -> StoreResult<Option<Job>> {
        let ends = update.avatar_id.is_some()
            && update.status.is_terminal()
            && update.status != update.expect_status;
        let outcome = match update.kind {
            JobKind::Training if ends => Some(avatar_outcome(update)),
            JobKind::Generation if ends && update.status == JobStatus::Failed => {
                Some(AvatarOutcome::GenerationFailed)
            }
            _ => None,
        };
        if let Some(outcome) = outcome
            && update.avatar.is_none()
        {
            let mut update = update.clone();
            update.avatar = Some(outcome);
            return dispatch!(self, s => s.update_job(&update).await);
        }
        dispatch!(self, s => s.update_job(update).await)
    }

    /// Records FAL's answer to a submit. The job may have moved meanwhile: a callback may have
    /// brought the request id first (the answer then only adds the URLs), a client may have
    /// cancelled it, or an earlier, lost submit may have won (then this request is surplus).
    pub async fn record_submission(
        &self,
        job_id: Uuid,
        request: &FalRequest,
        next_poll_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> StoreResult<Submission> {
        for _ in 0..8 {
            let Some(job) = dispatch!(self, s => s.get_job(None, job_id).await)? else {
                return Ok(Submission::JobGone);
            };
            match &job.fal_request_id {
                Some(held) if *held != request.request_id => {
                    return Ok(Submission::Superseded { job });
                }
                Some(_) => {
                    // A callback adopted this request first: keep its state, add the URLs.
                    let mut update = JobUpdate::of(&job, at);
                    update.fal = Some(request.clone());
                    update.release_lease = true;
                    update.touch = false;
                    if let Some(job) = self.update_job(&update).await? {
                        return Ok(Submission::Recorded { job });
                    }
                }
                None if job.status.is_terminal() => return Ok(Submission::JobEnded { job }),
                None => {
                    let transition =
                        Transition::new(JobEvent::SubmitAccepted, EventSource::Dispatcher, at)
                            .with_fal(request.clone())
                            .with_next_attempt(next_poll_at)
                            .with_error(ErrorChange::Clear)
                            .with_detail(serde_json::json!({
                                "fal_request_id": request.request_id,
                                "attempt": job.attempts,
                            }));
                    let decision = crate::domain::job::decide(job.status, transition.event);
                    if let Some(update) = transition.update_for(&job, decision)
                        && let Some(job) = self.update_job(&update).await?
                    {
                        return Ok(Submission::Recorded { job });
                    }
                }
            }
        }
        Err(StoreError::Database(format!(
            "job {job_id} kept changing while a submission was recorded"
        )))
    }

    /// Stores a callback and applies its news in one transaction. Returns what it did.
    pub async fn record_callback(
        &self,
        mut callback: NewCallback,
        news: Option<Transition>,
    ) -> StoreResult<CallbackOutcome> {
        for _ in 0..8 {
            let Some(job) = dispatch!(self, s => s.get_job(None, callback.job_id).await)? else {
                return Err(StoreError::Database(format!("no job {}", callback.job_id)));
            };
            let trusted = callback.signature != SignatureVerdict::Invalid;
            let foreign = trusted
                && match (&job.fal_request_id, &callback.request_id) {
                    (Some(held), Some(sent)) => held != sent,
                    // A genuine callback of another job's request, replayed to this URL: the
                    // request is that job's, never this one's.
                    (None, Some(sent)) => self
                        .job_holding_request(sent)
                        .await?
                        .is_some_and(|holder| holder != job.id),
                    _ => false,
                };
            let Some(news) = news.as_ref().filter(|_| !foreign) else {
                if foreign {
                    callback.outcome = CallbackOutcome::ForeignRequest;
                }
                dispatch!(self, s => s.insert_callback(&callback).await)?;
                return Ok(callback.outcome);
            };
            let mut news = news.clone();
            if job.fal_request_id.is_none()
                && let Some(request_id) = &callback.request_id
            {
                // The callback beat the submit answer: adopt its request.
                news.fal = Some(FalRequest {
                    request_id: request_id.clone(),
                    ..FalRequest::default()
                });
            }
            let decision = crate::domain::job::decide(job.status, news.event);
            // A callback that is only trusted for its request id keeps its own outcome.
            if !matches!(
                callback.outcome,
                CallbackOutcome::Stale | CallbackOutcome::Deferred
            ) {
                callback.outcome = match decision {
                    Decision::MoveTo(_) => CallbackOutcome::Applied,
                    Decision::Duplicate => CallbackOutcome::Duplicate,
                    _ => CallbackOutcome::Stale,
                };
            }
            let mut update = news.update_for(&job, decision).unwrap_or_else(|| {
                // Nothing to change: the callback is only kept, and the job looks as it did.
                let mut keep = JobUpdate::of(&job, news.at);
                keep.touch = false;
                keep
            });
            update.callback = Some(callback.clone());
            match self.update_job(&update).await {
                Ok(Some(_)) => return Ok(callback.outcome),
                Ok(None) => {}
                // Another job took this request id between our look and our write: the same
                // replay as above, lost a race.
                Err(StoreError::UniqueTaken(_)) if update.fal.is_some() => {
                    callback.outcome = CallbackOutcome::ForeignRequest;
                    dispatch!(self, s => s.insert_callback(&callback).await)?;
                    return Ok(callback.outcome);
                }
                Err(err) => return Err(err),
            }
        }
        Err(StoreError::Database(format!(
            "job {} kept changing while a callback was recorded",
            callback.job_id
        )))
    }

    /// Hands a claimed job back for another look at `next`, keeping its state; with
    /// `last_error`, records why the last attempt did not get through.
    pub async fn reschedule(
        &self,
        job: &Job,
        next: DateTime<Utc>,
        last_error: Option<JobError>,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut update = JobUpdate::of(job, at);
        update.next_attempt_at = Some(next);
        update.release_lease = true;
        // Only ever called for a pending job after a submit that surely did not reach FAL.
        update.submit_mark = SubmitMark::Clear;
        update.touch = last_error.is_some();
        if let Some(error) = last_error {
            update.error = ErrorChange::Set(error);
        }
        // A lost compare-and-set means the job moved on: nothing left to reschedule.
        self.update_job(&update).await?;
        Ok(())
    }

    /// Fails a job a worker claimed, only if it is still as the worker read it.
    pub async fn fail_claimed(
        &self,
        job: &Job,
        error: JobError,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut update = JobUpdate::of(job, at);
        update.status = JobStatus::Failed;
        update.release_lease = true;
        update.event = Some((
            EventSource::Dispatcher,
            Some(serde_json::json!({"code": error.code, "message": error.message})),
        ));
        update.error = ErrorChange::Set(error);
        Ok(self.update_job(&update).await?.is_some())
    }

    /// Makes a job that is with FAL due for a look now (a callback could not be trusted).
    pub async fn poll_now(&self, job_id: Uuid) -> StoreResult<()> {
        for _ in 0..8 {
            let Some(job) = dispatch!(self, s => s.get_job(None, job_id).await)? else {
                return Ok(());
            };
            // Only a job FAL has: a pending one would be submitted again.
            if !matches!(job.status, JobStatus::Submitted | JobStatus::Running) {
                return Ok(());
            }
            let now = crate::domain::now();
            let mut update = JobUpdate::of(&job, now);
            update.next_attempt_at = Some(now);
            update.touch = false;
            if self.update_job(&update).await?.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Marks a claimed job's submit as sent, before it leaves: if the answer is never recorded
    /// (a crash, a reset, a timeout), the mark says FAL may hold a request for it. `None` when
    /// the job moved meanwhile (a callback, a cancel): then nothing is sent.
    pub async fn mark_submit_sent(&self, job: &Job, at: DateTime<Utc>) -> StoreResult<Option<Job>> {
        let mut update = JobUpdate::of(job, at);
        update.submit_mark = SubmitMark::Set(at);
        update.touch = false;
        // Only while this claim is the latest: a worker that stalled past its lease must not
        // send beside the one that took the job over.
        update.expect_attempts = Some(job.attempts);
        self.update_job(&update).await
    }

    /// Keeps a job whose submit may have reached FAL from being sent again until `until`,
    /// waiting for FAL's callback to name the request; says so in its history.
    pub async fn hold_unconfirmed_submit(
        &self,
        job: &Job,
        until: DateTime<Utc>,
        last_error: Option<JobError>,
        detail: serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut update = JobUpdate::of(job, at);
        update.next_attempt_at = Some(until);
        update.release_lease = true;
        update.event = Some((EventSource::Dispatcher, Some(detail)));
        if let Some(error) = last_error {
            update.error = ErrorChange::Set(error);
        }
        Ok(self.update_job(&update).await?.is_some())
    }

    /// Clears the mark of an unconfirmed submit whose wait ended without a word from FAL, so
    /// that the job is sent again; says so in its history.
    pub async fn give_up_unconfirmed_submit(
        &self,
        job: &Job,
        detail: serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        let mut update = JobUpdate::of(job, at);
        update.submit_mark = SubmitMark::Clear;
        update.event = Some((EventSource::Dispatcher, Some(detail)));
        self.update_job(&update).await
    }

    /// The job holding a FAL request, if any.
    pub async fn job_holding_request(&self, request_id: &str) -> StoreResult<Option<Uuid>> {
        dispatch!(self, s => s.job_holding_request(request_id).await)
    }

    pub async fn list_callbacks(&self, job_id: Uuid) -> StoreResult<Vec<CallbackRecord>> {
        dispatch!(self, s => s.list_callbacks(job_id).await)
    }

    /// Leases due jobs for a worker: only the sandbox's jobs in the sandbox, only real ones
    /// elsewhere, so that a database shared by both never sends a sandbox job to the real FAL
    /// nor a real job to the emulator.
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
        dispatch!(self, s => s.claim_jobs(kind, sandbox, now, lease_until, limit).await)
    }

    /// When the next job of this kind of work falls due, if any is waiting.
    pub async fn next_due(
        &self,
        kind: ClaimKind,
        sandbox: bool,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        dispatch!(self, s => s.next_due(kind, sandbox).await)
    }

    // Avatars, photos, batches.

    pub async fn create_avatar(
        &self,
        avatar: &Avatar,
        idempotency: Option<&IdempotencyCompletion>,
    ) -> StoreResult<()> {
        dispatch!(self, s => s.create_avatar(avatar, idempotency).await)
    }

    pub async fn get_avatar(&self, tenant: Uuid, id: Uuid) -> StoreResult<Option<Avatar>> {
        dispatch!(self, s => s.get_avatar(tenant, id).await)
    }

    pub async fn list_avatars(
        &self,
        tenant: Uuid,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<Avatar>> {
        dispatch!(self, s => s.list_avatars(tenant, after, limit).await)
    }

    /// Deletes the avatar; answers its photos (whose bytes the caller removes), `None` if absent.
    pub async fn delete_avatar(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> StoreResult<Option<DeletedAvatar>> {
        dispatch!(self, s => s.delete_avatar(tenant, id).await)
    }

    pub async fn add_photo(&self, photo: &Photo, max_photos: u32) -> StoreResult<PhotoAdded> {
        dispatch!(self, s => s.add_photo(photo, max_photos).await)
    }

    pub async fn list_photos(&self, avatar_id: Uuid) -> StoreResult<Vec<Photo>> {
        dispatch!(self, s => s.list_photos(avatar_id).await)
    }

    pub async fn delete_photo(
        &self,
        avatar_id: Uuid,
        photo_id: Uuid,
    ) -> StoreResult<Option<Photo>> {
        dispatch!(self, s => s.delete_photo(avatar_id, photo_id).await)
    }

    pub async fn start_training(
        &self,
        tenant: Uuid,
        job: &NewJob,
        idempotency: Option<&IdempotencyCompletion>,
    ) -> StoreResult<TrainingStart> {
        dispatch!(self, s => s.start_training(tenant, job, idempotency).await)
    }

    pub async fn create_batch(
        &self,
        batch: &Batch,
        jobs: &[NewJob],
        idempotency: Option<&IdempotencyCompletion>,
    ) -> StoreResult<Vec<Job>> {
        dispatch!(self, s => s.create_batch(batch, jobs, idempotency).await)
    }

    pub async fn avatars_missing_lora_copy(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Avatar>> {
        dispatch!(self, s => s.avatars_missing_lora_copy(now, limit).await)
    }

    pub async fn record_lora_copy(
        &self,
        avatar_id: Uuid,
        lora_url: &str,
        copy: &LoraCopy,
        at: DateTime<Utc>,
        next_check_at: DateTime<Utc>,
    ) -> StoreResult<CopyRecorded> {
        dispatch!(self, s => s.record_lora_copy(avatar_id, lora_url, copy, at, next_check_at).await)
    }

    pub async fn avatars_due_lora_check(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Avatar>> {
        dispatch!(self, s => s.avatars_due_lora_check(now, limit).await)
    }

    pub async fn record_lora_check(
        &self,
        avatar_id: Uuid,
        lora_url: &str,
        at: DateTime<Utc>,
        next_check_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        dispatch!(self, s => s.record_lora_check(avatar_id, lora_url, at, next_check_at).await)
    }

    pub async fn defer_lora_work(
        &self,
        avatar_id: Uuid,
        lora_url: &str,
        until: DateTime<Utc>,
    ) -> StoreResult<()> {
        dispatch!(self, s => s.defer_lora_work(avatar_id, lora_url, until).await)
    }

    pub async fn replace_lora_url(
        &self,
        avatar_id: Uuid,
        expired_url: &str,
        new_url: &str,
        at: DateTime<Utc>,
        next_check_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        dispatch!(self, s => s.replace_lora_url(avatar_id, expired_url, new_url, at, next_check_at).await)
    }

    pub async fn get_batch(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> StoreResult<Option<(Batch, Vec<Job>)>> {
        dispatch!(self, s => s.get_batch(tenant, id).await)
    }

    // Idempotency.

    /// Claims an idempotency key for a request, or says what the earlier request with that key
    /// left behind.
    pub async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> StoreResult<IdempotencyState> {
        dispatch!(self, s => s.claim_idempotency_key(claim).await)
    }

    /// Lets go of a claim whose request ended without creating anything.
    /// Tells other requests with this key that its request is still at work.
    pub async fn renew_idempotency_key(
        &self,
        tenant: Uuid,
        key: &str,
        token: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        dispatch!(self, s => s.renew_idempotency_key(tenant, key, token, at).await)
    }

    /// Frees a key whose request created nothing, if that request still holds it.
    pub async fn release_idempotency_key(
        &self,
        tenant: Uuid,
        key: &str,
        token: Uuid,
    ) -> StoreResult<()> {
        dispatch!(self, s => s.release_idempotency_key(tenant, key, token).await)
    }

    /// Completes a claim with a response (for requests whose work is not a job creation).
    pub async fn complete_idempotency_key(
        &self,
        completion: &IdempotencyCompletion,
    ) -> StoreResult<()> {
        dispatch!(self, s => s.complete_idempotency_key(completion).await)
    }
}

/// What a training's end does to its avatar: an artifact only from what FAL sent.
fn avatar_outcome(update: &JobUpdate) -> AvatarOutcome {
    match update.status {
        JobStatus::Succeeded => {
            let artifact = update
                .result
                .as_ref()
                .and_then(|output| artifact_from_output(&update.endpoint, output));
            match artifact {
                Some(artifact) => AvatarOutcome::Ready(artifact),
                None => AvatarOutcome::Failed {
                    code: JobErrorCode::FalNoArtifact,
                    message: "FAL reported success but its output holds no trained weights".into(),
                },
            }
        }
        JobStatus::Canceled => AvatarOutcome::Canceled,
        _ => match &update.error {
            ErrorChange::Set(error) => AvatarOutcome::Failed {
                code: error.code,
                message: error.message.clone(),
            },
            _ => AvatarOutcome::Failed {
                code: JobErrorCode::TrainingFailed,
                message: "the training failed".into(),
            },
        },
    }
}

/// What readiness found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub pending_migrations: Vec<i64>,
}

/// The news a transition applies, with what it brings along.
#[derive(Debug, Clone)]
pub struct Transition {
    pub event: JobEvent,
    pub source: EventSource,
    pub detail: Option<serde_json::Value>,
    pub at: DateTime<Utc>,
    /// FAL's output, on success.
    pub result: Option<serde_json::Value>,
    pub error: ErrorChange,
    pub fal: Option<FalRequest>,
    pub queue_position: Option<i64>,
    /// When to look at the job next (submit retry or poll), if it goes on.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Set when the news marks a cancel as passed on to FAL.
    pub cancel_forwarded: bool,
}

impl Transition {
    pub fn new(event: JobEvent, source: EventSource, at: DateTime<Utc>) -> Self {
        Self {
            event,
            source,
            detail: None,
            at,
            result: None,
            error: ErrorChange::Keep,
            fal: None,
            queue_position: None,
            next_attempt_at: None,
            cancel_forwarded: false,
        }
    }

    /// The news `outcome` brings: its event, with the output, error or queue position it
    /// carries.
    pub fn of_outcome(outcome: FalOutcome, source: EventSource, at: DateTime<Utc>) -> Self {
        let news = Self::new(outcome.event(), source, at);
        match outcome {
            FalOutcome::Queued { position } => news.with_queue_position(position),
            FalOutcome::Running | FalOutcome::Canceled => news,
            FalOutcome::Succeeded(output) => {
                news.with_result(output).with_error(ErrorChange::Clear)
            }
            FalOutcome::Failed(error) => news.with_error(ErrorChange::Set(error)),
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn with_result(mut self, result: serde_json::Value) -> Self {
        self.result = Some(result);
        self
    }

    pub fn with_error(mut self, error: ErrorChange) -> Self {
        self.error = error;
        self
    }

    pub fn with_fal(mut self, fal: FalRequest) -> Self {
        self.fal = Some(fal);
        self
    }

    pub fn with_queue_position(mut self, position: Option<i64>) -> Self {
        self.queue_position = position;
        self
    }

    pub fn with_next_attempt(mut self, at: DateTime<Utc>) -> Self {
        self.next_attempt_at = Some(at);
        self
    }

    pub fn with_cancel_forwarded(mut self) -> Self {
        self.cancel_forwarded = true;
        self
    }

    /// The write this news makes on `job` under `decision`; `None` when there is nothing to
    /// write. News that moves nothing may still bring a queue position or the next poll time,
    /// and always hands back a worker's lease.
    fn update_for(&self, job: &Job, decision: Decision) -> Option<JobUpdate> {
        let mut update = JobUpdate::of(job, self.at);
        update.release_lease = self.source != EventSource::Api;
        update.queue_position = self.queue_position;
        update.next_attempt_at = self.next_attempt_at;
        update.fal = self.fal.clone();
        if self.cancel_forwarded {
            update.cancel_forwarded_at = Some(self.at);
        }
        // Only what a client can see moves `updated_at`: same news twice does not.
        update.touch = self.cancel_forwarded
            || self.fal.is_some() && job.fal_request_id.is_none()
            || self.queue_position.is_some() && self.queue_position != job.queue_position;
        match decision {
            Decision::MoveTo(to) => {
                update.touch = true;
                update.status = to;
                update.result = self.result.clone();
                update.error = match (&self.error, to) {
                    // A cancelled job did not fail: what its last attempt met is moot.
                    (ErrorChange::Keep, JobStatus::Canceled) => ErrorChange::Clear,
                    (error, _) => error.clone(),
                };
                update.event = Some((self.source, self.detail.clone()));
            }
            Decision::RecordCancelRequest if job.cancel_requested_at.is_none() => {
                update.touch = true;
                update.cancel_requested_at = Some(self.at);
                update.event = Some((self.source, self.detail.clone()));
            }
            _ if self.source == EventSource::Api => return None,
            _ => {}
        }
        Some(update)
    }
}

/// What became of a submit answer.
#[derive(Debug, Clone)]
pub enum Submission {
    /// The job now holds this request.
    Recorded { job: Job },
    /// The job already holds another request: this one is surplus and must be cancelled.
    Superseded { job: Job },
    /// The job ended (a client cancelled it) before the answer came: cancel this request.
    JobEnded { job: Job },
    /// The job no longer exists.
    JobGone,
}

/// The outcome of [`Store::apply`]: what was decided and the job as it now stands.
#[derive(Debug, Clone)]
pub struct Applied {
    pub decision: Decision,
    pub job: Job,
}

impl Applied {
    pub fn moved_to(&self) -> Option<JobStatus> {
        match self.decision {
            Decision::MoveTo(to) => Some(to),
            _ => None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn store_with_a_pending_job() -> (Store, Job, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("falgate-store-{}.db", Uuid::now_v7()));
        let store = Store::connect(
            &format!("sqlite:{}", path.display()),
            &StoreOptions::default(),
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let (key, _) = store.issue_api_key("t").await.unwrap();
        let new = NewJob {
            id: Uuid::now_v7(),
            tenant: key.id,
            kind: JobKind::Raw,
            avatar_id: None,
            batch_id: None,
            endpoint: "fal-ai/flux-lora".into(),
            input: serde_json::json!({"prompt": "p"}),
            sandbox: false,
            idempotency_key: None,
            created_at: crate::domain::now(),
        };
        let job = store.create_jobs(&[new], None).await.unwrap().remove(0);
        (store, job, path)
    }

    async fn forget(store: Store, path: std::path::PathBuf) {
        store.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    #[tokio::test]
    async fn a_write_decided_before_a_submit_left_does_not_land_after_it() {
        let (store, read_before, path) = store_with_a_pending_job().await;
        let now = crate::domain::now();
        store
            .mark_submit_sent(&read_before, now)
            .await
            .unwrap()
            .unwrap();
        // A cancel decided on the read from before the mark: the job is no longer as read.
        let mut cancel = JobUpdate::of(&read_before, now);
        cancel.status = JobStatus::Canceled;
        assert!(store.update_job(&cancel).await.unwrap().is_none());
        // Decided again on a fresh read, the cancel is only recorded.
        let transition = Transition::new(JobEvent::CancelRequested, EventSource::Api, now);
        let applied = store
            .apply(None, read_before.id, &transition)
            .await
            .unwrap();
        let applied = applied.unwrap();
        assert_eq!(applied.decision, Decision::RecordCancelRequest);
        assert_eq!(applied.job.status, JobStatus::Pending);
        forget(store, path).await;
    }

    #[tokio::test]
    async fn only_the_latest_claim_may_mark_a_submit_as_sent() {
        let (store, job, path) = store_with_a_pending_job().await;
        let now = crate::domain::now();
        let lease = Duration::from_millis(1);
        let stalled = store
            .claim_jobs(ClaimKind::Submit, false, now, lease, 1)
            .await
            .unwrap()
            .remove(0);
        // Its lease runs out; another worker claims the job and sends it.
        let later = now + chrono::TimeDelta::seconds(1);
        let current = store
            .claim_jobs(ClaimKind::Submit, false, later, lease, 1)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(current.attempts, stalled.attempts + 1);
        // The stalled worker wakes up first: it may no longer send.
        assert!(
            store
                .mark_submit_sent(&stalled, later)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .mark_submit_sent(&current, later)
                .await
                .unwrap()
                .is_some()
        );
        let marked = store.get_job(job.tenant, job.id).await.unwrap().unwrap();
        assert!(marked.submit_sent_at.is_some());
        forget(store, path).await;
    }

    #[test]
    fn passwords_never_reach_error_messages() {
        let redacted = redact_url("postgres://app:hunter2@db:5432/falgate");
        assert!(!redacted.contains("hunter2"));
        assert!(redacted.contains("db:5432"));
    }
}
