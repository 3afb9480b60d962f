//! Event streams (`text/event-stream`): a job's, a batch's, or all of the tenant's events, first
//! those after `Last-Event-ID` (or `?after=`), then each as it becomes visible. An event's SSE
//! `id` is its `sequence`, so a client that reconnects with the last id it saw misses nothing
//! and sees nothing twice. A job's stream ends after the job's last event; a batch's after
//! `batch.completed`; the tenant's does not end.
//!
//! A job's and a batch's stream also carry, between the events, what FAL tells of their jobs
//! while they wait and run: `job.progress` messages with the queue position and new log
//! lines. These are not events: they have no `id` (so `Last-Event-ID` stays on the last event),
//! are not kept, and are read from FAL only while a stream follows the job.

use super::auth::Tenant;
use super::events::EventView;
use super::extract::{ApiPathId, ApiQuery};
use crate::domain::event::EventType;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::fal::progress::{Progress, ProgressReader};
use crate::fal::wire::QueueState;
use crate::state::{AppState, MOST_STREAMS_PER_KEY, StreamSeat};
use crate::store::{Event, EventFilter, EventSnapshot, Job, NewEvents, Store};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// How often a stream with nothing new looks again unasked. It is woken at once for its
/// tenant's events, made visible in this process or (told by NOTIFY) in another; this bounds
/// how late it is should that news fail.
const LOOK_AGAIN: Duration = Duration::from_secs(2);

/// Events read at a time.
const PAGE: u32 = 100;

/// The most jobs whose progress one stream follows at once (a batch's first ones).
const MOST_FOLLOWED: usize = 16;

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

/// A stream's state: what it has read and not yet sent, and where it is.
struct Follow {
    store: Store,
    tenant: Uuid,
    filter: EventFilter,
    end: End,
    unsent: VecDeque<Event>,
    visible: NewEvents,
    stopping: watch::Receiver<bool>,
    finished: bool,
    /// FAL's word on the stream's running jobs.
    progress: RunningJobs,
    /// Woken by FAL's progress alone: there is no new event to look for.
    woken_by_progress: bool,
    /// When the stream last looked for events.
    looked_at: tokio::time::Instant,
    /// Held while the stream is open.
    _seat: StreamSeat,
}

/// What a stream reads of FAL's progress of its jobs.
struct RunningJobs {
    reader: Arc<ProgressReader>,
    /// False for the tenant's stream, which would read every running job of the key's.
    enabled: bool,
    /// Whether this process talks to the emulator: it reads only the jobs sent there.
    sandbox: bool,
    followed: Vec<Followed>,
    unsent: VecDeque<sse::Event>,
}

/// One job whose progress a stream follows, and what it has told of it.
struct Followed {
    job: Uuid,
    progress: watch::Receiver<Progress>,
    lines_sent: usize,
    told: (Option<QueueState>, Option<u64>),
    /// False once FAL said the request completed: there is no more to read, and the job is
    /// not read again (its log would be told twice).
    reading: bool,
}

impl RunningJobs {
    /// Follows or stops following `job`, as it now stands.
    fn consider(&mut self, job: &Job) {
        if !self.enabled {
            return;
        }
        let followed = self.followed.iter().position(|f| f.job == job.id);
        let status_url = job
            .status_url
            .as_deref()
            .filter(|_| job.sandbox == self.sandbox);
        match (followed, status_url) {
            (Some(at), _) if job.status.is_terminal() => {
                self.followed.swap_remove(at);
            }
            (None, Some(url))
                if !job.status.is_terminal() && self.followed.len() < MOST_FOLLOWED =>
            {
                self.followed.push(Followed {
                    job: job.id,
                    progress: self.reader.follow(job.id, url),
                    lines_sent: 0,
                    told: (None, None),
                    reading: true,
                });
            }
            _ => {}
        }
    }

    /// Takes what is new from FAL into `unsent`.
    fn take_news(&mut self) {
        for followed in self.followed.iter_mut().filter(|f| f.reading) {
            if let Some(news) = followed.news() {
                let data = serde_json::to_string(&StreamMessage::Progress(news))
                    .unwrap_or_else(|_| "{}".into());
                self.unsent
                    .push_back(sse::Event::default().event(JOB_PROGRESS).data(data));
            }
            followed.reading = followed.progress.has_changed().is_ok();
        }
    }

    /// Waits until FAL's word on some followed job changes (forever when none is read).
    async fn changed(&mut self) {
        let changes: Vec<_> = self
            .followed
            .iter_mut()
            .filter(|followed| followed.reading)
            .map(|followed| Box::pin(followed.progress.changed()))
            .collect();
        if changes.is_empty() {
            return std::future::pending().await;
        }
        let _ = futures_util::future::select_all(changes).await;
    }
}

impl Followed {
    /// What the stream has not yet told of the job, if anything.
    fn news(&mut self) -> Option<JobProgress> {
        let progress = self.progress.borrow_and_update();
        let state = progress.state.clone()?;
        let told = (Some(state.clone()), progress.queue_position);
        let (lines, skipped) = progress.lines_from(self.lines_sent);
        if lines.is_empty() && told == self.told {
            return None;
        }
        let news = JobProgress {
            job_id: self.job,
            fal_status: state.as_str().to_ascii_lowercase(),
            queue_position: progress.queue_position,
            logs: lines
                .iter()
                .map(|line| LogLineView {
                    timestamp: line.timestamp.clone(),
                    level: line.level.clone(),
                    message: line.message.clone(),
                })
                .collect(),
            logs_skipped: skipped,
        };
        self.lines_sent = progress.lines_read;
        self.told = told;
        Some(news)
    }
}

/// The SSE `event` of a progress message.
const JOB_PROGRESS: &str = "job.progress";

/// What FAL tells of a job while it waits and runs: the `data` of a `job.progress` message
/// of a job's or a batch's stream. Not an event: it has no `id`, is not kept, and is not
/// sent to webhooks.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobProgress {
    pub job_id: Uuid,
    /// FAL's word for the request, in lower case: `in_queue`, `in_progress` or `completed`
    /// (FAL's request is done; the job's outcome comes as its event).
    #[schema(example = "in_queue")]
    pub fal_status: String,
    /// The job's place in FAL's queue (0 is next), while it waits there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// The log lines FAL gave since this stream's last message for the job; a stream's first
    /// message for a job carries the log so far.
    pub logs: Vec<LogLineView>,
    /// Lines left out before `logs` because more came than falgate keeps (the last 1,000
    /// of a job) while this stream was behind.
    pub logs_skipped: usize,
}

/// The `data` of a message of a job's or a batch's stream: an event (the SSE `event` is its
/// type and the SSE `id` its `sequence`), or FAL's progress of one of the jobs (SSE `event`
/// `job.progress`, no `id`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StreamMessage {
    Event(EventView),
    Progress(JobProgress),
}

/// One line of a job's log at FAL, as FAL gave it.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogLineView {
    /// When FAL wrote the line, as FAL gave it (it sends no time zone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    pub message: String,
}

impl Follow {
    /// The next message to send, waiting for one if need be; `None` ends the stream.
    async fn next(mut self) -> Option<(Result<sse::Event, Infallible>, Self)> {
        loop {
            // What FAL said goes before the events read with it: a job's last log lines come
            // before the event that ends it.
            if let Some(message) = self.progress.unsent.pop_front() {
                return Some((Ok(message), self));
            }
            if let Some(event) = self.unsent.pop_front() {
                self.filter.after = event.sequence;
                if let EventSnapshot::Job(job) = &event.snapshot {
                    self.progress.consider(job);
                }
                if self.end.is_last(&event) {
                    self.finished = true;
                    self.unsent.clear();
                }
                return Some((Ok(sse_event(event)), self));
            }
            if self.finished || *self.stopping.borrow() {
                return None;
            }
            self.progress.take_news();
            let progress_only = std::mem::take(&mut self.woken_by_progress);
            if progress_only && self.looked_at.elapsed() < LOOK_AGAIN {
                // News of events that came meanwhile is still unseen, and wakes the wait below.
                if !self.progress.unsent.is_empty() {
                    continue;
                }
            } else if !self.look_for_events().await {
                return None;
            } else if !self.unsent.is_empty() || !self.progress.unsent.is_empty() {
                continue;
            }
            tokio::select! {
                () = self.visible.changed(Some(self.tenant)) => {}
                _ = self.stopping.changed() => {}
                () = self.progress.changed() => self.woken_by_progress = true,
                _ = tokio::time::sleep(LOOK_AGAIN) => {}
            }
        }
    }

    /// Reads the events that became visible into `unsent`; false when the stream ends (its
    /// resource has passed, or the events could not be read).
    async fn look_for_events(&mut self) -> bool {
        // Marked seen before reading, so that events made visible meanwhile wake the wait.
        self.visible.mark_seen();
        self.looked_at = tokio::time::Instant::now();
        match self.store.list_events(self.tenant, &self.filter).await {
            Ok(events) if !events.is_empty() => {
                self.unsent.extend(events);
                return true;
            }
            Ok(_) => {}
            Err(error) => {
                // The client reconnects with the last id it saw, and loses nothing.
                tracing::warn!(%error, "an event stream could not read; ending it");
                return false;
            }
        }
        let passed = self
            .end
            .passed(&self.store, self.tenant, self.filter.after)
            .await;
        matches!(passed, Ok(false))
    }
}

fn sse_event(event: Event) -> sse::Event {
    let id = event.sequence.to_string();
    let kind = event.kind.as_str();
    let message = StreamMessage::Event(EventView::from(event));
    let data = serde_json::to_string(&message).unwrap_or_else(|_| "{}".into());
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

/// The stream of `tenant`'s events after `after` that `end` selects; `running` are the jobs
/// whose progress it reads from the start (more are followed as their events pass).
fn follow(
    state: &AppState,
    tenant: Uuid,
    end: End,
    after: i64,
    running: &[Job],
) -> ApiResult<Sse<impl Stream<Item = Result<sse::Event, Infallible>> + use<>>> {
    let seat = state.streams.take(tenant).ok_or_else(|| ApiError::TooMany {
        code: "too_many_streams",
        detail: format!(
            "this API key has {MOST_STREAMS_PER_KEY} event streams open here already; close one first"
        ),
    })?;
    let mut progress = RunningJobs {
        reader: state.progress.clone(),
        enabled: end.resource().is_some(),
        sandbox: state.sandbox(),
        followed: Vec::new(),
        unsent: VecDeque::new(),
    };
    for job in running {
        progress.consider(job);
    }
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
        progress,
        woken_by_progress: false,
        looked_at: tokio::time::Instant::now(),
        _seat: seat,
    };
    Ok(Sse::new(futures_util::stream::unfold(start, Follow::next))
        .keep_alive(KeepAlive::new().interval(state.config.connections.stream_keep_alive)))
}

/// Follow a job
///
/// The job's events as a `text/event-stream`: those after `Last-Event-ID` (or `after`), then
/// each as it happens, with keep-alive comments between. Each SSE event has the event's
/// `sequence` as its `id`, its type as its `event`, and the event (as `GET /v1/events/{id}`
/// shows it) as its `data`. The stream ends after the job's last event.
///
/// While the job waits and runs at FAL, `job.progress` messages come between the events: its
/// place in FAL's queue and its new log lines, as FAL tells them (read about every
/// `FALGATE_STREAM_PROGRESS_MS`). They have no `id` and are not kept; a stream's first one
/// carries the job's log so far.
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
        (status = 200, description = "A stream of events and progress messages.", body = StreamMessage, content_type = "text/event-stream"),
        (status = 404, description = "No such job for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This API key has 32 streams open in this process already.", body = Problem, content_type = "application/problem+json"),
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
    let job = state
        .store
        .get_job(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    follow(&state, tenant.id, End::AfterJob(id), after, &[job])
}

/// Follow a batch
///
/// The events of the batch and of its jobs, as for a job's stream, with the `job.progress`
/// of its running jobs (the first 16 followed at once); ends after `batch.completed`.
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
        (status = 200, description = "A stream of events and progress messages.", body = StreamMessage, content_type = "text/event-stream"),
        (status = 404, description = "No such batch for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This API key has 32 streams open in this process already.", body = Problem, content_type = "application/problem+json"),
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
    let (_, jobs) = state
        .store
        .get_batch(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    follow(&state, tenant.id, End::AfterBatch(id), after, &jobs)
}

/// Follow every event
///
/// All of the tenant's events, as for a job's stream (without `job.progress`: follow a job
/// or a batch for that); the stream does not end.
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
        (status = 429, description = "This API key has 32 streams open in this process already.", body = Problem, content_type = "application/problem+json"),
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
    follow(&state, tenant.id, End::Never, after, &[])
}
