//! Webhook endpoints: where a tenant's events are delivered. An endpoint receives the events
//! numbered after it was made (`next_sequence`), those of the types it asks for.

use super::db::Tx;
use super::webhook_deliveries::fail_pending_deliveries;
use super::{Store, StoreError, StoreResult};
use crate::domain::event::EventType;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An endpoint as stored, secrets included: never log it whole (its `Debug` leaves them out).
#[derive(Clone, PartialEq)]
pub struct WebhookEndpoint {
    pub id: Uuid,
    pub tenant: Uuid,
    pub url: String,
    /// `None`: every type.
    pub event_types: Option<Vec<EventType>>,
    pub description: String,
    pub enabled: bool,
    /// Why falgate disabled it (a `410 Gone`), if it did.
    pub disabled_reason: Option<String>,
    /// `whsec_` and the key in base64.
    pub secret: String,
    /// The secret before the last rotation, still signing until `previous_secret_until`.
    pub previous_secret: Option<String>,
    pub previous_secret_until: Option<DateTime<Utc>>,
    /// For an endpoint given with a request: the job or batch it made, whose events alone it
    /// receives. Such endpoints are not listed.
    pub resource_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl WebhookEndpoint {
    /// Whether an event of this type goes to this endpoint.
    pub fn wants(&self, kind: EventType) -> bool {
        self.event_types
            .as_ref()
            .is_none_or(|types| types.contains(&kind))
    }

    /// The secrets a delivery made at `now` is signed with: the current one, and the previous
    /// one while its overlap lasts.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        let mut secrets = vec![self.secret.as_str()];
        if let (Some(previous), Some(until)) = (&self.previous_secret, self.previous_secret_until)
            && now < until
        {
            secrets.push(previous);
        }
        secrets
    }
}

/// What may change of an endpoint; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct EndpointChange {
    pub url: Option<String>,
    /// `Some(None)`: every type.
    pub event_types: Option<Option<Vec<EventType>>>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
}

#[derive(sqlx::FromRow)]
pub(super) struct EndpointRow {
    id: Uuid,
    tenant: Uuid,
    url: String,
    event_types: Option<String>,
    description: String,
    enabled: bool,
    disabled_reason: Option<String>,
    secret: String,
    previous_secret: Option<String>,
    previous_secret_until: Option<DateTime<Utc>>,
    resource_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

pub(super) const ENDPOINT_COLUMNS: &str = "id, tenant, url, event_types, description, enabled, \
    disabled_reason, secret, previous_secret, previous_secret_until, resource_id, created_at, \
    updated_at";

impl TryFrom<EndpointRow> for WebhookEndpoint {
    type Error = StoreError;

    fn try_from(row: EndpointRow) -> Result<Self, Self::Error> {
        let event_types = row
            .event_types
            .map(|joined| {
                joined
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<Vec<EventType>, _>>()
            })
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("webhook endpoint {}: {e}", row.id)))?;
        Ok(Self {
            id: row.id,
            tenant: row.tenant,
            url: row.url,
            event_types,
            description: row.description,
            enabled: row.enabled,
            disabled_reason: row.disabled_reason,
            secret: row.secret,
            previous_secret: row.previous_secret,
            previous_secret_until: row.previous_secret_until,
            resource_id: row.resource_id,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

fn joined_types(types: &Option<Vec<EventType>>) -> Option<String> {
    types.as_ref().map(|types| {
        types
            .iter()
            .map(|kind| kind.as_str())
            .collect::<Vec<_>>()
            .join(",")
    })
}

static GET_ENDPOINT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1 AND tenant = $2 \
         AND resource_id IS NULL"
    )
});

impl Store {
    /// Stores a new endpoint; it receives the tenant's events from the next one on.
    pub async fn create_webhook_endpoint(&self, endpoint: &WebhookEndpoint) -> StoreResult<()> {
        let mut tx = self.writer().begin().await?;
        insert_endpoint(&mut tx, endpoint).await?;
        tx.commit().await
    }

    pub async fn get_webhook_endpoint(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let row: Option<EndpointRow> = self
            .fetch_optional(&GET_ENDPOINT, &[id.into(), tenant.into()])
            .await?;
        row.map(WebhookEndpoint::try_from).transpose()
    }

    pub async fn list_webhook_endpoints(&self, tenant: Uuid) -> StoreResult<Vec<WebhookEndpoint>> {
        static LIST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant = $1 \
                 AND resource_id IS NULL ORDER BY id"
            )
        });
        let rows: Vec<EndpointRow> = self.fetch_all(&LIST, &[tenant.into()]).await?;
        rows.into_iter().map(WebhookEndpoint::try_from).collect()
    }

    /// Applies `change`; answers the endpoint as it is now, `None` if there is no such endpoint.
    /// Enabling a disabled endpoint clears why it was disabled, and it receives the events from
    /// then on (those it missed can be sent with a redelivery).
    pub async fn update_webhook_endpoint(
        &self,
        tenant: Uuid,
        id: Uuid,
        change: &EndpointChange,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let types = change.event_types.as_ref().map(joined_types);
        let mut tx = self.writer().begin().await?;
        let written = tx
            .conn()
            .execute(
                "UPDATE webhook_endpoints SET url = COALESCE($3, url), \
                 event_types = CASE WHEN $4 THEN $5 ELSE event_types END, \
                 description = COALESCE($6, description), enabled = COALESCE($7, enabled), \
                 disabled_reason = CASE WHEN $7 THEN NULL ELSE disabled_reason END, \
                 next_sequence = CASE WHEN $7 AND NOT enabled THEN COALESCE((SELECT \
                 last_sequence FROM event_sequences WHERE tenant = $2), 0) + 1 \
                 ELSE next_sequence END, \
                 updated_at = $8 WHERE id = $1 AND tenant = $2 AND resource_id IS NULL",
                &[
                    id.into(),
                    tenant.into(),
                    change.url.as_deref().into(),
                    types.is_some().into(),
                    types.flatten().as_deref().into(),
                    change.description.as_deref().into(),
                    change.enabled.into(),
                    at.into(),
                ],
            )
            .await?;
        if written == 0 {
            return Ok(None);
        }
        if change.enabled == Some(false) {
            fail_pending_deliveries(&mut tx, id, at).await?;
        }
        tx.commit().await?;
        self.get_webhook_endpoint(tenant, id).await
    }

    /// Deletes the endpoint and its deliveries; `false` if there was none.
    pub async fn delete_webhook_endpoint(&self, tenant: Uuid, id: Uuid) -> StoreResult<bool> {
        let deleted = self
            .writer()
            .execute(
                "DELETE FROM webhook_endpoints WHERE id = $1 AND tenant = $2 \
                 AND resource_id IS NULL",
                &[id.into(), tenant.into()],
            )
            .await?;
        Ok(deleted > 0)
    }

    /// Makes `secret` the endpoint's secret; the one it replaces keeps signing until
    /// `previous_until`. Answers the endpoint as it is now.
    pub async fn rotate_webhook_secret(
        &self,
        tenant: Uuid,
        id: Uuid,
        secret: &str,
        at: DateTime<Utc>,
        previous_until: DateTime<Utc>,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let written = self
            .writer()
            .execute(
                "UPDATE webhook_endpoints SET previous_secret = secret, secret = $3, \
                 previous_secret_until = $4, updated_at = $5 WHERE id = $1 AND tenant = $2 \
                 AND resource_id IS NULL",
                &[
                    id.into(),
                    tenant.into(),
                    secret.into(),
                    previous_until.into(),
                    at.into(),
                ],
            )
            .await?;
        if written == 0 {
            return Ok(None);
        }
        self.get_webhook_endpoint(tenant, id).await
    }

    /// The tenant's secret for the webhooks given with requests, made on first use (with
    /// `new`).
    pub async fn default_webhook_secret(&self, tenant: Uuid, new: &str) -> StoreResult<String> {
        self.writer()
            .execute(
                "INSERT INTO webhook_default_secrets (tenant, secret, created_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (tenant) DO NOTHING",
                &[tenant.into(), new.into(), crate::domain::now().into()],
            )
            .await?;
        let (secret,): (String,) = self
            .fetch_one(
                "SELECT secret FROM webhook_default_secrets WHERE tenant = $1",
                &[tenant.into()],
            )
            .await?;
        Ok(secret)
    }
}

/// Inserts an endpoint inside the caller's transaction (with the job or batch it is given for,
/// when it comes with a request); it receives the tenant's events from the next one on.
pub(super) async fn insert_endpoint(tx: &mut Tx, endpoint: &WebhookEndpoint) -> StoreResult<()> {
    let last: Option<(i64,)> = tx
        .conn()
        .fetch_optional(
            "SELECT last_sequence FROM event_sequences WHERE tenant = $1",
            &[endpoint.tenant.into()],
        )
        .await?;
    let next_sequence = last.map_or(0, |(last,)| last) + 1;
    let types = joined_types(&endpoint.event_types);
    tx.conn()
        .execute(
            "INSERT INTO webhook_endpoints (id, tenant, url, event_types, description, \
             enabled, disabled_reason, secret, previous_secret, previous_secret_until, \
             next_sequence, resource_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, NULL, NULL, $8, $10, $9, $9)",
            &[
                endpoint.id.into(),
                endpoint.tenant.into(),
                endpoint.url.as_str().into(),
                types.as_deref().into(),
                endpoint.description.as_str().into(),
                endpoint.enabled.into(),
                endpoint.secret.as_str().into(),
                next_sequence.into(),
                endpoint.created_at.into(),
                endpoint.resource_id.into(),
            ],
        )
        .await?;
    Ok(())
}

/// Any endpoint by its id, one given with a request too: what a delivery is sent to.
pub(super) async fn endpoint_by_id(
    store: &Store,
    id: Uuid,
) -> StoreResult<Option<WebhookEndpoint>> {
    static BY_ID: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1")
    });
    let row: Option<EndpointRow> = store.fetch_optional(&BY_ID, &[id.into()]).await?;
    row.map(WebhookEndpoint::try_from).transpose()
}
