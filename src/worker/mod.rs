//! The workers that move jobs: the dispatcher sends pending jobs to FAL, the reconciler follows
//! jobs at FAL when callbacks are late, passes cancels on, and enforces deadlines. Both claim
//! work under a lease in the database, so several replicas share it and a dead process's work
//! is taken over when its lease runs out. Both stop claiming on shutdown and finish what they
//! hold.

pub mod dispatcher;
pub mod keeper;
pub mod reconciler;

use crate::app::AppState;
use crate::domain::job::JobKind;
use crate::fal::client::FalError;
use crate::store::JobError;
use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Starts every worker; each stops when `stopping` turns true.
pub fn spawn(state: AppState, stopping: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(dispatcher::run(state.clone(), stopping.clone())),
        tokio::spawn(keeper::run(state.clone(), stopping.clone())),
        tokio::spawn(reconciler::run(state, stopping)),
    ]
}

/// How long a worker waits when nothing is due and nobody wakes it: the bound on how late work
/// made by another replica is noticed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Sleeps until `wake` fires, `until` passes (bounded by [`IDLE_WAIT`]), or shutdown begins.
async fn wait_for_work(
    wake: &tokio::sync::Notify,
    until: Option<DateTime<Utc>>,
    stopping: &mut watch::Receiver<bool>,
) {
    let wait = until
        .map(|due| {
            (due - crate::domain::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
        })
        .unwrap_or(IDLE_WAIT)
        .clamp(Duration::from_millis(5), IDLE_WAIT);
    tokio::select! {
        () = wake.notified() => {}
        () = tokio::time::sleep(wait) => {}
        _ = stopping.changed() => {}
    }
}

fn after(at: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    at + TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX)
}

/// How long a job of this kind may take, from its creation, before it is failed.
fn deadline(state: &AppState, kind: JobKind) -> Duration {
    match kind {
        JobKind::Training => state.config.workers.training_deadline,
        JobKind::Generation | JobKind::Raw => state.config.workers.generation_deadline,
    }
}

/// The job error for a FAL call that failed for good, with FAL's own detail.
fn job_error(err: &FalError) -> JobError {
    let code = match err.status {
        Some(401 | 403) => "fal_unauthorized",
        Some(422) => "fal_validation",
        Some(400) => "fal_bad_request",
        Some(404) => "fal_not_found",
        Some(504) if err.user_timeout => "fal_start_timeout",
        Some(_) => "fal_error",
        None => "fal_unreachable",
    };
    let message = match err.detail_summary() {
        Some(summary) => format!("FAL refused the request: {summary}"),
        None => format!("FAL refused the request: {}", err.message),
    };
    JobError {
        code: code.to_owned(),
        message,
        detail: err.detail.clone(),
    }
}
