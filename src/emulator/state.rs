//! The emulator's shared state: requests, files, keys, armed faults and the records that
//! tests inspect. One `std::sync::Mutex` guards it; no lock is held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::EmulatorConfig;
use super::faults::{
    CallbackFault, FaultRates, FaultRule, FaultTarget, HttpFault, ModelFailure, pick,
};
use crate::fal::signature::jwk_for;

/// Queue-then-run timing of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durations {
    #[serde(with = "millis")]
    pub queue: Duration,
    #[serde(with = "millis")]
    pub run: Duration,
}

impl Durations {
    pub const fn new(queue_ms: u64, run_ms: u64) -> Self {
        Self {
            queue: Duration::from_millis(queue_ms),
            run: Duration::from_millis(run_ms),
        }
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    InQueue,
    InProgress,
    Completed,
}

/// What a finished request answers on its result URL (and sends in its callback).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub status: u16,
    pub body: Value,
    pub error_type: Option<String>,
}

impl Outcome {
    pub fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body,
            error_type: None,
        }
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A queued request as the emulator tracks it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestSnapshot {
    pub id: String,
    pub endpoint: String,
    /// owner/alias (or namespace/owner/alias): where status/result/cancel live.
    pub prefix: String,
    pub input: Value,
    pub webhook: Option<String>,
    pub phase: Phase,
    pub outcome: Option<Outcome>,
    /// A runner took the request (it went IN_PROGRESS): from here on FAL bills it.
    pub started: bool,
    /// A client cancelled it (its outcome is then the 499 of a cancelled request).
    pub cancelled: bool,
    /// Its `X-Fal-Request-Timeout` ran out while it waited in the queue: it ended with a 504
    /// of the `user` kind without running.
    pub start_timed_out: bool,
    /// The fault its submit met, if any (e.g. `accept_then_reset`: the answer was lost).
    pub submit_fault: Option<String>,
    /// When its submit call arrived (before any delay a fault put on it).
    pub received_at: SystemTime,
    pub logs: Vec<Value>,
    pub inference_time: Option<f64>,
    #[serde(skip)]
    pub(crate) seq: u64,
    #[serde(skip)]
    pub(crate) forced: Option<ModelFailure>,
}

/// How a request ended at FAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RequestEnd {
    /// Still queued or running.
    Unfinished,
    /// Completed with the model's output.
    Ok,
    /// Completed with an error: the model's verdict, with the status its result answers.
    ModelError { status: u16 },
    /// Cancelled by a client, in the queue or while running (see `ran`).
    Cancelled,
}

/// One accepted request, as a test compares it with the job that sent it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub endpoint: String,
    /// The job named by the webhook URL's path (`…/v1/fal/webhook/{job_id}?token=…`).
    pub webhook_job_id: Option<String>,
    /// A runner took it: the request was (or is being) carried out and billed, unlike one
    /// cancelled while still queued.
    pub ran: bool,
    pub verdict: RequestEnd,
    /// What its result URL answers: the output for `Ok`, the error body otherwise.
    pub output: Option<Value>,
    /// The fault its submit met, if any.
    pub submit_fault: Option<String>,
    /// When its submit call arrived (before any delay a fault put on it).
    pub submitted_at: SystemTime,
}

/// The job id in a falgate webhook URL: the segment after `/fal/webhook/`.
pub fn webhook_job_id(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let segments: Vec<&str> = parsed.path_segments()?.collect();
    segments
        .windows(3)
        .find(|w| w[0] == "fal" && w[1] == "webhook" && !w[2].is_empty())
        .map(|w| w[2].to_owned())
}

#[derive(Debug, Clone, Serialize)]
pub struct SubmitRecord {
    /// `None` when a fault refused the submit before a request existed.
    pub request_id: Option<String>,
    pub endpoint: String,
    pub input: Value,
    pub webhook: Option<String>,
    /// Request headers, `Authorization` redacted.
    pub headers: Vec<(String, String)>,
    pub fault: Option<String>,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct CallbackAttempt {
    pub request_id: String,
    /// 1 for the delivery, 2 for an injected duplicate.
    pub delivery: u32,
    /// 1-based attempt within a delivery (retries after failures).
    pub attempt: u32,
    pub url: String,
    pub timestamp: String,
    pub signature: String,
    pub body: String,
    /// Status the receiver answered; `None` on timeout or connection error.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub fault: Option<String>,
    /// When the attempt was sent.
    pub sent_at: SystemTime,
    /// When the receiver's answer (or the failure) came back.
    pub at: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct CancelRecord {
    pub request_id: String,
    pub answered: u16,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct UploadRecord {
    pub file_url: String,
    pub file_name: String,
    pub content_type: String,
    pub size: usize,
    pub sha256: String,
    /// How many parts a multipart upload came in; 1 for a single PUT.
    pub parts: usize,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct DownloadRecord {
    pub request_id: String,
    pub url: String,
    /// `None` when the download failed.
    pub size: Option<usize>,
    #[serde(skip)]
    pub bytes: Option<bytes::Bytes>,
    pub error: Option<String>,
    pub at: SystemTime,
}

#[derive(Debug, Clone)]
pub(crate) struct StoredFile {
    pub content_type: String,
    pub bytes: bytes::Bytes,
}

#[derive(Debug, Clone)]
pub(crate) struct PendingUpload {
    pub file_id: String,
    pub file_name: String,
    pub content_type: String,
}

/// A signed callback waiting for its turn (reorder fault).
#[derive(Debug, Clone)]
pub(crate) struct HeldCallback {
    pub request_id: String,
    pub url: String,
    pub body: String,
}

/// The callback keys. FAL's JWKS lists two keys; the emulator's lists the one that signs
/// and the one that will sign after a planned rotation ([`EmulatorState::rotate_to_next_key`]),
/// so a verifier that cached the set keeps verifying across it.
pub(crate) struct Keys {
    /// Signs every callback.
    pub signing: SigningKey,
    /// Published beside the signing key; signs from the next planned rotation on.
    pub next: SigningKey,
    /// Keys that signed before a rotation and are still listed, newest first.
    pub retired: Vec<VerifyingKey>,
}

impl Keys {
    /// The keys to keep listing after the signing key is replaced: it, then those retired
    /// before it.
    fn retired_after_rotation(self) -> Vec<VerifyingKey> {
        let mut retired = vec![self.signing.verifying_key()];
        retired.extend(self.retired);
        retired
    }

    fn fresh() -> Self {
        Self {
            signing: random_signing_key(),
            next: random_signing_key(),
            retired: Vec::new(),
        }
    }

    /// What the JWKS lists: the signing key first (FAL's real set verified with its first
    /// key), then the next one, then retired ones.
    fn published(&self) -> Vec<VerifyingKey> {
        let mut keys = vec![self.signing.verifying_key(), self.next.verifying_key()];
        keys.extend(self.retired.iter().copied());
        keys
    }
}

pub(crate) struct Inner {
    pub requests: HashMap<String, RequestSnapshot>,
    pub next_seq: u64,
    pub files: HashMap<String, StoredFile>,
    pub pending_uploads: HashMap<String, PendingUpload>,
    /// Tokens for the CDN's upload endpoint (`/storage/auth/token`), with their expiry.
    pub upload_tokens: HashMap<String, SystemTime>,
    /// Parts of multipart uploads under way, by upload token and part number: (etag, bytes).
    pub upload_parts: HashMap<String, std::collections::BTreeMap<u32, (String, bytes::Bytes)>>,
    pub submits: Vec<SubmitRecord>,
    pub callbacks: Vec<CallbackAttempt>,
    pub cancels: Vec<CancelRecord>,
    pub uploads: Vec<UploadRecord>,
    pub downloads: Vec<DownloadRecord>,
    pub http_faults: Vec<FaultRule>,
    pub callback_faults: VecDeque<CallbackFault>,
    pub model_failures: VecDeque<ModelFailure>,
    pub held: Option<HeldCallback>,
    pub keys: Keys,
    pub generation: Durations,
    pub training: Durations,
    pub per_endpoint: HashMap<String, Durations>,
    pub per_request: HashMap<String, Durations>,
    /// Calls waiting in a `hold` fault, and how many releases there have been.
    pub held_calls: usize,
    pub releases: u64,
    pub finetunes: Vec<String>,
    pub tasks: Vec<AbortHandle>,
    /// Set on shutdown: no background task starts any more.
    pub closed: bool,
    /// Multiplies callback retry waits.
    pub time_scale: f64,
    pub rates: Option<(FaultRates, StdRng)>,
}

pub(crate) struct Shared {
    pub config: EmulatorConfig,
    pub base_url: Mutex<String>,
    pub inner: Mutex<Inner>,
    pub changed: watch::Sender<u64>,
    pub http: reqwest::Client,
}

/// Cheap to clone; every handler and background task holds one.
#[derive(Clone)]
pub struct EmulatorState(pub(crate) Arc<Shared>);

impl std::fmt::Debug for EmulatorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorState")
            .field("base_url", &self.base_url())
            .finish()
    }
}

pub(crate) const TRAINERS: [&str; 3] = [
    "fal-ai/flux-lora-fast-training",
    "fal-ai/flux-lora-portrait-trainer",
    "fal-ai/flux-pro-trainer",
];

fn random_signing_key() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::rng().fill(&mut seed);
    SigningKey::from_bytes(&seed)
}

fn kid_for(key: &VerifyingKey) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(key.as_bytes()))
}

impl EmulatorState {
    pub fn new(config: EmulatorConfig) -> Self {
        crate::install_crypto_provider();
        // Loopback only, never through a proxy: the emulator talks to test receivers.
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let inner = Inner {
            requests: HashMap::new(),
            next_seq: 0,
            files: HashMap::new(),
            pending_uploads: HashMap::new(),
            upload_tokens: HashMap::new(),
            upload_parts: HashMap::new(),
            submits: Vec::new(),
            callbacks: Vec::new(),
            cancels: Vec::new(),
            uploads: Vec::new(),
            downloads: Vec::new(),
            http_faults: Vec::new(),
            callback_faults: VecDeque::new(),
            model_failures: VecDeque::new(),
            held: None,
            keys: Keys::fresh(),
            generation: config.generation,
            training: config.training,
            per_endpoint: HashMap::new(),
            per_request: HashMap::new(),
            held_calls: 0,
            releases: 0,
            finetunes: Vec::new(),
            tasks: Vec::new(),
            closed: false,
            time_scale: super::check_time_scale(config.time_scale).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "emulator time scale ignored; using 1");
                1.0
            }),
            rates: None,
        };
        let base = config
            .public_base
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        Self(Arc::new(Shared {
            config,
            base_url: Mutex::new(base),
            inner: Mutex::new(inner),
            changed: watch::channel(0).0,
            http,
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock only happens in a bug; keep serving regardless.
        self.0.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &EmulatorConfig {
        &self.0.config
    }

    /// Base URL used in every URL the emulator hands out (no trailing slash).
    pub fn base_url(&self) -> String {
        self.0
            .base_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_base_url(&self, base: String) {
        *self.0.base_url.lock().unwrap_or_else(|p| p.into_inner()) = base;
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.0.http
    }

    /// Wakes status streams.
    pub(crate) fn bump(&self) {
        self.0.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.changed.subscribe()
    }

    /// Spawns a background task that shutdown aborts. After shutdown nothing starts: a
    /// request finishing as the emulator stops must not send its callback afterwards.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        let handle = tokio::spawn(fut).abort_handle();
        inner.tasks.retain(|t| !t.is_finished());
        inner.tasks.push(handle);
    }

    pub(crate) fn abort_tasks(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for t in inner.tasks.drain(..) {
            t.abort();
        }
    }

    /// Background tasks (request timers, callback deliveries) not yet finished.
    pub fn live_tasks(&self) -> usize {
        self.lock()
            .tasks
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    /// The current multiplier of callback retry waits.
    pub fn time_scale(&self) -> f64 {
        self.lock().time_scale
    }

    /// Changes the multiplier of callback retry waits; waits already under way are
    /// stretched or shrunk at once. Refuses anything but a number from 0 to
    /// [`super::MAX_TIME_SCALE`].
    pub fn set_time_scale(&self, scale: f64) -> Result<(), String> {
        let scale = super::check_time_scale(scale)?;
        self.lock().time_scale = scale;
        self.bump();
        Ok(())
    }

    /// Sleeps `wait` times the time scale, following changes of the scale while asleep.
    pub(crate) async fn scaled_sleep(&self, wait: Duration) {
        let start = tokio::time::Instant::now();
        let mut changes = self.subscribe();
        loop {
            let scaled = Duration::try_from_secs_f64(wait.as_secs_f64() * self.time_scale())
                .unwrap_or(Duration::MAX);
            let deadline = start.checked_add(scaled);
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    pub(crate) fn durations_for(&self, request_id: &str, endpoint: &str) -> Durations {
        let inner = self.lock();
        if let Some(d) = inner.per_request.get(request_id) {
            return *d;
        }
        if let Some(d) = inner.per_endpoint.get(endpoint) {
            return *d;
        }
        if TRAINERS.contains(&endpoint) {
            inner.training
        } else {
            inner.generation
        }
    }

    // ---- inspection (tests, control API) ----

    pub fn submits(&self) -> Vec<SubmitRecord> {
        self.lock().submits.clone()
    }

    pub fn callback_attempts(&self) -> Vec<CallbackAttempt> {
        self.lock().callbacks.clone()
    }

    pub fn cancels(&self) -> Vec<CancelRecord> {
        self.lock().cancels.clone()
    }

    pub fn uploads(&self) -> Vec<UploadRecord> {
        self.lock().uploads.clone()
    }

    pub fn downloads(&self) -> Vec<DownloadRecord> {
        self.lock().downloads.clone()
    }

    pub fn request(&self, id: &str) -> Option<RequestSnapshot> {
        self.lock().requests.get(id).cloned()
    }

    pub fn requests(&self) -> Vec<RequestSnapshot> {
        let mut all: Vec<_> = self.lock().requests.values().cloned().collect();
        all.sort_by_key(|r| r.seq);
        all
    }

    /// Every request accepted, in submit order: whose job it was, whether it ran, how it
    /// ended and what it produced.
    pub fn record(&self) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .map(|r| {
                let verdict = match &r.outcome {
                    _ if r.phase != Phase::Completed => RequestEnd::Unfinished,
                    None => RequestEnd::Unfinished,
                    Some(_) if r.cancelled => RequestEnd::Cancelled,
                    Some(o) if o.is_success() => RequestEnd::Ok,
                    Some(o) => RequestEnd::ModelError { status: o.status },
                };
                RequestRecord {
                    webhook_job_id: r.webhook.as_deref().and_then(webhook_job_id),
                    ran: r.started,
                    verdict,
                    output: r.outcome.map(|o| o.body),
                    submitted_at: r.received_at,
                    request_id: r.id,
                    endpoint: r.endpoint,
                    submit_fault: r.submit_fault,
                }
            })
            .collect()
    }

    /// Bytes of a file the emulator serves (uploads and model outputs), by its URL.
    pub fn file_bytes(&self, url: &str) -> Option<bytes::Bytes> {
        let id = url.split("/files/").nth(1)?.split('/').next()?;
        self.lock().files.get(id).map(|f| f.bytes.clone())
    }

    /// A file this emulator handed out, read from its store: `None` when `url` is not under
    /// its base URL's `/files/`, else the file or the error its URL's 404 would give.
    pub(crate) fn own_file(&self, url: &str) -> Option<Result<bytes::Bytes, String>> {
        let rest = url.strip_prefix(&format!("{}/files/", self.base_url()))?;
        let id = rest.split('/').next()?;
        let file = self.lock().files.get(id).map(|f| f.bytes.clone());
        Some(file.ok_or_else(|| "server answered 404 Not Found".to_owned()))
    }

    /// Ends the life of a served file, as FAL's CDN does when its retention is over: its URL
    /// answers 404 from now on. False if the emulator serves no such file.
    pub fn expire_file(&self, url: &str) -> bool {
        let Some(id) = url
            .split("/files/")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
        else {
            return false;
        };
        self.lock().files.remove(id).is_some()
    }

    /// Finetune ids issued by `fal-ai/flux-pro-trainer`.
    pub fn finetunes(&self) -> Vec<String> {
        self.lock().finetunes.clone()
    }

    /// The JWKS document as served.
    pub fn jwks(&self) -> Value {
        let published = self.lock().keys.published();
        let keys: Vec<Value> = published.iter().map(|k| jwk_for(k, &kid_for(k))).collect();
        json!({ "keys": keys })
    }

    pub fn user_id(&self) -> &str {
        &self.0.config.user_id
    }

    // ---- controls ----

    /// Arms a fault on the HTTP API (applies to the next `count` matching calls).
    pub fn inject_fault(&self, rule: FaultRule) {
        self.lock().http_faults.push(rule);
    }

    pub fn inject_callback_fault(&self, fault: CallbackFault, count: u32) {
        let mut inner = self.lock();
        for _ in 0..count {
            inner.callback_faults.push_back(fault.clone());
        }
    }

    /// The next `count` submitted requests complete with this error instead of running.
    pub fn fail_next_models(&self, failure: ModelFailure, count: u32) {
        let mut inner = self.lock();
        for _ in 0..count {
            inner.model_failures.push_back(failure.clone());
        }
    }

    /// An unannounced rotation: a key no verifier has seen signs from now on (with a new
    /// next key beside it), so a cached JWKS must be fetched again. The old signing key stays
    /// listed if `keep_old`. Returns the new signing key's `kid`.
    pub fn rotate_key(&self, keep_old: bool) -> String {
        let mut inner = self.lock();
        let old = std::mem::replace(&mut inner.keys, Keys::fresh());
        if keep_old {
            inner.keys.retired = old.retired_after_rotation();
        }
        kid_for(&inner.keys.signing.verifying_key())
    }

    /// A planned rotation: the published next key signs from now on and a new next key is
    /// published, so a verifier holding the set from before verifies without fetching it
    /// again. The old signing key stays listed if `keep_old`. Returns the new signing key's
    /// `kid`.
    pub fn rotate_to_next_key(&self, keep_old: bool) -> String {
        let mut inner = self.lock();
        let next = std::mem::replace(&mut inner.keys.next, random_signing_key());
        let old_signing = std::mem::replace(&mut inner.keys.signing, next);
        if keep_old {
            inner.keys.retired.insert(0, old_signing.verifying_key());
        } else {
            inner.keys.retired.clear();
        }
        kid_for(&inner.keys.signing.verifying_key())
    }

    /// Sets timings for one endpoint, or the defaults of its class when `endpoint` is
    /// `None` (`training` picks trainers vs. everything else).
    /// Requests already in flight follow the new timings too.
    pub fn set_durations(&self, endpoint: Option<&str>, training: bool, d: Durations) {
        {
            let mut inner = self.lock();
            match endpoint {
                Some(e) => {
                    inner.per_endpoint.insert(e.to_owned(), d);
                }
                None if training => inner.training = d,
                None => inner.generation = d,
            }
        }
        self.bump();
    }

    /// Requests already in flight follow the new timings too.
    pub fn set_all_durations(&self, d: Durations) {
        {
            let mut inner = self.lock();
            inner.generation = d;
            inner.training = d;
            inner.per_endpoint.clear();
            inner.per_request.clear();
        }
        self.bump();
    }

    /// Sets timings for one request (its queue time counted from its submit, its run time
    /// from its start): a test can let one request through while the others stay held.
    pub fn set_request_durations(&self, request_id: &str, d: Durations) {
        self.lock().per_request.insert(request_id.to_owned(), d);
        self.bump();
    }

    /// How many calls are waiting in a `hold` fault.
    pub fn held_calls(&self) -> usize {
        self.lock().held_calls
    }

    /// Lets every call waiting in a `hold` fault go on.
    pub fn release_held_calls(&self) {
        self.lock().releases += 1;
        self.bump();
    }

    /// Waits in a `hold` fault until the next release.
    pub(crate) async fn hold_call(&self) {
        let mut changes = self.subscribe();
        let arrived = {
            let mut inner = self.lock();
            inner.held_calls += 1;
            inner.releases
        };
        self.bump();
        while self.lock().releases == arrived {
            if changes.changed().await.is_err() {
                break;
            }
        }
        self.lock().held_calls -= 1;
    }

    /// Delivers a callback held by a `reorder` fault now.
    pub fn release_held_callback(&self) -> bool {
        let held = self.lock().held.take();
        match held {
            Some(h) => {
                super::callbacks::spawn_delivery(self, h, None);
                true
            }
            None => false,
        }
    }

    /// Arms faults at random rates (replacing any rates armed before); counted faults keep
    /// precedence. Refuses rates that do not add up (see [`FaultRates::validate`]).
    pub fn set_fault_rates(&self, rates: FaultRates) -> Result<(), String> {
        rates.validate()?;
        let rng = StdRng::seed_from_u64(rates.seed);
        self.lock().rates = Some((rates, rng));
        Ok(())
    }

    /// Disarms every fault, counted and rated.
    pub fn clear_faults(&self) {
        let mut inner = self.lock();
        inner.http_faults.clear();
        inner.callback_faults.clear();
        inner.model_failures.clear();
        inner.rates = None;
    }

    /// Takes the next armed fault for `target`, decrementing its count; else draws one.
    pub(crate) fn take_fault(&self, target: FaultTarget) -> Option<HttpFault> {
        let mut inner = self.lock();
        let Some(idx) = inner
            .http_faults
            .iter()
            .position(|r| r.target == target || r.target == FaultTarget::Any)
        else {
            let (rates, rng) = inner.rates.as_mut()?;
            let draw = rng.random::<f64>();
            let matching = rates
                .http
                .iter()
                .filter(|f| f.target == target || f.target == FaultTarget::Any)
                .map(|f| (&f.fault, f.rate));
            return pick(draw, matching).cloned();
        };
        let rule = &mut inner.http_faults[idx];
        let fault = rule.fault.clone();
        rule.count = rule.count.saturating_sub(1);
        if rule.count == 0 {
            inner.http_faults.remove(idx);
        }
        Some(fault)
    }

    /// The fault for the next callback: an armed one, else a drawn one.
    pub(crate) fn take_callback_fault(&self) -> Option<CallbackFault> {
        let mut inner = self.lock();
        if let Some(f) = inner.callback_faults.pop_front() {
            return Some(f);
        }
        let (rates, rng) = inner.rates.as_mut()?;
        let draw = rng.random::<f64>();
        pick(draw, rates.callbacks.iter().map(|f| (&f.fault, f.rate))).cloned()
    }

    /// The forced failure of the next submitted request: an armed one, else a drawn one.
    pub(crate) fn take_model_failure(inner: &mut Inner) -> Option<ModelFailure> {
        if let Some(f) = inner.model_failures.pop_front() {
            return Some(f);
        }
        let (rates, rng) = inner.rates.as_mut()?;
        let draw = rng.random::<f64>();
        pick(draw, rates.models.iter().map(|f| (&f.failure, f.rate))).cloned()
    }

    pub(crate) fn store_file(&self, name: &str, content_type: &str, bytes: Vec<u8>) -> String {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let url = format!("{}/files/{id}/{name}", self.base_url());
        self.lock().files.insert(
            id,
            StoredFile {
                content_type: content_type.to_owned(),
                bytes: bytes.into(),
            },
        );
        url
    }
}
