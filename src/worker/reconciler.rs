//! Follows jobs that are with FAL when their callback is late (or never comes: no public URL),
//! fetches the result the moment FAL reports completion (FAL keeps results of 10 KB or more
//! only 6 minutes), passes clients' cancels on, and fails jobs past their deadline after one
//! last look. Every change goes through the same transition function as callbacks.

use super::{after, deadline, job_error, wait_for_work};
use crate::app::AppState;
use crate::domain::job::{EventSource, JobEvent, JobKind};
use crate::fal::client::{CancelOutcome, FalErrorKind, ModelResult, ReportedEnd, RequestUrls};
use crate::fal::wire::{QueueState, model_error};
use crate::store::{ClaimKind, ErrorChange, Job, JobError, Transition};
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::sync::watch;

/// How long past a job's deadline FAL's finished result is still fetched through outages.
const RESULT_FETCH_GRACE: Duration = Duration::from_secs(600);

/// Jobs looked at together in one round.
const BATCH: u32 = 16;

pub async fn run(state: AppState, mut stopping: watch::Receiver<bool>) {
    while !*stopping.borrow() {
        let now = crate::domain::now();
        match state
            .store
            .claim_jobs(
                ClaimKind::Poll,
                state.config.sandbox,
                now,
                state.config.workers.lease,
                BATCH,
            )
            .await
        {
            Ok(jobs) if !jobs.is_empty() => {
                futures_util::future::join_all(jobs.into_iter().map(|job| look_at(&state, job)))
                    .await;
                continue;
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "could not claim jobs to follow"),
        }
        let next_due = state
            .store
            .next_due(ClaimKind::Poll, state.config.sandbox)
            .await
            .ok()
            .flatten();
        wait_for_work(&state.wake.reconciler, next_due, &mut stopping).await;
    }
}

/// How long to wait before the next look: short while the job is young, longer as it ages,
/// so that a 10 s generation is seen promptly and a 20 min training does not hammer FAL.
fn poll_delay(state: &AppState, job: &Job, now: DateTime<Utc>) -> Duration {
    let floor = match job.kind {
        JobKind::Training => Duration::from_secs(2),
        JobKind::Generation | JobKind::Raw => Duration::from_millis(250),
    };
    let since = job.submitted_at.unwrap_or(job.created_at);
    let age = (now - since).to_std().unwrap_or_default();
    (age / 5).clamp(floor, state.config.workers.poll_max.max(floor))
}

#[tracing::instrument(skip_all, fields(job = %job.id, status = %job.status))]
async fn look_at(state: &AppState, job: Job) {
    let now = crate::domain::now();
    if job.cancel_requested_at.is_some() && job.cancel_forwarded_at.is_none() {
        match forward_cancel(state, &job).await {
            Some(job) => return look_at_fal(state, job, now).await,
            None => return,
        }
    }
    look_at_fal(state, job, now).await
}

async fn look_at_fal(state: &AppState, job: Job, now: DateTime<Utc>) {
    let overdue = now > after(job.created_at, deadline(state, job.kind));
    let Some(urls) = request_urls(state, &job) else {
        // Not possible for a job with FAL, which always holds its request id.
        tracing::error!("a job with FAL has no request id");
        return reschedule(state, &job, now).await;
    };
    match state.fal.status(&urls.status, false).await {
        Ok(status) => match status.status {
            QueueState::Completed => {
                let reported = if status.error.is_some() || status.error_type.is_some() {
                    ReportedEnd::Failed {
                        error_type: status.error_type.clone(),
                    }
                } else {
                    ReportedEnd::Succeeded
                };
                fetch_result(state, &job, &urls.response, &reported, now).await
            }
            QueueState::InQueue | QueueState::InProgress if overdue => {
                fail_overdue(state, &job).await
            }
            QueueState::InProgress => {
                let news = Transition::new(JobEvent::Started, EventSource::Reconciler, now)
                    .with_next_attempt(after(now, poll_delay(state, &job, now)));
                apply(state, &job, news).await;
            }
            QueueState::InQueue => {
                let news = Transition::new(JobEvent::SubmitAccepted, EventSource::Reconciler, now)
                    .with_queue_position(status.queue_position.and_then(|p| i64::try_from(p).ok()))
                    .with_next_attempt(after(now, poll_delay(state, &job, now)));
                apply(state, &job, news).await;
            }
            QueueState::Other(other) => {
                tracing::warn!(fal_status = %other, "FAL reported a status we do not know");
                reschedule(state, &job, now).await;
            }
        },
        Err(err) if err.status == Some(404) => {
            if job.cancel_requested_at.is_some() {
                confirm_cancel(state, &job, now, "FAL no longer knows the request").await;
            } else {
                finish_failed(
                    state,
                    &job,
                    JobError {
                        code: "fal_request_lost".into(),
                        message: "FAL no longer knows this request; its result cannot be fetched"
                            .into(),
                        detail: err.detail.clone(),
                    },
                )
                .await;
            }
        }
        Err(_) if overdue => fail_overdue(state, &job).await,
        Err(err) => {
            tracing::info!(error = %err.message, "FAL status unavailable; will ask again");
            reschedule(state, &job, now).await;
        }
    }
}

/// Where to ask FAL about the job's request: the URLs of the submit answer, or, for a request
/// learnt from a callback alone, the ones FAL's own client would build.
fn request_urls(state: &AppState, job: &Job) -> Option<RequestUrls> {
    let request_id = job.fal_request_id.as_deref()?;
    let built = state.fal.request_urls(&job.endpoint, request_id);
    Some(RequestUrls {
        status: job.status_url.clone().unwrap_or(built.status),
        response: job.response_url.clone().unwrap_or(built.response),
        cancel: job.cancel_url.clone().unwrap_or(built.cancel),
    })
}

async fn fetch_result(
    state: &AppState,
    job: &Job,
    response_url: &str,
    reported: &ReportedEnd,
    now: DateTime<Utc>,
) {
    // FAL has finished: its result is fetched through outages for a while past the job's
    // deadline, since it is there to be had (FAL keeps it at least 6 minutes).
    let overdue = now
        > after(
            job.created_at,
            deadline(state, job.kind) + RESULT_FETCH_GRACE,
        );
    match state.fal.result(response_url, reported).await {
        Ok(ModelResult::Output(output)) => {
            let news = Transition::new(JobEvent::Succeeded, EventSource::Reconciler, now)
                .with_result(output)
                .with_error(ErrorChange::Clear);
            apply(state, job, news).await;
            state.wake.keeper.notify_one();
        }
        Ok(ModelResult::ModelError {
            status,
            body,
            error_type,
        }) => {
            let cancelled = status == 499 || error_type.as_deref() == Some("client_cancelled");
            if cancelled && job.cancel_requested_at.is_some() {
                confirm_cancel(state, job, now, "FAL confirmed the cancellation").await;
            } else {
                finish_failed(state, job, model_error(status, error_type, body)).await;
            }
        }
        Err(err)
            if !overdue
                && (err.kind == FalErrorKind::NotReady
                    || err.retryable()
                    || err.kind == FalErrorKind::Decode
                    || matches!(err.status, Some(401 | 403))) =>
        {
            // An outage of this call (a truncated answer, or the account locked for a while,
            // included): the result is still at FAL.
            tracing::info!(error = %err.message, "FAL's result unavailable; will ask again");
            reschedule(state, job, now).await
        }
        Err(err) => {
            let mut error = job_error(&err);
            error.code = "fal_result_unavailable".into();
            finish_failed(state, job, error).await;
        }
    }
}

/// Passes a client's cancel on to FAL. Answers the job to go on looking at, or `None` when the
/// job is finished with.
async fn forward_cancel(state: &AppState, job: &Job) -> Option<Job> {
    let now = crate::domain::now();
    let Some(urls) = request_urls(state, job) else {
        tracing::error!("a job with FAL has no request id");
        reschedule(state, job, now).await;
        return None;
    };
    match state.fal.cancel(&urls.cancel).await {
        Ok(CancelOutcome::CancellationRequested | CancelOutcome::Ok) => {
            mark_forwarded(state, job, now, "FAL accepted the cancellation").await
        }
        Ok(CancelOutcome::AlreadyCompleted) => {
            // Too late: the result stands and is fetched as usual.
            mark_forwarded(state, job, now, "FAL had already completed the request").await
        }
        Ok(CancelOutcome::NotFound) => {
            confirm_cancel(state, job, now, "FAL no longer knows the request").await;
            None
        }
        Ok(CancelOutcome::Other { status, .. }) => {
            tracing::warn!(
                status,
                "FAL answered the cancel unexpectedly; will ask again"
            );
            reschedule(state, job, now).await;
            None
        }
        Err(err) => {
            tracing::info!(error = %err.message, "cancel did not reach FAL; will retry");
            reschedule(state, job, now).await;
            None
        }
    }
}

async fn mark_forwarded(
    state: &AppState,
    job: &Job,
    now: DateTime<Utc>,
    what: &str,
) -> Option<Job> {
    // Look again shortly: FAL's confirmation (or the result, if it was too late) follows.
    let news = Transition::new(JobEvent::CancelRequested, EventSource::Reconciler, now)
        .with_cancel_forwarded()
        .with_next_attempt(after(now, Duration::from_millis(200)))
        .with_detail(serde_json::json!({ "cancel": what }));
    match state.store.apply(None, job.id, &news).await {
        Ok(Some(applied)) => Some(applied.job),
        Ok(None) => None,
        Err(err) => {
            tracing::error!(error = %err, "could not record a forwarded cancel");
            None
        }
    }
}

async fn confirm_cancel(state: &AppState, job: &Job, now: DateTime<Utc>, why: &str) {
    let news = Transition::new(JobEvent::CancelConfirmed, EventSource::Reconciler, now)
        .with_detail(serde_json::json!({ "reason": why }));
    apply(state, job, news).await;
}

async fn finish_failed(state: &AppState, job: &Job, error: JobError) {
    let news = Transition::new(
        JobEvent::Failed,
        EventSource::Reconciler,
        crate::domain::now(),
    )
    .with_detail(serde_json::json!({"code": error.code, "message": error.message}))
    .with_error(ErrorChange::Set(error));
    apply(state, job, news).await;
}

/// Fails a job past its deadline, and withdraws it from FAL so it is not run (and billed) for
/// nothing.
async fn fail_overdue(state: &AppState, job: &Job) {
    finish_failed(
        state,
        job,
        JobError {
            code: "deadline_exceeded".into(),
            message: format!(
                "the job did not finish within {} s",
                deadline(state, job.kind).as_secs()
            ),
            detail: None,
        },
    )
    .await;
    if let Some(urls) = request_urls(state, job)
        && let Err(err) = state.fal.cancel(&urls.cancel).await
    {
        tracing::warn!(error = %err.message, "could not withdraw an overdue job from FAL");
    }
}

async fn reschedule(state: &AppState, job: &Job, now: DateTime<Utc>) {
    let next = after(now, poll_delay(state, job, now));
    if let Err(err) = state.store.reschedule(job, next, None, now).await {
        tracing::error!(error = %err, "could not reschedule a job");
    }
}

async fn apply(state: &AppState, job: &Job, news: Transition) {
    if let Err(err) = state.store.apply(None, job.id, &news).await {
        tracing::error!(error = %err, "could not apply FAL's news");
    }
}
