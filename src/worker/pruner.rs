//! Removes events past their retention (`FALGATE_EVENT_RETENTION_DAYS`), with their finished
//! deliveries and the endpoints given with requests that have ended: once at start, then every
//! hour. Every replica may run it; the statements remove a bounded number of rows each, and two
//! processes removing the same rows only find fewer.

use super::WorkerContext;
use chrono::TimeDelta;
use std::time::Duration;
use tokio::sync::watch;

/// Time between two passes.
const EVERY: Duration = Duration::from_secs(3600);

pub async fn run(ctx: WorkerContext, mut stopping: watch::Receiver<bool>) {
    let retention = TimeDelta::from_std(ctx.settings.event_retention).unwrap_or(TimeDelta::MAX);
    while !*stopping.borrow() {
        let before = crate::domain::now()
            .checked_sub_signed(retention)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        match ctx.store.prune_events(before).await {
            Ok(pruned) if pruned != Default::default() => {
                tracing::info!(
                    events = pruned.events,
                    deliveries = pruned.deliveries,
                    endpoints = pruned.endpoints,
                    "removed events past their retention"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not remove old events; trying next time"),
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            _ = stopping.changed() => {}
        }
    }
}
