//! Idempotency-Key on creating POSTs.

use crate::backend_tests;
use crate::support::*;
use falgate::domain::idempotency::fingerprint;
use falgate::store::{IdempotencyClaim, IdempotencyState};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn post_with_key(app: &TestApp, api_key: &str, key: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/jobs"))
        .bearer_auth(api_key)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn job_count(app: &TestApp, api_key: &str) -> usize {
    let page: Value = app
        .get_as(api_key, "/v1/jobs?limit=100")
        .await
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().len()
}

backend_tests!(the_same_key_and_body_replays_the_first_response);
async fn the_same_key_and_body_replays_the_first_response(app: &TestApp) {
    let body = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "once", "seed": 1}});
    let first = post_with_key(app, &app.key, "order-1", &body).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    // Same meaning, different key order and spacing: still the same request.
    let reordered = json!({"input": {"seed": 1, "prompt": "once"}, "endpoint": "fal-ai/flux-lora"});
    let second = post_with_key(app, &app.key, "order-1", &reordered).await;
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second: Value = second.json().await.unwrap();
    assert_eq!(second, first);
    assert_eq!(job_count(app, &app.key).await, 1);
}

backend_tests!(the_same_key_with_another_body_is_refused);
async fn the_same_key_with_another_body_is_refused(app: &TestApp) {
    let body = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "first"}});
    assert_eq!(
        post_with_key(app, &app.key, "k", &body).await.status(),
        StatusCode::ACCEPTED
    );
    let other = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "second"}});
    let response = post_with_key(app, &app.key, "k", &other).await;
    problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(job_count(app, &app.key).await, 1);
}

backend_tests!(keys_are_scoped_to_the_api_key);
async fn keys_are_scoped_to_the_api_key(app: &TestApp) {
    let body = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "shared key"}});
    let other = app.new_key("second tenant").await;
    let a: Value = post_with_key(app, &app.key, "same", &body)
        .await
        .json()
        .await
        .unwrap();
    let b = post_with_key(app, &other, "same", &body).await;
    assert_eq!(b.status(), StatusCode::ACCEPTED);
    assert!(b.headers().get("idempotent-replayed").is_none());
    let b: Value = b.json().await.unwrap();
    assert_ne!(a["id"], b["id"]);
}

backend_tests!(a_failed_request_does_not_use_up_its_key);
async fn a_failed_request_does_not_use_up_its_key(app: &TestApp) {
    let bad = json!({"endpoint": "fal-ai/unknown", "input": {}});
    let response = post_with_key(app, &app.key, "retry-me", &bad).await;
    validation_problem(response).await;
    let good = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "fixed"}});
    let response = post_with_key(app, &app.key, "retry-me", &good).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

backend_tests!(a_key_in_flight_is_409);
async fn a_key_in_flight_is_409(app: &TestApp) {
    let body = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "slow"}});
    let canonical = serde_json::to_vec(&body).unwrap();
    let tenant = app.store().list_api_keys().await.unwrap()[0].id;
    let now = falgate::domain::now();
    // Another request holds the key and is still working.
    let claimed = app
        .store()
        .claim_idempotency_key(&IdempotencyClaim {
            tenant,
            key: "busy".into(),
            token: uuid::Uuid::new_v4(),
            fingerprint: fingerprint("POST /v1/jobs", &canonical),
            now,
            expires_before: now - chrono::TimeDelta::hours(24),
            abandoned_before: now - chrono::TimeDelta::minutes(2),
        })
        .await
        .unwrap();
    assert_eq!(claimed, IdempotencyState::Claimed);
    let response = post_with_key(app, &app.key, "busy", &body).await;
    problem(response, StatusCode::CONFLICT, "idempotency_key_in_use").await;
    assert_eq!(job_count(app, &app.key).await, 0);
}

backend_tests!(concurrent_requests_with_one_key_make_one_job);
async fn concurrent_requests_with_one_key_make_one_job(app: &TestApp) {
    let body = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "race"}});
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = app.client.clone();
        let url = app.url("/v1/jobs");
        let key = app.key.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(key)
                .header("idempotency-key", "race-1")
                .json(&body)
                .send()
                .await
                .unwrap();
            let replayed = response.headers().get("idempotent-replayed").is_some();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, replayed, body)
        }));
    }
    let mut fresh = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let (status, replayed, body) = task.await.unwrap();
        match status {
            StatusCode::ACCEPTED => {
                ids.insert(body["id"].as_str().unwrap().to_owned());
                if !replayed {
                    fresh.push(body);
                }
            }
            StatusCode::CONFLICT => assert_eq!(body["code"], "idempotency_key_in_use"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(fresh.len(), 1, "exactly one request did the work");
    assert_eq!(ids.len(), 1, "every 202 names the same job");
    assert_eq!(job_count(app, &app.key).await, 1);
}

backend_tests!(malformed_idempotency_keys_are_422);
async fn malformed_idempotency_keys_are_422(app: &TestApp) {
    let body = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "x"}});
    let response = post_with_key(app, &app.key, &"k".repeat(300), &body).await;
    let problem = validation_problem(response).await;
    assert_eq!(fields(&problem), vec!["Idempotency-Key"]);
}

backend_tests!(a_request_whose_claim_was_taken_over_cannot_touch_the_new_one);
async fn a_request_whose_claim_was_taken_over_cannot_touch_the_new_one(app: &TestApp) {
    let tenant = app.store().list_api_keys().await.unwrap()[0].id;
    let now = falgate::domain::now();
    let claim = |token: uuid::Uuid, at: chrono::DateTime<chrono::Utc>| IdempotencyClaim {
        tenant,
        key: "taken-over".into(),
        token,
        fingerprint: fingerprint("POST /v1/jobs", b"{}"),
        now: at,
        expires_before: at - chrono::TimeDelta::hours(24),
        abandoned_before: at - chrono::TimeDelta::seconds(10),
    };
    let (first, second) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let store = app.store();
    let stalled = claim(first, now - chrono::TimeDelta::seconds(30));
    assert_eq!(
        store.claim_idempotency_key(&stalled).await.unwrap(),
        IdempotencyState::Claimed
    );
    // Its claim looked abandoned, and a retry took the key over.
    assert_eq!(
        store
            .claim_idempotency_key(&claim(second, now))
            .await
            .unwrap(),
        IdempotencyState::Claimed
    );
    // The first request comes back to life and fails: its release leaves the new claim alone.
    store
        .release_idempotency_key(tenant, "taken-over", first)
        .await
        .unwrap();
    assert_eq!(
        store
            .claim_idempotency_key(&claim(uuid::Uuid::new_v4(), now))
            .await
            .unwrap(),
        IdempotencyState::InFlight
    );
}
