//! An avatar's training photos: their rows here, their bytes in the blob store.

use super::{Store, StoreResult};
use chrono::{DateTime, Utc};
use std::sync::LazyLock;
use uuid::Uuid;

/// The columns every photo query selects, in `Photo`'s order.
pub(super) const PHOTO_COLUMNS: &str = "id, avatar_id, sha256, content_type, width, height, \
    bytes, storage_key, file_name, created_at, caption";

static LIST_PHOTOS: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {PHOTO_COLUMNS} FROM photos WHERE avatar_id = $1 ORDER BY id")
});

static GET_PHOTO: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {PHOTO_COLUMNS} FROM photos WHERE avatar_id = $1 AND id = $2")
});

/// A training photo as stored; its bytes are in the blob store under `storage_key`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Photo {
    pub id: Uuid,
    pub avatar_id: Uuid,
    pub sha256: String,
    pub content_type: String,
    pub width: i32,
    pub height: i32,
    pub bytes: i64,
    pub storage_key: String,
    pub file_name: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The client's caption of the photo, if it gave one.
    pub caption: Option<String>,
}

/// What adding a photo did.
#[derive(Debug, Clone, PartialEq)]
pub enum PhotoAdded {
    Added,
    /// The avatar already has a photo with these bytes.
    Duplicate {
        existing: Uuid,
    },
    /// The avatar has as many photos as it may.
    Full,
    /// The avatar is gone (deleted meanwhile).
    NoAvatar,
}

impl Store {
    pub async fn add_photo(&self, photo: &Photo, max_photos: u32) -> StoreResult<PhotoAdded> {
        let mut tx = self.writer().begin().await?;
        // The avatar's row is locked first: two uploads at once then count and compare one
        // after the other, and an avatar deleted meanwhile is seen.
        if self.lock_avatar(&mut tx, photo.avatar_id).await?.is_none() {
            return Ok(PhotoAdded::NoAvatar);
        }
        let existing: Option<(Uuid,)> = tx
            .conn()
            .fetch_optional(
                "SELECT id FROM photos WHERE avatar_id = $1 AND sha256 = $2",
                &[photo.avatar_id.into(), (&photo.sha256).into()],
            )
            .await?;
        if let Some((existing,)) = existing {
            return Ok(PhotoAdded::Duplicate { existing });
        }
        let (count,): (i64,) = tx
            .conn()
            .fetch_one(
                "SELECT COUNT(*) FROM photos WHERE avatar_id = $1",
                &[photo.avatar_id.into()],
            )
            .await?;
        if count >= i64::from(max_photos) {
            return Ok(PhotoAdded::Full);
        }
        tx.conn()
            .execute(
                "INSERT INTO photos (id, avatar_id, sha256, content_type, width, height, bytes, \
                 storage_key, file_name, created_at, caption) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    photo.id.into(),
                    photo.avatar_id.into(),
                    (&photo.sha256).into(),
                    (&photo.content_type).into(),
                    photo.width.into(),
                    photo.height.into(),
                    photo.bytes.into(),
                    (&photo.storage_key).into(),
                    (&photo.file_name).into(),
                    photo.created_at.into(),
                    (&photo.caption).into(),
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(PhotoAdded::Added)
    }

    pub async fn list_photos(&self, avatar_id: Uuid) -> StoreResult<Vec<Photo>> {
        self.fetch_all(&LIST_PHOTOS, &[avatar_id.into()]).await
    }

    pub async fn delete_photo(
        &self,
        avatar_id: Uuid,
        photo_id: Uuid,
    ) -> StoreResult<Option<Photo>> {
        let mut tx = self.writer().begin().await?;
        let photo: Option<Photo> = tx
            .conn()
            .fetch_optional(&GET_PHOTO, &[avatar_id.into(), photo_id.into()])
            .await?;
        if photo.is_some() {
            tx.conn()
                .execute("DELETE FROM photos WHERE id = $1", &[photo_id.into()])
                .await?;
        }
        tx.commit().await?;
        Ok(photo)
    }

    /// Sets (or with `None` removes) a photo's caption; answers the photo as it is now, or
    /// `None` when the avatar has no such photo.
    pub async fn set_photo_caption(
        &self,
        avatar_id: Uuid,
        photo_id: Uuid,
        caption: Option<&str>,
    ) -> StoreResult<Option<Photo>> {
        let mut tx = self.writer().begin().await?;
        let changed = tx
            .conn()
            .execute(
                "UPDATE photos SET caption = $3 WHERE avatar_id = $1 AND id = $2",
                &[avatar_id.into(), photo_id.into(), caption.into()],
            )
            .await?;
        let photo = if changed == 1 {
            tx.conn()
                .fetch_optional(&GET_PHOTO, &[avatar_id.into(), photo_id.into()])
                .await?
        } else {
            None
        };
        tx.commit().await?;
        Ok(photo)
    }
}
