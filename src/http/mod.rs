//! The HTTP API: one file per resource, thin handlers, and the OpenAPI document generated from
//! them.

pub mod auth;
pub mod avatars;
pub mod events;
pub mod extract;
pub mod fal_webhook;
pub mod generations;
pub mod idempotency;
pub mod jobs;
pub mod linger;
pub mod ops;
pub mod paging;
pub mod photos;
pub mod server;
pub mod spec;
pub mod streams;
pub mod trainers;
pub mod trainings;
pub mod webhook_endpoints;

use crate::error::{ApiError, REQUEST_ID};
use crate::state::AppState;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use std::time::Instant;
use tracing::Instrument;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "falgate",
        description = "A durable gateway in front of FAL: every request stored, forwarded to \
                       FAL's queue, and followed to its end through verified callbacks.\n\n\
                       Authenticate with `Authorization: Bearer <api key>` (create one with \
                       `cargo run -- api-key create --name NAME`, or the `falgate` binary's `api-key create`). Errors are \
                       `application/problem+json` with a stable `code`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "avatars", description = "Avatars, their photos and their training."),
        (name = "generations", description = "Images of trained avatars, in batches."),
        (name = "jobs", description = "Every job, whatever created it."),
        (name = "events", description = "What happened to jobs, avatars and batches, in order."),
        (name = "webhooks", description = "Where events are delivered, signed per Standard Webhooks."),
        (name = "fal", description = "Called by FAL, not by clients."),
        (name = "operations", description = "Health, readiness and metrics."),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key made with `falgate api-key create`."))
                    .build(),
            ),
        );
    }
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(jobs::create_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(fal_webhook::fal_webhook))
        .routes(routes!(avatars::create_avatar, avatars::list_avatars))
        .routes(routes!(avatars::get_avatar, avatars::delete_avatar))
        .routes(routes!(avatars::download_lora))
        .routes(routes!(photos::upload_photos, photos::list_photos))
        .routes(routes!(
            photos::get_photo,
            photos::update_photo,
            photos::delete_photo
        ))
        .routes(routes!(trainings::start_training))
        .routes(routes!(trainers::list_trainers))
        .routes(routes!(generations::create_generation))
        .routes(routes!(generations::get_batch))
        .routes(routes!(events::list_events))
        .routes(routes!(events::get_event))
        .routes(routes!(streams::all_events))
        .routes(routes!(streams::job_events))
        .routes(routes!(streams::batch_events))
        .routes(routes!(
            webhook_endpoints::create_webhook_endpoint,
            webhook_endpoints::list_webhook_endpoints
        ))
        .routes(routes!(
            webhook_endpoints::get_webhook_endpoint,
            webhook_endpoints::update_webhook_endpoint,
            webhook_endpoints::delete_webhook_endpoint
        ))
        .routes(routes!(webhook_endpoints::rotate_webhook_secret))
        .routes(routes!(webhook_endpoints::test_webhook_endpoint))
        .routes(routes!(webhook_endpoints::list_webhook_deliveries))
        .routes(routes!(webhook_endpoints::redeliver_event))
        .routes(routes!(webhook_endpoints::default_webhook_secret))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
}

/// The OpenAPI document, as served at `/openapi.json` and committed in `openapi/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut spec = api_router().into_openapi();
    // The document a server with the default configuration serves.
    spec::complete(
        &mut spec,
        &crate::config::Config::for_database("sqlite::memory:"),
    );
    spec
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit;
    let (api, mut spec) = api_router().split_for_parts();
    spec::complete(&mut spec, &state.config);
    // Swagger UI would otherwise send the spec's URL to an online validator whenever it is served
    // under a host other than localhost.
    let docs = SwaggerUi::new("/docs")
        .url("/openapi.json", spec)
        .config(utoipa_swagger_ui::Config::default().validator_url("none"));
    api.merge(docs)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies read whole are held to `body_limit`; photo uploads and callbacks stream their
        // bodies under limits of their own.
        .layer(middleware::from_fn(linger::drain_refused_bodies))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::Extension(BodyLimit(body_limit)))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ))
        .with_state(state)
}

/// The body limit in force, for error messages.
#[derive(Clone, Copy)]
struct BodyLimit(usize);

pub(crate) fn body_limit_of(req: &Request) -> usize {
    req.extensions()
        .get::<BodyLimit>()
        .map(|limit| limit.0)
        .unwrap_or_default()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("a handler panicked").into_response()
}

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Gives every request an id (the caller's `x-request-id` when it is sane, a new UUIDv7
/// otherwise), a span that carries it, and one log line with the outcome.
async fn request_context(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %request_id,
        tenant = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut response = REQUEST_ID
        .scope(request_id.clone(), next.run(request))
        .instrument(span.clone())
        .await;
    let status = response.status();
    state.http_counters.record(status);
    span.in_scope(|| {
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), elapsed_ms, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), elapsed_ms, "request handled");
        }
    });
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
