//! The workers that move jobs: the dispatcher sends pending jobs to FAL, the reconciler follows
//! jobs at FAL when callbacks are late, passes cancels on, and enforces deadlines. Both claim
//! work under a lease in the database, so several replicas share it and a dead process's work
//! is taken over when its lease runs out. Both stop claiming on shutdown and finish what they
//! hold. Beside them: the deliverer sends webhooks, the keeper keeps LoRA files, and the pruner
//! removes events past their retention.

pub mod deliverer;
pub mod dispatcher;
pub mod keeper;
pub mod pruner;
pub mod reconciler;

use crate::blobs::Blobs;
use crate::config::WorkerConfig;
use crate::domain::job::JobKind;
use crate::fal::FalClient;
use crate::fal::token::CallbackUrls;
use crate::state::{AppState, FalHealth, PipelineCounters, Wake};
use crate::store::{Event, Store};
use crate::webhooks::WebhookSender;
use chrono::{DateTime, TimeDelta, Utc};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the workers use of the shared state, and nothing more: no HTTP counters, no upload
/// permits, no JWKS, and of the configuration only the workers' part.
#[derive(Clone)]
pub struct WorkerContext {
    pub store: Store,
    pub fal: FalClient,
    /// Absent without a public URL: jobs are then followed by polling alone.
    pub callbacks: Option<Arc<CallbackUrls>>,
    /// Where kept LoRA files go.
    pub blobs: Blobs,
    pub wake: Arc<Wake>,
    pub fal_health: Arc<FalHealth>,
    pub counters: Arc<PipelineCounters>,
    pub settings: WorkerConfig,
    /// Whether FAL is the built-in emulator: a sandbox process works only sandbox jobs.
    pub sandbox: bool,
    /// Posts webhooks to the clients' receivers.
    pub webhooks: WebhookSender,
    /// An event as its webhook's body: as `GET /v1/events/{id}` shows it. Given by the wiring,
    /// since how the API shows resources is the HTTP layer's to say.
    pub render_event: fn(Event) -> String,
}

impl WorkerContext {
    pub fn new(state: &AppState, render_event: fn(Event) -> String) -> Self {
        Self {
            store: state.store.clone(),
            fal: state.fal.clone(),
            callbacks: state.callbacks.clone(),
            blobs: state.blobs.clone(),
            wake: state.wake.clone(),
            fal_health: state.fal_health.clone(),
            counters: state.counters.clone(),
            settings: state.config.workers.clone(),
            sandbox: state.config.sandbox,
            webhooks: state.webhooks.clone(),
            render_event,
        }
    }
}

/// Starts every worker; each stops when `stopping` turns true.
pub fn spawn(ctx: WorkerContext, stopping: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(dispatcher::run(ctx.clone(), stopping.clone())),
        tokio::spawn(deliverer::run(ctx.clone(), stopping.clone())),
        tokio::spawn(keeper::run(ctx.clone(), stopping.clone())),
        tokio::spawn(pruner::run(ctx.clone(), stopping.clone())),
        tokio::spawn(reconciler::run(ctx, stopping)),
    ]
}

/// How long a worker waits when nothing is due and nobody wakes it: the bound on how late work
/// made by another replica is noticed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Sleeps until `wake` fires, `until` passes (bounded by [`IDLE_WAIT`]), or shutdown begins.
async fn wait_for_work(
    wake: &tokio::sync::Notify,
    until: Option<DateTime<Utc>>,
    stopping: &mut watch::Receiver<bool>,
) {
    let wait = until
        .map(|due| {
            (due - crate::domain::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
        })
        .unwrap_or(IDLE_WAIT)
        .clamp(Duration::from_millis(5), IDLE_WAIT);
    tokio::select! {
        () = wake.notified() => {}
        () = tokio::time::sleep(wait) => {}
        _ = stopping.changed() => {}
    }
}

fn after(at: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    at + TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX)
}

/// How long a job of this kind may take, from its creation, before it is failed.
fn deadline(ctx: &WorkerContext, kind: JobKind) -> Duration {
    match kind {
        JobKind::Training => ctx.settings.training_deadline,
        JobKind::Generation | JobKind::Raw => ctx.settings.generation_deadline,
    }
}
