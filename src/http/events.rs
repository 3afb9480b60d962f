//! `/v1/events`: what happened to the tenant's jobs, avatars and batches, in the order it
//! happened, each event numbered (`sequence`) so that a client can ask for everything after
//! the last one it saw.

use super::auth::Tenant;
use super::avatars::AvatarView;
use super::extract::{ApiPathId, ApiQuery};
use super::generations::BatchView;
use super::jobs::JobView;
use crate::domain::event::EventType;
use crate::error::{ApiError, ApiResult, Problem};
use crate::state::AppState;
use crate::store::{Event, EventFilter, EventSnapshot};
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// One change to a job, an avatar or a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The tenant's count of events up to this one: 1 for its first, then one more for each,
    /// with no gap. Pass the last one seen as `after` to get what came since.
    pub sequence: i64,
    pub created_at: DateTime<Utc>,
    /// The resource as it was when the event happened, shown as its own endpoint shows it: a
    /// job for `job.*`, an avatar for `avatar.*`, a batch with its jobs for `batch.*`, the
    /// endpoint tried for `webhook_endpoint.test`.
    pub data: EventData,
}

/// The resource an event carries.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EventData {
    Job(Box<JobView>),
    Avatar(Box<AvatarView>),
    Batch(Box<BatchView>),
    WebhookEndpoint(WebhookEndpointTested),
}

/// The endpoint a `webhook_endpoint.test` event tries.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointTested {
    pub id: Uuid,
    pub url: String,
    pub description: String,
}

impl From<Event> for EventView {
    fn from(event: Event) -> Self {
        let data = match event.snapshot {
            EventSnapshot::Job(job) => EventData::Job(Box::new(JobView::from(*job))),
            EventSnapshot::Avatar(avatar) => EventData::Avatar(Box::new(AvatarView::from(*avatar))),
            EventSnapshot::Batch { batch, jobs } => {
                EventData::Batch(Box::new(BatchView::new(batch, jobs)))
            }
            EventSnapshot::WebhookEndpoint(endpoint) => {
                EventData::WebhookEndpoint(WebhookEndpointTested {
                    id: endpoint.id,
                    url: endpoint.url,
                    description: endpoint.description,
                })
            }
        };
        Self {
            id: event.id,
            kind: event.kind,
            sequence: event.sequence,
            created_at: event.created_at,
            data,
        }
    }
}

/// An event as its webhook's body: as `GET /v1/events/{id}` shows it.
pub fn webhook_body(event: Event) -> String {
    serde_json::to_string(&EventView::from(event)).unwrap_or_else(|_| "{}".into())
}

/// A page of events, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<EventView>,
    /// Whether more events follow: ask again with `after` the last item's `sequence`.
    pub has_more: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListEventsQuery {
    /// Only events numbered above this (default 0: from the first).
    #[param(minimum = 0)]
    #[serde(default, deserialize_with = "sequence")]
    pub after: Option<i64>,
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub kind: Option<EventType>,
    /// Only the events of this job, avatar or batch (a batch's include its jobs').
    pub resource_id: Option<Uuid>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    #[serde(default, deserialize_with = "super::paging::page_limit")]
    pub limit: Option<u32>,
}

pub(super) fn sequence<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match <Option<i64> as Deserialize>::deserialize(d)? {
        Some(after) if after < 0 => Err(serde::de::Error::custom("must be 0 or more")),
        after => Ok(after),
    }
}

/// List events
///
/// The tenant's events in the order they happened, from the first or from after `after`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(ListEventsQuery),
    responses(
        (status = 200, description = "A page of events, oldest first.", body = EventPage),
        (status = 422, description = "A query parameter is invalid.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id))]
pub async fn list_events(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(query): ApiQuery<ListEventsQuery>,
) -> ApiResult<Json<EventPage>> {
    let limit = query.limit.unwrap_or(super::paging::DEFAULT_PAGE);
    let filter = EventFilter {
        kind: query.kind,
        resource_id: query.resource_id,
        after: query.after.unwrap_or(0),
        // One more than asked tells whether another page follows.
        limit: limit + 1,
    };
    let mut events = state.store.list_events(tenant.id, &filter).await?;
    let has_more = events.len() > limit as usize;
    events.truncate(limit as usize);
    Ok(Json(EventPage {
        items: events.into_iter().map(EventView::from).collect(),
        has_more,
    }))
}

/// Get an event
#[utoipa::path(
    get,
    path = "/v1/events/{id}",
    tag = "events",
    params(("id" = Uuid, Path, description = "The event's id.")),
    responses(
        (status = 200, description = "The event.", body = EventView),
        (status = 404, description = "No such event for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, event = %id))]
pub async fn get_event(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<EventView>> {
    let event = state
        .store
        .get_event(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no event {id}")))?;
    Ok(Json(event.into()))
}
