//! Idempotency keys: a request claims its key with a token of its own, and completes it with
//! its response in the same transaction as its work, so that a key's effects happen once.

use super::db::Tx;
use super::{Store, StoreError, StoreResult};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A request claiming an idempotency key.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub tenant: Uuid,
    pub key: String,
    /// This request's own mark on the claim, made fresh for each request.
    pub token: Uuid,
    pub fingerprint: String,
    pub now: DateTime<Utc>,
    /// Records older than this are forgotten (24 h).
    pub expires_before: DateTime<Utc>,
    /// A claim still in flight after this long is taken to be abandoned by a dead process.
    pub abandoned_before: DateTime<Utc>,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyState {
    /// The key is ours now: go ahead.
    Claimed,
    /// Another request with this key is being handled right now.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
    /// The key's request finished; here is its response.
    Completed { status: u16, body: String },
}

/// The response to remember for an idempotency key.
#[derive(Debug, Clone)]
pub struct IdempotencyCompletion {
    pub tenant: Uuid,
    pub key: String,
    /// The claim the response belongs to.
    pub token: Uuid,
    pub status: u16,
    pub body: String,
}

#[derive(sqlx::FromRow)]
struct IdempotencyRow {
    pub fingerprint: String,
    pub response_status: Option<i32>,
    pub response_body: Option<String>,
    pub created_at: DateTime<Utc>,
    pub locked_at: DateTime<Utc>,
}

impl IdempotencyRow {
    /// What this existing row means to a new claim. `None`: the row is expired or abandoned and
    /// may be taken over.
    fn judge(&self, claim: &IdempotencyClaim) -> Option<IdempotencyState> {
        if self.created_at < claim.expires_before {
            return None;
        }
        if self.fingerprint != claim.fingerprint {
            return Some(IdempotencyState::Mismatch);
        }
        match (self.response_status, &self.response_body) {
            (Some(status), Some(body)) => Some(IdempotencyState::Completed {
                status: u16::try_from(status).unwrap_or(500),
                body: body.clone(),
            }),
            _ if self.locked_at < claim.abandoned_before => None,
            _ => Some(IdempotencyState::InFlight),
        }
    }
}

impl Store {
    /// Claims an idempotency key for a request, or says what the earlier request with that key
    /// left behind.
    pub async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> StoreResult<IdempotencyState> {
        let mut tx = self.writer().begin().await?;
        let inserted = tx
            .conn()
            .execute(
                "INSERT INTO idempotency_keys \
                 (tenant, key, fingerprint, created_at, locked_at, claim_token) \
                 VALUES ($1, $2, $3, $4, $4, $5) ON CONFLICT (tenant, key) DO NOTHING",
                &[
                    claim.tenant.into(),
                    (&claim.key).into(),
                    (&claim.fingerprint).into(),
                    claim.now.into(),
                    claim.token.into(),
                ],
            )
            .await?;
        if inserted == 1 {
            tx.commit().await?;
            return Ok(IdempotencyState::Claimed);
        }
        let existing: IdempotencyRow = tx
            .conn()
            .fetch_one(
                "SELECT fingerprint, response_status, response_body, created_at, locked_at \
                 FROM idempotency_keys WHERE tenant = $1 AND key = $2",
                &[claim.tenant.into(), (&claim.key).into()],
            )
            .await?;
        if let Some(state) = existing.judge(claim) {
            return Ok(state);
        }
        // Expired or abandoned: take it over, unless someone else just did.
        let taken = tx
            .conn()
            .execute(
                "UPDATE idempotency_keys SET fingerprint = $3, response_status = NULL, \
                 response_body = NULL, created_at = $4, locked_at = $4, claim_token = $6 \
                 WHERE tenant = $1 AND key = $2 AND locked_at = $5",
                &[
                    claim.tenant.into(),
                    (&claim.key).into(),
                    (&claim.fingerprint).into(),
                    claim.now.into(),
                    existing.locked_at.into(),
                    claim.token.into(),
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(if taken == 1 {
            IdempotencyState::Claimed
        } else {
            IdempotencyState::InFlight
        })
    }

    /// Tells other requests with this key that its request is still at work.
    pub async fn renew_idempotency_key(
        &self,
        tenant: Uuid,
        key: &str,
        token: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.writer()
            .execute(
                "UPDATE idempotency_keys SET locked_at = $3 \
                 WHERE tenant = $1 AND key = $2 AND response_status IS NULL \
                 AND claim_token = $4",
                &[tenant.into(), key.into(), at.into(), token.into()],
            )
            .await?;
        Ok(())
    }

    /// Frees a key whose request created nothing, if that request still holds it.
    pub async fn release_idempotency_key(
        &self,
        tenant: Uuid,
        key: &str,
        token: Uuid,
    ) -> StoreResult<()> {
        self.writer()
            .execute(
                "DELETE FROM idempotency_keys \
                 WHERE tenant = $1 AND key = $2 AND response_status IS NULL \
                 AND claim_token = $3",
                &[tenant.into(), key.into(), token.into()],
            )
            .await?;
        Ok(())
    }

    /// Completes a claim with a response (for requests whose work is not a job creation).
    pub async fn complete_idempotency_key(
        &self,
        completion: &IdempotencyCompletion,
    ) -> StoreResult<()> {
        let mut tx = self.writer().begin().await?;
        complete_idempotency(&mut tx, completion).await?;
        tx.commit().await
    }
}

/// Stores the response for a claim, inside the transaction of the work it answers for.
pub(super) async fn complete_idempotency(
    tx: &mut Tx,
    done: &IdempotencyCompletion,
) -> StoreResult<()> {
    let written = tx
        .conn()
        .execute(
            "UPDATE idempotency_keys SET response_status = $3, response_body = $4 \
             WHERE tenant = $1 AND key = $2 AND response_status IS NULL \
             AND claim_token = $5",
            &[
                done.tenant.into(),
                (&done.key).into(),
                i32::from(done.status).into(),
                (&done.body).into(),
                done.token.into(),
            ],
        )
        .await?;
    if written == 0 {
        // Another request took the key over (this one's claim looked abandoned): this
        // one's work is rolled back, so that the key's effects happen once.
        return Err(StoreError::UniqueTaken(
            "the Idempotency-Key was completed by another request".into(),
        ));
    }
    Ok(())
}
