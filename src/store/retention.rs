//! How long events are kept. Past the retention, an event goes with its deliveries and their
//! attempts once none of them is still being sent; the endpoints given with a request go once
//! their resource has ended and nothing is left to send them. Each tenant's numbering goes on
//! where it was: a removed event's `sequence` is never given again.

use super::{Store, StoreResult};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Rows removed by one statement, so that no write holds its locks for long.
const PER_STATEMENT: i64 = 1_000;

/// What one pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    pub deliveries: u64,
    pub endpoints: u64,
}

impl Store {
    /// Removes what was made before `before` and is no longer needed: finished per-request
    /// endpoints (with their deliveries), finished deliveries (with their attempts), and the
    /// events no delivery refers to any more.
    pub async fn prune_events(&self, before: DateTime<Utc>) -> StoreResult<Pruned> {
        // Ids are UUIDv7, which sort by the time they were made: the primary keys find the old
        // rows, and the bound below every id made at `before` or later is the smallest one.
        let bound = oldest_id_at(before);
        let endpoints = self
            .prune(
                "DELETE FROM webhook_endpoints WHERE id IN (SELECT e.id FROM webhook_endpoints e \
                 WHERE e.id < $1 AND e.resource_id IS NOT NULL \
                 AND (e.finished OR NOT e.enabled) \
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d \
                 WHERE d.endpoint_id = e.id AND d.status = 'pending') \
                 ORDER BY e.id LIMIT $2)",
                bound,
            )
            .await?;
        let deliveries = self
            .prune(
                "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries \
                 WHERE id < $1 AND status <> 'pending' ORDER BY id LIMIT $2)",
                bound,
            )
            .await?;
        // An event not yet numbered (PostgreSQL numbers after commit) has not been seen by
        // anyone: it stays whatever its age.
        let events = self
            .prune(
                "DELETE FROM events WHERE id IN (SELECT e.id FROM events e \
                 WHERE e.id < $1 AND e.sequence IS NOT NULL \
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id) \
                 ORDER BY e.id LIMIT $2)",
                bound,
            )
            .await?;
        Ok(Pruned {
            events,
            deliveries,
            endpoints,
        })
    }

    /// Runs a limited `DELETE` (`$1` the bound, `$2` the limit) until it removes less than its
    /// limit; answers how many rows it removed.
    async fn prune(&self, sql: &'static str, bound: Uuid) -> StoreResult<u64> {
        let mut removed = 0;
        loop {
            let now = self
                .writer()
                .execute(sql, &[bound.into(), PER_STATEMENT.into()])
                .await?;
            removed += now;
            if now < PER_STATEMENT as u64 {
                return Ok(removed);
            }
        }
    }
}

/// The smallest UUIDv7 of the millisecond `at`: every id made at `at` or later is at least this.
fn oldest_id_at(at: DateTime<Utc>) -> Uuid {
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_before_a_time_sort_below_its_bound_and_those_after_above() {
        let now = Utc::now();
        let bound = oldest_id_at(now);
        let made_now = Uuid::now_v7();
        assert!(made_now >= bound);
        assert!(oldest_id_at(now - chrono::TimeDelta::milliseconds(1)) < bound);
        assert!(bound < oldest_id_at(now + chrono::TimeDelta::milliseconds(1)));
        // Byte order, as both databases compare them.
        assert!(oldest_id_at(now - chrono::TimeDelta::days(1)).as_bytes() < bound.as_bytes());
    }
}
