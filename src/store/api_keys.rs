//! API keys: every other row belongs to one (its `tenant`). Only a key's hash is stored; its
//! secret is shown once, when it is issued.

use super::{Store, StoreResult};
use crate::domain::api_key::NewApiKey;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An API key as listed: never its secret, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKeyRecord {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What authenticating a request needs of a key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyCredential {
    pub id: Uuid,
    pub key_hash: String,
}

impl Store {
    /// Makes a new key named `name`; its secret is in the answer and nowhere else.
    pub async fn issue_api_key(&self, name: &str) -> StoreResult<(ApiKeyRecord, NewApiKey)> {
        let new = NewApiKey::generate();
        let record = ApiKeyRecord {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            prefix: new.prefix.clone(),
            created_at: crate::domain::now(),
            revoked_at: None,
        };
        self.writer()
            .execute(
                "INSERT INTO api_keys (id, name, key_hash, prefix, created_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    record.id.into(),
                    (&record.name).into(),
                    new.hash.0.as_str().into(),
                    (&record.prefix).into(),
                    record.created_at.into(),
                    record.revoked_at.into(),
                ],
            )
            .await?;
        Ok((record, new))
    }

    pub async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        self.fetch_all(
            "SELECT id, name, prefix, created_at, revoked_at FROM api_keys ORDER BY id",
            &[],
        )
        .await
    }

    /// Revokes the key whose id or prefix is given; false when none matches, when it was
    /// already revoked, or when the prefix names more than one.
    pub async fn revoke_api_key(&self, id_or_prefix: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let id = Uuid::parse_str(id_or_prefix).ok();
        let mut tx = self.writer().begin().await?;
        let ids: Vec<(Uuid,)> = tx
            .conn()
            .fetch_all(
                "SELECT id FROM api_keys WHERE (id = $1 OR prefix = $2) AND revoked_at IS NULL",
                &[id.into(), id_or_prefix.into()],
            )
            .await?;
        let [(only,)] = ids.as_slice() else {
            return Ok(false);
        };
        tx.conn()
            .execute(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2",
                &[at.into(), (*only).into()],
            )
            .await?;
        tx.commit().await?;
        super::api_key_cache::note_revocation();
        Ok(true)
    }

    /// The live (not revoked) key with this hash.
    pub async fn find_live_api_key(&self, hash: &str) -> StoreResult<Option<ApiKeyCredential>> {
        self.fetch_optional(
            "SELECT id, key_hash FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            &[hash.into()],
        )
        .await
    }
}
