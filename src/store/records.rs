//! The shapes rows take on their way in and out of the database, shared by both backends.

use crate::domain::avatar::{AvatarKind, AvatarStatus, TrainedArtifact};
use crate::domain::job::{EventSource, JobKind, JobStatus};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::StoreError;

/// An API key as listed: never its secret, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKeyRecord {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What authenticating a request needs of a key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyCredential {
    pub id: Uuid,
    pub key_hash: String,
}

pub use crate::domain::job::JobError;

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
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

/// How a write treats `submit_sent_at`, the mark of a submit whose answer is not recorded.
/// Any write that takes the job out of `pending` clears it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SubmitMark {
    #[default]
    Keep,
    /// The answer came, or the submit surely never reached FAL.
    Clear,
    /// A submit is about to leave.
    Set(DateTime<Utc>),
}

/// How a write treats the job's error fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ErrorChange {
    #[default]
    Keep,
    Clear,
    Set(JobError),
}

/// One compare-and-set write to a job: it applies only while the job still has the status and
/// FAL request id it was read with. Everything the backends need to write; every decision about
/// what to write is made above them.
#[derive(Debug, Clone)]
pub(crate) struct JobUpdate {
    pub job_id: Uuid,
    pub kind: JobKind,
    pub avatar_id: Option<Uuid>,
    pub endpoint: String,
    /// What the job's end does to its avatar: a training that ends, a generation that fails.
    pub avatar: Option<AvatarOutcome>,
    pub expect_status: JobStatus,
    pub expect_request_id: Option<String>,
    /// Whether the job was read with a submit in doubt: a write decided without knowing of
    /// one (a cancel, say) must not land once a submit has left.
    pub expect_submit_sent: bool,
    /// The claim the write belongs to (`attempts` counts claims), for a write that only the
    /// current holder of a submit claim may make.
    pub expect_attempts: Option<i32>,
    pub status: JobStatus,
    pub at: DateTime<Utc>,
    pub fal: Option<FalRequest>,
    pub queue_position: Option<i64>,
    pub result: Option<Value>,
    pub error: ErrorChange,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub release_lease: bool,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub cancel_forwarded_at: Option<DateTime<Utc>>,
    pub submit_mark: SubmitMark,
    /// Whether the write moves `updated_at`: only changes a client can see do, so that a
    /// duplicate callback or a poll that learnt nothing leaves the job as it was.
    pub touch: bool,
    /// A history row from `expect_status` to `status`.
    pub event: Option<(EventSource, Option<Value>)>,
    pub callback: Option<NewCallback>,
}

impl JobUpdate {
    /// A write that changes nothing yet, for `job` as read.
    pub fn of(job: &Job, at: DateTime<Utc>) -> Self {
        Self {
            job_id: job.id,
            kind: job.kind,
            avatar_id: job.avatar_id,
            endpoint: job.endpoint.clone(),
            avatar: None,
            expect_status: job.status,
            expect_request_id: job.fal_request_id.clone(),
            expect_submit_sent: job.submit_sent_at.is_some(),
            expect_attempts: None,
            status: job.status,
            at,
            fal: None,
            queue_position: None,
            result: None,
            error: ErrorChange::Keep,
            next_attempt_at: None,
            release_lease: false,
            cancel_requested_at: None,
            cancel_forwarded_at: None,
            submit_mark: SubmitMark::Keep,
            touch: true,
            event: None,
            callback: None,
        }
    }

    pub(super) fn error_columns(&self) -> (bool, Option<&str>, Option<&str>, Option<Json<&Value>>) {
        match &self.error {
            ErrorChange::Keep => (false, None, None, None),
            ErrorChange::Clear => (true, None, None, None),
            ErrorChange::Set(e) => (
                true,
                Some(e.code.as_str()),
                Some(e.message.as_str()),
                e.detail.as_ref().map(Json),
            ),
        }
    }
}

/// Which due jobs a worker claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// `pending` jobs due for a submit attempt.
    Submit,
    /// `submitted`/`running` jobs due for a look at FAL (or with a cancel to pass on).
    Poll,
}

/// How far a callback's signature could be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureVerdict {
    Valid,
    /// Valid, but older than the tolerance: recorded, not trusted.
    Stale,
    Invalid,
}

impl SignatureVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Stale => "stale",
            Self::Invalid => "invalid",
        }
    }
}

/// What a stored callback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// It moved the job.
    Applied,
    /// The job already knew.
    Duplicate,
    /// Older news than the job's state, or a signature too old to trust.
    Stale,
    /// For a FAL request that is not the job's: a duplicate submission.
    ForeignRequest,
    /// Trusted but not usable on its own (no payload): the reconciler asks FAL.
    Deferred,
    /// Refused: bad signature or inconsistent request ids.
    Rejected,
}

impl CallbackOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::ForeignRequest => "foreign_request",
            Self::Deferred => "deferred",
            Self::Rejected => "rejected",
        }
    }
}

/// A callback to store, byte for byte as it arrived.
#[derive(Debug, Clone)]
pub struct NewCallback {
    pub id: Uuid,
    pub job_id: Uuid,
    pub received_at: DateTime<Utc>,
    pub request_id: Option<String>,
    pub headers: Value,
    pub body: Vec<u8>,
    pub signature: SignatureVerdict,
    pub outcome: CallbackOutcome,
    pub detail: Option<Value>,
}

/// A stored callback.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallbackRecord {
    pub id: Uuid,
    pub received_at: DateTime<Utc>,
    pub request_id: Option<String>,
    pub body: Vec<u8>,
    pub signature: String,
    pub outcome: String,
}

/// One line of a job's history.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEventRecord {
    pub at: DateTime<Utc>,
    pub from: Option<JobStatus>,
    pub to: JobStatus,
    pub source: EventSource,
    pub detail: Option<Value>,
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

/// A request claiming an idempotency key.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub tenant: Uuid,
    pub key: String,
    /// This request's own mark on the claim, made fresh for each request.
    pub token: Uuid,
    pub fingerprint: String,
    pub now: DateTime<Utc>,
    /// Records older than this are forgotten (24 h).
    pub expires_before: DateTime<Utc>,
    /// A claim still in flight after this long is taken to be abandoned by a dead process.
    pub abandoned_before: DateTime<Utc>,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyState {
    /// The key is ours now: go ahead.
    Claimed,
    /// Another request with this key is being handled right now.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
    /// The key's request finished; here is its response.
    Completed { status: u16, body: String },
}

/// The response to remember for an idempotency key.
#[derive(Debug, Clone)]
pub struct IdempotencyCompletion {
    pub tenant: Uuid,
    pub key: String,
    /// The claim the response belongs to.
    pub token: Uuid,
    pub status: u16,
    pub body: String,
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

#[derive(sqlx::FromRow)]
pub(super) struct JobEventRow {
    at: DateTime<Utc>,
    from_status: Option<String>,
    to_status: String,
    source: String,
    detail: Option<Json<Value>>,
}

impl TryFrom<JobEventRow> for JobEventRecord {
    type Error = StoreError;

    fn try_from(row: JobEventRow) -> Result<Self, Self::Error> {
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("job event: {e}"));
        Ok(JobEventRecord {
            at: row.at,
            from: row
                .from_status
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| corrupt(&e))?,
            to: row.to_status.parse().map_err(|e| corrupt(&e))?,
            source: row.source.parse().map_err(|e| corrupt(&e))?,
            detail: row.detail.map(|j| j.0),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct IdempotencyRow {
    pub fingerprint: String,
    pub response_status: Option<i32>,
    pub response_body: Option<String>,
    pub created_at: DateTime<Utc>,
    pub locked_at: DateTime<Utc>,
}

impl IdempotencyRow {
    /// What this existing row means to a new claim. `None`: the row is expired or abandoned and
    /// may be taken over.
    pub(super) fn judge(&self, claim: &IdempotencyClaim) -> Option<IdempotencyState> {
        if self.created_at < claim.expires_before {
            return None;
        }
        if self.fingerprint != claim.fingerprint {
            return Some(IdempotencyState::Mismatch);
        }
        match (self.response_status, &self.response_body) {
            (Some(status), Some(body)) => Some(IdempotencyState::Completed {
                status: u16::try_from(status).unwrap_or(500),
                body: body.clone(),
            }),
            _ if self.locked_at < claim.abandoned_before => None,
            _ => Some(IdempotencyState::InFlight),
        }
    }
}

/// The columns every job query selects, in `JobRow`'s order (a macro so that `concat!` can build
/// whole `&'static str` queries from it).
macro_rules! job_columns {
    () => {
        "id, tenant, kind, avatar_id, batch_id, endpoint, input, status, fal_request_id, status_url, \
         response_url, cancel_url, queue_position, result, error_code, error_message, \
         error_detail, attempts, next_attempt_at, lease_until, cancel_requested_at, \
         cancel_forwarded_at, submit_sent_at, sandbox, \
         idempotency_key, created_at, updated_at, submitted_at, started_at, finished_at"
    };
}
pub(super) use job_columns;

/// What the end of an avatar's training does to it.
#[derive(Debug, Clone, PartialEq)]
pub enum AvatarOutcome {
    /// Trained: the artifact FAL produced replaces the old one.
    Ready(TrainedArtifact),
    /// Failed: an avatar with an artifact from an earlier training keeps it and stays ready.
    Failed {
        code: crate::domain::job::JobErrorCode,
        message: String,
    },
    /// Cancelled: back to where it was before the training.
    Canceled,
    /// A generation with the avatar's weights failed: FAL may no longer serve its LoRA file
    /// (FAL does not say so in a documented way), so the file is checked now.
    GenerationFailed,
}

/// An avatar as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Avatar {
    pub id: Uuid,
    pub tenant: Uuid,
    pub name: String,
    pub kind: AvatarKind,
    pub trigger_phrase: String,
    pub status: AvatarStatus,
    pub training_job_id: Option<Uuid>,
    pub lora_url: Option<String>,
    pub lora_config_url: Option<String>,
    pub finetune_id: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// falgate's own copy of the LoRA weights, once taken.
    pub lora_copy: Option<LoraCopy>,
    /// When FAL was last seen serving `lora_url`.
    pub lora_checked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What became of a LoRA copy offered to an avatar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyRecorded {
    /// The copy is the avatar's; `replaced` is the key of the copy it replaced, if another,
    /// whose file is to be removed.
    Kept { replaced: Option<String> },
    /// The avatar's weights changed (or it is gone) meanwhile; `current` is the key of the
    /// copy it holds now, whose file must stay.
    Stale { current: Option<String> },
}

/// Where falgate keeps its copy of a LoRA file, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraCopy {
    pub key: String,
    pub sha256: String,
    pub bytes: i64,
}

#[derive(sqlx::FromRow)]
pub(super) struct AvatarRow {
    id: Uuid,
    tenant: Uuid,
    name: String,
    kind: String,
    trigger_phrase: String,
    status: String,
    training_job_id: Option<Uuid>,
    lora_url: Option<String>,
    lora_config_url: Option<String>,
    finetune_id: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    lora_copy_key: Option<String>,
    lora_copy_sha256: Option<String>,
    lora_copy_bytes: Option<i64>,
    lora_copy_url: Option<String>,
    lora_checked_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<AvatarRow> for Avatar {
    type Error = StoreError;

    fn try_from(row: AvatarRow) -> Result<Self, Self::Error> {
        let corrupt =
            |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("avatar {}: {e}", row.id));
        Ok(Avatar {
            kind: row.kind.parse().map_err(|e| corrupt(&e))?,
            status: row.status.parse().map_err(|e| corrupt(&e))?,
            id: row.id,
            tenant: row.tenant,
            name: row.name,
            trigger_phrase: row.trigger_phrase,
            training_job_id: row.training_job_id,
            lora_url: row.lora_url.clone(),
            lora_config_url: row.lora_config_url,
            finetune_id: row.finetune_id,
            error_code: row.error_code,
            error_message: row.error_message,
            // A copy counts only while it is of the avatar's current weights.
            lora_copy: match (row.lora_copy_key, row.lora_copy_sha256, row.lora_copy_bytes) {
                (Some(key), Some(sha256), Some(bytes))
                    if row.lora_copy_url.is_some() && row.lora_copy_url == row.lora_url =>
                {
                    Some(LoraCopy { key, sha256, bytes })
                }
                _ => None,
            },
            lora_checked_at: row.lora_checked_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// A training photo as stored; its bytes are in the blob store under `storage_key`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Photo {
    pub id: Uuid,
    pub avatar_id: Uuid,
    pub sha256: String,
    pub content_type: String,
    pub width: i32,
    pub height: i32,
    pub bytes: i64,
    pub storage_key: String,
    pub file_name: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// What adding a photo did.
#[derive(Debug, Clone, PartialEq)]
pub enum PhotoAdded {
    Added,
    /// The avatar already has a photo with these bytes.
    Duplicate {
        existing: Uuid,
    },
    /// The avatar has as many photos as it may.
    Full,
    /// The avatar is gone (deleted meanwhile).
    NoAvatar,
}

/// What deleting an avatar leaves to clean up.
#[derive(Debug, Clone)]
pub struct DeletedAvatar {
    pub photos: Vec<Photo>,
    /// The training that was running, to cancel.
    pub training_to_cancel: Option<Uuid>,
    pub lora_copy_key: Option<String>,
}

/// A generation batch.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Batch {
    pub id: Uuid,
    pub tenant: Uuid,
    pub avatar_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// What starting a training did.
#[derive(Debug, Clone)]
pub enum TrainingStart {
    Started(Box<Job>),
    /// The avatar is training already.
    Busy,
    /// No such avatar (or not this tenant's).
    NoAvatar,
}

macro_rules! avatar_columns {
    () => {
        "id, tenant, name, kind, trigger_phrase, status, training_job_id, lora_url, \
         lora_config_url, finetune_id, error_code, error_message, lora_copy_key, \
         lora_copy_sha256, lora_copy_bytes, lora_copy_url, lora_checked_at, created_at, \
         updated_at"
    };
}
pub(super) use avatar_columns;

macro_rules! photo_columns {
    () => {
        "id, avatar_id, sha256, content_type, width, height, bytes, storage_key, file_name, \
         created_at"
    };
}
pub(super) use photo_columns;
