//! `POST /v1/generations` and `GET /v1/batches/{id}`: pictures of a trained avatar, one job per
//! prompt, each succeeding or failing on its own.

use super::auth::Tenant;
use super::avatars::find_avatar;
use super::extract::{ApiJson, ApiPathId};
use super::idempotency::{self, MaybeIdempotencyKey, Replayable};
use super::jobs::JobView;
use super::spec;
use super::webhook_endpoints::{RequestWebhook, check_request_webhook};
use crate::domain::avatar::AvatarStatus;
use crate::domain::generation::{
    Artifact, GenerationOptions, GenerationPreset, check_aspect_ratio, check_image_size,
    check_num_images, check_output_format, check_safety_tolerance, generation_input,
};
use crate::domain::job::{JobKind, JobStatus};
use crate::domain::trainers::{BaseFamily, LoraGeneration};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::state::AppState;
use crate::store::{Batch, Job, NewJob};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGenerationRequest {
    pub avatar_id: Uuid,
    /// One prompt; or give `prompts` for a batch.
    #[schema(min_length = 1, pattern = "\\S")]
    #[serde(default, deserialize_with = "prompt")]
    pub prompt: Option<String>,
    /// Several prompts: one job each.
    #[schema(schema_with = spec::prompts)]
    #[serde(default, deserialize_with = "prompts")]
    pub prompts: Option<Vec<String>>,
    /// `fast`, `balanced` (default), `quality`, `portrait`, `landscape`, `ultra`.
    #[serde(default)]
    pub preset: GenerationPreset,
    /// `21:9`, `16:9`, `4:3`, `3:2`, `1:1`, `2:3`, `3:4`, `9:16`, `9:21`.
    #[schema(schema_with = spec::aspect_ratio)]
    #[serde(default, deserialize_with = "aspect_ratio")]
    pub aspect_ratio: Option<String>,
    /// LoRA avatars only: a named size or `{width, height}`; wins over the preset's.
    #[schema(schema_with = spec::image_size)]
    #[serde(default, deserialize_with = "image_size")]
    pub image_size: Option<Value>,
    /// 1 to 4 images per prompt.
    #[schema(minimum = 1, maximum = 4)]
    #[serde(default, deserialize_with = "num_images")]
    pub num_images: Option<u32>,
    /// An integer, or a string of decimal digits (exact past 2^53).
    #[serde(default, deserialize_with = "deserialize_seed")]
    #[schema(schema_with = spec::seed_request)]
    pub seed: Option<u64>,
    /// `jpeg` or `png`, and `webp` where the avatar's endpoint offers it (FLUX.2, Qwen-Image,
    /// Z-Image).
    #[schema(schema_with = spec::output_format)]
    #[serde(default, deserialize_with = "output_format")]
    pub output_format: Option<String>,
    /// LoRA avatars only.
    pub enable_safety_checker: Option<bool>,
    /// Finetuned avatars only: `"1"` (strictest) to `"6"`.
    #[schema(schema_with = spec::safety_tolerance)]
    #[serde(default, deserialize_with = "safety_tolerance")]
    pub safety_tolerance: Option<String>,
    /// Finetuned avatars only: a less processed look.
    pub raw: Option<bool>,
    /// Taken by the Qwen-Image endpoint alone; refused for every other avatar, never dropped.
    #[serde(default, deserialize_with = "negative_prompt")]
    pub negative_prompt: Option<String>,
    /// A webhook for this batch's events alone (its jobs' and its completion).
    pub webhook: Option<RequestWebhook>,
}

impl super::extract::AcrossFields for CreateGenerationRequest {
    /// Exactly one of `prompt` and `prompts`, and a batch of one to the server's most: a `null`
    /// counts as absent.
    fn across_fields(body: &serde_json::Map<String, Value>, state: &AppState) -> Vec<FieldError> {
        let given = |name: &str| body.get(name).is_some_and(|value| !value.is_null());
        let max = state.config.avatars.max_batch as usize;
        if let Some(prompts) = body.get("prompts").and_then(Value::as_array)
            && prompts.len() > max
        {
            return vec![FieldError::new(
                "prompts",
                format!("at most {max} prompts per batch"),
            )];
        }
        match (given("prompt"), given("prompts")) {
            (true, true) => vec![FieldError::new(
                "prompt",
                "give `prompt` or `prompts`, not both",
            )],
            (false, false) => vec![FieldError::new("prompt", "is required (or `prompts`)")],
            (false, true)
                if body
                    .get("prompts")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty) =>
            {
                vec![FieldError::new("prompts", "must hold at least one prompt")]
            }
            _ => Vec::new(),
        }
    }
}

/// A seed as an integer or as a string of decimal digits: a client whose numbers are doubles
/// cannot send one above 2^53 exactly as a number, and falgate answers seeds as strings.
fn deserialize_seed<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    struct SeedVisitor;
    const EXPECTED: &str =
        "an integer from 0 to 18446744073709551615, or such a number as a string of digits";
    impl serde::de::Visitor<'_> for SeedVisitor {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(EXPECTED)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("expected {EXPECTED}")))
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(E::custom(format!("expected {EXPECTED}")));
            }
            v.parse()
                .map(Some)
                .map_err(|_| E::custom(format!("expected {EXPECTED}")))
        }
    }
    de.deserialize_any(SeedVisitor)
}

// The rules that need nothing but the request are checked while it is parsed, so that a wrong
// value is reported along with wrong types, unknown and missing fields elsewhere in the body.

fn checked<'de, D, T>(
    deserializer: D,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let value = Option::<T>::deserialize(deserializer)?;
    if let Some(given) = &value {
        check(given).map_err(serde::de::Error::custom)?;
    }
    Ok(value)
}

/// A prompt with words in it.
struct Prompt(String);

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let prompt = String::deserialize(d)?;
        if prompt.trim().is_empty() {
            return Err(serde::de::Error::custom("must not be empty"));
        }
        Ok(Self(prompt))
    }
}

fn prompt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Prompt>::deserialize(d)?.map(|prompt| prompt.0))
}

fn prompts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Ok(Option::<Vec<Prompt>>::deserialize(d)?
        .map(|prompts| prompts.into_iter().map(|prompt| prompt.0).collect()))
}

fn aspect_ratio<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, |ratio: &String| check_aspect_ratio(ratio))
}

fn num_images<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    checked(d, |n: &u32| check_num_images(*n))
}

fn image_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    checked(d, |size: &Value| check_image_size(size).map(drop))
}

fn safety_tolerance<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, |tolerance: &String| check_safety_tolerance(tolerance))
}

fn output_format<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, |format: &String| check_output_format(format))
}

fn negative_prompt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, |negative: &String| {
        if negative.trim().is_empty() {
            Err("must not be empty".into())
        } else {
            Ok(())
        }
    })
}

/// A set of generations made by one request.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchView {
    pub id: Uuid,
    pub avatar_id: Uuid,
    /// `running` while any job is unfinished; then `succeeded`, `failed` (all failed or were
    /// cancelled) or `partial`.
    pub status: String,
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub jobs: Vec<JobView>,
    pub created_at: DateTime<Utc>,
}

impl BatchView {
    pub fn new(batch: Batch, jobs: Vec<Job>) -> Self {
        let count = |s: JobStatus| jobs.iter().filter(|j| j.status == s).count();
        let succeeded = count(JobStatus::Succeeded);
        let failed = count(JobStatus::Failed) + count(JobStatus::Canceled);
        let total = jobs.len();
        let status = if succeeded + failed < total {
            "running"
        } else if succeeded == total {
            "succeeded"
        } else if succeeded == 0 {
            "failed"
        } else {
            "partial"
        };
        Self {
            id: batch.id,
            avatar_id: batch.avatar_id,
            status: status.into(),
            total,
            succeeded,
            failed,
            jobs: jobs.into_iter().map(JobView::from).collect(),
            created_at: batch.created_at,
        }
    }
}

/// Generate images of an avatar
///
/// The endpoint follows the avatar's artifact (a LoRA: `fal-ai/flux-lora`; a finetune:
/// `fal-ai/flux-pro/v1.1-ultra-finetuned`); the trigger phrase is put in front of each prompt
/// once. Answers the batch with one pending job per prompt.
#[utoipa::path(
    post,
    path = "/v1/generations",
    tag = "generations",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe.")),
    request_body = CreateGenerationRequest,
    responses(
        (status = 202, description = "The batch and its jobs.", body = BatchView),
        (status = 404, description = "No such avatar for this API key.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The avatar is not ready.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid or not taken by the avatar's endpoint.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(tenant = %tenant.id))]
pub async fn create_generation(
    State(state): State<AppState>,
    tenant: Tenant,
    idempotency_key: MaybeIdempotencyKey,
    body: ApiJson<CreateGenerationRequest>,
) -> ApiResult<Response> {
    let ApiJson {
        value: request,
        canonical,
    } = body;
    // Everything the request alone can tell was checked while it was parsed (its fields and
    // `AcrossFields`), before the avatar is looked at, so that a wrong field is reported whatever
    // state the avatar is in.
    let prompts: Vec<(String, String)> = match (request.prompt, request.prompts) {
        (Some(prompt), None) => vec![("prompt".into(), prompt)],
        (None, Some(prompts)) => prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("prompts[{i}]"), p))
            .collect(),
        _ => {
            return Err(ApiError::internal(
                "prompt and prompts passed parsing unchecked",
            ));
        }
    };
    let options = GenerationOptions {
        preset: request.preset,
        aspect_ratio: request.aspect_ratio.clone(),
        image_size: request.image_size.clone(),
        num_images: request.num_images,
        seed: request.seed,
        output_format: request.output_format.clone(),
        enable_safety_checker: request.enable_safety_checker,
        safety_tolerance: request.safety_tolerance.clone(),
        raw: request.raw,
        negative_prompt: request.negative_prompt.clone(),
    };
    let mut problems = Vec::new();
    let webhook = check_request_webhook(&state, request.webhook.clone(), &mut problems).await?;
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let avatar = find_avatar(&state, &tenant, request.avatar_id).await?;
    let store = state.store.clone();
    idempotency::run_once(
        &store,
        tenant.id,
        idempotency_key,
        "POST /v1/generations",
        &canonical,
        // A replay answers before the avatar's current state is looked at.
        |scope| async move {
            let artifact = match (&avatar.status, &avatar.lora_url, &avatar.finetune_id) {
                (AvatarStatus::Ready, Some(url), _) => Artifact::Lora {
                    url: url.clone(),
                    high_noise_url: avatar.high_noise_lora_url.clone(),
                    to: lora_generation(&avatar)?,
                },
                (AvatarStatus::Ready, None, Some(id)) => Artifact::Finetune { id: id.clone() },
                (status, _, _) => {
                    return Err(ApiError::ConflictCode {
                        code: "avatar_not_ready",
                        detail: format!(
                            "avatar {} is {}, not ready: train it first",
                            avatar.id,
                            status.as_str()
                        ),
                    });
                }
            };
            let mut inputs = Vec::with_capacity(prompts.len());
            let mut problems = Vec::new();
            for (field, prompt) in &prompts {
                match generation_input(&artifact, &avatar.trigger_phrase, prompt, &options) {
                    Ok(input) => inputs.push(input),
                    Err(found) => problems.extend(found.into_iter().map(|p| {
                        let name = if p.field == "prompt" {
                            field.clone()
                        } else {
                            p.field
                        };
                        FieldError::new(name, p.message)
                    })),
                }
            }
            if !problems.is_empty() {
                // A field wrong for every prompt is named once.
                let mut named = std::collections::HashSet::new();
                problems.retain(|p| named.insert((p.field.clone(), p.message.clone())));
                return Err(ApiError::Validation(problems));
            }
            let now = crate::domain::now();
            let batch = Batch {
                id: Uuid::now_v7(),
                tenant: tenant.id,
                avatar_id: avatar.id,
                created_at: now,
            };
            let jobs: Vec<NewJob> = inputs
                .into_iter()
                .map(|input| NewJob {
                    id: Uuid::now_v7(),
                    tenant: tenant.id,
                    kind: JobKind::Generation,
                    avatar_id: Some(avatar.id),
                    batch_id: Some(batch.id),
                    endpoint: artifact.endpoint().to_owned(),
                    input,
                    sandbox: state.sandbox(),
                    idempotency_key: scope.key().map(str::to_owned),
                    created_at: now,
                })
                .collect();
            let view = BatchView::new(
                batch.clone(),
                jobs.iter().map(NewJob::to_pending_job).collect(),
            );
            let response = Replayable::new(StatusCode::ACCEPTED, &view)?;
            let webhook = match webhook {
                Some(webhook) => Some(webhook.for_resource(&state, tenant.id, batch.id).await?),
                None => None,
            };
            state
                .store
                .create_batch(
                    &batch,
                    &jobs,
                    scope.completion(&response)?.as_ref(),
                    webhook.as_ref(),
                )
                .await?;
            state.wake.dispatcher.notify_one();
            Ok(response)
        },
    )
    .await
}

/// Get a batch
///
/// The batch with the state of each of its jobs.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    tag = "generations",
    params(("id" = Uuid, Path, description = "The batch's id.")),
    responses(
        (status = 200, description = "The batch.", body = BatchView),
        (status = 404, description = "No such batch for this API key.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_batch(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPathId(id): ApiPathId,
) -> ApiResult<Json<BatchView>> {
    let (batch, jobs) = state
        .store
        .get_batch(tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    Ok(Json(BatchView::new(batch, jobs)))
}

/// Where the avatar's LoRA generates: the endpoint of the family its weights belong to. A
/// family this version does not know (or one that is no LoRA) is a 422: the weights go nowhere
/// rather than to a model they were not trained for.
fn lora_generation(avatar: &crate::store::Avatar) -> ApiResult<LoraGeneration> {
    avatar
        .weights_family()
        .and_then(BaseFamily::lora_generation)
        .ok_or_else(|| ApiError::Unprocessable {
            code: "generation_unavailable",
            detail: format!(
                "avatar {} holds {} weights, which this falgate does not generate with",
                avatar.id,
                avatar.base_family.as_deref().unwrap_or("unknown"),
            ),
        })
}
