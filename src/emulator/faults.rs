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

/// Faults drawn call by call at fixed rates from a seeded generator: a steady drizzle of
/// trouble for load tests, where counted faults ([`FaultRule`]) would all land on the first
/// calls. Counted faults still come first. One draw per call picks at most one fault: the
/// rates of the faults a call can get add up to at most 1.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultRates {
    pub seed: u64,
    #[serde(default)]
    pub http: Vec<RatedHttpFault>,
    #[serde(default)]
    pub callbacks: Vec<RatedCallbackFault>,
    /// Applied at submit: the request completes with this error instead of its output.
    #[serde(default)]
    pub models: Vec<RatedModelFailure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatedHttpFault {
    #[serde(default)]
    pub target: FaultTarget,
    #[serde(flatten)]
    pub fault: HttpFault,
    /// Share of the calls of `target` that get this fault, 0 to 1.
    pub rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatedCallbackFault {
    #[serde(flatten)]
    pub fault: CallbackFault,
    pub rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatedModelFailure {
    #[serde(flatten)]
    pub failure: ModelFailure,
    pub rate: f64,
}

impl FaultRates {
    /// Refuses rates outside 0..=1 and targets whose faults add up to more than 1.
    pub fn validate(&self) -> Result<(), String> {
        let rates = self
            .http
            .iter()
            .map(|f| f.rate)
            .chain(self.callbacks.iter().map(|f| f.rate))
            .chain(self.models.iter().map(|f| f.rate));
        for rate in rates {
            if !(rate.is_finite() && (0.0..=1.0).contains(&rate)) {
                return Err(format!("rate must be from 0 to 1, got {rate}"));
            }
        }
        for target in [
            FaultTarget::Submit,
            FaultTarget::Status,
            FaultTarget::Result,
            FaultTarget::Cancel,
            FaultTarget::Upload,
        ] {
            let sum: f64 = self
                .http
                .iter()
                .filter(|f| f.target == target || f.target == FaultTarget::Any)
                .map(|f| f.rate)
                .sum();
            if sum > 1.0 + 1e-9 {
                return Err(format!(
                    "the faults of {target:?} calls add up to a rate of {sum}, more than 1"
                ));
            }
        }
        for (what, sum) in [
            (
                "callback",
                self.callbacks.iter().map(|f| f.rate).sum::<f64>(),
            ),
            ("model", self.models.iter().map(|f| f.rate).sum::<f64>()),
        ] {
            if sum > 1.0 + 1e-9 {
                return Err(format!(
                    "the {what} faults add up to a rate of {sum}, more than 1"
                ));
            }
        }
        Ok(())
    }
}

/// Picks the item whose slice of `0..1` holds `draw`; `None` past the last one.
pub(crate) fn pick<'a, T>(
    draw: f64,
    items: impl IntoIterator<Item = (&'a T, f64)>,
) -> Option<&'a T> {
    let mut upto = 0.0;
    for (item, rate) in items {
        upto += rate;
        if draw < upto {
            return Some(item);
        }
    }
    None
}

/// FAL-like bodies per status (fal-protocol.md §2).
/// The `url` of a model error item: FAL's error reference, at the error's type ("A link to
/// documentation about this specific error type (e.g. `https://docs.fal.ai/errors/#image_too_large`)",
/// docs.fal.ai/errors).
pub(crate) fn error_docs_url(error_type: &str) -> String {
    format!("https://docs.fal.ai/errors/#{error_type}")
}

pub(crate) fn default_error_body(status: u16) -> Value {
    match status {
        400 => json!({"detail": "Bad request", "error_type": "bad_request"}),
        401 => json!({"detail": "No user found for Key ID and Secret"}),
        403 => {
            json!({"detail": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."})
        }
        404 => json!({"detail": "Not Found"}),
        422 => {
            json!({"detail": [{"loc": ["body", "prompt"], "msg": "The content was flagged by a content checker.", "type": "content_policy_violation", "url": error_docs_url("content_policy_violation")}]})
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

    #[test]
    fn rates_parse_and_are_checked() {
        let rates: FaultRates = serde_json::from_str(
            r#"{"seed": 7,
                "http": [{"target": "status", "kind": "status", "status": 503, "rate": 0.25},
                         {"kind": "nginx502", "rate": 0.5}],
                "callbacks": [{"kind": "drop", "rate": 0.1}],
                "models": [{"status": 422, "rate": 0.05}]}"#,
        )
        .unwrap();
        assert_eq!(rates.http[1].target, FaultTarget::Submit);
        assert_eq!(rates.http[0].fault, FaultRule::status(503));
        assert_eq!(rates.models[0].failure, ModelFailure::new(422));
        assert_eq!(rates.validate(), Ok(()));

        let mut over = rates.clone();
        over.http.push(RatedHttpFault {
            target: FaultTarget::Any,
            fault: HttpFault::Nginx502,
            rate: 0.6,
        });
        assert!(over.validate().unwrap_err().contains("Submit"));
        let mut negative = rates;
        negative.callbacks[0].rate = -0.1;
        assert!(negative.validate().is_err());
    }

    #[test]
    fn a_draw_picks_the_fault_whose_slice_holds_it() {
        let items = [("a", 0.1), ("b", 0.2)];
        let pick_at = |d| pick(d, items.iter().map(|(n, r)| (n, *r))).copied();
        assert_eq!(pick_at(0.0), Some("a"));
        assert_eq!(pick_at(0.1), Some("b"));
        assert_eq!(pick_at(0.29), Some("b"));
        assert_eq!(pick_at(0.31), None);
    }
}
