//! Generation batches: several jobs made by one request, read back together.

use super::jobs::{JOB_COLUMNS, insert_jobs, jobs_from_rows};
use super::webhook_endpoints::{WebhookEndpoint, insert_endpoint};
use super::{IdempotencyCompletion, Job, NewJob, Store, StoreResult};
use chrono::{DateTime, Utc};
use std::sync::LazyLock;
use uuid::Uuid;

pub(super) static JOBS_OF_BATCH: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs WHERE batch_id = $1 ORDER BY id"));

/// A generation batch.
///
/// Events keep it as their snapshot (`store/events.rs`), and read it back for weeks: a field
/// added here needs `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    pub id: Uuid,
    pub tenant: Uuid,
    pub avatar_id: Uuid,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Stores a batch and its jobs, and completes the request's idempotency key, in one
    /// transaction.
    pub async fn create_batch(
        &self,
        batch: &Batch,
        jobs: &[NewJob],
        idempotency: Option<&IdempotencyCompletion>,
        webhook: Option<&WebhookEndpoint>,
    ) -> StoreResult<Vec<Job>> {
        let mut tx = self.writer().begin().await?;
        tx.conn()
            .execute(
                "INSERT INTO batches (id, tenant, avatar_id, created_at) VALUES ($1, $2, $3, $4)",
                &[
                    batch.id.into(),
                    batch.tenant.into(),
                    batch.avatar_id.into(),
                    batch.created_at.into(),
                ],
            )
            .await?;
        let created = insert_jobs(&mut tx, jobs, idempotency).await?;
        if let Some(webhook) = webhook {
            insert_endpoint(&mut tx, webhook).await?;
        }
        tx.commit().await?;
        Ok(created)
    }

    pub async fn get_batch(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> StoreResult<Option<(Batch, Vec<Job>)>> {
        let batch: Option<Batch> = self
            .fetch_optional(
                "SELECT id, tenant, avatar_id, created_at FROM batches WHERE id = $1 AND tenant = $2",
                &[id.into(), tenant.into()],
            )
            .await?;
        let Some(batch) = batch else {
            return Ok(None);
        };
        let rows = self.fetch_all(&JOBS_OF_BATCH, &[id.into()]).await?;
        Ok(Some((batch, jobs_from_rows(rows)?)))
    }
}
