//! Raw jobs: create, read, list with filters and pages, cancel.

use crate::backend_tests;
use crate::support::*;
use falgate::domain::job::{EventSource, JobEvent};
use falgate::store::Transition;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::HashSet;

/// Brings `event` to the job through the one transition function, as a worker would; answers
/// whether the job moved.
async fn apply(app: &TestApp, id: uuid::Uuid, event: JobEvent, source: EventSource) -> bool {
    let transition = Transition::new(event, source, falgate::domain::now());
    let applied = app.store().apply(None, id, &transition).await.unwrap();
    applied.is_some_and(|applied| applied.moved_to().is_some())
}

backend_tests!(a_created_job_is_pending_with_its_history, without_workers);
async fn a_created_job_is_pending_with_its_history(app: &TestApp) {
    let response = app
        .request(Method::POST, "/v1/jobs")
        .json(
            &json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "a red apple", "seed": 7}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.headers()["content-type"], "application/json");
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["status"], "pending");
    assert_eq!(job["kind"], "raw");
    assert_eq!(job["endpoint"], "fal-ai/flux-lora");
    assert_eq!(job["input"], json!({"prompt": "a red apple", "seed": 7}));
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["sandbox"], false);
    assert!(job["result"].is_null() && job["error"].is_null());

    let id = job["id"].as_str().unwrap();
    let detail: Value = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(detail["id"], job["id"]);
    assert_eq!(detail["created_at"], job["created_at"]);
    assert_eq!(detail["input"], job["input"]);
    let events = detail["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["from"], Value::Null);
    assert_eq!(events[0]["to"], "pending");
    assert_eq!(events[0]["source"], "api");
}

backend_tests!(pages_walk_every_job_once_newest_first, without_workers);
async fn pages_walk_every_job_once_newest_first(app: &TestApp) {
    let mut created = Vec::new();
    for i in 0..25 {
        created.push(app.create_job(&app.key, &format!("prompt {i}")).await["id"].clone());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=10&cursor={c}"),
            None => "/v1/jobs?limit=10".to_owned(),
        };
        let page: Value = app.get_json(&path).await;
        pages += 1;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].clone()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    created.reverse();
    assert_eq!(seen, created, "every job once, newest first");

    // Default page size is 20; an exact last page has no cursor.
    let page: Value = app.get_json("/v1/jobs").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 20);
    let page: Value = app.get_json("/v1/jobs?limit=25").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 25);
    assert!(page["next_cursor"].is_null());
}

backend_tests!(filters_select_by_status_and_kind, without_workers);
async fn filters_select_by_status_and_kind(app: &TestApp) {
    let mut canceled = HashSet::new();
    for i in 0..6 {
        let job = app.create_job(&app.key, &format!("p{i}")).await;
        if i % 2 == 0 {
            let id = job["id"].as_str().unwrap();
            app.cancel(id).await;
            canceled.insert(id.to_owned());
        }
    }
    let page: Value = app.get_json("/v1/jobs?status=canceled").await;
    let ids: HashSet<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, canceled);
    let pending: Value = app
        .get_json("/v1/jobs?status=pending&kind=raw&limit=2")
        .await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 2);
    assert!(
        pending["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["status"] == "pending")
    );
    let cursor = pending["next_cursor"].as_str().unwrap();
    let rest: Value = app
        .get(&format!(
            "/v1/jobs?status=pending&kind=raw&limit=2&cursor={cursor}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    for kind in ["training", "generation"] {
        let none: Value = app.get_json(&format!("/v1/jobs?kind={kind}")).await;
        assert_eq!(none["items"].as_array().unwrap().len(), 0);
    }
    let by_avatar: Value = app
        .get(&format!("/v1/jobs?avatar_id={}", uuid::Uuid::now_v7()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_avatar["items"].as_array().unwrap().len(), 0);
}

backend_tests!(cancel_pending_then_again_is_harmless, without_workers);
async fn cancel_pending_then_again_is_harmless(app: &TestApp) {
    let job = app.create_job(&app.key, "to cancel").await;
    let id = job["id"].as_str().unwrap();
    let first = app.cancel(id).await;
    assert_eq!(first["status"], "canceled");
    assert!(first["finished_at"].is_string());

    let again = app.cancel(id).await;
    assert_eq!(again["status"], "canceled");
    assert_eq!(again["finished_at"], first["finished_at"]);

    let detail: Value = app.get_json(&format!("/v1/jobs/{id}")).await;
    let events = detail["events"].as_array().unwrap();
    assert_eq!(
        events.len(),
        2,
        "the second cancel wrote nothing: {events:?}"
    );
    assert_eq!(events[1]["from"], "pending");
    assert_eq!(events[1]["to"], "canceled");
    assert_eq!(events[1]["source"], "api");
}

backend_tests!(cancelling_a_finished_job_is_409, without_workers);
async fn cancelling_a_finished_job_is_409(app: &TestApp) {
    let job = app.create_job(&app.key, "done already").await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    // Move it to the end the way the workers will: news through the one transition function.
    for event in [JobEvent::SubmitAccepted, JobEvent::Succeeded] {
        let moved = apply(app, id, event, EventSource::Reconciler).await;
        assert!(moved, "{event:?} moved the job");
    }
    let response = app.post(&format!("/v1/jobs/{id}/cancel")).await;
    let body = problem(response, StatusCode::CONFLICT, "job_finished").await;
    assert!(body["detail"].as_str().unwrap().contains("succeeded"));
    let detail: Value = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(detail["status"], "succeeded");
    assert_eq!(detail["events"].as_array().unwrap().len(), 3);
}

backend_tests!(
    cancelling_a_job_with_fal_records_the_request,
    without_workers
);
async fn cancelling_a_job_with_fal_records_the_request(app: &TestApp) {
    let job = app.create_job(&app.key, "in flight").await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    apply(app, id, JobEvent::SubmitAccepted, EventSource::Dispatcher).await;
    let body = app.cancel(&id.to_string()).await;
    assert_eq!(
        body["status"], "submitted",
        "only FAL's confirmation ends it"
    );
    assert!(body["cancel_requested_at"].is_string());
    let again = app.cancel(&id.to_string()).await;
    assert_eq!(again["cancel_requested_at"], body["cancel_requested_at"]);
}

backend_tests!(the_allow_list_is_configurable, |config| {
    config.allowed_endpoints = vec!["fal-ai/flux/schnell".parse().unwrap()];
    config.run_workers = false;
});
async fn the_allow_list_is_configurable(app: &TestApp) {
    let ok = app
        .request(Method::POST, "/v1/jobs")
        .json(&json!({"endpoint": "fal-ai/flux/schnell", "input": {"prompt": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    let refused = app
        .request(Method::POST, "/v1/jobs")
        .json(&json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "x"}}))
        .send()
        .await
        .unwrap();
    let body = validation_problem(refused).await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("fal-ai/flux/schnell")
    );
}

backend_tests!(concurrent_jobs_are_each_stored_as_answered, without_workers);
/// Requests that arrive together share a transaction; each must still get its own job, stored
/// exactly as its 202 showed it, with its own history, and a request whose Idempotency-Key
/// replays must not disturb the others.
async fn concurrent_jobs_are_each_stored_as_answered(app: &TestApp) {
    let input = |n: usize| {
        json!({
            "prompt": format!("\"quoted\" \\ back-slashed, ünïcödé and 🦀 #{n}"),
            "seed": u64::MAX - n as u64,
            "guidance_scale": 3.5,
            "nested": {"list": [1, null, true, {"x": "y"}], "empty": {}},
        })
    };
    let first = app
        .request(Method::POST, "/v1/jobs")
        .header("idempotency-key", "shared-batch-key")
        .json(&json!({"endpoint": "fal-ai/flux-lora", "input": input(0)}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();

    let requests = (1..=40).map(|n| {
        let mut request = app
            .request(Method::POST, "/v1/jobs")
            .json(&json!({"endpoint": "fal-ai/flux-lora", "input": input(n)}));
        // Every fifth one replays the first request instead of making a job; every third
        // makes its job under a key of its own.
        if n.is_multiple_of(5) {
            request = request
                .header("idempotency-key", "shared-batch-key")
                .json(&json!({"endpoint": "fal-ai/flux-lora", "input": input(0)}));
        } else if n.is_multiple_of(3) {
            request = request.header("idempotency-key", format!("own-key-{n}"));
        }
        async move { (n, request.send().await.unwrap()) }
    });
    let answers = futures_util::future::join_all(requests).await;
    let mut made = HashSet::new();
    for (n, response) in answers {
        assert_eq!(response.status(), StatusCode::ACCEPTED, "request {n}");
        let replayed = response.headers().contains_key("idempotent-replayed");
        let job: Value = response.json().await.unwrap();
        if n.is_multiple_of(5) {
            assert!(replayed, "request {n} carried the first request's key");
            assert_eq!(job, first);
            continue;
        }
        assert!(!replayed);
        assert_eq!(job["input"], input(n), "request {n}");
        let stored = app.job(job["id"].as_str().unwrap()).await;
        for field in [
            "id",
            "status",
            "endpoint",
            "input",
            "created_at",
            "updated_at",
        ] {
            assert_eq!(stored[field], job[field], "request {n}: {field}");
        }
        let events = stored["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "request {n}");
        assert_eq!(events[0]["at"], job["created_at"]);
        assert!(made.insert(job["id"].clone()));
        if n.is_multiple_of(3) {
            let again = app
                .request(Method::POST, "/v1/jobs")
                .header("idempotency-key", format!("own-key-{n}"))
                .json(&json!({"endpoint": "fal-ai/flux-lora", "input": input(n)}))
                .send()
                .await
                .unwrap();
            assert_eq!(again.headers()["idempotent-replayed"], "true");
            assert_eq!(
                again.json::<Value>().await.unwrap(),
                job,
                "request {n} replayed"
            );
        }
    }
    assert_eq!(made.len(), 32);
    let listed: Value = app.get_json("/v1/jobs?limit=100").await;
    assert_eq!(items(&listed).len(), 33, "32 new jobs and the first");
}
