//! `Authorization: Bearer <api key>` on every `/v1` route: the key decides the tenant, and a
//! tenant sees only its own rows.

use crate::domain::api_key::{hash_key, looks_like_key};
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// The API key a request was made with.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: Uuid,
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(ApiError::Unauthorized)?;
        if !looks_like_key(token) {
            return Err(ApiError::Unauthorized);
        }
        let hash = hash_key(token);
        let key = state
            .api_keys
            .find_live(&state.store, &hash.0)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        // The lookup matched on the hash already; comparing again in constant time keeps the
        // final decision free of timing differences, whatever the database's index does.
        if !bool::from(key.key_hash.as_bytes().ct_eq(hash.0.as_bytes())) {
            return Err(ApiError::Unauthorized);
        }
        tracing::Span::current().record("tenant", tracing::field::display(key.id));
        Ok(Tenant { id: key.id })
    }
}
