//! The webhook deliverer: plans a delivery for each new event and each endpoint that takes its
//! type, and sends due deliveries, each under a lease so that replicas share them and a dead
//! process's are taken over (at least once: a receiver drops repeats by `webhook-id`). A
//! failed attempt is tried again on the configured schedule, with a little jitter; after the
//! last, the delivery fails and stays listed. A 410 Gone disables the endpoint.

use super::{WorkerContext, after};
use crate::store::{DeliveryOutcome, DeliveryWork, WebhookAttempt};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

/// Deliveries under way at once in this process.
const SENDING: usize = 32;

/// Deliveries under way at once to one endpoint in this process: a receiver that hangs holds
/// this many sending slots at most, and the others go on serving every other endpoint.
const SENDING_PER_ENDPOINT: usize = 8;

/// How long a delivery claimed while its endpoint had its fill waits before it is claimed
/// again.
const ENDPOINT_BUSY_WAIT: Duration = Duration::from_secs(1);

/// Pages of endpoints planned in one round at most.
const MOST_PAGES: usize = 64;

/// How long the deliverer waits when nothing wakes it: the bound on how late a retry falls
/// due or an event from another process is planned.
const LOOK_AGAIN: Duration = Duration::from_millis(200);

pub async fn run(ctx: WorkerContext, mut stopping: watch::Receiver<bool>) {
    let mut new_events = ctx.store.new_events();
    // Each delivery is sent by a task of its own, so that a receiver slow to answer holds up
    // its own deliveries and no others; no more are under way than `SENDING`.
    let permits = Arc::new(Semaphore::new(SENDING));
    let per_endpoint: Arc<Mutex<HashMap<Uuid, usize>>> = Arc::default();
    let mut sending = JoinSet::new();
    loop {
        if *stopping.borrow() {
            break;
        }
        new_events.mark_seen();
        plan(&ctx).await;
        let free = permits.available_permits();
        let claimed = if free == 0 {
            Vec::new()
        } else {
            let now = crate::domain::now();
            ctx.store
                .claim_webhook_deliveries(now, after(now, lease(&ctx)), free as i64)
                .await
                .unwrap_or_else(|error| {
                    tracing::warn!(%error, "claiming webhook deliveries failed");
                    Vec::new()
                })
        };
        let claimed_any = !claimed.is_empty();
        for work in claimed {
            let endpoint = work.endpoint.id;
            let has_room = {
                let mut under_way = per_endpoint.lock().expect("not poisoned");
                let count = under_way.entry(endpoint).or_default();
                (*count < SENDING_PER_ENDPOINT)
                    .then(|| *count += 1)
                    .is_some()
            };
            let permit = match permits.clone().try_acquire_owned() {
                Ok(permit) if has_room => permit,
                other => {
                    if has_room {
                        leave(&per_endpoint, endpoint);
                    }
                    drop(other);
                    put_back(&ctx, &work).await;
                    continue;
                }
            };
            let ctx = ctx.clone();
            let per_endpoint = per_endpoint.clone();
            sending.spawn(async move {
                deliver(&ctx, work).await;
                leave(&per_endpoint, endpoint);
                drop(permit);
            });
        }
        while sending.try_join_next().is_some() {}
        if claimed_any && permits.available_permits() > 0 {
            continue;
        }
        tokio::select! {
            () = new_events.changed(None) => {}
            () = tokio::time::sleep(LOOK_AGAIN) => {}
            _ = stopping.changed() => {}
            Some(_) = sending.join_next(), if !sending.is_empty() => {}
        }
    }
    // Deliveries under way are finished (each bounded by the receiver's timeout); what is not
    // sent by then goes to the next process once its lease runs out.
    while sending.join_next().await.is_some() {}
}

/// Plans the deliveries of every endpoint with new events, a page at a time, up to
/// [`MOST_PAGES`] pages a round.
async fn plan(ctx: &WorkerContext) {
    for _ in 0..MOST_PAGES {
        match ctx
            .store
            .plan_webhook_deliveries(crate::domain::now())
            .await
        {
            Ok(true) => continue,
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(%error, "planning webhook deliveries failed");
                return;
            }
        }
    }
}

async fn deliver(ctx: &WorkerContext, work: DeliveryWork) {
    let body = (ctx.render_event)(work.event.clone());
    let at = crate::domain::now();
    let secrets = work.endpoint.signing_secrets(at);
    let sent = ctx
        .webhooks
        .send(
            &work.endpoint.url,
            &work.event.id.to_string(),
            &body,
            &secrets,
        )
        .await;
    let outcome = if sent.succeeded() {
        DeliveryOutcome::Succeeded
    } else if sent.status == Some(410) {
        DeliveryOutcome::Gone
    } else {
        let schedule = &ctx.webhooks.config().retry_schedule;
        match schedule.get(usize::try_from(work.attempt - 1).unwrap_or(usize::MAX)) {
            Some(wait) => DeliveryOutcome::RetryAt(after(crate::domain::now(), with_jitter(*wait))),
            None => DeliveryOutcome::Failed,
        }
    };
    let attempt = WebhookAttempt {
        id: Uuid::now_v7(),
        delivery_id: work.id,
        event_id: work.event.id,
        at,
        duration_ms: i64::try_from(sent.took.as_millis()).unwrap_or(i64::MAX),
        status_code: sent.status.map(i32::from),
        error: sent.error.clone(),
        response_start: sent.response_start.clone(),
        delivery_status: String::new(),
    };
    if let Err(error) = ctx
        .store
        .record_webhook_attempt(&work, &attempt, &outcome)
        .await
    {
        // The lease runs out and the delivery is sent again: at least once.
        tracing::warn!(%error, delivery = %work.id, "recording a webhook attempt failed");
    }
}

/// `wait` and up to a tenth more, so that many deliveries failed together do not all come
/// back at the same moment.
fn with_jitter(wait: Duration) -> Duration {
    wait.mul_f64(1.0 + rand::rng().random_range(0.0..0.1))
}

/// How long a claimed delivery is held: past the receiver's whole time to answer, with room
/// to record the attempt, so that no other process sends it meanwhile. No longer than that: a
/// killed process's deliveries wait out their lease before another process sends them.
fn lease(ctx: &WorkerContext) -> Duration {
    ctx.settings
        .lease
        .max(ctx.webhooks.config().timeout + RECORD_ROOM)
}

/// Time allowed to record an attempt once its answer is in.
const RECORD_ROOM: Duration = Duration::from_secs(5);

/// One delivery to `endpoint` is no longer under way.
fn leave(per_endpoint: &Mutex<HashMap<Uuid, usize>>, endpoint: Uuid) {
    let mut under_way = per_endpoint.lock().expect("not poisoned");
    if let Some(count) = under_way.get_mut(&endpoint) {
        *count -= 1;
        if *count == 0 {
            under_way.remove(&endpoint);
        }
    }
}

/// Gives back a delivery claimed while its endpoint had its fill, due again a little later,
/// without counting an attempt.
async fn put_back(ctx: &WorkerContext, work: &DeliveryWork) {
    let later = after(crate::domain::now(), ENDPOINT_BUSY_WAIT);
    if let Err(error) = ctx.store.put_back_webhook_delivery(work, later).await {
        // Its lease runs out and it is claimed again then.
        tracing::warn!(%error, delivery = %work.id, "giving back a webhook delivery failed");
    }
}
