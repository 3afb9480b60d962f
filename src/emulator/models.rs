//! The endpoints falgate uses: input validation like FAL's pydantic models
//! (fal-protocol.md §5; errors as `{"detail": [{loc, msg, type, url, input?, ctx?}]}`, unknown
//! fields ignored) and real outputs (images in the `output_format` asked for, a safetensors
//! LoRA, a finetune id).
//! Any other endpoint accepts an object and answers a small generic output.

use std::time::SystemTime;

use base64::Engine as _;
use rand::Rng as _;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::EmulatorState;
use super::faults::{default_error_body, error_docs_url};
use super::images::{self, ImageFormat};
use super::state::{DownloadRecord, Outcome, RequestSnapshot};

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int(Option<i64>, Option<i64>),
    Float(Option<f64>, Option<f64>),
    Bool,
    Lit(&'static [&'static str]),
    IntLit(&'static [i64]),
    /// Any integer, unbounded (seeds go beyond i64 in FAL's outputs).
    AnyInt,
    ImageSize,
    Loras,
    /// Wan 2.2's LoRAs: each also says which of its two transformers it loads into.
    WanLoras,
    AspectRatio,
}

struct Field {
    name: &'static str,
    kind: Kind,
    required: bool,
    nullable: bool,
}

const fn req(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: true,
        nullable: false,
    }
}

const fn opt(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: false,
        nullable: false,
    }
}

/// `Optional[...]` fields: `null` is accepted.
const fn null(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: false,
        nullable: true,
    }
}

const OUTPUT_FORMAT: &[&str] = &["jpeg", "png"];
const IMAGE_SIZES: &[(&str, u32, u32)] = &[
    ("square_hd", 1024, 1024),
    ("square", 512, 512),
    ("portrait_4_3", 768, 1024),
    ("portrait_16_9", 576, 1024),
    ("landscape_4_3", 1024, 768),
    ("landscape_16_9", 1024, 576),
];
/// FLUX1.1 [pro] ultra output sizes (~4 MP) per aspect ratio.
const ULTRA_SIZES: &[(&str, u32, u32)] = &[
    ("21:9", 3136, 1344),
    ("16:9", 2752, 1536),
    ("4:3", 2368, 1792),
    ("3:2", 2496, 1664),
    ("1:1", 2048, 2048),
    ("2:3", 1664, 2496),
    ("3:4", 1792, 2368),
    ("9:16", 1536, 2752),
    ("9:21", 1344, 3136),
];

const FLUX_LORA: &[Field] = &[
    req("prompt", Kind::Str),
    opt("image_size", Kind::ImageSize),
    opt("num_inference_steps", Kind::Int(Some(1), Some(50))),
    null("seed", Kind::AnyInt),
    opt("loras", Kind::Loras),
    opt("guidance_scale", Kind::Float(Some(0.0), Some(35.0))),
    opt("sync_mode", Kind::Bool),
    opt("num_images", Kind::Int(Some(1), Some(4))),
    opt("enable_safety_checker", Kind::Bool),
    opt("output_format", Kind::Lit(OUTPUT_FORMAT)),
    opt("acceleration", Kind::Lit(&["none", "regular"])),
];

const OUTPUT_FORMAT_WEBP: &[&str] = &["jpeg", "png", "webp"];
const ACCELERATION: &[&str] = &["none", "regular", "high"];

const FLUX_2_LORA: &[Field] = &[
    req("prompt", Kind::Str),
    opt("guidance_scale", Kind::Float(Some(0.0), Some(20.0))),
    null("seed", Kind::AnyInt),
    opt("num_inference_steps", Kind::Int(Some(4), Some(50))),
    opt("image_size", Kind::ImageSize),
    opt("num_images", Kind::Int(Some(1), Some(4))),
    opt("acceleration", Kind::Lit(ACCELERATION)),
    opt("enable_prompt_expansion", Kind::Bool),
    opt("sync_mode", Kind::Bool),
    opt("enable_safety_checker", Kind::Bool),
    opt("output_format", Kind::Lit(OUTPUT_FORMAT_WEBP)),
    opt("loras", Kind::Loras),
];

const QWEN_IMAGE_2512_LORA: &[Field] = &[
    req("prompt", Kind::Str),
    opt("negative_prompt", Kind::Str),
    opt("image_size", Kind::ImageSize),
    opt("num_inference_steps", Kind::Int(Some(1), Some(50))),
    opt("guidance_scale", Kind::Float(Some(0.0), Some(20.0))),
    null("seed", Kind::AnyInt),
    opt("sync_mode", Kind::Bool),
    opt("num_images", Kind::Int(Some(1), Some(4))),
    opt("enable_safety_checker", Kind::Bool),
    opt("output_format", Kind::Lit(OUTPUT_FORMAT_WEBP)),
    opt("acceleration", Kind::Lit(ACCELERATION)),
    opt("loras", Kind::Loras),
];

/// No `guidance_scale`: the turbo model is distilled.
const Z_IMAGE_TURBO_LORA: &[Field] = &[
    req("prompt", Kind::Str),
    opt("image_size", Kind::ImageSize),
    opt("num_inference_steps", Kind::Int(Some(1), Some(8))),
    null("seed", Kind::AnyInt),
    opt("sync_mode", Kind::Bool),
    opt("num_images", Kind::Int(Some(1), Some(4))),
    opt("enable_safety_checker", Kind::Bool),
    opt("output_format", Kind::Lit(OUTPUT_FORMAT_WEBP)),
    opt("acceleration", Kind::Lit(ACCELERATION)),
    opt("enable_prompt_expansion", Kind::Bool),
    opt("loras", Kind::Loras),
];

/// Neither steps nor guidance.
const KREA_2_TURBO_LORA: &[Field] = &[
    req("prompt", Kind::Str),
    opt("image_size", Kind::ImageSize),
    opt("num_images", Kind::Int(Some(1), Some(4))),
    null("seed", Kind::AnyInt),
    opt("output_format", Kind::Lit(OUTPUT_FORMAT)),
    opt("acceleration", Kind::Lit(&["none", "regular"])),
    opt("enable_prompt_expansion", Kind::Bool),
    opt("enable_safety_checker", Kind::Bool),
    opt("sync_mode", Kind::Bool),
    opt("loras", Kind::Loras),
];

/// Wan 2.2 A14B text-to-image with LoRAs: one image a request, its format in `image_format`,
/// and each LoRA loaded into the high-noise transformer, the low-noise one or both.
const WAN_22_T2I_LORA: &[Field] = &[
    req("prompt", Kind::Str),
    opt("negative_prompt", Kind::Str),
    null("seed", Kind::AnyInt),
    opt("image_size", Kind::ImageSize),
    opt("num_inference_steps", Kind::Int(Some(2), Some(40))),
    opt("guidance_scale", Kind::Float(Some(1.0), Some(10.0))),
    opt("guidance_scale_2", Kind::Float(Some(1.0), Some(10.0))),
    opt("shift", Kind::Float(Some(1.0), Some(10.0))),
    opt("enable_safety_checker", Kind::Bool),
    opt("enable_output_safety_checker", Kind::Bool),
    opt("enable_prompt_expansion", Kind::Bool),
    opt("acceleration", Kind::Lit(&["none", "regular"])),
    opt("image_format", Kind::Lit(OUTPUT_FORMAT)),
    opt("loras", Kind::WanLoras),
];

const FAST_TRAINING: &[Field] = &[
    req("images_data_url", Kind::Str),
    null("trigger_word", Kind::Str),
    opt("create_masks", Kind::Bool),
    // Range unconfirmed for FAL; 1–10000 as in the schema's public clones.
    opt("steps", Kind::Int(Some(1), Some(10000))),
    opt("is_style", Kind::Bool),
    opt("is_input_format_already_preprocessed", Kind::Bool),
    null("data_archive_format", Kind::Str),
];

const PORTRAIT_TRAINER: &[Field] = &[
    req("images_data_url", Kind::Str),
    null("trigger_phrase", Kind::Str),
    opt("learning_rate", Kind::Float(Some(0.0), None)),
    opt("steps", Kind::Int(Some(1), Some(10000))),
    opt("multiresolution_training", Kind::Bool),
    opt("subject_crop", Kind::Bool),
    opt("create_masks", Kind::Bool),
    null("data_archive_format", Kind::Str),
    opt("resume_from_checkpoint", Kind::Str),
];

const PRO_TRAINER: &[Field] = &[
    req("data_url", Kind::Str),
    req("finetune_comment", Kind::Str),
    opt(
        "mode",
        Kind::Lit(&["character", "product", "style", "general"]),
    ),
    // BFL's documented minimum.
    opt("iterations", Kind::Int(Some(100), None)),
    null("learning_rate", Kind::Float(Some(0.0), None)),
    opt(
        "priority",
        Kind::Lit(&["speed", "quality", "high_res_only"]),
    ),
    opt("captioning", Kind::Bool),
    opt("trigger_word", Kind::Str),
    opt("lora_rank", Kind::IntLit(&[16, 32])),
    opt("finetune_type", Kind::Lit(&["full", "lora"])),
];

const TURBO_FLUX_TRAINER: &[Field] = &[
    req("images_data_url", Kind::Str),
    null("trigger_phrase", Kind::Str),
    opt("steps", Kind::Int(Some(1), Some(10000))),
    opt("learning_rate", Kind::Float(Some(1e-7), Some(0.01))),
    null("training_style", Kind::Lit(&["subject", "style"])),
    opt("face_crop", Kind::Bool),
];

const FLUX_2_TRAINER: &[Field] = &[
    req("image_data_url", Kind::Str),
    opt("steps", Kind::Int(Some(100), Some(10000))),
    opt("learning_rate", Kind::Float(Some(0.0), None)),
    null("default_caption", Kind::Str),
    opt("output_lora_format", Kind::Lit(&["fal", "comfy"])),
];

const QWEN_IMAGE_2512_TRAINER: &[Field] = &[
    req("image_data_url", Kind::Str),
    opt("steps", Kind::Int(Some(100), Some(30000))),
    opt("learning_rate", Kind::Float(Some(0.0), None)),
    null("default_caption", Kind::Str),
];

const Z_IMAGE_TRAINER: &[Field] = &[
    req("image_data_url", Kind::Str),
    opt("steps", Kind::Int(Some(100), Some(10000))),
    opt("learning_rate", Kind::Float(Some(0.0), None)),
    null("default_caption", Kind::Str),
    opt(
        "training_type",
        Kind::Lit(&["content", "style", "balanced"]),
    ),
];

const KREA_2_TRAINER: &[Field] = &[
    req("images_data_url", Kind::Str),
    opt("trigger_phrase", Kind::Str),
    opt("steps", Kind::Int(Some(1), None)),
    opt("learning_rate", Kind::Float(Some(0.0), None)),
    opt("resolution", Kind::IntLit(&[768, 1024])),
    opt(
        "auto_captioning",
        Kind::Lit(&["Off", "Object/Character", "Style", "Custom"]),
    ),
    opt("debug_dataset", Kind::Bool),
];

const WAN_22_IMAGE_TRAINER: &[Field] = &[
    req("training_data_url", Kind::Str),
    req("trigger_phrase", Kind::Str),
    opt("include_synthetic_captions", Kind::Bool),
    opt("use_face_detection", Kind::Bool),
    opt("use_face_cropping", Kind::Bool),
    opt("use_masks", Kind::Bool),
    opt("steps", Kind::Int(Some(10), Some(6000))),
    opt("learning_rate", Kind::Float(Some(0.000001), Some(0.1))),
    opt("is_style", Kind::Bool),
];

/// Trainers that fail when a photo has no caption file and no `default_caption` is given.
const CAPTIONS_REQUIRED: &[&str] = &[
    "fal-ai/flux-2-trainer",
    "fal-ai/qwen-image-2512-trainer",
    "fal-ai/z-image-trainer",
];

const ULTRA_FINETUNED: &[Field] = &[
    req("prompt", Kind::Str),
    req("finetune_id", Kind::Str),
    req("finetune_strength", Kind::Float(Some(0.0), Some(2.0))),
    null("seed", Kind::AnyInt),
    opt("sync_mode", Kind::Bool),
    opt("num_images", Kind::Int(Some(1), Some(4))),
    opt("output_format", Kind::Lit(OUTPUT_FORMAT)),
    opt(
        "safety_tolerance",
        Kind::Lit(&["1", "2", "3", "4", "5", "6"]),
    ),
    opt("enhance_prompt", Kind::Bool),
    null("image_url", Kind::Str),
    opt("image_prompt_strength", Kind::Float(Some(0.0), Some(1.0))),
    opt("aspect_ratio", Kind::AspectRatio),
    opt("raw", Kind::Bool),
    opt("enable_safety_checker", Kind::Bool),
];

fn schema(endpoint: &str) -> Option<&'static [Field]> {
    Some(match endpoint {
        "fal-ai/flux-lora" => FLUX_LORA,
        "fal-ai/flux-lora-fast-training" => FAST_TRAINING,
        "fal-ai/flux-lora-portrait-trainer" => PORTRAIT_TRAINER,
        "fal-ai/flux-pro-trainer" => PRO_TRAINER,
        "fal-ai/flux-pro/v1.1-ultra-finetuned" => ULTRA_FINETUNED,
        "fal-ai/flux-2/lora" => FLUX_2_LORA,
        "fal-ai/qwen-image-2512/lora" => QWEN_IMAGE_2512_LORA,
        "fal-ai/z-image/turbo/lora" => Z_IMAGE_TURBO_LORA,
        "fal-ai/krea-2/turbo/lora" => KREA_2_TURBO_LORA,
        "fal-ai/wan/v2.2-a14b/text-to-image/lora" => WAN_22_T2I_LORA,
        "fal-ai/turbo-flux-trainer" => TURBO_FLUX_TRAINER,
        "fal-ai/flux-2-trainer" => FLUX_2_TRAINER,
        "fal-ai/qwen-image-2512-trainer" => QWEN_IMAGE_2512_TRAINER,
        "fal-ai/z-image-trainer" => Z_IMAGE_TRAINER,
        "fal-ai/krea-2-trainer" => KREA_2_TRAINER,
        "fal-ai/wan-22-image-trainer" => WAN_22_IMAGE_TRAINER,
        _ => return None,
    })
}

fn error(
    loc: Vec<Value>,
    kind: &str,
    msg: String,
    input: Option<&Value>,
    ctx: Option<Value>,
) -> Value {
    let mut e = json!({"loc": loc, "msg": msg, "type": kind, "url": error_docs_url(kind)});
    if let Some(i) = input {
        e["input"] = i.clone();
    }
    if let Some(c) = ctx {
        e["ctx"] = c;
    }
    e
}

fn loc(path: &[Value]) -> Vec<Value> {
    let mut l = vec![json!("body")];
    l.extend_from_slice(path);
    l
}

/// `path` one step further down, to a field or an index.
fn child(path: &[Value], step: Value) -> Vec<Value> {
    let mut p = path.to_vec();
    p.push(step);
    p
}

/// pydantic's error for a required field that is absent from `input`.
fn missing(path: &[Value], input: &Value) -> Value {
    error(
        loc(path),
        "missing",
        "Field required".into(),
        Some(input),
        None,
    )
}

/// pydantic's lax int: integers, integral floats, numeric strings.
fn as_int(v: &Value) -> Result<i128, (&'static str, String)> {
    let not_int = || ("int_type", "Input should be a valid integer".to_owned());
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u))
            } else if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 1e30 {
                    Ok(f as i128)
                } else {
                    Err((
                        "int_from_float",
                        "Input should be a valid integer, got a number with a fractional part"
                            .into(),
                    ))
                }
            } else {
                Err(not_int())
            }
        }
        Value::String(s) => s.trim().parse::<i128>().map_err(|_| {
            (
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer".into(),
            )
        }),
        _ => Err(not_int()),
    }
}

fn as_float(v: &Value) -> Result<f64, (&'static str, String)> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or(("float_type", "Input should be a valid number".into())),
        Value::String(s) => s.trim().parse::<f64>().map_err(|_| {
            (
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number".into(),
            )
        }),
        _ => Err(("float_type", "Input should be a valid number".into())),
    }
}

fn check_bool(v: &Value) -> Result<(), (&'static str, String)> {
    let ok = match v {
        Value::Bool(_) => true,
        Value::Number(n) => n.as_i64().is_some_and(|i| i == 0 || i == 1),
        Value::String(s) => matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "1" | "0" | "yes" | "no" | "on" | "off" | "t" | "f" | "y" | "n"
        ),
        _ => false,
    };
    ok.then_some(())
        .ok_or(("bool_type", "Input should be a valid boolean".into()))
}

fn literal_list(options: &[String]) -> String {
    match options {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// String options as pydantic names them: each in single quotes.
fn quoted<'a>(options: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    options.into_iter().map(|o| format!("'{o}'")).collect()
}

/// pydantic's `literal_error` for a value that is none of `shown`.
fn literal_error(path: &[Value], v: &Value, shown: &[String]) -> Value {
    let expected = literal_list(shown);
    error(
        loc(path),
        "literal_error",
        format!("Input should be {expected}"),
        Some(v),
        Some(json!({"expected": expected})),
    )
}

fn range_errors(
    path: &[Value],
    v: &Value,
    x: f64,
    min: Option<f64>,
    max: Option<f64>,
    out: &mut Vec<Value>,
) {
    let show = |b: f64| {
        if b.fract() == 0.0 {
            json!(b as i64)
        } else {
            json!(b)
        }
    };
    if let Some(m) = min
        && x < m
    {
        out.push(error(
            loc(path),
            "greater_than_equal",
            format!("Input should be greater than or equal to {}", show(m)),
            Some(v),
            Some(json!({"ge": show(m)})),
        ));
    }
    if let Some(m) = max
        && x > m
    {
        out.push(error(
            loc(path),
            "less_than_equal",
            format!("Input should be less than or equal to {}", show(m)),
            Some(v),
            Some(json!({"le": show(m)})),
        ));
    }
}

fn check(kind: Kind, path: &[Value], v: &Value, out: &mut Vec<Value>) {
    let mut push = |(t, m): (&str, String)| out.push(error(loc(path), t, m, Some(v), None));
    match kind {
        Kind::Str => {
            if !v.is_string() {
                push(("string_type", "Input should be a valid string".into()));
            }
        }
        Kind::Bool => {
            if let Err(e) = check_bool(v) {
                push(e);
            }
        }
        Kind::AnyInt => {
            if let Err(e) = as_int(v) {
                push(e);
            }
        }
        Kind::Int(min, max) => match as_int(v) {
            Ok(i) => range_errors(
                path,
                v,
                i as f64,
                min.map(|m| m as f64),
                max.map(|m| m as f64),
                out,
            ),
            Err(e) => push(e),
        },
        Kind::Float(min, max) => match as_float(v) {
            Ok(f) => range_errors(path, v, f, min, max, out),
            Err(e) => push(e),
        },
        Kind::Lit(options) => {
            if !v.as_str().is_some_and(|s| options.contains(&s)) {
                out.push(literal_error(path, v, &quoted(options.iter().copied())));
            }
        }
        Kind::IntLit(options) => {
            if !as_int(v).is_ok_and(|i| options.iter().any(|o| i128::from(*o) == i)) {
                let shown: Vec<String> = options.iter().map(|o| o.to_string()).collect();
                out.push(literal_error(path, v, &shown));
            }
        }
        Kind::ImageSize => match v {
            Value::String(s) if IMAGE_SIZES.iter().any(|(n, _, _)| n == s) => {}
            Value::Object(o) => {
                for side in ["width", "height"] {
                    let p = child(path, json!(side));
                    match o.get(side) {
                        // ImageSize defaults each side to 512.
                        None => {}
                        Some(x) => check(Kind::Int(Some(1), Some(14142)), &p, x, out),
                    }
                }
            }
            _ => {
                let names = quoted(IMAGE_SIZES.iter().map(|(n, _, _)| *n));
                out.push(error(
                    loc(path),
                    "union_type",
                    format!(
                        "Input should be {} or an object with width and height",
                        literal_list(&names)
                    ),
                    Some(v),
                    None,
                ));
            }
        },
        Kind::AspectRatio => {
            let ok = v.as_str().is_some_and(|s| parse_ratio(s).is_some());
            if !ok {
                let names = quoted(ULTRA_SIZES.iter().map(|(n, _, _)| *n));
                out.push(error(
                    loc(path),
                    "literal_error",
                    format!("Input should be {}", literal_list(&names)),
                    Some(v),
                    None,
                ));
            }
        }
        Kind::Loras | Kind::WanLoras => match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = child(path, json!(i));
                    let Some(obj) = item.as_object() else {
                        out.push(error(
                            loc(&p),
                            "model_type",
                            "Input should be a valid dictionary or instance of LoraWeight".into(),
                            Some(item),
                            None,
                        ));
                        continue;
                    };
                    let mut field = |name: &str, kind: Kind, required: bool| {
                        let fp = child(&p, json!(name));
                        match obj.get(name) {
                            None if required => out.push(missing(&fp, item)),
                            None => {}
                            Some(x) => check(kind, &fp, x, out),
                        }
                    };
                    field("path", Kind::Str, true);
                    field("scale", Kind::Float(None, None), false);
                    field("force", Kind::Bool, false);
                    if matches!(kind, Kind::WanLoras) {
                        field("transformer", Kind::Lit(&["high", "low", "both"]), false);
                    }
                }
            }
            _ => out.push(error(
                loc(path),
                "list_type",
                "Input should be a valid list".into(),
                Some(v),
                None,
            )),
        },
    }
}

/// `W:H` with both sides positive; the ultra endpoint also takes free ratios.
fn parse_ratio(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once(':')?;
    let (w, h) = (w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?);
    (w > 0 && h > 0 && w <= 100 && h <= 100).then_some((w, h))
}

/// Validation errors for a known endpoint, in pydantic's shape; empty when valid.
pub(crate) fn validate(endpoint: &str, input: &Value) -> Vec<Value> {
    let Some(obj) = input.as_object() else {
        return vec![error(
            vec![json!("body")],
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from".into(),
            Some(input),
            None,
        )];
    };
    let Some(fields) = schema(endpoint) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in fields {
        let path = [json!(f.name)];
        match obj.get(f.name) {
            None if f.required => out.push(missing(&path, input)),
            None => {}
            Some(Value::Null) if f.nullable => {}
            Some(v) => check(f.kind, &path, v, &mut out),
        }
    }
    out
}

fn unprocessable(detail: Vec<Value>) -> Outcome {
    Outcome {
        status: 422,
        body: json!({ "detail": detail }),
        error_type: None,
    }
}

/// Runs the model for a request whose queue time and run time have passed.
pub(crate) async fn run(state: &EmulatorState, req: &RequestSnapshot) -> Outcome {
    if let Some(f) = &req.forced {
        return Outcome {
            status: f.status,
            body: f.body_or_default(),
            error_type: f.error_type_or_default(),
        };
    }
    let errors = validate(&req.endpoint, &req.input);
    if !errors.is_empty() {
        return unprocessable(errors);
    }
    let input = req.input.as_object().cloned().unwrap_or_default();
    match req.endpoint.as_str() {
        "fal-ai/flux-lora"
        | "fal-ai/flux-2/lora"
        | "fal-ai/qwen-image-2512/lora"
        | "fal-ai/z-image/turbo/lora"
        | "fal-ai/krea-2/turbo/lora" => {
            if let Err(failed) = load_loras(state, req, &input).await {
                return failed;
            }
            let (w, h) = flux_lora_size(input.get("image_size"));
            generate(state, &input, w, h)
        }
        "fal-ai/wan/v2.2-a14b/text-to-image/lora" => {
            if let Err(failed) = load_loras(state, req, &input).await {
                return failed;
            }
            let mut input = input;
            if let Some(format) = input.remove("image_format") {
                input.insert("output_format".into(), format);
            }
            input.remove("num_images");
            let (w, h) = flux_lora_size(input.get("image_size"));
            one_image(generate(state, &input, w, h))
        }
        "fal-ai/flux-pro/v1.1-ultra-finetuned" => {
            let (w, h) = ultra_size(input.get("aspect_ratio").and_then(Value::as_str));
            generate(state, &input, w, h)
        }
        "fal-ai/flux-lora-fast-training"
        | "fal-ai/flux-lora-portrait-trainer"
        | "fal-ai/turbo-flux-trainer"
        | "fal-ai/flux-2-trainer"
        | "fal-ai/qwen-image-2512-trainer"
        | "fal-ai/z-image-trainer"
        | "fal-ai/krea-2-trainer"
        | "fal-ai/wan-22-image-trainer" => train_lora(state, req, &input).await,
        "fal-ai/flux-pro-trainer" => train_pro(state, req, &input).await,
        other => Outcome::ok(json!({
            "endpoint": other,
            "input": req.input,
            "seed": rand::rng().random::<u64>(),
        })),
    }
}

/// Loads every LoRA before the model draws, as FAL's runner does: one it cannot fetch fails the
/// request.
async fn load_loras(
    state: &EmulatorState,
    req: &RequestSnapshot,
    input: &Map<String, Value>,
) -> Result<(), Outcome> {
    let loras = input.get("loras").and_then(Value::as_array).cloned();
    for (i, lora) in loras.unwrap_or_default().iter().enumerate() {
        let Some(path) = lora.get("path").and_then(Value::as_str) else {
            continue;
        };
        if let Err(why) = download(state, &req.id, path).await {
            return Err(download_failed(
                &[json!("loras"), json!(i), json!("path")],
                path,
                &why,
            ));
        }
    }
    Ok(())
}

/// An output of one `image` (Wan 2.2's shape), from a generation's `images`.
fn one_image(mut drawn: Outcome) -> Outcome {
    if drawn.status != 200 {
        return drawn;
    }
    let body = &mut drawn.body;
    let image = body
        .get_mut("images")
        .and_then(Value::as_array_mut)
        .and_then(|images| images.pop());
    drawn.body = json!({
        "image": image,
        "seed": body.get("seed").cloned(),
        "prompt": body.get("prompt").cloned(),
    });
    drawn
}

fn flux_lora_size(v: Option<&Value>) -> (u32, u32) {
    match v {
        Some(Value::String(s)) => IMAGE_SIZES
            .iter()
            .find(|(n, _, _)| n == s)
            .map(|(_, w, h)| (*w, *h))
            .unwrap_or((1024, 768)),
        Some(Value::Object(o)) => {
            let side = |k: &str| {
                o.get(k)
                    .and_then(|x| as_int(x).ok())
                    .map(|i| i.clamp(1, 14142) as u32)
                    .unwrap_or(512)
            };
            (side("width"), side("height"))
        }
        _ => (1024, 768),
    }
}

fn ultra_size(ratio: Option<&str>) -> (u32, u32) {
    let ratio = ratio.unwrap_or("16:9");
    if let Some((_, w, h)) = ULTRA_SIZES.iter().find(|(n, _, _)| *n == ratio) {
        return (*w, *h);
    }
    // Free ratio: about 4 MP, sides rounded to multiples of 32.
    let (rw, rh) = parse_ratio(ratio).unwrap_or((16, 9));
    let scale = (4_194_304.0 / f64::from(rw * rh)).sqrt();
    let round = |x: f64| ((x / 32.0).round() as u32).max(1) * 32;
    (round(f64::from(rw) * scale), round(f64::from(rh) * scale))
}

fn generate(state: &EmulatorState, input: &Map<String, Value>, w: u32, h: u32) -> Outcome {
    let max = state.config().max_image_pixels;
    if u64::from(w) * u64::from(h) > max {
        return unprocessable(vec![error(
            loc(&[json!("image_size")]),
            "image_too_large",
            format!("The emulator draws at most {max} pixels per image"),
            None,
            None,
        )]);
    }
    let prompt = input.get("prompt").and_then(Value::as_str).unwrap_or("");
    let seed_value = match input.get("seed") {
        Some(v) if !v.is_null() => match as_int(v) {
            Ok(i) if i >= 0 && i <= i128::from(u64::MAX) => json!(i as u64),
            Ok(i) => json!(i as i64),
            Err(_) => json!(0),
        },
        _ => json!(rand::rng().random::<u64>()),
    };
    let seed = seed_value
        .as_u64()
        .or_else(|| seed_value.as_i64().map(|i| i as u64))
        .unwrap_or(0);
    let n = input
        .get("num_images")
        .and_then(|v| as_int(v).ok())
        .unwrap_or(1)
        .clamp(1, 4) as u64;
    let format =
        ImageFormat::from_output_format(input.get("output_format").and_then(Value::as_str));
    let started = std::time::Instant::now();
    let mut images = Vec::new();
    for i in 0..n {
        let bytes = match images::render(format, w, h, seed.wrapping_add(i), prompt) {
            Ok(bytes) => bytes,
            Err(why) => {
                tracing::warn!(error = %why, "emulator could not encode an image");
                return Outcome {
                    status: 500,
                    body: default_error_body(500),
                    error_type: Some("internal_error".into()),
                };
            }
        };
        let name = format!("{}.{}", uuid::Uuid::new_v4().simple(), format.extension());
        let size = bytes.len();
        let url = state.store_file(&name, format.content_type(), bytes);
        // The file really is of this format and exactly this size.
        images.push(json!({
            "url": url,
            "width": w,
            "height": h,
            "content_type": format.content_type(),
            "file_name": name,
            "file_size": size,
        }));
    }
    Outcome::ok(json!({
        "images": images,
        "timings": {"inference": started.elapsed().as_secs_f64()},
        "seed": seed_value,
        "has_nsfw_concepts": vec![false; n as usize],
        "prompt": prompt,
    }))
}

/// Fetches a file like FAL's runner (a training archive, a LoRA): any http(s) URL, or a
/// data URI. The emulator's own files are read from its store, as FAL's runners read FAL's
/// CDN: the public base URL may name a proxy the emulator cannot reach itself.
async fn download(
    state: &EmulatorState,
    request_id: &str,
    url: &str,
) -> Result<bytes::Bytes, String> {
    let result: Result<bytes::Bytes, String> = async {
        if let Some(rest) = url.strip_prefix("data:") {
            let (_, data) = rest.split_once(";base64,").ok_or("unsupported data URI")?;
            return base64::engine::general_purpose::STANDARD
                .decode(data)
                .map(Into::into)
                .map_err(|e| format!("invalid base64 in data URI: {e}"));
        }
        if let Some(own) = state.own_file(url) {
            return own;
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err("URL must be http(s) or a data URI".into());
        }
        let resp = state
            .http()
            .get(url)
            .timeout(state.config().download_timeout)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !resp.status().is_success() {
            return Err(format!("server answered {}", resp.status()));
        }
        resp.bytes().await.map_err(|e| e.without_url().to_string())
    }
    .await;
    state.lock().downloads.push(DownloadRecord {
        request_id: request_id.to_owned(),
        url: url.to_owned(),
        size: result.as_ref().ok().map(|b| b.len()),
        bytes: result.as_ref().ok().cloned(),
        error: result.as_ref().err().cloned(),
        at: SystemTime::now(),
    });
    result
}

/// The runner's 422 for a file it could not fetch from the input at `path`.
fn download_failed(path: &[Value], url: &str, why: &str) -> Outcome {
    // Named as Python names it: `loras.0.path`.
    let field: Vec<String> = path
        .iter()
        .map(|step| match step {
            Value::String(name) => name.clone(),
            other => other.to_string(),
        })
        .collect();
    unprocessable(vec![error(
        loc(path),
        "file_download_error",
        format!(
            "Failed to download the file from {}: {why}",
            field.join(".")
        ),
        Some(&json!(url)),
        None,
    )])
}

/// A minimal valid safetensors file: LE u64 header length, JSON header padded to 8
/// bytes, then the tensor data. Two tiny F32 LoRA matrices derived from `seed`.
pub(crate) fn safetensors(seed: &[u8], trigger: &str) -> Vec<u8> {
    let (rank, dim) = (4usize, 16usize);
    let n = rank * dim * 4;
    let header = json!({
        "__metadata__": {"format": "pt", "trigger": trigger, "producer": "falgate-emulator"},
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight":
            {"dtype": "F32", "shape": [rank, dim], "data_offsets": [0, n]},
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight":
            {"dtype": "F32", "shape": [dim, rank], "data_offsets": [n, 2 * n]},
    })
    .to_string();
    let mut header = header.into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    let mut block = Sha256::digest(seed).to_vec();
    for i in 0..2 * rank * dim {
        if i % 8 == 0 && i > 0 {
            block = Sha256::digest(&block).to_vec();
        }
        let b = &block[(i % 8) * 4..(i % 8) * 4 + 4];
        // Small finite floats in [-0.01, 0.01).
        let x = (f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) / f64::from(u32::MAX)
            - 0.5)
            * 0.02;
        out.extend_from_slice(&(x as f32).to_le_bytes());
    }
    out
}

fn file_json(url: String, name: &str, content_type: &str, size: usize) -> Value {
    json!({"url": url, "content_type": content_type, "file_name": name, "file_size": size})
}

async fn train_lora(
    state: &EmulatorState,
    req: &RequestSnapshot,
    input: &Map<String, Value>,
) -> Outcome {
    // FAL's trainers spell the archive's field three ways.
    let zip_field = ["images_data_url", "image_data_url", "training_data_url"]
        .into_iter()
        .find(|field| input.contains_key(*field))
        .unwrap_or("images_data_url");
    let url = input.get(zip_field).and_then(Value::as_str).unwrap_or("");
    let data = match download(state, &req.id, url).await {
        Ok(d) => d,
        Err(why) => return download_failed(&[json!(zip_field)], url, &why),
    };
    if CAPTIONS_REQUIRED.contains(&req.endpoint.as_str()) {
        let default_caption = input
            .get("default_caption")
            .and_then(Value::as_str)
            .filter(|caption| !caption.is_empty());
        if default_caption.is_none()
            && let Some(image) = uncaptioned_image(&data)
        {
            return unprocessable(vec![error(
                loc(&[json!(zip_field)]),
                "value_error",
                format!(
                    "No caption file for {image} and no default_caption: the training cannot \
                     caption it"
                ),
                None,
                None,
            )]);
        }
    }
    let trigger = input
        .get("trigger_word")
        .or_else(|| input.get("trigger_phrase"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let digest = hex::encode(Sha256::digest(&data));
    let lora = |name: &str, salt: &str| {
        let weights = safetensors(format!("{}{digest}{salt}", req.id).as_bytes(), trigger);
        let size = weights.len();
        let url = state.store_file(name, "application/octet-stream", weights);
        file_json(url, name, "application/octet-stream", size)
    };
    let config = serde_json::to_vec_pretty(&json!({
        "endpoint": req.endpoint,
        "trigger": trigger,
        "steps": input.get("steps").cloned().unwrap_or(json!(if req.endpoint.ends_with("portrait-trainer") { 2500 } else { 1000 })),
        zip_field: url,
        "training_data_bytes": data.len(),
        "training_data_sha256": digest,
    }))
    .unwrap_or_default();
    let config_size = config.len();
    let config_url = state.store_file("config.json", "application/octet-stream", config);
    let config_file = file_json(
        config_url,
        "config.json",
        "application/octet-stream",
        config_size,
    );
    Outcome::ok(match req.endpoint.as_str() {
        // Krea 2 names its weights `lora_file`.
        "fal-ai/krea-2-trainer" => json!({
            "lora_file": lora("lora.safetensors", ""),
            "config_file": config_file,
        }),
        // Wan 2.2 trains two: the low-noise file where the others put theirs, and a high-noise one.
        "fal-ai/wan-22-image-trainer" => json!({
            "diffusers_lora_file": lora("low_noise_lora.safetensors", "low"),
            "high_noise_lora": lora("high_noise_lora.safetensors", "high"),
            "config_file": config_file,
        }),
        _ => json!({
            "diffusers_lora_file": lora("pytorch_lora_weights.safetensors", ""),
            "config_file": config_file,
        }),
    })
}

/// The first image in a ZIP with no caption file (`name.txt`) beside it, if any.
fn uncaptioned_image(archive: &[u8]) -> Option<String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).ok()?;
    let names: Vec<String> = (0..zip.len())
        .filter_map(|i| {
            let entry = zip.by_index(i).ok()?;
            entry.name().ok().map(|name| name.into_owned())
        })
        .collect();
    names.iter().find_map(|name| {
        let (stem, extension) = name.rsplit_once('.')?;
        let image = matches!(
            extension.to_ascii_lowercase().as_str(),
            "png" | "jpg" | "jpeg" | "webp"
        );
        (image && !names.contains(&format!("{stem}.txt"))).then(|| name.clone())
    })
}

async fn train_pro(
    state: &EmulatorState,
    req: &RequestSnapshot,
    input: &Map<String, Value>,
) -> Outcome {
    let url = input.get("data_url").and_then(Value::as_str).unwrap_or("");
    if let Err(why) = download(state, &req.id, url).await {
        return download_failed(&[json!("data_url")], url, &why);
    }
    let id = uuid::Uuid::new_v4().to_string();
    state.lock().finetunes.push(id.clone());
    Outcome::ok(json!({ "finetune_id": id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(endpoint: &str, input: Value) -> Vec<(String, String)> {
        validate(endpoint, &input)
            .into_iter()
            .map(|e| {
                let loc: Vec<String> = e["loc"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect();
                (loc.join("."), e["type"].as_str().unwrap().to_owned())
            })
            .collect()
    }

    fn t(loc: &str, ty: &str) -> (String, String) {
        (loc.into(), ty.into())
    }

    #[test]
    fn flux_lora_validation() {
        assert!(types("fal-ai/flux-lora", json!({"prompt": "x", "unknown": 1})).is_empty());
        assert!(types(
            "fal-ai/flux-lora",
            json!({"prompt": "x", "image_size": {"width": 640, "height": 480}, "num_images": "4",
                   "seed": 17454220438242315174u64, "loras": [{"path": "https://x/l.safetensors", "scale": 0.8}],
                   "guidance_scale": 3.5, "output_format": "png", "sync_mode": false, "seed_extra": null})
        )
        .is_empty());
        assert_eq!(
            types("fal-ai/flux-lora", json!({"prompt": "x", "num_images": 5})),
            vec![t("body.num_images", "less_than_equal")]
        );
        assert_eq!(
            types("fal-ai/flux-lora", json!({})),
            vec![t("body.prompt", "missing")]
        );
        assert_eq!(
            types(
                "fal-ai/flux-lora",
                json!({"prompt": 3, "image_size": "huge", "num_inference_steps": 0, "guidance_scale": 40,
                       "output_format": "gif", "loras": [{"scale": 1}, 3], "num_images": 1.5, "seed": null,
                       "enable_safety_checker": "maybe"})
            ),
            vec![
                t("body.prompt", "string_type"),
                t("body.image_size", "union_type"),
                t("body.num_inference_steps", "greater_than_equal"),
                t("body.loras.0.path", "missing"),
                t("body.loras.1", "model_type"),
                t("body.guidance_scale", "less_than_equal"),
                t("body.num_images", "int_from_float"),
                t("body.enable_safety_checker", "bool_type"),
                t("body.output_format", "literal_error"),
            ]
        );
        assert_eq!(
            types(
                "fal-ai/flux-lora",
                json!({"prompt": "x", "image_size": {"width": 0, "height": 20000}})
            ),
            vec![
                t("body.image_size.width", "greater_than_equal"),
                t("body.image_size.height", "less_than_equal")
            ]
        );
        assert_eq!(
            types("fal-ai/flux-lora", json!(["not", "an", "object"])),
            vec![t("body", "model_attributes_type")]
        );
    }

    #[test]
    fn other_endpoints_validation() {
        assert_eq!(
            types("fal-ai/flux-lora-fast-training", json!({"steps": 0})),
            vec![
                t("body.images_data_url", "missing"),
                t("body.steps", "greater_than_equal")
            ]
        );
        assert!(
            types(
                "fal-ai/flux-lora-portrait-trainer",
                json!({"images_data_url": "u", "trigger_phrase": null})
            )
            .is_empty()
        );
        assert_eq!(
            types(
                "fal-ai/flux-pro-trainer",
                json!({"data_url": "u", "mode": "pet", "lora_rank": 8, "iterations": 50})
            ),
            vec![
                t("body.finetune_comment", "missing"),
                t("body.mode", "literal_error"),
                t("body.iterations", "greater_than_equal"),
                t("body.lora_rank", "literal_error"),
            ]
        );
        assert_eq!(
            types(
                "fal-ai/flux-pro/v1.1-ultra-finetuned",
                json!({"prompt": "p", "finetune_id": "f", "finetune_strength": 2.5, "safety_tolerance": 2, "aspect_ratio": "16:9"})
            ),
            vec![
                t("body.finetune_strength", "less_than_equal"),
                t("body.safety_tolerance", "literal_error")
            ]
        );
        assert_eq!(
            types(
                "fal-ai/flux-pro/v1.1-ultra-finetuned",
                json!({"prompt": "p", "finetune_id": "f"})
            ),
            vec![t("body.finetune_strength", "missing")]
        );
        assert!(types("some/other", json!({"anything": 1})).is_empty());
        assert_eq!(
            types("some/other", json!(1)),
            vec![t("body", "model_attributes_type")]
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(flux_lora_size(None), (1024, 768));
        assert_eq!(flux_lora_size(Some(&json!("square_hd"))), (1024, 1024));
        assert_eq!(flux_lora_size(Some(&json!({"width": 640}))), (640, 512));
        assert_eq!(ultra_size(Some("1:1")), (2048, 2048));
        assert_eq!(ultra_size(None), (2752, 1536));
        let (w, h) = ultra_size(Some("5:4"));
        assert!(w > h && w % 32 == 0 && h % 32 == 0);
    }

    #[test]
    fn safetensors_layout() {
        let st = safetensors(b"seed", "TOK");
        let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
        let end = header
            .as_object()
            .unwrap()
            .values()
            .filter_map(|t| t["data_offsets"][1].as_u64())
            .max()
            .unwrap() as usize;
        assert_eq!(st.len(), 8 + n + end);
        assert_eq!(header["__metadata__"]["trigger"], "TOK");
    }
}
