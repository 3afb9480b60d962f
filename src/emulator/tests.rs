//! The emulator driven through the real `FalClient`, with a webhook receiver on loopback.
//! No bare sleeps: every wait polls under a deadline.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use reqwest::Url;
use serde_json::{Value, json};

/// These tests read whatever the result answers as FAL's own word.
const ANY_END: crate::fal::ReportedEnd = crate::fal::ReportedEnd::Failed { error_type: None };

use super::*;
use crate::fal::signature::{self, InvalidReason, WebhookHeaders, parse_jwks};
use crate::fal::wire::{CallbackBody, CallbackStatus, QueueState, SubmitResponse, python_json};
use crate::fal::{
    CancelOutcome, FalClient, FalConfig, FalErrorKind, JwksCache, ModelResult, Secret, Verdict,
};

const DEADLINE: Duration = Duration::from_secs(15);

struct Env {
    emu: EmulatorHandle,
    fal: FalClient,
    raw: reqwest::Client,
}

async fn env() -> Env {
    env_with(EmulatorConfig::fast()).await
}

async fn env_with(config: EmulatorConfig) -> Env {
    crate::install_crypto_provider();
    let key = config.key.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu = spawn(config, listener).await;
    let base = emu.base_url();
    let mut cfg = FalConfig::new(base.clone(), base, key);
    cfg.request_timeout = Duration::from_secs(10);
    let fal = FalClient::new(cfg).unwrap();
    Env {
        emu,
        fal,
        raw: reqwest::Client::new(),
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.emu.state().base_url())
    }

    fn auth(&self) -> String {
        format!("Key {}", self.emu.config().key.expose())
    }

    /// GET `url` with FAL's key, as a queue call is made.
    async fn get_with_key(&self, url: impl reqwest::IntoUrl) -> reqwest::Response {
        self.raw
            .get(url)
            .header("authorization", self.auth())
            .send()
            .await
            .unwrap()
    }

    /// GET `url` without a key (files, keys and the control API need none): the body.
    async fn get_bytes(&self, url: impl reqwest::IntoUrl) -> Bytes {
        self.raw
            .get(url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    }

    /// GET `url` without a key: the JSON body.
    async fn get_json(&self, url: impl reqwest::IntoUrl) -> Value {
        serde_json::from_slice(&self.get_bytes(url).await).unwrap()
    }

    async fn wait_completed(&self, status_url: &str) {
        let start = Instant::now();
        loop {
            let s = self.fal.status(status_url, false).await.unwrap();
            if s.status == QueueState::Completed {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "request never completed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Submits `input` to flux-lora, with `webhook` if one is given.
    async fn submit_lora(&self, input: &Value, webhook: Option<&Url>) -> SubmitResponse {
        self.fal
            .submit("fal-ai/flux-lora", input, webhook)
            .await
            .unwrap()
    }

    /// Submits the smallest valid request to flux-lora, with `webhook` if one is given.
    async fn submit_minimal(&self, webhook: Option<&Url>) -> SubmitResponse {
        self.submit_lora(&json!({"prompt": "x"}), webhook).await
    }

    /// The request's result, read as the app reads it.
    async fn result_of(&self, sub: &SubmitResponse) -> ModelResult {
        self.fal
            .result(sub.response_url.as_deref().unwrap(), &ANY_END)
            .await
            .unwrap()
    }

    /// Waits until the request has completed, then reads its result.
    async fn completed_result(&self, sub: &SubmitResponse) -> ModelResult {
        self.wait_completed(sub.status_url.as_deref().unwrap())
            .await;
        self.result_of(sub).await
    }

    /// Submits `input` to `endpoint` without a webhook and reads the result once it completes.
    async fn run_to_result(&self, endpoint: &str, input: &Value) -> ModelResult {
        let sub = self.fal.submit(endpoint, input, None).await.unwrap();
        self.completed_result(&sub).await
    }

    /// As `run_to_result`, for a request that should succeed: its output.
    async fn run_to_output(&self, endpoint: &str, input: &Value) -> Value {
        expect_output(self.run_to_result(endpoint, input).await)
    }
}

fn expect_output(result: ModelResult) -> Value {
    match result {
        ModelResult::Output(out) => out,
        other => panic!("expected output, got {other:?}"),
    }
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    answers: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    async fn start() -> (Self, Url) {
        let r = Receiver::default();
        let app = Router::new()
            .route(
                "/hook",
                post(
                    |State(r): State<Receiver>, headers: HeaderMap, body: Bytes| async move {
                        r.hits.lock().unwrap().push((headers, body));
                        let code = r.answers.lock().unwrap().pop_front().unwrap_or(200);
                        StatusCode::from_u16(code).unwrap()
                    },
                ),
            )
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (
            r,
            Url::parse(&format!("http://{addr}/hook?token=abc")).unwrap(),
        )
    }

    fn hits(&self) -> Vec<(HeaderMap, Bytes)> {
        self.hits.lock().unwrap().clone()
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn emulator_keys(emu: &EmulatorHandle) -> Vec<ed25519_dalek::VerifyingKey> {
    parse_jwks(emu.jwks().to_string().as_bytes())
}

#[tokio::test]
async fn submit_status_result_and_real_png() {
    let e = env().await;
    // Held in the queue until it has been seen there.
    e.emu
        .set_durations(Some("fal-ai/flux-lora"), false, Durations::new(600_000, 20));
    let sub = e
        .submit_lora(
            &json!({"prompt": "a red apple", "image_size": "square", "seed": 7}),
            None,
        )
        .await;
    assert_eq!(sub.queue_position, Some(0));
    let status_url = sub.status_url.clone().unwrap();
    assert!(status_url.ends_with(&format!(
        "/fal-ai/flux-lora/requests/{}/status",
        sub.request_id
    )));

    // Queued: 202 with every field present.
    let resp = e.get_with_key(&status_url).await;
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "IN_QUEUE");
    for k in [
        "request_id",
        "response_url",
        "status_url",
        "cancel_url",
        "logs",
        "metrics",
        "queue_position",
    ] {
        assert!(body.get(k).is_some(), "missing {k}");
    }
    assert!(body["logs"].is_null());

    e.emu
        .set_durations(Some("fal-ai/flux-lora"), false, Durations::new(0, 20));
    e.wait_completed(&status_url).await;
    let resp = e.get_with_key(&status_url).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["metrics"]["inference_time"].is_number());
    assert!(body.get("queue_position").is_none());

    let out = expect_output(e.result_of(&sub).await);
    assert_eq!(out["seed"], 7);
    assert_eq!(out["prompt"], "a red apple");
    assert_eq!(out["has_nsfw_concepts"], json!([false]));
    let img = &out["images"][0];
    assert_eq!(
        (img["width"].as_u64(), img["height"].as_u64()),
        (Some(512), Some(512))
    );
    let png = e
        .raw
        .get(img["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    let bytes = png.bytes().await.unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (512, 512), "reported size is the real size");
    assert_eq!(img["file_size"].as_u64(), Some(bytes.len() as u64));

    let rec = e.emu.submits();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].input["prompt"], "a red apple");
    assert!(
        rec[0]
            .headers
            .iter()
            .any(|(k, v)| k == "authorization" && v == "[redacted]")
    );
}

#[tokio::test]
async fn url_forms_trailing_slash_and_response_alias() {
    let e = env().await;
    let endpoint = "fal-ai/flux-pro/v1.1-ultra-finetuned";
    let sub = e
        .fal
        .submit(
            endpoint,
            &json!({"prompt": "p", "finetune_id": "ft", "finetune_strength": 1.0, "aspect_ratio": "1:1"}),
            None,
        )
        .await
        .unwrap();
    let id = &sub.request_id;
    assert_eq!(
        sub.response_url.as_deref().unwrap(),
        e.url(&format!("/fal-ai/flux-pro/requests/{id}")),
        "sub-path dropped"
    );
    e.wait_completed(sub.status_url.as_deref().unwrap()).await;
    for path in [
        format!("/fal-ai/flux-pro/requests/{id}/status"),
        format!("/fal-ai/flux-pro/requests/{id}/status/"),
        format!("/{endpoint}/requests/{id}/status"),
        format!("/{endpoint}/requests/{id}/status/"),
        format!("/fal-ai/flux-pro/requests/{id}"),
        format!("/fal-ai/flux-pro/requests/{id}/"),
        format!("/fal-ai/flux-pro/requests/{id}/response"),
        format!("/{endpoint}/requests/{id}"),
    ] {
        let resp = e.get_with_key(e.url(&path)).await;
        assert_eq!(resp.status(), 200, "{path}");
    }
    // Wrong app for the id, and an unknown id.
    for path in [
        format!("/fal-ai/flux-lora/requests/{id}/status"),
        "/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000000/status".to_string(),
    ] {
        let resp = e.get_with_key(e.url(&path)).await;
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({"status": "NOT_FOUND"})
        );
    }
    let out = expect_output(e.result_of(&sub).await);
    assert_eq!(
        (
            out["images"][0]["width"].as_u64(),
            out["images"][0]["height"].as_u64()
        ),
        (Some(2048), Some(2048))
    );
}

#[tokio::test]
async fn logs_spellings() {
    let e = env().await;
    let sub = e.submit_minimal(None).await;
    let status_url = sub.status_url.unwrap();
    e.wait_completed(&status_url).await;
    for (q, has_logs) in [
        ("1", true),
        ("true", true),
        ("0", false),
        ("false", false),
        ("", false),
    ] {
        let url = if q.is_empty() {
            status_url.clone()
        } else {
            format!("{status_url}?logs={q}")
        };
        let body: Value = e.get_with_key(url).await.json().await.unwrap();
        assert_eq!(body["logs"].is_array(), has_logs, "logs={q}");
        assert_eq!(body["logs"].is_null(), !has_logs, "logs={q}");
    }
    let s = e.fal.status(&status_url, true).await.unwrap();
    let logs = s.logs.unwrap();
    assert!(logs.len() >= 2 && logs[0].timestamp.is_some() && logs[0].message.is_some());
}

#[tokio::test]
async fn cancel_result_before_completion_and_unknown() {
    let e = env().await;
    e.emu.set_all_durations(Durations::new(60_000, 10));
    let sub = e.submit_minimal(None).await;
    let err = e
        .fal
        .result(sub.response_url.as_deref().unwrap(), &ANY_END)
        .await
        .unwrap_err();
    assert_eq!(err.kind, FalErrorKind::NotReady);
    assert_eq!(err.status, Some(400));
    assert_eq!(err.detail, Some(json!("Request is still in progress")));

    let cancel_url = sub.cancel_url.clone().unwrap();
    assert_eq!(
        e.fal.cancel(&cancel_url).await.unwrap(),
        CancelOutcome::CancellationRequested
    );
    assert_eq!(
        e.fal.cancel(&cancel_url).await.unwrap(),
        CancelOutcome::AlreadyCompleted
    );
    let unknown = cancel_url.replace(&sub.request_id, "00000000-0000-0000-0000-000000000000");
    assert_eq!(
        e.fal.cancel(&unknown).await.unwrap(),
        CancelOutcome::NotFound
    );
    let answered: Vec<u16> = e.emu.cancels().iter().map(|c| c.answered).collect();
    assert_eq!(answered, vec![202, 400, 404]);

    // A cancelled request is COMPLETED and replays the runner's 499.
    let s = e
        .fal
        .status(sub.status_url.as_deref().unwrap(), false)
        .await
        .unwrap();
    assert_eq!(s.status, QueueState::Completed);
    assert_eq!(s.error_type.as_deref(), Some("client_cancelled"));
    match e.result_of(&sub).await {
        ModelResult::ModelError { status, .. } => assert_eq!(status, 499),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn wrong_key_is_401() {
    let e = env().await;
    let base = e.emu.base_url();
    let bad = FalClient::new(FalConfig::new(
        base.clone(),
        base,
        Secret::from("nope:nope"),
    ))
    .unwrap();
    let err = bad
        .submit("fal-ai/flux-lora", &json!({"prompt": "x"}), None)
        .await
        .unwrap_err();
    assert_eq!(err.status, Some(401));
    assert_eq!(
        err.detail,
        Some(json!("No user found for Key ID and Secret"))
    );
    assert!(!err.retryable());
    let resp = e
        .raw
        .post(e.url("/fal-ai/flux-lora"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(e.emu.submits().is_empty());
}

#[tokio::test]
async fn validation_error_completes_with_422() {
    let e = env().await;
    let (rx, hook) = Receiver::start().await;
    let sub = e
        .submit_lora(&json!({"prompt": "x", "num_images": 5}), Some(&hook))
        .await;
    let ModelResult::ModelError { status, body, .. } = e.completed_result(&sub).await else {
        panic!("expected a model error");
    };
    assert_eq!(status, 422);
    assert_eq!(body["detail"][0]["loc"], json!(["body", "num_images"]));
    assert_eq!(body["detail"][0]["type"], "less_than_equal");
    assert_eq!(
        body["detail"][0]["url"], "https://docs.fal.ai/errors/#less_than_equal",
        "each item links FAL's error reference at its type"
    );

    let (_, raw) = eventually("callback", || rx.hits().first().cloned()).await;
    let cb: CallbackBody = serde_json::from_slice(&raw).unwrap();
    assert_eq!(cb.status, CallbackStatus::Error);
    assert_eq!(cb.error.as_deref(), Some("Invalid status code: 422"));
    assert_eq!(cb.payload.unwrap(), body);
}

#[tokio::test]
async fn large_files_go_up_in_parts() {
    let e = env().await;
    let mut cfg = e.fal.config().clone();
    cfg.multipart_above = 1_000;
    cfg.upload_part_bytes = 400;
    let fal = FalClient::new(cfg).unwrap();
    let file: Vec<u8> = (0..1_050u32).map(|i| (i % 251) as u8).collect();
    // Read in pieces that do not line up with the parts.
    let pieces: Vec<std::io::Result<Bytes>> = file
        .chunks(350)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let url = fal
        .upload_stream(
            futures_util::stream::iter(pieces),
            file.len() as u64,
            "application/octet-stream",
            "weights.safetensors",
        )
        .await
        .unwrap();
    assert_eq!(e.emu.file_bytes(&url).unwrap(), file, "joined in order");
    let up = e.emu.uploads();
    assert_eq!((up[0].parts, up[0].size), (3, 1_050), "400 + 400 + 250");

    // At the threshold, one PUT.
    let small = Bytes::from(vec![7u8; 1_000]);
    let url = fal
        .upload(small.clone(), "application/octet-stream", "small.bin")
        .await
        .unwrap();
    assert_eq!(e.emu.file_bytes(&url).unwrap(), small);
    assert_eq!(e.emu.uploads()[1].parts, 1);
}

#[tokio::test]
async fn storage_roundtrip_and_trainer_download() {
    let e = env().await;
    let zip = Bytes::from_static(b"PK\x03\x04 pretend zip with photos");
    let file_url = e
        .fal
        .upload(zip.clone(), "application/zip", "train.zip")
        .await
        .unwrap();
    let got = e.raw.get(&file_url).send().await.unwrap();
    assert_eq!(got.headers()["content-type"], "application/zip");
    assert_eq!(got.bytes().await.unwrap(), zip);
    let up = e.emu.uploads();
    assert_eq!(
        (up.len(), up[0].size, up[0].file_name.as_str()),
        (1, zip.len(), "train.zip")
    );

    let out = e
        .run_to_output(
            "fal-ai/flux-lora-fast-training",
            &json!({"images_data_url": file_url, "trigger_word": "TOK", "steps": 500}),
        )
        .await;
    let dl = e.emu.downloads();
    assert_eq!(dl[0].bytes.as_deref(), Some(&zip[..]));
    let lora = out["diffusers_lora_file"]["url"].as_str().unwrap();
    let st = e.get_bytes(lora).await;
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["trigger"], "TOK");
    assert_eq!(
        out["diffusers_lora_file"]["file_size"].as_u64(),
        Some(st.len() as u64)
    );
    let config = e
        .get_json(out["config_file"]["url"].as_str().unwrap())
        .await;
    assert_eq!(
        config["training_data_bytes"].as_u64(),
        Some(zip.len() as u64)
    );

    // Unreachable archive: the model fails with a 422 on the URL field.
    match e
        .run_to_result(
            "fal-ai/flux-pro-trainer",
            &json!({"data_url": e.url("/files/nope/x.zip"), "finetune_comment": "me"}),
        )
        .await
    {
        ModelResult::ModelError { status, body, .. } => {
            assert_eq!(status, 422);
            assert_eq!(body["detail"][0]["loc"], json!(["body", "data_url"]));
        }
        other => panic!("{other:?}"),
    }

    // Pro trainer success gives a finetune id.
    let out = e
        .run_to_output(
            "fal-ai/flux-pro-trainer",
            &json!({"data_url": file_url, "finetune_comment": "me", "mode": "character"}),
        )
        .await;
    assert_eq!(
        e.emu.finetunes(),
        vec![out["finetune_id"].as_str().unwrap().to_owned()]
    );
}

#[tokio::test]
async fn callback_layout_and_signature_verify_against_jwks() {
    let e = env().await;
    let (rx, hook) = Receiver::start().await;
    let sub = e
        .submit_lora(
            &json!({"prompt": "café ☕", "seed": 17454220438242315174u64}),
            Some(&hook),
        )
        .await;
    assert_eq!(e.emu.submits()[0].webhook.as_deref(), Some(hook.as_str()));
    let (headers, body) = eventually("callback", || rx.hits().first().cloned()).await;
    assert_eq!(headers["content-type"], "application/json");
    let value: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        python_json(&value).as_bytes(),
        &body[..],
        "Python json.dumps layout"
    );
    let text = std::str::from_utf8(&body).unwrap();
    assert!(text.starts_with(r#"{"error": null, "gateway_request_id": ""#));
    assert!(text.contains(r#""seed": 17454220438242315174"#));
    assert!(text.contains(r#"caf\u00e9 \u2615"#), "ensure_ascii");
    let cb: CallbackBody = serde_json::from_value(value).unwrap();
    assert_eq!(
        (cb.status, cb.request_id.as_str()),
        (CallbackStatus::Ok, sub.request_id.as_str())
    );

    // Verify with keys fetched over HTTP, as the app will.
    let jwks = e.get_bytes(e.emu.jwks_url()).await;
    let doc: Value = serde_json::from_slice(&jwks).unwrap();
    assert!(
        doc["keys"][0]["x"].as_str().unwrap().ends_with('='),
        "padded like FAL"
    );
    let keys = parse_jwks(&jwks);
    let h = WebhookHeaders::from_headers(&headers).unwrap();
    assert_eq!(h.request_id, sub.request_id);
    assert_eq!(h.user_id, "github|0");
    assert_eq!(
        signature::verify(&h, &body, &keys, now()),
        Ok(Verdict::Valid { stale: false })
    );
    let mut tampered = body.to_vec();
    tampered[10] ^= 1;
    assert!(
        !signature::verify(&h, &tampered, &keys, now())
            .unwrap()
            .is_valid()
    );
}

#[tokio::test]
async fn callback_retries_after_receiver_errors() {
    let e = env().await;
    let (rx, hook) = Receiver::start().await;
    rx.answers.lock().unwrap().extend([500, 503]);
    let sub = e.submit_minimal(Some(&hook)).await;
    eventually("3 deliveries", || (rx.hits().len() >= 3).then_some(())).await;
    let attempts = eventually("3 recorded attempts", || {
        let a = e.emu.callback_attempts();
        (a.len() >= 3).then_some(a)
    })
    .await;
    let codes: Vec<Option<u16>> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(codes, vec![Some(500), Some(503), Some(200)]);
    assert!(attempts.iter().all(|a| a.request_id == sub.request_id));
    assert_eq!(
        attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Same body every time.
    let hits = rx.hits();
    assert!(hits.windows(2).all(|w| w[0].1 == w[1].1));
}

#[tokio::test]
async fn callback_to_a_dead_receiver_gives_up_after_the_schedule() {
    let mut config = EmulatorConfig::fast();
    config.callback_retry_schedule = vec![Duration::from_millis(10); 2];
    config.time_scale = 1.0;
    let e = env_with(config).await;
    // Bind then drop: nothing listens on this port any more.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let hook = Url::parse(&format!("http://{dead}/hook")).unwrap();
    e.submit_minimal(Some(&hook)).await;
    let attempts = eventually("3 failed attempts", || {
        let a = e.emu.callback_attempts();
        (a.len() >= 3).then_some(a)
    })
    .await;
    assert!(
        attempts
            .iter()
            .all(|a| a.status.is_none() && a.error.is_some())
    );
}

#[tokio::test]
async fn model_failure_injection() {
    let e = env().await;
    let (rx, hook) = Receiver::start().await;
    e.emu.fail_next_models(ModelFailure::new(500), 1);
    let sub = e.submit_minimal(Some(&hook)).await;
    e.wait_completed(sub.status_url.as_deref().unwrap()).await;
    let s = e
        .fal
        .status(sub.status_url.as_deref().unwrap(), false)
        .await
        .unwrap();
    assert_eq!(s.error_type.as_deref(), Some("internal_error"));
    match e.result_of(&sub).await {
        ModelResult::ModelError {
            status, error_type, ..
        } => {
            assert_eq!(
                (status, error_type.as_deref()),
                (500, Some("internal_error"))
            );
        }
        other => panic!("{other:?}"),
    }
    let (_, raw) = eventually("callback", || rx.hits().first().cloned()).await;
    let cb: CallbackBody = serde_json::from_slice(&raw).unwrap();
    assert_eq!(cb.error.as_deref(), Some("Invalid status code: 500"));

    // Only the next one failed.
    assert!(matches!(
        e.run_to_result("fal-ai/flux-lora", &json!({"prompt": "x"}))
            .await,
        ModelResult::Output(_)
    ));
}

#[tokio::test]
async fn submit_faults_classify_for_retries() {
    let e = env().await;
    let input = json!({"prompt": "x"});
    let submit = || e.fal.submit("fal-ai/flux-lora", &input, None);

    e.emu.inject_fault(FaultRule::submit(
        HttpFault::Status {
            status: 429,
            body: None,
            retry_after: Some(3),
            timeout_type_user: false,
        },
        1,
    ));
    let err = submit().await.unwrap_err();
    assert_eq!(
        (err.status, err.retry_after),
        (Some(429), Some(Duration::from_secs(3)))
    );
    assert!(err.retryable() && !err.may_have_reached_fal);

    e.emu
        .inject_fault(FaultRule::submit(HttpFault::Nginx502, 1));
    let err = submit().await.unwrap_err();
    assert_eq!(err.status, Some(502));
    assert!(err.retryable() && err.fal_request_id.is_none());

    e.emu
        .inject_fault(FaultRule::submit(FaultRule::status(503), 1));
    let err = submit().await.unwrap_err();
    assert_eq!(err.error_type.as_deref(), Some("runner_scheduling_failure"));
    assert!(err.retryable());

    e.emu.inject_fault(FaultRule::submit(
        HttpFault::Status {
            status: 504,
            body: None,
            retry_after: None,
            timeout_type_user: true,
        },
        1,
    ));
    let err = submit().await.unwrap_err();
    assert!(err.user_timeout && !err.retryable());

    e.emu
        .inject_fault(FaultRule::submit(FaultRule::status(500), 2));
    assert_eq!(submit().await.unwrap_err().status, Some(500));
    assert_eq!(submit().await.unwrap_err().status, Some(500));

    // None of the refused submits created a request; the next one works.
    assert!(e.emu.requests().is_empty());
    assert_eq!(
        e.emu.submits().iter().filter(|s| s.fault.is_some()).count(),
        6
    );
    submit().await.unwrap();
    assert_eq!(e.emu.requests().len(), 1);

    e.emu
        .inject_fault(FaultRule::submit(HttpFault::Delay { delay_ms: 150 }, 1));
    let started = Instant::now();
    submit().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn accept_then_reset_creates_the_request_but_loses_the_answer() {
    let e = env().await;
    e.emu
        .inject_fault(FaultRule::submit(HttpFault::AcceptThenReset, 1));
    let err = e
        .fal
        .submit("fal-ai/flux-lora", &json!({"prompt": "x"}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind, FalErrorKind::Transport | FalErrorKind::Timeout),
        "{err:?}"
    );
    assert!(err.retryable() && err.may_have_reached_fal, "{err:?}");
    let reqs = e.emu.requests();
    assert_eq!(reqs.len(), 1, "FAL created the request");
    assert_eq!(
        e.emu.submits()[0].request_id.as_deref(),
        Some(reqs[0].id.as_str())
    );
    // The connection pool recovers.
    e.submit_minimal(None).await;
}

#[tokio::test]
async fn status_and_result_faults() {
    let e = env().await;
    let sub = e.submit_minimal(None).await;
    e.wait_completed(sub.status_url.as_deref().unwrap()).await;
    e.emu.inject_fault(FaultRule {
        target: FaultTarget::Result,
        fault: HttpFault::Nginx502,
        count: 1,
    });
    let err = e
        .fal
        .result(sub.response_url.as_deref().unwrap(), &ANY_END)
        .await
        .unwrap_err();
    assert!(
        err.retryable(),
        "an ingress 502 on result is not the model's verdict"
    );
    assert!(matches!(e.result_of(&sub).await, ModelResult::Output(_)));
    e.emu.inject_fault(FaultRule {
        target: FaultTarget::Status,
        fault: FaultRule::status(503),
        count: 1,
    });
    assert!(
        e.fal
            .status(sub.status_url.as_deref().unwrap(), false)
            .await
            .unwrap_err()
            .retryable()
    );
}

async fn one_callback_with(e: &Env, fault: CallbackFault) -> (Receiver, String) {
    let (rx, hook) = Receiver::start().await;
    e.emu.inject_callback_fault(fault, 1);
    let sub = e.submit_minimal(Some(&hook)).await;
    (rx, sub.request_id)
}

#[tokio::test]
async fn callback_faults_stale_and_bad_signature() {
    let e = env().await;
    let keys = emulator_keys(&e.emu);

    let (rx, _) = one_callback_with(&e, CallbackFault::StaleTimestamp).await;
    let (headers, body) = eventually("stale callback", || rx.hits().first().cloned()).await;
    let h = WebhookHeaders::from_headers(&headers).unwrap();
    assert_eq!(
        signature::verify(&h, &body, &keys, now()),
        Ok(Verdict::Valid { stale: true })
    );

    let (rx, _) = one_callback_with(&e, CallbackFault::BadSignature).await;
    let (headers, body) = eventually("forged callback", || rx.hits().first().cloned()).await;
    let h = WebhookHeaders::from_headers(&headers).unwrap();
    assert_eq!(
        signature::verify(&h, &body, &keys, now()),
        Ok(Verdict::Invalid(InvalidReason::NoKeyMatched))
    );
}

#[tokio::test]
async fn callback_faults_drop_duplicate_delay() {
    let e = env().await;
    let (rx, id) = one_callback_with(&e, CallbackFault::Duplicate).await;
    eventually("two deliveries", || (rx.hits().len() == 2).then_some(())).await;
    // The emulator records an attempt after the receiver answered: wait for both.
    let deliveries: Vec<u32> = eventually("two recorded deliveries", || {
        let d: Vec<u32> = e
            .emu
            .callback_attempts()
            .iter()
            .filter(|a| a.request_id == id)
            .map(|a| a.delivery)
            .collect();
        (d.len() == 2).then_some(d)
    })
    .await;
    assert_eq!(deliveries, vec![1, 2]);

    let (rx, id) = one_callback_with(&e, CallbackFault::Drop).await;
    let dropped = eventually("drop recorded", || {
        e.emu
            .callback_attempts()
            .into_iter()
            .find(|a| a.request_id == id)
    })
    .await;
    assert_eq!(dropped.fault.as_deref(), Some("drop"));
    // A later request's callback arrives: the dropped one would have come first.
    let (rx2, _) = one_callback_with(&e, CallbackFault::Delay { delay_ms: 0 }).await;
    eventually("later callback", || rx2.hits().first().cloned()).await;
    assert!(rx.hits().is_empty());

    let (rx, _) = one_callback_with(&e, CallbackFault::Delay { delay_ms: 200 }).await;
    let started = Instant::now();
    eventually("delayed callback", || rx.hits().first().cloned()).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn callback_fault_reorder() {
    let e = env().await;
    let (rx, hook) = Receiver::start().await;
    e.emu.inject_callback_fault(CallbackFault::Reorder, 1);
    let first = e
        .submit_lora(&json!({"prompt": "first"}), Some(&hook))
        .await;
    e.wait_completed(first.status_url.as_deref().unwrap()).await;
    let second = e
        .submit_lora(&json!({"prompt": "second"}), Some(&hook))
        .await;
    eventually("both callbacks", || (rx.hits().len() == 2).then_some(())).await;
    let order: Vec<String> = rx
        .hits()
        .iter()
        .map(|(h, _)| h["x-fal-webhook-request-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(order, vec![second.request_id, first.request_id]);
}

#[tokio::test]
async fn key_rotation_is_picked_up_by_the_jwks_cache() {
    let e = env().await;
    let cache = JwksCache::with_settings(
        e.fal.http().clone(),
        e.emu.jwks_url(),
        Duration::from_secs(3600),
        Duration::ZERO,
    );
    let before = cache.keys().await.unwrap();
    assert_eq!(before.len(), 2, "the signing key and the next one");
    // Unannounced: neither of the new keys was published before.
    e.emu.rotate_key(false);
    let after = emulator_keys(&e.emu);
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|k| !before.contains(k)));

    let (rx, hook) = Receiver::start().await;
    e.submit_minimal(Some(&hook)).await;
    let (headers, body) = eventually("callback", || rx.hits().first().cloned()).await;
    let h = WebhookHeaders::from_headers(&headers).unwrap();
    assert_eq!(
        cache.verify_with_refetch(&h, &body, now()).await,
        Ok(Verdict::Valid { stale: false })
    );
    assert_eq!(
        cache.fetch_count().await,
        2,
        "one refetch after the unknown signature"
    );

    e.emu.rotate_key(true);
    let kept = emulator_keys(&e.emu);
    assert_eq!(kept.len(), 3, "old signing key still published");
    assert_eq!(kept[2], after[0]);
}

#[tokio::test]
async fn status_stream_ends_after_completed() {
    let e = env().await;
    // Held in the queue until the stream has sent its first event.
    e.emu.set_all_durations(Durations::new(600_000, 30));
    let sub = e.submit_minimal(None).await;
    let url = format!("{}/stream?logs=1", sub.status_url.unwrap());
    let mut resp = e
        .raw
        .get(url)
        .header("authorization", e.auth())
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let first = tokio::time::timeout(DEADLINE, resp.chunk())
        .await
        .unwrap()
        .unwrap()
        .expect("a first event");
    e.emu.set_all_durations(Durations::new(0, 30));
    // The body ends only because the server closes the stream.
    let rest = tokio::time::timeout(DEADLINE, resp.text())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&first).into_owned() + &rest;
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.last().unwrap()["status"], "COMPLETED");
    assert!(events.len() >= 2, "{text}");
    let total_logs: usize = events
        .iter()
        .map(|ev| ev["logs"].as_array().unwrap().len())
        .sum();
    let emulated = e.emu.request(&sub.request_id).unwrap().logs.len();
    assert_eq!(total_logs, emulated, "each event carries only new logs");
}

#[tokio::test]
async fn control_api_over_http() {
    let e = env().await;
    let post = |path: &str, body: Value| e.raw.post(e.url(path)).json(&body).send();
    assert_eq!(
        post(
            "/_emulator/faults",
            json!({"kind": "status", "status": 503, "count": 1})
        )
        .await
        .unwrap()
        .status(),
        200
    );
    let err = e
        .fal
        .submit("fal-ai/flux-lora", &json!({"prompt": "x"}), None)
        .await
        .unwrap_err();
    assert_eq!(err.status, Some(503));
    post(
        "/_emulator/durations",
        json!({"all": true, "queue_ms": 1, "run_ms": 1}),
    )
    .await
    .unwrap();
    post("/_emulator/model-failures", json!({"status": 422}))
        .await
        .unwrap();
    assert!(matches!(
        e.run_to_result("fal-ai/flux-lora", &json!({"prompt": "x"}))
            .await,
        ModelResult::ModelError { status: 422, .. }
    ));
    let rotated: Value = post("/_emulator/rotate-key", json!({"keep_old": true}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        rotated["jwks"]["keys"].as_array().unwrap().len(),
        3,
        "signing, next, and the old signing key"
    );
    let planned: Value = post("/_emulator/rotate-key", json!({"to_next": true}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        planned["kid"], rotated["jwks"]["keys"][1]["kid"],
        "the published next key signs"
    );
    assert_eq!(planned["jwks"]["keys"].as_array().unwrap().len(), 2);
    let submits = e.get_json(e.url("/_emulator/submits")).await;
    assert_eq!(submits.as_array().unwrap().len(), 2);

    // A held submit goes on when released; an expired file answers 404.
    post(
        "/_emulator/faults",
        json!({"kind": "hold", "target": "submit"}),
    )
    .await
    .unwrap();
    let held = tokio::spawn({
        let fal = e.fal.clone();
        async move {
            fal.submit("fal-ai/flux-lora", &json!({"prompt": "held"}), None)
                .await
        }
    });
    eventually("the submit held", || {
        (e.emu.held_calls() == 1).then_some(())
    })
    .await;
    assert!(!held.is_finished());
    post("/_emulator/release-held-calls", json!({}))
        .await
        .unwrap();
    let sub = held.await.unwrap().unwrap();
    let out = expect_output(e.completed_result(&sub).await);
    let image = out["images"][0]["url"].as_str().unwrap().to_owned();
    let expire = post("/_emulator/files/expire", json!({"url": image}));
    assert_eq!(expire.await.unwrap().status(), 200);
    assert_eq!(e.raw.get(&image).send().await.unwrap().status(), 404);
    let again = post("/_emulator/files/expire", json!({"url": image}));
    assert_eq!(again.await.unwrap().status(), 404);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let e = env().await;
    let url = e.emu.jwks_url();
    assert!(
        e.raw
            .get(url.clone())
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let Env { emu, raw, .. } = e;
    emu.shutdown().await;
    let err = raw.get(url).send().await.unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err}");
}

#[test]
fn callbacks_retry_ten_times_over_two_hours_by_default() {
    let config = EmulatorConfig::default();
    let schedule = &config.callback_retry_schedule;
    assert_eq!(schedule.len(), 10, "FAL retries 10 times");
    assert_eq!(schedule[0], Duration::from_secs(7));
    assert!(schedule.windows(2).all(|w| w[1] == w[0] * 2));
    let span: Duration = schedule.iter().sum();
    assert_eq!(span, Duration::from_secs(7161));
    assert!(span <= Duration::from_secs(2 * 3600) && span > Duration::from_secs(3600 + 1800));
    assert_eq!(config.time_scale, 1.0);
    assert_eq!(EmulatorConfig::fast().callback_retry_schedule, *schedule);
}

#[test]
fn time_scales_are_checked() {
    assert_eq!(parse_time_scale("0.001"), Ok(0.001));
    assert_eq!(parse_time_scale(" 0 "), Ok(0.0));
    for bad in ["-1", "nan", "inf", "1e9", "fast", ""] {
        assert!(parse_time_scale(bad).is_err(), "{bad}");
    }
}

/// A webhook receiver that answers 500 to everything, with the time each call came in.
async fn failing_receiver() -> (Arc<Mutex<Vec<Instant>>>, Url) {
    let hits: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let app = Router::new()
        .route(
            "/v1/fal/webhook/{job}",
            post(|State(h): State<Arc<Mutex<Vec<Instant>>>>| async move {
                h.lock().unwrap().push(Instant::now());
                StatusCode::INTERNAL_SERVER_ERROR
            }),
        )
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = Url::parse(&format!("http://{addr}/v1/fal/webhook/job-1?token=t")).unwrap();
    (hits, url)
}

#[tokio::test]
async fn the_time_scale_shrinks_the_retry_window_and_keeps_its_shape() {
    let mut config = EmulatorConfig::fast();
    config.time_scale = 0.0002; // 7161 s become 1.43 s
    let e = env_with(config).await;
    let (hits, hook) = failing_receiver().await;
    e.submit_minimal(Some(&hook)).await;
    let attempts = eventually("all 11 attempts", || {
        let a = e.emu.callback_attempts();
        (a.len() == 11).then_some(a)
    })
    .await;
    assert_eq!(
        attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        (1..=11).collect::<Vec<_>>()
    );
    let at = hits.lock().unwrap().clone();
    assert_eq!(at.len(), 11);
    let span = at[10] - at[0];
    assert!(
        span >= Duration::from_millis(1432) && span < Duration::from_millis(4000),
        "{span:?}"
    );
    // The last wait is half the window, as in FAL's two hours.
    let last = at[10] - at[9];
    assert!(
        last >= Duration::from_millis(716) && last < Duration::from_millis(2000),
        "{last:?}"
    );
    // No twelfth attempt: the schedule is over.
    assert_eq!(e.emu.live_tasks(), 0);
}

#[tokio::test]
async fn a_new_time_scale_applies_to_waits_under_way() {
    let mut config = EmulatorConfig::fast();
    config.time_scale = 1.0; // the first retry is 7 s away
    let e = env_with(config).await;
    let (hits, hook) = failing_receiver().await;
    e.submit_minimal(Some(&hook)).await;
    eventually("the first attempt", || {
        (hits.lock().unwrap().len() == 1).then_some(())
    })
    .await;
    let set = |scale: Value| {
        e.raw
            .post(e.url("/_emulator/time-scale"))
            .json(&json!({ "time_scale": scale }))
            .send()
    };
    let refused = set(json!(-2)).await.unwrap();
    assert_eq!(refused.status(), 422);
    let answer: Value = set(json!(0)).await.unwrap().json().await.unwrap();
    assert_eq!(answer["time_scale"], 0.0);
    // Well before the 7 s the first retry was due at, all ten have gone out.
    eventually("the ten retries", || {
        (hits.lock().unwrap().len() == 11).then_some(())
    })
    .await;
    let at = hits.lock().unwrap().clone();
    assert!(at[10] - at[0] < Duration::from_secs(5));
}

#[tokio::test]
async fn shutdown_stops_the_callback_retries_under_way() {
    let mut config = EmulatorConfig::fast();
    config.time_scale = 0.005; // retries after 35 ms, 70 ms, 140 ms, …
    let e = env_with(config).await;
    let (hits, hook) = failing_receiver().await;
    e.submit_minimal(Some(&hook)).await;
    eventually("two attempts", || {
        (hits.lock().unwrap().len() >= 2).then_some(())
    })
    .await;
    let state = e.emu.state().clone();
    e.emu.shutdown().await;
    let seen = hits.lock().unwrap().len();
    assert_eq!(state.live_tasks(), 0);
    // Watch past the next retries' due times (at most 70 + 140 ms away): none comes.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(600) {
        assert_eq!(hits.lock().unwrap().len(), seen, "a retry after shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_record_says_whose_each_request_was_and_how_it_ended() {
    let e = env().await;
    let hook = |job: &str| {
        Url::parse(&format!(
            "http://127.0.0.1:9/base/v1/fal/webhook/{job}?token=abc"
        ))
        .unwrap()
    };
    let submit = |job: &'static str| {
        let fal = e.fal.clone();
        let url = hook(job);
        async move {
            fal.submit(
                "fal-ai/flux-lora",
                &json!({"prompt": job, "image_size": {"width": 64, "height": 64}}),
                Some(&url),
            )
            .await
        }
    };
    e.emu.set_all_durations(Durations::new(0, 0));
    let ok = submit("job-ok").await.unwrap();
    e.emu.fail_next_models(ModelFailure::new(422), 1);
    let failed = submit("job-failed").await.unwrap();
    e.wait_completed(ok.status_url.as_deref().unwrap()).await;
    e.wait_completed(failed.status_url.as_deref().unwrap())
        .await;
    e.emu.set_all_durations(Durations::new(60_000, 60_000));
    let queued = submit("job-queued").await.unwrap();
    e.fal
        .cancel(queued.cancel_url.as_deref().unwrap())
        .await
        .unwrap();
    e.emu.set_all_durations(Durations::new(0, 60_000));
    let running = submit("job-running").await.unwrap();
    eventually("a runner takes it", || {
        e.emu
            .request(&running.request_id)
            .is_some_and(|r| r.phase == Phase::InProgress)
            .then_some(())
    })
    .await;
    e.fal
        .cancel(running.cancel_url.as_deref().unwrap())
        .await
        .unwrap();
    e.emu
        .inject_fault(FaultRule::submit(HttpFault::AcceptThenReset, 1));
    submit("job-lost-answer").await.unwrap_err();
    let unanswered = submit("job-unfinished").await.unwrap();

    let record = e.emu.record();
    let by_job = |job: &str| {
        record
            .iter()
            .find(|r| r.webhook_job_id.as_deref() == Some(job))
            .unwrap_or_else(|| panic!("no request for {job}: {record:?}"))
            .clone()
    };
    let r = by_job("job-ok");
    assert_eq!(r.request_id, ok.request_id);
    assert_eq!(r.endpoint, "fal-ai/flux-lora");
    assert_eq!((r.ran, r.verdict), (true, RequestEnd::Ok));
    let output = r.output.unwrap();
    assert_eq!(output["images"][0]["width"], 64);
    assert_eq!(
        Some(output),
        e.emu
            .request(&ok.request_id)
            .unwrap()
            .outcome
            .map(|o| o.body)
    );
    let r = by_job("job-failed");
    assert_eq!(
        (r.ran, r.verdict),
        (true, RequestEnd::ModelError { status: 422 })
    );
    assert!(r.output.unwrap()["detail"].is_array());
    let r = by_job("job-queued");
    assert_eq!((r.ran, r.verdict), (false, RequestEnd::Cancelled));
    let r = by_job("job-running");
    assert_eq!((r.ran, r.verdict), (true, RequestEnd::Cancelled));
    let r = by_job("job-lost-answer");
    assert_eq!(r.submit_fault.as_deref(), Some("accept_then_reset"));
    let r = by_job("job-unfinished");
    assert_eq!(r.request_id, unanswered.request_id);
    assert_eq!(
        (r.verdict, r.output.is_none()),
        (RequestEnd::Unfinished, true)
    );
    assert!(r.submitted_at <= std::time::SystemTime::now());
    assert_eq!(record.len(), 6);

    let over_http = e.get_json(e.url("/_emulator/record")).await;
    assert_eq!(over_http.as_array().unwrap().len(), 6);
    assert_eq!(over_http[0]["webhook_job_id"], "job-ok");
    assert_eq!(over_http[0]["verdict"], json!({"kind": "ok"}));
}

#[test]
fn webhook_urls_name_their_job() {
    use super::state::webhook_job_id;
    assert_eq!(
        webhook_job_id("https://gw.example/v1/fal/webhook/0190-ab?token=x").as_deref(),
        Some("0190-ab")
    );
    assert_eq!(
        webhook_job_id("http://127.0.0.1:8080/prefix/v1/fal/webhook/j/").as_deref(),
        Some("j")
    );
    assert_eq!(webhook_job_id("http://h/hook?token=abc"), None);
    assert_eq!(webhook_job_id("not a url"), None);
}

/// Which of `n` status calls a fault refused, under fault rates seeded with `seed`.
async fn refused_statuses(seed: u64, n: usize) -> Vec<bool> {
    let e = env().await;
    let sub = e.submit_minimal(None).await;
    let rates: FaultRates = serde_json::from_value(json!({
        "seed": seed,
        "http": [{"target": "status", "kind": "status", "status": 503, "rate": 0.3},
                 {"target": "status", "kind": "status", "status": 500, "rate": 0.2}],
    }))
    .unwrap();
    e.emu.set_fault_rates(rates).unwrap();
    let mut refused = Vec::new();
    for _ in 0..n {
        let answer = e.get_with_key(sub.status_url.as_deref().unwrap()).await;
        let status = answer.status().as_u16();
        assert!(matches!(status, 200 | 202 | 500 | 503), "{status}");
        refused.push(status >= 500);
    }
    // Lifted: every call goes through again.
    e.emu.clear_faults();
    let answer = e.get_with_key(sub.status_url.as_deref().unwrap()).await;
    assert!(answer.status().is_success());
    refused
}

#[tokio::test]
async fn fault_rates_are_drawn_from_their_seed() {
    let first = refused_statuses(42, 200).await;
    let again = refused_statuses(42, 200).await;
    assert_eq!(first, again, "the same seed draws the same faults");
    let hits = first.iter().filter(|r| **r).count();
    assert!((60..=140).contains(&hits), "about half refused: {hits}");
    assert_ne!(refused_statuses(43, 200).await, first);
}

#[tokio::test]
async fn rated_model_and_callback_faults_apply_and_bad_rates_are_refused() {
    let e = env().await;
    let (rx, hook) = Receiver::start().await;
    let answer = e
        .raw
        .post(e.url("/_emulator/fault-rates"))
        .json(&json!({"seed": 1, "models": [{"status": 422, "rate": 0.7}, {"status": 500, "rate": 0.7}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 422);
    let answer = e
        .raw
        .post(e.url("/_emulator/fault-rates"))
        .json(&json!({"seed": 1, "models": [{"status": 422, "rate": 1.0}],
                      "callbacks": [{"kind": "duplicate", "rate": 1.0}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let sub = e.submit_minimal(Some(&hook)).await;
    eventually("both deliveries", || (rx.hits().len() == 2).then_some(())).await;
    let record = e.emu.record();
    assert_eq!(record[0].request_id, sub.request_id);
    assert_eq!(record[0].verdict, RequestEnd::ModelError { status: 422 });
}

/// A ZIP holding `files` (name, bytes), as a trainer downloads it.
fn archive_of(files: &[(&str, &[u8])]) -> Bytes {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in files {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        writer.start_file(*name, options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    Bytes::from(writer.finish().unwrap().into_inner())
}

#[tokio::test]
async fn newer_trainers_need_captions_or_a_default_and_answer_in_their_own_shapes() {
    let e = env().await;
    let uncaptioned = archive_of(&[("01.png", b"one"), ("02.png", b"two"), ("02.txt", b"TOK")]);
    let url = e
        .fal
        .upload(uncaptioned, "application/zip", "photos.zip")
        .await
        .unwrap();
    // FLUX.2 fails on a photo with no caption file and no default caption, naming the photo.
    match e
        .run_to_result("fal-ai/flux-2-trainer", &json!({"image_data_url": url}))
        .await
    {
        ModelResult::ModelError {
            status: 422, body, ..
        } => {
            assert_eq!(body["detail"][0]["loc"], json!(["body", "image_data_url"]));
            let message = body["detail"][0]["msg"].as_str().unwrap();
            assert!(message.contains("01.png"), "{message}");
        }
        other => panic!("expected a 422, got {other:?}"),
    }
    // With a default caption it trains.
    let out = e
        .run_to_output(
            "fal-ai/flux-2-trainer",
            &json!({"image_data_url": url, "default_caption": "TOK"}),
        )
        .await;
    assert!(out["diffusers_lora_file"]["url"].is_string());
    // Krea 2 answers `lora_file`; Wan 2.2 two files, low noise and high noise, unlike each other.
    let krea = e
        .run_to_output("fal-ai/krea-2-trainer", &json!({"images_data_url": url}))
        .await;
    assert!(krea["lora_file"]["url"].is_string() && krea.get("diffusers_lora_file").is_none());
    let wan = e
        .run_to_output(
            "fal-ai/wan-22-image-trainer",
            &json!({"training_data_url": url, "trigger_phrase": "TOK"}),
        )
        .await;
    let low = e
        .get_bytes(wan["diffusers_lora_file"]["url"].as_str().unwrap())
        .await;
    let high = e
        .get_bytes(wan["high_noise_lora"]["url"].as_str().unwrap())
        .await;
    assert_ne!(low, high);
    // Wan requires its trigger phrase.
    match e
        .run_to_result(
            "fal-ai/wan-22-image-trainer",
            &json!({"training_data_url": url}),
        )
        .await
    {
        ModelResult::ModelError {
            status: 422, body, ..
        } => {
            assert_eq!(body["detail"][0]["loc"], json!(["body", "trigger_phrase"]));
        }
        other => panic!("expected a 422, got {other:?}"),
    }
}

// ---- FAL behaviour measured with its official clients (fal-protocol.md §8.5) ----

impl Env {
    /// POSTs `input` to the queue at `path_and_query` with FAL's key and `headers`.
    async fn raw_submit(
        &self,
        path_and_query: &str,
        input: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .raw
            .post(self.url(path_and_query))
            .header("authorization", self.auth())
            .json(input);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// Asks for a CDN upload token as FAL's Python client does.
    async fn upload_token(&self) -> Value {
        let resp = self
            .raw
            .post(self.url("/storage/auth/token?storage_type=fal-cdn-v3"))
            .header("authorization", self.auth())
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }
}

/// `POST {base_url}/files/upload` as FAL's Python client sends it.
async fn upload_v3(
    http: &reqwest::Client,
    base_url: &str,
    authorization: Option<&str>,
    file_name: &str,
    body: &[u8],
) -> reqwest::Response {
    let mut request = http
        .post(format!("{base_url}/files/upload"))
        .header("content-type", "application/zip")
        .header("x-fal-file-name", file_name)
        .body(body.to_vec());
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.unwrap()
}

fn bearer(token: &Value) -> String {
    format!(
        "{} {}",
        token["token_type"].as_str().unwrap(),
        token["token"].as_str().unwrap()
    )
}

#[tokio::test]
async fn the_python_clients_v3_upload_serves_the_file_and_refuses_bad_tokens() {
    let e = env().await;
    let token = e.upload_token().await;
    let base_url = token["base_url"].as_str().unwrap().to_owned();
    assert_eq!(base_url, e.emu.state().base_url());
    let expires_at = chrono::DateTime::parse_from_rfc3339(token["expires_at"].as_str().unwrap())
        .expect("ISO-8601 with an offset");
    assert!(expires_at.timestamp() > now());

    let archive = archive_of(&[("a.png", b"not really a png")]);
    let resp = upload_v3(
        &e.raw,
        &base_url,
        Some(&bearer(&token)),
        "faces.zip",
        &archive,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let access_url = resp.json::<Value>().await.unwrap()["access_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(access_url.ends_with("/faces.zip"), "{access_url}");
    let served = e.raw.get(&access_url).send().await.unwrap();
    assert_eq!(served.headers()["content-type"], "application/zip");
    assert_eq!(served.bytes().await.unwrap(), archive);
    assert_eq!(e.emu.uploads()[0].file_url, access_url);

    // A trainer takes the uploaded archive like any other file URL.
    e.run_to_output(
        "fal-ai/flux-lora-fast-training",
        &json!({"images_data_url": access_url}),
    )
    .await;
    assert_eq!(e.emu.downloads()[0].size, Some(archive.len()));

    // The CDN takes the token only: no token, another token, or the FAL key are refused.
    let key = e.auth();
    for authorization in [None, Some("Bearer not-a-token"), Some(key.as_str())] {
        let resp = upload_v3(&e.raw, &base_url, authorization, "x.zip", b"x").await;
        assert_eq!(resp.status(), 401, "{authorization:?}");
    }
    let unauthorized = e
        .raw
        .post(e.url("/storage/auth/token?storage_type=fal-cdn-v3"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401, "a token needs the FAL key");
    assert_eq!(e.emu.uploads().len(), 1);

    // An expired token is refused.
    let short = env_with(EmulatorConfig {
        upload_token_ttl: Duration::ZERO,
        ..EmulatorConfig::fast()
    })
    .await;
    let token = short.upload_token().await;
    let resp = upload_v3(
        &short.raw,
        token["base_url"].as_str().unwrap(),
        Some(&bearer(&token)),
        "late.zip",
        b"x",
    )
    .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["detail"],
        "Upload token expired"
    );
    assert!(short.emu.uploads().is_empty());
}

#[tokio::test]
async fn storage_paths_are_never_taken_for_queue_submits() {
    let e = env().await;
    for path in [
        "/storage/upload/unknown",
        "/storage/auth/other",
        "/files/upload/a/b",
        "/_emulator/no-such-control",
        "/_cdn/nothing",
    ] {
        let resp = e.raw_submit(path, &json!({"prompt": "x"}), &[]).await;
        assert_eq!(resp.status(), 404, "{path}");
    }
    assert!(e.emu.submits().is_empty());
    assert!(e.emu.requests().is_empty());
    // Unknown apps stay accepted: falgate's operators may allow any endpoint, and the
    // sandbox must run them.
    let resp = e
        .raw_submit("/someone/some-app", &json!({"prompt": "x"}), &[])
        .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn every_url_handed_out_starts_with_the_public_base() {
    crate::install_crypto_provider();
    // A proxy's address, with a path prefix, that nothing listens on: the test plays the
    // proxy by sending each call to the emulator's own address instead.
    let public = "http://127.0.0.2:9/behind-proxy";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu = spawn(
        EmulatorConfig {
            public_base: Some(Url::parse(public).unwrap()),
            ..EmulatorConfig::fast()
        },
        listener,
    )
    .await;
    let local = format!("http://{}", emu.addr());
    let via_proxy = |url: &str| -> String {
        let rest = url
            .strip_prefix(public)
            .unwrap_or_else(|| panic!("{url} does not start with {public}"));
        assert!(rest.is_empty() || rest.starts_with('/'), "{url}");
        format!("{local}{rest}")
    };
    let http = reqwest::Client::new();
    let key = format!("Key {}", emu.config().key.expose());
    let call = |method: reqwest::Method, url: String| {
        http.request(method, url).header("authorization", &key)
    };
    let mut handed_out: Vec<String> = Vec::new();

    // Storage, both flows.
    let initiated: Value = call(
        reqwest::Method::POST,
        format!("{local}/storage/upload/initiate?storage_type=fal-cdn-v3"),
    )
    .json(&json!({"content_type": "application/zip", "file_name": "faces.zip"}))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let archive = archive_of(&[("a.png", b"x")]);
    let put = http
        .put(via_proxy(initiated["upload_url"].as_str().unwrap()))
        .body(archive.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let token: Value = call(
        reqwest::Method::POST,
        format!("{local}/storage/auth/token?storage_type=fal-cdn-v3"),
    )
    .json(&json!({}))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(token["base_url"], public);
    let uploaded: Value = upload_v3(
        &http,
        &via_proxy(token["base_url"].as_str().unwrap()),
        Some(&bearer(&token)),
        "more.zip",
        &archive,
    )
    .await
    .json()
    .await
    .unwrap();
    for url in [
        &initiated["upload_url"],
        &initiated["file_url"],
        &uploaded["access_url"],
    ] {
        handed_out.push(url.as_str().unwrap().to_owned());
    }

    // The queue: a training on the uploaded archive (whose public URL the emulator's runner
    // cannot reach, and does not need to), then a generation with its LoRA.
    let mut run = async |endpoint: &str, input: Value| -> Value {
        let submitted: Value = call(reqwest::Method::POST, format!("{local}/{endpoint}"))
            .json(&input)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for k in ["response_url", "status_url", "cancel_url"] {
            handed_out.push(submitted[k].as_str().unwrap().to_owned());
        }
        let status_url = via_proxy(submitted["status_url"].as_str().unwrap());
        let start = Instant::now();
        loop {
            let status: Value = call(reqwest::Method::GET, status_url.clone())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if status["status"] == "COMPLETED" {
                for k in ["response_url", "status_url", "cancel_url"] {
                    handed_out.push(status[k].as_str().unwrap().to_owned());
                }
                break;
            }
            assert!(start.elapsed() < DEADLINE, "request never completed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let result = call(
            reqwest::Method::GET,
            via_proxy(submitted["response_url"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(result.status(), 200, "{endpoint}");
        result.json().await.unwrap()
    };
    let trained = run(
        "fal-ai/flux-lora-fast-training",
        json!({"images_data_url": initiated["file_url"]}),
    )
    .await;
    let lora = trained["diffusers_lora_file"]["url"].as_str().unwrap();
    let generated = run(
        "fal-ai/flux-lora",
        json!({"prompt": "x", "image_size": "square", "loras": [{"path": lora}]}),
    )
    .await;
    for url in [
        &trained["diffusers_lora_file"]["url"],
        &trained["config_file"]["url"],
        &generated["images"][0]["url"],
    ] {
        handed_out.push(url.as_str().unwrap().to_owned());
    }
    handed_out.push(emu.jwks_url().to_string());

    for url in &handed_out {
        assert!(url.starts_with(&format!("{public}/")), "{url}");
    }
    // Files come back through the proxy's address.
    let image = http
        .get(via_proxy(generated["images"][0]["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(image.status(), 200);
    let keys = http
        .get(via_proxy(emu.jwks_url().as_str()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(parse_jwks(&keys).len(), 2);
}

/// Holds `endpoint`'s requests in the queue until the timings change.
fn hold_queue(e: &Env, endpoint: &str) {
    e.emu
        .set_durations(Some(endpoint), false, Durations::new(600_000, 20));
}

#[tokio::test]
async fn a_start_timeout_that_runs_out_in_the_queue_ends_the_request_unrun() {
    let e = env().await;
    hold_queue(&e, "fal-ai/flux-lora");
    let (rx, hook) = Receiver::start().await;
    let path = format!(
        "/fal-ai/flux-lora?fal_webhook={}",
        form_urlencoded::byte_serialize(hook.as_str().as_bytes()).collect::<String>()
    );
    let resp = e
        .raw_submit(
            &path,
            &json!({"prompt": "x"}),
            &[("x-fal-request-timeout", "0.3")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let sub: SubmitResponse = resp.json().await.unwrap();

    // It leaves the queue as COMPLETED, naming the timeout, though its queue time is not up.
    e.wait_completed(sub.status_url.as_deref().unwrap()).await;
    let status: Value = e
        .get_with_key(sub.status_url.as_deref().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(status["error_type"], "request_timeout");

    // Its result is FAL's 504 of the `user` kind.
    let result = e.get_with_key(sub.response_url.as_deref().unwrap()).await;
    assert_eq!(result.status(), 504);
    assert_eq!(result.headers()["x-fal-request-timeout-type"], "user");
    assert_eq!(result.headers()["x-fal-error-type"], "request_timeout");
    assert_eq!(
        result.json::<Value>().await.unwrap(),
        json!({"detail": "Request timed out", "error_type": "request_timeout"})
    );
    // falgate's client reads it as the failure the status reported.
    let reported = crate::fal::ReportedEnd::Failed {
        error_type: Some("request_timeout".into()),
    };
    let read = e
        .fal
        .result(sub.response_url.as_deref().unwrap(), &reported)
        .await
        .unwrap();
    assert!(
        matches!(&read, ModelResult::ModelError { status: 504, error_type: Some(t), .. } if t == "request_timeout"),
        "{read:?}"
    );

    // The callback reports the error.
    let (_, raw) = eventually("callback", || rx.hits().first().cloned()).await;
    let cb: CallbackBody = serde_json::from_slice(&raw).unwrap();
    assert_eq!(cb.status, CallbackStatus::Error);
    assert_eq!(cb.error.as_deref(), Some("Invalid status code: 504"));
    assert_eq!(cb.payload.unwrap()["error_type"], "request_timeout");

    // It never ran, so it is not billed.
    let record = &e.emu.record()[0];
    assert!(!record.ran);
    assert_eq!(record.verdict, RequestEnd::ModelError { status: 504 });
    assert!(e.emu.request(&sub.request_id).unwrap().start_timed_out);

    // A deadline that the start meets changes nothing.
    e.emu
        .set_durations(Some("fal-ai/flux-lora"), false, Durations::new(0, 20));
    let resp = e
        .raw_submit(
            "/fal-ai/flux-lora",
            &json!({"prompt": "x"}),
            &[("x-fal-request-timeout", "30.0")],
        )
        .await;
    let sub: SubmitResponse = resp.json().await.unwrap();
    expect_output(e.completed_result(&sub).await);
    assert!(e.emu.record()[1].ran);

    // A deadline that is not a number of seconds is FAL's 400.
    for bad in ["soon", "0", "-5"] {
        let resp = e
            .raw_submit(
                "/fal-ai/flux-lora",
                &json!({"prompt": "x"}),
                &[("x-fal-request-timeout", bad)],
            )
            .await;
        assert_eq!(resp.status(), 400, "{bad}");
        assert_eq!(resp.headers()["x-fal-error-type"], "bad_request");
    }
    assert_eq!(e.emu.requests().len(), 2);
}

#[tokio::test]
async fn fal_max_queue_length_refuses_submits_to_a_full_queue() {
    let e = env().await;
    hold_queue(&e, "fal-ai/flux-lora");
    let input = json!({"prompt": "x"});
    // Taken while no more than two wait: the third joins two.
    for _ in 0..3 {
        let resp = e
            .raw_submit("/fal-ai/flux-lora?fal_max_queue_length=2", &input, &[])
            .await;
        assert_eq!(resp.status(), 200);
    }
    let full = e
        .raw_submit("/fal-ai/flux-lora?fal_max_queue_length=2", &input, &[])
        .await;
    assert_eq!(full.status(), 429);
    assert_eq!(full.headers()["x-fal-error-type"], "queue_full");
    assert_eq!(
        full.json::<Value>().await.unwrap()["error_type"],
        "queue_full"
    );
    let refused = e.emu.submits().pop().unwrap();
    assert_eq!(
        (refused.request_id, refused.fault.as_deref()),
        (None, Some("queue_full"))
    );

    // A longer limit, another endpoint's queue, or none at all: accepted.
    for path in [
        "/fal-ai/flux-lora?fal_max_queue_length=3",
        "/fal-ai/flux-2/lora?fal_max_queue_length=1",
        "/fal-ai/flux-lora",
    ] {
        let resp = e.raw_submit(path, &input, &[]).await;
        assert_eq!(resp.status(), 200, "{path}");
    }

    // Once the queue drains, the limit lets submits in again.
    e.emu
        .set_durations(Some("fal-ai/flux-lora"), false, Durations::new(0, 20));
    eventually("the queue to drain", || {
        e.emu
            .requests()
            .iter()
            .all(|r| r.phase != Phase::InQueue)
            .then_some(())
    })
    .await;
    let resp = e
        .raw_submit("/fal-ai/flux-lora?fal_max_queue_length=1", &input, &[])
        .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn output_format_picks_the_image_encoding() {
    let e = env().await;
    let size = json!({"width": 256, "height": 192});
    for (endpoint, format, content_type, extension, decoded_as) in [
        (
            "fal-ai/flux-lora",
            "jpeg",
            "image/jpeg",
            ".jpeg",
            image::ImageFormat::Jpeg,
        ),
        (
            "fal-ai/flux-lora",
            "png",
            "image/png",
            ".png",
            image::ImageFormat::Png,
        ),
        (
            "fal-ai/flux-2/lora",
            "webp",
            "image/webp",
            ".webp",
            image::ImageFormat::WebP,
        ),
    ] {
        let out = e
            .run_to_output(
                endpoint,
                &json!({"prompt": "format", "image_size": size, "output_format": format}),
            )
            .await;
        let img = &out["images"][0];
        assert_eq!(img["content_type"], content_type, "{format}");
        let url = img["url"].as_str().unwrap();
        assert!(url.ends_with(extension), "{url}");
        assert!(img["file_name"].as_str().unwrap().ends_with(extension));
        let served = e.raw.get(url).send().await.unwrap();
        assert_eq!(served.headers()["content-type"], content_type);
        let bytes = served.bytes().await.unwrap();
        assert_eq!(img["file_size"].as_u64(), Some(bytes.len() as u64));
        assert_eq!(image::guess_format(&bytes).unwrap(), decoded_as, "{format}");
        let picture = image::load_from_memory(&bytes).unwrap();
        assert_eq!((picture.width(), picture.height()), (256, 192), "{format}");
    }
}

#[tokio::test]
async fn the_jwks_lists_two_keys_and_a_planned_rotation_needs_no_refetch() {
    let e = env().await;
    let doc = e.get_json(e.emu.jwks_url()).await;
    let entries = doc["keys"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "like FAL's");
    assert_ne!(entries[0]["kid"], entries[1]["kid"]);
    let cache = JwksCache::with_settings(
        e.fal.http().clone(),
        e.emu.jwks_url(),
        Duration::from_secs(3600),
        Duration::ZERO,
    );
    let keys = cache.keys().await.unwrap();
    assert_eq!(keys.len(), 2);

    let (rx, hook) = Receiver::start().await;
    let verdicts = |n: usize, keys: &[ed25519_dalek::VerifyingKey]| {
        let (headers, body) = rx.hits()[n].clone();
        let h = WebhookHeaders::from_headers(&headers).unwrap();
        let each: Vec<bool> = keys
            .iter()
            .map(|k| {
                signature::verify(&h, &body, std::slice::from_ref(k), now())
                    .unwrap()
                    .is_valid()
            })
            .collect();
        (h, body, each)
    };
    e.submit_minimal(Some(&hook)).await;
    eventually("callback", || rx.hits().first().cloned()).await;
    let (h, body, each) = verdicts(0, &keys);
    assert_eq!(each, vec![true, false], "the first key signs");
    assert_eq!(
        cache.verify_with_refetch(&h, &body, now()).await,
        Ok(Verdict::Valid { stale: false })
    );

    // The next key takes over; the set falgate holds already lists it.
    e.emu.rotate_to_next_key(false);
    e.submit_minimal(Some(&hook)).await;
    eventually("second callback", || rx.hits().get(1).cloned()).await;
    let (h, body, each) = verdicts(1, &keys);
    assert_eq!(each, vec![false, true], "the second key signs");
    assert_eq!(
        cache.verify_with_refetch(&h, &body, now()).await,
        Ok(Verdict::Valid { stale: false }),
        "any key of the set verifies"
    );
    assert_eq!(cache.fetch_count().await, 1, "no refetch needed");
    assert_eq!(emulator_keys(&e.emu)[0], keys[1]);
}
