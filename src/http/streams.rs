//! Event streams (`text/event-stream`): a job's, a batch's, or all of the tenant's events, first
//! those after `Last-Event-ID` (or `?after=`), then each as it becomes visible. An event's SSE
//! `id` is its `sequence`, so a client that reconnects with the last id it saw misses nothing
//! and sees nothing twice. A job's stream ends after the job's last event; a batch's after
//! `batch.completed`; the tenant's does not end.

use super::auth::Tenant;
use super::events::EventView;
use super::extract::{ApiPathId, ApiQuery};
use crate::domain::event::EventType;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::state::AppState;
use crate::store::{Event, EventFilter, NewEvents, Store};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::watch;
use utoipa::IntoParams;
use uuid::Uuid;

/// How often a stream with nothing new looks again unasked. It is woken at once for its
/// tenant's events, made visible in this process or (told by NOTIFY) in another; this bounds
/// how late it is should that news fail.
const LOOK_AGAIN: Duration = Duration::from_secs(2);

/// Events read at a time.
const PAGE: u32 = 100;

/// How long after a job or batch ended without an event telling so (it ended before events
/// were kept) its stream stops waiting for one. Far longer than numbering takes, so that a
/// stream does not end before the last event of a resource that just ended.
const NO_LAST_EVENT_GRACE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Start after this event `sequence` (as `Last-Event-ID` does; the header wins).
    #[param(minimum = 0)]
    #[serde(default, deserialize_with = "super::events::sequence")]
    pub after: Option<i64>,
}

/// Where a stream ends.
#[derive(Debug, Clone, Copy)]
enum End {
    Never,
    AfterJob(Uuid),
    AfterBatch(Uuid),
}

impl End {
    /// The job or batch whose events the stream follows; `None`: all of the tenant's.
    fn resource(self) -> Option<Uuid> {
        match self {
            Self::Never => None,
            Self::AfterJob(id) | Self::AfterBatch(id) => Some(id),
        }
    }

    /// Whether `event` is the last this stream sends.
    fn is_last(self, event: &Event) -> bool {
        match self {
            Self::Never => false,
            Self::AfterJob(job) => {
                event.resource_id == job
                    && matches!(
                        event.kind,
                        EventType::JobSucceeded | EventType::JobFailed | EventType::JobCanceled
                    )
            }
            Self::AfterBatch(batch) => {
                event.resource_id == batch && event.kind == EventType::BatchCompleted
            }
        }
    }

    /// Whether the stream's resource ended before `after`, so nothing more will come: it is
    /// finished, and its last event is at or before `after` (or, for one that ended before
    /// events were kept, there is none a while after it ended).
    async fn passed(self, store: &Store, tenant: Uuid, after: i64) -> ApiResult<bool> {
        let (resource, ended_at, last_kind) = match self {
            Self::Never => return Ok(false),
            Self::AfterJob(id) => {
                let Some(job) = store.get_job(tenant, id).await? else {
                    return Ok(true);
                };
                let Some(at) = job.finished_at.filter(|_| job.status.is_terminal()) else {
                    return Ok(false);
                };
                (id, at, EventType::of_job_status(job.status))
            }
            Self::AfterBatch(id) => {
                let Some((batch, jobs)) = store.get_batch(tenant, id).await? else {
                    return Ok(true);
                };
                if !jobs.iter().all(|job| job.status.is_terminal()) {
                    return Ok(false);
                }
                let at = jobs
                    .iter()
                    .filter_map(|job| job.finished_at)
                    .max()
                    .unwrap_or(batch.created_at);
                (id, at, Some(EventType::BatchCompleted))
            }
        };
        let filter = EventFilter {
            kind: last_kind,
            resource_id: Some(resource),
            after: 0,
            limit: 1,
        };
        Ok(match store.list_events(tenant, &filter).await?.first() {
            Some(last) => last.sequence <= after,
            None => ended_at < crate::domain::now() - NO_LAST_EVENT_GRACE,
        })
    }
}

/// A stream's progress: what it has read and not yet sent, and where it is.
struct Follow {
    store: Store,
    tenant: Uuid,
    filter: EventFilter,
    end: End,
    unsent: VecDeque<Event>,
    visible: NewEvents,
    stopping: watch::Receiver<bool>,
    finished: bool,
}

impl Follow {
    /// The next event to send, waiting for one if need be; `None` ends the stream.
    async fn next(mut self) -> Option<(Result<sse::Event, Infallible>, Self)> {
        loop {
            if let Some(event) = self.unsent.pop_front() {
                self.filter.after = event.sequence;
                if self.end.is_last(&event) {
                    self.finished = true;
                    self.unsent.clear();
                }
                return Some((Ok(sse_event(event)), self));
            }
            if self.finished || *self.stopping.borrow() {
                return None;
            }
            // Marked seen before reading, so that events made visible meanwhile wake the wait.
            self.visible.mark_seen();
            match self.store.list_events(self.tenant, &self.filter).await {
                Ok(events) if !events.is_empty() => {
                    self.unsent.extend(events);
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    // The client reconnects with the last id it saw, and loses nothing.
                    tracing::warn!(%error, "an event stream could not read; ending it");
                    return None;
                }
            }
            match self
                .end
                .passed(&self.store, self.tenant, self.filter.after)
                .await
            {
                Ok(true) => return None,
                Ok(false) => {}
                Err(_) => return None,
            }
            tokio::select! {
                () = self.visible.changed(Some(self.tenant)) => {}
                _ = self.stopping.changed() => {}
                _ = tokio::time::sleep(LOOK_AGAIN) => {}
            }
        }
    }
}

fn sse_event(event: Event) -> sse::Event {
    let id = event.sequence.to_string();
    let kind = event.kind.as_str();
    let view = EventView::from(event);
    let data = serde_json::to_string(&view).unwrap_or_else(|_| "{}".into());
    sse::Event::default().id(id).event(kind).data(data)
}

/// Where the stream starts: `Last-Event-ID` (what a reconnecting client sends), else `after`.
fn start_after(headers: &HeaderMap, query: &StreamQuery) -> ApiResult<i64> {
    let Some(raw) = headers.get("last-event-id") else {
        return Ok(query.after.unwrap_or(0));
    };
    raw.to_str()
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .filter(|after| *after >= 0)
        .ok_or_else(|| {
            ApiError::Validation(vec![FieldError::new(
                "Last-Event-ID",
                "must be the `sequence` of an event (a whole number, 0 or more)",
            )])
        })
}

fn follow(
    state: &AppState,
    tenant: Uuid,
    end: End,
    after: i64,
) -> Sse<impl Stream<Item = Result<sse::Event, Infallible>> + use<>> {
    let start = Follow {
        store: state.store.clone(),
        tenant,
        filter: EventFilter {
            kind: None,
            resource_id: end.resource(),
            after,
            limit: PAGE,
        },
        end,
        unsent: VecDeque::new(),
        visible: state.store.new_events(),
        stopping: state.stopping.clone(),
        finished: false,
    };
    Sse::new(futures_util::stream::unfold(start, Follow::next))
        .keep_alive(KeepAlive::new().interval(state.config.connections.stream_keep_alive))
}

/// Follow a job
///
/// The job's events as a `text/event-stream`: those after `Last-Event-ID` (or `after`), then
/// each as it happens, with keep-alive comments between. Each SSE event has the event's
/// `sequence` as its `id`, its type as its `event`, and the event (as `GET /v1/events/{id}`
/// shows it) as its `data`. The stream ends after the job's last event.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "events",
    params(
        ("id" = Uuid, Path, description = "The job's id."),
        ("Last-Event-ID" = Option<i64>, Header, description = "The `sequence` of the last event received; the stream starts after it."),
        StreamQuery,
    ),
    responses(
        (status = 200, description = "A stream of events; each `data` is an event.", body = EventView, content_type = "text/event-stream"),
        (status = 404, description = "No such job for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, job = %id))]
pub async fn job_events(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>> {
    let after = start_after(&headers, &query)?;
    state
        .store
        .get_job(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    Ok(follow(&state, tenant.id, End::AfterJob(id), after))
}

/// Follow a batch
///
/// The events of the batch and of its jobs, as for a job's stream; ends after
/// `batch.completed`.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}/events",
    tag = "events",
    params(
        ("id" = Uuid, Path, description = "The batch's id."),
        ("Last-Event-ID" = Option<i64>, Header, description = "The `sequence` of the last event received; the stream starts after it."),
        StreamQuery,
    ),
    responses(
        (status = 200, description = "A stream of events; each `data` is an event.", body = EventView, content_type = "text/event-stream"),
        (status = 404, description = "No such batch for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, batch = %id))]
pub async fn batch_events(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>> {
    let after = start_after(&headers, &query)?;
    state
        .store
        .get_batch(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    Ok(follow(&state, tenant.id, End::AfterBatch(id), after))
}

/// Follow every event
///
/// All of the tenant's events, as for a job's stream; the stream does not end.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "events",
    params(
        ("Last-Event-ID" = Option<i64>, Header, description = "The `sequence` of the last event received; the stream starts after it."),
        StreamQuery,
    ),
    responses(
        (status = 200, description = "A stream of events; each `data` is an event.", body = EventView, content_type = "text/event-stream"),
        (status = 422, description = "`after` or `Last-Event-ID` is not an event's sequence.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id))]
pub async fn all_events(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>> {
    let after = start_after(&headers, &query)?;
    Ok(follow(&state, tenant.id, End::Never, after))
}
