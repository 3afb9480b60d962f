//! Avatars end to end: photos, training with model choice and presets, generation with presets
//! and batches, against the emulator.

use crate::backend_tests;
use crate::execute_behind_the_apps_back;
use crate::support::*;
use falgate::emulator::{Durations, EmulatorConfig, ModelFailure};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// Polls until the avatar holds falgate's copy of its LoRA file; answers the avatar.
async fn wait_for_lora_copy(app: &TestApp, id: &str) -> Value {
    eventually("the LoRA copy")
        .until(async || {
            let avatar = app.get_json(&format!("/v1/avatars/{id}")).await;
            (!avatar["artifact"]["lora_copy"].is_null()).then_some(avatar)
        })
        .await
}

/// Polls until the avatar's LoRA URL is no longer `old`; answers the avatar.
async fn wait_for_new_lora_url(app: &TestApp, id: &str, old: &str) -> Value {
    eventually("the LoRA uploaded again")
        .until(async || {
            let avatar = app.get_json(&format!("/v1/avatars/{id}")).await;
            (avatar["artifact"]["lora_url"] != old).then_some(avatar)
        })
        .await
}

/// A character avatar trained on ten photos, once its LoRA copy is kept: its id and view.
pub(crate) async fn trained_with_lora_copy(app: &TestApp) -> (String, Value) {
    let id = trainable_avatar(app, "character").await;
    assert_eq!(
        train(app, &id, json!({})).await.status(),
        StatusCode::ACCEPTED
    );
    wait_for_avatar(app, &id, "ready").await;
    let kept = wait_for_lora_copy(app, &id).await;
    (id, kept)
}

/// Asks for a generation on an avatar that cannot generate yet: a 409 `avatar_not_ready`.
async fn assert_generation_not_ready(app: &TestApp, body: Value) {
    let response = app.post_json("/v1/generations", &body).await;
    problem(response, StatusCode::CONFLICT, "avatar_not_ready").await;
}

/// One generation on the avatar, waited for to its end; answers its batch.
async fn generate_one(app: &TestApp, id: &str, prompt: &str) -> Value {
    let batch = generate(app, json!({"avatar_id": id, "prompt": prompt})).await;
    wait_for_batch(app, &id_of(&batch)).await
}

backend_tests!(a_character_is_trained_on_its_photos_with_the_balanced_portrait_preset);
async fn a_character_is_trained_on_its_photos_with_the_balanced_portrait_preset(app: &TestApp) {
    let (avatar, photos) = avatar_with_photos(app, "character", 10).await;
    let id = avatar["id"].as_str().unwrap();
    let trigger = avatar["trigger_phrase"].as_str().unwrap().to_owned();
    assert_eq!(trigger, format!("TOK_{}", &id.replace('-', "")[..8]));
    assert_eq!(avatar["status"], "draft");

    // FAL holds the training until the avatar has been seen training.
    let trainer = "fal-ai/flux-lora-portrait-trainer";
    app.fal
        .set_durations(Some(trainer), true, Durations::new(0, 600_000));
    let response = train(app, id, json!({})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["kind"], "training");
    assert_eq!(job["endpoint"], "fal-ai/flux-lora-portrait-trainer");
    let zip_url = job["input"]["images_data_url"].as_str().unwrap().to_owned();
    assert_eq!(
        job["input"],
        json!({
            "steps": 1500, "learning_rate": 0.00015, "subject_crop": true, "create_masks": true,
            "trigger_phrase": trigger, "images_data_url": zip_url,
        }),
        "the balanced portrait preset, exactly"
    );
    assert_eq!(
        app.get_json(&format!("/v1/avatars/{id}")).await["status"],
        "training"
    );
    app.fal
        .set_durations(Some(trainer), true, EmulatorConfig::fast().training);

    let trained = app
        .wait_for_status(job["id"].as_str().unwrap(), "succeeded")
        .await;
    // FAL received exactly that input, and the ZIP it downloaded holds the ten photos.
    let submit = app
        .fal
        .submits()
        .into_iter()
        .find(|s| s.endpoint == "fal-ai/flux-lora-portrait-trainer")
        .unwrap();
    assert_eq!(submit.input, job["input"]);
    let got: BTreeSet<Vec<u8>> = stored_files(fetched_by_fal(app, &zip_url));
    let sent: BTreeSet<Vec<u8>> = photos.into_iter().collect();
    assert_eq!(got, sent);

    let ready = wait_for_avatar(app, id, "ready").await;
    let lora_url = trained["result"]["diffusers_lora_file"]["url"]
        .as_str()
        .unwrap();
    assert_eq!(ready["artifact"]["lora_url"], lora_url);
    assert_eq!(
        ready["artifact"]["lora_config_url"],
        trained["result"]["config_file"]["url"]
    );
    assert!(ready["artifact"]["finetune_id"].is_null());

    // falgate keeps its own copy of the weights, byte for byte: FAL's URLs expire.
    let kept = wait_for_lora_copy(app, id).await;
    let weights = app
        .fal
        .file_bytes(lora_url)
        .expect("the emulator served the weights");
    assert_eq!(kept["artifact"]["lora_copy"]["bytes"], weights.len());
    let copy = app.get(&format!("/v1/avatars/{id}/lora")).await;
    assert_eq!(copy.status(), StatusCode::OK);
    assert_eq!(copy.bytes().await.unwrap(), weights);
}

/// A character trained and holding its LoRA copy: its id, trigger phrase and FAL's LoRA URL.
async fn ready_character(app: &TestApp) -> (String, String, String) {
    let (id, avatar) = trained_with_lora_copy(app).await;
    let trigger = avatar["trigger_phrase"].as_str().unwrap().to_owned();
    let lora_url = avatar["artifact"]["lora_url"].as_str().unwrap().to_owned();
    (id, trigger, lora_url)
}

backend_tests!(a_trained_character_generates_a_batch_with_the_portrait_preset);
async fn a_trained_character_generates_a_batch_with_the_portrait_preset(app: &TestApp) {
    let (id, trigger, lora_url) = ready_character(app).await;
    let batch = generate(
        app,
        json!({
            "avatar_id": id,
            "prompts": ["at the beach", "in a library", "TOK_ mentioned differently"],
            "preset": "portrait",
            "aspect_ratio": "3:4",
        }),
    )
    .await;
    assert_eq!(batch["total"], 3);
    let done = wait_for_batch(app, &id_of(&batch)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    for job in done["jobs"].as_array().unwrap() {
        assert_eq!(job["endpoint"], "fal-ai/flux-lora");
        let input = &job["input"];
        assert!(
            input["prompt"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{trigger} "))
        );
        assert_eq!(input["loras"], json!([{"path": lora_url, "scale": 1.1}]));
        assert_eq!(
            (
                input["num_inference_steps"].clone(),
                input["guidance_scale"].clone()
            ),
            (json!(35), json!(3.5))
        );
        assert_eq!(input["image_size"], "portrait_4_3", "3:4 is never a square");
        let images = job["output"]["images"].as_array().unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(
            (images[0]["width"].clone(), images[0]["height"].clone()),
            (json!(768), json!(1024))
        );
        // Seeds are answered as digits: FAL's go past what an int64 holds.
        let seed = job["output"]["seed"].as_str().unwrap();
        assert_eq!(seed.parse::<u64>().ok(), job["result"]["seed"].as_u64());
        assert_eq!(job["output"]["has_nsfw_concepts"], json!([false]));
    }
}

backend_tests!(every_image_of_a_multi_image_request_comes_back);
async fn every_image_of_a_multi_image_request_comes_back(app: &TestApp) {
    let (id, _, _) = ready_character(app).await;
    let batch = app
        .post_json(
            "/v1/generations",
            &json!({"avatar_id": id, "prompt": "four of them", "num_images": 4, "seed": 7}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let done = wait_for_batch(app, &id_of(&batch)).await;
    assert_eq!(
        done["jobs"][0]["output"]["images"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

backend_tests!(a_ready_avatar_refuses_what_its_endpoint_does_not_take_and_bad_values);
async fn a_ready_avatar_refuses_what_its_endpoint_does_not_take_and_bad_values(app: &TestApp) {
    let (id, _, _) = ready_character(app).await;
    assert_bodies_refused(
        app,
        "/v1/generations",
        &[
            (
                json!({"avatar_id": id, "prompt": "x", "negative_prompt": "blurry"}),
                &["negative_prompt"],
            ),
            (
                json!({"avatar_id": id, "prompt": "x", "num_images": 5}),
                &["num_images"],
            ),
            (
                json!({"avatar_id": id, "prompt": "x", "preset": "cinematic"}),
                &["preset"],
            ),
            (
                json!({"avatar_id": id, "prompt": "x", "raw": true}),
                &["raw"],
            ),
            (
                json!({"avatar_id": id, "prompt": "x", "aspect_ratio": "5:4"}),
                &["aspect_ratio"],
            ),
        ],
    )
    .await;
}

backend_tests!(
    a_style_finetuned_on_the_deprecated_pro_trainer_generates_on_the_finetune_endpoint,
    |config| {
        config.avatars.allow_deprecated_trainers = true;
    }
);
async fn a_style_finetuned_on_the_deprecated_pro_trainer_generates_on_the_finetune_endpoint(
    app: &TestApp,
) {
    let id = &trainable_avatar(app, "style").await;
    let job = train_json(app, id, json!({"preset": "fast", "model": "pro"})).await;
    assert_eq!(job["endpoint"], "fal-ai/flux-pro-trainer");
    let input = &job["input"];
    assert_eq!(input["mode"], "style");
    assert_eq!(input["finetune_type"], "lora");
    assert_eq!(
        (input["iterations"].clone(), input["priority"].clone()),
        (json!(200), json!("speed"))
    );
    assert!(input["data_url"].is_string());
    let trained = app
        .wait_for_status(job["id"].as_str().unwrap(), "succeeded")
        .await;
    let ready = wait_for_avatar(app, id, "ready").await;
    assert_eq!(
        ready["artifact"]["finetune_id"],
        trained["result"]["finetune_id"]
    );
    assert!(ready["artifact"]["lora_url"].is_null());

    let teapot = json!({
        "avatar_id": id, "prompt": "a teapot", "preset": "quality", "safety_tolerance": "2"
    });
    let batch: Value = app
        .post_json("/v1/generations", &teapot)
        .await
        .json()
        .await
        .unwrap();
    let done = wait_for_batch(app, batch["id"].as_str().unwrap()).await;
    let job = &done["jobs"][0];
    assert_eq!(job["endpoint"], "fal-ai/flux-pro/v1.1-ultra-finetuned");
    assert_eq!(
        job["input"]["finetune_id"],
        ready["artifact"]["finetune_id"]
    );
    assert_eq!(job["input"]["finetune_strength"], 1.2);
    assert_eq!(job["input"]["aspect_ratio"], "1:1");
    assert_eq!(job["status"], "succeeded");
}

backend_tests!(
    bad_photos_are_refused_one_by_one_and_the_good_ones_kept,
    |config| {
        config.avatars.max_photo_bytes = 40_000;
    }
);
async fn bad_photos_are_refused_one_by_one_and_the_good_ones_kept(app: &TestApp) {
    let avatar = create_avatar(app, "character").await;
    let id = avatar["id"].as_str().unwrap();
    let good = photo(1, 640, 512);
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&[0u8; 64]);
    let small = photo(2, 300, 300);
    let big = photo(3, 1600, 1600);
    assert!(
        big.len() > 40_000,
        "the big photo must be over the limit: {}",
        big.len()
    );
    let response = upload(
        app,
        id,
        &[
            ("good.png", good.clone()),
            ("holiday.jpg", bmp),
            ("tiny.png", small),
            ("again.png", good.clone()),
            ("huge.png", big),
            ("empty.jpg", Vec::new()),
        ],
    )
    .await;
    let body = validation_problem(response).await;
    // Each refused file is named, in the order sent, with its reason.
    let errors = refusals(&body);
    let expected = [
        ("holiday.jpg", "BMP"),
        ("tiny.png", "300x300"),
        ("again.png", "same bytes"),
        ("huge.png", "limit"),
        ("empty.jpg", "empty"),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:?}");
    for ((field, message), (file, reason)) in errors.iter().zip(expected) {
        assert!(
            field.contains(file) && message.contains(reason),
            "{errors:?}"
        );
    }
    let kept = app.get_json(&format!("/v1/avatars/{id}/photos")).await;
    assert_eq!(kept["items"].as_array().unwrap().len(), 1);
    assert_eq!(kept["items"][0]["content_type"], "image/png");
    assert_eq!(kept["items"][0]["file_name"], "good.png");
    // The 422 says which file was kept, so that the client need not guess.
    assert_eq!(body["accepted"], json!([kept["items"][0]["id"]]));
    assert!(
        body["detail"].as_str().unwrap().contains("1 kept"),
        "{body}"
    );
    // Nothing kept is said as plainly.
    let response = upload(app, id, &[("only.png", photo(4, 200, 200))]).await;
    let body = validation_problem(response).await;
    assert_eq!(body["accepted"], json!([]));

    // Nine photos are not enough to train, and nothing is sent to FAL.
    let more: Vec<(String, Vec<u8>)> = (10..18)
        .map(|n| (format!("p{n}.png"), photo(n, 512, 700)))
        .collect();
    let named: Vec<(&str, Vec<u8>)> = more.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    assert_eq!(upload(app, id, &named).await.status(), StatusCode::CREATED);
    let response = train(app, id, json!({})).await;
    let body = problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "insufficient_photos",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("has 9 photo"),
        "{body}"
    );
    assert!(app.fal.submits().is_empty() && app.fal.uploads().is_empty());

    // Generating on an untrained avatar.
    assert_generation_not_ready(app, json!({"avatar_id": id, "prompt": "too soon"})).await;

    // Not a multipart form: a problem document, not a plain-text rejection.
    let response = app
        .request(Method::POST, &format!("/v1/avatars/{id}/photos"))
        .json(&json!({"files": []}))
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    // A photo can be read and deleted on its own.
    let photo_id = kept["items"][0]["id"].as_str().unwrap();
    let one = app
        .get_json(&format!("/v1/avatars/{id}/photos/{photo_id}"))
        .await;
    assert_eq!(one["width"], 640);
    let deleted = app
        .delete(&format!("/v1/avatars/{id}/photos/{photo_id}"))
        .await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = app
        .get(&format!("/v1/avatars/{id}/photos/{photo_id}"))
        .await;
    problem(gone, StatusCode::NOT_FOUND, "not_found").await;
}

backend_tests!(a_training_fal_fails_leaves_the_avatar_failed_without_an_artifact);
async fn a_training_fal_fails_leaves_the_avatar_failed_without_an_artifact(app: &TestApp) {
    let id = &trainable_avatar(app, "character").await;
    app.fal.fail_next_models(ModelFailure::new(422), 1);
    let job = train_json(app, id, json!({"model": "fast_lora"})).await;
    assert_eq!(job["endpoint"], "fal-ai/flux-lora-fast-training");
    let failed = app
        .wait_for_status(job["id"].as_str().unwrap(), "failed")
        .await;
    let avatar = wait_for_avatar(app, id, "failed").await;
    assert!(avatar["artifact"].is_null(), "{avatar}");
    assert_eq!(avatar["error"]["code"], failed["error"]["code"]);
    assert!(!avatar["error"]["message"].as_str().unwrap().is_empty());
    assert_generation_not_ready(app, json!({"avatar_id": id, "prompt": "no weights"})).await;
}

backend_tests!(avatars_are_listed_scoped_and_deleted_with_their_training_cancelled);
async fn avatars_are_listed_scoped_and_deleted_with_their_training_cancelled(app: &TestApp) {
    let id = &trainable_avatar(app, "product").await;
    app.fal.set_all_durations(Durations::new(30_000, 30_000));
    let job = train_json(app, id, json!({})).await;
    let again = train(app, id, json!({})).await;
    problem(again, StatusCode::CONFLICT, "avatar_training").await;

    let other = app.new_key("someone else").await;
    let hidden = app.get_as(&other, &format!("/v1/avatars/{id}")).await;
    problem(hidden, StatusCode::NOT_FOUND, "not_found").await;
    let list = app.get_json("/v1/avatars").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    let deleted = app.delete(&format!("/v1/avatars/{id}")).await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let job = app.job(job["id"].as_str().unwrap()).await;
    assert!(
        job["status"] == "canceled" || job["cancel_requested_at"].is_string(),
        "{job}"
    );
    let gone = app.get(&format!("/v1/avatars/{id}")).await;
    problem(gone, StatusCode::NOT_FOUND, "not_found").await;
}

backend_tests!(idempotency_keys_cover_every_creating_post);
async fn idempotency_keys_cover_every_creating_post(app: &TestApp) {
    let post = |path: &str, key: &str, body: Value| {
        app.request(Method::POST, path)
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let first: Value = post(
        "/v1/avatars",
        "a-1",
        json!({"name": "Once", "kind": "character"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let again = post(
        "/v1/avatars",
        "a-1",
        json!({"name": "Once", "kind": "character"}),
    )
    .await
    .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(
        app.get_json("/v1/avatars").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let id = first["id"].as_str().unwrap();

    // Photos: the same files under the same key are stored once.
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|n| (format!("p{n}.png"), photo(n, 600, 600)))
        .collect();
    let named: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let boundary = new_boundary();
    let body = multipart(&boundary, &named);
    for round in 0..2 {
        let response = app
            .request(Method::POST, &format!("/v1/avatars/{id}/photos"))
            .header("idempotency-key", "photos-1")
            .header("content-type", multipart_content_type(&boundary))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "round {round}");
        assert_eq!(
            response.headers().get("idempotent-replayed").is_some(),
            round == 1
        );
    }
    assert_eq!(
        app.get_json(&format!("/v1/avatars/{id}/photos")).await["items"]
            .as_array()
            .unwrap()
            .len(),
        10
    );

    // Training: one job, one upload.
    let a: Value = post(&format!("/v1/avatars/{id}/trainings"), "t-1", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b = post(&format!("/v1/avatars/{id}/trainings"), "t-1", json!({}))
        .await
        .unwrap();
    assert_eq!(b.status(), StatusCode::ACCEPTED);
    assert_eq!(b.json::<Value>().await.unwrap()["id"], a["id"]);
    assert_eq!(app.fal.uploads().len(), 1);
    app.wait_for_status(a["id"].as_str().unwrap(), "succeeded")
        .await;
    wait_for_avatar(app, id, "ready").await;

    // Generations: one batch.
    let body = json!({"avatar_id": id, "prompts": ["one", "two"]});
    let x: Value = post("/v1/generations", "g-1", body.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let y: Value = post("/v1/generations", "g-1", body)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(x["id"], y["id"]);
    let generations = app.get_json("/v1/jobs?kind=generation").await;
    assert_eq!(generations["items"].as_array().unwrap().len(), 2);
}

backend_tests!(a_new_training_replaces_the_artifact_only_when_it_succeeds);
async fn a_new_training_replaces_the_artifact_only_when_it_succeeds(app: &TestApp) {
    let id = &trainable_avatar(app, "character").await;
    let first = train_json(app, id, json!({"preset": "fast"})).await;
    app.wait_for_status(first["id"].as_str().unwrap(), "succeeded")
        .await;
    let ready = wait_for_avatar(app, id, "ready").await;
    let old = ready["artifact"]["lora_url"].clone();

    // A failed retraining keeps the old weights usable and says why it failed.
    app.fal.fail_next_models(ModelFailure::new(422), 1);
    let second = train_json(app, id, json!({"preset": "quality"})).await;
    app.wait_for_status(second["id"].as_str().unwrap(), "failed")
        .await;
    let kept = wait_for_avatar(app, id, "ready").await;
    assert_eq!(kept["artifact"]["lora_url"], old);
    assert!(kept["error"]["code"].is_string(), "{kept}");

    // A successful one replaces them.
    let third = train_json(app, id, json!({})).await;
    let done = app
        .wait_for_status(third["id"].as_str().unwrap(), "succeeded")
        .await;
    let replaced = eventually("the new weights")
        .until(async || {
            let avatar = app.get_json(&format!("/v1/avatars/{id}")).await;
            (avatar["artifact"]["lora_url"] != old && avatar["status"] == "ready").then_some(avatar)
        })
        .await;
    assert_eq!(
        replaced["artifact"]["lora_url"],
        done["result"]["diffusers_lora_file"]["url"]
    );
    assert!(replaced["error"].is_null());
}

backend_tests!(
    an_expired_lora_file_is_uploaded_again_from_the_kept_copy,
    |config| {
        config.workers.lora_check_interval = std::time::Duration::from_secs(1);
    }
);
async fn an_expired_lora_file_is_uploaded_again_from_the_kept_copy(app: &TestApp) {
    let (id, kept) = trained_with_lora_copy(app).await;
    let id = id.as_str();
    let expired = kept["artifact"]["lora_url"].as_str().unwrap().to_owned();
    let weights = app.fal.file_bytes(&expired).unwrap();

    // FAL's retention ends: its URL answers 404 from now on.
    assert!(app.fal.expire_file(&expired));
    let gone = app.client.get(&expired).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);

    // falgate notices, uploads its copy again, and the avatar points at the new file.
    let refreshed = wait_for_new_lora_url(app, id, &expired).await;
    let fresh = refreshed["artifact"]["lora_url"].as_str().unwrap();
    assert_eq!(
        app.fal.file_bytes(fresh).unwrap(),
        weights,
        "the same weights"
    );
    let upload = app
        .fal
        .uploads()
        .into_iter()
        .find(|u| u.file_url == fresh)
        .expect("uploaded through FAL's storage");
    assert_eq!(upload.size, weights.len());
    assert_eq!(
        refreshed["artifact"]["lora_copy"],
        kept["artifact"]["lora_copy"]
    );
    assert_eq!(refreshed["status"], "ready");

    // A generation now hands FAL the file it serves.
    let done = generate_one(app, id, "after a long pause").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["jobs"][0]["input"]["loras"][0]["path"], fresh);

    // A file FAL still serves is left alone.
    let checked = app.fal.uploads().len();
    let later = eventually("another check")
        .until(async || {
            let avatar = app.get_json(&format!("/v1/avatars/{id}")).await;
            (avatar["artifact"]["lora_checked_at"] != refreshed["artifact"]["lora_checked_at"])
                .then_some(avatar)
        })
        .await;
    assert_eq!(later["artifact"]["lora_url"], fresh);
    assert_eq!(app.fal.uploads().len(), checked, "nothing uploaded again");
}

backend_tests!(
    lora_files_that_fail_are_put_off_without_holding_up_the_others,
    |config| {
        // The store is driven by hand here: no keeper runs.
        config.run_workers = false;
    }
);
async fn lora_files_that_fail_are_put_off_without_holding_up_the_others(app: &TestApp) {
    let now = chrono::Utc::now();
    let mut avatars = Vec::new();
    for i in 0..6 {
        let id: uuid::Uuid = create_avatar(app, "character").await["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let url = format!("http://127.0.0.1:9/lora-{i}.safetensors");
        let set = "UPDATE avatars SET lora_url = $1, lora_next_try_at = $2 WHERE id = $3";
        let due_at = now - chrono::Duration::minutes(10 - i);
        execute_behind_the_apps_back!(app, set, &url, due_at, id);
        avatars.push((id, url));
    }
    let store = app.store();
    let due = |at| async move {
        store
            .avatars_missing_lora_copy(at, 4)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
    };
    let first: Vec<_> = avatars[..4].iter().map(|(id, _)| *id).collect();
    assert_eq!(due(now).await, first, "the longest due first");

    // Those four fail and are put off for an hour: the other two come next.
    for (id, url) in &avatars[..4] {
        store
            .defer_lora_work(*id, url, now + chrono::Duration::hours(1))
            .await
            .unwrap();
    }
    let rest: Vec<_> = avatars[4..].iter().map(|(id, _)| *id).collect();
    assert_eq!(due(now).await, rest);
    // An hour on, they are due again.
    assert_eq!(due(now + chrono::Duration::hours(2)).await.len(), 4);
    let all = store
        .avatars_missing_lora_copy(now + chrono::Duration::hours(2), 10)
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
}

backend_tests!(a_generation_failing_on_an_expired_lora_has_it_uploaded_again_at_once);
async fn a_generation_failing_on_an_expired_lora_has_it_uploaded_again_at_once(app: &TestApp) {
    // The periodic check is an hour away: only the failure can bring the check forward.
    let interval = app.app.state().config.workers.lora_check_interval;
    assert!(interval >= std::time::Duration::from_secs(3600));
    let (id, kept) = trained_with_lora_copy(app).await;
    let id = id.as_str();
    let expired = kept["artifact"]["lora_url"].as_str().unwrap().to_owned();
    assert!(app.fal.expire_file(&expired));

    // FAL cannot load the LoRA: the generation fails with FAL's reason.
    let failed = generate_one(app, id, "by the sea").await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let job = app.job(failed["jobs"][0]["id"].as_str().unwrap()).await;
    assert_eq!(job["error"]["code"], "fal_validation", "{job}");
    assert_eq!(
        job["error"]["detail"]["detail"][0]["loc"],
        json!(["body", "loras", 0, "path"])
    );

    // falgate checks the file at once, finds it gone, and uploads its copy again.
    let refreshed = wait_for_new_lora_url(app, id, &expired).await;
    let fresh = refreshed["artifact"]["lora_url"].as_str().unwrap();
    let done = generate_one(app, id, "by the sea").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["jobs"][0]["input"]["loras"][0]["path"], fresh);
}

backend_tests!(a_request_is_checked_before_the_avatar_it_names);
async fn a_request_is_checked_before_the_avatar_it_names(app: &TestApp) {
    // Wrong fields on an avatar that is not trained yet: the fields are named, not the
    // avatar's state.
    let draft = id_of(&create_avatar(app, "character").await);
    assert_bodies_refused(
        app,
        "/v1/generations",
        &[
            (
                json!({
                    "avatar_id": draft, "prompt": "x", "num_images": 9, "aspect_ratio": "5:4",
                    "negative_prompt": " ", "image_size": "huge", "safety_tolerance": "9"
                }),
                &[
                    "aspect_ratio",
                    "image_size",
                    "negative_prompt",
                    "num_images",
                    "safety_tolerance",
                ],
            ),
            (
                json!({"avatar_id": draft, "prompts": ["fine", ""]}),
                &["prompts[1]"],
            ),
        ],
    )
    .await;
    // A right request on it is still told the avatar is not ready.
    assert_generation_not_ready(
        app,
        json!({"avatar_id": draft, "prompt": "x", "num_images": 2}),
    )
    .await;

    // Likewise a training: a wrong override on an avatar already training is a 422.
    let training = &trainable_avatar(app, "product").await;
    app.fal.set_all_durations(Durations::new(30_000, 30_000));
    let started = train(app, training, json!({})).await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let response = train(
        app,
        training,
        json!({"preset": "quality", "overrides": {"no_such_field": 1}}),
    )
    .await;
    assert_refused_naming(response, &["overrides.no_such_field"], "a wrong override").await;
    let again = train(app, training, json!({})).await;
    problem(again, StatusCode::CONFLICT, "avatar_training").await;
}

backend_tests!(photos_sent_as_anything_but_a_form_are_told_what_to_send);
async fn photos_sent_as_anything_but_a_form_are_told_what_to_send(app: &TestApp) {
    let avatar = create_avatar(app, "style").await;
    let path = format!("/v1/avatars/{}/photos", avatar["id"].as_str().unwrap());
    for (content_type, body) in [
        (Some("application/json"), r#"{"files":["a.png"]}"#),
        (Some("text/plain"), "a.png"),
        (None, "a.png"),
    ] {
        let response = app.post_raw(&path, content_type, body).await;
        let body = problem(
            response,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        assert_eq!(
            body["detail"],
            "this endpoint takes multipart/form-data, one photo per file part"
        );
    }
    // A form without its boundary is told what is missing, in the words of HTTP, not a parser.
    let response = app
        .post_raw(&path, Some("multipart/form-data"), "a.png")
        .await;
    let body = problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("this endpoint takes multipart/form-data"),
        "{detail}"
    );
    assert!(!detail.contains("Invalid"), "{detail}");
    let photos = app.get_json(&path).await;
    assert_eq!(photos["items"].as_array().unwrap().len(), 0);
}

/// The files of a ZIP archive, each checked to be stored as it is (photos are not compressed
/// again).
fn stored_files(archive: Vec<u8>) -> BTreeSet<Vec<u8>> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(archive)).expect("a valid ZIP");
    (0..archive.len())
        .map(|index| {
            let mut file = archive.by_index(index).unwrap();
            assert_eq!(file.compression(), zip::CompressionMethod::Stored);
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).expect("an intact entry");
            bytes
        })
        .collect()
}

backend_tests!(auto_trains_every_kind_on_a_current_trainer_and_the_retired_one_is_refused);
async fn auto_trains_every_kind_on_a_current_trainer_and_the_retired_one_is_refused(app: &TestApp) {
    for (kind, endpoint, is_style) in [
        ("character", "fal-ai/flux-lora-portrait-trainer", None),
        ("style", "fal-ai/flux-lora-fast-training", Some(true)),
        ("product", "fal-ai/flux-lora-fast-training", Some(false)),
        ("general", "fal-ai/flux-lora-fast-training", Some(false)),
    ] {
        let id = &trainable_avatar(app, kind).await;
        if kind == "style" {
            // The retired trainer is refused, naming its replacement, and nothing starts.
            let refused = train(app, id, json!({"model": "pro"})).await;
            let problem = validation_problem(refused).await;
            assert_eq!(fields(&problem), ["model"]);
            let message = problem["errors"][0]["message"].as_str().unwrap();
            assert!(
                message.contains("fal-ai/flux-pro-trainer") && message.contains("`fast_lora`"),
                "{message}"
            );
            assert_eq!(
                app.get_json(&format!("/v1/avatars/{id}")).await["status"],
                "draft"
            );
        }
        let job = train_json(app, id, json!({})).await;
        assert_eq!(job["endpoint"], endpoint, "{kind}");
        let input = &job["input"];
        assert_eq!(
            input.get("is_style").and_then(Value::as_bool),
            is_style,
            "{kind}"
        );
        // The fast trainer takes the portrait trainer's balanced step count.
        assert_eq!(input["steps"], 1500, "{kind}");
        let ready = wait_for_avatar(app, id, "ready").await;
        assert!(ready["artifact"]["lora_url"].is_string(), "{kind}: {ready}");
    }
}
