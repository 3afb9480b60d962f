//! Avatars and their training: kinds, trigger phrases, the trainer each kind gets, and the
//! exact preset values of each trainer (seed-features.md §1).

use super::trainers::{BaseFamily, Captions, FieldRule, Output, TrainerEntry};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;
use uuid::Uuid;

/// What an avatar is of; it decides the trainer when the client asks for `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AvatarKind {
    /// A person.
    Character,
    Style,
    Product,
    General,
}

impl AvatarKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Character => "character",
            Self::Style => "style",
            Self::Product => "product",
            Self::General => "general",
        }
    }
}

impl std::str::FromStr for AvatarKind {
    type Err = super::UnknownVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        super::parse_spelling(
            &[Self::Character, Self::Style, Self::Product, Self::General],
            Self::as_str,
            s,
        )
    }
}

/// Where an avatar is; it follows its training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AvatarStatus {
    /// Made, not trained yet.
    Draft,
    /// A training is running.
    Training,
    /// Trained: it has an artifact and can generate.
    Ready,
    /// Its training failed and it has no artifact.
    Failed,
}

impl AvatarStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Training => "training",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }
}

impl std::str::FromStr for AvatarStatus {
    type Err = super::UnknownVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        super::parse_spelling(
            &[Self::Draft, Self::Training, Self::Ready, Self::Failed],
            Self::as_str,
            s,
        )
    }
}

/// What a training produced, read from FAL's output: only what FAL sent, never made up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainedArtifact {
    Lora {
        url: String,
        config_url: Option<String>,
        /// Wan 2.2's second file, for its high-noise transformer.
        high_noise_url: Option<String>,
    },
    Finetune {
        id: String,
    },
}

/// The caption file a photo gets beside it in a training's ZIP (`01.txt` for `01.jpg`): the
/// trigger phrase, then the client's caption of the photo if it gave one. Every photo gets one
/// where the trainer needs captions, or where the client captioned any photo of the training:
/// a trainer that finds caption files reads them instead of its trigger phrase, so a photo
/// left without one would train on no caption at all. Otherwise none.
pub fn caption_file(
    entry: &TrainerEntry,
    trigger: &str,
    caption: Option<&str>,
    any_captioned: bool,
) -> Option<String> {
    match (caption, entry.captions) {
        (Some(caption), _) => Some(format!("{trigger}, {caption}")),
        (None, Captions::Required { .. }) => Some(trigger.to_owned()),
        (None, Captions::Optional) => any_captioned.then(|| trigger.to_owned()),
    }
}

/// A training's artifact, with the trainer that made it and the family its weights belong to:
/// what the avatar records, since it decides where the weights generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trained {
    /// The registry id of the trainer; `None` for an endpoint the registry does not know.
    pub trainer: Option<&'static str>,
    pub base: BaseFamily,
    pub artifact: TrainedArtifact,
}

/// The artifact in a trainer's output, if the output holds all of it, where the registry says
/// the trainer at `endpoint` keeps it (a trainer it does not know: `diffusers_lora_file`, a
/// FLUX.1 [dev] LoRA). A trainer that makes two files made nothing usable without both.
pub fn artifact_from_output(endpoint: &str, output: &Value) -> Option<Trained> {
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let file_url = |field: &str| text(output.get(field)?.get("url")?);
    let entry = super::trainers::by_endpoint(endpoint);
    let (field, high_noise_field) = match entry.map(|entry| entry.output) {
        Some(Output::Finetune) => {
            return Some(Trained {
                trainer: entry.map(|entry| entry.id),
                base: BaseFamily::Flux1ProFinetune,
                artifact: TrainedArtifact::Finetune {
                    id: text(output.get("finetune_id")?)?,
                },
            });
        }
        Some(Output::Lora { field, high_noise }) => (field, high_noise),
        None => ("diffusers_lora_file", None),
    };
    let high_noise_url = match high_noise_field {
        Some(field) => Some(file_url(field)?),
        None => None,
    };
    Some(Trained {
        trainer: entry.map(|entry| entry.id),
        base: entry.map_or(BaseFamily::Flux1Dev, |entry| entry.base),
        artifact: TrainedArtifact::Lora {
            url: file_url(field)?,
            config_url: file_url("config_file"),
            high_noise_url,
        },
    })
}

/// Which FAL trainer runs: an entry of the registry (`domain::trainers`), by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trainer(&'static str);

impl Trainer {
    /// `fal-ai/flux-lora-portrait-trainer`: a LoRA of a person.
    pub const PORTRAIT: Self = Self("portrait");
    /// `fal-ai/flux-pro-trainer`: a FLUX pro finetune (deprecated by FAL).
    pub const PRO: Self = Self("pro");
    /// `fal-ai/flux-lora-fast-training`: a LoRA, `is_style` for styles.
    pub const FAST_LORA: Self = Self("fast_lora");

    /// The trainer with this registry id.
    pub fn from_id(id: &str) -> Option<Self> {
        super::trainers::by_id(id).map(|entry| Self(entry.id))
    }

    /// Its entry in the trainer registry.
    pub fn entry(self) -> &'static TrainerEntry {
        super::trainers::by_id(self.0).expect("every trainer is in the registry")
    }

    pub fn endpoint(self) -> &'static str {
        self.entry().endpoint
    }
}

/// The client's choice of trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainerChoice {
    /// Chosen by the avatar's kind, never a deprecated trainer: characters get `portrait`,
    /// the other kinds `fast_lora` (with `is_style` for a style).
    #[default]
    Auto,
    Portrait,
    /// Deprecated by FAL: refused unless `FALGATE_ALLOW_DEPRECATED_TRAINERS` is set.
    Pro,
    FastLora,
}

impl TrainerChoice {
    /// The trainer this choice names for an avatar of `kind`.
    ///
    /// `auto` sends styles, products and general avatars to the fast LoRA trainer: FAL names it
    /// as the replacement of its retired general trainer, it has a style mode and a subject mode
    /// (captions and masks of its own), and its LoRAs are FLUX.1 [dev] weights, which generate on
    /// `fal-ai/flux-lora` like a character's, with the same quality presets.
    pub fn resolve(self, kind: AvatarKind) -> Trainer {
        match self {
            Self::Auto => match kind {
                AvatarKind::Character => Trainer::PORTRAIT,
                AvatarKind::Style | AvatarKind::Product | AvatarKind::General => Trainer::FAST_LORA,
            },
            Self::Portrait => Trainer::PORTRAIT,
            Self::Pro => Trainer::PRO,
            Self::FastLora => Trainer::FAST_LORA,
        }
    }
}

/// Training presets: `fast`, `balanced` (default), `quality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainingPreset {
    Fast,
    #[default]
    Balanced,
    Quality,
}

/// The trigger phrase: the client's, or `TOK_` and the first 8 hex digits of the avatar id.
pub fn default_trigger_phrase(avatar_id: Uuid) -> String {
    format!("TOK_{}", &avatar_id.simple().to_string()[..8])
}

fn overridable(trainer: Trainer) -> &'static [(&'static str, FieldRule)] {
    trainer.entry().overridable
}

pub use super::FieldProblem;

/// Everything that makes a trainer's input.
#[derive(Debug, Clone)]
pub struct TrainingSpec<'a> {
    pub trainer: Trainer,
    pub preset: TrainingPreset,
    pub kind: AvatarKind,
    pub avatar_id: Uuid,
    pub avatar_name: &'a str,
    pub trigger_phrase: &'a str,
    pub data_url: &'a str,
    pub overrides: &'a Map<String, Value>,
}

/// The exact FAL input of a training: the preset's values, the fixed fields, then the client's
/// overrides, each checked against what FAL takes. Fields not named keep FAL's default.
pub fn training_input(spec: &TrainingSpec<'_>) -> Result<Value, Vec<FieldProblem>> {
    let entry = spec.trainer.entry();
    let mut input = preset_values(spec.trainer, spec.preset);
    let fields = input.as_object_mut().expect("presets are objects");
    fields.insert(entry.fields.zip.into(), json!(spec.data_url));
    if let Some((trigger, _)) = entry.fields.trigger {
        fields.insert(trigger.into(), json!(spec.trigger_phrase));
    }
    // The ZIP falgate makes has a caption per photo; a client's own ZIP may not, and these
    // trainers fail without one.
    if let Captions::Required {
        default_caption_field,
    } = entry.captions
    {
        fields.insert(default_caption_field.into(), json!(spec.trigger_phrase));
    }
    let style = spec.kind == AvatarKind::Style;
    // Each trainer's own switch between a subject and a style.
    match entry.id {
        "pro" => {
            fields.insert("mode".into(), json!(spec.kind.as_str()));
            fields.insert("finetune_type".into(), json!("lora"));
            fields.insert("captioning".into(), json!(true));
            let name: String = spec.avatar_name.chars().take(30).collect();
            fields.insert(
                "finetune_comment".into(),
                json!(format!("{name} ({})", spec.avatar_id)),
            );
        }
        "fast_lora" | "wan_22_image" => {
            fields.insert("is_style".into(), json!(style));
        }
        "turbo_flux" => {
            let mode = if style { "style" } else { "subject" };
            fields.insert("training_style".into(), json!(mode));
        }
        "z_image" => {
            let mode = if style { "style" } else { "content" };
            fields.insert("training_type".into(), json!(mode));
        }
        _ => {}
    }
    let rules = overridable(spec.trainer);
    let mut problems = Vec::new();
    for (name, value) in spec.overrides {
        let field = format!("overrides.{name}");
        let Some((_, rule)) = rules.iter().find(|(known, _)| known == name) else {
            let known: Vec<&str> = rules.iter().map(|(n, _)| *n).collect();
            problems.push(FieldProblem {
                field,
                message: format!(
                    "`{name}` cannot be set for the {} trainer; it takes: {}",
                    entry.endpoint,
                    known.join(", ")
                ),
            });
            continue;
        };
        match check(rule, value) {
            Ok(value) => {
                fields.insert(name.clone(), value);
            }
            Err(message) => problems.push(FieldProblem { field, message }),
        }
    }
    if problems.is_empty() {
        Ok(input)
    } else {
        Err(problems)
    }
}

fn check(rule: &FieldRule, value: &Value) -> Result<Value, String> {
    match *rule {
        FieldRule::Int { min, max } => match value.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(json!(n)),
            _ => Err(format!("must be a whole number from {min} to {max}")),
        },
        FieldRule::Float { min, max } => match value.as_f64() {
            Some(x) if x >= min && x <= max => Ok(json!(x)),
            _ => Err(format!("must be a number from {min} to {max}")),
        },
        FieldRule::Bool => value
            .as_bool()
            .map(|b| json!(b))
            .ok_or_else(|| "must be true or false".to_owned()),
        FieldRule::OneOf(allowed) => {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            };
            if allowed.contains(&text.as_str()) {
                // lora_rank is a number on the wire; the others are strings.
                Ok(text.parse::<i64>().map(|n| json!(n)).unwrap_or(json!(text)))
            } else {
                Err(format!("must be one of {}", allowed.join(", ")))
            }
        }
    }
}

/// The seed's preset table, exactly.
fn preset_values(trainer: Trainer, preset: TrainingPreset) -> Value {
    Value::Object(trainer.entry().preset_json(preset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(
        trainer: Trainer,
        preset: TrainingPreset,
        kind: AvatarKind,
        overrides: &'a Map<String, Value>,
    ) -> TrainingSpec<'a> {
        TrainingSpec {
            trainer,
            preset,
            kind,
            avatar_id: Uuid::parse_str("0192f5a4-1b2c-7d3e-8f40-123456789abc").unwrap(),
            avatar_name: "A rather long avatar name that goes past thirty",
            trigger_phrase: "TOK_0192f5a4",
            data_url: "https://files.example/photos.zip",
            overrides,
        }
    }

    #[test]
    fn auto_chooses_by_kind() {
        assert_eq!(
            TrainerChoice::Auto.resolve(AvatarKind::Character),
            Trainer::PORTRAIT
        );
        for kind in [AvatarKind::Style, AvatarKind::Product, AvatarKind::General] {
            let chosen = TrainerChoice::Auto.resolve(kind);
            assert_eq!(chosen, Trainer::FAST_LORA);
            assert!(
                chosen.entry().is_current(),
                "auto never picks a deprecated trainer"
            );
        }
        assert_eq!(
            TrainerChoice::FastLora.resolve(AvatarKind::Character),
            Trainer::FAST_LORA
        );
    }

    #[test]
    fn trigger_phrase_defaults_to_tok_and_eight_hex_digits() {
        let id = Uuid::parse_str("0192f5a4-1b2c-7d3e-8f40-123456789abc").unwrap();
        assert_eq!(default_trigger_phrase(id), "TOK_0192f5a4");
    }

    #[test]
    fn portrait_balanced_is_the_seed_preset_exactly() {
        let none = Map::new();
        let input = training_input(&spec(
            Trainer::PORTRAIT,
            TrainingPreset::Balanced,
            AvatarKind::Character,
            &none,
        ))
        .unwrap();
        assert_eq!(
            input,
            json!({
                "steps": 1500, "learning_rate": 0.00015, "subject_crop": true, "create_masks": true,
                "trigger_phrase": "TOK_0192f5a4", "images_data_url": "https://files.example/photos.zip"
            })
        );
    }

    #[test]
    fn every_preset_of_the_seed_table() {
        let none = Map::new();
        let get = |t, p| training_input(&spec(t, p, AvatarKind::Style, &none)).unwrap();
        let fast = get(Trainer::PORTRAIT, TrainingPreset::Fast);
        assert_eq!(
            (fast["steps"].clone(), fast["learning_rate"].clone()),
            (json!(500), json!(0.0003))
        );
        assert!(
            fast.get("create_masks").is_none(),
            "unnamed fields keep FAL's default"
        );
        let quality = get(Trainer::PORTRAIT, TrainingPreset::Quality);
        assert_eq!(quality["steps"], 2500);
        assert_eq!(quality["multiresolution_training"], true);
        let pro_fast = get(Trainer::PRO, TrainingPreset::Fast);
        assert_eq!(pro_fast["iterations"], 200);
        assert_eq!(pro_fast["priority"], "speed");
        let pro_quality = get(Trainer::PRO, TrainingPreset::Quality);
        assert_eq!(pro_quality["iterations"], 1000);
        assert_eq!(pro_quality["learning_rate"], 0.00005);
        assert_eq!(pro_quality["lora_rank"], 32);
    }

    #[test]
    fn pro_trainer_gets_its_fixed_fields() {
        let none = Map::new();
        let input = training_input(&spec(
            Trainer::PRO,
            TrainingPreset::Balanced,
            AvatarKind::Product,
            &none,
        ))
        .unwrap();
        assert_eq!(input["mode"], "product");
        assert_eq!(input["finetune_type"], "lora");
        assert_eq!(input["captioning"], true);
        assert_eq!(input["trigger_word"], "TOK_0192f5a4");
        assert_eq!(input["data_url"], "https://files.example/photos.zip");
        let comment = input["finetune_comment"].as_str().unwrap();
        assert!(comment.starts_with("A rather long avatar name that"));
        assert!(comment.ends_with("(0192f5a4-1b2c-7d3e-8f40-123456789abc)"));
        assert_eq!(input["iterations"], 600);
    }

    #[test]
    fn fast_lora_sets_is_style_for_styles() {
        let none = Map::new();
        let style = training_input(&spec(
            Trainer::FAST_LORA,
            TrainingPreset::Fast,
            AvatarKind::Style,
            &none,
        ))
        .unwrap();
        assert_eq!(style["is_style"], true);
        let person = training_input(&spec(
            Trainer::FAST_LORA,
            TrainingPreset::Fast,
            AvatarKind::Character,
            &none,
        ))
        .unwrap();
        assert_eq!(person["is_style"], false);
    }

    #[test]
    fn overrides_are_checked_against_the_trainer() {
        let mut overrides = Map::new();
        overrides.insert("steps".into(), json!(800));
        let input = training_input(&spec(
            Trainer::PORTRAIT,
            TrainingPreset::Balanced,
            AvatarKind::Character,
            &overrides,
        ))
        .unwrap();
        assert_eq!(input["steps"], 800);

        let mut bad = Map::new();
        bad.insert("steps".into(), json!(0));
        bad.insert("iterations".into(), json!(300));
        bad.insert("subject_crop".into(), json!("yes"));
        let problems = training_input(&spec(
            Trainer::PORTRAIT,
            TrainingPreset::Balanced,
            AvatarKind::Character,
            &bad,
        ))
        .unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "overrides.iterations",
                "overrides.steps",
                "overrides.subject_crop"
            ]
        );

        let mut rank = Map::new();
        rank.insert("lora_rank".into(), json!(16));
        let input = training_input(&spec(
            Trainer::PRO,
            TrainingPreset::Fast,
            AvatarKind::Style,
            &rank,
        ))
        .unwrap();
        assert_eq!(input["lora_rank"], 16);
        rank.insert("lora_rank".into(), json!(64));
        assert!(
            training_input(&spec(
                Trainer::PRO,
                TrainingPreset::Fast,
                AvatarKind::Style,
                &rank
            ))
            .is_err()
        );
    }
}

#[cfg(test)]
mod artifact_tests {
    use super::*;

    #[test]
    fn artifacts_come_only_from_what_fal_sent() {
        let lora = json!({"diffusers_lora_file": {"url": "https://x/w.safetensors"}, "config_file": {"url": "https://x/c.json"}});
        assert_eq!(
            artifact_from_output("fal-ai/flux-lora-portrait-trainer", &lora),
            Some(Trained {
                trainer: Some("portrait"),
                base: BaseFamily::Flux1Dev,
                artifact: TrainedArtifact::Lora {
                    url: "https://x/w.safetensors".into(),
                    config_url: Some("https://x/c.json".into()),
                    high_noise_url: None,
                }
            })
        );
        assert_eq!(
            artifact_from_output("fal-ai/flux-pro-trainer", &json!({"finetune_id": "ft-1"})),
            Some(Trained {
                trainer: Some("pro"),
                base: BaseFamily::Flux1ProFinetune,
                artifact: TrainedArtifact::Finetune { id: "ft-1".into() }
            })
        );
        // A request id is never an artifact, and an empty output makes none.
        assert_eq!(
            artifact_from_output("fal-ai/flux-pro-trainer", &json!({"request_id": "r"})),
            None
        );
        assert_eq!(
            artifact_from_output("fal-ai/flux-lora-fast-training", &json!({})),
            None
        );
    }

    #[test]
    fn wan_weights_are_both_files_or_none() {
        let low = json!({"url": "https://x/low.safetensors"});
        let high = json!({"url": "https://x/high.safetensors"});
        let both = json!({"diffusers_lora_file": low, "high_noise_lora": high});
        let trained = artifact_from_output("fal-ai/wan-22-image-trainer", &both).unwrap();
        assert_eq!(trained.trainer, Some("wan_22_image"));
        assert_eq!(trained.base, BaseFamily::Wan22);
        assert_eq!(
            trained.artifact,
            TrainedArtifact::Lora {
                url: "https://x/low.safetensors".into(),
                config_url: None,
                high_noise_url: Some("https://x/high.safetensors".into()),
            }
        );
        // Half of Wan's weights generate nothing: no artifact, and the training fails.
        let low_only = json!({"diffusers_lora_file": low});
        assert_eq!(
            artifact_from_output("fal-ai/wan-22-image-trainer", &low_only),
            None
        );
        // Krea keeps its file under `lora_file`.
        let krea = json!({"lora_file": {"url": "https://x/k.safetensors"}});
        let trained = artifact_from_output("fal-ai/krea-2-trainer", &krea).unwrap();
        assert_eq!(trained.base, BaseFamily::Krea2);
        assert!(
            matches!(trained.artifact, TrainedArtifact::Lora { url, .. } if url == "https://x/k.safetensors")
        );
    }
}
