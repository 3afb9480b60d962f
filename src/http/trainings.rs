//! `POST /v1/avatars/{id}/trainings`: train an avatar with the trainer its kind calls for (or
//! the one named), a preset, and single-field overrides. Without `images_data_url`, the
//! avatar's own photos are zipped and uploaded to FAL's storage first.

use super::auth::Tenant;
use super::avatars::find_avatar;
use super::extract::{ApiJson, ApiPathId};
use super::idempotency::{self, MaybeIdempotencyKey, Replayable};
use super::jobs::JobView;
use super::webhook_endpoints::{RequestWebhook, check_request_webhook};
use crate::domain::archive::{Entry, zip};
use crate::domain::avatar::{
    Trainer, TrainerChoice, TrainingPreset, TrainingSpec, caption_file, training_input,
};
use crate::domain::job::JobKind;
use crate::domain::trainers::{self, TrainerStatus};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::state::AppState;
use crate::store::{NewJob, TrainingStart};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartTrainingRequest {
    /// The trainer: `auto` (characters get `portrait`, the other kinds `fast_lora`),
    /// `portrait`, `fast_lora`, or `pro` (deprecated by FAL: refused unless the server allows
    /// deprecated trainers). `GET /v1/trainers` describes each.
    #[serde(default)]
    pub model: TrainerChoice,
    /// A trainer by its id in `GET /v1/trainers` (any of them, the newer model families'
    /// included), instead of `model`.
    #[schema(example = "flux_2")]
    pub trainer: Option<String>,
    /// `fast`, `balanced` (default) or `quality`.
    #[serde(default)]
    pub preset: TrainingPreset,
    /// Single fields of the chosen trainer to set, checked against FAL's ranges.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub overrides: Map<String, Value>,
    /// A public http(s) URL of a ZIP of photos; without it the avatar's uploaded photos are used.
    #[schema(pattern = "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]+")]
    pub images_data_url: Option<String>,
    /// A webhook for the training job's events alone.
    pub webhook: Option<RequestWebhook>,
}

impl super::extract::AcrossFields for StartTrainingRequest {}

/// Train an avatar
#[utoipa::path(
    post,
    path = "/v1/avatars/{id}/trainings",
    tag = "avatars",
    params(
        ("id" = Uuid, Path, description = "The avatar's id."),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe."),
    ),
    request_body = StartTrainingRequest,
    responses(
        (status = 202, description = "The training job; the exact FAL input is its `input`.", body = JobView),
        (status = 404, description = "No such avatar for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The avatar is training already.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Too few photos, or a field is invalid.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "FAL's storage could not take the photos; retry.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id, avatar = %id))]
pub async fn start_training(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
    idempotency_key: MaybeIdempotencyKey,
    body: ApiJson<StartTrainingRequest>,
) -> ApiResult<Response> {
    let ApiJson {
        value: request,
        canonical,
    } = body;
    let avatar = find_avatar(&state, &tenant, id).await?;
    let mut errors = Vec::new();
    if let Some(url) = &request.images_data_url {
        let fine = reqwest::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
        if !fine {
            errors.push(FieldError::new("images_data_url", "must be an http(s) URL"));
        }
    }
    let (trainer, named_by) = match (&request.trainer, request.model) {
        (None, model) => (model.resolve(avatar.kind), "model"),
        (Some(_), model) if model != TrainerChoice::Auto => {
            errors.push(FieldError::new(
                "trainer",
                "name the trainer by `trainer` or by `model`, not both",
            ));
            return Err(ApiError::Validation(errors));
        }
        (Some(id), _) => match Trainer::from_id(id) {
            Some(trainer) => (trainer, "trainer"),
            None => {
                let known: Vec<&str> = trainers::all().iter().map(|t| t.id).collect();
                errors.push(FieldError::new(
                    "trainer",
                    format!(
                        "no trainer `{id}`; `GET /v1/trainers` lists them: {}",
                        known.join(", ")
                    ),
                ));
                return Err(ApiError::Validation(errors));
            }
        },
    };
    if let TrainerStatus::Deprecated { replacement } = trainer.entry().status
        && !state.config.avatars.allow_deprecated_trainers
    {
        errors.push(FieldError::new(
            named_by,
            format!(
                "FAL has deprecated {} and no longer trains with it; use `{replacement}` \
                 (avatars trained on it before keep generating)",
                trainer.entry().endpoint
            ),
        ));
    }
    // Check the request in full before anything is uploaded.
    let placeholder = "https://example.invalid/photos.zip";
    let check = TrainingSpec {
        trainer,
        preset: request.preset,
        kind: avatar.kind,
        avatar_id: avatar.id,
        avatar_name: &avatar.name,
        trigger_phrase: &avatar.trigger_phrase,
        data_url: placeholder,
        overrides: &request.overrides,
    };
    if let Err(problems) = training_input(&check) {
        errors.extend(
            problems
                .into_iter()
                .map(|p| FieldError::new(p.field, p.message)),
        );
    }
    let webhook = check_request_webhook(&state, request.webhook.clone(), &mut errors).await?;
    // The avatar's state is looked at only once the request is known to be right.
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let store = state.store.clone();
    let route = format!("POST /v1/avatars/{id}/trainings");
    idempotency::run_once(
        &store,
        tenant.id,
        idempotency_key,
        &route,
        &canonical,
        // A replay answers before any of the avatar's current state is looked at.
        |scope| async move {
            if avatar.status == crate::domain::avatar::AvatarStatus::Training {
                return Err(busy(id));
            }
            let data_url = match request.images_data_url.clone() {
                Some(url) => url,
                None => {
                    let photos = state.store.list_photos(id).await?;
                    let need = state.config.avatars.min_photos as usize;
                    if photos.len() < need {
                        return Err(ApiError::Unprocessable {
                            code: "insufficient_photos",
                            detail: format!(
                                "the avatar has {} photo(s); a training needs at least {need}",
                                photos.len()
                            ),
                        });
                    }
                    upload_photos(&state, id, &photos, trainer, check.trigger_phrase).await?
                }
            };
            let spec = TrainingSpec {
                data_url: &data_url,
                ..check
            };
            let input = training_input(&spec)
                .map_err(|_| ApiError::internal("a checked training input failed"))?;
            let new = NewJob {
                id: Uuid::now_v7(),
                tenant: tenant.id,
                kind: JobKind::Training,
                avatar_id: Some(id),
                batch_id: None,
                endpoint: trainer.endpoint().to_owned(),
                input,
                sandbox: state.sandbox(),
                idempotency_key: scope.key().map(str::to_owned),
                created_at: crate::domain::now(),
            };
            let response =
                Replayable::new(StatusCode::ACCEPTED, &JobView::from(new.to_pending_job()))?;
            let webhook = match webhook {
                Some(webhook) => Some(webhook.for_resource(&state, tenant.id, new.id).await?),
                None => None,
            };
            match state
                .store
                .start_training(
                    tenant.id,
                    &new,
                    scope.completion(&response)?.as_ref(),
                    webhook.as_ref(),
                )
                .await?
            {
                TrainingStart::Started(_) => {
                    state.wake.dispatcher.notify_one();
                    Ok(response)
                }
                TrainingStart::Busy => Err(busy(id)),
                TrainingStart::NoAvatar => Err(ApiError::NotFound(format!("no avatar {id}"))),
            }
        },
    )
    .await
}

fn busy(id: Uuid) -> ApiError {
    ApiError::ConflictCode {
        code: "avatar_training",
        detail: format!("avatar {id} is training already; wait for it to end or cancel its job"),
    }
}

/// Zips the photos (numbered, with their true extensions) and uploads the archive to FAL's
/// storage; answers the archive's URL.
async fn upload_photos(
    state: &AppState,
    avatar_id: Uuid,
    photos: &[crate::store::Photo],
    trainer: Trainer,
    trigger_phrase: &str,
) -> ApiResult<String> {
    let mut files = Vec::with_capacity(photos.len());
    let any_captioned = photos.iter().any(|photo| photo.caption.is_some());
    for (i, photo) in photos.iter().enumerate() {
        let bytes = state.blobs.get(&photo.storage_key).await.map_err(|_| {
            // Deleted between the listing and now: the set of photos changed under us.
            ApiError::ConflictCode {
                code: "photos_changed",
                detail: "a photo was deleted while the training started; retry".into(),
            }
        })?;
        let extension = photo.storage_key.rsplit('.').next().unwrap_or("jpg");
        files.push((format!("{:02}.{extension}", i + 1), bytes));
        if let Some(caption) = caption_file(
            trainer.entry(),
            trigger_phrase,
            photo.caption.as_deref(),
            any_captioned,
        ) {
            files.push((format!("{:02}.txt", i + 1), caption.into_bytes()));
        }
    }
    let entries: Vec<Entry<'_>> = files
        .iter()
        .map(|(name, bytes)| Entry { name, bytes })
        .collect();
    let archive = zip(&entries).map_err(ApiError::internal)?;
    state
        .fal
        .upload(
            archive.into(),
            "application/zip",
            &format!("avatar-{avatar_id}.zip"),
        )
        .await
        .map_err(|err| {
            tracing::warn!(error = %err.message, "uploading training photos to FAL failed");
            ApiError::ServiceUnavailable(
                "FAL's storage did not take the photos; retry shortly".into(),
            )
        })
}
