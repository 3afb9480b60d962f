//! `/v1/webhook-endpoints`: where the tenant's events are delivered, signed per Standard
//! Webhooks. The signing secret is shown when an endpoint is made and when it is rotated,
//! never again.

use super::auth::Tenant;
use super::extract::{AcrossFields, ApiJson, ApiPathId};
use crate::domain::event::EventType;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::state::AppState;
use crate::store::{EndpointChange, EndpointSnapshot, WebhookAttempt, WebhookEndpoint};
use crate::webhooks::guard;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Endpoints one API key may have: each event is sent to each, so a key must not be able to
/// make falgate post to a third party thousands of times per event.
pub const MOST_ENDPOINTS: usize = 50;

/// How long a secret replaced by a rotation keeps signing deliveries beside the new one.
const ROTATION_OVERLAP: TimeDelta = TimeDelta::hours(24);

/// A webhook endpoint, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointView {
    pub id: Uuid,
    pub url: String,
    /// The event types delivered here; absent: every type.
    pub event_types: Option<Vec<EventType>>,
    pub description: String,
    pub enabled: bool,
    /// Why falgate disabled the endpoint (its receiver answered 410 Gone), if it did.
    pub disabled_reason: Option<String>,
    /// Until when the secret replaced by the last rotation still signs deliveries too.
    pub previous_secret_valid_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<WebhookEndpoint> for WebhookEndpointView {
    fn from(endpoint: WebhookEndpoint) -> Self {
        let now = crate::domain::now();
        Self {
            previous_secret_valid_until: endpoint
                .previous_secret_until
                .filter(|until| *until > now),
            id: endpoint.id,
            url: endpoint.url,
            event_types: endpoint.event_types,
            description: endpoint.description,
            enabled: endpoint.enabled,
            disabled_reason: endpoint.disabled_reason,
            created_at: endpoint.created_at,
            updated_at: endpoint.updated_at,
        }
    }
}

/// An endpoint with its signing secret: answered once, when it is made or rotated.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointWithSecret {
    #[serde(flatten)]
    pub endpoint: WebhookEndpointView,
    /// `whsec_` and the key in base64, as Standard Webhooks' libraries take it. Shown only now.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointList {
    pub items: Vec<WebhookEndpointView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookEndpointRequest {
    /// Where to post: https (http only where the server allows it), reaching only public
    /// addresses unless the server allows a network.
    pub url: String,
    /// The event types to deliver (at least one); absent: every type.
    pub event_types: Option<Vec<EventType>>,
    #[serde(default)]
    pub description: String,
    /// Default true.
    pub enabled: Option<bool>,
}

impl AcrossFields for CreateWebhookEndpointRequest {}

/// What to change; fields left out stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookEndpointRequest {
    pub url: Option<String>,
    /// The event types to deliver (at least one); `null`: every type.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<EventType>>)]
    pub event_types: Option<Option<Vec<EventType>>>,
    pub description: Option<String>,
    /// Enabling an endpoint falgate disabled sends it the events from then on.
    pub enabled: Option<bool>,
}

impl AcrossFields for UpdateWebhookEndpointRequest {}

/// A field that is present, even as `null` (`Some(None)`), told apart from one left out.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// One attempt to deliver an event to an endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAttemptView {
    pub id: Uuid,
    pub delivery_id: Uuid,
    /// The event sent (its id is also the delivery's `webhook-id`).
    pub event_id: Uuid,
    pub at: DateTime<Utc>,
    /// How long the receiver took to answer, or to fail.
    pub duration_ms: i64,
    /// The receiver's status code, when it answered.
    pub status_code: Option<i32>,
    /// Why no answer came (a refused address, a timeout, a connection failure).
    pub error: Option<String>,
    /// The first bytes of the receiver's answer.
    pub response_start: Option<String>,
    /// Where the delivery stands now: `pending` (another attempt is due), `succeeded` or
    /// `failed`.
    pub delivery_status: String,
}

impl From<WebhookAttempt> for WebhookAttemptView {
    fn from(attempt: WebhookAttempt) -> Self {
        Self {
            id: attempt.id,
            delivery_id: attempt.delivery_id,
            event_id: attempt.event_id,
            at: attempt.at,
            duration_ms: attempt.duration_ms,
            status_code: attempt.status_code,
            error: attempt.error,
            response_start: attempt.response_start,
            delivery_status: attempt.delivery_status,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAttemptList {
    pub items: Vec<WebhookAttemptView>,
}

/// The least time between two test events to one endpoint: each is an event kept and a
/// delivery made, and a test is for a person trying a receiver, not for a loop.
const TEST_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// How many deliveries a redelivery made.
#[derive(Debug, Serialize, ToSchema)]
pub struct Redelivery {
    /// One per enabled endpoint that takes the event's type and is not being sent it already.
    pub deliveries: usize,
    /// Endpoints passed over because the event is being sent to them already (an event is
    /// sent to an endpoint once at a time).
    pub already_under_way: usize,
}

fn new_secret() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The URL, checked: its shape, then every address its host resolves to. The outer error is
/// an outage (the name could not be looked up in time), the inner one the URL's fault.
async fn checked_url(state: &AppState, raw: &str) -> ApiResult<Result<String, FieldError>> {
    let url: reqwest::Url = match raw.parse() {
        Ok(url) => url,
        Err(e) => return Ok(Err(FieldError::new("url", format!("is not a URL: {e}")))),
    };
    match guard::check(&url, state.webhooks.config()).await {
        Ok(()) => Ok(Ok(url.to_string())),
        Err(refused @ guard::Refusal::LookupTimedOut(_)) => Err(ApiError::ServiceUnavailable(
            format!("the webhook URL's host {refused}; try again shortly"),
        )),
        Err(refused) => Ok(Err(FieldError::new("url", refused.to_string()))),
    }
}

fn checked_types(types: Option<Vec<EventType>>) -> Result<Option<Vec<EventType>>, FieldError> {
    match types {
        Some(types) if types.is_empty() => Err(FieldError::new(
            "event_types",
            "must name at least one type (leave it out for every type)",
        )),
        Some(mut types) => {
            types.sort_by_key(|kind| kind.as_str());
            types.dedup();
            Ok(Some(types))
        }
        None => Ok(None),
    }
}

async fn find_endpoint(state: &AppState, tenant: &Tenant, id: Uuid) -> ApiResult<WebhookEndpoint> {
    state
        .store
        .get_webhook_endpoint(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no webhook endpoint {id}")))
}

/// Create a webhook endpoint
///
/// The tenant's events from now on are posted to `url`, signed per Standard Webhooks with the
/// secret in the answer (shown only now).
#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints",
    tag = "webhooks",
    request_body = CreateWebhookEndpointRequest,
    responses(
        (status = 201, description = "The endpoint, with its secret.", body = WebhookEndpointWithSecret),
        (status = 400, description = "The body is not JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over the size limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not sent as JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid (a URL that reaches an address webhooks may not, such as loopback, private or link-local, is refused naming it), or the key has as many endpoints as it may (`too_many_endpoints`).", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id))]
pub async fn create_webhook_endpoint(
    State(state): State<AppState>,
    tenant: Tenant,
    body: ApiJson<CreateWebhookEndpointRequest>,
) -> ApiResult<Response> {
    let request = body.value;
    let url = checked_url(&state, &request.url).await?;
    let types = checked_types(request.event_types);
    let (url, event_types) = match (url, types) {
        (Ok(url), Ok(types)) => (url, types),
        (url, types) => {
            let errors = [url.err(), types.err()].into_iter().flatten().collect();
            return Err(ApiError::Validation(errors));
        }
    };
    if state.store.list_webhook_endpoints(tenant.id).await?.len() >= MOST_ENDPOINTS {
        return Err(ApiError::Unprocessable {
            code: "too_many_endpoints",
            detail: format!(
                "an API key may have {MOST_ENDPOINTS} webhook endpoints; delete one first"
            ),
        });
    }
    let now = crate::domain::now();
    let endpoint = WebhookEndpoint {
        id: Uuid::now_v7(),
        tenant: tenant.id,
        url,
        event_types,
        description: request.description,
        enabled: request.enabled.unwrap_or(true),
        disabled_reason: None,
        secret: new_secret(),
        previous_secret: None,
        previous_secret_until: None,
        resource_id: None,
        created_at: now,
        updated_at: now,
    };
    state.store.create_webhook_endpoint(&endpoint).await?;
    let secret = endpoint.secret.clone();
    let created = WebhookEndpointWithSecret {
        endpoint: endpoint.into(),
        secret,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// List webhook endpoints
#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints",
    tag = "webhooks",
    responses(
        (status = 200, description = "Every endpoint of this API key, oldest first.", body = WebhookEndpointList),
    ),
    security(("bearer" = []))
)]
pub async fn list_webhook_endpoints(
    State(state): State<AppState>,
    tenant: Tenant,
) -> ApiResult<Json<WebhookEndpointList>> {
    let endpoints = state.store.list_webhook_endpoints(tenant.id).await?;
    Ok(Json(WebhookEndpointList {
        items: endpoints.into_iter().map(Into::into).collect(),
    }))
}

/// Get a webhook endpoint
#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    responses(
        (status = 200, description = "The endpoint, without its secret.", body = WebhookEndpointView),
        (status = 404, description = "No such endpoint for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_webhook_endpoint(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<WebhookEndpointView>> {
    Ok(Json(find_endpoint(&state, &tenant, id).await?.into()))
}

/// Change a webhook endpoint
#[utoipa::path(
    patch,
    path = "/v1/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    request_body = UpdateWebhookEndpointRequest,
    responses(
        (status = 200, description = "The endpoint as it is now.", body = WebhookEndpointView),
        (status = 400, description = "The body is not JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over the size limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not sent as JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid; nothing was changed.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, endpoint = %id))]
pub async fn update_webhook_endpoint(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
    body: ApiJson<UpdateWebhookEndpointRequest>,
) -> ApiResult<Json<WebhookEndpointView>> {
    let request = body.value;
    find_endpoint(&state, &tenant, id).await?;
    let mut errors = Vec::new();
    let url = match request.url {
        Some(raw) => checked_url(&state, &raw)
            .await?
            .map_err(|e| errors.push(e))
            .ok(),
        None => None,
    };
    let event_types = match request.event_types {
        Some(types) => checked_types(types).map_err(|e| errors.push(e)).ok(),
        None => None,
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let change = EndpointChange {
        url,
        event_types,
        description: request.description,
        enabled: request.enabled,
    };
    state
        .store
        .update_webhook_endpoint(tenant.id, id, &change, crate::domain::now())
        .await?
        .map(|endpoint| Json(endpoint.into()))
        .ok_or_else(|| ApiError::NotFound(format!("no webhook endpoint {id}")))
}

/// Delete a webhook endpoint
///
/// Its deliveries not yet made are dropped.
#[utoipa::path(
    delete,
    path = "/v1/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "No such endpoint for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn delete_webhook_endpoint(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<StatusCode> {
    if state.store.delete_webhook_endpoint(tenant.id, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no webhook endpoint {id}")))
    }
}

/// Rotate an endpoint's secret
///
/// Answers the new secret (shown only now). For the next 24 hours deliveries are signed with
/// both, so a receiver can switch when it is ready.
#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints/{id}/rotate-secret",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    responses(
        (status = 200, description = "The endpoint, with its new secret.", body = WebhookEndpointWithSecret),
        (status = 404, description = "No such endpoint for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, endpoint = %id))]
pub async fn rotate_webhook_secret(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<WebhookEndpointWithSecret>> {
    let secret = new_secret();
    let now = crate::domain::now();
    let endpoint = state
        .store
        .rotate_webhook_secret(tenant.id, id, &secret, now, now + ROTATION_OVERLAP)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no webhook endpoint {id}")))?;
    Ok(Json(WebhookEndpointWithSecret {
        endpoint: endpoint.into(),
        secret,
    }))
}

/// List an endpoint's delivery attempts
///
/// The latest 100 attempts, newest first, with what the receiver answered.
#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints/{id}/deliveries",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    responses(
        (status = 200, description = "The attempts, newest first.", body = WebhookAttemptList),
        (status = 404, description = "No such endpoint for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_webhook_deliveries(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<WebhookAttemptList>> {
    find_endpoint(&state, &tenant, id).await?;
    let attempts = state.store.list_webhook_attempts(id, 100).await?;
    Ok(Json(WebhookAttemptList {
        items: attempts.into_iter().map(Into::into).collect(),
    }))
}

/// Send an event again
///
/// A new delivery to each enabled endpoint that takes the event's type, with the same
/// `webhook-id` as before (a receiver that already has it may drop it). An endpoint the
/// event is still being sent to (its delivery waits for a retry) is passed over.
#[utoipa::path(
    post,
    path = "/v1/events/{id}/redeliver",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The event's id.")),
    responses(
        (status = 202, description = "The deliveries made.", body = Redelivery),
        (status = 404, description = "No such event for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, event = %id))]
pub async fn redeliver_event(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Response> {
    let event = state
        .store
        .get_event(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no event {id}")))?;
    let (deliveries, already_under_way) = state
        .store
        .redeliver_event(&event, crate::domain::now())
        .await?;
    let made = Redelivery {
        deliveries,
        already_under_way,
    };
    Ok((StatusCode::ACCEPTED, Json(made)).into_response())
}

/// Send a test event
///
/// Writes a `webhook_endpoint.test` event, delivered to this endpoint alone (and listed with
/// the other events), to try a receiver and its signature check. One a second at most.
#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints/{id}/test",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    responses(
        (status = 202, description = "The test event was written and will be delivered."),
        (status = 404, description = "No such endpoint for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The endpoint is disabled; enable it first.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The endpoint was sent a test event less than a second ago.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, endpoint = %id))]
pub async fn test_webhook_endpoint(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<StatusCode> {
    let endpoint = find_endpoint(&state, &tenant, id).await?;
    if !endpoint.enabled {
        return Err(ApiError::ConflictCode {
            code: "endpoint_disabled",
            detail: format!("webhook endpoint {id} is disabled; enable it first"),
        });
    }
    let now = crate::domain::now();
    let last = state.store.last_test_event_at(tenant.id, id).await?;
    if let Some(wait) = last.and_then(|at| (at + TEST_EVERY - now).to_std().ok())
        && !wait.is_zero()
    {
        return Err(ApiError::TooMany {
            code: "too_many_tests",
            detail: format!(
                "webhook endpoint {id} was sent a test event less than a second ago; try again \
                 in a second"
            ),
        });
    }
    let tested = EndpointSnapshot {
        id: endpoint.id,
        url: endpoint.url,
        description: endpoint.description,
    };
    state.store.write_test_event(tenant.id, tested, now).await?;
    Ok(StatusCode::ACCEPTED)
}

/// A webhook for the resource a request makes alone (its job, or its batch and the batch's
/// jobs), signed with the API key's default secret (`GET /v1/webhooks/default-secret`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestWebhook {
    /// Where to post, under the same rules as an endpoint's URL.
    pub url: String,
    /// The event types to deliver (at least one); absent: every type.
    pub event_types: Option<Vec<EventType>>,
}

/// A request's webhook, checked before anything is stored.
pub struct CheckedWebhook {
    url: String,
    event_types: Option<Vec<EventType>>,
}

impl RequestWebhook {
    /// Checks the URL (resolving its host) and the types; errors name `webhook.url` and
    /// `webhook.event_types`.
    pub async fn check(
        self,
        state: &AppState,
    ) -> ApiResult<Result<CheckedWebhook, Vec<FieldError>>> {
        let url = checked_url(state, &self.url).await?;
        let types = checked_types(self.event_types);
        let inside = |mut error: FieldError| {
            error.field = format!("webhook.{}", error.field);
            error
        };
        Ok(match (url, types) {
            (Ok(url), Ok(event_types)) => Ok(CheckedWebhook { url, event_types }),
            (url, types) => Err([url.err(), types.err()]
                .into_iter()
                .flatten()
                .map(inside)
                .collect()),
        })
    }
}

impl CheckedWebhook {
    /// The endpoint to store with `resource`, signed with the tenant's default secret.
    pub async fn for_resource(
        self,
        state: &AppState,
        tenant: Uuid,
        resource: Uuid,
    ) -> ApiResult<WebhookEndpoint> {
        let secret = state
            .store
            .default_webhook_secret(tenant, &new_secret())
            .await?;
        let now = crate::domain::now();
        Ok(WebhookEndpoint {
            id: Uuid::now_v7(),
            tenant,
            url: self.url,
            event_types: self.event_types,
            description: String::new(),
            enabled: true,
            disabled_reason: None,
            secret,
            previous_secret: None,
            previous_secret_until: None,
            resource_id: Some(resource),
            created_at: now,
            updated_at: now,
        })
    }
}

/// Checks a request's optional webhook, adding its problems to `problems`.
pub async fn check_request_webhook(
    state: &AppState,
    webhook: Option<RequestWebhook>,
    problems: &mut Vec<FieldError>,
) -> ApiResult<Option<CheckedWebhook>> {
    let Some(webhook) = webhook else {
        return Ok(None);
    };
    Ok(match webhook.check(state).await? {
        Ok(checked) => Some(checked),
        Err(found) => {
            problems.extend(found);
            None
        }
    })
}

/// The default webhook secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct DefaultWebhookSecret {
    /// `whsec_` and the key in base64: what signs the webhooks given with requests.
    pub secret: String,
}

/// Get the default webhook secret
///
/// The secret that signs the webhooks given with a request (the `webhook` field of a job,
/// training or generation), made on first use.
#[utoipa::path(
    get,
    path = "/v1/webhooks/default-secret",
    tag = "webhooks",
    responses(
        (status = 200, description = "The secret.", body = DefaultWebhookSecret),
    ),
    security(("bearer" = []))
)]
pub async fn default_webhook_secret(
    State(state): State<AppState>,
    tenant: Tenant,
) -> ApiResult<Json<DefaultWebhookSecret>> {
    let secret = state
        .store
        .default_webhook_secret(tenant.id, &new_secret())
        .await?;
    Ok(Json(DefaultWebhookSecret { secret }))
}
