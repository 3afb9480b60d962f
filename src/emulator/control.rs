//! `/_emulator/…`: the same controls as the Rust methods on `EmulatorState`, as JSON over
//! HTTP for `falgate emulator` and for tests in other languages. Unauthenticated: the
//! emulator is a local tool and must never face the internet.

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::EmulatorState;
use super::faults::{CallbackFault, FaultRates, FaultRule, ModelFailure};
use super::queue::json_response;
use super::state::Durations;

pub(crate) fn routes() -> Router<EmulatorState> {
    Router::new()
        .route("/faults", post(add_fault))
        .route("/fault-rates", post(set_fault_rates))
        .route("/time-scale", get(time_scale).post(set_time_scale))
        .route("/record", reading(EmulatorState::record))
        .route("/callback-faults", post(add_callback_fault))
        .route("/model-failures", post(add_model_failure))
        .route("/clear-faults", post(clear_faults))
        .route("/rotate-key", post(rotate_key))
        .route("/durations", post(set_durations))
        .route("/release-held", post(release_held))
        .route("/release-held-calls", post(release_held_calls))
        .route("/files/expire", post(expire_file))
        .route("/submits", reading(EmulatorState::submits))
        .route("/callbacks", reading(EmulatorState::callback_attempts))
        .route("/cancels", reading(EmulatorState::cancels))
        .route("/uploads", reading(EmulatorState::uploads))
        .route("/downloads", reading(EmulatorState::downloads))
        .route("/requests", reading(EmulatorState::requests))
        .route("/requests/{id}", get(request))
}

fn to_json<T: serde::Serialize>(v: &T) -> Response {
    json_response(200, &serde_json::to_value(v).unwrap_or(Value::Null))
}

/// A GET that answers what `read` reads from the state, as JSON.
fn reading<T: serde::Serialize + 'static>(
    read: fn(&EmulatorState) -> T,
) -> MethodRouter<EmulatorState> {
    get(move |State(s): State<EmulatorState>| async move { to_json(&read(&s)) })
}

#[derive(Deserialize)]
struct FileUrl {
    url: String,
}

async fn expire_file(State(s): State<EmulatorState>, Json(file): Json<FileUrl>) -> Response {
    if s.expire_file(&file.url) {
        ok()
    } else {
        json_response(404, &json!({"detail": "no such file"}))
    }
}

async fn release_held_calls(State(s): State<EmulatorState>) -> Response {
    s.release_held_calls();
    ok()
}

fn ok() -> Response {
    json_response(200, &json!({"ok": true}))
}

async fn add_fault(State(s): State<EmulatorState>, Json(rule): Json<FaultRule>) -> Response {
    s.inject_fault(rule);
    ok()
}

async fn set_fault_rates(
    State(s): State<EmulatorState>,
    Json(rates): Json<FaultRates>,
) -> Response {
    match s.set_fault_rates(rates) {
        Ok(()) => ok(),
        Err(e) => json_response(422, &json!({"detail": e})),
    }
}

#[derive(Deserialize)]
struct TimeScale {
    time_scale: f64,
}

async fn time_scale(State(s): State<EmulatorState>) -> Response {
    json_response(200, &json!({"time_scale": s.time_scale()}))
}

async fn set_time_scale(State(s): State<EmulatorState>, Json(t): Json<TimeScale>) -> Response {
    match s.set_time_scale(t.time_scale) {
        Ok(()) => json_response(200, &json!({"time_scale": s.time_scale()})),
        Err(e) => json_response(422, &json!({"detail": e})),
    }
}

/// A callback fault or a model failure, for the next `count` requests (one unless told).
#[derive(Deserialize)]
struct Counted<T> {
    #[serde(flatten)]
    what: T,
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

async fn add_callback_fault(
    State(s): State<EmulatorState>,
    Json(f): Json<Counted<CallbackFault>>,
) -> Response {
    s.inject_callback_fault(f.what, f.count);
    ok()
}

async fn add_model_failure(
    State(s): State<EmulatorState>,
    Json(f): Json<Counted<ModelFailure>>,
) -> Response {
    s.fail_next_models(f.what, f.count);
    ok()
}

async fn clear_faults(State(s): State<EmulatorState>) -> Response {
    s.clear_faults();
    ok()
}

#[derive(Deserialize, Default)]
struct Rotate {
    /// Keep listing the key that signed until now.
    #[serde(default)]
    keep_old: bool,
    /// A planned rotation: the published next key signs (else a key nobody has seen).
    #[serde(default)]
    to_next: bool,
}

async fn rotate_key(State(s): State<EmulatorState>, body: Option<Json<Rotate>>) -> Response {
    let rotate = body.map(|b| b.0).unwrap_or_default();
    let kid = if rotate.to_next {
        s.rotate_to_next_key(rotate.keep_old)
    } else {
        s.rotate_key(rotate.keep_old)
    };
    json_response(200, &json!({"kid": kid, "jwks": s.jwks()}))
}

#[derive(Deserialize)]
struct SetDurations {
    /// One endpoint; absent = class defaults (`training` chooses the class) or `all`.
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    training: bool,
    #[serde(default)]
    all: bool,
    queue_ms: u64,
    run_ms: u64,
}

async fn set_durations(State(s): State<EmulatorState>, Json(d): Json<SetDurations>) -> Response {
    let durations = Durations::new(d.queue_ms, d.run_ms);
    if d.all {
        s.set_all_durations(durations);
    } else {
        s.set_durations(d.endpoint.as_deref(), d.training, durations);
    }
    ok()
}

async fn release_held(State(s): State<EmulatorState>) -> Response {
    json_response(200, &json!({"released": s.release_held_callback()}))
}

async fn request(State(s): State<EmulatorState>, Path(id): Path<String>) -> Response {
    match s.request(&id) {
        Some(r) => to_json(&r),
        None => json_response(404, &json!({"status": "NOT_FOUND"})),
    }
}
