//! `/v1/jobs`: raw FAL jobs through the durable pipeline, and the one view of every job.

use super::auth::Tenant;
use super::extract::{ApiJson, ApiPathId, ApiQuery};
use super::idempotency::{self, MaybeIdempotencyKey, Replayable};
use super::paging::Keyset;
use super::webhook_endpoints::{RequestWebhook, check_request_webhook};
use crate::domain::endpoint::EndpointId;
use crate::domain::job::{Decision, EventSource, JobEvent, JobKind, JobStatus};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::state::AppState;
use crate::store::{Job, JobEventRecord, JobFilter, NewJob, Transition};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// A raw job: an allow-listed FAL endpoint and the input to send it, verbatim.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJobRequest {
    #[schema(schema_with = super::spec::endpoint)]
    pub endpoint: String,
    /// The model input, a JSON object, sent to FAL as given.
    #[schema(value_type = Object, example = json!({"prompt": "a lighthouse at dawn"}))]
    #[serde(deserialize_with = "json_object")]
    pub input: Value,
    /// A webhook for this job's events alone.
    pub webhook: Option<RequestWebhook>,
}

impl super::extract::AcrossFields for CreateJobRequest {
    /// The endpoint against this server's allow-list.
    fn across_fields(body: &serde_json::Map<String, Value>, state: &AppState) -> Vec<FieldError> {
        match body.get("endpoint").and_then(Value::as_str) {
            Some(raw) => parse_allowed_endpoint(state, raw)
                .err()
                .into_iter()
                .collect(),
            None => Vec::new(),
        }
    }
}

/// Refused while parsing, not after, so that it is reported along with the other fields'
/// errors.
fn json_object<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
    let value = Value::deserialize(deserializer)?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(serde::de::Error::custom("must be a JSON object"))
    }
}

/// Why a job failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobErrorView {
    /// A stable code (`fal_validation`, `fal_unauthorized`, `deadline_exceeded`, …).
    pub code: String,
    pub message: String,
    /// FAL's own error detail, verbatim, when it gave one.
    #[schema(value_type = Option<Object>)]
    pub detail: Option<Value>,
}

/// A job, as every endpoint shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub kind: JobKind,
    pub status: JobStatus,
    pub endpoint: String,
    pub avatar_id: Option<Uuid>,
    /// The exact input sent (or to be sent) to FAL.
    #[schema(value_type = Object)]
    pub input: Value,
    /// FAL's request id, once FAL accepted the job.
    pub fal_request_id: Option<String>,
    /// Position in FAL's queue when last seen (0 is next).
    pub queue_position: Option<i64>,
    /// FAL's output, verbatim, once the job succeeded.
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<JobErrorView>,
    /// For a generation that succeeded: every image FAL returned, with its seed and NSFW flags.
    pub output: Option<GenerationOutput>,
    /// The generation batch the job belongs to.
    pub batch_id: Option<Uuid>,
    /// How many times the job was sent to FAL.
    pub attempts: i32,
    /// When a client asked for the job to be cancelled, if it did.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// True when the job ran against the built-in FAL emulator, not FAL.
    pub sandbox: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One generated image, as FAL described it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageView {
    pub url: String,
    pub width: Option<u64>,
    pub height: Option<u64>,
    pub content_type: Option<String>,
}

/// What a generation produced, read from FAL's output.
#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationOutput {
    pub images: Vec<ImageView>,
    #[schema(schema_with = super::spec::seed_response)]
    pub seed: Option<String>,
    /// One flag per image, as FAL returned them.
    pub has_nsfw_concepts: Vec<bool>,
}

impl GenerationOutput {
    fn read(result: &Value) -> Option<Self> {
        // Most endpoints answer a list of `images`; Wan 2.2's, which draws one, an `image`.
        let images = match (result.get("images"), result.get("image")) {
            (Some(images), _) => images.as_array()?.as_slice(),
            (None, Some(image)) => std::slice::from_ref(image),
            (None, None) => return None,
        };
        Some(Self {
            images: images
                .iter()
                .filter_map(|image| {
                    Some(ImageView {
                        url: image.get("url")?.as_str()?.to_owned(),
                        width: image.get("width").and_then(Value::as_u64),
                        height: image.get("height").and_then(Value::as_u64),
                        content_type: image
                            .get("content_type")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                    })
                })
                .collect(),
            // Decimal digits, exact whatever the client's number type; a seed that is not a
            // non-negative integer is not one a client could send back, so it is left out.
            seed: result
                .get("seed")
                .and_then(Value::as_u64)
                .map(|s| s.to_string()),
            has_nsfw_concepts: result
                .get("has_nsfw_concepts")
                .and_then(Value::as_array)
                .map(|flags| flags.iter().filter_map(Value::as_bool).collect())
                .unwrap_or_default(),
        })
    }
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        let output = match (&job.kind, &job.result) {
            (JobKind::Generation, Some(result)) => GenerationOutput::read(result),
            _ => None,
        };
        Self {
            output,
            batch_id: job.batch_id,
            id: job.id,
            kind: job.kind,
            status: job.status,
            endpoint: job.endpoint,
            avatar_id: job.avatar_id,
            input: job.input,
            fal_request_id: job.fal_request_id,
            queue_position: job.queue_position,
            result: job.result,
            error: job.error.map(|e| JobErrorView {
                code: e.code.as_str().to_owned(),
                message: e.message,
                detail: e.detail,
            }),
            attempts: job.attempts,
            cancel_requested_at: job.cancel_requested_at,
            sandbox: job.sandbox,
            created_at: job.created_at,
            updated_at: job.updated_at,
            submitted_at: job.submitted_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
        }
    }
}

/// One line of a job's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobEventView {
    pub at: DateTime<Utc>,
    /// The state before (absent for the job's creation).
    pub from: Option<JobStatus>,
    pub to: JobStatus,
    pub source: EventSource,
    #[schema(value_type = Option<Object>)]
    pub detail: Option<Value>,
}

impl From<JobEventRecord> for JobEventView {
    fn from(event: JobEventRecord) -> Self {
        Self {
            at: event.at,
            from: event.from,
            to: event.to,
            source: event.source,
            detail: event.detail,
        }
    }
}

/// A job with its history.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobView,
    pub events: Vec<JobEventView>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    pub items: Vec<JobView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListJobsQuery {
    /// Only jobs of this kind.
    pub kind: Option<JobKind>,
    /// Only jobs in this state.
    pub status: Option<JobStatus>,
    /// Only jobs of this avatar.
    pub avatar_id: Option<Uuid>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    #[serde(default, deserialize_with = "super::paging::page_limit")]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    #[serde(default, deserialize_with = "super::paging::job_cursor")]
    pub cursor: Option<String>,
}

/// Create a raw job
///
/// Stores the job as `pending` and answers at once; the dispatcher forwards it to FAL.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = CreateJobRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "Makes retries safe: the same key and body replay the first response."),
    ),
    responses(
        (status = 202, description = "The job was stored and will be sent to FAL.", body = JobView),
        (status = 400, description = "The body is not JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The Idempotency-Key is in use by a request still running.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over the size limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not sent as JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The endpoint is not allowed, the input is not an object, or the Idempotency-Key was used for another request.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id))]
pub async fn create_job(
    State(state): State<AppState>,
    tenant: Tenant,
    idempotency_key: MaybeIdempotencyKey,
    body: ApiJson<CreateJobRequest>,
) -> ApiResult<Response> {
    let ApiJson {
        value: request,
        canonical,
    } = body;
    let mut problems = Vec::new();
    let endpoint = parse_allowed_endpoint(&state, &request.endpoint)
        .map_err(|error| problems.push(error))
        .ok();
    let webhook = check_request_webhook(&state, request.webhook, &mut problems).await?;
    let Some(endpoint) = endpoint.filter(|_| problems.is_empty()) else {
        return Err(ApiError::Validation(problems));
    };
    let store = state.store.clone();
    idempotency::run_once(
        &store,
        tenant.id,
        idempotency_key,
        "POST /v1/jobs",
        &canonical,
        |scope| async move {
            let new = NewJob {
                id: Uuid::now_v7(),
                tenant: tenant.id,
                kind: JobKind::Raw,
                avatar_id: None,
                batch_id: None,
                endpoint: endpoint.to_string(),
                input: request.input,
                sandbox: state.sandbox(),
                idempotency_key: scope.key().map(str::to_owned),
                created_at: crate::domain::now(),
            };
            let response =
                Replayable::new(StatusCode::ACCEPTED, &JobView::from(new.to_pending_job()))?;
            let webhook = match webhook {
                Some(webhook) => Some(webhook.for_resource(&state, tenant.id, new.id).await?),
                None => None,
            };
            state
                .store
                .create_jobs(vec![new], scope.completion(&response)?, webhook)
                .await?;
            state.wake.dispatcher.notify_one();
            Ok(response)
        },
    )
    .await
}

fn parse_allowed_endpoint(state: &AppState, raw: &str) -> Result<EndpointId, FieldError> {
    let endpoint: EndpointId = raw
        .parse()
        .map_err(|e| FieldError::new("endpoint", format!("`{raw}` {e}")))?;
    if !state.config.allowed_endpoints.contains(&endpoint) {
        let allowed: Vec<&str> = state
            .config
            .allowed_endpoints
            .iter()
            .map(EndpointId::as_str)
            .collect();
        return Err(FieldError::new(
            "endpoint",
            format!(
                "`{raw}` is not allowed here; allowed: {}",
                allowed.join(", ")
            ),
        ));
    }
    Ok(endpoint)
}

/// List jobs
///
/// The caller's jobs, newest first, with keyset pagination.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListJobsQuery),
    responses(
        (status = 200, description = "A page of jobs.", body = JobPage),
        (status = 422, description = "A query parameter is invalid.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id))]
pub async fn list_jobs(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(query): ApiQuery<ListJobsQuery>,
) -> ApiResult<Json<JobPage>> {
    let keyset = Keyset::parse(super::paging::JOBS, query.limit, query.cursor.as_deref())?;
    let filter = JobFilter {
        kind: query.kind,
        status: query.status,
        avatar_id: query.avatar_id,
        after: keyset.after,
        limit: keyset.fetch_limit(),
    };
    let jobs = state.store.list_jobs(tenant.id, &filter).await?;
    let (jobs, next_cursor) = keyset.page(jobs, |job| job.id);
    Ok(Json(JobPage {
        items: jobs.into_iter().map(JobView::from).collect(),
        next_cursor,
    }))
}

/// Get a job
///
/// The job with its full history.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The job.", body = JobDetail),
        (status = 404, description = "No such job for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, job = %id))]
pub async fn get_job(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<JobDetail>> {
    let job = find_job(&state, &tenant, id).await?;
    let events = state.store.job_events(job.id).await?;
    Ok(Json(JobDetail {
        job: job.into(),
        events: events.into_iter().map(JobEventView::from).collect(),
    }))
}

async fn find_job(state: &AppState, tenant: &Tenant, id: Uuid) -> ApiResult<Job> {
    state
        .store
        .get_job(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))
}

/// Cancel a job
///
/// A pending job is cancelled at once, unless a submit of it may have reached FAL (its answer
/// was lost): then, like a job already with FAL, it keeps its state until FAL confirms or it is
/// certain that FAL holds nothing; `cancel_requested_at` shows the request was taken. Cancelling a cancelled job again
/// is harmless; a job that already succeeded or failed cannot be cancelled (409).
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The job after the request.", body = JobView),
        (status = 404, description = "No such job for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job has already finished.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, job = %id))]
pub async fn cancel_job(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<JobView>> {
    let now = crate::domain::now();
    // A job with FAL is due for the reconciler at once, which passes the cancel on.
    let transition = Transition::new(JobEvent::CancelRequested, EventSource::Api, now)
        .with_detail(serde_json::json!({"reason": "cancelled by the client"}))
        .with_next_attempt(now);
    let applied = state
        .store
        .apply(Some(tenant.id), id, &transition)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    if applied.decision == Decision::CannotCancelFinished {
        return Err(ApiError::ConflictCode {
            code: "job_finished",
            detail: format!(
                "job {id} has already {}; there is nothing to cancel",
                applied.job.status
            ),
        });
    }
    if applied.decision == Decision::RecordCancelRequest {
        // With FAL: the reconciler passes it on. Pending with a submit in doubt: the
        // dispatcher confirms it once FAL surely holds nothing, or the callback hands the
        // job its request and the reconciler passes the cancel on.
        state.wake.reconciler.notify_one();
        state.wake.dispatcher.notify_one();
    }
    Ok(Json(applied.job.into()))
}
