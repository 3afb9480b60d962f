//! What went wrong talking to FAL, and what it means: each failure knows its class
//! (retryable, account, permanent) as data.

use std::fmt;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::retry::parse_retry_after;
use super::wire::{Detail, ErrorDetail};

/// The body of FAL's answer for a result asked for too early.
const STILL_IN_PROGRESS: &str = "Request is still in progress";

/// What went wrong talking to FAL, classified for the retry policy. Boxed so that
/// `Result<_, FalError>` stays small; fields are reached through `Deref`.
#[derive(Clone, PartialEq)]
pub struct FalError(Box<FalErrorInfo>);

impl std::ops::Deref for FalError {
    type Target = FalErrorInfo;
    fn deref(&self) -> &FalErrorInfo {
        &self.0
    }
}

impl std::ops::DerefMut for FalError {
    fn deref_mut(&mut self) -> &mut FalErrorInfo {
        &mut self.0
    }
}

#[derive(Clone, PartialEq)]
pub struct FalErrorInfo {
    pub kind: FalErrorKind,
    /// HTTP status when FAL (or a proxy in front of it) answered.
    pub status: Option<u16>,
    /// FAL's `detail`, as sent (string or list of `{loc, msg, type}`).
    pub detail: Option<Value>,
    /// From the body's `error_type` or the `X-Fal-Error-Type` header.
    pub error_type: Option<String>,
    pub retry_after: Option<Duration>,
    /// `X-Fal-Request-Timeout-Type: user`: our own start deadline expired; retrying
    /// would only expire again.
    pub user_timeout: bool,
    /// `x-fal-request-id` of the answer, if any (its absence marks an ingress error).
    pub fal_request_id: Option<String>,
    /// True when FAL may have acted on the request although we got no usable answer
    /// (timeout or reset after sending, gateway error). For a submit this means a job
    /// may exist at FAL: expect a callback before submitting again.
    pub may_have_reached_fal: bool,
    /// Human text. Never contains the key or a URL (URLs carry our callback token).
    pub message: String,
}

/// What a failed call means for the work that made it: the retry policy reads this, never a
/// status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FalErrorClass {
    /// The same call may succeed later: an outage, throttling, a lost or unready answer.
    Retryable,
    /// FAL refused our key or our account (401, 403): no call succeeds until someone acts,
    /// and `/readyz` says so.
    Account,
    /// FAL refused this call for good: bad input, an unknown endpoint, a user timeout, an
    /// answer we cannot read.
    Permanent,
}

/// How the call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FalErrorKind {
    /// FAL answered with a non-success status.
    Http,
    /// The result is not ready (`400 Request is still in progress`).
    NotReady,
    /// Connecting failed: the request never left.
    Connect,
    /// No answer within the deadline.
    Timeout,
    /// Connection broke after connecting (reset, closed mid-answer).
    Transport,
    /// An answer we could not read as the expected JSON.
    Decode,
    /// A URL was unusable or pointed away from FAL's configured origin.
    InvalidUrl,
    /// The HTTP client could not be built.
    Build,
}

impl FalError {
    pub(super) fn new(kind: FalErrorKind, message: impl Into<String>) -> Self {
        Self(Box::new(FalErrorInfo {
            kind,
            status: None,
            detail: None,
            error_type: None,
            retry_after: None,
            user_timeout: false,
            fal_request_id: None,
            may_have_reached_fal: false,
            message: message.into(),
        }))
    }

    /// What this failure means for the work that made the call.
    pub fn class(&self) -> FalErrorClass {
        match self.kind {
            FalErrorKind::Http => match self.status {
                Some(504) if self.user_timeout => FalErrorClass::Permanent,
                Some(408 | 429 | 502 | 503 | 504) => FalErrorClass::Retryable,
                Some(401 | 403) => FalErrorClass::Account,
                _ => FalErrorClass::Permanent,
            },
            FalErrorKind::NotReady
            | FalErrorKind::Connect
            | FalErrorKind::Timeout
            | FalErrorKind::Transport => FalErrorClass::Retryable,
            FalErrorKind::Decode | FalErrorKind::InvalidUrl | FalErrorKind::Build => {
                FalErrorClass::Permanent
            }
        }
    }

    /// Whether the same call may succeed later.
    pub fn retryable(&self) -> bool {
        self.class() == FalErrorClass::Retryable
    }

    /// Whether FAL refused our key or account (401, 403) rather than this request.
    pub fn account_refused(&self) -> bool {
        self.class() == FalErrorClass::Account
    }

    /// One line from FAL's detail, for job error messages.
    pub fn detail_summary(&self) -> Option<String> {
        let detail: Detail = serde_json::from_value(self.detail.clone()?).ok()?;
        Some(
            ErrorDetail {
                detail: Some(detail),
                error_type: None,
            }
            .summary(),
        )
    }

    pub(super) fn from_reqwest(err: reqwest::Error) -> Self {
        // `without_url`: the submit URL carries our callback token.
        let kind = if err.is_connect() {
            FalErrorKind::Connect
        } else if err.is_timeout() {
            FalErrorKind::Timeout
        } else if err.is_decode() {
            FalErrorKind::Decode
        } else if err.is_builder() {
            FalErrorKind::Build
        } else {
            FalErrorKind::Transport
        };
        let mut e = Self::new(kind, error_chain(&err.without_url()));
        // A failed connect never sent a byte; anything later may have been processed.
        e.may_have_reached_fal = !matches!(kind, FalErrorKind::Connect | FalErrorKind::Build);
        e
    }

    pub(super) fn from_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Self {
        let parsed = serde_json::from_slice::<Value>(body).ok();
        let detail = parsed.as_ref().and_then(|v| v.get("detail")).cloned();
        let header_str = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let error_type = parsed
            .as_ref()
            .and_then(|v| v.get("error_type"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| header_str("x-fal-error-type"));
        let not_ready = status == StatusCode::BAD_REQUEST
            && detail.as_ref().and_then(Value::as_str) == Some(STILL_IN_PROGRESS);
        let message = match &detail {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None if parsed.is_some() => String::from_utf8_lossy(body).chars().take(300).collect(),
            // Non-JSON (nginx HTML): the status says enough.
            None => status
                .canonical_reason()
                .unwrap_or("unexpected answer")
                .into(),
        };
        let mut e = Self::new(
            if not_ready {
                FalErrorKind::NotReady
            } else {
                FalErrorKind::Http
            },
            message,
        );
        e.status = Some(status.as_u16());
        e.detail = detail;
        e.error_type = error_type;
        e.retry_after = header_str("retry-after").and_then(|v| parse_retry_after(&v));
        e.user_timeout = header_str("x-fal-request-timeout-type")
            .is_some_and(|v| v.eq_ignore_ascii_case("user"));
        e.fal_request_id = header_str("x-fal-request-id");
        // 500/502/504 can come from a gateway after the request was forwarded, an error page
        // of FAL's ingress included (a 504 there means the queue did not answer in time, not
        // that it did nothing); 4xx and 503 are refusals before any work was queued.
        e.may_have_reached_fal = matches!(status.as_u16(), 500 | 502 | 504);
        e
    }
}

impl fmt::Display for FalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FAL {:?}", self.kind)?;
        if let Some(s) = self.status {
            write!(f, " {s}")?;
        }
        if let Some(t) = &self.error_type {
            write!(f, " ({t})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl fmt::Debug for FalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FalError")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("error_type", &self.error_type)
            .field("retry_after", &self.retry_after)
            .field("user_timeout", &self.user_timeout)
            .field("may_have_reached_fal", &self.may_have_reached_fal)
            .field("message", &self.message)
            .finish()
    }
}

impl std::error::Error for FalError {}

pub(super) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn http_error(code: u16, headers: &[(&str, &str)], body: &str) -> FalError {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        FalError::from_response(StatusCode::from_u16(code).unwrap(), &map, body.as_bytes())
    }

    #[test]
    fn classification() {
        for code in [408, 429, 502, 503, 504] {
            assert!(http_error(code, &[], "").retryable(), "{code}");
        }
        for code in [400, 401, 403, 404, 422, 500] {
            assert!(!http_error(code, &[], "{}").retryable(), "{code}");
        }
        let user = http_error(504, &[("X-Fal-Request-Timeout-Type", "user")], "{}");
        assert!(user.user_timeout && !user.retryable());
        assert_eq!(user.class(), FalErrorClass::Permanent);
        for code in [401, 403] {
            let refused = http_error(code, &[], "{}");
            assert_eq!(refused.class(), FalErrorClass::Account, "{code}");
            assert!(refused.account_refused());
        }
        assert_eq!(http_error(422, &[], "{}").class(), FalErrorClass::Permanent);

        let e = http_error(
            429,
            &[("Retry-After", "7")],
            r#"{"detail": "queue full", "error_type": "queue_full"}"#,
        );
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.error_type.as_deref(), Some("queue_full"));
        assert_eq!(e.detail, Some(Value::String("queue full".into())));
        assert!(!e.may_have_reached_fal);

        let e = http_error(
            503,
            &[("X-Fal-Error-Type", "runner_scheduling_failure")],
            "x",
        );
        assert_eq!(e.error_type.as_deref(), Some("runner_scheduling_failure"));

        let e = http_error(
            422,
            &[],
            r#"{"detail": [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]}"#,
        );
        assert_eq!(
            e.detail_summary().as_deref(),
            Some("body.prompt: Field required")
        );

        // A gateway error, FAL's ingress page included, may hide a queued request.
        let e = http_error(502, &[], "<html><center>nginx</center></html>");
        assert!(e.retryable() && e.may_have_reached_fal && e.fal_request_id.is_none());
        let e = http_error(500, &[], r#"{"detail": "Internal server error"}"#);
        assert!(e.may_have_reached_fal);

        let e = http_error(400, &[], r#"{"detail": "Request is still in progress"}"#);
        assert_eq!(e.kind, FalErrorKind::NotReady);
        assert!(e.retryable());
    }
}
