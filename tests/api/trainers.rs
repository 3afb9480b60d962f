//! The trainer registry as clients read it.

use crate::backend_tests;
use crate::support::*;
use reqwest::StatusCode;
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

/// The entries of a ZIP by name, with their bytes.
fn zip_entries(archive: &[u8]) -> std::collections::BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(archive)).expect("a valid ZIP");
    (0..archive.len())
        .map(|index| {
            let mut file = archive.by_index(index).unwrap();
            let name = file.name().unwrap().into_owned();
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).expect("an intact entry");
            (name, bytes)
        })
        .collect()
}

backend_tests!(every_current_trainer_trains_with_its_own_field_names_and_presets);
async fn every_current_trainer_trains_with_its_own_field_names_and_presets(app: &TestApp) {
    // (trainer, avatar kind, the exact input beside the ZIP's URL, the ZIP's field, whether
    // the ZIP carries captions, where FAL's answer keeps the LoRA)
    let cases = [
        (
            "turbo_flux",
            "style",
            json!({"steps": 1000, "learning_rate": 0.00115, "trigger_phrase": "{trigger}",
                   "training_style": "style"}),
            "images_data_url",
            false,
        ),
        (
            "flux_2",
            "character",
            json!({"steps": 1000, "learning_rate": 0.00005, "default_caption": "{trigger}"}),
            "image_data_url",
            true,
        ),
        (
            "qwen_image_2512",
            "product",
            json!({"steps": 1000, "learning_rate": 0.0005, "default_caption": "{trigger}"}),
            "image_data_url",
            true,
        ),
        (
            "z_image",
            "style",
            json!({"steps": 1000, "learning_rate": 0.0001, "default_caption": "{trigger}",
                   "training_type": "style"}),
            "image_data_url",
            true,
        ),
        (
            "krea_2",
            "character",
            json!({"steps": 200, "learning_rate": 0.0005, "trigger_phrase": "{trigger}"}),
            "images_data_url",
            false,
        ),
        (
            "wan_22_image",
            "character",
            json!({"steps": 1000, "learning_rate": 0.0007, "trigger_phrase": "{trigger}",
                   "is_style": false}),
            "training_data_url",
            false,
        ),
    ];
    let listed = app.get_json("/v1/trainers").await;
    for (trainer, kind, expected, zip_field, captioned) in cases {
        let (avatar, photos) = avatar_with_photos(app, kind, 10).await;
        let id = id_of(&avatar);
        let trigger = avatar["trigger_phrase"].as_str().unwrap();
        let job = train_json(app, &id, json!({"trainer": trainer})).await;
        let entry = items(&listed)
            .iter()
            .find(|t| t["id"] == trainer)
            .unwrap()
            .clone();
        assert_eq!(job["endpoint"], entry["endpoint"], "{trainer}");
        let zip_url = job["input"][zip_field].as_str().unwrap().to_owned();
        let mut expected: Value =
            serde_json::from_str(&expected.to_string().replace("{trigger}", trigger)).unwrap();
        expected[zip_field] = json!(zip_url);
        assert_eq!(
            job["input"], expected,
            "{trainer}: the balanced preset, exactly"
        );
        assert_eq!(
            entry["presets"]["balanced"]["steps"], expected["steps"],
            "{trainer}: as listed"
        );

        app.wait_for_status(job["id"].as_str().unwrap(), "succeeded")
            .await;
        // FAL received exactly that input, and a ZIP of the photos, with a caption beside each
        // where the trainer needs one.
        let submit = app
            .fal
            .submits()
            .into_iter()
            .find(|s| s.input == job["input"])
            .expect("FAL received the job's input");
        assert_eq!(submit.endpoint, entry["endpoint"].as_str().unwrap());
        let download = app
            .fal
            .downloads()
            .into_iter()
            .find(|d| d.url == zip_url)
            .expect("the trainer fetched the ZIP");
        let entries = zip_entries(&download.bytes.unwrap());
        let pictures: std::collections::BTreeSet<&Vec<u8>> = entries
            .iter()
            .filter(|(name, _)| !name.ends_with(".txt"))
            .map(|(_, bytes)| bytes)
            .collect();
        assert_eq!(pictures, photos.iter().collect(), "{trainer}");
        let captions: Vec<(&String, &Vec<u8>)> = entries
            .iter()
            .filter(|(name, _)| name.ends_with(".txt"))
            .collect();
        if captioned {
            assert_eq!(captions.len(), photos.len(), "{trainer}");
            for (name, text) in captions {
                let image = name.trim_end_matches(".txt");
                assert!(
                    entries
                        .keys()
                        .any(|other| other.starts_with(&format!("{image}."))
                            && !other.ends_with(".txt")),
                    "{trainer}: {name} captions no photo"
                );
                assert_eq!(text, trigger.as_bytes(), "{trainer}");
            }
        } else {
            assert!(captions.is_empty(), "{trainer}");
        }
        // The avatar is ready with the LoRA FAL returned, wherever the trainer put it.
        let ready = wait_for_avatar(app, &id, "ready").await;
        let trained = app.job(job["id"].as_str().unwrap()).await;
        let field = entry["output"]["lora_field"].as_str().unwrap();
        assert_eq!(
            ready["artifact"]["lora_url"], trained["result"][field]["url"],
            "{trainer}"
        );
        // The LoRA generates on its family's endpoint, with the preset's steps and guidance
        // where that endpoint takes them; Wan 2.2's two files are not generated with yet, and
        // the refusal names where they belong.
        let generation = app
            .post_json(
                "/v1/generations",
                &json!({"avatar_id": id, "prompt": "a portrait"}),
            )
            .await;
        if trainer == "wan_22_image" {
            let refused = problem(
                generation,
                StatusCode::UNPROCESSABLE_ENTITY,
                "generation_unavailable",
            )
            .await;
            let detail = refused["detail"].as_str().unwrap();
            let endpoint = entry["generation_endpoint"].as_str().unwrap();
            assert!(detail.contains(endpoint), "{trainer}: {detail}");
            continue;
        }
        assert_eq!(generation.status(), StatusCode::ACCEPTED, "{trainer}");
        let batch: Value = generation.json().await.unwrap();
        let done = wait_for_batch(app, &id_of(&batch)).await;
        let job = &done["jobs"][0];
        assert_eq!(job["status"], "succeeded", "{trainer}: {job}");
        assert_eq!(job["endpoint"], entry["generation_endpoint"], "{trainer}");
        let input = &job["input"];
        assert_eq!(
            input["loras"],
            json!([{"path": ready["artifact"]["lora_url"], "scale": 1.0}]),
            "{trainer}"
        );
        let (steps, guidance) = match trainer {
            "z_image" => (Some(8), None),
            "krea_2" => (None, None),
            _ => (Some(28), Some(3.5)),
        };
        assert_eq!(
            input.get("num_inference_steps").and_then(Value::as_u64),
            steps,
            "{trainer}"
        );
        assert_eq!(
            input.get("guidance_scale").and_then(Value::as_f64),
            guidance,
            "{trainer}"
        );
        // FAL ran it: the output's image was drawn from that input.
        assert!(
            job["output"]["images"][0]["url"].is_string(),
            "{trainer}: {job}"
        );
    }
}

backend_tests!(a_trainer_is_named_once_and_known);
async fn a_trainer_is_named_once_and_known(app: &TestApp) {
    let id = trainable_avatar(app, "character").await;
    let unknown = validation_problem(train(app, &id, json!({"trainer": "sdxl"})).await).await;
    assert_eq!(fields(&unknown), ["trainer"]);
    let message = unknown["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("`sdxl`") && message.contains("flux_2"),
        "{message}"
    );
    let both = validation_problem(
        train(app, &id, json!({"trainer": "flux_2", "model": "portrait"})).await,
    )
    .await;
    assert_eq!(fields(&both), ["trainer"]);
    // The retired trainer by its id is refused as by `model`.
    let retired = validation_problem(train(app, &id, json!({"trainer": "pro"})).await).await;
    assert_eq!(fields(&retired), ["trainer"]);
    assert!(
        retired["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("`fast_lora`")
    );
    // Overrides are checked against the named trainer's own fields.
    let wrong = validation_problem(
        train(
            app,
            &id,
            json!({"trainer": "z_image", "overrides": {"subject_crop": true, "steps": 50}}),
        )
        .await,
    )
    .await;
    assert_eq!(
        fields(&wrong),
        ["overrides.steps", "overrides.subject_crop"]
    );
    assert_eq!(
        app.get_json(&format!("/v1/avatars/{id}")).await["status"],
        "draft"
    );
}
