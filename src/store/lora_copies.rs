//! falgate's own copies of avatars' LoRA files, and the checks that FAL still serves the
//! originals.

use super::avatars::{AVATAR_COLUMNS, avatars_from_rows};
use super::{Avatar, Store, StoreResult};
use chrono::{DateTime, Utc};
use std::sync::LazyLock;
use uuid::Uuid;

/// A file named but not (or no longer) copied: `{file}_url` set, its copy of another URL or none.
const MAIN_UNCOPIED: &str =
    "(lora_url IS NOT NULL AND (lora_copy_url IS NULL OR lora_copy_url <> lora_url))";
const HIGH_NOISE_UNCOPIED: &str = "(high_noise_lora_url IS NOT NULL \
    AND (high_noise_copy_url IS NULL OR high_noise_copy_url <> high_noise_lora_url))";

static MISSING_COPY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {AVATAR_COLUMNS} FROM avatars WHERE ({MAIN_UNCOPIED} OR {HIGH_NOISE_UNCOPIED}) \
         AND lora_next_try_at <= $1 ORDER BY lora_next_try_at LIMIT $2"
    )
});

static DUE_CHECK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {AVATAR_COLUMNS} FROM avatars WHERE lora_url IS NOT NULL \
         AND NOT {MAIN_UNCOPIED} AND NOT {HIGH_NOISE_UNCOPIED} \
         AND lora_next_try_at <= $1 ORDER BY lora_next_try_at LIMIT $2"
    )
});

// Recording one file's copy: the next try becomes the next check only once the avatar's other
// file is copied too; until then it stays due, so that the other is copied next.
static RECORD_MAIN_COPY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE avatars SET lora_copy_key = $3, lora_copy_sha256 = $4, lora_copy_bytes = $5, \
         lora_copy_url = $2, lora_checked_at = $6, \
         lora_next_try_at = CASE WHEN {HIGH_NOISE_UNCOPIED} THEN lora_next_try_at ELSE $7 END \
         WHERE id = $1 AND lora_url = $2"
    )
});

static RECORD_HIGH_NOISE_COPY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE avatars SET high_noise_copy_key = $3, high_noise_copy_sha256 = $4, \
         high_noise_copy_bytes = $5, high_noise_copy_url = $2, lora_checked_at = $6, \
         lora_next_try_at = CASE WHEN {MAIN_UNCOPIED} THEN lora_next_try_at ELSE $7 END \
         WHERE id = $1 AND high_noise_lora_url = $2"
    )
});

/// One of an avatar's LoRA files: every LoRA has its main file; Wan 2.2's has a second, for
/// the high-noise transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFile {
    Main,
    HighNoise,
}

impl LoraFile {
    pub const ALL: [LoraFile; 2] = [LoraFile::Main, LoraFile::HighNoise];

    /// Where FAL serves this file of the avatar's, if it has one.
    pub fn url(self, avatar: &Avatar) -> Option<&str> {
        match self {
            Self::Main => avatar.lora_url.as_deref(),
            Self::HighNoise => avatar.high_noise_lora_url.as_deref(),
        }
    }

    /// falgate's copy of this file of the avatar's, once taken.
    pub fn copy(self, avatar: &Avatar) -> Option<&LoraCopy> {
        match self {
            Self::Main => avatar.lora_copy.as_ref(),
            Self::HighNoise => avatar.high_noise_copy.as_ref(),
        }
    }

    /// The name an upload of the file carries.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Main => "pytorch_lora_weights.safetensors",
            Self::HighNoise => "high_noise_lora.safetensors",
        }
    }
}

/// What became of a LoRA copy offered to an avatar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyRecorded {
    /// The copy is the avatar's; `replaced` holds the keys of copies that are no longer any
    /// of the avatar's files (the one this copy replaced; a high-noise file's, once weights of
    /// one file replaced Wan's two), whose files are to be removed.
    Kept { replaced: Vec<String> },
    /// The avatar's weights changed (or it is gone) meanwhile; `current` is the key of the
    /// copy it holds now, whose file must stay.
    Stale { current: Option<String> },
}

/// Where falgate keeps its copy of a LoRA file, and what it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoraCopy {
    pub key: String,
    pub sha256: String,
    pub bytes: i64,
}

impl Store {
    /// Avatars with a current LoRA file that has no copy of ours yet, not deferred past
    /// `now` (a failed copy is deferred, so a few dead URLs never hold up the others).
    pub async fn avatars_missing_lora_copy(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Avatar>> {
        self.avatars_due(&MISSING_COPY, now, limit).await
    }

    /// Records the copy of the avatar's `file`, taken from `lora_url` (FAL served it at `at`;
    /// the next check is due at `next_check_at`), unless a newer training replaced that URL
    /// meanwhile.
    pub async fn record_lora_copy(
        &self,
        avatar_id: Uuid,
        file: LoraFile,
        lora_url: &str,
        copy: &LoraCopy,
        at: DateTime<Utc>,
        next_check_at: DateTime<Utc>,
    ) -> StoreResult<CopyRecorded> {
        let mut tx = self.writer().begin().await?;
        let Some(locked) = self.lock_avatar(&mut tx, avatar_id).await? else {
            return Ok(CopyRecorded::Stale { current: None });
        };
        let (previous, update) = match file {
            LoraFile::Main => (locked.lora_copy_key, RECORD_MAIN_COPY.as_str()),
            LoraFile::HighNoise => (
                locked.high_noise_copy_key.clone(),
                RECORD_HIGH_NOISE_COPY.as_str(),
            ),
        };
        let written = tx
            .conn()
            .execute(
                update,
                &[
                    avatar_id.into(),
                    lora_url.into(),
                    (&copy.key).into(),
                    (&copy.sha256).into(),
                    copy.bytes.into(),
                    at.into(),
                    next_check_at.into(),
                ],
            )
            .await?;
        if written == 0 {
            tx.commit().await?;
            return Ok(CopyRecorded::Stale { current: previous });
        }
        let mut replaced: Vec<String> = previous
            .into_iter()
            .filter(|key| *key != copy.key)
            .collect();
        // Weights of one file after Wan's two: the old high-noise copy is no file of the
        // avatar's any more, and nothing else would ever remove it.
        if let (LoraFile::Main, None, Some(stale)) = (
            file,
            &locked.high_noise_lora_url,
            locked.high_noise_copy_key,
        ) {
            tx.conn()
                .execute(
                    "UPDATE avatars SET high_noise_copy_key = NULL, high_noise_copy_sha256 = NULL, \
                     high_noise_copy_bytes = NULL, high_noise_copy_url = NULL \
                     WHERE id = $1 AND high_noise_lora_url IS NULL",
                    &[avatar_id.into()],
                )
                .await?;
            replaced.push(stale);
        }
        tx.commit().await?;
        Ok(CopyRecorded::Kept { replaced })
    }

    /// Avatars whose kept LoRA files (every one copied) are due a check that FAL still serves
    /// them.
    pub async fn avatars_due_lora_check(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Avatar>> {
        self.avatars_due(&DUE_CHECK, now, limit).await
    }

    /// Up to `limit` avatars that `query` finds due at `now`, the longest waiting first.
    async fn avatars_due(
        &self,
        query: &'static str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Avatar>> {
        let rows = self
            .fetch_all(query, &[now.into(), i64::from(limit).into()])
            .await?;
        avatars_from_rows(rows)
    }

    /// FAL served the avatar's files, `lora_url` its main one, at `at`; the next check is due
    /// at `next_check_at`. Nothing changes if the avatar's weights did.
    pub async fn record_lora_check(
        &self,
        avatar_id: Uuid,
        lora_url: &str,
        at: DateTime<Utc>,
        next_check_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.writer()
            .execute(
                "UPDATE avatars SET lora_checked_at = $3, lora_next_try_at = $4 \
                 WHERE id = $1 AND lora_url = $2",
                &[
                    avatar_id.into(),
                    lora_url.into(),
                    at.into(),
                    next_check_at.into(),
                ],
            )
            .await?;
        Ok(())
    }

    /// Copying or checking `lora_url` failed: no worker tries it again before `until`.
    pub async fn defer_lora_work(
        &self,
        avatar_id: Uuid,
        lora_url: &str,
        until: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.writer()
            .execute(
                "UPDATE avatars SET lora_next_try_at = $3 WHERE id = $1 AND lora_url = $2",
                &[avatar_id.into(), lora_url.into(), until.into()],
            )
            .await?;
        Ok(())
    }

    /// Points the avatar's `file` at a new upload (made at `at`) of the weights its copy
    /// holds, unless a training changed them meanwhile; answers whether it did.
    pub async fn replace_lora_url(
        &self,
        avatar_id: Uuid,
        file: LoraFile,
        expired_url: &str,
        new_url: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let update = match file {
            LoraFile::Main => {
                "UPDATE avatars SET lora_url = $3, lora_copy_url = $3, updated_at = $4 \
                 WHERE id = $1 AND lora_url = $2 AND lora_copy_url = $2"
            }
            LoraFile::HighNoise => {
                "UPDATE avatars SET high_noise_lora_url = $3, high_noise_copy_url = $3, \
                 updated_at = $4 \
                 WHERE id = $1 AND high_noise_lora_url = $2 AND high_noise_copy_url = $2"
            }
        };
        let written = self
            .writer()
            .execute(
                update,
                &[
                    avatar_id.into(),
                    expired_url.into(),
                    new_url.into(),
                    at.into(),
                ],
            )
            .await?;
        Ok(written == 1)
    }
}
