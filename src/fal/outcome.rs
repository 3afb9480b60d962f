//! The one reading of what FAL says about a request — a callback's body, a status answer, a
//! result, or a call FAL refused — into the job's terms: a [`FalOutcome`] or a [`JobError`].
//! The webhook handler, the dispatcher and the reconciler all go through here.

use serde_json::Value;

use super::error::{FalError, FalErrorClass};
use super::queue::{ModelResult, ReportedEnd};
use super::wire::{CallbackBody, CallbackStatus, ErrorDetail, QueueState, QueueStatus};
use crate::domain::job::{FalOutcome, JobError, JobErrorCode};

/// The status FAL gives a request ended by a cancel, and the error type it names.
const CANCELLED_STATUS: u16 = 499;
const CANCELLED_TYPE: &str = "client_cancelled";

/// What a callback says; `None` when it carries no usable outcome (OK without a payload,
/// which FAL sends when it could not serialize one, or a status we do not know).
pub fn from_callback(body: &CallbackBody) -> Option<FalOutcome> {
    match (&body.status, &body.payload) {
        (CallbackStatus::Ok, Some(payload)) if !payload.is_null() => {
            Some(FalOutcome::Succeeded(payload.clone()))
        }
        (CallbackStatus::Error, payload) => {
            let payload = payload.clone().unwrap_or(Value::Null);
            // FAL's `error` reads "Invalid status code: 422": the status is its last word.
            let status = body
                .error
                .as_deref()
                .and_then(|e| e.rsplit(' ').next())
                .and_then(|code| code.parse::<u16>().ok())
                .unwrap_or(500);
            let error_type = payload
                .get("error_type")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if is_cancel(status, error_type.as_deref()) {
                return Some(FalOutcome::Canceled);
            }
            Some(FalOutcome::Failed(model_error(status, error_type, payload)))
        }
        _ => None,
    }
}

/// What a status answer says.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusNews {
    /// Queued or running.
    Outcome(FalOutcome),
    /// Finished: the result says how, and the status said this of it.
    Completed(ReportedEnd),
    /// A status FAL has added since this was written.
    Unknown(String),
}

pub fn from_status(status: &QueueStatus) -> StatusNews {
    match &status.status {
        QueueState::InQueue => StatusNews::Outcome(FalOutcome::Queued {
            position: status.queue_position.and_then(|p| i64::try_from(p).ok()),
        }),
        QueueState::InProgress => StatusNews::Outcome(FalOutcome::Running),
        QueueState::Completed if status.error.is_some() || status.error_type.is_some() => {
            StatusNews::Completed(ReportedEnd::Failed {
                error_type: status.error_type.clone(),
            })
        }
        QueueState::Completed => StatusNews::Completed(ReportedEnd::Succeeded),
        QueueState::Other(other) => StatusNews::Unknown(other.clone()),
    }
}

/// What a fetched result says. A cancel's error ends the job as canceled only when a client
/// asked for it; unasked, it is the model's failure like any other.
pub fn from_result(result: ModelResult, cancel_asked: bool) -> FalOutcome {
    match result {
        ModelResult::Output(output) => FalOutcome::Succeeded(output),
        ModelResult::ModelError {
            status,
            body,
            error_type,
        } => {
            if cancel_asked && is_cancel(status, error_type.as_deref()) {
                FalOutcome::Canceled
            } else {
                FalOutcome::Failed(model_error(status, error_type, body))
            }
        }
    }
}

fn is_cancel(status: u16, error_type: Option<&str>) -> bool {
    status == CANCELLED_STATUS || error_type == Some(CANCELLED_TYPE)
}

/// The job error for a model that failed, with FAL's body verbatim.
pub fn model_error(status: u16, error_type: Option<String>, body: Value) -> JobError {
    let summary = ErrorDetail::parse(body.to_string().as_bytes())
        .map(|d| d.summary())
        .filter(|s| !s.is_empty());
    let code = match status {
        422 => JobErrorCode::FalValidation,
        _ => JobErrorCode::FalModelError,
    };
    JobError {
        code,
        message: match (summary, error_type) {
            (Some(summary), _) => format!("FAL reported an error ({status}): {summary}"),
            (None, Some(kind)) => format!("FAL reported an error ({status}): {kind}"),
            (None, None) => format!("FAL reported an error ({status})"),
        },
        detail: Some(body),
    }
}

/// The job error for a call FAL refused for good, with FAL's own detail.
pub fn refusal(err: &FalError) -> JobError {
    let code = match (err.class(), err.status) {
        (FalErrorClass::Account, _) => JobErrorCode::FalUnauthorized,
        (_, Some(422)) => JobErrorCode::FalValidation,
        (_, Some(400)) => JobErrorCode::FalBadRequest,
        (_, Some(404)) => JobErrorCode::FalNotFound,
        (_, Some(504)) if err.user_timeout => JobErrorCode::FalStartTimeout,
        (_, Some(_)) => JobErrorCode::FalError,
        (_, None) => JobErrorCode::FalUnreachable,
    };
    let message = match err.detail_summary() {
        Some(summary) => format!("FAL refused the request: {summary}"),
        None => format!("FAL refused the request: {}", err.message),
    };
    JobError {
        code,
        message,
        detail: err.detail.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn callback(status: &str, payload: Value, error: Option<&str>) -> CallbackBody {
        serde_json::from_value(json!({
            "request_id": "r-1",
            "status": status,
            "payload": payload,
            "error": error,
        }))
        .unwrap()
    }

    #[test]
    fn callbacks_read_into_outcomes() {
        let ok = callback("OK", json!({"images": []}), None);
        assert_eq!(
            from_callback(&ok),
            Some(FalOutcome::Succeeded(json!({"images": []})))
        );
        assert_eq!(from_callback(&callback("OK", Value::Null, None)), None);
        let invalid = callback(
            "ERROR",
            json!({"detail": [{"loc": ["body", "prompt"], "msg": "too long"}]}),
            Some("Invalid status code: 422"),
        );
        match from_callback(&invalid) {
            Some(FalOutcome::Failed(error)) => {
                assert_eq!(error.code, JobErrorCode::FalValidation);
                assert!(error.message.contains("body.prompt: too long"), "{error:?}");
            }
            other => panic!("{other:?}"),
        }
        let cancelled = callback(
            "ERROR",
            json!({"error_type": "client_cancelled"}),
            Some("Invalid status code: 500"),
        );
        assert_eq!(from_callback(&cancelled), Some(FalOutcome::Canceled));
    }

    #[test]
    fn a_cancel_error_cancels_only_when_asked() {
        let cancelled = || ModelResult::ModelError {
            status: 499,
            body: json!({"detail": "cancelled"}),
            error_type: None,
        };
        assert_eq!(from_result(cancelled(), true), FalOutcome::Canceled);
        match from_result(cancelled(), false) {
            FalOutcome::Failed(error) => assert_eq!(error.code, JobErrorCode::FalModelError),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_completed_status_with_an_error_reports_a_failure() {
        let status: QueueStatus = serde_json::from_value(json!({
            "status": "COMPLETED", "error_type": "runner_disconnected"
        }))
        .unwrap();
        assert_eq!(
            from_status(&status),
            StatusNews::Completed(ReportedEnd::Failed {
                error_type: Some("runner_disconnected".into())
            })
        );
        let queued: QueueStatus =
            serde_json::from_value(json!({"status": "IN_QUEUE", "queue_position": 3})).unwrap();
        assert_eq!(
            from_status(&queued),
            StatusNews::Outcome(FalOutcome::Queued { position: Some(3) })
        );
    }
}
