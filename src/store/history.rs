//! A job's history: one append-only row per move, written in the transaction that moves it.

use super::db::Tx;
use super::{Store, StoreError, StoreResult};
use crate::domain::job::{EventSource, JobStatus};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

/// One line of a job's history.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEventRecord {
    pub at: DateTime<Utc>,
    pub from: Option<JobStatus>,
    pub to: JobStatus,
    pub source: EventSource,
    pub detail: Option<Value>,
}

#[derive(sqlx::FromRow)]
struct JobEventRow {
    at: DateTime<Utc>,
    from_status: Option<String>,
    to_status: String,
    source: String,
    detail: Option<Json<Value>>,
}

impl TryFrom<JobEventRow> for JobEventRecord {
    type Error = StoreError;

    fn try_from(row: JobEventRow) -> Result<Self, Self::Error> {
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("job event: {e}"));
        Ok(JobEventRecord {
            at: row.at,
            from: row
                .from_status
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| corrupt(&e))?,
            to: row.to_status.parse().map_err(|e| corrupt(&e))?,
            source: row.source.parse().map_err(|e| corrupt(&e))?,
            detail: row.detail.map(|j| j.0),
        })
    }
}

impl Store {
    pub async fn job_events(&self, job_id: Uuid) -> StoreResult<Vec<JobEventRecord>> {
        let rows: Vec<JobEventRow> = self
            .fetch_all(
                "SELECT at, from_status, to_status, source, detail FROM job_events \
                 WHERE job_id = $1 ORDER BY id",
                &[job_id.into()],
            )
            .await?;
        rows.into_iter().map(JobEventRecord::try_from).collect()
    }
}

/// Appends a history row inside the transaction that makes the move.
pub(super) async fn insert_event(
    tx: &mut Tx,
    job_id: Uuid,
    at: DateTime<Utc>,
    from: Option<JobStatus>,
    to: JobStatus,
    source: EventSource,
    detail: Option<&Value>,
) -> StoreResult<()> {
    tx.conn()
        .execute(
            "INSERT INTO job_events (job_id, at, from_status, to_status, source, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                job_id.into(),
                at.into(),
                from.map(|s| s.as_str()).into(),
                to.as_str().into(),
                source.as_str().into(),
                detail.into(),
            ],
        )
        .await?;
    Ok(())
}
