//! Events for clients (the outbox): one row per change a client is told of, written by the
//! transaction that makes the change, so that no change is committed without its event and no
//! event tells of a change that did not happen.
//!
//! Each tenant's events are numbered 1, 2, 3… without gaps, and become visible in that order:
//! a reader that has seen number n will never later find an event below it, so "everything
//! after n" is a complete answer. On SQLite the writing transaction numbers its events (there
//! is one writer at a time); on PostgreSQL the events are written unnumbered and a numbering
//! transaction, one at a time across every process, numbers what has committed
//! (`sequencer.rs`), so that transactions writing events never wait for one another.

use super::avatars::{Avatar, AvatarRow, GET_AVATAR};
use super::batches::{Batch, JOBS_OF_BATCH};
use super::db::{EventNumbering, Tx};
use super::jobs::{JobRow, jobs_from_rows};
use super::{Job, StoreError, StoreResult};
use crate::domain::event::EventType;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

/// An event as stored: what happened, to which resource, and the resource as it was then.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Uuid,
    pub tenant: Uuid,
    /// The tenant's count of events up to this one (1 for its first).
    pub sequence: i64,
    pub kind: EventType,
    pub resource_id: Uuid,
    /// The generation batch of the resource, for a batch's events and its jobs'.
    pub batch_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub snapshot: EventSnapshot,
}

/// The resource an event carries, as stored when the event happened.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSnapshot {
    Job(Box<Job>),
    Avatar(Box<Avatar>),
    Batch {
        batch: Batch,
        jobs: Vec<Job>,
    },
    /// The endpoint a test event is for (never its secrets).
    WebhookEndpoint(EndpointSnapshot),
}

/// A webhook endpoint as a test event carries it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EndpointSnapshot {
    pub id: Uuid,
    pub url: String,
    pub description: String,
}

/// Which of a tenant's events to list.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub kind: Option<EventType>,
    /// Only the events of this job, avatar or batch (a batch's include its jobs').
    pub resource_id: Option<Uuid>,
    /// Only events numbered above this.
    pub after: i64,
    pub limit: u32,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: Uuid,
    tenant: Uuid,
    sequence: i64,
    #[sqlx(rename = "type")]
    kind: String,
    resource_id: Uuid,
    batch_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    snapshot: Json<EventSnapshot>,
}

impl TryFrom<EventRow> for Event {
    type Error = StoreError;

    fn try_from(row: EventRow) -> Result<Self, Self::Error> {
        Ok(Self {
            kind: row
                .kind
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("event {}: type: {e}", row.id)))?,
            id: row.id,
            tenant: row.tenant,
            sequence: row.sequence,
            resource_id: row.resource_id,
            batch_id: row.batch_id,
            created_at: row.created_at,
            snapshot: row.snapshot.0,
        })
    }
}

const EVENT_COLUMNS: &str =
    "id, tenant, sequence, type, resource_id, batch_id, created_at, snapshot";

impl super::Store {
    /// The tenant's events matching `filter`, in the order they happened.
    /// Only numbered events are shown (see the module's comment).
    pub async fn list_events(&self, tenant: Uuid, filter: &EventFilter) -> StoreResult<Vec<Event>> {
        // The numbering runs in every process that reads events, so that one that only
        // reads still numbers what a process that died left.
        self.event_numbering();
        // Two statements rather than one with `($4 IS NULL OR …)`: PostgreSQL's generic plan for
        // that form could use no index on the resource, and would walk all the tenant's events.
        static ALL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE tenant = $1 AND sequence > $2 \
                 AND ($3 IS NULL OR type = $3) AND $4 IS NULL ORDER BY sequence LIMIT $5"
            )
        });
        static OF_RESOURCE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE (resource_id = $4 OR batch_id = $4) \
                 AND tenant = $1 AND sequence > $2 AND ($3 IS NULL OR type = $3) \
                 ORDER BY sequence LIMIT $5"
            )
        });
        let statement = match filter.resource_id {
            Some(_) => &OF_RESOURCE,
            None => &ALL,
        };
        let rows: Vec<EventRow> = self
            .fetch_all(
                statement,
                &[
                    tenant.into(),
                    filter.after.into(),
                    filter.kind.map(EventType::as_str).into(),
                    filter.resource_id.into(),
                    i64::from(filter.limit).into(),
                ],
            )
            .await?;
        rows.into_iter().map(Event::try_from).collect()
    }

    pub async fn get_event(&self, tenant: Uuid, id: Uuid) -> StoreResult<Option<Event>> {
        static GET: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE id = $1 AND tenant = $2 \
                 AND sequence IS NOT NULL"
            )
        });
        let row: Option<EventRow> = self
            .fetch_optional(&GET, &[id.into(), tenant.into()])
            .await?;
        row.map(Event::try_from).transpose()
    }
}

impl super::Store {
    /// When the last `webhook_endpoint.test` event for `endpoint` was written, numbered yet or
    /// not.
    pub async fn last_test_event_at(
        &self,
        tenant: Uuid,
        endpoint: Uuid,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let row: Option<(DateTime<Utc>,)> = self
            .fetch_optional(
                "SELECT created_at FROM events WHERE resource_id = $1 AND tenant = $2 \
                 AND type = $3 ORDER BY id DESC LIMIT 1",
                &[
                    endpoint.into(),
                    tenant.into(),
                    EventType::WebhookEndpointTest.as_str().into(),
                ],
            )
            .await?;
        Ok(row.map(|(at,)| at))
    }

    /// Writes a `webhook_endpoint.test` event for `endpoint`, which alone receives it.
    pub async fn write_test_event(
        &self,
        tenant: Uuid,
        endpoint: EndpointSnapshot,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.writer().begin().await?;
        let test = NewEvent {
            kind: EventType::WebhookEndpointTest,
            snapshot: EventSnapshot::WebhookEndpoint(endpoint),
        };
        insert_events(&mut tx, tenant, at, &[test]).await?;
        tx.commit().await?;
        self.events_written(tenant);
        Ok(())
    }
}

/// An event to write: its type and the resource it tells of.
pub(super) struct NewEvent {
    pub kind: EventType,
    pub snapshot: EventSnapshot,
}

impl NewEvent {
    fn resource_id(&self) -> Uuid {
        match &self.snapshot {
            EventSnapshot::Job(job) => job.id,
            EventSnapshot::Avatar(avatar) => avatar.id,
            EventSnapshot::Batch { batch, .. } => batch.id,
            EventSnapshot::WebhookEndpoint(endpoint) => endpoint.id,
        }
    }

    fn batch_id(&self) -> Option<Uuid> {
        match &self.snapshot {
            EventSnapshot::Job(job) => job.batch_id,
            EventSnapshot::Avatar(_) | EventSnapshot::WebhookEndpoint(_) => None,
            EventSnapshot::Batch { batch, .. } => Some(batch.id),
        }
    }
}

/// Writes `events` in the transaction of the change they tell of, numbered now or after commit
/// as the backend does it ([`EventNumbering`]). On PostgreSQL the caller wakes the numbering
/// once it has committed ([`Store::events_written`](super::Store::events_written)).
pub(super) async fn insert_events(
    tx: &mut Tx,
    tenant: Uuid,
    at: DateTime<Utc>,
    events: &[NewEvent],
) -> StoreResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let numbered_now = tx.dialect().event_numbering == EventNumbering::WhenWritten;
    let mut last = match numbered_now {
        true => Some(last_event_number(tx, tenant).await?),
        false => None,
    };
    for event in events {
        last = last.map(|n| n + 1);
        let snapshot = serde_json::to_value(&event.snapshot)
            .map_err(|e| StoreError::Database(format!("an event's resource as JSON: {e}")))?;
        tx.conn()
            .execute(
                "INSERT INTO events (id, tenant, sequence, type, resource_id, batch_id, \
                 created_at, snapshot) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    Uuid::now_v7().into(),
                    tenant.into(),
                    last.into(),
                    event.kind.as_str().into(),
                    event.resource_id().into(),
                    event.batch_id().into(),
                    at.into(),
                    (&snapshot).into(),
                ],
            )
            .await?;
    }
    if let Some(last) = last {
        tx.conn()
            .execute(
                "UPDATE event_sequences SET last_sequence = $2 WHERE tenant = $1",
                &[tenant.into(), last.into()],
            )
            .await?;
    }
    Ok(())
}

/// The last number given to the tenant's events (0 before the first).
async fn last_event_number(tx: &mut Tx, tenant: Uuid) -> StoreResult<i64> {
    let (last,): (i64,) = tx
        .conn()
        .fetch_one(
            "INSERT INTO event_sequences (tenant, last_sequence) VALUES ($1, 0) \
             ON CONFLICT (tenant) DO UPDATE SET last_sequence = event_sequences.last_sequence \
             RETURNING last_sequence",
            &[tenant.into()],
        )
        .await?;
    Ok(last)
}

/// The avatar as this transaction sees it, for an event about it.
pub(super) async fn avatar_snapshot(tx: &mut Tx, tenant: Uuid, id: Uuid) -> StoreResult<Avatar> {
    let row: AvatarRow = tx
        .conn()
        .fetch_one(&GET_AVATAR, &[id.into(), tenant.into()])
        .await?;
    Avatar::try_from(row)
}

/// The batch with its jobs, if every one of them has finished, read under the batch's lock.
pub(super) async fn completed_batch(
    tx: &mut Tx,
    batch_id: Uuid,
) -> StoreResult<Option<EventSnapshot>> {
    // Of two jobs of the batch finishing at once, the second waits here for the first to
    // commit, and then sees it finished.
    let lock_batch = tx.dialect().lock_batch;
    let locked: Option<(Uuid,)> = tx
        .conn()
        .fetch_optional(lock_batch, &[batch_id.into()])
        .await?;
    if locked.is_none() {
        return Ok(None);
    }
    let batch: Option<Batch> = tx
        .conn()
        .fetch_optional(
            "SELECT id, tenant, avatar_id, created_at FROM batches WHERE id = $1",
            &[batch_id.into()],
        )
        .await?;
    let Some(batch) = batch else {
        return Ok(None);
    };
    let rows: Vec<JobRow> = tx
        .conn()
        .fetch_all(&JOBS_OF_BATCH, &[batch_id.into()])
        .await?;
    let jobs = jobs_from_rows(rows)?;
    Ok(jobs
        .iter()
        .all(|job| job.status.is_terminal())
        .then_some(EventSnapshot::Batch { batch, jobs }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::avatar::AvatarStatus;
    use crate::domain::job::{JobKind, JobStatus};

    /// Snapshots as an earlier falgate stored them (from a sandbox's walkthrough). Events
    /// are kept for weeks, so every later falgate must read them: a field added to a stored
    /// type needs a default.
    fn written_before(name: &str) -> EventSnapshot {
        let text = match name {
            "job" => include_str!("../../tests/fixtures/event-snapshots/job.json"),
            "training-job" => {
                include_str!("../../tests/fixtures/event-snapshots/training-job.json")
            }
            "avatar" => include_str!("../../tests/fixtures/event-snapshots/avatar.json"),
            "avatar-wan" => include_str!("../../tests/fixtures/event-snapshots/avatar-wan.json"),
            "batch" => include_str!("../../tests/fixtures/event-snapshots/batch.json"),
            _ => unreachable!(),
        };
        let snapshot: EventSnapshot = serde_json::from_str(text)
            .unwrap_or_else(|error| panic!("a stored {name} snapshot no longer reads: {error}"));
        // And what is read is written back the same way.
        let again = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(
            serde_json::from_str::<EventSnapshot>(&again).unwrap(),
            snapshot
        );
        snapshot
    }

    #[test]
    fn snapshots_stored_by_an_earlier_version_are_read() {
        let EventSnapshot::Job(job) = written_before("job") else {
            panic!("not a job")
        };
        assert_eq!(
            (job.kind, job.status),
            (JobKind::Generation, JobStatus::Succeeded)
        );
        assert!(job.batch_id.is_some() && job.result.is_some());
        let EventSnapshot::Job(training) = written_before("training-job") else {
            panic!("not a job")
        };
        assert_eq!(training.kind, JobKind::Training);
        let EventSnapshot::Avatar(avatar) = written_before("avatar") else {
            panic!("not an avatar")
        };
        assert_eq!(avatar.status, AvatarStatus::Ready);
        assert!(avatar.lora_url.is_some());
        // Written before avatars recorded their trainer: the weights are FLUX.1 [dev].
        assert_eq!(avatar.trainer, None);
        assert_eq!(
            avatar.weights_family(),
            Some(crate::domain::trainers::BaseFamily::Flux1Dev)
        );
        let EventSnapshot::Avatar(wan) = written_before("avatar-wan") else {
            panic!("not an avatar")
        };
        assert_eq!(wan.trainer.as_deref(), Some("wan_22_image"));
        assert_eq!(
            wan.weights_family(),
            Some(crate::domain::trainers::BaseFamily::Wan22)
        );
        assert!(wan.high_noise_lora_url.is_some() && wan.high_noise_copy.is_some());
        let EventSnapshot::Batch { batch, jobs } = written_before("batch") else {
            panic!("not a batch")
        };
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|job| job.batch_id == Some(batch.id)));
    }
}
