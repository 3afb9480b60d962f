//! FAL's callbacks, kept byte for byte with what they did, in the same transaction as the news
//! they bring.

use super::db::Tx;
use super::transitions::JobUpdate;
use super::{FalRequest, Store, StoreError, StoreResult, Transition};
use crate::domain::job::Decision;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

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

impl Store {
    /// Stores a callback and applies its news in one transaction. Returns what it did.
    pub async fn record_callback(
        &self,
        mut callback: NewCallback,
        news: Option<Transition>,
    ) -> StoreResult<CallbackOutcome> {
        for _ in 0..8 {
            let Some(job) = self.find_job(None, callback.job_id).await? else {
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
                self.keep_callback(&callback).await?;
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
                    self.keep_callback(&callback).await?;
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

    /// Keeps a callback that moves nothing.
    async fn keep_callback(&self, callback: &NewCallback) -> StoreResult<()> {
        let mut tx = self.writer().begin().await?;
        insert_callback(&mut tx, callback).await?;
        tx.commit().await
    }

    pub async fn list_callbacks(&self, job_id: Uuid) -> StoreResult<Vec<CallbackRecord>> {
        self.fetch_all(
            "SELECT id, received_at, request_id, body, signature, outcome FROM fal_callbacks \
             WHERE job_id = $1 ORDER BY id",
            &[job_id.into()],
        )
        .await
    }
}

pub(super) async fn insert_callback(tx: &mut Tx, callback: &NewCallback) -> StoreResult<()> {
    tx.conn()
        .execute(
            "INSERT INTO fal_callbacks (id, job_id, received_at, request_id, headers, body, \
             signature, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                callback.id.into(),
                callback.job_id.into(),
                callback.received_at.into(),
                (&callback.request_id).into(),
                (&callback.headers).into(),
                callback.body.as_slice().into(),
                callback.signature.as_str().into(),
                callback.outcome.as_str().into(),
                callback.detail.as_ref().into(),
            ],
        )
        .await?;
    Ok(())
}
