//! Webhook deliveries: one event to send to one endpoint, planned from the events as they
//! become visible, claimed under a lease (so replicas share them and a dead process's are
//! taken over), attempted until a 2xx or the last attempt, every attempt kept.

use super::db::Tx;
use super::events::Event;
use super::webhook_endpoints::{WebhookEndpoint, endpoint_by_id};
use super::{Store, StoreResult};
use crate::domain::event::EventType;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Endpoints planned by one transaction at most, and events planned per endpoint.
const ENDPOINTS_PER_PLAN: i64 = 16;
const EVENTS_PER_PLAN: i64 = 500;

/// An endpoint with events to plan: its id, tenant, types, next event number, the resource it
/// was given for (if it was given with a request), and its tenant's last event number.
type EndpointToPlan = (Uuid, Uuid, Option<String>, i64, Option<Uuid>, i64);

/// An event as planning reads it: id, type, sequence, resource, batch.
type EventToPlan = (Uuid, String, i64, Uuid, Option<Uuid>);

/// A claimed delivery with what sending it needs.
#[derive(Debug, Clone)]
pub struct DeliveryWork {
    pub id: Uuid,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub event: Event,
    pub endpoint: WebhookEndpoint,
}

/// How an attempt went, and so what becomes of its delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    Succeeded,
    /// Tried again at this time.
    RetryAt(DateTime<Utc>),
    /// The last attempt failed.
    Failed,
    /// The receiver answered 410 Gone: the delivery fails and its endpoint is disabled.
    Gone,
}

/// One attempt, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookAttempt {
    pub id: Uuid,
    pub delivery_id: Uuid,
    pub event_id: Uuid,
    pub at: DateTime<Utc>,
    pub duration_ms: i64,
    pub status_code: Option<i32>,
    /// Why no answer came (a refused address, a timeout, a reset).
    pub error: Option<String>,
    /// The start of the answer's body.
    pub response_start: Option<String>,
    /// Where its delivery stands now: `pending`, `succeeded` or `failed`.
    pub delivery_status: String,
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    id: Uuid,
    delivery_id: Uuid,
    event_id: Uuid,
    at: DateTime<Utc>,
    duration_ms: i64,
    status_code: Option<i32>,
    error: Option<String>,
    response_start: Option<String>,
    delivery_status: String,
}

impl From<AttemptRow> for WebhookAttempt {
    fn from(row: AttemptRow) -> Self {
        Self {
            id: row.id,
            delivery_id: row.delivery_id,
            event_id: row.event_id,
            at: row.at,
            duration_ms: row.duration_ms,
            status_code: row.status_code,
            error: row.error,
            response_start: row.response_start,
            delivery_status: row.delivery_status,
        }
    }
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: Uuid,
    tenant: Uuid,
    endpoint_id: Uuid,
    event_id: Uuid,
    attempts: i32,
}

impl Store {
    /// Plans deliveries for the events that became visible since each endpoint was last
    /// planned, for a page of endpoints; answers whether the page was full (more endpoints may
    /// be waiting). Endpoints being planned by another process are passed over.
    pub async fn plan_webhook_deliveries(&self, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.writer().begin().await?;
        let endpoints: Vec<EndpointToPlan> = tx
            .conn()
            .fetch_all(
                self.dialect().endpoints_to_plan,
                &[ENDPOINTS_PER_PLAN.into()],
            )
            .await?;
        let full = endpoints.len() as i64 == ENDPOINTS_PER_PLAN;
        for (endpoint_id, tenant, types, next_sequence, bound_to, last_sequence) in endpoints {
            let wanted: Option<Vec<EventType>> =
                types.map(|joined| joined.split(',').filter_map(|t| t.parse().ok()).collect());
            // An endpoint given with a request reads its resource's events alone (by index),
            // not every event of its tenant's since it was made.
            let events: Vec<EventToPlan> = match bound_to {
                None => {
                    tx.conn()
                        .fetch_all(
                            "SELECT id, type, sequence, resource_id, batch_id FROM events \
                             WHERE tenant = $1 AND sequence >= $2 AND sequence <= $3 \
                             ORDER BY sequence LIMIT $4",
                            &[
                                tenant.into(),
                                next_sequence.into(),
                                last_sequence.into(),
                                EVENTS_PER_PLAN.into(),
                            ],
                        )
                        .await?
                }
                Some(resource) => {
                    tx.conn()
                        .fetch_all(
                            "SELECT id, type, sequence, resource_id, batch_id FROM events \
                             WHERE (resource_id = $1 OR batch_id = $1) \
                             AND sequence >= $2 AND sequence <= $3 \
                             ORDER BY sequence LIMIT $4",
                            &[
                                resource.into(),
                                next_sequence.into(),
                                last_sequence.into(),
                                EVENTS_PER_PLAN.into(),
                            ],
                        )
                        .await?
                }
            };
            // Every event up to the tenant's last number was visible when it was read (a number
            // is given and shown in one commit), so a page that is not full covers them all.
            let planned_to = match events.last() {
                Some((_, _, sequence, _, _)) if events.len() as i64 == EVENTS_PER_PLAN => *sequence,
                _ => last_sequence,
            };
            let mut resource_ended = false;
            for (event_id, kind, _, resource, batch) in &events {
                let kind = kind.parse::<EventType>();
                // An endpoint given with a request takes its resource's events alone.
                if let Some(bound) = bound_to {
                    if *resource != bound && *batch != Some(bound) {
                        continue;
                    }
                    resource_ended |= *resource == bound && kind.as_ref().is_ok_and(ends_resource);
                }
                let wants = match (&wanted, kind) {
                    // A test event goes to the endpoint it tests alone.
                    (_, Ok(EventType::WebhookEndpointTest)) => *resource == endpoint_id,
                    (None, _) => true,
                    (Some(wanted), Ok(kind)) => wanted.contains(&kind),
                    (Some(_), Err(_)) => false,
                };
                if wants {
                    insert_delivery(&mut tx, tenant, endpoint_id, *event_id, now).await?;
                }
            }
            // An endpoint given with a request is finished once its resource has ended: nothing
            // more will come for it, and planning need not look at it again.
            tx.conn()
                .execute(
                    "UPDATE webhook_endpoints SET next_sequence = $2, \
                     finished = finished OR $3 WHERE id = $1",
                    &[
                        endpoint_id.into(),
                        (planned_to + 1).into(),
                        resource_ended.into(),
                    ],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(full)
    }

    /// Sends `event` again to every enabled endpoint of its tenant that takes its type, as new
    /// deliveries (with the event's id as their `webhook-id`, as before); answers how many
    /// were made, and how many endpoints were passed over because the event is being sent to
    /// them already.
    pub async fn redeliver_event(
        &self,
        event: &Event,
        now: DateTime<Utc>,
    ) -> StoreResult<(usize, usize)> {
        let endpoints = self.list_webhook_endpoints(event.tenant).await?;
        let mut tx = self.writer().begin().await?;
        let (mut planned, mut under_way) = (0, 0);
        let takes = |endpoint: &&WebhookEndpoint| match event.kind {
            EventType::WebhookEndpointTest => endpoint.id == event.resource_id,
            kind => endpoint.wants(kind),
        };
        for endpoint in endpoints.iter().filter(|e| e.enabled).filter(takes) {
            if insert_delivery(&mut tx, event.tenant, endpoint.id, event.id, now).await? {
                planned += 1;
            } else {
                under_way += 1;
            }
        }
        tx.commit().await?;
        Ok((planned, under_way))
    }

    /// Claims up to `limit` due deliveries of enabled endpoints until `lease_until`, counting
    /// the attempt each is about to make.
    pub async fn claim_webhook_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<DeliveryWork>> {
        let claimed: Vec<ClaimedRow> = {
            let mut tx = self.writer().begin().await?;
            let rows = tx
                .conn()
                .fetch_all(
                    self.dialect().claim_deliveries,
                    &[now.into(), lease_until.into(), limit.into()],
                )
                .await?;
            tx.commit().await?;
            rows
        };
        let mut work = Vec::with_capacity(claimed.len());
        for row in claimed {
            let (Some(event), Some(endpoint)) = (
                self.get_event(row.tenant, row.event_id).await?,
                endpoint_by_id(self, row.endpoint_id).await?,
            ) else {
                // Deleted meanwhile: nothing to send.
                continue;
            };
            work.push(DeliveryWork {
                id: row.id,
                attempt: row.attempts,
                event,
                endpoint,
            });
        }
        Ok(work)
    }

    /// Records an attempt and what it means for its delivery (and, on a 410, its endpoint).
    pub async fn record_webhook_attempt(
        &self,
        work: &DeliveryWork,
        attempt: &WebhookAttempt,
        outcome: &DeliveryOutcome,
    ) -> StoreResult<()> {
        let (status, next_attempt_at) = match outcome {
            DeliveryOutcome::Succeeded => ("succeeded", None),
            DeliveryOutcome::RetryAt(at) => ("pending", Some(*at)),
            DeliveryOutcome::Failed | DeliveryOutcome::Gone => ("failed", None),
        };
        let mut tx = self.writer().begin().await?;
        tx.conn()
            .execute(
                "INSERT INTO webhook_attempts (id, delivery_id, endpoint_id, event_id, at, \
                 duration_ms, status_code, error, response_start) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    attempt.id.into(),
                    work.id.into(),
                    work.endpoint.id.into(),
                    work.event.id.into(),
                    attempt.at.into(),
                    attempt.duration_ms.into(),
                    attempt.status_code.into(),
                    attempt.error.as_deref().into(),
                    attempt.response_start.as_deref().into(),
                ],
            )
            .await?;
        tx.conn()
            .execute(
                "UPDATE webhook_deliveries SET status = $2, next_attempt_at = $3, \
                 lease_until = NULL, updated_at = $4 \
                 WHERE id = $1 AND status = 'pending' AND attempts = $5",
                &[
                    work.id.into(),
                    status.into(),
                    next_attempt_at.into(),
                    attempt.at.into(),
                    work.attempt.into(),
                ],
            )
            .await?;
        if *outcome == DeliveryOutcome::Gone {
            tx.conn()
                .execute(
                    "UPDATE webhook_endpoints SET enabled = FALSE, disabled_reason = $2, \
                     updated_at = $3 WHERE id = $1",
                    &[
                        work.endpoint.id.into(),
                        "the receiver answered 410 Gone".into(),
                        attempt.at.into(),
                    ],
                )
                .await?;
            fail_pending_deliveries(&mut tx, work.endpoint.id, attempt.at).await?;
        }
        tx.commit().await
    }

    /// Gives back a claimed delivery unsent, due at `due`, its claim not counted as an attempt.
    pub async fn put_back_webhook_delivery(
        &self,
        work: &DeliveryWork,
        due: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.writer()
            .execute(
                "UPDATE webhook_deliveries SET lease_until = NULL, next_attempt_at = $3, \
                 attempts = attempts - 1 \
                 WHERE id = $1 AND status = 'pending' AND attempts = $2",
                &[work.id.into(), work.attempt.into(), due.into()],
            )
            .await?;
        Ok(())
    }

    /// The endpoint's latest attempts, newest first.
    pub async fn list_webhook_attempts(
        &self,
        endpoint_id: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<WebhookAttempt>> {
        let rows: Vec<AttemptRow> = self
            .fetch_all(
                "SELECT a.id, a.delivery_id, a.event_id, a.at, a.duration_ms, a.status_code, \
                 a.error, a.response_start, d.status AS delivery_status \
                 FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
                 WHERE a.endpoint_id = $1 ORDER BY a.id DESC LIMIT $2",
                &[endpoint_id.into(), i64::from(limit).into()],
            )
            .await?;
        Ok(rows.into_iter().map(WebhookAttempt::from).collect())
    }
}

/// Plans the delivery of an event to an endpoint; `false` when one is already under way (an
/// event is being sent to an endpoint once at most).
async fn insert_delivery(
    tx: &mut Tx,
    tenant: Uuid,
    endpoint_id: Uuid,
    event_id: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<bool> {
    let inserted = tx
        .conn()
        .execute(
            "INSERT INTO webhook_deliveries (id, tenant, endpoint_id, event_id, status, \
             attempts, next_attempt_at, lease_until, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'pending', 0, $5, NULL, $5, $5) \
             ON CONFLICT DO NOTHING",
            &[
                Uuid::now_v7().into(),
                tenant.into(),
                endpoint_id.into(),
                event_id.into(),
                now.into(),
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// Whether an event of this type is the last its resource has.
fn ends_resource(kind: &EventType) -> bool {
    matches!(
        kind,
        EventType::JobSucceeded
            | EventType::JobFailed
            | EventType::JobCanceled
            | EventType::BatchCompleted
    )
}

/// Fails the deliveries an endpoint still had to make, as it is disabled: they are not sent
/// later (an endpoint enabled again takes the events from then on), and no claim walks them.
pub(super) async fn fail_pending_deliveries(
    tx: &mut Tx,
    endpoint_id: Uuid,
    at: DateTime<Utc>,
) -> StoreResult<()> {
    tx.conn()
        .execute(
            "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, \
             lease_until = NULL, updated_at = $2 WHERE endpoint_id = $1 AND status = 'pending'",
            &[endpoint_id.into(), at.into()],
        )
        .await?;
    Ok(())
}
