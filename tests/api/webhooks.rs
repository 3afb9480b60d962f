//! Webhooks to the clients' receivers: signed per Standard Webhooks (checked here with the
//! `standardwebhooks` crate, not with falgate's own code), retried, filtered, rotated,
//! redelivered, disabled by a 410, and never sent where they may not go.

use crate::backend_tests;
use crate::support::*;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use falgate::config::Config;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One post a receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    headers: HeaderMap,
    body: String,
}

impl Received {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }

    pub(crate) fn webhook_id(&self) -> &str {
        self.headers["webhook-id"].to_str().unwrap()
    }

    /// Whether the `standardwebhooks` crate accepts it as signed with `secret`.
    pub(crate) fn verifies_with(&self, secret: &str) -> bool {
        standardwebhooks::Webhook::new(secret)
            .expect("a whsec_ secret")
            .verify(self.body.as_bytes(), &self.headers)
            .is_ok()
    }
}

#[derive(Clone, Default)]
pub(crate) struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
    /// The statuses to answer, in turn; 200 once they run out.
    answers: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    /// A receiver on loopback; answers its URL (by a host name the test configuration maps to
    /// loopback).
    async fn start(answers: &[u16]) -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Self::serve(listener, answers);
        let port = receiver.1;
        (receiver.0, format!("http://receiver.test:{port}/hook"))
    }

    pub(crate) fn serve(listener: tokio::net::TcpListener, answers: &[u16]) -> (Self, u16) {
        let receiver = Self::default();
        receiver.answers.lock().unwrap().extend(answers);
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, port)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `done` holds of what was received; answers it.
    pub(crate) async fn until(
        &self,
        what: &str,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        eventually(what)
            .until(async || {
                let received = self.received();
                done(&received).then_some(received)
            })
            .await
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: String) -> AxumStatus {
    receiver
        .received
        .lock()
        .unwrap()
        .push(Received { headers, body });
    let status = receiver.answers.lock().unwrap().pop_front().unwrap_or(200);
    AxumStatus::from_u16(status).unwrap()
}

/// Webhooks may reach the test receiver (loopback, by name) and are retried at once.
fn to_test_receivers(config: &mut Config) {
    config.webhooks.allow_http = true;
    config.webhooks.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
    config.webhooks.hosts = vec![("receiver.test".into(), "127.0.0.1".parse().unwrap())];
    config.webhooks.retry_schedule = vec![Duration::from_millis(100); 3];
}

async fn create_endpoint(app: &TestApp, body: Value) -> Value {
    let response = app.post_json("/v1/webhook-endpoints", &body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.unwrap()
}

fn types_of(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_owned())
        .collect()
}

pub(crate) fn ended(received: &[Received], job: &str) -> bool {
    received
        .iter()
        .any(|r| r.json()["type"] == "job.succeeded" && r.json()["data"]["id"] == job)
}

backend_tests!(
    a_jobs_events_arrive_signed_in_order_as_the_api_shows_them,
    to_test_receivers
);
async fn a_jobs_events_arrive_signed_in_order_as_the_api_shows_them(app: &TestApp) {
    let (receiver, url) = Receiver::start(&[]).await;
    let endpoint = create_endpoint(app, json!({"url": url, "description": "all"})).await;
    let secret = endpoint["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{endpoint}");
    // The secret is shown once.
    let shown = app
        .get_json(&format!("/v1/webhook-endpoints/{}", id_of(&endpoint)))
        .await;
    assert!(shown.get("secret").is_none(), "{shown}");
    assert_eq!(shown["url"], url.as_str());

    let job = submit_raw(app, json!({"prompt": "told"})).await;
    let received = receiver
        .until("the job's end delivered", |r| ended(r, &job))
        .await;
    let kinds = types_of(&received);
    assert_told_a_succeeding_job(&kinds.iter().map(String::as_str).collect::<Vec<_>>());
    for delivery in &received {
        assert!(delivery.verifies_with(secret), "{:?}", delivery.headers);
        assert!(!delivery.verifies_with("whsec_c2VjcmV0IHRoYXQgaXMgbm90IGl0"));
        let event = delivery.json();
        assert_eq!(delivery.webhook_id(), event["id"].as_str().unwrap());
        assert_eq!(delivery.headers["content-type"], "application/json");
        // The body is the event as the API shows it.
        assert_eq!(
            event,
            app.get_json(&format!("/v1/events/{}", event["id"].as_str().unwrap()))
                .await
        );
    }
    let sequences: Vec<i64> = received
        .iter()
        .map(|r| r.json()["sequence"].as_i64().unwrap())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
}

backend_tests!(
    a_receiver_that_fails_twice_gets_the_event_three_times_with_one_id,
    to_test_receivers
);
async fn a_receiver_that_fails_twice_gets_the_event_three_times_with_one_id(app: &TestApp) {
    let (receiver, url) = Receiver::start(&[500, 503]).await;
    let endpoint =
        create_endpoint(app, json!({"url": url, "event_types": ["job.succeeded"]})).await;
    let job = submit_raw(app, json!({"prompt": "retried"})).await;
    let received = receiver.until("three attempts", |r| r.len() >= 3).await;
    assert_eq!(received.len(), 3, "{:?}", types_of(&received));
    assert!(
        received
            .iter()
            .all(|r| r.webhook_id() == received[0].webhook_id())
    );
    assert!(
        received
            .iter()
            .all(|r| r.json()["data"]["id"] == job.as_str())
    );
    assert!(
        received
            .iter()
            .all(|r| r.verifies_with(endpoint["secret"].as_str().unwrap()))
    );

    let attempts = eventually("the third attempt recorded")
        .until(async || {
            let page = app
                .get_json(&format!(
                    "/v1/webhook-endpoints/{}/deliveries",
                    id_of(&endpoint)
                ))
                .await;
            let items = page["items"].as_array().unwrap().clone();
            (items.len() == 3 && items[0]["delivery_status"] == "succeeded").then_some(items)
        })
        .await;
    let codes: Vec<i64> = attempts
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [200, 503, 500], "newest first");
    // A receiver gone for good fails the delivery after the schedule's last attempt.
    drop(receiver);
}

backend_tests!(
    filters_rotation_redelivery_and_gone_receivers,
    to_test_receivers
);
async fn filters_rotation_redelivery_and_gone_receivers(app: &TestApp) {
    let (only_ends, only_ends_url) = Receiver::start(&[]).await;
    let (everything, everything_url) = Receiver::start(&[]).await;
    let (gone, gone_url) = Receiver::start(&[410]).await;
    create_endpoint(
        app,
        json!({"url": only_ends_url, "event_types": ["job.succeeded"]}),
    )
    .await;
    let all = create_endpoint(app, json!({"url": everything_url})).await;
    let gone_endpoint = create_endpoint(app, json!({"url": gone_url})).await;
    let old_secret = all["secret"].as_str().unwrap().to_owned();

    // The secret is rotated: for a day, deliveries carry both signatures.
    let rotated = app
        .post(&format!(
            "/v1/webhook-endpoints/{}/rotate-secret",
            id_of(&all)
        ))
        .await;
    assert_eq!(rotated.status(), StatusCode::OK);
    let rotated: Value = rotated.json().await.unwrap();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, old_secret);
    assert!(
        rotated["previous_secret_valid_until"].is_string(),
        "{rotated}"
    );

    let job = submit_raw(app, json!({"prompt": "filtered"})).await;
    let ends = only_ends.until("the end", |r| ended(r, &job)).await;
    assert_eq!(types_of(&ends), ["job.succeeded"]);
    let told = everything.until("the end", |r| ended(r, &job)).await;
    assert!(told.len() >= ends.len());
    for delivery in &told {
        assert!(delivery.verifies_with(&new_secret));
        assert!(delivery.verifies_with(&old_secret));
    }

    // A 410 disables its endpoint, which then receives nothing more.
    let disabled = eventually("the gone endpoint disabled")
        .until(async || {
            let endpoint = app
                .get_json(&format!("/v1/webhook-endpoints/{}", id_of(&gone_endpoint)))
                .await;
            (endpoint["enabled"] == false).then_some(endpoint)
        })
        .await;
    assert!(
        disabled["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("410"),
        "{disabled}"
    );
    assert_eq!(gone.received().len(), 1);

    // A redelivery sends the event again, with its id, to each endpoint that takes it.
    let event_id = ends[0].webhook_id().to_owned();
    let response = app.post(&format!("/v1/events/{event_id}/redeliver")).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.json::<Value>().await.unwrap()["deliveries"], 2);
    only_ends
        .until("the redelivery", |r| r.len() == ends.len() + 1)
        .await;
    assert_eq!(only_ends.received().last().unwrap().webhook_id(), event_id);
    assert_eq!(gone.received().len(), 1, "a disabled endpoint gets nothing");
}

backend_tests!(
    urls_that_reach_what_is_not_public_are_refused_naming_why,
    |config: &mut Config| {
        config.webhooks.allow_http = false;
        config.webhooks.allowed_networks = Vec::new();
        config.webhooks.hosts = [
            ("loopback.test", "127.0.0.1"),
            ("private.test", "192.168.1.10"),
            ("metadata.test", "169.254.169.254"),
            ("cgnat.test", "100.100.0.1"),
            ("v6.test", "fd12::1"),
            ("public.test", "93.184.215.14"),
        ]
        .iter()
        .map(|(name, ip)| (name.to_string(), ip.parse().unwrap()))
        .collect();
    }
);
async fn urls_that_reach_what_is_not_public_are_refused_naming_why(app: &TestApp) {
    let table = [
        ("https://loopback.test/hook", "loopback"),
        ("https://private.test/hook", "private"),
        ("https://metadata.test/hook", "link-local"),
        ("https://cgnat.test/hook", "carrier-grade NAT"),
        ("https://v6.test/hook", "private"),
        ("https://[::1]/hook", "loopback"),
        ("https://10.0.0.1/hook", "private"),
        ("http://public.test/hook", "https"),
        ("https://user:pw@public.test/hook", "password"),
        ("not a url", "not a URL"),
    ];
    for (url, reason) in table {
        let response = app
            .post_json("/v1/webhook-endpoints", &json!({"url": url}))
            .await;
        let problem = validation_problem(response).await;
        assert_eq!(fields(&problem), ["url"], "{url}");
        let message = problem["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{url}: {message}");
    }
    let empty_types = app
        .post_json(
            "/v1/webhook-endpoints",
            &json!({"url": "https://public.test/hook", "event_types": []}),
        )
        .await;
    assert_eq!(
        fields(&validation_problem(empty_types).await),
        ["event_types"]
    );
    let unknown_type = app
        .post_json(
            "/v1/webhook-endpoints",
            &json!({"url": "https://public.test/hook", "event_types": ["job.pending"]}),
        )
        .await;
    assert_eq!(
        fields(&validation_problem(unknown_type).await),
        ["event_types[0]"]
    );
    // Nothing was made.
    let list = app.get_json("/v1/webhook-endpoints").await;
    assert_eq!(items(&list).len(), 0);

    // A public host passes; changing it to one that is not is refused, and changes nothing.
    let endpoint = create_endpoint(app, json!({"url": "https://public.test/hook"})).await;
    let path = format!("/v1/webhook-endpoints/{}", id_of(&endpoint));
    let refused = app
        .request(reqwest::Method::PATCH, &path)
        .json(&json!({"url": "https://metadata.test/", "description": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fields(&validation_problem(refused).await), ["url"]);
    let unchanged = app.get_json(&path).await;
    assert_eq!(unchanged["url"], "https://public.test/hook");
    assert_eq!(unchanged["description"], "");
}

backend_tests!(
    endpoints_are_the_tenants_own_and_can_be_changed_and_deleted,
    to_test_receivers
);
async fn endpoints_are_the_tenants_own_and_can_be_changed_and_deleted(app: &TestApp) {
    let (_receiver, url) = Receiver::start(&[]).await;
    let endpoint = create_endpoint(app, json!({"url": url, "event_types": ["job.failed"]})).await;
    let path = format!("/v1/webhook-endpoints/{}", id_of(&endpoint));
    let other = app.new_key("other").await;
    problem(
        app.get_as(&other, &path).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let listed: Value = app
        .get_as(&other, "/v1/webhook-endpoints")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(items(&listed).len(), 0);

    let changed: Value = app
        .request(reqwest::Method::PATCH, &path)
        .json(&json!({"event_types": null, "description": "every type", "enabled": false}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(changed["event_types"], Value::Null);
    assert_eq!(changed["description"], "every type");
    assert_eq!(changed["enabled"], false);
    assert_eq!(app.get_json(&path).await, changed);

    assert_eq!(app.delete(&path).await.status(), StatusCode::NO_CONTENT);
    problem(app.get(&path).await, StatusCode::NOT_FOUND, "not_found").await;
    problem(app.delete(&path).await, StatusCode::NOT_FOUND, "not_found").await;

    // A key has fifty endpoints at most; another is refused, and made once one is deleted.
    let mut made = Vec::new();
    for _ in 0..50 {
        made.push(create_endpoint(app, json!({"url": url})).await);
    }
    let refused = app
        .post_json("/v1/webhook-endpoints", &json!({"url": url}))
        .await;
    problem(
        refused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "too_many_endpoints",
    )
    .await;
    assert_eq!(
        items(&app.get_json("/v1/webhook-endpoints").await).len(),
        50
    );
    let first = format!("/v1/webhook-endpoints/{}", id_of(&made[0]));
    assert_eq!(app.delete(&first).await.status(), StatusCode::NO_CONTENT);
    create_endpoint(app, json!({"url": url})).await;
}

backend_tests!(
    two_replicas_deliver_each_event_once_to_a_receiver_back_from_an_outage,
    |config: &mut Config| {
        to_test_receivers(config);
        config.webhooks.retry_schedule = vec![Duration::from_millis(200); 30];
    }
);
async fn two_replicas_deliver_each_event_once_to_a_receiver_back_from_an_outage(app: &TestApp) {
    // The receiver is down at first: its port is taken and let go, so connections are refused.
    let port = free_port();
    let url = format!("http://receiver.test:{port}/hook");
    create_endpoint(app, json!({"url": url, "event_types": ["job.succeeded"]})).await;
    // A second process on the same database, delivering too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = config_for(&app.database_url);
    point_at_emulator(&mut config, &app.fal, listener.local_addr().unwrap());
    to_test_receivers(&mut config);
    config.webhooks.retry_schedule = vec![Duration::from_millis(200); 30];
    let replica = falgate::app::App::build(config, listener).await.unwrap();

    let jobs: Vec<String> = futures_util::future::join_all(
        (0..8).map(|n| submit_raw(app, json!({"prompt": format!("outage {n}")}))),
    )
    .await;
    for job in &jobs {
        app.wait_for_status(job, "succeeded").await;
    }
    // Attempts fail while the receiver is down; then it comes back.
    eventually("failed attempts recorded")
        .until(async || {
            let endpoints = app.get_json("/v1/webhook-endpoints").await;
            let id = items(&endpoints)[0]["id"].as_str().unwrap().to_owned();
            let attempts = app
                .get_json(&format!("/v1/webhook-endpoints/{id}/deliveries"))
                .await;
            (items(&attempts).len() >= 8).then_some(())
        })
        .await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let (receiver, _) = Receiver::serve(listener, &[]);
    let received = receiver
        .until("every job's end delivered", |r| {
            jobs.iter().all(|job| ended(r, job))
        })
        .await;
    // Each event once: the two processes never sent the same delivery.
    let mut ids: Vec<&str> = received.iter().map(Received::webhook_id).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "an event delivered twice");
    assert_eq!(ids.len(), jobs.len());
    // And the attempts say so: one success per event.
    let endpoints = app.get_json("/v1/webhook-endpoints").await;
    let id = items(&endpoints)[0]["id"].as_str().unwrap().to_owned();
    eventually("every success recorded")
        .until(async || {
            let attempts = app
                .get_json(&format!("/v1/webhook-endpoints/{id}/deliveries"))
                .await;
            let succeeded = items(&attempts)
                .iter()
                .filter(|a| a["status_code"] == 200)
                .count();
            assert!(succeeded <= jobs.len(), "more successes than events");
            (succeeded == jobs.len()).then_some(())
        })
        .await;
    replica.shutdown().await;
}

backend_tests!(
    a_test_event_reaches_the_endpoint_tested_alone,
    to_test_receivers
);
async fn a_test_event_reaches_the_endpoint_tested_alone(app: &TestApp) {
    let (tested, tested_url) = Receiver::start(&[]).await;
    let (other, other_url) = Receiver::start(&[]).await;
    // Its filter does not hold a test back.
    let endpoint = create_endpoint(
        app,
        json!({"url": tested_url, "event_types": ["job.failed"], "description": "tried"}),
    )
    .await;
    create_endpoint(app, json!({"url": other_url})).await;
    let path = format!("/v1/webhook-endpoints/{}/test", id_of(&endpoint));
    let sent = std::time::Instant::now();
    assert_eq!(app.post(&path).await.status(), StatusCode::ACCEPTED);
    // One test a second at most.
    let again = app.post(&path).await;
    if sent.elapsed() < Duration::from_secs(1) {
        problem(again, StatusCode::TOO_MANY_REQUESTS, "too_many_tests").await;
    }

    let received = tested.until("the test event", |r| !r.is_empty()).await;
    let event = received[0].json();
    assert_eq!(event["type"], "webhook_endpoint.test");
    assert_eq!(event["data"]["id"], endpoint["id"]);
    assert_eq!(event["data"]["description"], "tried");
    assert!(event["data"].get("secret").is_none(), "{event}");
    assert!(received[0].verifies_with(endpoint["secret"].as_str().unwrap()));
    // Listed with the other events; the other endpoint got nothing.
    let listed = app.get_json("/v1/events?type=webhook_endpoint.test").await;
    assert_eq!(items(&listed).len(), 1);
    let job = submit_raw(app, json!({"prompt": "after the test"})).await;
    other.until("the job's end", |r| ended(r, &job)).await;
    assert!(
        other
            .received()
            .iter()
            .all(|r| r.json()["type"] != "webhook_endpoint.test")
    );

    // A disabled endpoint is not tried.
    app.request(
        reqwest::Method::PATCH,
        &format!("/v1/webhook-endpoints/{}", id_of(&endpoint)),
    )
    .json(&json!({"enabled": false}))
    .send()
    .await
    .unwrap();
    problem(
        app.post(&path).await,
        StatusCode::CONFLICT,
        "endpoint_disabled",
    )
    .await;
}

backend_tests!(
    a_webhook_given_with_a_request_tells_of_that_resource_alone,
    to_test_receivers
);
async fn a_webhook_given_with_a_request_tells_of_that_resource_alone(app: &TestApp) {
    let secret = app.get_json("/v1/webhooks/default-secret").await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(secret.starts_with("whsec_"));
    let (receiver, url) = Receiver::start(&[]).await;
    let response = app
        .post_json(
            "/v1/jobs",
            &json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "mine"},
                    "webhook": {"url": url}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job = id_of(&response.json().await.unwrap());
    let unwatched = submit_raw(app, json!({"prompt": "not watched"})).await;
    app.wait_for_status(&unwatched, "succeeded").await;
    let received = receiver.until("the job's end", |r| ended(r, &job)).await;
    assert!(
        received
            .iter()
            .all(|r| r.json()["data"]["id"] == job.as_str())
    );
    assert!(received.iter().all(|r| r.verifies_with(&secret)));
    // It is not one of the endpoints a client manages.
    assert_eq!(items(&app.get_json("/v1/webhook-endpoints").await).len(), 0);

    // A generation's webhook, filtered to the batch's completion.
    let (avatar, _) = crate::avatars::trained_with_lora_copy(app).await;
    let (batch_receiver, batch_url) = Receiver::start(&[]).await;
    let batch = generate(
        app,
        json!({"avatar_id": avatar, "prompts": ["one", "two"],
               "webhook": {"url": batch_url, "event_types": ["batch.completed"]}}),
    )
    .await;
    let told = batch_receiver
        .until("the batch's completion", |r| !r.is_empty())
        .await;
    let done = wait_for_batch(app, &id_of(&batch)).await;
    assert_eq!(types_of(&told), ["batch.completed"]);
    assert_eq!(told[0].json()["data"], done);

    // A webhook URL that may not be reached is refused with the rest of the request, and
    // nothing is made.
    let before = items(&app.get_json("/v1/jobs?limit=100").await).len();
    let response = app
        .post_json(
            "/v1/jobs",
            &json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "x"},
                    "webhook": {"url": "https://10.0.0.1/hook", "event_types": []}}),
        )
        .await;
    let problem = validation_problem(response).await;
    assert_eq!(fields(&problem), ["webhook.url", "webhook.event_types"]);
    assert_eq!(
        items(&app.get_json("/v1/jobs?limit=100").await).len(),
        before
    );
}

/// A receiver that takes every post and never answers; counts the posts under way.
async fn hanging_receiver() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let under_way = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let counted = under_way.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://receiver.test:{port}/hook"), under_way)
}

backend_tests!(
    a_receiver_that_never_answers_holds_up_no_other,
    |config: &mut Config| {
        to_test_receivers(config);
        // Longer than the test: without a bound per endpoint, the other receiver would wait.
        config.webhooks.timeout = Duration::from_secs(120);
    }
);
async fn a_receiver_that_never_answers_holds_up_no_other(app: &TestApp) {
    let (hanging_url, hanging) = hanging_receiver().await;
    let (receiver, url) = Receiver::start(&[]).await;
    create_endpoint(
        app,
        json!({"url": hanging_url, "event_types": ["job.succeeded"]}),
    )
    .await;
    create_endpoint(app, json!({"url": url, "event_types": ["job.succeeded"]})).await;
    let jobs: Vec<String> = futures_util::future::join_all(
        (0..40).map(|n| submit_raw(app, json!({"prompt": format!("crowd {n}")}))),
    )
    .await;
    receiver
        .until("every job's end at the answering receiver", |r| {
            jobs.iter().all(|job| ended(r, job))
        })
        .await;
    let held = hanging.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=8).contains(&held),
        "{held} posts held by the hanging receiver"
    );
}

backend_tests!(
    events_past_their_retention_go_unless_still_being_delivered_and_numbering_goes_on,
    |config: &mut Config| {
        to_test_receivers(config);
        // A failed attempt waits long for the next: its delivery is still under way.
        config.webhooks.retry_schedule = vec![Duration::from_secs(600)];
    }
);
async fn events_past_their_retention_go_unless_still_being_delivered_and_numbering_goes_on(
    app: &TestApp,
) {
    let (everything, everything_url) = Receiver::start(&[]).await;
    let all = create_endpoint(app, json!({"url": everything_url})).await;
    // Fails the first attempt of both jobs' ends.
    let (failing, failing_url) = Receiver::start(&[500, 500]).await;
    let retried = create_endpoint(
        app,
        json!({"url": failing_url, "event_types": ["job.succeeded"]}),
    )
    .await;
    let first = submit_raw(app, json!({"prompt": "its end is being sent"})).await;
    let (given, given_url) = Receiver::start(&[]).await;
    let response = app
        .post_json(
            "/v1/jobs",
            &json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "with a webhook"},
                    "webhook": {"url": given_url}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let with_webhook = id_of(&response.json().await.unwrap());
    everything
        .until("both jobs' ends", |r| {
            ended(r, &first) && ended(r, &with_webhook)
        })
        .await;
    given
        .until("its job's end", |r| ended(r, &with_webhook))
        .await;
    failing.until("two attempts", |r| r.len() == 2).await;
    let deliveries =
        |endpoint: &Value| format!("/v1/webhook-endpoints/{}/deliveries", id_of(endpoint));
    eventually("every attempt recorded")
        .until(async || {
            let told = items(&app.get_json(&deliveries(&all)).await).len();
            let failed = items(&app.get_json(&deliveries(&retried)).await).len();
            (told == everything.received().len() && failed == 2).then_some(())
        })
        .await;
    let before: Vec<Value> = items(&app.get_json("/v1/events?limit=100").await).clone();
    let last_sequence = before
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .max()
        .unwrap();

    let cutoff = chrono::Utc::now();
    let pruned = app.store().prune_events(cutoff).await.unwrap();
    // The endpoint given with the finished job goes; so does every event and delivery but
    // those still being retried, and their events.
    assert_eq!(pruned.endpoints, 1);
    assert_eq!(pruned.events as usize, before.len() - 2);
    let kept = items(&app.get_json("/v1/events?limit=100").await).clone();
    let mut ends: Vec<&str> = kept
        .iter()
        .inspect(|event| assert_eq!(event["type"], "job.succeeded"))
        .map(|event| event["data"]["id"].as_str().unwrap())
        .collect();
    ends.sort();
    let mut jobs = [first.as_str(), with_webhook.as_str()];
    jobs.sort();
    assert_eq!(ends, jobs);
    for gone in before.iter().filter(|e| !kept.contains(e)) {
        problem(
            app.get(&format!("/v1/events/{}", gone["id"].as_str().unwrap()))
                .await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    assert!(items(&app.get_json(&deliveries(&all)).await).is_empty());
    let retrying = items(&app.get_json(&deliveries(&retried)).await).clone();
    assert_eq!(retrying.len(), 2);
    assert!(retrying.iter().all(|a| a["delivery_status"] == "pending"));
    // Nothing more is old enough.
    assert_eq!(
        app.store().prune_events(cutoff).await.unwrap(),
        Default::default()
    );

    // A redelivery passes over the endpoint the event is still being sent to.
    let again: Value = app
        .post(&format!(
            "/v1/events/{}/redeliver",
            kept[0]["id"].as_str().unwrap()
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again, json!({"deliveries": 1, "already_under_way": 1}));
    let told_before = everything.received().len();
    let resent = everything
        .until("the event again", |r| r.len() > told_before)
        .await;
    assert_eq!(
        resent.last().unwrap().webhook_id(),
        kept[0]["id"].as_str().unwrap()
    );
    assert_eq!(
        items(&app.get_json(&deliveries(&retried)).await).len(),
        2,
        "no new attempt to the endpoint still retrying"
    );

    // Numbers are never given twice: the next event follows the last removed one.
    let next = submit_raw(app, json!({"prompt": "after"})).await;
    app.wait_for_status(&next, "succeeded").await;
    let page = app
        .get_json(&format!("/v1/events?resource_id={next}"))
        .await;
    let first = items(&page)[0]["sequence"].as_i64().unwrap();
    assert_eq!(first, last_sequence + 1);
}
