//! The trainer registry as clients read it.

use crate::backend_tests;
use crate::execute_behind_the_apps_back;
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
        let entries = zip_entries(&fetched_by_fal(app, &zip_url));
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
        // The avatar records who made its weights, their family, and where they generate.
        assert_eq!(ready["artifact"]["trainer"], trainer);
        assert_eq!(ready["artifact"]["base_family"], entry["base_family"]);
        assert_eq!(
            ready["artifact"]["generation_endpoint"],
            entry["generation_endpoint"]
        );
        // The LoRA generates on its family's endpoint, with the preset's steps and guidance
        // where that endpoint takes them.
        let generation = app
            .post_json(
                "/v1/generations",
                &json!({"avatar_id": id, "prompt": "a portrait"}),
            )
            .await;
        assert_eq!(generation.status(), StatusCode::ACCEPTED, "{trainer}");
        let batch: Value = generation.json().await.unwrap();
        let done = wait_for_batch(app, &id_of(&batch)).await;
        let job = &done["jobs"][0];
        assert_eq!(job["status"], "succeeded", "{trainer}: {job}");
        assert_eq!(job["endpoint"], entry["generation_endpoint"], "{trainer}");
        let input = &job["input"];
        let low = &ready["artifact"]["lora_url"];
        let expected_loras = if trainer == "wan_22_image" {
            // Wan 2.2: both files, each into its own transformer.
            let high = &ready["artifact"]["high_noise_lora_url"];
            assert_eq!(*high, trained["result"]["high_noise_lora"]["url"]);
            assert_ne!(high, low);
            json!([
                {"path": high, "scale": 1.0, "transformer": "high"},
                {"path": low, "scale": 1.0, "transformer": "low"},
            ])
        } else {
            assert!(ready["artifact"]["high_noise_lora_url"].is_null());
            json!([{"path": low, "scale": 1.0}])
        };
        assert_eq!(input["loras"], expected_loras, "{trainer}");
        // FAL loaded every file it was given.
        let generation_request = job["fal_request_id"].as_str().unwrap();
        let loaded: std::collections::BTreeSet<String> = app
            .fal
            .downloads()
            .into_iter()
            .filter(|d| d.request_id == generation_request)
            .map(|d| d.url)
            .collect();
        let given: std::collections::BTreeSet<String> = expected_loras
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["path"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(loaded, given, "{trainer}");
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

/// Polls until falgate holds copies of both of the avatar's Wan files; answers the avatar.
async fn wait_for_both_copies(app: &TestApp, id: &str) -> Value {
    eventually("copies of both LoRA files")
        .until(async || {
            let avatar = app.get_json(&format!("/v1/avatars/{id}")).await;
            let artifact = &avatar["artifact"];
            (!artifact["lora_copy"].is_null() && !artifact["high_noise_lora_copy"].is_null())
                .then_some(avatar)
        })
        .await
}

/// GET /v1/avatars/{id}/lora with `query`: the status and the bytes.
async fn download_lora(app: &TestApp, id: &str, query: &str) -> (StatusCode, Vec<u8>) {
    let response = app
        .request(
            reqwest::Method::GET,
            &format!("/v1/avatars/{id}/lora{query}"),
        )
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.bytes().await.unwrap().to_vec())
}

backend_tests!(
    wan_avatars_keep_both_files_and_generate_with_both,
    |config| {
        config.workers.lora_check_interval = std::time::Duration::from_secs(1);
    }
);
async fn wan_avatars_keep_both_files_and_generate_with_both(app: &TestApp) {
    let id = trainable_avatar(app, "character").await;
    let job = train_json(app, &id, json!({"trainer": "wan_22_image"})).await;
    app.wait_for_status(job["id"].as_str().unwrap(), "succeeded")
        .await;
    let kept = wait_for_both_copies(app, &id).await;
    let artifact = &kept["artifact"];
    let low_url = artifact["lora_url"].as_str().unwrap().to_owned();
    let high_url = artifact["high_noise_lora_url"].as_str().unwrap().to_owned();
    let low = app.fal.file_bytes(&low_url).unwrap();
    let high = app.fal.file_bytes(&high_url).unwrap();
    assert_ne!(low, high);

    // Both copies are falgate's own, each downloadable by the client.
    assert_eq!(artifact["lora_copy"]["bytes"], low.len());
    assert_eq!(artifact["high_noise_lora_copy"]["bytes"], high.len());
    assert_eq!(
        download_lora(app, &id, "").await,
        (StatusCode::OK, low.to_vec())
    );
    assert_eq!(
        download_lora(app, &id, "?file=high_noise").await,
        (StatusCode::OK, high.to_vec())
    );
    let (status, _) = download_lora(app, &id, "?file=middle").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // FAL stops serving the high-noise file: falgate uploads its copy again, and the avatar
    // names the new upload while its other file stays as it was.
    assert!(app.fal.expire_file(&high_url));
    let refreshed = eventually("the high-noise file uploaded again")
        .until(async || {
            let avatar = app.get_json(&format!("/v1/avatars/{id}")).await;
            (avatar["artifact"]["high_noise_lora_url"] != high_url.as_str()).then_some(avatar)
        })
        .await;
    let fresh = refreshed["artifact"]["high_noise_lora_url"]
        .as_str()
        .unwrap();
    assert_eq!(app.fal.file_bytes(fresh).unwrap(), high);
    assert_eq!(refreshed["artifact"]["lora_url"], low_url.as_str());
    assert_eq!(
        refreshed["artifact"]["high_noise_lora_copy"],
        artifact["high_noise_lora_copy"]
    );

    // A generation hands FAL both files FAL serves now, and its one image is the output.
    let batch = generate(
        app,
        json!({"avatar_id": id, "prompt": "on a hill", "output_format": "png"}),
    )
    .await;
    let done = wait_for_batch(app, &id_of(&batch)).await;
    let job = &done["jobs"][0];
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["input"]["loras"][0]["path"], fresh);
    assert_eq!(job["input"]["loras"][1]["path"], low_url.as_str());
    assert_eq!(job["input"]["image_format"], "png");
    let images = job["output"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{job}");
    let image = app
        .fal
        .file_bytes(images[0]["url"].as_str().unwrap())
        .unwrap();
    assert!(image.starts_with(b"\x89PNG"), "a PNG, as asked");

    // Wan draws one image a request: more is refused, naming the field, and nothing is made.
    let before = app.fal.submits().len();
    let four = validation_problem(
        app.post_json(
            "/v1/generations",
            &json!({"avatar_id": id, "prompt": "x", "num_images": 4}),
        )
        .await,
    )
    .await;
    assert_eq!(fields(&four), ["num_images"]);
    assert_eq!(app.fal.submits().len(), before);

    // An avatar of one file has no high-noise file to give.
    let (other, _) = crate::avatars::trained_with_lora_copy(app).await;
    let (status, _) = download_lora(app, &other, "?file=high_noise").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Retrained on a trainer of one file, the avatar has one file, and falgate keeps one copy:
    // neither of the Wan files' copies stays behind on disk.
    let copies_on_disk = || {
        let dir = app
            .app
            .state()
            .config
            .avatars
            .storage_dir
            .join("loras")
            .join(&id);
        std::fs::read_dir(dir).map_or(0, |entries| entries.count())
    };
    assert_eq!(copies_on_disk(), 2);
    let retrained = train_json(app, &id, json!({"trainer": "portrait"})).await;
    app.wait_for_status(retrained["id"].as_str().unwrap(), "succeeded")
        .await;
    let portrait = eventually("the new weights' copy")
        .until(async || {
            let avatar = app.get_json(&format!("/v1/avatars/{id}")).await;
            (avatar["artifact"]["trainer"] == "portrait"
                && !avatar["artifact"]["lora_copy"].is_null())
            .then_some(avatar)
        })
        .await;
    assert!(portrait["artifact"]["high_noise_lora_url"].is_null());
    assert!(portrait["artifact"]["high_noise_lora_copy"].is_null());
    assert_eq!(portrait["artifact"]["base_family"], "flux-1-dev");
    eventually("one copy on disk")
        .until(async || (copies_on_disk() == 1).then_some(()))
        .await;
    let (status, _) = download_lora(app, &id, "?file=high_noise").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Uploads the photos with the captions given (each after its photo); answers the response.
async fn upload_captioned(
    app: &TestApp,
    avatar: &str,
    photos: &[(Vec<u8>, Option<&str>)],
) -> reqwest::Response {
    upload_captioned_with_key(app, avatar, photos, None).await
}

/// [`upload_captioned`] with an `Idempotency-Key`.
async fn upload_captioned_with_key(
    app: &TestApp,
    avatar: &str,
    photos: &[(Vec<u8>, Option<&str>)],
    key: Option<&str>,
) -> reqwest::Response {
    let boundary = new_boundary();
    let mut body = Vec::new();
    for (i, (bytes, caption)) in photos.iter().enumerate() {
        body.extend_from_slice(&part_head(&boundary, &format!("c{i}.png")));
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
        if let Some(caption) = caption {
            body.extend_from_slice(&caption_part(&boundary, caption));
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let mut request = app
        .request(
            reqwest::Method::POST,
            &format!("/v1/avatars/{avatar}/photos"),
        )
        .header("content-type", multipart_content_type(&boundary));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(body).send().await.expect("send")
}

backend_tests!(captions_given_at_upload_go_beside_their_photos_in_the_zip);
async fn captions_given_at_upload_go_beside_their_photos_in_the_zip(app: &TestApp) {
    for trainer in ["flux_2", "portrait"] {
        let avatar = create_avatar(app, "character").await;
        let id = id_of(&avatar);
        let trigger = avatar["trigger_phrase"].as_str().unwrap().to_owned();
        let photos: Vec<(Vec<u8>, Option<&str>)> = (0..10)
            .map(|n| {
                let caption = match n {
                    0 => Some(" in a red coat "),
                    2 => Some("at the beach, smiling"),
                    _ => None,
                };
                (photo(100 + n, 640, 512), caption)
            })
            .collect();
        let response = upload_captioned(app, &id, &photos).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{trainer}");
        let listed: Value = response.json().await.unwrap();
        let captions: Vec<&Value> = items(&listed).iter().map(|p| &p["caption"]).collect();
        assert_eq!(captions[0], "in a red coat", "trimmed");
        assert!(captions[1].is_null());
        assert_eq!(captions[2], "at the beach, smiling");

        let job = train_json(app, &id, json!({"trainer": trainer})).await;
        app.wait_for_status(job["id"].as_str().unwrap(), "succeeded")
            .await;
        let zip_url = job["input"]["image_data_url"]
            .as_str()
            .or(job["input"]["images_data_url"].as_str())
            .unwrap()
            .to_owned();
        let entries = zip_entries(&fetched_by_fal(app, &zip_url));
        let text = |name: &str| {
            entries
                .get(name)
                .map(|b| String::from_utf8(b.clone()).unwrap())
        };
        assert_eq!(text("01.txt"), Some(format!("{trigger}, in a red coat")));
        assert_eq!(
            text("03.txt"),
            Some(format!("{trigger}, at the beach, smiling"))
        );
        // An uncaptioned photo gets the trigger phrase alone, whatever the trainer: one that
        // finds caption files reads them instead of its trigger phrase.
        assert_eq!(text("02.txt"), Some(trigger.clone()), "{trainer}");
        let caption_files = entries.keys().filter(|n| n.ends_with(".txt")).count();
        assert_eq!(caption_files, 10, "{trainer}");
    }
}

backend_tests!(a_caption_that_describes_no_photo_or_is_not_one_line_keeps_nothing);
async fn a_caption_that_describes_no_photo_or_is_not_one_line_keeps_nothing(app: &TestApp) {
    let id = id_of(&create_avatar(app, "character").await);
    let boundary = new_boundary();
    let send = |body: Vec<u8>| post_photo_form(app, &id, &boundary, body);
    let file = |n: u64| {
        let mut part = part_head(&boundary, &format!("f{n}.png"));
        part.extend_from_slice(&photo(n, 640, 512));
        part.extend_from_slice(b"\r\n");
        part
    };
    let end = format!("--{boundary}--\r\n").into_bytes();
    let long = "x".repeat(501);
    let first_caption = "files[0] (f1.png) caption";
    // Sent as a file (`curl -F caption=@notes.txt`), a caption part is still a caption.
    let as_file = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"caption\"; \
         filename=\"notes.txt\"\r\nContent-Type: text/plain\r\n\r\n{long}\r\n"
    )
    .into_bytes();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // A caption before any photo.
        (
            [caption_part(&boundary, "alone"), file(1), end.clone()].concat(),
            "caption",
        ),
        // Two captions for one photo.
        (
            [
                file(1),
                caption_part(&boundary, "one"),
                caption_part(&boundary, "two"),
                end.clone(),
            ]
            .concat(),
            first_caption,
        ),
        // Too long, blank, or more than one line; the refusal names the photo it is of.
        (
            [file(1), caption_part(&boundary, &long), end.clone()].concat(),
            first_caption,
        ),
        (
            [
                file(1),
                file(2),
                caption_part(&boundary, "   "),
                end.clone(),
            ]
            .concat(),
            "files[1] (f2.png) caption",
        ),
        (
            [file(1), caption_part(&boundary, "a\nb"), end.clone()].concat(),
            first_caption,
        ),
        ([file(1), as_file, end.clone()].concat(), first_caption),
    ];
    for (body, field) in cases {
        let refused = validation_problem(send(body).await).await;
        assert_eq!(fields(&refused), [field], "{refused}");
    }
    let photos = app.get_json(&format!("/v1/avatars/{id}/photos")).await;
    assert!(items(&photos).is_empty(), "nothing kept: {photos}");
}

backend_tests!(
    a_caption_on_the_last_photo_an_avatar_may_hold_is_taken,
    |config| {
        config.avatars.max_photos = 2;
    }
);
async fn a_caption_on_the_last_photo_an_avatar_may_hold_is_taken(app: &TestApp) {
    let id = id_of(&create_avatar(app, "character").await);
    let photos = [
        (photo(1, 640, 512), Some("first")),
        (photo(2, 640, 512), Some("second")),
    ];
    let response = upload_captioned(app, &id, &photos).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let listed: Value = response.json().await.unwrap();
    let captions: Vec<&Value> = items(&listed).iter().map(|p| &p["caption"]).collect();
    assert_eq!(captions, [&json!("first"), &json!("second")]);
}

backend_tests!(an_upload_with_other_captions_is_another_request);
async fn an_upload_with_other_captions_is_another_request(app: &TestApp) {
    let id = id_of(&create_avatar(app, "character").await);
    let key = "captions-1";
    let first = [(photo(7, 640, 512), Some("by the sea"))];
    let sent = upload_captioned_with_key(app, &id, &first, Some(key)).await;
    assert_eq!(sent.status(), StatusCode::CREATED);
    // The same files and key, another caption: not a retry of the first, and nothing changes.
    let other = [(photo(7, 640, 512), Some("in the hills"))];
    let reused = upload_captioned_with_key(app, &id, &other, Some(key)).await;
    problem(
        reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    let photos = app.get_json(&format!("/v1/avatars/{id}/photos")).await;
    assert_eq!(items(&photos)[0]["caption"], "by the sea");
    // A true retry answers as the first did.
    let again = upload_captioned_with_key(app, &id, &first, Some(key)).await;
    assert_eq!(again.status(), StatusCode::CREATED);
}

/// PATCH /v1/avatars/{avatar}/photos/{photo} with `body`.
async fn patch_photo(app: &TestApp, avatar: &str, photo: &str, body: Value) -> reqwest::Response {
    app.request(
        reqwest::Method::PATCH,
        &format!("/v1/avatars/{avatar}/photos/{photo}"),
    )
    .json(&body)
    .send()
    .await
    .expect("send")
}

backend_tests!(a_photo_is_captioned_after_upload_and_the_training_reads_it);
async fn a_photo_is_captioned_after_upload_and_the_training_reads_it(app: &TestApp) {
    let (avatar, _) = avatar_with_photos(app, "character", 10).await;
    let id = id_of(&avatar);
    let trigger = avatar["trigger_phrase"].as_str().unwrap().to_owned();
    let photos = app.get_json(&format!("/v1/avatars/{id}/photos")).await;
    let first = items(&photos)[0]["id"].as_str().unwrap().to_owned();
    let second = items(&photos)[1]["id"].as_str().unwrap().to_owned();

    let set = patch_photo(app, &id, &first, json!({"caption": " in the rain "})).await;
    assert_eq!(set.status(), StatusCode::OK);
    let spec: Value = serde_json::from_str(crate::openapi::COMMITTED).unwrap();
    let view: Value = set.json().await.unwrap();
    crate::openapi::assert_valid(
        &spec,
        "patch",
        "/v1/avatars/{id}/photos/{photo_id}",
        "200",
        &view,
    );
    assert_eq!(view["caption"], "in the rain");
    let set = patch_photo(app, &id, &second, json!({"caption": "on a bridge"})).await;
    assert_eq!(set.status(), StatusCode::OK);
    let removed = patch_photo(app, &id, &second, json!({"caption": null})).await;
    assert!(removed.json::<Value>().await.unwrap()["caption"].is_null());

    // A caption that is not one line, an empty body, another field: 422, nothing changed.
    for body in [
        json!({"caption": "two\nlines"}),
        json!({}),
        json!({"caption": "x", "name": "y"}),
    ] {
        let refused = validation_problem(patch_photo(app, &id, &first, body.clone()).await).await;
        assert!(!fields(&refused).is_empty(), "{body}: {refused}");
    }
    let kept = app
        .get_json(&format!("/v1/avatars/{id}/photos/{first}"))
        .await;
    assert_eq!(kept["caption"], "in the rain");
    // Another avatar's photo is not found through this one.
    let other = id_of(&create_avatar(app, "character").await);
    let wrong = patch_photo(app, &other, &first, json!({"caption": "x"})).await;
    assert_eq!(wrong.status(), StatusCode::NOT_FOUND);

    let job = train_json(app, &id, json!({"trainer": "flux_2"})).await;
    app.wait_for_status(job["id"].as_str().unwrap(), "succeeded")
        .await;
    let zip_url = job["input"]["image_data_url"].as_str().unwrap();
    let entries = zip_entries(&fetched_by_fal(app, zip_url));
    let text = |name: &str| String::from_utf8(entries[name].clone()).unwrap();
    assert_eq!(text("01.txt"), format!("{trigger}, in the rain"));
    assert_eq!(text("02.txt"), trigger);
}

backend_tests!(a_failed_retraining_leaves_the_weights_generating_where_they_belong);
async fn a_failed_retraining_leaves_the_weights_generating_where_they_belong(app: &TestApp) {
    let id = trainable_avatar(app, "character").await;
    let first = train_json(app, &id, json!({"trainer": "fast_lora"})).await;
    app.wait_for_status(first["id"].as_str().unwrap(), "succeeded")
        .await;
    let ready = wait_for_avatar(app, &id, "ready").await;

    // A retraining on FLUX.2 fails at FAL.
    app.fal
        .fail_next_models(falgate::emulator::ModelFailure::new(422), 1);
    let second = train_json(app, &id, json!({"trainer": "flux_2"})).await;
    app.wait_for_status(second["id"].as_str().unwrap(), "failed")
        .await;
    let after = wait_for_avatar(app, &id, "ready").await;
    assert_eq!(after["training_job_id"], second["id"]);
    assert_eq!(after["artifact"]["lora_url"], ready["artifact"]["lora_url"]);
    assert_eq!(after["artifact"]["trainer"], "fast_lora");
    assert_eq!(after["artifact"]["base_family"], "flux-1-dev");

    // The FLUX.1 weights still generate on FLUX.1's endpoint, not on FLUX.2's.
    let batch = generate(app, json!({"avatar_id": id, "prompt": "a portrait"})).await;
    let done = wait_for_batch(app, &id_of(&batch)).await;
    assert_eq!(done["jobs"][0]["status"], "succeeded", "{done}");
    assert_eq!(done["jobs"][0]["endpoint"], "fal-ai/flux-lora");
}

/// The statements of the trainer migration that fill in avatars trained before it, for the
/// database `app` runs on.
fn backfill_statements(app: &TestApp) -> Vec<&'static str> {
    let migration = if app.database_url.starts_with("sqlite:") {
        include_str!("../../migrations/sqlite/20261202000011_avatar_artifacts.sql")
    } else {
        include_str!("../../migrations/postgres/20261202000011_avatar_artifacts.sql")
    };
    migration
        .split(";\n")
        .filter(|statement| statement.contains("UPDATE avatars"))
        .collect()
}

backend_tests!(an_upgrade_finds_the_trainer_and_files_of_weights_trained_before_it);
async fn an_upgrade_finds_the_trainer_and_files_of_weights_trained_before_it(app: &TestApp) {
    // A Wan avatar, and a FLUX.1 avatar whose retraining on FLUX.2 failed.
    let wan = trainable_avatar(app, "character").await;
    let job = train_json(app, &wan, json!({"trainer": "wan_22_image"})).await;
    app.wait_for_status(job["id"].as_str().unwrap(), "succeeded")
        .await;
    let wan_before = wait_for_avatar(app, &wan, "ready").await;
    let flux = trainable_avatar(app, "character").await;
    let job = train_json(app, &flux, json!({"trainer": "fast_lora"})).await;
    app.wait_for_status(job["id"].as_str().unwrap(), "succeeded")
        .await;
    app.fal
        .fail_next_models(falgate::emulator::ModelFailure::new(422), 1);
    let job = train_json(app, &flux, json!({"trainer": "flux_2"})).await;
    app.wait_for_status(job["id"].as_str().unwrap(), "failed")
        .await;
    wait_for_avatar(app, &flux, "ready").await;

    // As a version before avatars recorded their trainer left them.
    execute_behind_the_apps_back!(
        app,
        "UPDATE avatars SET trainer = NULL, base_family = NULL, high_noise_lora_url = NULL"
    );
    let forgotten = app.get_json(&format!("/v1/avatars/{wan}")).await;
    assert!(forgotten["artifact"]["trainer"].is_null());

    for statement in backfill_statements(app) {
        execute_behind_the_apps_back!(app, statement);
    }
    let wan_after = app.get_json(&format!("/v1/avatars/{wan}")).await;
    for field in [
        "trainer",
        "base_family",
        "high_noise_lora_url",
        "generation_endpoint",
    ] {
        assert_eq!(
            wan_after["artifact"][field], wan_before["artifact"][field],
            "{field}"
        );
    }
    let flux_after = app.get_json(&format!("/v1/avatars/{flux}")).await;
    assert_eq!(flux_after["artifact"]["trainer"], "fast_lora");
    assert_eq!(flux_after["artifact"]["base_family"], "flux-1-dev");

    // Both generate where their weights belong.
    for (avatar, endpoint) in [
        (&wan, "fal-ai/wan/v2.2-a14b/text-to-image/lora"),
        (&flux, "fal-ai/flux-lora"),
    ] {
        let batch = generate(
            app,
            json!({"avatar_id": avatar, "prompt": "after the upgrade"}),
        )
        .await;
        let done = wait_for_batch(app, &id_of(&batch)).await;
        assert_eq!(done["jobs"][0]["status"], "succeeded", "{done}");
        assert_eq!(done["jobs"][0]["endpoint"], endpoint);
    }

    // Weights of a family this version does not know go nowhere.
    execute_behind_the_apps_back!(
        app,
        "UPDATE avatars SET base_family = 'a-family-of-a-later-version'"
    );
    let unknown = app
        .post_json(
            "/v1/generations",
            &json!({"avatar_id": flux, "prompt": "x"}),
        )
        .await;
    problem(
        unknown,
        StatusCode::UNPROCESSABLE_ENTITY,
        "generation_unavailable",
    )
    .await;
    let listed = app.get_json(&format!("/v1/avatars/{flux}")).await;
    assert!(listed["artifact"]["generation_endpoint"].is_null());
}
