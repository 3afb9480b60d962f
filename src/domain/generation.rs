//! Generation: the six quality presets, the exact aspect-ratio mapping, and the FAL input for
//! each of the two paths: a LoRA on its family's endpoint (`fal-ai/flux-lora` for FLUX.1
//! [dev], `fal-ai/flux-2/lora`, …), a finetune on `fal-ai/flux-pro/v1.1-ultra-finetuned`.
//! A preset's steps and guidance go to an endpoint within its ranges, and not at all to one
//! that does not take them.

use super::trainers::LoraGeneration;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

pub const FINETUNE_ENDPOINT: &str = "fal-ai/flux-pro/v1.1-ultra-finetuned";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GenerationPreset {
    Fast,
    #[default]
    Balanced,
    Quality,
    Portrait,
    Landscape,
    Ultra,
}

/// One row of the seed's preset table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PresetValues {
    pub num_inference_steps: u32,
    pub guidance_scale: f64,
    pub image_size: &'static str,
    pub lora_scale: f64,
    pub finetune_strength: f64,
}

impl GenerationPreset {
    pub fn values(self) -> PresetValues {
        let row = |steps, guidance, size, lora, finetune| PresetValues {
            num_inference_steps: steps,
            guidance_scale: guidance,
            image_size: size,
            lora_scale: lora,
            finetune_strength: finetune,
        };
        match self {
            Self::Fast => row(20, 3.0, "square", 0.8, 0.8),
            Self::Balanced => row(28, 3.5, "square_hd", 1.0, 1.0),
            Self::Quality => row(50, 4.0, "square_hd", 1.2, 1.2),
            Self::Portrait => row(35, 3.5, "portrait_4_3", 1.1, 1.0),
            Self::Landscape => row(30, 3.5, "landscape_4_3", 1.0, 1.0),
            Self::Ultra => row(35, 3.5, "square_hd", 1.1, 1.1),
        }
    }
}

/// The aspect ratios a client may ask for.
pub const ASPECT_RATIOS: [&str; 9] = [
    "21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21",
];

/// The LoRA path's `image_size` for an aspect ratio: FAL's named sizes where one matches
/// exactly, else a custom size of about one megapixel with both sides multiples of 16. Never a
/// silent square.
pub fn lora_image_size(aspect_ratio: &str) -> Option<Value> {
    let named = match aspect_ratio {
        "1:1" => Some("square_hd"),
        "3:4" => Some("portrait_4_3"),
        "4:3" => Some("landscape_4_3"),
        "9:16" => Some("portrait_16_9"),
        "16:9" => Some("landscape_16_9"),
        _ => None,
    };
    if let Some(named) = named {
        return Some(json!(named));
    }
    if !ASPECT_RATIOS.contains(&aspect_ratio) {
        return None;
    }
    let (w, h) = aspect_ratio.split_once(':')?;
    let ratio = w.parse::<f64>().ok()? / h.parse::<f64>().ok()?;
    let height = ((1_048_576.0 / ratio).sqrt() / 16.0).round() * 16.0;
    let width = (height * ratio / 16.0).round() * 16.0;
    Some(json!({"width": width as u32, "height": height as u32}))
}

/// The finetune path's `aspect_ratio` for a preset's named size.
fn finetune_aspect_ratio(image_size: &str) -> &'static str {
    match image_size {
        "portrait_4_3" => "3:4",
        "landscape_4_3" => "4:3",
        _ => "1:1",
    }
}

/// The prompt with the trigger phrase in front, once: not added again when the prompt already
/// holds it (in any case).
pub fn with_trigger(prompt: &str, trigger: &str) -> String {
    if trigger.is_empty() || prompt.to_lowercase().contains(&trigger.to_lowercase()) {
        prompt.to_owned()
    } else {
        format!("{trigger} {prompt}")
    }
}

/// What an avatar was trained into.
#[derive(Debug, Clone, PartialEq)]
pub enum Artifact {
    /// A LoRA file (two for Wan 2.2: `high_noise_url` is its high-noise transformer's), and
    /// the endpoint of its model family.
    Lora {
        url: String,
        high_noise_url: Option<String>,
        to: LoraGeneration,
    },
    Finetune {
        id: String,
    },
}

impl Artifact {
    pub fn endpoint(&self) -> &'static str {
        match self {
            Self::Lora { to, .. } => to.endpoint,
            Self::Finetune { .. } => FINETUNE_ENDPOINT,
        }
    }
}

/// The options a client gives a generation, already type-checked.
#[derive(Debug, Clone, Default)]
pub struct GenerationOptions {
    pub preset: GenerationPreset,
    pub aspect_ratio: Option<String>,
    /// An explicit `image_size` (a named size or `{width, height}`) wins over the aspect ratio.
    pub image_size: Option<Value>,
    pub num_images: Option<u32>,
    pub seed: Option<u64>,
    pub output_format: Option<String>,
    pub enable_safety_checker: Option<bool>,
    pub safety_tolerance: Option<String>,
    pub raw: Option<bool>,
    pub negative_prompt: Option<String>,
}

pub const NAMED_SIZES: [&str; 6] = [
    "square_hd",
    "square",
    "portrait_4_3",
    "portrait_16_9",
    "landscape_4_3",
    "landscape_16_9",
];

pub use super::FieldProblem;

fn problem(field: &str, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field: field.to_owned(),
        message: message.into(),
    }
}

pub fn check_num_images(n: u32) -> Result<(), String> {
    if (1..=4).contains(&n) {
        Ok(())
    } else {
        Err("must be from 1 to 4".into())
    }
}

/// FLUX pro's safety tolerance: `"1"` (strictest) to `"6"`.
pub fn check_safety_tolerance(tolerance: &str) -> Result<(), String> {
    if matches!(tolerance, "1" | "2" | "3" | "4" | "5" | "6") {
        Ok(())
    } else {
        Err("must be \"1\" (strictest) to \"6\"".into())
    }
}

/// The output formats of any generation endpoint: which one an avatar's takes is checked
/// once the avatar is known.
pub const OUTPUT_FORMATS: [&str; 3] = ["jpeg", "png", "webp"];

pub fn check_output_format(format: &str) -> Result<(), String> {
    if OUTPUT_FORMATS.contains(&format) {
        Ok(())
    } else {
        Err(format!("must be one of {}", OUTPUT_FORMATS.join(", ")))
    }
}

/// The finetune endpoint's output formats.
const FINETUNE_OUTPUT_FORMATS: &[&str] = &["jpeg", "png"];

pub fn check_aspect_ratio(ratio: &str) -> Result<(), String> {
    if ASPECT_RATIOS.contains(&ratio) {
        Ok(())
    } else {
        Err(format!("must be one of {}", ASPECT_RATIOS.join(", ")))
    }
}

/// What is wrong with the options whatever the avatar was trained into: these are known from
/// the request alone, before the avatar is looked at.
pub fn option_problems(options: &GenerationOptions) -> Vec<FieldProblem> {
    let mut problems = Vec::new();
    let checks = [
        ("num_images", options.num_images.map(check_num_images)),
        (
            "output_format",
            options.output_format.as_deref().map(check_output_format),
        ),
        (
            "aspect_ratio",
            options.aspect_ratio.as_deref().map(check_aspect_ratio),
        ),
    ];
    for (field, check) in checks {
        if let Some(Err(message)) = check {
            problems.push(problem(field, message));
        }
    }
    problems
}

/// The exact FAL input of one generation, or every field that is wrong. A field the chosen
/// endpoint does not take is refused, never dropped.
pub fn generation_input(
    artifact: &Artifact,
    trigger: &str,
    prompt: &str,
    options: &GenerationOptions,
) -> Result<Value, Vec<FieldProblem>> {
    let mut problems = Vec::new();
    let preset = options.preset.values();
    let prompt = prompt.trim();
    if prompt.is_empty() {
        problems.push(problem("prompt", "must not be empty"));
    }
    problems.extend(option_problems(options));
    let mut input = json!({"prompt": with_trigger(prompt, trigger)});
    let fields = input.as_object_mut().expect("an object");
    match artifact {
        Artifact::Lora {
            url,
            high_noise_url,
            to,
        } => {
            let endpoint = to.endpoint;
            for (field, given) in [
                ("safety_tolerance", options.safety_tolerance.is_some()),
                ("raw", options.raw.is_some()),
            ] {
                if given {
                    problems.push(problem(
                        field,
                        format!("{endpoint} does not take `{field}`; it is for finetuned avatars"),
                    ));
                }
            }
            let image_size = match (&options.image_size, &options.aspect_ratio) {
                (Some(size), _) => check_image_size(size)
                    .map_err(|m| problems.push(problem("image_size", m)))
                    .ok(),
                (None, Some(ratio)) => lora_image_size(ratio),
                (None, None) => Some(json!(preset.image_size)),
            };
            let scale = preset.lora_scale;
            let loras = match (to.two_transformers, high_noise_url) {
                (true, Some(high)) => json!([
                    {"path": high, "scale": scale, "transformer": "high"},
                    {"path": url, "scale": scale, "transformer": "low"},
                ]),
                (true, None) => {
                    problems.push(problem(
                        "avatar_id",
                        format!(
                            "{endpoint} needs the avatar's two LoRA files, and it holds one: \
                             train it again"
                        ),
                    ));
                    json!([])
                }
                (false, _) => json!([{"path": url, "scale": scale}]),
            };
            fields.insert("loras".into(), loras);
            match options.num_images {
                Some(n) if n > 1 && !to.num_images => problems.push(problem(
                    "num_images",
                    format!("{endpoint} draws one image a request: send several prompts instead"),
                )),
                _ => {}
            }
            if let Some((least, most)) = to.steps {
                let steps = preset.num_inference_steps.clamp(least, most);
                fields.insert("num_inference_steps".into(), json!(steps));
            }
            if let Some((least, most)) = to.guidance {
                let guidance = preset.guidance_scale.clamp(least, most);
                fields.insert("guidance_scale".into(), json!(guidance));
            }
            if let Some(size) = image_size {
                fields.insert("image_size".into(), size);
            }
            if let Some(enabled) = options.enable_safety_checker {
                fields.insert("enable_safety_checker".into(), json!(enabled));
            }
        }
        Artifact::Finetune { id } => {
            if options.image_size.is_some() {
                problems.push(problem(
                    "image_size",
                    format!("{FINETUNE_ENDPOINT} takes `aspect_ratio`, not `image_size`"),
                ));
            }
            if options.enable_safety_checker.is_some() {
                problems.push(problem(
                    "enable_safety_checker",
                    format!("{FINETUNE_ENDPOINT} takes `safety_tolerance` instead"),
                ));
            }
            if let Some(tolerance) = &options.safety_tolerance
                && let Err(why) = check_safety_tolerance(tolerance)
            {
                problems.push(problem("safety_tolerance", why));
            }
            fields.insert("finetune_id".into(), json!(id));
            fields.insert("finetune_strength".into(), json!(preset.finetune_strength));
            let ratio = options
                .aspect_ratio
                .clone()
                .unwrap_or_else(|| finetune_aspect_ratio(preset.image_size).to_owned());
            fields.insert("aspect_ratio".into(), json!(ratio));
            if let Some(tolerance) = &options.safety_tolerance {
                fields.insert("safety_tolerance".into(), json!(tolerance));
            }
            if let Some(raw) = options.raw {
                fields.insert("raw".into(), json!(raw));
            }
        }
    }
    let (endpoint, formats, format_field, takes_num_images, takes_negative_prompt) = match artifact
    {
        Artifact::Lora { to, .. } => (
            to.endpoint,
            to.output_formats,
            to.output_format_field,
            to.num_images,
            to.negative_prompt,
        ),
        Artifact::Finetune { .. } => (
            FINETUNE_ENDPOINT,
            FINETUNE_OUTPUT_FORMATS,
            "output_format",
            true,
            false,
        ),
    };
    if let Some(format) = &options.output_format
        && check_output_format(format).is_ok()
        && !formats.contains(&format.as_str())
    {
        problems.push(problem(
            "output_format",
            format!("{endpoint} offers {}", formats.join(", ")),
        ));
    }
    match (&options.negative_prompt, takes_negative_prompt) {
        (Some(negative), true) => {
            fields.insert("negative_prompt".into(), json!(negative));
        }
        (Some(_), false) => problems.push(problem(
            "negative_prompt",
            format!("{endpoint} takes no negative prompt"),
        )),
        (None, _) => {}
    }
    if let Some(n) = options.num_images.filter(|_| takes_num_images) {
        fields.insert("num_images".into(), json!(n));
    }
    if let Some(seed) = options.seed {
        fields.insert("seed".into(), json!(seed));
    }
    if let Some(format) = &options.output_format {
        fields.insert(format_field.into(), json!(format));
    }
    if problems.is_empty() {
        Ok(input)
    } else {
        Err(problems)
    }
}

/// A named size, or `{width, height}` each from 1 to 14142; answers the size to send.
pub fn check_image_size(size: &Value) -> Result<Value, String> {
    match size {
        Value::String(name) if NAMED_SIZES.contains(&name.as_str()) => Ok(size.clone()),
        Value::Object(dims) => {
            let side = |key: &str| {
                dims.get(key)
                    .and_then(Value::as_u64)
                    .filter(|v| (1..=14_142).contains(v))
            };
            match (side("width"), side("height"), dims.len()) {
                (Some(w), Some(h), 2) => Ok(json!({"width": w, "height": h})),
                _ => Err("a custom size is `{width, height}`, each from 1 to 14142".into()),
            }
        }
        _ => Err(format!(
            "must be one of {} or `{{width, height}}`",
            NAMED_SIZES.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::trainers::BaseFamily;

    /// A FLUX.1 [dev] LoRA (the portrait, fast and turbo trainers' weights).
    fn lora() -> Artifact {
        Artifact::Lora {
            url: "https://files.example/lora.safetensors".into(),
            high_noise_url: None,
            to: BaseFamily::Flux1Dev.lora_generation().unwrap(),
        }
    }

    fn finetune() -> Artifact {
        Artifact::Finetune {
            id: "ft-123".into(),
        }
    }

    #[test]
    fn aspect_ratios_map_exactly_and_never_to_a_silent_square() {
        assert_eq!(lora_image_size("1:1"), Some(json!("square_hd")));
        assert_eq!(lora_image_size("3:4"), Some(json!("portrait_4_3")));
        assert_eq!(lora_image_size("4:3"), Some(json!("landscape_4_3")));
        assert_eq!(lora_image_size("9:16"), Some(json!("portrait_16_9")));
        assert_eq!(lora_image_size("16:9"), Some(json!("landscape_16_9")));
        for ratio in ["21:9", "3:2", "2:3", "9:21"] {
            let size = lora_image_size(ratio).unwrap();
            let (w, h) = (
                size["width"].as_u64().unwrap(),
                size["height"].as_u64().unwrap(),
            );
            assert_eq!((w % 16, h % 16), (0, 0), "{ratio}: {size}");
            let pixels = (w * h) as f64;
            assert!(
                (0.9e6..1.2e6).contains(&pixels),
                "{ratio}: about a megapixel, {size}"
            );
            let (rw, rh) = ratio.split_once(':').unwrap();
            let wanted = rw.parse::<f64>().unwrap() / rh.parse::<f64>().unwrap();
            assert!(
                ((w as f64 / h as f64) - wanted).abs() < 0.03,
                "{ratio}: {size}"
            );
        }
        assert_eq!(lora_image_size("5:4"), None);
    }

    #[test]
    fn the_trigger_phrase_goes_in_front_once() {
        assert_eq!(
            with_trigger("a portrait at dusk", "TOK_ab12cd34"),
            "TOK_ab12cd34 a portrait at dusk"
        );
        assert_eq!(
            with_trigger("tok_ab12cd34 smiling", "TOK_ab12cd34"),
            "tok_ab12cd34 smiling"
        );
    }

    #[test]
    fn lora_path_takes_the_presets_values() {
        let options = GenerationOptions {
            preset: GenerationPreset::Portrait,
            aspect_ratio: Some("3:4".into()),
            ..Default::default()
        };
        let input = generation_input(&lora(), "TOK_x", "smiling", &options).unwrap();
        assert_eq!(
            input,
            json!({
                "prompt": "TOK_x smiling",
                "loras": [{"path": "https://files.example/lora.safetensors", "scale": 1.1}],
                "num_inference_steps": 35,
                "guidance_scale": 3.5,
                "image_size": "portrait_4_3",
            })
        );
        let fast = generation_input(
            &lora(),
            "",
            "x",
            &GenerationOptions {
                preset: GenerationPreset::Fast,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (
                fast["num_inference_steps"].clone(),
                fast["image_size"].clone()
            ),
            (json!(20), json!("square"))
        );
        assert_eq!(fast["loras"][0]["scale"], 0.8);
    }

    #[test]
    fn finetune_path_takes_strength_and_aspect_ratio() {
        let input = generation_input(
            &finetune(),
            "TOK_x",
            "a vase",
            &GenerationOptions {
                preset: GenerationPreset::Quality,
                safety_tolerance: Some("3".into()),
                num_images: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(input["finetune_id"], "ft-123");
        assert_eq!(input["finetune_strength"], 1.2);
        assert_eq!(input["aspect_ratio"], "1:1");
        assert_eq!(input["safety_tolerance"], "3");
        assert_eq!(input["num_images"], 2);
        assert!(
            input.get("num_inference_steps").is_none() && input.get("guidance_scale").is_none()
        );
        let landscape = generation_input(
            &finetune(),
            "",
            "x",
            &GenerationOptions {
                preset: GenerationPreset::Landscape,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(landscape["aspect_ratio"], "4:3");
    }

    #[test]
    fn fields_the_endpoint_does_not_take_are_refused() {
        let negative = GenerationOptions {
            negative_prompt: Some("blurry".into()),
            ..Default::default()
        };
        let problems = generation_input(&lora(), "", "x", &negative).unwrap_err();
        assert_eq!(problems[0].field, "negative_prompt");
        let five = GenerationOptions {
            num_images: Some(5),
            ..Default::default()
        };
        assert_eq!(
            generation_input(&lora(), "", "x", &five).unwrap_err()[0].field,
            "num_images"
        );
        let raw_on_lora = GenerationOptions {
            raw: Some(true),
            ..Default::default()
        };
        assert_eq!(
            generation_input(&lora(), "", "x", &raw_on_lora).unwrap_err()[0].field,
            "raw"
        );
        let size_on_finetune = GenerationOptions {
            image_size: Some(json!("square")),
            ..Default::default()
        };
        assert_eq!(
            generation_input(&finetune(), "", "x", &size_on_finetune).unwrap_err()[0].field,
            "image_size"
        );
        let both = GenerationOptions {
            aspect_ratio: Some("16:9".into()),
            image_size: Some(json!("square")),
            ..Default::default()
        };
        assert_eq!(
            generation_input(&lora(), "", "x", &both).unwrap()["image_size"],
            "square",
            "an explicit image_size wins"
        );
        let explicit = GenerationOptions {
            image_size: Some(json!({"width": 640, "height": 960})),
            ..Default::default()
        };
        assert_eq!(
            generation_input(&lora(), "", "x", &explicit).unwrap()["image_size"],
            json!({"width": 640, "height": 960})
        );
    }
}

#[cfg(test)]
mod family_tests {
    use super::*;
    use crate::domain::trainers::BaseFamily;

    fn of(family: BaseFamily) -> Artifact {
        Artifact::Lora {
            url: "https://files.example/lora.safetensors".into(),
            high_noise_url: (family == BaseFamily::Wan22)
                .then(|| "https://files.example/high.safetensors".into()),
            to: family.lora_generation().unwrap(),
        }
    }

    #[test]
    fn presets_go_to_each_endpoint_within_what_it_takes() {
        let quality = GenerationOptions {
            preset: GenerationPreset::Quality,
            ..GenerationOptions::default()
        };
        let input = |family| generation_input(&of(family), "TOK", "x", &quality).unwrap();
        // FLUX.2: the preset's 50 steps, and its guidance 4.0 within 0–20.
        let flux_2 = input(BaseFamily::Flux2);
        assert_eq!(of(BaseFamily::Flux2).endpoint(), "fal-ai/flux-2/lora");
        assert_eq!(
            (&flux_2["num_inference_steps"], &flux_2["guidance_scale"]),
            (&json!(50), &json!(4.0))
        );
        // Z-Image turbo: eight steps at most, no guidance.
        let z_image = input(BaseFamily::ZImageTurbo);
        assert_eq!(z_image["num_inference_steps"], 8);
        assert!(z_image.get("guidance_scale").is_none());
        // Krea 2 turbo: neither.
        let krea = input(BaseFamily::Krea2);
        assert!(krea.get("num_inference_steps").is_none() && krea.get("guidance_scale").is_none());
        assert_eq!(krea["loras"][0]["scale"], 1.2);
        // A finetune is no LoRA.
        assert!(BaseFamily::Flux1ProFinetune.lora_generation().is_none());
    }

    #[test]
    fn wan_takes_both_files_one_image_and_its_own_format_field() {
        let options = GenerationOptions {
            preset: GenerationPreset::Quality,
            output_format: Some("png".into()),
            num_images: Some(1),
            negative_prompt: Some("blur".into()),
            ..GenerationOptions::default()
        };
        let wan = of(BaseFamily::Wan22);
        assert_eq!(wan.endpoint(), "fal-ai/wan/v2.2-a14b/text-to-image/lora");
        let input = generation_input(&wan, "TOK", "x", &options).unwrap();
        assert_eq!(
            input["loras"],
            json!([
                {"path": "https://files.example/high.safetensors", "scale": 1.2, "transformer": "high"},
                {"path": "https://files.example/lora.safetensors", "scale": 1.2, "transformer": "low"},
            ])
        );
        // The quality preset's 50 steps within Wan's 2–40.
        assert_eq!(input["num_inference_steps"], 40);
        assert_eq!(input["guidance_scale"], 4.0);
        assert_eq!(input["image_format"], "png");
        assert_eq!(input["negative_prompt"], "blur");
        assert!(input.get("output_format").is_none() && input.get("num_images").is_none());
        let four = GenerationOptions {
            num_images: Some(4),
            output_format: Some("webp".into()),
            ..GenerationOptions::default()
        };
        let fields: Vec<String> = generation_input(&wan, "", "x", &four)
            .unwrap_err()
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(fields, ["num_images", "output_format"]);
        // A Wan avatar without its high-noise file cannot generate, and is told why.
        let half = Artifact::Lora {
            url: "https://files.example/lora.safetensors".into(),
            high_noise_url: None,
            to: BaseFamily::Wan22.lora_generation().unwrap(),
        };
        let problems = generation_input(&half, "", "x", &GenerationOptions::default()).unwrap_err();
        assert!(
            problems[0].message.contains("train it again"),
            "{problems:?}"
        );
    }
}
