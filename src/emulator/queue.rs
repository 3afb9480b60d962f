//! The queue API: submit, status, status stream, result, cancel, and the timers that move
//! a request from IN_QUEUE to IN_PROGRESS to COMPLETED.
//!
//! Paths are parsed by hand (one fallback handler) because FAL accepts endpoint ids of
//! any depth, both owner/alias and full-id prefixes before `/requests/`, and trailing
//! slashes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::{Value, json};
use subtle::ConstantTimeEq as _;

use super::EmulatorState;
use super::callbacks;
use super::faults::{FaultTarget, HttpFault, default_error_body};
use super::listener::ConnCtl;
use super::models;
use super::state::{Durations, Outcome, Phase, RequestSnapshot, SubmitRecord};
use crate::fal::urls::app_prefix;

const MAX_INPUT_BYTES: usize = 16 * 1024 * 1024;

enum Route {
    Submit { endpoint: String },
    Status { prefix: String, id: String },
    Stream { prefix: String, id: String },
    Result { prefix: String, id: String },
    Cancel { prefix: String, id: String },
}

impl Route {
    fn target(&self) -> FaultTarget {
        match self {
            Route::Submit { .. } => FaultTarget::Submit,
            Route::Status { .. } | Route::Stream { .. } => FaultTarget::Status,
            Route::Result { .. } => FaultTarget::Result,
            Route::Cancel { .. } => FaultTarget::Cancel,
        }
    }
}

/// First path segments of the emulator's own rooms (REST storage, CDN, keys, controls). A
/// call there that no route took is a 404: never a status call, nor a submit to an app
/// named `storage/…`.
const NOT_QUEUE: &[&str] = &["storage", "files", "_cdn", "_emulator", ".well-known"];

fn classify(method: &Method, segs: &[&str]) -> Option<Route> {
    if segs.first().is_some_and(|first| NOT_QUEUE.contains(first)) {
        return None;
    }
    if let Some(k) = segs.iter().position(|s| *s == "requests")
        && k >= 2
        && segs.len() > k + 1
    {
        let prefix = segs[..k].join("/");
        let id = segs[k + 1].to_owned();
        return match (method.as_str(), &segs[k + 2..]) {
            ("GET", []) | ("GET", ["response"]) => Some(Route::Result { prefix, id }),
            ("GET", ["status"]) => Some(Route::Status { prefix, id }),
            ("GET", ["status", "stream"]) => Some(Route::Stream { prefix, id }),
            ("PUT", ["cancel"]) => Some(Route::Cancel { prefix, id }),
            _ => None,
        };
    }
    (method == Method::POST && segs.len() >= 2).then(|| Route::Submit {
        endpoint: segs.join("/"),
    })
}

pub(crate) fn query_map(query: Option<&str>) -> HashMap<String, String> {
    let Some(q) = query else {
        return HashMap::new();
    };
    reqwest::Url::parse(&format!("http://q/?{q}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

pub(crate) fn json_response(status: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-fal-request-id", v);
    }
    resp
}

/// `Authorization: Key <configured key>`; FAL answers 401 for anything else.
/// `Some(answer)` when the caller must refuse.
pub(crate) fn check_auth(state: &EmulatorState, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(key) = given.strip_prefix("Key ") else {
        return Some(json_response(401, &default_error_body(401)));
    };
    if !key.contains(':') {
        return Some(json_response(
            401,
            &json!({"detail": "Invalid Key Authorization header format. Expected '<key_id>:<key_secret>'."}),
        ));
    }
    let expected = state.config().key.expose().as_bytes();
    if bool::from(key.as_bytes().ct_eq(expected)) {
        None
    } else {
        Some(json_response(401, &default_error_body(401)))
    }
}

/// A call refused as FAL's queue refuses it: the JSON body, its `error_type` repeated in
/// `X-Fal-Error-Type`, and a request id.
fn refusal(status: u16, body: &Value) -> Response {
    let mut resp = json_response(status, body);
    if let Some(t) = body.get("error_type").and_then(Value::as_str)
        && let Ok(v) = HeaderValue::from_str(t)
    {
        resp.headers_mut().insert("x-fal-error-type", v);
    }
    let id = uuid::Uuid::now_v7().to_string();
    with_request_id(resp, &id)
}

/// Marks a 504 as the caller's own start deadline (`X-Fal-Request-Timeout`) running out.
fn with_user_timeout(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "x-fal-request-timeout-type",
        HeaderValue::from_static("user"),
    );
    resp
}

/// Renders a refusing fault. `None` for faults that do not answer by themselves.
pub(crate) fn fault_response(fault: &HttpFault) -> Option<Response> {
    match fault {
        HttpFault::Status {
            status,
            body,
            retry_after,
            timeout_type_user,
        } => {
            let body = body.clone().unwrap_or_else(|| default_error_body(*status));
            let mut resp = refusal(*status, &body);
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*ra));
            }
            if *timeout_type_user {
                resp = with_user_timeout(resp);
            }
            Some(resp)
        }
        HttpFault::Nginx502 => Some(nginx_502()),
        HttpFault::Delay { .. }
        | HttpFault::Hold
        | HttpFault::AcceptThenReset
        | HttpFault::AcceptThenHold => None,
    }
}

fn nginx_502() -> Response {
    (
        StatusCode::BAD_GATEWAY,
        [(header::CONTENT_TYPE, "text/html")],
        "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
    )
        .into_response()
}

fn fault_name(fault: &HttpFault) -> String {
    match fault {
        HttpFault::Status { status, .. } => format!("status_{status}"),
        HttpFault::Nginx502 => "nginx_502".into(),
        HttpFault::Delay { delay_ms } => format!("delay_{delay_ms}ms"),
        HttpFault::Hold => "hold".into(),
        HttpFault::AcceptThenReset => "accept_then_reset".into(),
        HttpFault::AcceptThenHold => "accept_then_hold".into(),
    }
}

/// Applies the fault armed for `target` around `work`: refuse, delay, or do the work and reset.
pub(crate) async fn with_fault(
    state: &EmulatorState,
    target: FaultTarget,
    conn: Option<ConnCtl>,
    work: impl Future<Output = Response>,
) -> Response {
    let fault = state.take_fault(target);
    with_this_fault(state, fault, conn, |_| {}, work).await
}

/// [`with_fault`] with the fault already taken, telling `on_refused` of a refusal.
async fn with_this_fault<F>(
    state: &EmulatorState,
    fault: Option<HttpFault>,
    conn: Option<ConnCtl>,
    on_refused: impl FnOnce(&HttpFault),
    work: F,
) -> Response
where
    F: Future<Output = Response>,
{
    if let Some(f) = &fault {
        if let Some(resp) = fault_response(f) {
            on_refused(f);
            return resp;
        }
        match f {
            HttpFault::Delay { delay_ms } => {
                tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
            }
            HttpFault::Hold => state.hold_call().await,
            _ => {}
        }
    }
    let resp = work.await;
    if matches!(fault, Some(HttpFault::AcceptThenHold)) {
        state.hold_call().await;
    }
    if matches!(fault, Some(HttpFault::AcceptThenReset)) {
        match conn {
            Some(c) => c.reset(),
            // Not served through `spawn`: the closest thing we can do.
            None => return nginx_502(),
        }
    }
    resp
}

pub(crate) async fn dispatch(State(state): State<EmulatorState>, req: Request) -> Response {
    let received_at = SystemTime::now();
    let (parts, body) = req.into_parts();
    let conn = parts
        .extensions
        .get::<ConnectInfo<ConnCtl>>()
        .map(|c| c.0.clone());
    let segs: Vec<&str> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let Some(route) = classify(&parts.method, &segs) else {
        return json_response(404, &json!({"detail": "Not Found"}));
    };
    if let Some(resp) = check_auth(&state, &parts.headers) {
        return resp;
    }
    let query = query_map(parts.uri.query());
    let target = route.target();
    match route {
        Route::Submit { endpoint } => {
            let bytes = axum::body::to_bytes(body, MAX_INPUT_BYTES)
                .await
                .unwrap_or_default();
            // Non-JSON input is accepted like FAL's queue does; the model rejects it.
            let input: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let webhook = query.get("fal_webhook").cloned();
            let headers = redacted_headers(&parts.headers);
            let submitted = Submitted {
                endpoint: &endpoint,
                input,
                webhook,
                headers,
                fault: None,
                received_at,
                start_timeout: None,
                max_queue_length: max_queue_length(&query),
            };
            let start_timeout = match start_timeout(&parts.headers) {
                Ok(timeout) => timeout,
                Err(detail) => {
                    record_refused(&state, &submitted, "bad_request_timeout");
                    let body = json!({"detail": detail, "error_type": "bad_request"});
                    return refusal(400, &body);
                }
            };
            // Taken here so the request remembers what its submit met (a lost answer).
            let fault = state.take_fault(target);
            let refused = |f: &HttpFault| record_refused(&state, &submitted, &fault_name(f));
            let work = submit(
                &state,
                Submitted {
                    fault: fault.as_ref().map(fault_name),
                    start_timeout,
                    ..submitted.clone()
                },
            );
            with_this_fault(&state, fault, conn, refused, work).await
        }
        Route::Status { prefix, id } => {
            let logs = wants_logs(&query);
            let work = async { status(&state, &prefix, &id, logs) };
            with_fault(&state, target, conn, work).await
        }
        Route::Stream { prefix, id } => {
            let logs = wants_logs(&query);
            let work = async { status_stream(&state, &prefix, &id, logs) };
            with_fault(&state, target, conn, work).await
        }
        Route::Result { prefix, id } => {
            let work = async { result(&state, &prefix, &id) };
            with_fault(&state, target, conn, work).await
        }
        Route::Cancel { prefix, id } => {
            let work = async { cancel(&state, &prefix, &id) };
            with_fault(&state, target, conn, work).await
        }
    }
}

/// `X-Fal-Request-Timeout: <seconds>`, a deadline for the request to *start* (queue wait
/// and runner acquisition). FAL's docs put its minimum above 0.1 s; anything else is FAL's
/// 400 `bad_request`. Python sends `30.0`, JS `30`.
fn start_timeout(headers: &HeaderMap) -> Result<Option<Duration>, String> {
    let Some(raw) = headers.get("x-fal-request-timeout") else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs > 0.1)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .map(Some)
        .ok_or_else(|| {
            "Invalid X-Fal-Request-Timeout header: expected a number of seconds above 0.1".into()
        })
}

/// `fal_max_queue_length=<n>`: the submit is refused when more than `n` requests already wait
/// in the endpoint's queue. A value that is not a count is ignored.
fn max_queue_length(query: &HashMap<String, String>) -> Option<usize> {
    query
        .get("fal_max_queue_length")
        .and_then(|v| v.trim().parse().ok())
}

/// Records a submit refused before any request existed, and why.
fn record_refused(state: &EmulatorState, submitted: &Submitted<'_>, why: &str) {
    state.lock().submits.push(SubmitRecord {
        request_id: None,
        endpoint: submitted.endpoint.to_owned(),
        input: submitted.input.clone(),
        webhook: submitted.webhook.clone(),
        headers: submitted.headers.clone(),
        fault: Some(why.to_owned()),
        at: SystemTime::now(),
    });
}

/// JS sends `logs=1|0`, Python `logs=true|false`.
fn wants_logs(query: &HashMap<String, String>) -> bool {
    query
        .get("logs")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true"))
}

fn redacted_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            let value = if k == header::AUTHORIZATION {
                "[redacted]".to_owned()
            } else {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            };
            (k.as_str().to_owned(), value)
        })
        .collect()
}

fn urls(state: &EmulatorState, prefix: &str, id: &str) -> (String, String, String) {
    let base = format!("{}/{prefix}/requests/{id}", state.base_url());
    (
        base.clone(),
        format!("{base}/status"),
        format!("{base}/cancel"),
    )
}

/// What a submit brought.
#[derive(Clone)]
struct Submitted<'a> {
    endpoint: &'a str,
    input: Value,
    webhook: Option<String>,
    headers: Vec<(String, String)>,
    fault: Option<String>,
    received_at: SystemTime,
    /// `X-Fal-Request-Timeout`.
    start_timeout: Option<Duration>,
    /// `fal_max_queue_length`.
    max_queue_length: Option<usize>,
}

async fn submit(state: &EmulatorState, submitted: Submitted<'_>) -> Response {
    let start_deadline = submitted
        .start_timeout
        .and_then(|timeout| Instant::now().checked_add(timeout));
    let id = uuid::Uuid::now_v7().to_string();
    let prefix = app_prefix(submitted.endpoint);
    let position = {
        let mut inner = state.lock();
        let waiting = inner
            .requests
            .values()
            .filter(|r| r.endpoint == submitted.endpoint && r.phase == Phase::InQueue)
            .count();
        // FAL refuses a submit when more than N already wait.
        if submitted.max_queue_length.is_some_and(|max| waiting > max) {
            drop(inner);
            record_refused(state, &submitted, "queue_full");
            return refusal(429, &default_error_body(429));
        }
        let Submitted {
            endpoint,
            input,
            webhook,
            headers,
            fault,
            received_at,
            ..
        } = submitted;
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let forced = EmulatorState::take_model_failure(&mut inner);
        inner.requests.insert(
            id.clone(),
            RequestSnapshot {
                id: id.clone(),
                endpoint: endpoint.to_owned(),
                prefix: prefix.clone(),
                input: input.clone(),
                webhook: webhook.clone(),
                phase: Phase::InQueue,
                outcome: None,
                started: false,
                cancelled: false,
                start_timed_out: false,
                submit_fault: fault,
                received_at,
                logs: Vec::new(),
                inference_time: None,
                seq,
                forced,
            },
        );
        inner.submits.push(SubmitRecord {
            request_id: Some(id.clone()),
            endpoint: endpoint.to_owned(),
            input,
            webhook,
            headers,
            fault: None,
            at: SystemTime::now(),
        });
        waiting
    };
    state.bump();
    let st = state.clone();
    let rid = id.clone();
    state.spawn(async move { lifecycle(st, rid, start_deadline).await });

    let (response_url, status_url, cancel_url) = urls(state, &prefix, &id);
    let body = json!({
        "status": "IN_QUEUE",
        "request_id": id,
        "response_url": response_url,
        "status_url": status_url,
        "cancel_url": cancel_url,
        "logs": null,
        "metrics": {},
        "queue_position": position,
        "gateway_request_id": id,
    });
    with_request_id(json_response(200, &body), &id)
}

fn log_line(message: &str) -> Value {
    // FAL's observed shape: naive ISO timestamp, message, empty labels.
    json!({
        "timestamp": chrono::Utc::now().naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        "message": message,
        "labels": {},
    })
}

async fn lifecycle(state: EmulatorState, id: String, start_deadline: Option<Instant>) {
    let Some(endpoint) = state.request(&id).map(|r| r.endpoint) else {
        return;
    };
    let queued_at = Instant::now();
    let queue_wait = wait_until(&state, &id, &endpoint, queued_at, |d| d.queue);
    match start_deadline {
        Some(deadline) => tokio::select! {
            biased;
            () = queue_wait => {}
            () = tokio::time::sleep_until(deadline.into()) => {
                time_out_unstarted(&state, &id);
                return;
            }
        },
        None => queue_wait.await,
    }
    if !advance(
        &state,
        &id,
        Phase::InQueue,
        Phase::InProgress,
        "Request started",
    ) {
        return;
    }
    let started_at = Instant::now();
    wait_until(&state, &id, &endpoint, started_at, |d| d.run / 2).await;
    if !advance(
        &state,
        &id,
        Phase::InProgress,
        Phase::InProgress,
        "Running inference",
    ) {
        return;
    }
    wait_until(&state, &id, &endpoint, started_at, |d| d.run).await;
    let Some(snapshot) = state.request(&id) else {
        return;
    };
    if snapshot.phase != Phase::InProgress {
        return; // cancelled meanwhile
    }
    let ran_for = started_at.elapsed().as_secs_f64();
    let outcome = models::run(&state, &snapshot).await;
    complete(&state, &id, outcome, Some(ran_for));
}

/// Sleeps until `since` plus the phase's duration for the request. The duration is read
/// again whenever the emulator changes, so shortening the timings also hurries the
/// requests already in flight: a test can hold a request, look, then let it finish.
async fn wait_until(
    state: &EmulatorState,
    request_id: &str,
    endpoint: &str,
    since: Instant,
    phase: impl Fn(Durations) -> Duration,
) {
    let mut changes = state.subscribe();
    loop {
        let deadline = since + phase(state.durations_for(request_id, endpoint));
        tokio::select! {
            () = tokio::time::sleep_until(deadline.into()) => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(deadline.into()).await;
                    return;
                }
            }
        }
    }
}

/// Moves `id` from `from` to `to` with a log line; false if it is no longer in `from`.
fn advance(state: &EmulatorState, id: &str, from: Phase, to: Phase, log: &str) -> bool {
    {
        let mut inner = state.lock();
        let Some(req) = inner.requests.get_mut(id) else {
            return false;
        };
        if req.phase != from {
            return false;
        }
        req.phase = to;
        req.started |= to == Phase::InProgress;
        req.logs.push(log_line(log));
    }
    state.bump();
    true
}

/// The request's `X-Fal-Request-Timeout` ran out before a runner took it: it ends without
/// running (so unbilled) with FAL's 504 `request_timeout`, whose result carries
/// `X-Fal-Request-Timeout-Type: user`. A request that started meanwhile is left alone.
fn time_out_unstarted(state: &EmulatorState, id: &str) {
    let outcome = Outcome {
        status: 504,
        body: default_error_body(504),
        error_type: Some("request_timeout".into()),
    };
    complete_if(state, id, outcome, None, |req| {
        req.start_timed_out = req.phase == Phase::InQueue;
        req.start_timed_out
    });
}

/// Finishes a request once (later calls are no-ops) and sends its callback.
pub(crate) fn complete(
    state: &EmulatorState,
    id: &str,
    outcome: Outcome,
    inference_time: Option<f64>,
) {
    complete_if(state, id, outcome, inference_time, |_| true);
}

/// [`complete`], if `still` (which may mark the request) agrees under the same lock.
fn complete_if(
    state: &EmulatorState,
    id: &str,
    outcome: Outcome,
    inference_time: Option<f64>,
    still: impl FnOnce(&mut RequestSnapshot) -> bool,
) {
    let webhook = {
        let mut inner = state.lock();
        let Some(req) = inner.requests.get_mut(id) else {
            return;
        };
        if req.phase == Phase::Completed || !still(req) {
            return;
        }
        req.phase = Phase::Completed;
        req.inference_time = inference_time;
        req.logs.push(log_line("Request completed"));
        req.outcome = Some(outcome.clone());
        req.webhook.clone()
    };
    state.bump();
    if let Some(url) = webhook {
        callbacks::on_completed(state, id, &url, &outcome);
    }
}

/// Finds a request addressed by owner/alias or by the full endpoint id.
fn find(state: &EmulatorState, prefix: &str, id: &str) -> Option<RequestSnapshot> {
    state
        .request(id)
        .filter(|r| r.prefix == prefix || r.endpoint == prefix)
}

fn not_found() -> Response {
    json_response(404, &json!({"status": "NOT_FOUND"}))
}

/// The status object; `logs_from` skips log lines a stream already sent.
fn status_body(
    state: &EmulatorState,
    req: &RequestSnapshot,
    logs: bool,
    logs_from: usize,
) -> Value {
    let (response_url, status_url, cancel_url) = urls(state, &req.prefix, &req.id);
    let phase = match req.phase {
        Phase::InQueue => "IN_QUEUE",
        Phase::InProgress => "IN_PROGRESS",
        Phase::Completed => "COMPLETED",
    };
    let mut body = json!({
        "status": phase,
        "request_id": req.id,
        "response_url": response_url,
        "status_url": status_url,
        "cancel_url": cancel_url,
        "logs": if logs { Value::Array(req.logs.iter().skip(logs_from).cloned().collect()) } else { Value::Null },
        "metrics": match req.inference_time {
            Some(t) if req.phase == Phase::Completed => json!({"inference_time": t}),
            _ => json!({}),
        },
    });
    if req.phase == Phase::InQueue {
        let position = state
            .lock()
            .requests
            .values()
            .filter(|r| r.endpoint == req.endpoint && r.phase == Phase::InQueue && r.seq < req.seq)
            .count();
        body["queue_position"] = json!(position);
    }
    // Infrastructure-type failures surface on the status too (fal-protocol.md §1.6).
    if let Some(o) = &req.outcome
        && let Some(t) = &o.error_type
    {
        body["error"] = o
            .body
            .get("detail")
            .and_then(Value::as_str)
            .map(|s| json!(s))
            .unwrap_or_else(|| json!(format!("Invalid status code: {}", o.status)));
        body["error_type"] = json!(t);
    }
    body
}

fn status(state: &EmulatorState, prefix: &str, id: &str, logs: bool) -> Response {
    let Some(req) = find(state, prefix, id) else {
        return not_found();
    };
    let code = if req.phase == Phase::Completed {
        200
    } else {
        202
    };
    with_request_id(json_response(code, &status_body(state, &req, logs, 0)), id)
}

fn status_stream(state: &EmulatorState, prefix: &str, id: &str, logs: bool) -> Response {
    if find(state, prefix, id).is_none() {
        return not_found();
    }
    struct Cursor {
        state: EmulatorState,
        id: String,
        rx: tokio::sync::watch::Receiver<u64>,
        sent_logs: usize,
        last: Option<(Phase, usize)>,
        done: bool,
    }
    let cursor = Cursor {
        state: state.clone(),
        id: id.to_owned(),
        rx: state.subscribe(),
        sent_logs: 0,
        last: None,
        done: false,
    };
    let events = stream::unfold(cursor, move |mut c| async move {
        if c.done {
            return None;
        }
        loop {
            c.rx.borrow_and_update();
            let req = c.state.request(&c.id)?;
            let key = (req.phase, req.logs.len());
            if c.last != Some(key) {
                let body = status_body(&c.state, &req, logs, c.sent_logs);
                c.sent_logs = req.logs.len();
                c.last = Some(key);
                // FAL closes the stream after the COMPLETED event.
                c.done = req.phase == Phase::Completed;
                let event = Event::default().data(body.to_string());
                return Some((Ok::<_, Infallible>(event), c));
            }
            if c.rx.changed().await.is_err() {
                return None;
            }
        }
    });
    let sse = Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text(" ping"),
    );
    with_request_id(sse.into_response(), id)
}

fn result(state: &EmulatorState, prefix: &str, id: &str) -> Response {
    let Some(req) = find(state, prefix, id) else {
        return not_found();
    };
    let Some(outcome) = req.outcome.filter(|_| req.phase == Phase::Completed) else {
        return json_response(400, &json!({"detail": "Request is still in progress"}));
    };
    let mut resp = json_response(outcome.status, &outcome.body);
    if let Some(t) = &outcome.error_type
        && let Ok(v) = HeaderValue::from_str(t)
    {
        resp.headers_mut().insert("x-fal-error-type", v);
    }
    if req.start_timed_out {
        resp = with_user_timeout(resp);
    }
    with_request_id(resp, id)
}

fn cancel(state: &EmulatorState, prefix: &str, id: &str) -> Response {
    let Some(req) = find(state, prefix, id) else {
        record_cancel(state, id, 404);
        return not_found();
    };
    if req.phase == Phase::Completed {
        record_cancel(state, id, 400);
        return json_response(400, &json!({"status": "ALREADY_COMPLETED"}));
    }
    if let Some(req) = state.lock().requests.get_mut(id) {
        req.cancelled = true;
    }
    // Queued requests leave the queue; running ones get the runner's 499.
    complete(
        state,
        id,
        Outcome {
            status: 499,
            body: default_error_body(499),
            error_type: Some("client_cancelled".into()),
        },
        None,
    );
    record_cancel(state, id, 202);
    with_request_id(
        json_response(202, &json!({"status": "CANCELLATION_REQUESTED"})),
        id,
    )
}

fn record_cancel(state: &EmulatorState, id: &str, answered: u16) {
    state.lock().cancels.push(super::state::CancelRecord {
        request_id: id.to_owned(),
        answered,
        at: SystemTime::now(),
    });
}
