//! Avatars: their rows, their trainings, and what a training's end does to them.

use super::db::Tx;
use super::events::{EventSnapshot, NewEvent, avatar_snapshot, insert_events};
use super::idempotency::complete_idempotency;
use super::jobs::insert_jobs;
use super::photos::PHOTO_COLUMNS;
use super::webhook_endpoints::{WebhookEndpoint, insert_endpoint};
use super::{IdempotencyCompletion, Job, LoraCopy, NewJob, Photo, Store, StoreError, StoreResult};
use crate::domain::avatar::{AvatarKind, AvatarStatus, Trained, TrainedArtifact};
use crate::domain::event::EventType;
use crate::domain::trainers::BaseFamily;
use chrono::{DateTime, Utc};
use std::sync::LazyLock;
use uuid::Uuid;

/// The columns every avatar query selects, in `AvatarRow`'s order.
pub(super) const AVATAR_COLUMNS: &str = "id, tenant, name, kind, trigger_phrase, status, \
    training_job_id, lora_url, lora_config_url, finetune_id, error_code, error_message, \
    lora_copy_key, lora_copy_sha256, lora_copy_bytes, lora_copy_url, lora_checked_at, \
    trainer, base_family, high_noise_lora_url, high_noise_copy_key, high_noise_copy_sha256, \
    high_noise_copy_bytes, high_noise_copy_url, created_at, updated_at";

pub(super) static GET_AVATAR: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {AVATAR_COLUMNS} FROM avatars WHERE id = $1 AND tenant = $2"));

static PHOTOS_OF_AVATAR: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {PHOTO_COLUMNS} FROM photos WHERE avatar_id = $1"));

/// What the end of an avatar's training does to it.
#[derive(Debug, Clone, PartialEq)]
pub enum AvatarOutcome {
    /// Trained: the artifact FAL produced replaces the old one.
    Ready(Trained),
    /// Failed: an avatar with an artifact from an earlier training keeps it and stays ready.
    Failed {
        code: crate::domain::job::JobErrorCode,
        message: String,
    },
    /// Cancelled: back to where it was before the training.
    Canceled,
    /// A generation with the avatar's weights failed: FAL may no longer serve its LoRA file
    /// (FAL does not say so in a documented way), so the file is checked now.
    GenerationFailed,
}

/// An avatar as stored.
///
/// Events keep it as their snapshot (`store/events.rs`), and read it back for weeks: a field
/// added here needs `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Avatar {
    pub id: Uuid,
    pub tenant: Uuid,
    pub name: String,
    pub kind: AvatarKind,
    pub trigger_phrase: String,
    pub status: AvatarStatus,
    pub training_job_id: Option<Uuid>,
    pub lora_url: Option<String>,
    pub lora_config_url: Option<String>,
    pub finetune_id: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// falgate's own copy of the LoRA weights, once taken.
    pub lora_copy: Option<LoraCopy>,
    /// When FAL was last seen serving `lora_url` (and `high_noise_lora_url`).
    pub lora_checked_at: Option<DateTime<Utc>>,
    /// The registry id of the trainer that made the avatar's weights.
    #[serde(default)]
    pub trainer: Option<String>,
    /// The family of the avatar's weights (`BaseFamily::as_str`): where they generate.
    #[serde(default)]
    pub base_family: Option<String>,
    /// Wan 2.2's second LoRA file, for its high-noise transformer.
    #[serde(default)]
    pub high_noise_lora_url: Option<String>,
    /// falgate's own copy of that file, once taken.
    #[serde(default)]
    pub high_noise_copy: Option<LoraCopy>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Avatar {
    /// The family of the avatar's weights, which decides where they generate. `None` without
    /// weights, or for a family this version does not know (recorded by a newer one): such
    /// weights are sent nowhere rather than to the wrong model. Weights recorded without a
    /// family are FLUX.1: every LoRA falgate trained before it recorded families was FLUX.1
    /// [dev].
    pub fn weights_family(&self) -> Option<BaseFamily> {
        match (
            &self.lora_url,
            &self.finetune_id,
            self.base_family.as_deref(),
        ) {
            (Some(_), _, None) => Some(BaseFamily::Flux1Dev),
            (Some(_), _, Some(name)) => BaseFamily::parse(name),
            (None, Some(_), _) => Some(BaseFamily::Flux1ProFinetune),
            (None, None, _) => None,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AvatarRow {
    id: Uuid,
    tenant: Uuid,
    name: String,
    kind: String,
    trigger_phrase: String,
    status: String,
    training_job_id: Option<Uuid>,
    lora_url: Option<String>,
    lora_config_url: Option<String>,
    finetune_id: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    lora_copy_key: Option<String>,
    lora_copy_sha256: Option<String>,
    lora_copy_bytes: Option<i64>,
    lora_copy_url: Option<String>,
    lora_checked_at: Option<DateTime<Utc>>,
    trainer: Option<String>,
    base_family: Option<String>,
    high_noise_lora_url: Option<String>,
    high_noise_copy_key: Option<String>,
    high_noise_copy_sha256: Option<String>,
    high_noise_copy_bytes: Option<i64>,
    high_noise_copy_url: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<AvatarRow> for Avatar {
    type Error = StoreError;

    fn try_from(row: AvatarRow) -> Result<Self, Self::Error> {
        let corrupt =
            |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("avatar {}: {e}", row.id));
        Ok(Avatar {
            kind: row.kind.parse().map_err(|e| corrupt(&e))?,
            status: row.status.parse().map_err(|e| corrupt(&e))?,
            id: row.id,
            tenant: row.tenant,
            name: row.name,
            trigger_phrase: row.trigger_phrase,
            training_job_id: row.training_job_id,
            lora_url: row.lora_url.clone(),
            lora_config_url: row.lora_config_url,
            finetune_id: row.finetune_id,
            error_code: row.error_code,
            error_message: row.error_message,
            // A copy counts only while it is of the avatar's current weights.
            lora_copy: current_copy(
                (row.lora_copy_key, row.lora_copy_sha256, row.lora_copy_bytes),
                row.lora_copy_url.as_deref(),
                row.lora_url.as_deref(),
            ),
            high_noise_copy: current_copy(
                (
                    row.high_noise_copy_key,
                    row.high_noise_copy_sha256,
                    row.high_noise_copy_bytes,
                ),
                row.high_noise_copy_url.as_deref(),
                row.high_noise_lora_url.as_deref(),
            ),
            lora_checked_at: row.lora_checked_at,
            trainer: row.trainer,
            base_family: row.base_family,
            high_noise_lora_url: row.high_noise_lora_url,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// A copy's columns, if it is a copy of the file the avatar names now (`copied_from` is
/// `current`).
fn current_copy(
    (key, sha256, bytes): (Option<String>, Option<String>, Option<i64>),
    copied_from: Option<&str>,
    current: Option<&str>,
) -> Option<LoraCopy> {
    match (key, sha256, bytes) {
        (Some(key), Some(sha256), Some(bytes))
            if copied_from.is_some() && copied_from == current =>
        {
            Some(LoraCopy { key, sha256, bytes })
        }
        _ => None,
    }
}

/// Rows read back into avatars; the first that does not parse spoils the lot.
pub(super) fn avatars_from_rows(rows: Vec<AvatarRow>) -> StoreResult<Vec<Avatar>> {
    rows.into_iter().map(Avatar::try_from).collect()
}

/// An avatar's row as read under its lock: what a write that depends on it needs.
#[derive(sqlx::FromRow)]
pub(super) struct LockedAvatar {
    pub tenant: Uuid,
    pub status: String,
    pub training_job_id: Option<Uuid>,
    pub lora_copy_key: Option<String>,
    pub high_noise_lora_url: Option<String>,
    pub high_noise_copy_key: Option<String>,
}

/// What deleting an avatar leaves to clean up.
#[derive(Debug, Clone)]
pub struct DeletedAvatar {
    pub photos: Vec<Photo>,
    /// The training that was running, to cancel.
    pub training_to_cancel: Option<Uuid>,
    /// The keys of falgate's copies of its LoRA files.
    pub lora_copy_keys: Vec<String>,
}

/// What starting a training did.
#[derive(Debug, Clone)]
pub enum TrainingStart {
    Started(Box<Job>),
    /// The avatar is training already.
    Busy,
    /// No such avatar (or not this tenant's).
    NoAvatar,
}

impl Store {
    pub async fn create_avatar(
        &self,
        avatar: &Avatar,
        idempotency: Option<&IdempotencyCompletion>,
    ) -> StoreResult<()> {
        let mut tx = self.writer().begin().await?;
        tx.conn()
            .execute(
                "INSERT INTO avatars (id, tenant, name, kind, trigger_phrase, status, created_at, \
                 updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                &[
                    avatar.id.into(),
                    avatar.tenant.into(),
                    (&avatar.name).into(),
                    avatar.kind.as_str().into(),
                    (&avatar.trigger_phrase).into(),
                    avatar.status.as_str().into(),
                    avatar.created_at.into(),
                ],
            )
            .await?;
        if let Some(done) = idempotency {
            complete_idempotency(&mut tx, done).await?;
        }
        tx.commit().await
    }

    pub async fn get_avatar(&self, tenant: Uuid, id: Uuid) -> StoreResult<Option<Avatar>> {
        let row: Option<AvatarRow> = self
            .fetch_optional(&GET_AVATAR, &[id.into(), tenant.into()])
            .await?;
        row.map(Avatar::try_from).transpose()
    }

    pub async fn list_avatars(
        &self,
        tenant: Uuid,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<Avatar>> {
        let rows = self
            .fetch_all(
                &self.dialect().list_avatars,
                &[tenant.into(), after.into(), i64::from(limit).into()],
            )
            .await?;
        avatars_from_rows(rows)
    }

    /// Reads an avatar's row under a lock (on PostgreSQL; SQLite's `BEGIN IMMEDIATE` already
    /// holds the whole file), so that a write deciding on it is not raced.
    pub(super) async fn lock_avatar(
        &self,
        tx: &mut Tx,
        id: Uuid,
    ) -> StoreResult<Option<LockedAvatar>> {
        tx.conn()
            .fetch_optional(self.dialect().lock_avatar, &[id.into()])
            .await
    }

    /// Deletes an avatar and its photos' rows; answers what the caller must clean up: the
    /// files, and the training to cancel if one was running (`None` if there is no such
    /// avatar). The avatar's row is locked first, so a training starting at the same moment
    /// is seen.
    pub async fn delete_avatar(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> StoreResult<Option<DeletedAvatar>> {
        let mut tx = self.writer().begin().await?;
        let Some(locked) = self.lock_avatar(&mut tx, id).await? else {
            return Ok(None);
        };
        if locked.tenant != tenant {
            return Ok(None);
        }
        let photos: Vec<Photo> = tx.conn().fetch_all(&PHOTOS_OF_AVATAR, &[id.into()]).await?;
        tx.conn()
            .execute("DELETE FROM avatars WHERE id = $1", &[id.into()])
            .await?;
        tx.commit().await?;
        Ok(Some(DeletedAvatar {
            photos,
            training_to_cancel: locked
                .training_job_id
                .filter(|_| locked.status == "training"),
            lora_copy_keys: [locked.lora_copy_key, locked.high_noise_copy_key]
                .into_iter()
                .flatten()
                .collect(),
        }))
    }

    /// Marks the avatar training with this job and stores the job, in one transaction; refused
    /// while another training of the avatar runs.
    pub async fn start_training(
        &self,
        tenant: Uuid,
        job: &NewJob,
        idempotency: Option<&IdempotencyCompletion>,
        webhook: Option<&WebhookEndpoint>,
    ) -> StoreResult<TrainingStart> {
        let mut tx = self.writer().begin().await?;
        let avatar_id = job.avatar_id.unwrap_or_default();
        let status: Option<(String,)> = tx
            .conn()
            .fetch_optional(
                "SELECT status FROM avatars WHERE id = $1 AND tenant = $2",
                &[avatar_id.into(), tenant.into()],
            )
            .await?;
        match status.as_ref().map(|(status,)| status.as_str()) {
            None => return Ok(TrainingStart::NoAvatar),
            Some("training") => return Ok(TrainingStart::Busy),
            Some(_) => {}
        }
        let marked = tx
            .conn()
            .execute(
                "UPDATE avatars SET status = 'training', training_job_id = $1, updated_at = $2 \
                 WHERE id = $3 AND status <> 'training'",
                &[job.id.into(), job.created_at.into(), avatar_id.into()],
            )
            .await?;
        if marked == 0 {
            return Ok(TrainingStart::Busy);
        }
        let mut created = insert_jobs(&mut tx, std::slice::from_ref(job), idempotency).await?;
        if let Some(webhook) = webhook {
            insert_endpoint(&mut tx, webhook).await?;
        }
        let avatar = avatar_snapshot(&mut tx, tenant, avatar_id).await?;
        let started = NewEvent {
            kind: EventType::AvatarTrainingStarted,
            snapshot: EventSnapshot::Avatar(Box::new(avatar)),
        };
        insert_events(&mut tx, tenant, job.created_at, &[started]).await?;
        tx.commit().await?;
        self.events_written(tenant);
        Ok(TrainingStart::Started(Box::new(created.remove(0))))
    }
}

/// Moves the avatar whose current training is `job_id` according to how that training ended;
/// answers whether it did (not when the avatar has gone or trains with another job since).
pub(super) async fn apply_avatar_outcome(
    tx: &mut Tx,
    avatar_id: Uuid,
    job_id: Uuid,
    outcome: &AvatarOutcome,
    at: DateTime<Utc>,
) -> StoreResult<bool> {
    let conn = tx.conn();
    let moved = match outcome {
        AvatarOutcome::Ready(Trained {
            trainer,
            base,
            artifact,
        }) => {
            let (lora, config, high_noise, finetune) = match artifact {
                TrainedArtifact::Lora {
                    url,
                    config_url,
                    high_noise_url,
                } => (
                    Some(url.as_str()),
                    config_url.as_deref(),
                    high_noise_url.as_deref(),
                    None,
                ),
                TrainedArtifact::Finetune { id } => (None, None, None, Some(id.as_str())),
            };
            conn.execute(
                "UPDATE avatars SET status = 'ready', lora_url = $3, lora_config_url = $4, \
                 finetune_id = $5, error_code = NULL, error_message = NULL, updated_at = $6, \
                 lora_checked_at = $7, lora_next_try_at = $7, high_noise_lora_url = $8, \
                 trainer = $9, base_family = $10 \
                 WHERE id = $1 AND training_job_id = $2",
                &[
                    avatar_id.into(),
                    job_id.into(),
                    lora.into(),
                    config.into(),
                    finetune.into(),
                    at.into(),
                    // FAL served the LoRA files just now, in its result; their copies are due
                    // at once.
                    lora.map(|_| at).into(),
                    high_noise.into(),
                    (*trainer).into(),
                    base.as_str().into(),
                ],
            )
            .await?
        }
        AvatarOutcome::Failed { code, message } => {
            conn.execute(
                "UPDATE avatars SET status = CASE WHEN lora_url IS NOT NULL \
                 OR finetune_id IS NOT NULL THEN 'ready' ELSE 'failed' END, error_code = $3, \
                 error_message = $4, updated_at = $5 WHERE id = $1 AND training_job_id = $2",
                &[
                    avatar_id.into(),
                    job_id.into(),
                    code.as_str().into(),
                    message.into(),
                    at.into(),
                ],
            )
            .await?
        }
        AvatarOutcome::Canceled => {
            conn.execute(
                "UPDATE avatars SET status = CASE WHEN lora_url IS NOT NULL \
                 OR finetune_id IS NOT NULL THEN 'ready' ELSE 'draft' END, updated_at = $3 \
                 WHERE id = $1 AND training_job_id = $2",
                &[avatar_id.into(), job_id.into(), at.into()],
            )
            .await?
        }
        // The LoRA file is checked at once rather than at its next turn.
        AvatarOutcome::GenerationFailed => {
            conn.execute(
                "UPDATE avatars SET lora_next_try_at = $2 WHERE id = $1 \
                 AND lora_url IS NOT NULL AND lora_copy_url = lora_url AND lora_next_try_at > $2",
                &[avatar_id.into(), at.into()],
            )
            .await?
        }
    };
    Ok(moved > 0)
}
