//! `GET /v1/trainers`: the FAL trainers falgate can train with, as the registry
//! (`domain::trainers`) holds them, so that a client can build its form from the list: the
//! subjects each suits, its presets' exact values, the fields a client may set and their ranges,
//! what it makes, where that generates, and what FAL charges.

use super::auth::Tenant;
use crate::domain::avatar::TrainingPreset;
use crate::domain::trainers::{
    self, Captions, FieldRule, Output, Price, TrainerEntry, TrainerStatus,
};
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The trainers, current ones first.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrainerList {
    pub items: Vec<TrainerView>,
}

/// One FAL trainer.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrainerView {
    /// What a training request names (`trainer`).
    #[schema(example = "portrait")]
    pub id: String,
    /// FAL's endpoint.
    #[schema(example = "fal-ai/flux-lora-portrait-trainer")]
    pub endpoint: String,
    /// `current`, or `deprecated` (FAL no longer runs it for new trainings; see
    /// `replacement`).
    #[schema(example = "current")]
    pub status: String,
    /// The trainer to use instead of a deprecated one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
    /// What it suits: `person`, `style`, `product`.
    pub subjects: Vec<String>,
    /// The model family of what it makes.
    #[schema(example = "flux-1-dev")]
    pub base_family: String,
    /// FAL's endpoint that generates with what it makes.
    #[schema(example = "fal-ai/flux-lora")]
    pub generation_endpoint: String,
    /// The names of the input fields falgate fills.
    pub fields: TrainerFields,
    /// Each preset's fields and values (fields not named keep FAL's default).
    pub presets: TrainerPresets,
    /// The fields a training's `overrides` may set, with their ranges.
    pub overridable: Vec<OverridableField>,
    /// Where FAL's answer keeps what it made.
    pub output: TrainerOutput,
    /// What FAL charges.
    pub price: TrainerPrice,
}

/// The names of a trainer's input fields.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrainerFields {
    /// The URL of the ZIP of photos.
    #[schema(example = "images_data_url")]
    pub zip: String,
    /// The trigger phrase's field, if it takes one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Whether FAL requires the trigger phrase.
    pub trigger_required: bool,
    /// The number of steps (or iterations).
    #[schema(example = "steps")]
    pub steps: String,
    /// `optional`: the trigger phrase stands for captions; `required`: each photo needs a
    /// caption (falgate writes one per photo in the ZIP) or a default caption.
    #[schema(example = "optional")]
    pub captions: String,
    /// The field of the default caption, where captions are required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_caption: Option<String>,
}

/// The three presets.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrainerPresets {
    #[schema(value_type = Object)]
    pub fast: Map<String, Value>,
    #[schema(value_type = Object)]
    pub balanced: Map<String, Value>,
    #[schema(value_type = Object)]
    pub quality: Map<String, Value>,
}

/// One field a client may set.
#[derive(Debug, Serialize, ToSchema)]
pub struct OverridableField {
    #[schema(example = "steps")]
    pub name: String,
    /// `integer`, `number`, `boolean` or `enum`.
    #[serde(rename = "type")]
    #[schema(example = "integer")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    /// For an `enum`: the values it takes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// Where FAL's answer keeps what a trainer made.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrainerOutput {
    /// `lora` (a file falgate keeps a copy of) or `finetune` (an id; the weights stay at FAL).
    #[schema(example = "lora")]
    pub kind: String,
    /// The field of the LoRA file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_field: Option<String>,
    /// The field of a second, high-noise LoRA file (Wan 2.2), kept and passed to generation
    /// beside the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub high_noise_field: Option<String>,
}

/// What FAL charges for a training, as its model page states it; FAL's pricing API is the
/// live figure.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrainerPrice {
    /// `per_step`, `per_run` or `unpublished`.
    #[schema(example = "per_step")]
    pub basis: String,
    /// US dollars per step, for `per_step`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usd_per_step: Option<f64>,
    /// The least number of steps charged, for `per_step`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_steps_charged: Option<u32>,
    /// US dollars per run, for `per_run`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usd_per_run: Option<f64>,
}

impl From<&TrainerEntry> for TrainerView {
    fn from(entry: &TrainerEntry) -> Self {
        let (status, replacement) = match entry.status {
            TrainerStatus::Current => ("current", None),
            TrainerStatus::Deprecated { replacement } => {
                ("deprecated", Some(replacement.to_owned()))
            }
        };
        let (captions, default_caption) = match entry.captions {
            Captions::Optional => ("optional", None),
            Captions::Required {
                default_caption_field,
            } => ("required", Some(default_caption_field.to_owned())),
        };
        Self {
            id: entry.id.to_owned(),
            endpoint: entry.endpoint.to_owned(),
            status: status.to_owned(),
            replacement,
            subjects: entry
                .subjects
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
            base_family: entry.base.as_str().to_owned(),
            generation_endpoint: entry.base.generation_endpoint().to_owned(),
            fields: TrainerFields {
                zip: entry.fields.zip.to_owned(),
                trigger: entry.fields.trigger.map(|(name, _)| name.to_owned()),
                trigger_required: entry.fields.trigger.is_some_and(|(_, required)| required),
                steps: entry.fields.steps.to_owned(),
                captions: captions.to_owned(),
                default_caption,
            },
            presets: TrainerPresets {
                fast: entry.preset_json(TrainingPreset::Fast),
                balanced: entry.preset_json(TrainingPreset::Balanced),
                quality: entry.preset_json(TrainingPreset::Quality),
            },
            overridable: entry
                .overridable
                .iter()
                .map(|(name, rule)| OverridableField::new(name, *rule))
                .collect(),
            output: match entry.output {
                Output::Lora { field, high_noise } => TrainerOutput {
                    kind: "lora".into(),
                    lora_field: Some(field.to_owned()),
                    high_noise_field: high_noise.map(str::to_owned),
                },
                Output::Finetune => TrainerOutput {
                    kind: "finetune".into(),
                    lora_field: None,
                    high_noise_field: None,
                },
            },
            price: match entry.price {
                Price::PerStep { usd, min_steps } => TrainerPrice {
                    basis: "per_step".into(),
                    usd_per_step: Some(usd),
                    min_steps_charged: Some(min_steps),
                    usd_per_run: None,
                },
                Price::PerRun { usd } => TrainerPrice {
                    basis: "per_run".into(),
                    usd_per_step: None,
                    min_steps_charged: None,
                    usd_per_run: Some(usd),
                },
                Price::Unpublished => TrainerPrice {
                    basis: "unpublished".into(),
                    usd_per_step: None,
                    min_steps_charged: None,
                    usd_per_run: None,
                },
            },
        }
    }
}

impl OverridableField {
    fn new(name: &str, rule: FieldRule) -> Self {
        let (kind, minimum, maximum, values) = match rule {
            FieldRule::Int { min, max } => ("integer", Some(min as f64), Some(max as f64), None),
            FieldRule::Float { min, max } => ("number", Some(min), Some(max), None),
            FieldRule::Bool => ("boolean", None, None, None),
            FieldRule::OneOf(values) => (
                "enum",
                None,
                None,
                Some(values.iter().map(|v| (*v).to_owned()).collect()),
            ),
        };
        Self {
            name: name.to_owned(),
            kind: kind.to_owned(),
            minimum,
            maximum,
            values,
        }
    }
}

/// List the trainers
///
/// Every FAL trainer falgate knows, current ones first: what each suits, its presets' exact
/// values, the fields a training may override and their ranges, what it makes and where that
/// generates, and what FAL charges.
#[utoipa::path(
    get,
    path = "/v1/trainers",
    tag = "avatars",
    responses(
        (status = 200, description = "The trainers.", body = TrainerList),
    ),
    security(("bearer" = []))
)]
pub async fn list_trainers(_tenant: Tenant) -> Json<TrainerList> {
    let mut items: Vec<&TrainerEntry> = trainers::all().iter().collect();
    items.sort_by_key(|entry| !entry.is_current());
    Json(TrainerList {
        items: items.into_iter().map(TrainerView::from).collect(),
    })
}
