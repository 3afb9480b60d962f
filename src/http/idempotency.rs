//! `Idempotency-Key` on creating POSTs: the same key and body replay the first response, the
//! same key with another body is refused, and a key in use by a request still running is a 409.
//! Records are scoped to the API key and kept 24 hours.

use crate::domain::idempotency::{IdempotencyKey, fingerprint};
use crate::error::{ApiError, ApiResult};
use crate::store::{IdempotencyClaim, IdempotencyCompletion, IdempotencyState, Store};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::TimeDelta;
use uuid::Uuid;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// How long a key is remembered.
const RETENTION: TimeDelta = TimeDelta::hours(24);
/// A claim not renewed for this long belongs to a request whose process died: a retry then
/// takes the key over within seconds instead of waiting for a long timeout.
const ABANDONED_AFTER: TimeDelta = TimeDelta::seconds(10);
/// How often a request still at work renews its claim (well within [`ABANDONED_AFTER`]).
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The task renewing a claim; it stops when the request's work ends, or is dropped with it.
struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The optional `Idempotency-Key` header, validated.
pub struct MaybeIdempotencyKey(pub Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeIdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(raw) = parts.headers.get(HEADER) else {
            return Ok(Self(None));
        };
        let raw = raw
            .to_str()
            .map_err(|_| ApiError::validation("Idempotency-Key", "must be visible ASCII"))?;
        IdempotencyKey::parse(raw)
            .map(|key| Self(Some(key)))
            .map_err(|problem| ApiError::validation("Idempotency-Key", problem))
    }
}

/// A response that can be remembered and replayed: a status and a JSON body, serialized once
/// for both the client and the record.
pub struct Replayable {
    status: StatusCode,
    body: String,
}

impl Replayable {
    pub fn new(status: StatusCode, body: &impl serde::Serialize) -> ApiResult<Self> {
        Ok(Self {
            status,
            body: serde_json::to_string(body).map_err(ApiError::internal)?,
        })
    }

    fn into_response(self, replayed: bool) -> ApiResult<Response> {
        Ok(json_response(self.status, self.body.into_bytes(), replayed))
    }
}

fn json_response(status: StatusCode, body: Vec<u8>, replayed: bool) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if replayed {
        headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

/// What the work of a request needs to store its response atomically with what it creates.
pub struct IdempotencyScope {
    tenant: Uuid,
    /// The key and this request's claim on it.
    key: Option<(IdempotencyKey, Uuid)>,
}

impl IdempotencyScope {
    pub fn key(&self) -> Option<&str> {
        self.key.as_ref().map(|(key, _)| key.as_str())
    }

    /// The record to write in the same transaction as the work, if the request has a key.
    pub fn completion(&self, response: &Replayable) -> ApiResult<Option<IdempotencyCompletion>> {
        let Some((key, token)) = &self.key else {
            return Ok(None);
        };
        Ok(Some(IdempotencyCompletion {
            tenant: self.tenant,
            key: key.as_str().to_owned(),
            token: *token,
            status: response.status.as_u16(),
            body: response.body.clone(),
        }))
    }
}

/// Runs `work` at most once per idempotency key. `work` must store
/// [`IdempotencyScope::completion`] in the transaction that makes its effects durable.
pub async fn run_once<F, Fut>(
    store: &Store,
    tenant: Uuid,
    key: MaybeIdempotencyKey,
    route: &str,
    canonical_body: &[u8],
    work: F,
) -> ApiResult<Response>
where
    F: FnOnce(IdempotencyScope) -> Fut,
    Fut: Future<Output = ApiResult<Replayable>>,
{
    let Some(key) = key.0 else {
        return work(IdempotencyScope { tenant, key: None })
            .await?
            .into_response(false);
    };
    let now = crate::domain::now();
    let claim = IdempotencyClaim {
        tenant,
        key: key.as_str().to_owned(),
        token: Uuid::new_v4(),
        fingerprint: fingerprint(route, canonical_body),
        now,
        expires_before: now - RETENTION,
        abandoned_before: now - ABANDONED_AFTER,
    };
    match store.claim_idempotency_key(&claim).await? {
        IdempotencyState::Claimed => {}
        IdempotencyState::InFlight => {
            return Err(ApiError::ConflictCode {
                code: "idempotency_key_in_use",
                detail: format!(
                    "a request with this Idempotency-Key is still being processed; retry in a \
                     few seconds (if its process stopped, the key is free again within {} s)",
                    ABANDONED_AFTER.num_seconds()
                ),
            });
        }
        IdempotencyState::Mismatch => {
            return Err(ApiError::Unprocessable {
                code: "idempotency_key_reused",
                detail: "this Idempotency-Key was already used with a different request".into(),
            });
        }
        IdempotencyState::Completed { status, body } => {
            let status = StatusCode::from_u16(status).map_err(ApiError::internal)?;
            return Ok(json_response(status, body.into_bytes(), true));
        }
    }
    let token = claim.token;
    let scope = IdempotencyScope {
        tenant,
        key: Some((key.clone(), token)),
    };
    // Renewed beside the work, never in its way: the work may hold the very row (or, on
    // SQLite, the write lock) that a renewal waits for.
    let renewal = Renewal(tokio::spawn({
        let (store, key) = (store.clone(), key.as_str().to_owned());
        async move {
            let mut every = tokio::time::interval(RENEW_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                let now = crate::domain::now();
                if let Err(err) = store.renew_idempotency_key(tenant, &key, token, now).await {
                    tracing::warn!(error = %err, "could not renew an idempotency key's claim");
                }
            }
        }
    }));
    let outcome = work(scope).await;
    drop(renewal);
    match outcome {
        Ok(response) => response.into_response(false),
        Err(err) => {
            // Nothing was created, so the key is free for a corrected retry.
            if let Err(release) = store
                .release_idempotency_key(tenant, key.as_str(), token)
                .await
            {
                tracing::warn!(error = %release, "could not release an idempotency key");
            }
            Err(err)
        }
    }
}
