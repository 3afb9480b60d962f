//! The trainers falgate knows: one entry per FAL trainer, with everything needed to call it and
//! to use what it makes. FAL's trainers differ in the name of the ZIP field, of the trigger
//! field and of the step field, in whether they need captions, in the fields a client may set,
//! and in what they return; this table absorbs that, so that one request shape ("train this
//! person / this style") reaches any of them.
//!
//! Field names, defaults and ranges are FAL's own (the model pages' input schemas,
//! `fal.ai/models/<id>/api`). Presets: the portrait and pro trainers keep the original service's
//! exact values; the fast LoRA trainer takes the portrait trainer's step counts. For the others,
//! `balanced` is FAL's default, `fast` half its steps and `quality` twice them (within FAL's
//! range), at FAL's default learning rate: FAL tuned the defaults, and steps are what trades
//! time and price for fidelity.

use super::avatar::TrainingPreset;

/// Whether FAL still runs a trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainerStatus {
    Current,
    /// FAL marks it deprecated: new trainings are refused (unless configuration allows them),
    /// and avatars trained on it keep generating.
    Deprecated {
        /// The registry id of the trainer to use instead.
        replacement: &'static str,
    },
}

/// What a trainer is good for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Person,
    Style,
    Product,
}

impl Subject {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Person => "person",
            Self::Style => "style",
            Self::Product => "product",
        }
    }
}

/// The model family a trainer's weights belong to, which decides where they generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseFamily {
    /// FLUX.1 [dev] LoRAs.
    Flux1Dev,
    /// FLUX.1 [pro] finetunes (by id, not by file).
    Flux1ProFinetune,
    Flux2,
    QwenImage2512,
    ZImageTurbo,
    Krea2,
    Wan22,
}

impl BaseFamily {
    pub const ALL: [BaseFamily; 7] = [
        Self::Flux1Dev,
        Self::Flux1ProFinetune,
        Self::Flux2,
        Self::QwenImage2512,
        Self::ZImageTurbo,
        Self::Krea2,
        Self::Wan22,
    ];

    /// The family named `name` (as [`as_str`](Self::as_str) writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|family| family.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flux1Dev => "flux-1-dev",
            Self::Flux1ProFinetune => "flux-1-pro-finetune",
            Self::Flux2 => "flux-2",
            Self::QwenImage2512 => "qwen-image-2512",
            Self::ZImageTurbo => "z-image-turbo",
            Self::Krea2 => "krea-2",
            Self::Wan22 => "wan-2.2",
        }
    }

    /// What falgate sends a LoRA of this family to, and what that endpoint takes; `None` for
    /// a pro finetune, which is no LoRA.
    pub fn lora_generation(self) -> Option<LoraGeneration> {
        const JPEG_PNG: &[&str] = &["jpeg", "png"];
        const WITH_WEBP: &[&str] = &["jpeg", "png", "webp"];
        let (steps, guidance, output_formats) = match self {
            Self::Flux1Dev => (Some((1, 50)), Some((0.0, 35.0)), JPEG_PNG),
            Self::Flux2 => (Some((4, 50)), Some((0.0, 20.0)), WITH_WEBP),
            Self::QwenImage2512 => (Some((1, 50)), Some((0.0, 20.0)), WITH_WEBP),
            // A distilled model: eight steps at most, and no guidance.
            Self::ZImageTurbo => (Some((1, 8)), None, WITH_WEBP),
            // Neither steps nor guidance: the turbo endpoint fixes both.
            Self::Krea2 => (None, None, JPEG_PNG),
            Self::Wan22 => (Some((2, 40)), Some((1.0, 10.0)), JPEG_PNG),
            Self::Flux1ProFinetune => return None,
        };
        let wan = self == Self::Wan22;
        Some(LoraGeneration {
            endpoint: self.generation_endpoint(),
            steps,
            guidance,
            output_formats,
            // Wan's endpoint names it `image_format`, and draws one image a request.
            output_format_field: if wan { "image_format" } else { "output_format" },
            num_images: !wan,
            negative_prompt: matches!(self, Self::QwenImage2512 | Self::Wan22),
            two_transformers: wan,
        })
    }

    /// FAL's endpoint that generates with weights of this family.
    pub fn generation_endpoint(self) -> &'static str {
        match self {
            Self::Flux1Dev => "fal-ai/flux-lora",
            Self::Flux1ProFinetune => "fal-ai/flux-pro/v1.1-ultra-finetuned",
            Self::Flux2 => "fal-ai/flux-2/lora",
            Self::QwenImage2512 => "fal-ai/qwen-image-2512/lora",
            Self::ZImageTurbo => "fal-ai/z-image/turbo/lora",
            Self::Krea2 => "fal-ai/krea-2/turbo/lora",
            Self::Wan22 => "fal-ai/wan/v2.2-a14b/text-to-image/lora",
        }
    }
}

/// A generation endpoint that takes a LoRA, with what it takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraGeneration {
    pub endpoint: &'static str,
    /// `num_inference_steps`' range, if the endpoint takes it.
    pub steps: Option<(u32, u32)>,
    /// `guidance_scale`'s range, if the endpoint takes it.
    pub guidance: Option<(f64, f64)>,
    /// The output formats it offers.
    pub output_formats: &'static [&'static str],
    /// The field that takes the output format.
    pub output_format_field: &'static str,
    /// Whether it takes `num_images` (else it draws one image a request).
    pub num_images: bool,
    /// Whether it takes a `negative_prompt`.
    pub negative_prompt: bool,
    /// Whether the model has two transformers (high-noise and low-noise), each given its own
    /// LoRA file (`transformer: high | low`).
    pub two_transformers: bool,
}

/// What a trainer needs by way of captions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captions {
    /// None: the trigger phrase stands for them (or the trainer captions by itself).
    Optional,
    /// Each photo needs a caption file in the ZIP (`name.txt` beside `name.jpg`), or the
    /// input a default caption in this field; without either the training fails at FAL.
    Required { default_caption_field: &'static str },
}

/// The names of a trainer's input fields that falgate fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldNames {
    /// The URL of the ZIP of photos.
    pub zip: &'static str,
    /// The trigger phrase, if the trainer takes one, and whether FAL requires it.
    pub trigger: Option<(&'static str, bool)>,
    /// The number of steps (or iterations).
    pub steps: &'static str,
}

/// Where a trainer's output keeps what it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A LoRA file under this field (`{url}`), and its config under `config_file`; Wan's
    /// second (high-noise) file under `high_noise`.
    Lora {
        field: &'static str,
        high_noise: Option<&'static str>,
    },
    /// A finetune id (`finetune_id`): the weights stay at FAL.
    Finetune,
}

/// One field a client may set, with the values FAL takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldRule {
    Int { min: i64, max: i64 },
    Float { min: f64, max: f64 },
    Bool,
    OneOf(&'static [&'static str]),
}

/// A value a preset sets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PresetValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(&'static str),
}

impl PresetValue {
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Self::Int(n) => serde_json::json!(n),
            Self::Float(x) => serde_json::json!(x),
            Self::Bool(b) => serde_json::json!(b),
            Self::Text(s) => serde_json::json!(s),
        }
    }
}

/// A preset's fields and their values; fields not named keep FAL's default.
pub type Preset = &'static [(&'static str, PresetValue)];

/// What FAL charges for a training, as FAL's model page states it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Price {
    /// Per step, with a least number of steps charged.
    PerStep { usd: f64, min_steps: u32 },
    /// Per run (at about FAL's default steps).
    PerRun { usd: f64 },
    /// Not published where falgate looked; FAL's pricing API has it.
    Unpublished,
}

/// One FAL trainer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerEntry {
    /// How clients name it (`trainer` in a training request).
    pub id: &'static str,
    pub endpoint: &'static str,
    pub status: TrainerStatus,
    pub subjects: &'static [Subject],
    pub fields: FieldNames,
    pub captions: Captions,
    /// `fast`, `balanced`, `quality`.
    pub presets: [Preset; 3],
    /// The fields a client may set in `overrides`, and their ranges.
    pub overridable: &'static [(&'static str, FieldRule)],
    pub output: Output,
    pub base: BaseFamily,
    pub price: Price,
}

impl TrainerEntry {
    pub fn preset(&self, preset: TrainingPreset) -> Preset {
        match preset {
            TrainingPreset::Fast => self.presets[0],
            TrainingPreset::Balanced => self.presets[1],
            TrainingPreset::Quality => self.presets[2],
        }
    }

    /// A preset's fields and values as a JSON object: the start of a training's input.
    pub fn preset_json(
        &self,
        preset: TrainingPreset,
    ) -> serde_json::Map<String, serde_json::Value> {
        self.preset(preset)
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.to_json()))
            .collect()
    }

    pub fn is_current(&self) -> bool {
        self.status == TrainerStatus::Current
    }
}

/// Every trainer falgate knows.
pub fn all() -> &'static [TrainerEntry] {
    TRAINERS
}

/// The trainer with this registry id.
pub fn by_id(id: &str) -> Option<&'static TrainerEntry> {
    TRAINERS.iter().find(|trainer| trainer.id == id)
}

/// The trainer at this FAL endpoint.
pub fn by_endpoint(endpoint: &str) -> Option<&'static TrainerEntry> {
    TRAINERS.iter().find(|trainer| trainer.endpoint == endpoint)
}

use FieldRule::{Bool, Float, Int, OneOf};
use PresetValue as V;

/// Steps: `(name, Int)` with FAL's range.
const fn steps(name: &'static str, min: i64, max: i64) -> (&'static str, FieldRule) {
    (name, Int { min, max })
}

/// A learning rate between these bounds.
const fn rate(min: f64, max: f64) -> (&'static str, FieldRule) {
    ("learning_rate", Float { min, max })
}

/// Learning rates FAL's schema gives no bounds for: from a millionth to a hundredth, around
/// every default FAL sets.
const ANY_RATE: (&str, FieldRule) = rate(1e-6, 1e-2);

static TRAINERS: &[TrainerEntry] = &[
    TrainerEntry {
        id: "portrait",
        endpoint: "fal-ai/flux-lora-portrait-trainer",
        status: TrainerStatus::Current,
        subjects: &[Subject::Person],
        fields: FieldNames {
            zip: "images_data_url",
            trigger: Some(("trigger_phrase", false)),
            steps: "steps",
        },
        captions: Captions::Optional,
        presets: [
            &[
                ("steps", V::Int(500)),
                ("learning_rate", V::Float(0.0003)),
                ("subject_crop", V::Bool(true)),
            ],
            &[
                ("steps", V::Int(1500)),
                ("learning_rate", V::Float(0.00015)),
                ("subject_crop", V::Bool(true)),
                ("create_masks", V::Bool(true)),
            ],
            &[
                ("steps", V::Int(2500)),
                ("learning_rate", V::Float(0.0001)),
                ("subject_crop", V::Bool(true)),
                ("create_masks", V::Bool(true)),
                ("multiresolution_training", V::Bool(true)),
            ],
        ],
        overridable: &[
            steps("steps", 1, 10_000),
            rate(1e-7, 1e-2),
            ("multiresolution_training", Bool),
            ("subject_crop", Bool),
            ("create_masks", Bool),
        ],
        output: Output::Lora {
            field: "diffusers_lora_file",
            high_noise: None,
        },
        base: BaseFamily::Flux1Dev,
        price: Price::Unpublished,
    },
    TrainerEntry {
        id: "fast_lora",
        endpoint: "fal-ai/flux-lora-fast-training",
        status: TrainerStatus::Current,
        subjects: &[Subject::Person, Subject::Style, Subject::Product],
        fields: FieldNames {
            zip: "images_data_url",
            trigger: Some(("trigger_word", false)),
            steps: "steps",
        },
        captions: Captions::Optional,
        presets: [
            &[("steps", V::Int(500))],
            &[("steps", V::Int(1500)), ("create_masks", V::Bool(true))],
            &[("steps", V::Int(2500)), ("create_masks", V::Bool(true))],
        ],
        overridable: &[
            steps("steps", 1, 10_000),
            ("create_masks", Bool),
            ("is_style", Bool),
        ],
        output: Output::Lora {
            field: "diffusers_lora_file",
            high_noise: None,
        },
        base: BaseFamily::Flux1Dev,
        price: Price::PerRun { usd: 2.0 },
    },
    TrainerEntry {
        id: "turbo_flux",
        endpoint: "fal-ai/turbo-flux-trainer",
        status: TrainerStatus::Current,
        subjects: &[Subject::Person, Subject::Style],
        fields: FieldNames {
            zip: "images_data_url",
            trigger: Some(("trigger_phrase", false)),
            steps: "steps",
        },
        captions: Captions::Optional,
        presets: [
            &[("steps", V::Int(500)), ("learning_rate", V::Float(0.00115))],
            &[
                ("steps", V::Int(1000)),
                ("learning_rate", V::Float(0.00115)),
            ],
            &[
                ("steps", V::Int(2000)),
                ("learning_rate", V::Float(0.00115)),
            ],
        ],
        overridable: &[
            steps("steps", 1, 10_000),
            rate(1e-7, 1e-2),
            ("training_style", OneOf(&["subject", "style"])),
            ("face_crop", Bool),
        ],
        output: Output::Lora {
            field: "diffusers_lora_file",
            high_noise: None,
        },
        base: BaseFamily::Flux1Dev,
        price: Price::PerStep {
            usd: 0.0024,
            min_steps: 1,
        },
    },
    TrainerEntry {
        id: "flux_2",
        endpoint: "fal-ai/flux-2-trainer",
        status: TrainerStatus::Current,
        subjects: &[Subject::Person, Subject::Style, Subject::Product],
        fields: FieldNames {
            zip: "image_data_url",
            trigger: None,
            steps: "steps",
        },
        captions: Captions::Required {
            default_caption_field: "default_caption",
        },
        presets: [
            &[("steps", V::Int(500)), ("learning_rate", V::Float(0.00005))],
            &[
                ("steps", V::Int(1000)),
                ("learning_rate", V::Float(0.00005)),
            ],
            &[
                ("steps", V::Int(2000)),
                ("learning_rate", V::Float(0.00005)),
            ],
        ],
        overridable: &[steps("steps", 100, 10_000), ANY_RATE],
        output: Output::Lora {
            field: "diffusers_lora_file",
            high_noise: None,
        },
        base: BaseFamily::Flux2,
        price: Price::PerStep {
            usd: 0.0064,
            min_steps: 100,
        },
    },
    TrainerEntry {
        id: "qwen_image_2512",
        endpoint: "fal-ai/qwen-image-2512-trainer",
        status: TrainerStatus::Current,
        subjects: &[Subject::Person, Subject::Style, Subject::Product],
        fields: FieldNames {
            zip: "image_data_url",
            trigger: None,
            steps: "steps",
        },
        captions: Captions::Required {
            default_caption_field: "default_caption",
        },
        presets: [
            &[("steps", V::Int(500)), ("learning_rate", V::Float(0.0005))],
            &[("steps", V::Int(1000)), ("learning_rate", V::Float(0.0005))],
            &[("steps", V::Int(2000)), ("learning_rate", V::Float(0.0005))],
        ],
        overridable: &[steps("steps", 100, 30_000), ANY_RATE],
        output: Output::Lora {
            field: "diffusers_lora_file",
            high_noise: None,
        },
        base: BaseFamily::QwenImage2512,
        price: Price::Unpublished,
    },
    TrainerEntry {
        id: "z_image",
        endpoint: "fal-ai/z-image-trainer",
        status: TrainerStatus::Current,
        subjects: &[Subject::Person, Subject::Style, Subject::Product],
        fields: FieldNames {
            zip: "image_data_url",
            trigger: None,
            steps: "steps",
        },
        captions: Captions::Required {
            default_caption_field: "default_caption",
        },
        presets: [
            &[("steps", V::Int(500)), ("learning_rate", V::Float(0.0001))],
            &[("steps", V::Int(1000)), ("learning_rate", V::Float(0.0001))],
            &[("steps", V::Int(2000)), ("learning_rate", V::Float(0.0001))],
        ],
        overridable: &[
            steps("steps", 100, 10_000),
            ANY_RATE,
            ("training_type", OneOf(&["content", "style", "balanced"])),
        ],
        output: Output::Lora {
            field: "diffusers_lora_file",
            high_noise: None,
        },
        base: BaseFamily::ZImageTurbo,
        price: Price::PerStep {
            usd: 0.00226,
            min_steps: 100,
        },
    },
    TrainerEntry {
        id: "krea_2",
        endpoint: "fal-ai/krea-2-trainer",
        status: TrainerStatus::Current,
        subjects: &[Subject::Person, Subject::Style, Subject::Product],
        fields: FieldNames {
            zip: "images_data_url",
            trigger: Some(("trigger_phrase", false)),
            steps: "steps",
        },
        // A photo without a caption file takes the trigger phrase as its caption.
        captions: Captions::Optional,
        // FAL's default, 100 steps, is also the least it charges: that is `fast`, and the
        // others go up from it.
        presets: [
            &[("steps", V::Int(100)), ("learning_rate", V::Float(0.0005))],
            &[("steps", V::Int(200)), ("learning_rate", V::Float(0.0005))],
            &[
                ("steps", V::Int(400)),
                ("learning_rate", V::Float(0.0005)),
                ("resolution", V::Int(1024)),
            ],
        ],
        overridable: &[
            // FAL publishes no range; these bound what FAL's default and Krea's advice allow.
            steps("steps", 1, 10_000),
            ANY_RATE,
            ("resolution", OneOf(&["768", "1024"])),
            (
                "auto_captioning",
                OneOf(&["Off", "Object/Character", "Style", "Custom"]),
            ),
        ],
        output: Output::Lora {
            field: "lora_file",
            high_noise: None,
        },
        base: BaseFamily::Krea2,
        price: Price::PerStep {
            usd: 0.0028,
            min_steps: 100,
        },
    },
    TrainerEntry {
        id: "wan_22_image",
        endpoint: "fal-ai/wan-22-image-trainer",
        status: TrainerStatus::Current,
        subjects: &[Subject::Person, Subject::Style],
        fields: FieldNames {
            zip: "training_data_url",
            trigger: Some(("trigger_phrase", true)),
            steps: "steps",
        },
        captions: Captions::Optional,
        presets: [
            &[("steps", V::Int(500)), ("learning_rate", V::Float(0.0007))],
            &[("steps", V::Int(1000)), ("learning_rate", V::Float(0.0007))],
            &[("steps", V::Int(2000)), ("learning_rate", V::Float(0.0007))],
        ],
        overridable: &[
            steps("steps", 10, 6_000),
            rate(1e-6, 1e-1),
            ("use_face_detection", Bool),
            ("use_face_cropping", Bool),
            ("use_masks", Bool),
            ("is_style", Bool),
            ("include_synthetic_captions", Bool),
        ],
        output: Output::Lora {
            field: "diffusers_lora_file",
            high_noise: Some("high_noise_lora"),
        },
        base: BaseFamily::Wan22,
        price: Price::PerStep {
            usd: 0.0045,
            min_steps: 100,
        },
    },
    TrainerEntry {
        id: "pro",
        endpoint: "fal-ai/flux-pro-trainer",
        status: TrainerStatus::Deprecated {
            replacement: "fast_lora",
        },
        subjects: &[Subject::Person, Subject::Style, Subject::Product],
        fields: FieldNames {
            zip: "data_url",
            trigger: Some(("trigger_word", false)),
            steps: "iterations",
        },
        captions: Captions::Optional,
        presets: [
            &[
                ("iterations", V::Int(200)),
                ("learning_rate", V::Float(0.0002)),
                ("priority", V::Text("speed")),
            ],
            &[
                ("iterations", V::Int(600)),
                ("learning_rate", V::Float(0.00008)),
                ("priority", V::Text("quality")),
                ("lora_rank", V::Int(32)),
            ],
            &[
                ("iterations", V::Int(1000)),
                ("learning_rate", V::Float(0.00005)),
                ("priority", V::Text("quality")),
                ("lora_rank", V::Int(32)),
            ],
        ],
        overridable: &[
            steps("iterations", 100, 10_000),
            rate(1e-7, 1e-2),
            ("priority", OneOf(&["speed", "quality", "high_res_only"])),
            ("captioning", Bool),
            ("lora_rank", OneOf(&["16", "32"])),
        ],
        output: Output::Finetune,
        base: BaseFamily::Flux1ProFinetune,
        price: Price::Unpublished,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn fits(rule: FieldRule, value: PresetValue) -> bool {
        match (rule, value) {
            (Int { min, max }, V::Int(n)) => (min..=max).contains(&n),
            (Float { min, max }, V::Float(x)) => x >= min && x <= max,
            (Bool, V::Bool(_)) => true,
            (OneOf(values), V::Text(text)) => values.contains(&text),
            (OneOf(values), V::Int(n)) => values.contains(&n.to_string().as_str()),
            _ => false,
        }
    }

    #[test]
    fn every_preset_sets_fields_a_client_could_set_within_their_ranges() {
        for trainer in all() {
            for preset in trainer.presets {
                assert!(
                    preset.iter().any(|(name, _)| *name == trainer.fields.steps),
                    "{}: a preset without steps",
                    trainer.id
                );
                for (name, value) in preset {
                    let rule = trainer
                        .overridable
                        .iter()
                        .find(|(known, _)| known == name)
                        .map(|(_, rule)| *rule)
                        .unwrap_or_else(|| panic!("{}: {name} is not a field", trainer.id));
                    assert!(fits(rule, *value), "{}: {name} = {value:?}", trainer.id);
                }
            }
        }
    }

    #[test]
    fn ids_and_endpoints_are_unique_and_replacements_are_current_trainers() {
        for (n, trainer) in all().iter().enumerate() {
            assert!(all()[n + 1..].iter().all(|other| other.id != trainer.id));
            assert!(
                all()[n + 1..]
                    .iter()
                    .all(|o| o.endpoint != trainer.endpoint)
            );
            assert_eq!(by_id(trainer.id), Some(trainer));
            assert_eq!(by_endpoint(trainer.endpoint), Some(trainer));
            if let TrainerStatus::Deprecated { replacement } = trainer.status {
                assert!(by_id(replacement).is_some_and(TrainerEntry::is_current));
            }
        }
    }

    #[test]
    fn the_original_presets_are_kept_exactly() {
        let portrait = by_id("portrait").unwrap();
        assert_eq!(
            portrait.preset(TrainingPreset::Balanced),
            &[
                ("steps", V::Int(1500)),
                ("learning_rate", V::Float(0.00015)),
                ("subject_crop", V::Bool(true)),
                ("create_masks", V::Bool(true)),
            ]
        );
        let pro = by_id("pro").unwrap();
        assert_eq!(
            pro.preset(TrainingPreset::Fast),
            &[
                ("iterations", V::Int(200)),
                ("learning_rate", V::Float(0.0002)),
                ("priority", V::Text("speed")),
            ]
        );
    }
}
