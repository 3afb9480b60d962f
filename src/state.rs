//! What the handlers and the workers share, below both: the store, the FAL client, the
//! callback URLs, the wake-ups, FAL's health and the counters. `app` builds it; `http` and
//! `worker` use it; nothing here knows about either.

use crate::blobs::Blobs;
use crate::config::Config;
use crate::fal::client::FalClient;
use crate::fal::progress::ProgressReader;
use crate::fal::signature::JwksCache;
use crate::fal::token::CallbackUrls;
use crate::store::{ApiKeyCache, Store};
use axum::http::StatusCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{Notify, Semaphore};

/// What every handler can reach. Workers get a narrower [`crate::worker::WorkerContext`].
///
/// One allocation behind a reference count: the router clones the state for every request (once
/// per layer), and a clone of each part would cost a dozen atomic operations each time.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    pub store: Store,
    pub config: Arc<Config>,
    pub fal: FalClient,
    pub jwks: JwksCache,
    /// Builds and checks callback URLs; absent when there is no public URL (polling only).
    pub callbacks: Option<Arc<CallbackUrls>>,
    pub wake: Arc<Wake>,
    pub fal_health: Arc<FalHealth>,
    /// falgate's own files (training photos).
    pub blobs: Blobs,
    /// One permit per photo upload being received and checked.
    pub photo_uploads: Arc<Semaphore>,
    /// One permit per photo being decoded: decoding takes a core and the picture's size in
    /// memory, so no more run at once than there are cores.
    pub photo_decodes: Arc<Semaphore>,
    pub http_counters: Arc<HttpCounters>,
    pub counters: Arc<PipelineCounters>,
    /// Live API keys read lately, so that authenticating is not a database read each time.
    pub api_keys: Arc<ApiKeyCache>,
    /// Turns true when the service starts shutting down: what ends the event streams, which
    /// would otherwise hold their connections open past it.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Posts webhooks to the clients' receivers (and its configuration guards their URLs).
    pub webhooks: crate::webhooks::WebhookSender,
    /// Reads FAL's queue position and logs of the jobs that event streams follow.
    pub progress: Arc<ProgressReader>,
    /// The event streams open in this process, by API key.
    pub streams: StreamSeats,
}

/// The parts of [`AppState`] that come from outside; the rest starts empty.
pub struct Parts {
    pub config: Config,
    pub store: Store,
    pub fal: FalClient,
    pub jwks: JwksCache,
    pub callbacks: Option<CallbackUrls>,
    pub blobs: Blobs,
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub webhooks: crate::webhooks::WebhookSender,
}

impl AppState {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            config,
            store,
            fal,
            jwks,
            callbacks,
            blobs,
            stopping,
            webhooks,
        } = parts;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let uploads = config.avatars.upload_concurrency;
        let progress = ProgressReader::new(fal.clone(), config.connections.stream_progress);
        Self(Arc::new(Shared {
            store,
            fal,
            jwks,
            callbacks: callbacks.map(Arc::new),
            blobs,
            photo_uploads: Arc::new(Semaphore::new(uploads)),
            photo_decodes: Arc::new(Semaphore::new(cores.min(uploads))),
            config: Arc::new(config),
            wake: Arc::default(),
            fal_health: Arc::default(),
            http_counters: Arc::default(),
            counters: Arc::default(),
            api_keys: Arc::default(),
            stopping,
            webhooks,
            progress,
            streams: StreamSeats::default(),
        }))
    }
}

impl Shared {
    /// Whether FAL is the built-in emulator.
    pub fn sandbox(&self) -> bool {
        self.config.sandbox
    }

    /// The URL FAL calls back for `job_id`, with its token; `None` without a public URL.
    pub fn callback_url(&self, job_id: uuid::Uuid) -> Option<reqwest::Url> {
        Some(self.callbacks.as_ref()?.url_for(job_id))
    }
}

/// The most event streams one API key may hold open in one process: each holds a connection
/// and, for a job's or a batch's, reads FAL's status of its running jobs.
pub const MOST_STREAMS_PER_KEY: usize = 32;

/// The event streams open, by API key.
#[derive(Default)]
pub struct StreamSeats {
    open: Arc<std::sync::Mutex<std::collections::HashMap<uuid::Uuid, usize>>>,
}

/// One open stream; its seat is given back when it is dropped (the stream ended, or its
/// client went away).
pub struct StreamSeat {
    open: Arc<std::sync::Mutex<std::collections::HashMap<uuid::Uuid, usize>>>,
    tenant: uuid::Uuid,
}

impl StreamSeats {
    /// A seat for one more stream of `tenant`'s; `None` when it holds the most already.
    pub fn take(&self, tenant: uuid::Uuid) -> Option<StreamSeat> {
        let mut open = lock(&self.open);
        let count = open.entry(tenant).or_default();
        if *count >= MOST_STREAMS_PER_KEY {
            return None;
        }
        *count += 1;
        Some(StreamSeat {
            open: self.open.clone(),
            tenant,
        })
    }

    /// How many streams are open in all.
    pub fn open(&self) -> usize {
        lock(&self.open).values().sum()
    }
}

impl Drop for StreamSeat {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(count) = open.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counts stay whole whatever panicked while holding them.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Decisions of the pipeline worth watching, since this process started.
#[derive(Default)]
pub struct PipelineCounters {
    /// Submits whose answer never came, so that FAL may hold a request for the job.
    pub submits_unconfirmed: AtomicU64,
    /// Jobs sent again after such a submit, no callback having named them within the wait.
    pub submits_resent: AtomicU64,
}

/// Responses by status class (1xx … 5xx), since this process started.
#[derive(Default)]
pub struct HttpCounters {
    by_class: [AtomicU64; 5],
}

impl HttpCounters {
    pub fn record(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// `(class digit, count)` for 1xx to 5xx.
    pub fn by_class(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.by_class
            .iter()
            .enumerate()
            .map(|(i, counter)| (i + 1, counter.load(Ordering::Relaxed)))
    }
}

/// Wakes the workers the moment there is work, so the happy path waits for no timer.
#[derive(Default)]
pub struct Wake {
    pub dispatcher: Notify,
    pub reconciler: Notify,
    /// A training ended: there may be a LoRA file to keep.
    pub keeper: Notify,
}

/// What the last calls to FAL said about our credentials, for `/readyz`.
#[derive(Default)]
pub struct FalHealth {
    unauthorized: AtomicBool,
}

impl FalHealth {
    pub fn record_unauthorized(&self, unauthorized: bool) {
        self.unauthorized.store(unauthorized, Ordering::Relaxed);
    }

    pub fn key_refused(&self) -> bool {
        self.unauthorized.load(Ordering::Relaxed)
    }
}
