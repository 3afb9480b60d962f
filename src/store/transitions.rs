//! Transitions: news moving a job, each write a compare-and-set on the job as it was read, so
//! that two writers racing cannot both move it. What to write is decided here, above the SQL;
//! the one statement that writes is the dialect's `update_job`.

use super::avatars::{AvatarOutcome, apply_avatar_outcome};
use super::callbacks::{NewCallback, insert_callback};
use super::db::Tx;
use super::events::{EventSnapshot, NewEvent, avatar_snapshot, completed_batch, insert_events};
use super::history::insert_event;
use super::jobs::{JobRow, SELECT_JOB_BY_ID};
use super::{FalRequest, Job, JobError, Store, StoreError, StoreResult};
use crate::domain::avatar::artifact_from_output;
use crate::domain::event::EventType;
use crate::domain::job::{
    Decision, EventSource, FalOutcome, JobErrorCode, JobEvent, JobKind, JobStatus,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

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

    /// Whether the write sets the error columns, and to what.
    fn error_columns(&self) -> (bool, Option<&str>, Option<&str>, Option<&Value>) {
        match &self.error {
            ErrorChange::Keep => (false, None, None, None),
            ErrorChange::Clear => (true, None, None, None),
            ErrorChange::Set(e) => (
                true,
                Some(e.code.as_str()),
                Some(e.message.as_str()),
                e.detail.as_ref(),
            ),
        }
    }
}

/// Writes the events a job's update tells clients of: the job's new status, what its end did
/// to its avatar, and its batch's completion when it was the batch's last job to finish.
/// Answers whether it wrote any.
async fn tell_clients(
    tx: &mut Tx,
    update: &JobUpdate,
    job: &Job,
    avatar_moved: bool,
) -> StoreResult<bool> {
    let moved = update.status != update.expect_status;
    let mut events = Vec::new();
    if let Some(kind) = EventType::of_job_status(job.status).filter(|_| moved) {
        events.push(NewEvent {
            kind,
            snapshot: EventSnapshot::Job(Box::new(job.clone())),
        });
    }
    let avatar_event = match &update.avatar {
        Some(AvatarOutcome::Ready(_)) => Some(EventType::AvatarReady),
        Some(AvatarOutcome::Failed { .. }) => Some(EventType::AvatarFailed),
        _ => None,
    };
    if let (Some(kind), Some(avatar_id), true) = (avatar_event, job.avatar_id, avatar_moved) {
        let avatar = avatar_snapshot(tx, job.tenant, avatar_id).await?;
        events.push(NewEvent {
            kind,
            snapshot: EventSnapshot::Avatar(Box::new(avatar)),
        });
    }
    if let (Some(batch_id), true) = (job.batch_id, moved && job.status.is_terminal())
        && let Some(snapshot) = completed_batch(tx, batch_id).await?
    {
        events.push(NewEvent {
            kind: EventType::BatchCompleted,
            snapshot,
        });
    }
    insert_events(tx, job.tenant, update.at, &events).await?;
    Ok(!events.is_empty())
}

impl Store {
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
            let Some(job) = self.find_job(tenant, job_id).await? else {
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
            return self.write_job_update(&update).await;
        }
        self.write_job_update(update).await
    }

    /// The one compare-and-set write: applies only while the job has the status and FAL
    /// request id it was read with, with its history row, callback and avatar outcome in the
    /// same transaction. `None` when someone else moved it first.
    async fn write_job_update(&self, update: &JobUpdate) -> StoreResult<Option<Job>> {
        let (set_error, error_code, error_message, error_detail) = update.error_columns();
        let fal = update.fal.clone().unwrap_or_default();
        let submit_sent_at = match update.submit_mark {
            SubmitMark::Set(at) => Some(at),
            SubmitMark::Keep | SubmitMark::Clear => None,
        };
        let mut tx = self.writer().begin().await?;
        let written = tx
            .conn()
            .execute(
                self.dialect().update_job,
                &[
                    update.job_id.into(),
                    update.expect_status.as_str().into(),
                    update.status.as_str().into(),
                    update.at.into(),
                    Some(fal.request_id.as_str())
                        .filter(|id| !id.is_empty())
                        .into(),
                    (&fal.status_url).into(),
                    (&fal.response_url).into(),
                    (&fal.cancel_url).into(),
                    update.queue_position.into(),
                    update.result.as_ref().into(),
                    set_error.into(),
                    error_code.into(),
                    error_message.into(),
                    error_detail.into(),
                    update.status.is_terminal().into(),
                    update.next_attempt_at.into(),
                    update.release_lease.into(),
                    update.cancel_requested_at.into(),
                    update.cancel_forwarded_at.into(),
                    (&update.expect_request_id).into(),
                    update.touch.into(),
                    (update.submit_mark == SubmitMark::Clear).into(),
                    submit_sent_at.into(),
                    (!update.expect_submit_sent).into(),
                    update.expect_attempts.into(),
                ],
            )
            .await?;
        if written == 0 {
            return Ok(None);
        }
        if let Some((source, detail)) = &update.event {
            insert_event(
                &mut tx,
                update.job_id,
                update.at,
                Some(update.expect_status),
                update.status,
                *source,
                detail.as_ref(),
            )
            .await?;
        }
        if let Some(callback) = &update.callback {
            insert_callback(&mut tx, callback).await?;
        }
        let avatar_moved = match (&update.avatar, update.avatar_id) {
            (Some(outcome), Some(avatar_id)) => {
                apply_avatar_outcome(&mut tx, avatar_id, update.job_id, outcome, update.at).await?
            }
            _ => false,
        };
        let row: JobRow = tx
            .conn()
            .fetch_one(&SELECT_JOB_BY_ID, &[update.job_id.into()])
            .await?;
        let job = Job::try_from(row)?;
        let told = tell_clients(&mut tx, update, &job, avatar_moved).await?;
        tx.commit().await?;
        if told {
            self.events_written(job.tenant);
        }
        Ok(Some(job))
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
            let Some(job) = self.find_job(None, job_id).await? else {
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
            let Some(job) = self.find_job(None, job_id).await? else {
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
    pub(super) fn update_for(&self, job: &Job, decision: Decision) -> Option<JobUpdate> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClaimKind, NewJob};
    use std::time::Duration;

    async fn store_with_a_pending_job() -> (Store, Job, std::path::PathBuf) {
        let (store, path) = crate::store::scratch_store().await;
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
        let job = new.to_pending_job();
        store.create_jobs(vec![new], None, None).await.unwrap();
        (store, job, path)
    }

    async fn forget(store: Store, path: std::path::PathBuf) {
        crate::store::forget_scratch_store(store, path).await;
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
}
