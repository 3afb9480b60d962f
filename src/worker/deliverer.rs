//! The webhook deliverer: plans a delivery for each new event and each endpoint that takes its
//! type, and sends due deliveries, each under a lease so that replicas share them and a dead
//! process's are taken over (at least once: a receiver drops repeats by `webhook-id`). A
//! failed attempt is tried again on the configured schedule, with a little jitter; after the
//! last, the delivery fails and stays listed. A 410 Gone disables the endpoint.

use super::{WorkerContext, after};
use crate::store::{DeliveryOutcome, DeliveryWork, WebhookAttempt};
use rand::Rng;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// Deliveries claimed at once (and sent side by side).
const CLAIM: i64 = 32;

/// How long the deliverer waits when nothing wakes it: the bound on how late a retry falls
/// due or an event from another process is planned.
const LOOK_AGAIN: Duration = Duration::from_millis(200);

pub async fn run(ctx: WorkerContext, mut stopping: watch::Receiver<bool>) {
    let mut new_events = ctx.store.new_events();
    loop {
        if *stopping.borrow() {
            return;
        }
        new_events.borrow_and_update();
        let now = crate::domain::now();
        if let Err(error) = ctx.store.plan_webhook_deliveries(now).await {
            tracing::warn!(%error, "planning webhook deliveries failed");
        }
        let claimed = ctx
            .store
            .claim_webhook_deliveries(now, after(now, ctx.settings.lease), CLAIM)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "claiming webhook deliveries failed");
                Vec::new()
            });
        if !claimed.is_empty() {
            futures_util::future::join_all(claimed.into_iter().map(|work| deliver(&ctx, work)))
                .await;
            continue;
        }
        tokio::select! {
            _ = new_events.changed() => {}
            () = tokio::time::sleep(LOOK_AGAIN) => {}
            _ = stopping.changed() => {}
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
