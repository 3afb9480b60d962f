//! Fault descriptions shared by the Rust controls and the `/_emulator` HTTP API.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Which calls an HTTP fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    #[default]
    Submit,
    Status,
    Result,
    Cancel,
    Upload,
    Any,
}

/// How the emulator misbehaves on one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HttpFault {
    /// Answer `status` with a FAL-like JSON body (or `body`), refusing the call.
    /// 504 may carry `X-Fal-Request-Timeout-Type: user`.
    Status {
        status: u16,
        #[serde(default)]
        body: Option<Value>,
        #[serde(default)]
        retry_after: Option<u64>,
        #[serde(default)]
        timeout_type_user: bool,
    },
    /// 502 with nginx's HTML page and no `x-fal-request-id` (an ingress failure).
    Nginx502,
    /// Wait, then answer normally.
    Delay { delay_ms: u64 },
    /// Wait until released (`release_held_calls`), then answer normally.
    Hold,
    /// Do the work (a submit creates its request), then reset the TCP connection
    /// instead of answering.
    AcceptThenReset,
    /// Do the work (a submit creates its request), then hold the answer until released: the
    /// caller may time out or die meanwhile, FAL having the request.
    AcceptThenHold,
}

/// An armed fault: `fault` for the next `count` calls of `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub target: FaultTarget,
    #[serde(flatten)]
    pub fault: HttpFault,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

impl FaultRule {
    pub fn submit(fault: HttpFault, count: u32) -> Self {
        Self {
            target: FaultTarget::Submit,
            fault,
            count,
        }
    }

    pub fn status(code: u16) -> HttpFault {
        HttpFault::Status {
            status: code,
            body: None,
            retry_after: None,
            timeout_type_user: false,
        }
    }
}

/// How the next callback is mistreated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CallbackFault {
    /// Never delivered.
    Drop,
    /// Delivered twice (second after the first delivery ends).
    Duplicate,
    /// Delivered after `delay_ms`.
    Delay { delay_ms: u64 },
    /// Held back and delivered right after the next callback (or on release).
    Reorder,
    /// Signed with a timestamp 600 s in the past.
    StaleTimestamp,
    /// Signature altered so no key verifies it.
    BadSignature,
}

/// A forced model failure: the request COMPLETES with this status and body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFailure {
    #[serde(default = "default_failure_status")]
    pub status: u16,
    #[serde(default)]
    pub body: Option<Value>,
    #[serde(default)]
    pub error_type: Option<String>,
}

fn default_failure_status() -> u16 {
    422
}

impl ModelFailure {
    pub fn new(status: u16) -> Self {
        Self {
            status,
            body: None,
            error_type: None,
        }
    }

    pub(crate) fn body_or_default(&self) -> Value {
        self.body
            .clone()
            .unwrap_or_else(|| default_error_body(self.status))
    }

    pub(crate) fn error_type_or_default(&self) -> Option<String> {
        self.error_type.clone().or_else(|| {
            default_error_body(self.status)
                .get("error_type")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
    }
}

/// FAL-like bodies per status (fal-protocol.md §2).
pub(crate) fn default_error_body(status: u16) -> Value {
    match status {
        400 => json!({"detail": "Bad request", "error_type": "bad_request"}),
        401 => json!({"detail": "No user found for Key ID and Secret"}),
        403 => {
            json!({"detail": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."})
        }
        404 => json!({"detail": "Not Found"}),
        422 => {
            json!({"detail": [{"loc": ["body", "prompt"], "msg": "The content was flagged by a content checker.", "type": "content_policy_violation"}]})
        }
        429 => json!({"detail": "Too many requests: queue is full", "error_type": "queue_full"}),
        499 => {
            json!({"detail": "Request cancelled by the client.", "error_type": "client_cancelled"})
        }
        500 => json!({"detail": "Internal server error", "error_type": "internal_error"}),
        502 => {
            json!({"detail": "Runner returned an incomplete response", "error_type": "runner_incomplete_response"})
        }
        503 => {
            json!({"detail": "No runner could be scheduled", "error_type": "runner_scheduling_failure"})
        }
        504 => json!({"detail": "Request timed out", "error_type": "request_timeout"}),
        _ => json!({"detail": format!("Error {status}")}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_from_control_json() {
        let r: FaultRule = serde_json::from_str(
            r#"{"kind": "status", "status": 429, "retry_after": 2, "count": 3}"#,
        )
        .unwrap();
        assert_eq!(r.target, FaultTarget::Submit);
        assert_eq!(r.count, 3);
        assert_eq!(
            r.fault,
            HttpFault::Status {
                status: 429,
                body: None,
                retry_after: Some(2),
                timeout_type_user: false
            }
        );
        let r: FaultRule =
            serde_json::from_str(r#"{"kind": "accept_then_reset", "target": "any"}"#).unwrap();
        assert_eq!(
            (r.target, r.count, r.fault),
            (FaultTarget::Any, 1, HttpFault::AcceptThenReset)
        );
        let f: CallbackFault = serde_json::from_str(r#"{"kind": "delay", "delay_ms": 5}"#).unwrap();
        assert_eq!(f, CallbackFault::Delay { delay_ms: 5 });
        let m: ModelFailure = serde_json::from_str("{}").unwrap();
        assert_eq!(m.status, 422);
    }
}
