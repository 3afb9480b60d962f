//! The trainer registry as clients read it.

use crate::backend_tests;
use crate::support::*;
use serde_json::{Value, json};

backend_tests!(the_trainer_list_shows_every_trainer_as_the_spec_describes_it);
async fn the_trainer_list_shows_every_trainer_as_the_spec_describes_it(app: &TestApp) {
    let list = app.get_json("/v1/trainers").await;
    let spec: Value = serde_json::from_str(crate::openapi::COMMITTED).unwrap();
    crate::openapi::assert_valid(&spec, "get", "/v1/trainers", "200", &list);

    let trainers = items(&list);
    let endpoints: Vec<&str> = trainers
        .iter()
        .map(|t| t["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        endpoints,
        [
            "fal-ai/flux-lora-portrait-trainer",
            "fal-ai/flux-lora-fast-training",
            "fal-ai/turbo-flux-trainer",
            "fal-ai/flux-2-trainer",
            "fal-ai/qwen-image-2512-trainer",
            "fal-ai/z-image-trainer",
            "fal-ai/krea-2-trainer",
            "fal-ai/wan-22-image-trainer",
            "fal-ai/flux-pro-trainer",
        ]
    );
    let by_id = |id: &str| {
        trainers
            .iter()
            .find(|t| t["id"] == id)
            .unwrap_or_else(|| panic!("no trainer {id}"))
            .clone()
    };
    // The retired pro trainer is listed last, with its replacement; the others are current.
    let pro = by_id("pro");
    assert_eq!(pro["status"], "deprecated");
    assert_eq!(pro["replacement"], "fast_lora");
    assert_eq!(pro["output"], json!({"kind": "finetune"}));
    assert!(trainers[..8].iter().all(|t| t["status"] == "current"));

    // The original presets, exactly.
    let portrait = by_id("portrait");
    assert_eq!(
        portrait["presets"],
        json!({
            "fast": {"steps": 500, "learning_rate": 0.0003, "subject_crop": true},
            "balanced": {"steps": 1500, "learning_rate": 0.00015, "subject_crop": true,
                         "create_masks": true},
            "quality": {"steps": 2500, "learning_rate": 0.0001, "subject_crop": true,
                        "create_masks": true, "multiresolution_training": true},
        })
    );
    assert_eq!(portrait["generation_endpoint"], "fal-ai/flux-lora");
    assert_eq!(
        pro["presets"]["balanced"],
        json!({"iterations": 600, "learning_rate": 0.00008, "priority": "quality",
               "lora_rank": 32})
    );

    // What differs between trainers is spelled out: field names, captions, outputs.
    let wan = by_id("wan_22_image");
    assert_eq!(wan["fields"]["zip"], "training_data_url");
    assert_eq!(wan["fields"]["trigger_required"], true);
    assert_eq!(wan["output"]["high_noise_field"], "high_noise_lora");
    assert_eq!(
        wan["generation_endpoint"],
        "fal-ai/wan/v2.2-a14b/text-to-image/lora"
    );
    let flux_2 = by_id("flux_2");
    assert_eq!(flux_2["fields"]["captions"], "required");
    assert_eq!(flux_2["fields"]["default_caption"], "default_caption");
    assert_eq!(
        flux_2["price"],
        json!({"basis": "per_step", "usd_per_step": 0.0064, "min_steps_charged": 100})
    );
    assert_eq!(by_id("krea_2")["output"]["lora_field"], "lora_file");
    let steps = by_id("qwen_image_2512")["overridable"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "steps")
        .unwrap()
        .clone();
    assert_eq!(
        steps,
        json!({"name": "steps", "type": "integer", "minimum": 100.0, "maximum": 30000.0})
    );
}
