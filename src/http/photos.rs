//! `/v1/avatars/{id}/photos`: training photos, each checked by its bytes and kept in falgate's
//! own storage.

use super::auth::Tenant;
use super::avatars::find_avatar;
use super::extract::{ApiPathId, PhotoPath};
use super::idempotency::{self, MaybeIdempotencyKey, Replayable};
use crate::app::AppState;
use crate::domain::photo::{PhotoLimits, check_photo};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::store::{Photo, PhotoAdded};
use axum::Json;
use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Serialize, ToSchema)]
pub struct PhotoView {
    pub id: Uuid,
    pub avatar_id: Uuid,
    /// The name the file was uploaded under.
    pub file_name: Option<String>,
    pub content_type: String,
    pub width: i32,
    pub height: i32,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
}

impl From<Photo> for PhotoView {
    fn from(p: Photo) -> Self {
        Self {
            id: p.id,
            avatar_id: p.avatar_id,
            file_name: p.file_name,
            content_type: p.content_type,
            width: p.width,
            height: p.height,
            bytes: p.bytes,
            sha256: p.sha256,
            created_at: p.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PhotoList {
    pub items: Vec<PhotoView>,
}

/// The multipart form of an upload: one or many files, in any field.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PhotoUpload {
    #[schema(value_type = Vec<String>, format = Binary)]
    pub files: Vec<Vec<u8>>,
}

/// Upload photos
///
/// Each file is checked on its own: JPEG, PNG or WEBP by its bytes (not its name), not empty,
/// within the size limit, shorter side at least 512 px, not the same bytes as another photo of
/// the avatar, within the avatar's photo limit. If any file is refused the answer is a 422
/// naming each refused file and why in `errors`; the accepted ones are kept either way, and
/// listed by id in `accepted`. Such a 422 does not use up the Idempotency-Key: sent again, the
/// kept files are refused as duplicates naming their photos.
#[utoipa::path(
    post,
    path = "/v1/avatars/{id}/photos",
    tag = "avatars",
    params(
        ("id" = Uuid, Path, description = "The avatar's id."),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe."),
    ),
    request_body(content = PhotoUpload, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Every file was accepted.", body = PhotoList),
        (status = 400, description = "The body is not a readable multipart form.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such avatar for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The upload is over the size limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not multipart/form-data.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Some files were refused (each named in `errors`); the others were kept (their ids in `accepted`).", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, avatar = %id))]
pub async fn upload_photos(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
    idempotency_key: MaybeIdempotencyKey,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let form = form.map_err(|rejection| {
        ApiError::UnsupportedMediaType(format!(
            "photos are sent as multipart/form-data, one file per part: {rejection}"
        ))
    })?;
    find_avatar(&state, &tenant, id).await?;
    let files = read_files(&state, form).await?;
    // Two uploads are the same request when they carry the same files in the same order.
    let mut canonical = Vec::new();
    for (name, bytes) in &files {
        canonical.extend_from_slice(name.as_bytes());
        canonical.push(0);
        canonical.extend_from_slice(&Sha256::digest(bytes));
    }
    let store = state.store.clone();
    let route = format!("POST /v1/avatars/{id}/photos");
    idempotency::run_once(
        &store,
        tenant.id,
        idempotency_key,
        &route,
        &canonical,
        |scope| async move {
            let accepted = keep_photos(&state, id, files).await?;
            let body = PhotoList {
                items: accepted.into_iter().map(PhotoView::from).collect(),
            };
            let response = Replayable {
                status: StatusCode::CREATED,
                body: serde_json::to_value(body).map_err(ApiError::internal)?,
            };
            // Photos are stored one by one, so the answer is remembered after them; a retry after
            // a crash in between finds each photo there already and names it a duplicate.
            if let Some(completion) = scope.completion(&response)? {
                state.store.complete_idempotency_key(&completion).await?;
            }
            Ok(response)
        },
    )
    .await
}

/// Every file of the form, with the name it was sent under.
async fn read_files(state: &AppState, mut form: Multipart) -> ApiResult<Vec<(String, Bytes)>> {
    let mut files = Vec::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(err) if err.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::PayloadTooLarge {
                    limit: state.config.avatars.max_photo_bytes
                        * state.config.avatars.max_photos as usize,
                });
            }
            Err(err) => {
                return Err(ApiError::BadRequest(format!(
                    "the form could not be read: {err}"
                )));
            }
        };
        let name = field
            .file_name()
            .or(field.name())
            .map(|n| n.chars().take(200).collect::<String>())
            .unwrap_or_else(|| format!("file {}", files.len() + 1));
        let bytes = field.bytes().await.map_err(|err| {
            if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.config.avatars.max_photo_bytes
                        * state.config.avatars.max_photos as usize,
                }
            } else {
                ApiError::BadRequest(format!("`{name}` could not be read: {err}"))
            }
        })?;
        files.push((name, bytes));
    }
    if files.is_empty() {
        return Err(ApiError::validation("files", "the form holds no file"));
    }
    Ok(files)
}

/// Checks each file and keeps the good ones; a 422 names every refused file.
async fn keep_photos(
    state: &AppState,
    id: Uuid,
    files: Vec<(String, Bytes)>,
) -> ApiResult<Vec<Photo>> {
    let limits = PhotoLimits {
        max_bytes: state.config.avatars.max_photo_bytes,
        ..PhotoLimits::default()
    };
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (index, (name, bytes)) in files.into_iter().enumerate() {
        let label = format!("files[{index}] ({name})");
        let checked = match check_photo(&bytes, limits) {
            Ok(checked) => checked,
            Err(problem) => {
                refused.push(FieldError::new(label, problem.to_string()));
                continue;
            }
        };
        let photo_id = Uuid::now_v7();
        let photo = Photo {
            id: photo_id,
            avatar_id: id,
            sha256: checked.sha256.clone(),
            content_type: checked.format.content_type().to_owned(),
            width: i32::try_from(checked.width).unwrap_or(i32::MAX),
            height: i32::try_from(checked.height).unwrap_or(i32::MAX),
            bytes: checked.bytes as i64,
            storage_key: format!("photos/{id}/{photo_id}.{}", checked.format.extension()),
            file_name: Some(name),
            created_at: crate::domain::now(),
        };
        // The bytes first: a row never points at a file that is not there.
        state
            .blobs
            .put(&photo.storage_key, &bytes)
            .await
            .map_err(ApiError::internal)?;
        let added = match state
            .store
            .add_photo(&photo, state.config.avatars.max_photos)
            .await
        {
            Ok(added) => added,
            Err(err) => {
                let _ = state.blobs.delete(&photo.storage_key).await;
                return Err(err.into());
            }
        };
        match added {
            PhotoAdded::Added => accepted.push(photo),
            PhotoAdded::NoAvatar => {
                let _ = state.blobs.delete(&photo.storage_key).await;
                return Err(ApiError::NotFound(format!("no avatar {id}")));
            }
            other => {
                let _ = state.blobs.delete(&photo.storage_key).await;
                let message = match other {
                    PhotoAdded::Duplicate { existing } => {
                        format!("the same bytes are already photo {existing} of this avatar")
                    }
                    _ => format!(
                        "the avatar already has the most photos allowed ({})",
                        state.config.avatars.max_photos
                    ),
                };
                refused.push(FieldError::new(label, message));
            }
        }
    }
    if !refused.is_empty() {
        tracing::info!(
            accepted = accepted.len(),
            refused = refused.len(),
            "photos refused"
        );
        return Err(ApiError::PartlyRefused {
            refused,
            accepted: accepted.into_iter().map(|photo| photo.id).collect(),
        });
    }
    Ok(accepted)
}

/// List an avatar's photos
#[utoipa::path(
    get,
    path = "/v1/avatars/{id}/photos",
    tag = "avatars",
    params(("id" = Uuid, Path, description = "The avatar's id.")),
    responses(
        (status = 200, description = "The photos, oldest first.", body = PhotoList),
        (status = 401, description = "Missing or invalid API key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such avatar for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_photos(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<PhotoList>> {
    find_avatar(&state, &tenant, id).await?;
    let photos = state.store.list_photos(id).await?;
    Ok(Json(PhotoList {
        items: photos.into_iter().map(PhotoView::from).collect(),
    }))
}

/// Get a photo
#[utoipa::path(
    get,
    path = "/v1/avatars/{id}/photos/{photo_id}",
    tag = "avatars",
    params(
        ("id" = Uuid, Path, description = "The avatar's id."),
        ("photo_id" = Uuid, Path, description = "The photo's id."),
    ),
    responses(
        (status = 200, description = "The photo's details.", body = PhotoView),
        (status = 401, description = "Missing or invalid API key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such photo.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "An id is not a UUID.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_photo(
    State(state): State<AppState>,
    tenant: Tenant,
    path: PhotoPath,
) -> ApiResult<Json<PhotoView>> {
    find_avatar(&state, &tenant, path.avatar).await?;
    state
        .store
        .list_photos(path.avatar)
        .await?
        .into_iter()
        .find(|p| p.id == path.photo)
        .map(|p| Json(p.into()))
        .ok_or_else(|| ApiError::NotFound(format!("no photo {}", path.photo)))
}

/// Delete a photo
#[utoipa::path(
    delete,
    path = "/v1/avatars/{id}/photos/{photo_id}",
    tag = "avatars",
    params(
        ("id" = Uuid, Path, description = "The avatar's id."),
        ("photo_id" = Uuid, Path, description = "The photo's id."),
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "Missing or invalid API key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such photo.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "An id is not a UUID.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn delete_photo(
    State(state): State<AppState>,
    tenant: Tenant,
    path: PhotoPath,
) -> ApiResult<StatusCode> {
    find_avatar(&state, &tenant, path.avatar).await?;
    let photo = state
        .store
        .delete_photo(path.avatar, path.photo)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no photo {}", path.photo)))?;
    if let Err(err) = state.blobs.delete(&photo.storage_key).await {
        tracing::warn!(error = %err, "could not remove a deleted photo's file");
    }
    Ok(StatusCode::NO_CONTENT)
}
