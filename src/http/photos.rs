//! `/v1/avatars/{id}/photos`: training photos, each checked by its bytes and kept in falgate's
//! own storage.

use super::auth::Tenant;
use super::avatars::find_avatar;
use super::extract::{ApiJson, ApiPathId, PhotoPath};
use super::idempotency::{self, MaybeIdempotencyKey, Replayable};
use crate::blobs::BlobWriter;
use crate::domain::photo::{
    CheckedPhoto, MAX_CAPTION_CHARS, PhotoLimits, PhotoProblem, SNIFF_BYTES, check_size,
    decode_photo, parse_caption, sniff,
};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::state::AppState;
use crate::store::{Photo, PhotoAdded};
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Serialize, ToSchema)]
pub struct PhotoView {
    pub id: Uuid,
    pub avatar_id: Uuid,
    /// The name the file was uploaded under.
    pub file_name: Option<String>,
    /// The caption given with it: trainers that read captions get it after the trigger
    /// phrase, in a text file beside the photo.
    pub caption: Option<String>,
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
            caption: p.caption,
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

/// The multipart form of an upload: one or many files, in any field, each file part
/// optionally followed by a text part named `caption`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PhotoUpload {
    /// One part per photo; at most as many as an avatar may hold (the server's
    /// `FALGATE_MAX_PHOTOS`).
    #[schema(value_type = Vec<String>, format = Binary, min_items = 1)]
    pub files: Vec<Vec<u8>>,
    /// The caption of the file part just before it: one line, up to 500 characters, what the
    /// photo shows besides its subject ("in a red coat, at the beach"). Trainers that read
    /// captions get the trigger phrase, then this, in a text file beside the photo.
    #[schema(max_length = 500)]
    pub caption: Option<Vec<String>>,
}

/// Upload photos
///
/// Each file is checked on its own: JPEG, PNG or WEBP by its bytes (not its name), not empty,
/// within the size limit, decoded in full (a truncated or damaged picture is refused), at most
/// 12000 px a side and 40 megapixels, shorter side at least 512 px as displayed (after its EXIF
/// orientation), not the same bytes as another photo of the avatar, within the avatar's photo
/// limit. If any file is refused the answer is a 422 naming each refused file and why in
/// `errors`; the accepted ones are kept either way, and listed by id in `accepted`. Such a 422
/// does not use up the Idempotency-Key: sent again, the kept files are refused as duplicates
/// naming their photos.
///
/// A text part named `caption` right after a file part is that photo's caption (one line, up
/// to 500 characters). A caption before any file, two for one file, or one that is blank, too
/// long or not one line is a 422 naming it, and nothing of the upload is kept.
///
/// The whole request body is held to a limit (413 past it), and so is the number of files in
/// one upload (the most photos an avatar may hold). Only so many uploads are processed at once:
/// one more is answered 503 at once, with `Retry-After`.
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
        (status = 404, description = "No such avatar for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The request body is over the upload limit; nothing was kept.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not multipart/form-data.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Some files were refused (each named in `errors`); the others were kept (their ids in `accepted`). Or the form holds no file, more files than an avatar may hold, or a caption part that describes no file or is not one line of up to 500 characters (then nothing was kept).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "As many uploads as allowed are already being processed; retry after `Retry-After` seconds.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, avatar = %id))]
pub async fn upload_photos(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
    idempotency_key: MaybeIdempotencyKey,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let boundary = form_boundary(&headers)?;
    let limit = state.config.avatars.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large(limit));
    }
    find_avatar(&state, &tenant, id).await?;
    // Refused at once rather than queued: a queued upload would hold its connection and its
    // client's bytes while waiting, which is what the bound is there to prevent.
    let _permit = state
        .photo_uploads
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            tracing::warn!("photo upload refused: as many as allowed are under way");
            ApiError::Busy {
                detail: "as many photo uploads as allowed are being processed; try again shortly"
                    .into(),
                retry_after_secs: UPLOAD_RETRY_AFTER_SECS,
            }
        })?;
    let files = receive_files(&state, body, boundary).await?;
    // Two uploads are the same request when they carry the same files, with the same
    // captions, in the same order.
    let mut canonical = Vec::new();
    for file in &files {
        canonical.extend_from_slice(file.name.as_bytes());
        canonical.push(0);
        canonical.extend_from_slice(&file.sha256);
        // Uploads without captions read as they did before captions existed, so that a
        // retry across an upgrade still finds its key.
        if let Some(caption) = &file.caption {
            canonical.push(0);
            canonical.extend_from_slice(caption.as_bytes());
            canonical.push(0);
        }
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
            let response = Replayable::new(StatusCode::CREATED, &body)?;
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

/// Seconds a client is asked to wait when every upload slot is taken.
const UPLOAD_RETRY_AFTER_SECS: u64 = 5;

fn too_large(limit: u64) -> ApiError {
    ApiError::PayloadTooLarge {
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
    }
}

/// One file of an upload, as received.
struct Received {
    /// The name it was sent under.
    name: String,
    /// The caption part that followed it, if one did.
    caption: Option<String>,
    sha256: [u8; 32],
    bytes: u64,
    /// Its first bytes, which tell its format.
    head: Vec<u8>,
    /// Its bytes, in a temporary file that goes away with the writer unless it is kept; `None`
    /// for a file over the size limit, whose bytes were counted and dropped.
    file: Option<BlobWriter>,
}

/// How far the bytes of a form may run ahead of the file contents read from it.
const FORM_SLACK: u64 = 1 << 20;

/// The boundary of a multipart/form-data body. Anything else, a JSON body above all, is told
/// what this endpoint takes, not how a multipart parser failed on it.
fn form_boundary(headers: &HeaderMap) -> ApiResult<String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let is_form = content_type
        .split(';')
        .next()
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("multipart/form-data"));
    if !is_form {
        return Err(ApiError::UnsupportedMediaType(
            "this endpoint takes multipart/form-data, one photo per file part".into(),
        ));
    }
    multer::parse_boundary(content_type).map_err(|_| {
        ApiError::UnsupportedMediaType(
            "this endpoint takes multipart/form-data with its `boundary` parameter, as HTTP \
             clients set it when sending a form"
                .into(),
        )
    })
}

/// Every file of the form, each streamed to a temporary file as it arrives: no file is held in
/// memory. A file over the size limit stops being written the moment it crosses it; the rest of
/// its bytes are read past (to reach the next file) and dropped.
async fn receive_files(state: &AppState, body: Body, boundary: String) -> ApiResult<Vec<Received>> {
    let limits = &state.config.avatars;
    let max_files = limits.max_photos as usize;
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().whole_stream(limits.max_upload_bytes));
    // The parser holds what it has not yet handed out as file contents (the preamble, a
    // part's headers): a form that runs far ahead of its files is refused, not buffered.
    let handed_out = Arc::new(AtomicU64::new(0));
    let mut received = 0u64;
    let watched = handed_out.clone();
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        received += chunk.len() as u64;
        if received > watched.load(Ordering::Relaxed) + FORM_SLACK {
            return Err(std::io::Error::other(format!(
                "more than {FORM_SLACK} bytes of it are neither files nor part headers"
            )));
        }
        Ok(chunk)
    });
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut files: Vec<Received> = Vec::new();
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|err| form_error(limits.max_upload_bytes, None, err))?
    {
        // Every part named `caption` is one, whether or not a client sent it as a file.
        if field.name() == Some("caption") {
            let Some(index) = files.len().checked_sub(1) else {
                return Err(ApiError::validation(
                    "caption",
                    "a caption part follows the file part it describes; this one comes first",
                ));
            };
            let label = format!("files[{index}] ({}) caption", files[index].name);
            let caption =
                read_caption(&mut field, &handed_out, limits.max_upload_bytes, &label).await?;
            if files[index].caption.replace(caption).is_some() {
                return Err(ApiError::validation(
                    label,
                    "a photo has one caption; this one has two caption parts",
                ));
            }
            continue;
        }
        if files.len() == max_files {
            return Err(ApiError::validation(
                "files",
                format!(
                    "an upload carries at most {max_files} files, the most photos an avatar may \
                     hold; this one has more"
                ),
            ));
        }
        let name = field
            .file_name()
            .or(field.name())
            .map(|n| n.chars().take(200).collect::<String>())
            .unwrap_or_else(|| format!("file {}", files.len() + 1));
        let mut file = Some(state.blobs.writer().await.map_err(ApiError::internal)?);
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|err| form_error(limits.max_upload_bytes, Some(&name), err))?
        {
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            handed_out.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let wanted = SNIFF_BYTES.saturating_sub(head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..wanted]);
            if bytes > limits.max_photo_bytes as u64 {
                if file.take().is_some() {
                    tracing::info!(file = %name, "a photo is over the size limit; not kept");
                }
                continue;
            }
            if let Some(writer) = file.as_mut() {
                writer.write(&chunk).await.map_err(ApiError::internal)?;
            }
        }
        files.push(Received {
            name,
            caption: None,
            sha256: hasher.finalize().into(),
            bytes,
            head,
            file,
        });
    }
    if files.is_empty() {
        return Err(ApiError::validation("files", "the form holds no file"));
    }
    Ok(files)
}

/// A caption part's text, checked (`domain::photo::parse_caption`); read up to a bound, so a
/// caption part cannot make the server hold much. A refusal names the caption by `label`.
async fn read_caption(
    field: &mut multer::Field<'_>,
    handed_out: &AtomicU64,
    limit: u64,
    label: &str,
) -> ApiResult<String> {
    // A character is at most four bytes, and blanks around it are trimmed.
    const MOST_BYTES: usize = MAX_CAPTION_CHARS * 4 + 64;
    let mut text = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|err| form_error(limit, Some(label), err))?
    {
        handed_out.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if text.len() + chunk.len() > MOST_BYTES {
            return Err(ApiError::validation(
                label,
                format!("a caption has at most {MAX_CAPTION_CHARS} characters"),
            ));
        }
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(text)
        .map_err(|_| ApiError::validation(label, "a caption is UTF-8 text"))?;
    parse_caption(&text).map_err(|why| ApiError::validation(label, why))
}

fn form_error(limit: u64, file: Option<&str>, err: multer::Error) -> ApiError {
    let why = match err {
        multer::Error::StreamSizeExceeded { .. } => return too_large(limit),
        // Our own refusal, or the connection's failure: its words say more than the parser's.
        multer::Error::StreamReadFailed(why) => why.to_string(),
        err => err.to_string(),
    };
    ApiError::BadRequest(match file {
        Some(name) => format!("`{name}` could not be read: {why}"),
        None => format!("the form could not be read: {why}"),
    })
}

/// Checks one received file: its size and format from what was counted while it arrived, then
/// its picture, decoded from the temporary file on a blocking thread.
async fn check_received(
    state: &AppState,
    file: &mut Received,
    limits: PhotoLimits,
) -> ApiResult<Result<CheckedPhoto, PhotoProblem>> {
    if let Err(problem) = check_size(file.bytes, limits) {
        return Ok(Err(problem));
    }
    let format = match sniff(&file.head) {
        Ok(format) => format,
        Err(problem) => return Ok(Err(problem)),
    };
    let writer = file
        .file
        .as_mut()
        .ok_or_else(|| ApiError::internal("a photo within the size limit was not kept"))?;
    writer.flush().await.map_err(ApiError::internal)?;
    let path = writer.path().to_owned();
    let permit = state
        .photo_decodes
        .clone()
        .acquire_owned()
        .await
        .map_err(ApiError::internal)?;
    let decoded = match tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let file = std::fs::File::open(path)?;
        Ok::<_, std::io::Error>(decode_photo(std::io::BufReader::new(file), format, limits))
    })
    .await
    {
        Ok(decoded) => decoded.map_err(ApiError::internal)?,
        // A decoder that panics on a file has met a file it cannot read: the file's fault.
        Err(err) if err.is_panic() => Err(PhotoProblem::Damaged {
            format: format.name(),
            reason: "the decoder could not read it".into(),
        }),
        Err(err) => return Err(ApiError::internal(err)),
    };
    Ok(decoded.map(|picture| CheckedPhoto {
        format,
        width: picture.width,
        height: picture.height,
        bytes: file.bytes as usize,
        sha256: hex::encode(file.sha256),
    }))
}

/// Checks each file and keeps the good ones; a 422 names every refused file.
async fn keep_photos(state: &AppState, id: Uuid, files: Vec<Received>) -> ApiResult<Vec<Photo>> {
    let limits = PhotoLimits {
        max_bytes: state.config.avatars.max_photo_bytes,
        ..PhotoLimits::default()
    };
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (index, mut file) in files.into_iter().enumerate() {
        let label = format!("files[{index}] ({})", file.name);
        let checked = match check_received(state, &mut file, limits).await? {
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
            file_name: Some(file.name),
            created_at: crate::domain::now(),
            caption: file.caption,
        };
        // The bytes first: a row never points at a file that is not there.
        let Some(writer) = file.file.take() else {
            return Err(ApiError::internal("a checked photo has no file"));
        };
        writer
            .finish(&photo.storage_key)
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
        (status = 404, description = "No such avatar for this API key.", body = Problem, content_type = "application/problem+json"),
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
        (status = 404, description = "No such photo.", body = Problem, content_type = "application/problem+json"),
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

/// A change to a photo.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePhotoRequest {
    /// The photo's caption: one line, up to 500 characters, what the photo shows besides its
    /// subject; `null` removes it. Required, so that an empty body removes nothing by mistake.
    #[schema(max_length = 500, nullable)]
    #[serde(deserialize_with = "present_or_null")]
    pub caption: Option<String>,
}

impl super::extract::AcrossFields for UpdatePhotoRequest {}

/// A field that must be sent, as a value or as `null`.
fn present_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// Caption a photo
///
/// Sets or removes the caption a training puts beside the photo; a training already running
/// keeps the captions it started with.
#[utoipa::path(
    patch,
    path = "/v1/avatars/{id}/photos/{photo_id}",
    tag = "avatars",
    params(
        ("id" = Uuid, Path, description = "The avatar's id."),
        ("photo_id" = Uuid, Path, description = "The photo's id."),
    ),
    request_body = UpdatePhotoRequest,
    responses(
        (status = 200, description = "The photo as it is now.", body = PhotoView),
        (status = 400, description = "The body is not JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such photo.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over the size limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not sent as JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The caption is missing or not one line of up to 500 characters; nothing was changed.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, avatar = %path.avatar))]
pub async fn update_photo(
    State(state): State<AppState>,
    tenant: Tenant,
    path: PhotoPath,
    body: ApiJson<UpdatePhotoRequest>,
) -> ApiResult<Json<PhotoView>> {
    let caption = body
        .value
        .caption
        .as_deref()
        .map(parse_caption)
        .transpose()
        .map_err(|why| ApiError::validation("caption", why))?;
    find_avatar(&state, &tenant, path.avatar).await?;
    state
        .store
        .set_photo_caption(path.avatar, path.photo, caption.as_deref())
        .await?
        .map(|photo| Json(photo.into()))
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
        (status = 404, description = "No such photo.", body = Problem, content_type = "application/problem+json"),
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
