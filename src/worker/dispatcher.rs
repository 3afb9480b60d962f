//! Sends pending jobs to FAL's queue. Woken the moment a job is stored; keeps a bounded number
//! of submits in flight; retries what FAL may accept later (429, 5xx, timeouts) with backoff
//! until the submit deadline, and fails at once what FAL refuses, with FAL's detail.

use super::{after, job_error, wait_for_work};
use crate::app::AppState;
use crate::fal::client::{CancelOutcome, FalError, FalErrorKind};
use crate::fal::retry::next_delay;
use crate::store::{ClaimKind, FalRequest, Job, JobError, Submission};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);

pub async fn run(state: AppState, mut stopping: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(state.config.workers.dispatch_concurrency));
    let mut in_flight = JoinSet::new();
    while !*stopping.borrow() {
        while in_flight.try_join_next().is_some() {}
        let free = slots.available_permits();
        let mut claimed = 0;
        if free > 0 {
            let now = crate::domain::now();
            match state
                .store
                .claim_jobs(
                    ClaimKind::Submit,
                    now,
                    state.config.workers.lease,
                    free as u32,
                )
                .await
            {
                Ok(jobs) => {
                    claimed = jobs.len();
                    for job in jobs {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            break;
                        };
                        let state = state.clone();
                        in_flight.spawn(async move {
                            submit(&state, job).await;
                            drop(slot);
                        });
                    }
                }
                Err(err) => tracing::warn!(error = %err, "could not claim jobs to submit"),
            }
        }
        if claimed > 0 && claimed == free {
            // There may be more due; come back as soon as a slot frees.
            tokio::select! {
                _ = in_flight.join_next() => {}
                _ = stopping.changed() => {}
            }
            continue;
        }
        if claimed > 0 {
            continue;
        }
        let next_due = state.store.next_due(ClaimKind::Submit).await.ok().flatten();
        tokio::select! {
            () = wait_for_work(&state.wake.dispatcher, next_due, &mut stopping) => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    // Finish the submits already under way: their answers must be recorded.
    while in_flight.join_next().await.is_some() {}
}

#[tracing::instrument(skip_all, fields(job = %job.id, attempt = job.attempts))]
async fn submit(state: &AppState, job: Job) {
    let webhook = state.callback_url(job.id);
    let sent_at = crate::domain::now();
    match state
        .fal
        .submit(&job.endpoint, &job.input, webhook.as_ref())
        .await
    {
        Ok(answer) => {
            state.fal_health.record_unauthorized(false);
            let request = FalRequest {
                request_id: answer.request_id,
                status_url: answer.status_url,
                response_url: answer.response_url,
                cancel_url: answer.cancel_url,
            };
            let first_look = if webhook.is_some() {
                state.config.workers.callback_grace
            } else {
                Duration::from_millis(500)
            };
            match record(state, &job, &request, first_look).await {
                Ok(Submission::Recorded { .. }) => {
                    tracing::info!(fal_request_id = %request.request_id, "submitted to FAL");
                    // The reconciler may be asleep until a later job's time: let it see this one.
                    state.wake.reconciler.notify_one();
                }
                Ok(Submission::Superseded { job }) => {
                    tracing::warn!(
                        surplus = %request.request_id,
                        kept = job.fal_request_id.as_deref().unwrap_or_default(),
                        "a second FAL request for one job; cancelling the surplus one"
                    );
                    withdraw(state, &request).await;
                }
                Ok(Submission::JobEnded { job }) => {
                    tracing::info!(status = %job.status, "job ended while it was being submitted; withdrawing it from FAL");
                    withdraw(state, &request).await;
                }
                Ok(Submission::JobGone) => withdraw(state, &request).await,
                Err(err) => {
                    // FAL has the request but we could not write that down even after retries:
                    // withdraw it, so that the resubmit after the lease ends is the only run.
                    tracing::error!(error = %err, fal_request_id = %request.request_id, "could not record a submission; withdrawing it");
                    withdraw(state, &request).await;
                }
            }
        }
        Err(err)
            if err.retryable()
                && err.status.is_some()
                && err.fal_request_id.is_some()
                && err.may_have_reached_fal =>
        {
            // A gateway error that names FAL's request: FAL has it. Follow that request rather
            // than run the job twice; its callback (or the deadline) ends the job.
            let request = FalRequest {
                request_id: err.fal_request_id.clone().unwrap_or_default(),
                ..FalRequest::default()
            };
            tracing::warn!(fal_request_id = %request.request_id, status = ?err.status, "FAL queued the job but its answer failed; following that request");
            if let Err(store_err) =
                record(state, &job, &request, state.config.workers.callback_grace).await
            {
                tracing::error!(error = %store_err, "could not record a submission");
            }
        }
        Err(err) if err.retryable() => retry_later(state, &job, &err, sent_at).await,
        Err(err) => {
            if matches!(err.status, Some(401 | 403)) {
                state.fal_health.record_unauthorized(true);
            }
            tracing::warn!(status = ?err.status, error = %err.message, "FAL refused the job");
            fail(state, &job, job_error(&err)).await;
        }
    }
}

/// Records a submit answer, retrying a failing database while the lease lasts: the write is
/// idempotent, and losing it would leave a FAL request nobody follows.
async fn record(
    state: &AppState,
    job: &Job,
    request: &FalRequest,
    first_look: Duration,
) -> Result<Submission, crate::store::StoreError> {
    let mut wait = Duration::from_millis(100);
    let give_up = tokio::time::Instant::now() + state.config.workers.lease / 2;
    loop {
        let now = crate::domain::now();
        match state
            .store
            .record_submission(job.id, request, after(now, first_look), now)
            .await
        {
            Ok(done) => return Ok(done),
            Err(err) if tokio::time::Instant::now() + wait < give_up => {
                tracing::warn!(error = %err, "recording a submission failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(err) => return Err(err),
        }
    }
}

async fn retry_later(
    state: &AppState,
    job: &Job,
    err: &FalError,
    at: chrono::DateTime<chrono::Utc>,
) {
    let attempt = u32::try_from(job.attempts.max(1) - 1).unwrap_or(0);
    let mut delay = next_delay(attempt, RETRY_BASE, RETRY_MAX, err.retry_after);
    let answer_lost = err.may_have_reached_fal
        && (matches!(err.kind, FalErrorKind::Timeout | FalErrorKind::Transport)
            || matches!(err.status, Some(500 | 502 | 504)) && err.fal_request_id.is_some());
    if answer_lost && state.signer.is_some() {
        // FAL may have queued the request and only its answer was lost. Its callback names
        // the request and is adopted; resubmitting before it could arrive would run the job
        // twice. Wait at least the callback grace first.
        delay = delay.max(state.config.workers.callback_grace);
    }
    let deadline = after(job.created_at, state.config.workers.submit_deadline);
    let next = after(at, delay);
    if next > deadline {
        let mut error = job_error(err);
        error.code = "fal_unavailable".into();
        error.message = format!(
            "FAL did not accept the job within the submit deadline after {} attempts: {}",
            job.attempts, err.message
        );
        fail(state, job, error).await;
        return;
    }
    tracing::info!(status = ?err.status, retry_in_ms = delay.as_millis() as u64, error = %err.message, "FAL is busy; will retry");
    let last_error = JobError {
        code: "fal_retrying".into(),
        message: format!(
            "attempt {} did not reach FAL: {}",
            job.attempts, err.message
        ),
        detail: err.detail.clone(),
    };
    if let Err(store_err) = state
        .store
        .reschedule(job, next, Some(last_error), at)
        .await
    {
        tracing::error!(error = %store_err, "could not schedule a submit retry");
    }
}

/// Fails the job as claimed: only while it is still pending with no FAL request, so that a
/// submit that succeeded elsewhere meanwhile is never overruled.
async fn fail(state: &AppState, job: &Job, error: JobError) {
    if let Err(err) = state
        .store
        .fail_claimed(job, error, crate::domain::now())
        .await
    {
        tracing::error!(error = %err, "could not fail a job");
    }
}

/// Cancels a FAL request that no job holds, so that nothing runs (and is billed) twice.
async fn withdraw(state: &AppState, request: &FalRequest) {
    let Some(cancel_url) = &request.cancel_url else {
        tracing::warn!(fal_request_id = %request.request_id, "surplus FAL request has no cancel URL");
        return;
    };
    match state.fal.cancel(cancel_url).await {
        Ok(CancelOutcome::CancellationRequested | CancelOutcome::Ok) => {
            tracing::info!(fal_request_id = %request.request_id, "surplus FAL request cancelled")
        }
        Ok(other) => {
            tracing::warn!(fal_request_id = %request.request_id, outcome = ?other, "surplus FAL request could not be cancelled")
        }
        Err(err) => {
            tracing::warn!(fal_request_id = %request.request_id, error = %err.message, "cancelling a surplus FAL request failed")
        }
    }
}
