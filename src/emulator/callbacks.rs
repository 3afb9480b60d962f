//! Signed webhook deliveries, byte-compatible with FAL: body serialized like Python's
//! `json.dumps(sort_keys=True)`, Ed25519 over `id\nuser\nts\nsha256hex(body)`, retried on
//! non-2xx, timeout or connection error. Each attempt is signed afresh (FAL's behaviour
//! here is unconfirmed; a fresh timestamp keeps retries verifiable).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::Signer as _;
use serde_json::json;

use super::EmulatorState;
use super::faults::CallbackFault;
use super::state::{CallbackAttempt, HeldCallback, Outcome};
use crate::fal::signature::signed_message;
use crate::fal::wire::python_json;

/// Body FAL sends for a finished request.
pub(crate) fn callback_body(request_id: &str, outcome: &Outcome) -> String {
    let ok = outcome.is_success();
    python_json(&json!({
        "error": if ok { serde_json::Value::Null } else { json!(format!("Invalid status code: {}", outcome.status)) },
        "gateway_request_id": request_id,
        "payload": outcome.body,
        "request_id": request_id,
        "status": if ok { "OK" } else { "ERROR" },
    }))
}

pub(crate) fn on_completed(state: &EmulatorState, request_id: &str, url: &str, outcome: &Outcome) {
    let cb = HeldCallback {
        request_id: request_id.to_owned(),
        url: url.to_owned(),
        body: callback_body(request_id, outcome),
    };
    let fault = state.take_callback_fault();
    match fault {
        Some(CallbackFault::Drop) => {
            record(
                state,
                &cb,
                Delivery {
                    delivery: 1,
                    attempt: 0,
                    timestamp: "",
                    signature: "",
                    sent_at: SystemTime::now(),
                },
                None,
                Some("dropped".into()),
                Some("drop"),
            );
        }
        Some(CallbackFault::Reorder) => {
            // Held until the next callback has been delivered (or released by hand).
            let previous = state.lock().held.replace(cb);
            if let Some(p) = previous {
                spawn_delivery(state, p, None);
            }
        }
        other => spawn_delivery(state, cb, other),
    }
}

pub(crate) fn spawn_delivery(
    state: &EmulatorState,
    cb: HeldCallback,
    fault: Option<CallbackFault>,
) {
    let st = state.clone();
    state.spawn(async move {
        if let Some(CallbackFault::Delay { delay_ms }) = fault {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        deliver(&st, &cb, 1, fault.as_ref()).await;
        if fault == Some(CallbackFault::Duplicate) {
            deliver(&st, &cb, 2, fault.as_ref()).await;
        }
        // A reordered callback goes out right after this one.
        let held = st.lock().held.take();
        if let Some(h) = held {
            deliver(&st, &h, 1, Some(&CallbackFault::Reorder)).await;
        }
    });
}

fn fault_label(fault: Option<&CallbackFault>) -> Option<&'static str> {
    fault.map(|f| match f {
        CallbackFault::Drop => "drop",
        CallbackFault::Duplicate => "duplicate",
        CallbackFault::Delay { .. } => "delay",
        CallbackFault::Reorder => "reorder",
        CallbackFault::StaleTimestamp => "stale_timestamp",
        CallbackFault::BadSignature => "bad_signature",
    })
}

async fn deliver(
    state: &EmulatorState,
    cb: &HeldCallback,
    delivery: u32,
    fault: Option<&CallbackFault>,
) {
    let schedule = state.config().callback_retry_schedule.clone();
    let attempts = schedule.len() as u32 + 1;
    for attempt in 1..=attempts {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let ts = if fault == Some(&CallbackFault::StaleTimestamp) {
            now - 600
        } else {
            now
        }
        .to_string();
        let user = state.user_id().to_owned();
        let message = signed_message(&cb.request_id, &user, &ts, cb.body.as_bytes());
        let mut signature = hex::encode(state.lock().keys.signing.sign(&message).to_bytes());
        if fault == Some(&CallbackFault::BadSignature) {
            // Flip one nibble: well-formed hex that no key verifies.
            let first = if signature.starts_with('0') { "1" } else { "0" };
            signature.replace_range(0..1, first);
        }
        let sent_at = SystemTime::now();
        let sent = state
            .http()
            .post(&cb.url)
            .timeout(state.config().callback_timeout)
            .header("content-type", "application/json")
            .header("x-fal-webhook-request-id", &cb.request_id)
            .header("x-fal-webhook-user-id", &user)
            .header("x-fal-webhook-timestamp", &ts)
            .header("x-fal-webhook-signature", &signature)
            .body(cb.body.clone())
            .send()
            .await;
        let (status, error) = match sent {
            Ok(resp) => (Some(resp.status().as_u16()), None),
            Err(e) => (None, Some(e.without_url().to_string())),
        };
        record(
            state,
            cb,
            Delivery {
                delivery,
                attempt,
                timestamp: &ts,
                signature: &signature,
                sent_at,
            },
            status,
            error,
            fault_label(fault),
        );
        if status.is_some_and(|s| (200..300).contains(&s)) {
            return;
        }
        if let Some(wait) = schedule.get(attempt as usize - 1) {
            state.scaled_sleep(*wait).await;
        }
    }
}

/// Which attempt of which delivery, signed how, sent when.
struct Delivery<'a> {
    delivery: u32,
    attempt: u32,
    timestamp: &'a str,
    signature: &'a str,
    sent_at: SystemTime,
}

fn record(
    state: &EmulatorState,
    cb: &HeldCallback,
    sent: Delivery<'_>,
    status: Option<u16>,
    error: Option<String>,
    fault: Option<&str>,
) {
    state.lock().callbacks.push(CallbackAttempt {
        request_id: cb.request_id.clone(),
        delivery: sent.delivery,
        attempt: sent.attempt,
        url: cb.url.clone(),
        timestamp: sent.timestamp.to_owned(),
        signature: sent.signature.to_owned(),
        body: cb.body.clone(),
        status,
        error,
        fault: fault.map(str::to_owned),
        sent_at: sent.sent_at,
        at: SystemTime::now(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_layout_matches_fal() {
        let ok = callback_body(
            "r1",
            &Outcome::ok(json!({"seed": 17454220438242315174u64, "prompt": "dog"})),
        );
        assert_eq!(
            ok,
            r#"{"error": null, "gateway_request_id": "r1", "payload": {"prompt": "dog", "seed": 17454220438242315174}, "request_id": "r1", "status": "OK"}"#
        );
        let err = callback_body(
            "r2",
            &Outcome {
                status: 422,
                body: json!({"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]}),
                error_type: None,
            },
        );
        assert_eq!(
            err,
            r#"{"error": "Invalid status code: 422", "gateway_request_id": "r2", "payload": {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]}, "request_id": "r2", "status": "ERROR"}"#
        );
    }
}
