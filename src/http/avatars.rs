//! `/v1/avatars`: an avatar is one trained identity or style. Its status follows its training
//! and its artifact is set only from FAL's result.

use super::auth::Tenant;
use super::extract::{ApiJson, ApiPathId, ApiQuery};
use super::idempotency::{self, MaybeIdempotencyKey, Replayable};
use super::paging::Keyset;
use crate::domain::avatar::{AvatarKind, AvatarStatus, default_trigger_phrase};
use crate::domain::job::{EventSource, JobEvent};
use crate::error::{ApiError, ApiResult, Problem};
use crate::state::AppState;
use crate::store::{Avatar, LoraFile, Transition};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAvatarRequest {
    /// A name for people, 1 to 100 characters.
    #[schema(example = "Ada", min_length = 1, max_length = 100, pattern = "\\S")]
    #[serde(deserialize_with = "avatar_name")]
    pub name: String,
    pub kind: AvatarKind,
    /// The words that call the avatar up in prompts, 1 to 50 characters; default `TOK_` and 8
    /// hex digits of its id.
    #[schema(min_length = 1, max_length = 50, pattern = "\\S")]
    #[serde(default, deserialize_with = "trigger_phrase")]
    pub trigger_phrase: Option<String>,
}

impl super::extract::AcrossFields for CreateAvatarRequest {}

// Checked while parsing, so that a wrong name is reported along with the body's other errors.

/// `text` trimmed, if it is 1 to `max` printable characters.
fn printable(text: &str, max: usize) -> Option<&str> {
    let text = text.trim();
    let fine =
        !text.is_empty() && text.chars().count() <= max && !text.chars().any(char::is_control);
    fine.then_some(text)
}

fn avatar_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    printable(&name, 100)
        .map(str::to_owned)
        .ok_or_else(|| serde::de::Error::custom("must be 1 to 100 printable characters"))
}

fn trigger_phrase<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|phrase| {
            printable(&phrase, 50)
                .map(str::to_owned)
                .ok_or_else(|| serde::de::Error::custom("must be 1 to 50 printable characters"))
        })
        .transpose()
}

/// The trained weights, as FAL produced them.
#[derive(Debug, Serialize, ToSchema)]
pub struct ArtifactView {
    /// A LoRA's weights (the trainer's `diffusers_lora_file.url`, or `lora_file.url`).
    pub lora_url: Option<String>,
    /// The LoRA's config (`config_file.url`).
    pub lora_config_url: Option<String>,
    /// A FLUX pro finetune's id.
    pub finetune_id: Option<String>,
    /// falgate's own copy of the LoRA weights (FAL's URLs expire), once taken; download it
    /// from `GET /v1/avatars/{id}/lora`.
    pub lora_copy: Option<LoraCopyView>,
    /// When FAL was last seen serving `lora_url` (and `high_noise_lora_url`): in the
    /// training's result, when falgate copied it, or at a check. FAL's files expire: falgate
    /// checks them every `FALGATE_LORA_CHECK_SECS`, and one FAL no longer serves is uploaded
    /// again from falgate's copy, the URL then naming the new upload. Empty for a finetune.
    pub lora_checked_at: Option<DateTime<Utc>>,
    /// Wan 2.2's second LoRA file, for its high-noise transformer (`high_noise_lora.url`);
    /// generations pass both files.
    pub high_noise_lora_url: Option<String>,
    /// falgate's own copy of that file, once taken; download it from
    /// `GET /v1/avatars/{id}/lora?file=high_noise`.
    pub high_noise_lora_copy: Option<LoraCopyView>,
    /// The trainer that made these weights (an id of `GET /v1/trainers`).
    pub trainer: Option<String>,
    /// The model family of these weights: `flux-1-dev`, `flux-1-pro-finetune`, `flux-2`,
    /// `qwen-image-2512`, `z-image-turbo`, `krea-2` or `wan-2.2`.
    pub base_family: Option<String>,
    /// The FAL endpoint generations with these weights go to.
    pub generation_endpoint: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoraCopyView {
    pub sha256: String,
    pub bytes: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AvatarErrorView {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AvatarView {
    pub id: Uuid,
    pub name: String,
    pub kind: AvatarKind,
    pub trigger_phrase: String,
    pub status: AvatarStatus,
    /// The latest training job.
    pub training_job_id: Option<Uuid>,
    /// Set only from a successful training's FAL result.
    pub artifact: Option<ArtifactView>,
    /// Why the latest training failed, if it did.
    pub error: Option<AvatarErrorView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Avatar> for AvatarView {
    fn from(a: Avatar) -> Self {
        let copy_view = |c: &crate::store::LoraCopy| LoraCopyView {
            sha256: c.sha256.clone(),
            bytes: c.bytes,
        };
        let artifact = (a.lora_url.is_some() || a.finetune_id.is_some()).then(|| ArtifactView {
            lora_url: a.lora_url.clone(),
            lora_config_url: a.lora_config_url.clone(),
            finetune_id: a.finetune_id.clone(),
            lora_copy: a.lora_copy.as_ref().map(copy_view),
            lora_checked_at: a.lora_checked_at,
            high_noise_lora_url: a.high_noise_lora_url.clone(),
            high_noise_lora_copy: a.high_noise_copy.as_ref().map(copy_view),
            trainer: a.trainer.clone(),
            base_family: a.base_family.clone(),
            generation_endpoint: a
                .weights_family()
                .map(|family| family.generation_endpoint().to_owned()),
        });
        Self {
            id: a.id,
            name: a.name,
            kind: a.kind,
            trigger_phrase: a.trigger_phrase,
            status: a.status,
            training_job_id: a.training_job_id,
            artifact,
            error: a.error_code.map(|code| AvatarErrorView {
                code,
                message: a.error_message.unwrap_or_default(),
            }),
            created_at: a.created_at,
            updated_at: a.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AvatarPage {
    pub items: Vec<AvatarView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListAvatarsQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    #[serde(default, deserialize_with = "super::paging::page_limit")]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    #[serde(default, deserialize_with = "super::paging::avatar_cursor")]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LoraDownloadQuery {
    /// Which file: `main` (default), or `high_noise`, Wan 2.2's second file.
    pub file: Option<LoraFileName>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoraFileName {
    #[default]
    Main,
    HighNoise,
}

/// Create an avatar
#[utoipa::path(
    post,
    path = "/v1/avatars",
    tag = "avatars",
    request_body = CreateAvatarRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe.")),
    responses(
        (status = 201, description = "The avatar, in `draft`.", body = AvatarView),
        (status = 400, description = "The body is not JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The Idempotency-Key is in use.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id))]
pub async fn create_avatar(
    State(state): State<AppState>,
    tenant: Tenant,
    idempotency_key: MaybeIdempotencyKey,
    body: ApiJson<CreateAvatarRequest>,
) -> ApiResult<Response> {
    let ApiJson {
        value: request,
        canonical,
    } = body;
    let name = request.name;
    let trigger = request.trigger_phrase;
    let store = state.store.clone();
    idempotency::run_once(
        &store,
        tenant.id,
        idempotency_key,
        "POST /v1/avatars",
        &canonical,
        |scope| async move {
            let id = Uuid::now_v7();
            let now = crate::domain::now();
            let avatar = Avatar {
                id,
                tenant: tenant.id,
                name,
                kind: request.kind,
                trigger_phrase: trigger.unwrap_or_else(|| default_trigger_phrase(id)),
                status: AvatarStatus::Draft,
                training_job_id: None,
                lora_url: None,
                lora_config_url: None,
                finetune_id: None,
                error_code: None,
                error_message: None,
                lora_copy: None,
                lora_checked_at: None,
                trainer: None,
                base_family: None,
                high_noise_lora_url: None,
                high_noise_copy: None,
                created_at: now,
                updated_at: now,
            };
            let response = Replayable::new(StatusCode::CREATED, &AvatarView::from(avatar.clone()))?;
            state
                .store
                .create_avatar(&avatar, scope.completion(&response)?.as_ref())
                .await?;
            Ok(response)
        },
    )
    .await
}

/// List avatars
#[utoipa::path(
    get,
    path = "/v1/avatars",
    tag = "avatars",
    params(ListAvatarsQuery),
    responses(
        (status = 200, description = "A page of avatars, newest first.", body = AvatarPage),
        (status = 422, description = "A query parameter is invalid.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_avatars(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(query): ApiQuery<ListAvatarsQuery>,
) -> ApiResult<Json<AvatarPage>> {
    let keyset = Keyset::parse(super::paging::AVATARS, query.limit, query.cursor.as_deref())?;
    let avatars = state
        .store
        .list_avatars(tenant.id, keyset.after, keyset.fetch_limit())
        .await?;
    let (avatars, next_cursor) = keyset.page(avatars, |avatar| avatar.id);
    Ok(Json(AvatarPage {
        items: avatars.into_iter().map(AvatarView::from).collect(),
        next_cursor,
    }))
}

/// Get an avatar
#[utoipa::path(
    get,
    path = "/v1/avatars/{id}",
    tag = "avatars",
    params(("id" = Uuid, Path, description = "The avatar's id.")),
    responses(
        (status = 200, description = "The avatar.", body = AvatarView),
        (status = 404, description = "No such avatar for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_avatar(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<AvatarView>> {
    Ok(Json(find_avatar(&state, &tenant, id).await?.into()))
}

pub(super) async fn find_avatar(state: &AppState, tenant: &Tenant, id: Uuid) -> ApiResult<Avatar> {
    state
        .store
        .get_avatar(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no avatar {id}")))
}

/// Delete an avatar
///
/// Cancels its training first if one is in flight, then removes the avatar and its photos.
/// Its jobs stay, with their history.
#[utoipa::path(
    delete,
    path = "/v1/avatars/{id}",
    tag = "avatars",
    params(("id" = Uuid, Path, description = "The avatar's id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "No such avatar for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, avatar = %id))]
pub async fn delete_avatar(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<StatusCode> {
    let deleted = state
        .store
        .delete_avatar(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no avatar {id}")))?;
    // The training that was running when the row was deleted (read under its lock): cancel it,
    // so that nothing trains, and bills, for an avatar that is gone.
    if let Some(job_id) = deleted.training_to_cancel {
        let now = crate::domain::now();
        let cancel = Transition::new(JobEvent::CancelRequested, EventSource::Api, now)
            .with_detail(serde_json::json!({"reason": "the avatar was deleted"}))
            .with_next_attempt(now);
        state.store.apply(Some(tenant.id), job_id, &cancel).await?;
        state.wake.reconciler.notify_one();
    }
    let files = deleted
        .photos
        .iter()
        .map(|p| p.storage_key.clone())
        .chain(deleted.lora_copy_keys);
    for key in files {
        if let Err(err) = state.blobs.delete(&key).await {
            tracing::warn!(error = %err, "could not remove a deleted avatar's file");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Download the avatar's LoRA weights
///
/// falgate's own copy of the trained LoRA file, kept because FAL's file URLs expire.
#[utoipa::path(
    get,
    path = "/v1/avatars/{id}/lora",
    tag = "avatars",
    params(("id" = Uuid, Path, description = "The avatar's id."), LoraDownloadQuery),
    responses(
        (status = 200, description = "The safetensors file.", body = super::spec::Binary, content_type = "application/octet-stream"),
        (status = 404, description = "No such avatar, or no copy of that LoRA file (yet).", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A query parameter is invalid.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn download_lora(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
    ApiQuery(query): ApiQuery<LoraDownloadQuery>,
) -> ApiResult<Response> {
    let avatar = find_avatar(&state, &tenant, id).await?;
    let (file, suffix) = match query.file.unwrap_or_default() {
        LoraFileName::Main => (LoraFile::Main, ""),
        LoraFileName::HighNoise => (LoraFile::HighNoise, "-high-noise"),
    };
    let copy = file.copy(&avatar).cloned().ok_or_else(|| {
        ApiError::NotFound(match (file, &avatar.high_noise_lora_url) {
            (LoraFile::HighNoise, None) => format!("avatar {id} has no high-noise LoRA file"),
            _ => format!("avatar {id} has no copy of that LoRA file (yet)"),
        })
    })?;
    let body = state
        .blobs
        .stream(&copy.key)
        .await
        .ok_or_else(|| ApiError::NotFound(format!("avatar {id}'s LoRA copy is missing")))?;
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(value) = axum::http::HeaderValue::from_str(&format!(
        "attachment; filename=\"avatar-{id}{suffix}.safetensors\""
    )) {
        headers.insert(axum::http::header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
