//! `POST /v1/fal/webhook/{job_id}?token=…`: FAL's callback. No API key: our HMAC token in the
//! URL proves we made the URL, FAL's Ed25519 signature proves FAL sent the body. Whatever passes
//! the token is stored raw, in the same transaction as the transition it causes, before the 2xx.

use super::extract::{ApiPathId, ApiQuery, body_read_error};
use crate::domain::job::{EventSource, JobEvent};
use crate::error::{ApiError, ApiResult, Problem};
use crate::fal::signature::{SignatureError, Verdict, WebhookHeaders};
use crate::fal::wire::CallbackBody;
use crate::state::AppState;
use crate::store::{CallbackOutcome, NewCallback, SignatureVerdict, Transition};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use utoipa::IntoParams;
use uuid::Uuid;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WebhookQuery {
    /// The HMAC token falgate put in the callback URL.
    pub token: String,
}

/// FAL's callback
///
/// Called by FAL, not by clients: the URL is handed to FAL with each submit. Answers 2xx only
/// once the callback is stored; 401 for a wrong token or signature; 503 when FAL's keys cannot
/// be fetched (FAL retries).
#[utoipa::path(
    post,
    path = "/v1/fal/webhook/{job_id}",
    tag = "fal",
    params(
        ("job_id" = Uuid, Path, description = "The job the callback is for."),
        WebhookQuery,
    ),
    request_body(content = Object, description = "FAL's callback body, verified over its raw bytes."),
    responses(
        (status = 200, description = "Stored (and applied, when it was news)."),
        (status = 400, description = "The body could not be read.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Wrong token (refused before the body is read) or signature.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is larger than the callback limit.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The job id or token is malformed.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "FAL's signing keys could not be fetched; retry.", body = Problem, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(skip_all, fields(job = %job_id))]
pub async fn fal_webhook(
    State(state): State<AppState>,
    ApiPathId(job_id): ApiPathId,
    ApiQuery(query): ApiQuery<WebhookQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    // The token is in the URL, so a caller without it is refused before a byte of its body is
    // read: anyone can reach this route, and bodies may be large.
    let callbacks = state.callbacks.as_ref().ok_or(ApiError::Unauthorized)?;
    if !callbacks.verify(job_id, &query.token) {
        tracing::warn!("callback with a wrong token refused");
        return Err(ApiError::Unauthorized);
    }
    // FAL's results can be far larger than a client's request, and are read through the raw
    // body, so neither the JSON limit nor the router-wide upload limit applies: callbacks have
    // their own.
    let limit = state.config.callback_body_limit;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|err| body_read_error(&err, limit))?;
    let received_at = crate::domain::now();
    let mut callback = NewCallback {
        id: Uuid::now_v7(),
        job_id,
        received_at,
        request_id: None,
        headers: stored_headers(&headers),
        body: body.to_vec(),
        signature: SignatureVerdict::Invalid,
        outcome: CallbackOutcome::Rejected,
        detail: None,
    };
    let signed = match WebhookHeaders::from_headers(&headers) {
        Ok(signed) => signed,
        Err(err) => return reject(&state, callback, &err.to_string()).await,
    };
    callback.request_id = Some(signed.request_id.clone());
    let verdict = match state
        .jwks
        .verify_with_refetch(&signed, &body, received_at.timestamp())
        .await
    {
        Ok(verdict) => verdict,
        Err(SignatureError::KeysUnavailable(why)) => {
            tracing::error!(%why, "FAL's signing keys are unavailable");
            return Err(ApiError::ServiceUnavailable(
                "FAL's signing keys cannot be fetched right now; retry later".into(),
            ));
        }
        Err(err) => return reject(&state, callback, &err.to_string()).await,
    };
    let stale = match verdict {
        Verdict::Valid { stale } => stale,
        Verdict::Invalid(reason) => {
            return reject(&state, callback, &format!("signature invalid: {reason:?}")).await;
        }
    };
    callback.signature = if stale {
        SignatureVerdict::Stale
    } else {
        SignatureVerdict::Valid
    };
    let parsed: Option<CallbackBody> = serde_json::from_slice(&body).ok();
    if let Some(parsed) = &parsed
        && parsed.request_id != signed.request_id
    {
        return reject(
            &state,
            callback,
            "the body's request id is not the signed one",
        )
        .await;
    }
    let mut news = match (&parsed, stale) {
        (Some(parsed), false) => news_of(parsed, received_at),
        _ => None,
    };
    if news.is_none() {
        // Authentic but not to be trusted, or not usable alone: keep it and ask FAL directly.
        // Its signed request id is still FAL's: a job that lost its submit answer adopts it, so
        // that it is not submitted twice.
        callback.outcome = if stale {
            CallbackOutcome::Stale
        } else {
            CallbackOutcome::Deferred
        };
        news = Some(
            Transition::new(JobEvent::SubmitAccepted, EventSource::Callback, received_at)
                .with_next_attempt(received_at),
        );
    }
    let outcome = state
        .store
        .record_callback(callback, news)
        .await
        .map_err(ApiError::from)?;
    tracing::info!(outcome = outcome.as_str(), stale, "callback stored");
    if outcome == CallbackOutcome::Applied {
        // A training may have ended with weights to keep.
        state.wake.keeper.notify_one();
    }
    if matches!(outcome, CallbackOutcome::Stale | CallbackOutcome::Deferred) {
        state.store.poll_now(job_id).await?;
        state.wake.reconciler.notify_one();
    }
    Ok(StatusCode::OK)
}

/// The news a trusted callback brings; `None` when it carries no usable outcome.
fn news_of(body: &CallbackBody, at: chrono::DateTime<chrono::Utc>) -> Option<Transition> {
    let outcome = crate::fal::outcome::from_callback(body)?;
    Some(
        Transition::of_outcome(outcome, EventSource::Callback, at)
            .with_detail(json!({ "fal_request_id": body.request_id })),
    )
}

async fn reject(state: &AppState, mut callback: NewCallback, why: &str) -> ApiResult<StatusCode> {
    tracing::warn!(%why, "callback refused");
    callback.outcome = CallbackOutcome::Rejected;
    callback.detail = Some(json!({ "reason": why }));
    state.store.record_callback(callback, None).await?;
    Err(ApiError::Unauthorized)
}

/// The headers worth keeping with a callback: FAL's own and the content type.
fn stored_headers(headers: &HeaderMap) -> Value {
    let kept: Map<String, Value> = headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name.starts_with("x-fal-") || name == "content-type" || name == "user-agent"
        })
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|v| (name.as_str().to_owned(), Value::String(v.to_owned())))
        })
        .collect();
    Value::Object(kept)
}
