//! Sends pending jobs to FAL's queue. Woken the moment a job is stored; keeps a bounded number
//! of submits in flight; retries what FAL may accept later (429, 5xx, timeouts) with backoff
//! until the submit deadline, and fails at once what FAL refuses, with FAL's detail.

use super::WorkerContext;
use super::{after, deadline, wait_for_work};
use crate::domain::job::{EventSource, JobErrorCode, JobEvent, JobKind};
use crate::fal::outcome::refusal;
use crate::fal::retry::next_delay;
use crate::fal::{CancelOutcome, FalError};
use crate::store::{ClaimKind, FalRequest, Job, JobError, Submission, Transition};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);

pub async fn run(ctx: WorkerContext, mut stopping: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(ctx.settings.dispatch_concurrency));
    let mut in_flight = JoinSet::new();
    while !*stopping.borrow() {
        while in_flight.try_join_next().is_some() {}
        let free = slots.available_permits();
        let mut claimed = 0;
        if free > 0 {
            let now = crate::domain::now();
            match ctx
                .store
                .claim_jobs(
                    ClaimKind::Submit,
                    ctx.sandbox,
                    now,
                    ctx.settings.lease,
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
                        let ctx = ctx.clone();
                        in_flight.spawn(async move {
                            submit(&ctx, job).await;
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
        let next_due = ctx
            .store
            .next_due(ClaimKind::Submit, ctx.sandbox)
            .await
            .ok()
            .flatten();
        tokio::select! {
            () = wait_for_work(&ctx.wake.dispatcher, next_due, &mut stopping) => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    // Finish the submits already under way: their answers must be recorded.
    while in_flight.join_next().await.is_some() {}
}

#[tracing::instrument(skip_all, fields(job = %job.id, attempt = job.attempts))]
async fn submit(ctx: &WorkerContext, job: Job) {
    let Some(job) = settle_doubt(ctx, job).await else {
        return;
    };
    // Written before the request leaves: if its answer is never recorded, the mark tells the
    // next claim that FAL may hold a request for this job.
    let sent_at = crate::domain::now();
    let job = match ctx.store.mark_submit_sent(&job, sent_at).await {
        Ok(Some(job)) => job,
        Ok(None) => return, // A callback or a cancel moved it meanwhile.
        Err(err) => {
            tracing::warn!(error = %err, "could not mark a submit as sent; not sending it");
            return;
        }
    };
    let webhook = ctx.callbacks.as_ref().map(|urls| urls.url_for(job.id));
    match ctx
        .fal
        .submit(&job.endpoint, &job.input, webhook.as_ref())
        .await
    {
        Ok(answer) => {
            ctx.fal_health.record_unauthorized(false);
            let request = FalRequest {
                request_id: answer.request_id,
                status_url: answer.status_url,
                response_url: answer.response_url,
                cancel_url: answer.cancel_url,
            };
            take_request(ctx, &job, request, webhook.is_some()).await;
        }
        Err(err) if err.may_have_reached_fal && err.fal_request_id.is_some() => {
            // A gateway error naming a request: FAL's word that it queued one, or only the id of
            // the failed call. FAL itself tells which.
            let request_id = err.fal_request_id.clone().unwrap_or_default();
            let urls = ctx.fal.request_urls(&job.endpoint, &request_id);
            match ctx.fal.status(&urls.status, false).await {
                Ok(_) => {
                    tracing::warn!(fal_request_id = %request_id, status = ?err.status, "FAL queued the job but its answer failed; following that request");
                    let request = FalRequest {
                        request_id,
                        status_url: Some(urls.status),
                        response_url: Some(urls.response),
                        cancel_url: Some(urls.cancel),
                    };
                    take_request(ctx, &job, request, webhook.is_some()).await;
                }
                // FAL holds no such request: the submit was refused before it was queued.
                Err(status_err) if status_err.status == Some(404) => {
                    retry_later(ctx, &job, &err, sent_at).await
                }
                Err(_) => {
                    let why = format!("the submit's answer was lost: {}", err.message);
                    unconfirmed(ctx, &job, sent_at, &why, Some(&err)).await;
                }
            }
        }
        Err(err) if err.may_have_reached_fal => {
            let why = format!("the submit's answer was lost: {}", err.message);
            unconfirmed(ctx, &job, sent_at, &why, Some(&err)).await;
        }
        Err(err) if err.retryable() => retry_later(ctx, &job, &err, sent_at).await,
        Err(err) => {
            if err.account_refused() {
                ctx.fal_health.record_unauthorized(true);
            }
            tracing::warn!(status = ?err.status, error = %err.message, "FAL refused the job");
            fail(ctx, &job, refusal(&err)).await;
        }
    }
}

/// Records the request FAL holds for a job, withdrawing it when the job cannot take it.
async fn take_request(ctx: &WorkerContext, job: &Job, request: FalRequest, with_callback: bool) {
    let first_look = if with_callback {
        ctx.settings.callback_grace
    } else {
        Duration::from_millis(500)
    };
    match record(ctx, job, &request, first_look).await {
        Ok(Submission::Recorded { .. }) => {
            tracing::info!(fal_request_id = %request.request_id, "submitted to FAL");
            // The reconciler may be asleep until a later job's time: let it see this one.
            ctx.wake.reconciler.notify_one();
        }
        Ok(Submission::Superseded { job }) => {
            tracing::warn!(
                surplus = %request.request_id,
                kept = job.fal_request_id.as_deref().unwrap_or_default(),
                "a second FAL request for one job; cancelling the surplus one"
            );
            withdraw(ctx, &job.endpoint, &request).await;
        }
        Ok(Submission::JobEnded { job }) => {
            tracing::info!(status = %job.status, "job ended while it was being submitted; withdrawing it from FAL");
            withdraw(ctx, &job.endpoint, &request).await;
        }
        Ok(Submission::JobGone) => withdraw(ctx, &job.endpoint, &request).await,
        Err(err) if with_callback => {
            // FAL has the request but we could not write that down. The mark stays: the
            // request's callback will name it, and the job adopts it then.
            tracing::error!(error = %err, fal_request_id = %request.request_id, "could not record a submission; its callback will bring it");
        }
        Err(err) => {
            // No callback can bring it: withdraw it, so that the resend is the only run.
            tracing::error!(error = %err, fal_request_id = %request.request_id, "could not record a submission; withdrawing it");
            withdraw(ctx, &job.endpoint, &request).await;
        }
    }
}

/// How long a job whose submit may have reached FAL waits for FAL's callback. A training's
/// callback comes only when it has finished, so it waits longer.
fn unconfirmed_wait(ctx: &WorkerContext, kind: JobKind) -> Duration {
    match kind {
        JobKind::Training => ctx.settings.unconfirmed_training_wait,
        JobKind::Generation | JobKind::Raw => ctx.settings.unconfirmed_submit_wait,
    }
}

/// Before a claimed job is sent: a job whose last submit may have reached FAL is not sent blind.
/// It waits for FAL's callback (which names the job and hands it its request) until the wait
/// for its kind has passed; only then is it sent again, with that decision in its history and
/// in the metrics. A cancel taken meanwhile is confirmed once FAL surely holds nothing.
/// Answers the job to send, or `None` when there is nothing to send now.
async fn settle_doubt(ctx: &WorkerContext, job: Job) -> Option<Job> {
    let now = crate::domain::now();
    let Some(sent_at) = job.submit_sent_at else {
        if job.cancel_requested_at.is_some() {
            // The cancel came while a submit was in doubt; that submit surely never reached FAL.
            cancel_unsent(ctx, &job, "FAL received no request for this job").await;
            return None;
        }
        return Some(job);
    };
    let until = after(sent_at, unconfirmed_wait(ctx, job.kind));
    if now < until && ctx.callbacks.is_some() {
        // Found after a crash or a lease that ran out during the call.
        unconfirmed(
            ctx,
            &job,
            sent_at,
            "the process handling the last submit stopped before FAL's answer was recorded",
            None,
        )
        .await;
        return None;
    }
    if job.cancel_requested_at.is_some() {
        cancel_unsent(
            ctx,
            &job,
            "FAL sent no word of a request for this job within the wait",
        )
        .await;
        return None;
    }
    if now > after(job.created_at, ctx.settings.submit_deadline) {
        // Past the submit deadline nothing is sent again; a request FAL may hold can still
        // name the job until the job's own deadline.
        let end = after(job.created_at, deadline(ctx, job.kind));
        if now >= end {
            let error = JobError {
                code: JobErrorCode::DeadlineExceeded,
                message: format!(
                    "FAL never confirmed a submit of this job within {} s",
                    deadline(ctx, job.kind).as_secs()
                ),
                detail: None,
            };
            fail(ctx, &job, error).await;
        } else {
            let detail = serde_json::json!({
                "submit": "unconfirmed",
                "reason": "the submit deadline has passed: the job is not sent again, and waits \
                           for FAL's callback until its deadline",
                "sent_at": sent_at,
                "waiting_until": end,
            });
            hold(ctx, &job, end, None, detail).await;
        }
        return None;
    }
    ctx.counters.submits_resent.fetch_add(1, Ordering::Relaxed);
    let detail = serde_json::json!({
        "submit": "resent",
        "reason": if ctx.callbacks.is_some() {
            "no callback from FAL named this job within the wait; sending it again"
        } else {
            "without a public URL no callback can name this job; sending it again"
        },
        "unconfirmed_since": sent_at,
    });
    tracing::warn!(%sent_at, "no word from FAL on an unconfirmed submit; sending the job again");
    match ctx
        .store
        .give_up_unconfirmed_submit(&job, detail, now)
        .await
    {
        Ok(job) => job,
        Err(err) => {
            tracing::error!(error = %err, "could not record a resend");
            None
        }
    }
}

/// A submit whose fate is unknown: the job waits for FAL's callback until the wait for its kind
/// has passed since `sent_at`. Without a public URL no callback can come: it is sent again
/// after the usual backoff, and the next claim records that as a resend.
async fn unconfirmed(
    ctx: &WorkerContext,
    job: &Job,
    sent_at: chrono::DateTime<chrono::Utc>,
    why: &str,
    err: Option<&FalError>,
) {
    let now = crate::domain::now();
    ctx.counters
        .submits_unconfirmed
        .fetch_add(1, Ordering::Relaxed);
    let until = if ctx.callbacks.is_some() {
        after(sent_at, unconfirmed_wait(ctx, job.kind))
    } else {
        let attempt = u32::try_from(job.attempts.max(1) - 1).unwrap_or(0);
        after(now, next_delay(attempt, RETRY_BASE, RETRY_MAX, None))
    };
    tracing::warn!(%why, %until, "a submit may have reached FAL; waiting for its callback before sending again");
    let detail = serde_json::json!({
        "submit": "unconfirmed",
        "reason": why,
        "sent_at": sent_at,
        "waiting_until": until,
    });
    let last_error = err.map(|err| JobError {
        code: JobErrorCode::FalSubmitUnconfirmed,
        message: format!(
            "FAL may have received attempt {}; waiting for its callback before sending again",
            job.attempts
        ),
        detail: err.detail.clone(),
    });
    hold(ctx, job, until, last_error, detail).await;
}

/// Keeps a job whose submit is in doubt from being sent until `until`, with `detail` in its
/// history.
async fn hold(
    ctx: &WorkerContext,
    job: &Job,
    until: chrono::DateTime<chrono::Utc>,
    last_error: Option<JobError>,
    detail: serde_json::Value,
) {
    let now = crate::domain::now();
    if let Err(err) = ctx
        .store
        .hold_unconfirmed_submit(job, until, last_error, detail, now)
        .await
    {
        tracing::error!(error = %err, "could not hold an unconfirmed submit");
    }
}

/// Ends a job a client cancelled before FAL had it.
async fn cancel_unsent(ctx: &WorkerContext, job: &Job, why: &str) {
    let news = Transition::new(
        JobEvent::CancelConfirmed,
        EventSource::Dispatcher,
        crate::domain::now(),
    )
    .with_detail(serde_json::json!({ "reason": why }));
    if let Err(err) = ctx.store.apply(None, job.id, &news).await {
        tracing::error!(error = %err, "could not confirm a cancel");
    }
}

/// Records a submit answer, retrying a failing database while the lease lasts: the write is
/// idempotent, and losing it would leave a FAL request nobody follows.
async fn record(
    ctx: &WorkerContext,
    job: &Job,
    request: &FalRequest,
    first_look: Duration,
) -> Result<Submission, crate::store::StoreError> {
    let mut wait = Duration::from_millis(100);
    let give_up = tokio::time::Instant::now() + ctx.settings.lease / 2;
    loop {
        let now = crate::domain::now();
        match ctx
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
    ctx: &WorkerContext,
    job: &Job,
    err: &FalError,
    at: chrono::DateTime<chrono::Utc>,
) {
    let attempt = u32::try_from(job.attempts.max(1) - 1).unwrap_or(0);
    let delay = next_delay(attempt, RETRY_BASE, RETRY_MAX, err.retry_after);
    let deadline = after(job.created_at, ctx.settings.submit_deadline);
    let next = after(at, delay);
    if next > deadline {
        let mut error = refusal(err);
        error.code = JobErrorCode::FalUnavailable;
        error.message = format!(
            "FAL did not accept the job within the submit deadline after {} attempts: {}",
            job.attempts, err.message
        );
        fail(ctx, job, error).await;
        return;
    }
    tracing::info!(status = ?err.status, retry_in_ms = delay.as_millis() as u64, error = %err.message, "FAL is busy; will retry");
    let last_error = JobError {
        code: JobErrorCode::FalRetrying,
        message: format!(
            "attempt {} did not reach FAL: {}",
            job.attempts, err.message
        ),
        detail: err.detail.clone(),
    };
    if let Err(store_err) = ctx.store.reschedule(job, next, Some(last_error), at).await {
        tracing::error!(error = %store_err, "could not schedule a submit retry");
    }
}

/// Fails the job as claimed: only while it is still pending with no FAL request, so that a
/// submit that succeeded elsewhere meanwhile is never overruled.
async fn fail(ctx: &WorkerContext, job: &Job, error: JobError) {
    if let Err(err) = ctx
        .store
        .fail_claimed(job, error, crate::domain::now())
        .await
    {
        tracing::error!(error = %err, "could not fail a job");
    }
}

/// Cancels a FAL request that no job holds, so that nothing runs (and is billed) twice.
async fn withdraw(ctx: &WorkerContext, endpoint: &str, request: &FalRequest) {
    let cancel_url = match &request.cancel_url {
        Some(url) => url.clone(),
        None => ctx.fal.request_urls(endpoint, &request.request_id).cancel,
    };
    match ctx.fal.cancel(&cancel_url).await {
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
