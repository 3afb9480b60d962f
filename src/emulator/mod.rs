//! A faithful FAL on loopback: the queue (submit/status/stream/result/cancel, with
//! `X-Fal-Request-Timeout` and `fal_max_queue_length`), storage upload (the JS client's
//! initiate + PUT and the Python client's v3 token + upload), a JWKS of two keys, signed
//! callbacks with FAL's exact body layout and retries, input validation of the endpoints
//! falgate uses (422 items with FAL's docs `url`), real output files (images in the
//! `output_format` asked for), and fault injection. Every URL it hands out starts with its
//! public base URL ([`EmulatorConfig::public_base`]). Used by tests, local development and
//! `serve --sandbox`.
//!
//! Depends only on `crate::fal` (wire helpers, signature encoding), never on the app.

mod callbacks;
mod control;
pub mod faults;
mod images;
mod listener;
mod models;
pub mod png;
mod queue;
mod state;
mod storage;
#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use reqwest::Url;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::fal::Secret;
pub use faults::{
    CallbackFault, FaultRates, FaultRule, FaultTarget, HttpFault, ModelFailure, RatedCallbackFault,
    RatedHttpFault, RatedModelFailure,
};
pub use state::{
    CallbackAttempt, CancelRecord, DownloadRecord, Durations, EmulatorState, Outcome, Phase,
    RequestEnd, RequestRecord, RequestSnapshot, SubmitRecord, UploadRecord,
};

/// Largest upload accepted (training archives).
const MAX_UPLOAD_BYTES: usize = 512 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The FAL key clients must send (`Authorization: Key <key>`), `id:secret` form.
    pub key: Secret,
    /// Sent as `X-Fal-Webhook-User-Id`.
    pub user_id: String,
    /// Base of every URL handed out (queue, upload, file and output URLs, the v3 upload
    /// `base_url`), for clients that reach the emulator at another address: a proxy (a path
    /// prefix is kept), a container's name. Default `http://<listener address>`.
    pub public_base: Option<Url>,
    /// Default timings of generation endpoints (and unknown ones).
    pub generation: Durations,
    /// Default timings of the three trainers.
    pub training: Durations,
    /// Waits between callback attempts; attempts = len + 1. Default: FAL's, see
    /// [`fal_callback_retry_schedule`].
    pub callback_retry_schedule: Vec<Duration>,
    /// Multiplies every wait of `callback_retry_schedule`: 1.0 is FAL's pace, 0.001 turns its
    /// two hours into seven seconds with the same shape. Changeable while running
    /// ([`EmulatorState::set_time_scale`], `POST /_emulator/time-scale`).
    pub time_scale: f64,
    /// Per-attempt timeout of a callback delivery (FAL: 15 s).
    pub callback_timeout: Duration,
    /// Timeout for trainers downloading their archive.
    pub download_timeout: Duration,
    /// Generated images above this many pixels fail the model (keeps memory bounded).
    pub max_image_pixels: u64,
    /// How long a CDN upload token from `/storage/auth/token` stays valid.
    pub upload_token_ttl: Duration,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            key: Secret::from("emulator-key-id:emulator-key-secret"),
            user_id: "github|0".into(),
            public_base: None,
            generation: Durations::new(200, 800),
            training: Durations::new(500, 2500),
            callback_retry_schedule: fal_callback_retry_schedule(),
            time_scale: 1.0,
            callback_timeout: Duration::from_secs(15),
            download_timeout: Duration::from_secs(30),
            max_image_pixels: 16 * 1024 * 1024,
            upload_token_ttl: Duration::from_secs(3600),
        }
    }
}

impl EmulatorConfig {
    /// Near-zero timings, for tests. Callbacks keep FAL's retry schedule at a thousandth of its
    /// pace: retries after 7 ms, 14 ms, … 3.6 s, the last about 7 s after the first attempt.
    pub fn fast() -> Self {
        Self {
            generation: Durations::new(5, 20),
            training: Durations::new(5, 30),
            time_scale: 0.001,
            callback_timeout: Duration::from_secs(5),
            ..Self::default()
        }
    }
}

/// FAL's callback retries: "it will retry 10 times in the span of 2 hours" (docs.fal.ai,
/// webhooks). The spacing is not published; this doubles from 7 s: 7, 14, 28, 56, 112, 224,
/// 448, 896, 1792 and 3584 s, so the last retry goes out 7161 s (1 h 59 min 21 s) after the
/// first attempt.
pub fn fal_callback_retry_schedule() -> Vec<Duration> {
    (0..10).map(|k| Duration::from_secs(7 << k)).collect()
}

/// Largest time scale accepted: a thousand times slower than FAL is already days per retry.
pub const MAX_TIME_SCALE: f64 = 1000.0;

/// Parses a time scale: a finite number from 0 (no waits at all) to [`MAX_TIME_SCALE`].
pub fn parse_time_scale(raw: &str) -> Result<f64, String> {
    let scale: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("time scale `{raw}` is not a number"))?;
    check_time_scale(scale)
}

pub(crate) fn check_time_scale(scale: f64) -> Result<f64, String> {
    if scale.is_finite() && (0.0..=MAX_TIME_SCALE).contains(&scale) {
        Ok(scale)
    } else {
        Err(format!(
            "time scale must be a number from 0 to {MAX_TIME_SCALE}, got {scale}"
        ))
    }
}

/// Every route of the emulator. Served through [`spawn`], the accept-then-reset fault
/// can really reset connections; served elsewhere it degrades to an nginx 502.
pub fn router(state: EmulatorState) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(storage::jwks))
        .route("/storage/auth/token", post(storage::auth_token))
        .route(
            "/files/upload",
            post(storage::upload_v3).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)),
        )
        .route("/storage/upload/initiate", post(storage::initiate))
        .route(
            "/storage/upload/initiate-multipart",
            post(storage::initiate_multipart),
        )
        .route(
            "/_cdn/upload/{token}",
            put(storage::put_upload).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)),
        )
        .route(
            "/_cdn/multipart/{token}/{part}",
            put(storage::put_part).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)),
        )
        .route(
            "/_cdn/multipart/{token}/complete",
            post(storage::complete_multipart),
        )
        .route("/files/{id}/{name}", get(storage::get_file))
        .nest("/_emulator", control::routes())
        .fallback(queue::dispatch)
        .with_state(state)
}

/// A running emulator. Stops on drop (abruptly) or on [`EmulatorHandle::shutdown`].
pub struct EmulatorHandle {
    state: EmulatorState,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// Starts the emulator on `listener` (bind port 0 in tests).
pub async fn spawn(config: EmulatorConfig, listener: TcpListener) -> EmulatorHandle {
    let mut addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    if addr.ip().is_unspecified() {
        addr.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    let state = EmulatorState::new(config);
    if state.base_url().is_empty() {
        state.set_base_url(format!("http://{addr}"));
    }
    let app = router(state.clone()).into_make_service_with_connect_info::<listener::ConnCtl>();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let serve = axum::serve(listener::KillableListener(listener), app).with_graceful_shutdown(
            async move {
                let _ = stopped.await;
            },
        );
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "emulator server stopped");
        }
    });
    EmulatorHandle {
        state,
        addr,
        stop: Some(stop),
        server: Some(server),
    }
}

impl EmulatorHandle {
    /// The base of every URL the emulator hands out (use as both FAL queue and REST base):
    /// [`EmulatorConfig::public_base`] if set, else the listener's, e.g.
    /// `http://127.0.0.1:41234`.
    pub fn base_url(&self) -> Url {
        Url::parse(&self.state.base_url()).unwrap_or_else(|_| {
            Url::parse(&format!("http://{}", self.addr)).expect("socket address URL")
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// JWKS URL, for the app's verifier.
    pub fn jwks_url(&self) -> Url {
        let base = self.base_url();
        let joined = format!(
            "{}/.well-known/jwks.json",
            base.as_str().trim_end_matches('/')
        );
        Url::parse(&joined).unwrap_or(base)
    }

    pub fn state(&self) -> &EmulatorState {
        &self.state
    }

    /// Stops background work (callback deliveries and their retries included), lets open
    /// answers finish for up to a second, then aborts.
    pub async fn shutdown(mut self) {
        self.state.abort_tasks();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take() {
            // Status streams keep connections open; don't wait on them forever.
            if tokio::time::timeout(Duration::from_secs(1), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.state.abort_tasks();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl std::ops::Deref for EmulatorHandle {
    type Target = EmulatorState;

    /// Controls and records are methods of the state; reach them from the handle too.
    fn deref(&self) -> &EmulatorState {
        &self.state
    }
}
