//! Follows jobs that are with FAL when their callback is late (or never comes: no public URL),
//! fetches the result the moment FAL reports completion (FAL keeps results of 10 KB or more
//! only 6 minutes), passes clients' cancels on, and fails jobs past their deadline after one
//! last look. Every change goes through the same transition function as callbacks.

use super::WorkerContext;
use super::{after, deadline, wait_for_work};
use crate::domain::job::{EventSource, FalOutcome, JobErrorCode, JobEvent, JobKind};
use crate::fal::outcome::{StatusNews, from_result, from_status, refusal};
use crate::fal::{CancelOutcome, FalErrorKind, ReportedEnd, RequestUrls};
use crate::store::{ClaimKind, ErrorChange, Job, JobError, Transition};
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::sync::watch;

/// How long past a job's deadline FAL's finished result is still fetched through outages.
const RESULT_FETCH_GRACE: Duration = Duration::from_secs(600);

/// Jobs looked at together in one round.
const BATCH: u32 = 16;

pub async fn run(ctx: WorkerContext, mut stopping: watch::Receiver<bool>) {
    while !*stopping.borrow() {
        let now = crate::domain::now();
        match ctx
            .store
            .claim_jobs(ClaimKind::Poll, ctx.sandbox, now, ctx.settings.lease, BATCH)
            .await
        {
            Ok(jobs) if !jobs.is_empty() => {
                futures_util::future::join_all(jobs.into_iter().map(|job| look_at(&ctx, job)))
                    .await;
                continue;
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "could not claim jobs to follow"),
        }
        let next_due = ctx
            .store
            .next_due(ClaimKind::Poll, ctx.sandbox)
            .await
            .ok()
            .flatten();
        wait_for_work(&ctx.wake.reconciler, next_due, &mut stopping).await;
    }
}

/// How long to wait before the next look: short while the job is young, longer as it ages,
/// so that a 10 s generation is seen promptly and a 20 min training does not hammer FAL.
fn poll_delay(ctx: &WorkerContext, job: &Job, now: DateTime<Utc>) -> Duration {
    let floor = match job.kind {
        JobKind::Training => Duration::from_secs(2),
        JobKind::Generation | JobKind::Raw => Duration::from_millis(250),
    };
    let since = job.submitted_at.unwrap_or(job.created_at);
    let age = (now - since).to_std().unwrap_or_default();
    (age / 5).clamp(floor, ctx.settings.poll_max.max(floor))
}

#[tracing::instrument(skip_all, fields(job = %job.id, status = %job.status))]
async fn look_at(ctx: &WorkerContext, job: Job) {
    let now = crate::domain::now();
    if job.cancel_requested_at.is_some() && job.cancel_forwarded_at.is_none() {
        match forward_cancel(ctx, &job).await {
            Some(job) => return look_at_fal(ctx, job, now).await,
            None => return,
        }
    }
    look_at_fal(ctx, job, now).await
}

async fn look_at_fal(ctx: &WorkerContext, job: Job, now: DateTime<Utc>) {
    let overdue = now > after(job.created_at, deadline(ctx, job.kind));
    let Some(urls) = request_urls(ctx, &job) else {
        // Not possible for a job with FAL, which always holds its request id.
        tracing::error!("a job with FAL has no request id");
        return reschedule(ctx, &job, now).await;
    };
    match ctx.fal.status(&urls.status, false).await {
        Ok(status) => match from_status(&status) {
            StatusNews::Completed(reported) => {
                fetch_result(ctx, &job, &urls.response, &reported, now).await
            }
            StatusNews::Outcome(_) if overdue => fail_overdue(ctx, &job).await,
            StatusNews::Outcome(outcome) => {
                let news = Transition::of_outcome(outcome, EventSource::Reconciler, now)
                    .with_next_attempt(after(now, poll_delay(ctx, &job, now)));
                apply(ctx, &job, news).await;
            }
            StatusNews::Unknown(other) => {
                tracing::warn!(fal_status = %other, "FAL reported a status we do not know");
                reschedule(ctx, &job, now).await;
            }
        },
        Err(err) if err.status == Some(404) => {
            if job.cancel_requested_at.is_some() {
                confirm_cancel(ctx, &job, now, "FAL no longer knows the request").await;
            } else {
                finish_failed(
                    ctx,
                    &job,
                    JobError {
                        code: JobErrorCode::FalRequestLost,
                        message: "FAL no longer knows this request; its result cannot be fetched"
                            .into(),
                        detail: err.detail.clone(),
                    },
                )
                .await;
            }
        }
        Err(_) if overdue => fail_overdue(ctx, &job).await,
        Err(err) => {
            tracing::info!(error = %err.message, "FAL status unavailable; will ask again");
            reschedule(ctx, &job, now).await;
        }
    }
}

/// Where to ask FAL about the job's request: the URLs of the submit answer, or, for a request
/// learnt from a callback alone, the ones FAL's own client would build.
fn request_urls(ctx: &WorkerContext, job: &Job) -> Option<RequestUrls> {
    let request_id = job.fal_request_id.as_deref()?;
    let built = ctx.fal.request_urls(&job.endpoint, request_id);
    Some(RequestUrls {
        status: job.status_url.clone().unwrap_or(built.status),
        response: job.response_url.clone().unwrap_or(built.response),
        cancel: job.cancel_url.clone().unwrap_or(built.cancel),
    })
}

async fn fetch_result(
    ctx: &WorkerContext,
    job: &Job,
    response_url: &str,
    reported: &ReportedEnd,
    now: DateTime<Utc>,
) {
    // FAL has finished: its result is fetched through outages for a while past the job's
    // deadline, since it is there to be had (FAL keeps it at least 6 minutes).
    let overdue = now > after(job.created_at, deadline(ctx, job.kind) + RESULT_FETCH_GRACE);
    match ctx.fal.result(response_url, reported).await {
        Ok(result) => match from_result(result, job.cancel_requested_at.is_some()) {
            FalOutcome::Canceled => {
                confirm_cancel(ctx, job, now, "FAL confirmed the cancellation").await
            }
            FalOutcome::Failed(error) => finish_failed(ctx, job, error).await,
            outcome => {
                apply(
                    ctx,
                    job,
                    Transition::of_outcome(outcome, EventSource::Reconciler, now),
                )
                .await;
                ctx.wake.keeper.notify_one();
            }
        },
        Err(err)
            if !overdue
                && (err.kind == FalErrorKind::NotReady
                    || err.retryable()
                    || err.kind == FalErrorKind::Decode
                    || err.account_refused()) =>
        {
            // An outage of this call (a truncated answer, or the account locked for a while,
            // included): the result is still at FAL.
            tracing::info!(error = %err.message, "FAL's result unavailable; will ask again");
            reschedule(ctx, job, now).await
        }
        Err(err) => {
            let mut error = refusal(&err);
            error.code = JobErrorCode::FalResultUnavailable;
            finish_failed(ctx, job, error).await;
        }
    }
}

/// Passes a client's cancel on to FAL. Answers the job to go on looking at, or `None` when the
/// job is finished with.
async fn forward_cancel(ctx: &WorkerContext, job: &Job) -> Option<Job> {
    let now = crate::domain::now();
    let Some(urls) = request_urls(ctx, job) else {
        tracing::error!("a job with FAL has no request id");
        reschedule(ctx, job, now).await;
        return None;
    };
    match ctx.fal.cancel(&urls.cancel).await {
        Ok(CancelOutcome::CancellationRequested | CancelOutcome::Ok) => {
            mark_forwarded(ctx, job, now, "FAL accepted the cancellation").await
        }
        Ok(CancelOutcome::AlreadyCompleted) => {
            // Too late: the result stands and is fetched as usual.
            mark_forwarded(ctx, job, now, "FAL had already completed the request").await
        }
        Ok(CancelOutcome::NotFound) => {
            confirm_cancel(ctx, job, now, "FAL no longer knows the request").await;
            None
        }
        Ok(CancelOutcome::Other { status, .. }) => {
            tracing::warn!(
                status,
                "FAL answered the cancel unexpectedly; will ask again"
            );
            reschedule(ctx, job, now).await;
            None
        }
        Err(err) => {
            tracing::info!(error = %err.message, "cancel did not reach FAL; will retry");
            reschedule(ctx, job, now).await;
            None
        }
    }
}

async fn mark_forwarded(
    ctx: &WorkerContext,
    job: &Job,
    now: DateTime<Utc>,
    what: &str,
) -> Option<Job> {
    // Look again shortly: FAL's confirmation (or the result, if it was too late) follows.
    let news = Transition::new(JobEvent::CancelRequested, EventSource::Reconciler, now)
        .with_cancel_forwarded()
        .with_next_attempt(after(now, Duration::from_millis(200)))
        .with_detail(serde_json::json!({ "cancel": what }));
    match ctx.store.apply(None, job.id, &news).await {
        Ok(Some(applied)) => Some(applied.job),
        Ok(None) => None,
        Err(err) => {
            tracing::error!(error = %err, "could not record a forwarded cancel");
            None
        }
    }
}

async fn confirm_cancel(ctx: &WorkerContext, job: &Job, now: DateTime<Utc>, why: &str) {
    let news = Transition::new(JobEvent::CancelConfirmed, EventSource::Reconciler, now)
        .with_detail(serde_json::json!({ "reason": why }));
    apply(ctx, job, news).await;
}

async fn finish_failed(ctx: &WorkerContext, job: &Job, error: JobError) {
    let news = Transition::new(
        JobEvent::Failed,
        EventSource::Reconciler,
        crate::domain::now(),
    )
    .with_detail(serde_json::json!({"code": error.code, "message": error.message}))
    .with_error(ErrorChange::Set(error));
    apply(ctx, job, news).await;
}

/// Fails a job past its deadline, and withdraws it from FAL so it is not run (and billed) for
/// nothing.
async fn fail_overdue(ctx: &WorkerContext, job: &Job) {
    finish_failed(
        ctx,
        job,
        JobError {
            code: JobErrorCode::DeadlineExceeded,
            message: format!(
                "the job did not finish within {} s",
                deadline(ctx, job.kind).as_secs()
            ),
            detail: None,
        },
    )
    .await;
    if let Some(urls) = request_urls(ctx, job)
        && let Err(err) = ctx.fal.cancel(&urls.cancel).await
    {
        tracing::warn!(error = %err.message, "could not withdraw an overdue job from FAL");
    }
}

async fn reschedule(ctx: &WorkerContext, job: &Job, now: DateTime<Utc>) {
    let next = after(now, poll_delay(ctx, job, now));
    if let Err(err) = ctx.store.reschedule(job, next, None, now).await {
        tracing::error!(error = %err, "could not reschedule a job");
    }
}

async fn apply(ctx: &WorkerContext, job: &Job, news: Transition) {
    if let Err(err) = ctx.store.apply(None, job.id, &news).await {
        tracing::error!(error = %err, "could not apply FAL's news");
    }
}
