//! The job state machine: one function decides every transition, whoever brings the news.
//!
//! ```text
//! pending ──submit ok──▶ submitted ──IN_PROGRESS──▶ running ──COMPLETED ok──▶ succeeded
//!    │                      │                          │      └─COMPLETED error──▶ failed
//!    └─ permanent error / deadline ─▶ failed           └─ cancel confirmed ─▶ canceled
//!    └─ cancel before submit ───────▶ canceled
//! ```
//!
//! Rules: never backwards (pending < submitted < running < terminal); terminal states never
//! change; the same news twice is a no-op; news for a later state may skip states.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

pub use super::UnknownVariant;

/// Where a job is. One enum, one spelling: `snake_case` on the wire and in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Stored, not yet accepted by FAL.
    Pending,
    /// Accepted by FAL's queue.
    Submitted,
    /// FAL reported it in progress.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled before it produced a result.
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        Self::Pending,
        Self::Submitted,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Submitted => "submitted",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }

    /// The order in which news may move a job; all terminal states share the last rank.
    fn rank(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Submitted => 1,
            Self::Running => 2,
            Self::Succeeded | Self::Failed | Self::Canceled => 3,
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = UnknownVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        super::parse_spelling(&Self::ALL, Self::as_str, s)
    }
}

/// Why a job failed: our stable code, a message, and FAL's own detail when it gave one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub code: JobErrorCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
}

/// Every reason a job can fail (or, while it waits, why it is held), one stable spelling each:
/// clients match on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobErrorCode {
    /// FAL refused our key or account (401, 403).
    FalUnauthorized,
    /// FAL found the input invalid (422), at submit or from the model.
    FalValidation,
    /// FAL refused the request as malformed (400).
    FalBadRequest,
    /// FAL does not know the endpoint (404 at submit).
    FalNotFound,
    /// The request's own start timeout ran out at FAL (504 of the `user` kind).
    FalStartTimeout,
    /// FAL refused the request with another status.
    FalError,
    /// FAL could not be reached, and the job ran out of time.
    FalUnreachable,
    /// The model failed the request.
    FalModelError,
    /// FAL was unavailable until the submit deadline.
    FalUnavailable,
    /// FAL refused the submit for a while; it is tried again (a pending job's last error).
    FalRetrying,
    /// The submit's answer never came; the job waits for FAL to name it.
    FalSubmitUnconfirmed,
    /// FAL no longer knows the request (404 on its status).
    FalRequestLost,
    /// FAL finished, but its result could not be fetched in time.
    FalResultUnavailable,
    /// FAL reported success with no trained weights in its output.
    FalNoArtifact,
    /// A training failed without a reason of its own.
    TrainingFailed,
    /// The job's deadline passed before FAL finished it.
    DeadlineExceeded,
}

impl JobErrorCode {
    pub const ALL: [JobErrorCode; 16] = [
        Self::FalUnauthorized,
        Self::FalValidation,
        Self::FalBadRequest,
        Self::FalNotFound,
        Self::FalStartTimeout,
        Self::FalError,
        Self::FalUnreachable,
        Self::FalModelError,
        Self::FalUnavailable,
        Self::FalRetrying,
        Self::FalSubmitUnconfirmed,
        Self::FalRequestLost,
        Self::FalResultUnavailable,
        Self::FalNoArtifact,
        Self::TrainingFailed,
        Self::DeadlineExceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::FalUnauthorized => "fal_unauthorized",
            Self::FalValidation => "fal_validation",
            Self::FalBadRequest => "fal_bad_request",
            Self::FalNotFound => "fal_not_found",
            Self::FalStartTimeout => "fal_start_timeout",
            Self::FalError => "fal_error",
            Self::FalUnreachable => "fal_unreachable",
            Self::FalModelError => "fal_model_error",
            Self::FalUnavailable => "fal_unavailable",
            Self::FalRetrying => "fal_retrying",
            Self::FalSubmitUnconfirmed => "fal_submit_unconfirmed",
            Self::FalRequestLost => "fal_request_lost",
            Self::FalResultUnavailable => "fal_result_unavailable",
            Self::FalNoArtifact => "fal_no_artifact",
            Self::TrainingFailed => "training_failed",
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

impl fmt::Display for JobErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobErrorCode {
    type Err = UnknownVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        super::parse_spelling(&Self::ALL, Self::as_str, s)
    }
}

/// What FAL said of a request, in the job's terms: the one shape that callbacks, status
/// answers and results are all read into (`fal::outcome`).
#[derive(Debug, Clone, PartialEq)]
pub enum FalOutcome {
    /// Waiting in FAL's queue, at this position when FAL said.
    Queued { position: Option<i64> },
    /// A runner is working on it.
    Running,
    /// Finished with this output.
    Succeeded(serde_json::Value),
    /// Finished with this error.
    Failed(JobError),
    /// Ended by a cancel.
    Canceled,
}

impl FalOutcome {
    /// The news this outcome is for the state machine.
    pub fn event(&self) -> JobEvent {
        match self {
            Self::Queued { .. } => JobEvent::SubmitAccepted,
            Self::Running => JobEvent::Started,
            Self::Succeeded(_) => JobEvent::Succeeded,
            Self::Failed(_) => JobEvent::Failed,
            Self::Canceled => JobEvent::CancelConfirmed,
        }
    }
}

/// What kind of work a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Trains an avatar.
    Training,
    /// Generates images of an avatar.
    Generation,
    /// Any allow-listed FAL endpoint with an input given verbatim.
    Raw,
}

impl JobKind {
    pub const ALL: [JobKind; 3] = [Self::Training, Self::Generation, Self::Raw];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::Generation => "generation",
            Self::Raw => "raw",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = UnknownVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        super::parse_spelling(&Self::ALL, Self::as_str, s)
    }
}

/// Who brought the news that moved a job; recorded in its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    Api,
    Dispatcher,
    Callback,
    Reconciler,
}

impl EventSource {
    pub const ALL: [EventSource; 4] = [
        Self::Api,
        Self::Dispatcher,
        Self::Callback,
        Self::Reconciler,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Dispatcher => "dispatcher",
            Self::Callback => "callback",
            Self::Reconciler => "reconciler",
        }
    }
}

impl FromStr for EventSource {
    type Err = UnknownVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        super::parse_spelling(&Self::ALL, Self::as_str, s)
    }
}

/// News about a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobEvent {
    /// FAL's queue accepted the request.
    SubmitAccepted,
    /// FAL reported the request in progress.
    Started,
    /// FAL completed the request with a result.
    Succeeded,
    /// The request failed: FAL's error, a permanent submit error, or a deadline.
    Failed,
    /// FAL confirmed the cancellation (or the job was never sent).
    CancelConfirmed,
    /// A client asked for the job to be cancelled.
    CancelRequested,
}

impl JobEvent {
    pub const ALL: [JobEvent; 6] = [
        Self::SubmitAccepted,
        Self::Started,
        Self::Succeeded,
        Self::Failed,
        Self::CancelConfirmed,
        Self::CancelRequested,
    ];

    /// The state this news announces, for the events that announce one.
    fn target(self) -> Option<JobStatus> {
        match self {
            Self::SubmitAccepted => Some(JobStatus::Submitted),
            Self::Started => Some(JobStatus::Running),
            Self::Succeeded => Some(JobStatus::Succeeded),
            Self::Failed => Some(JobStatus::Failed),
            Self::CancelConfirmed => Some(JobStatus::Canceled),
            Self::CancelRequested => None,
        }
    }
}

/// What to do with a piece of news.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Move the job to this state.
    MoveTo(JobStatus),
    /// The job is already there: the same news twice.
    Duplicate,
    /// Older news than the job's state, or news for a job that has already ended otherwise.
    Stale,
    /// The job is with FAL: remember the request and let the reconciler forward it.
    RecordCancelRequest,
    /// A client asked to cancel a job that has already finished with a result or an error.
    CannotCancelFinished,
}

/// The one transition function.
pub fn decide(current: JobStatus, event: JobEvent) -> Decision {
    let Some(target) = event.target() else {
        // A client's cancel.
        return match current {
            JobStatus::Pending => Decision::MoveTo(JobStatus::Canceled),
            JobStatus::Submitted | JobStatus::Running => Decision::RecordCancelRequest,
            JobStatus::Canceled => Decision::Duplicate,
            JobStatus::Succeeded | JobStatus::Failed => Decision::CannotCancelFinished,
        };
    };
    if current == target {
        Decision::Duplicate
    } else if current.is_terminal() || target.rank() < current.rank() {
        Decision::Stale
    } else if target.rank() == current.rank() {
        // Two different states of the same rank below terminal do not exist; kept total.
        Decision::Stale
    } else {
        Decision::MoveTo(target)
    }
}

/// [`decide`] for a job that may have a request at FAL we never heard of (its submit was
/// sent and no answer recorded). Such a pending job cannot be cancelled on the spot: the
/// cancel is kept, and passed on to FAL once a callback names the request, or confirmed once
/// the wait for such a callback is over (or the submit is known never to have reached FAL).
pub fn decide_for(current: JobStatus, submit_in_doubt: bool, event: JobEvent) -> Decision {
    match (current, event) {
        (JobStatus::Pending, JobEvent::CancelRequested) if submit_in_doubt => {
            Decision::RecordCancelRequest
        }
        _ => decide(current, event),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(status: JobStatus, event: JobEvent) -> JobStatus {
        match decide(status, event) {
            Decision::MoveTo(next) => next,
            _ => status,
        }
    }

    #[test]
    fn every_status_and_event_has_the_expected_decision() {
        use Decision::*;
        use JobEvent as E;
        use JobStatus as S;
        let table = [
            (S::Pending, E::SubmitAccepted, MoveTo(S::Submitted)),
            (S::Pending, E::Started, MoveTo(S::Running)),
            (S::Pending, E::Succeeded, MoveTo(S::Succeeded)),
            (S::Pending, E::Failed, MoveTo(S::Failed)),
            (S::Pending, E::CancelConfirmed, MoveTo(S::Canceled)),
            (S::Pending, E::CancelRequested, MoveTo(S::Canceled)),
            (S::Submitted, E::SubmitAccepted, Duplicate),
            (S::Submitted, E::Started, MoveTo(S::Running)),
            (S::Submitted, E::Succeeded, MoveTo(S::Succeeded)),
            (S::Submitted, E::Failed, MoveTo(S::Failed)),
            (S::Submitted, E::CancelConfirmed, MoveTo(S::Canceled)),
            (S::Submitted, E::CancelRequested, RecordCancelRequest),
            (S::Running, E::SubmitAccepted, Stale),
            (S::Running, E::Started, Duplicate),
            (S::Running, E::Succeeded, MoveTo(S::Succeeded)),
            (S::Running, E::Failed, MoveTo(S::Failed)),
            (S::Running, E::CancelConfirmed, MoveTo(S::Canceled)),
            (S::Running, E::CancelRequested, RecordCancelRequest),
            (S::Succeeded, E::SubmitAccepted, Stale),
            (S::Succeeded, E::Started, Stale),
            (S::Succeeded, E::Succeeded, Duplicate),
            (S::Succeeded, E::Failed, Stale),
            (S::Succeeded, E::CancelConfirmed, Stale),
            (S::Succeeded, E::CancelRequested, CannotCancelFinished),
            (S::Failed, E::SubmitAccepted, Stale),
            (S::Failed, E::Started, Stale),
            (S::Failed, E::Succeeded, Stale),
            (S::Failed, E::Failed, Duplicate),
            (S::Failed, E::CancelConfirmed, Stale),
            (S::Failed, E::CancelRequested, CannotCancelFinished),
            (S::Canceled, E::SubmitAccepted, Stale),
            (S::Canceled, E::Started, Stale),
            (S::Canceled, E::Succeeded, Stale),
            (S::Canceled, E::Failed, Stale),
            (S::Canceled, E::CancelConfirmed, Duplicate),
            (S::Canceled, E::CancelRequested, Duplicate),
        ];
        assert_eq!(table.len(), JobStatus::ALL.len() * JobEvent::ALL.len());
        for (status, event, expected) in table {
            assert_eq!(decide(status, event), expected, "{status} + {event:?}");
        }
    }

    #[test]
    fn no_transition_goes_backwards_and_terminal_states_never_change() {
        for status in JobStatus::ALL {
            for event in JobEvent::ALL {
                let next = apply(status, event);
                assert!(
                    next.rank() >= status.rank(),
                    "{status} + {event:?} -> {next}"
                );
                if status.is_terminal() {
                    assert_eq!(next, status, "{status} + {event:?} changed a terminal job");
                }
            }
        }
    }

    #[test]
    fn the_same_news_twice_is_a_no_op() {
        for status in JobStatus::ALL {
            for event in JobEvent::ALL {
                let once = apply(status, event);
                let twice = apply(once, event);
                assert_eq!(once, twice, "{status} + {event:?} twice");
            }
        }
    }

    #[test]
    fn every_pair_of_fal_news_in_both_orders_ends_in_a_consistent_state() {
        let news: Vec<JobEvent> = JobEvent::ALL
            .into_iter()
            .filter(|e| *e != JobEvent::CancelRequested)
            .collect();
        for start in JobStatus::ALL {
            for &a in &news {
                for &b in &news {
                    let ab = apply(apply(start, a), b);
                    let ba = apply(apply(start, b), a);
                    // Whatever the order, the job ends as far as either piece of news takes it.
                    assert_eq!(ab.rank(), ba.rank(), "{start}: {a:?},{b:?} vs {b:?},{a:?}");
                    if ab != ba {
                        // Two different ends raced: the first news to arrive wins.
                        assert!(ab.is_terminal() && ba.is_terminal());
                        assert_eq!(ab, apply(start, a), "{start}: {a:?} then {b:?}");
                        assert_eq!(ba, apply(start, b), "{start}: {b:?} then {a:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_clients_cancel_against_every_news_in_both_orders() {
        for start in JobStatus::ALL {
            for news in JobEvent::ALL {
                let cancel_first = apply(apply(start, JobEvent::CancelRequested), news);
                let news_first = apply(apply(start, news), JobEvent::CancelRequested);
                // A cancel never resurrects or rewrites a finished job...
                if start.is_terminal() {
                    assert_eq!(cancel_first, start);
                    assert_eq!(news_first, start);
                }
                // ...and a pending job cancelled first stays cancelled whatever news follows:
                // a submit that FAL accepted meanwhile is then stale, and whoever submitted it
                // must withdraw it at FAL.
                if start == JobStatus::Pending {
                    assert_eq!(cancel_first, JobStatus::Canceled, "{news:?}");
                }
                // News that ends a job before the cancel arrives is kept.
                if apply(start, news).is_terminal() {
                    assert_eq!(news_first, apply(start, news));
                }
            }
        }
    }

    #[test]
    fn spellings_round_trip_and_match_serde() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
        for kind in JobKind::ALL {
            assert_eq!(kind.as_str().parse::<JobKind>(), Ok(kind));
        }
        assert!("COMPLETED".parse::<JobStatus>().is_err());
        assert!("Pending".parse::<JobStatus>().is_err());
    }

    #[test]
    fn a_pending_job_whose_submit_is_in_doubt_keeps_a_cancel_for_later() {
        assert_eq!(
            decide_for(JobStatus::Pending, true, JobEvent::CancelRequested),
            Decision::RecordCancelRequest
        );
        assert_eq!(
            decide_for(JobStatus::Pending, false, JobEvent::CancelRequested),
            Decision::MoveTo(JobStatus::Canceled)
        );
        // Everything else is decided as for any job.
        for status in JobStatus::ALL {
            for event in JobEvent::ALL {
                if (status, event) != (JobStatus::Pending, JobEvent::CancelRequested) {
                    assert_eq!(decide_for(status, true, event), decide(status, event));
                }
            }
        }
    }
}
