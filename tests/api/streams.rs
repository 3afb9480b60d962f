//! Event streams: replay from `Last-Event-ID`, then live; a job's and a batch's end with them.

use crate::backend_tests;
use crate::support::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// One message of an event stream.
#[derive(Debug, Clone, PartialEq)]
enum Message {
    Event {
        id: i64,
        kind: String,
        data: Value,
    },
    /// A comment line (a keep-alive).
    Comment,
}

/// Reads a `text/event-stream` response message by message.
pub(crate) struct Reader {
    response: reqwest::Response,
    buffer: String,
}

impl Reader {
    async fn open(app: &TestApp, path: &str, last_event_id: Option<&str>) -> Self {
        Self::open_at(app, &app.url(path), last_event_id).await
    }

    /// [`Reader::open`] at a full URL (another process's, say), with the test's key.
    pub(crate) async fn open_at(app: &TestApp, url: &str, last_event_id: Option<&str>) -> Self {
        let mut request = app
            .client
            .get(url)
            .bearer_auth(&app.key)
            // Streams outlive the client's usual request timeout.
            .timeout(Duration::from_secs(600));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next message; `None` once the stream has ended. Fails past a deadline.
    async fn next(&mut self) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(20), self.read())
            .await
            .expect("a message or the end of the stream within 20 s")
    }

    async fn read(&mut self) -> Option<Message> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return Some(parse(&block));
            }
            let chunk = self.response.chunk().await.expect("read the stream")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// The next event, passing over keep-alives; `None` once the stream has ended.
    pub(crate) async fn next_event(&mut self) -> Option<(i64, String, Value)> {
        loop {
            match self.next().await? {
                Message::Event { id, kind, data } => return Some((id, kind, data)),
                Message::Comment => continue,
            }
        }
    }

    /// Every event until the stream ends.
    async fn until_it_ends(&mut self) -> Vec<(i64, String, Value)> {
        let mut events = Vec::new();
        while let Some(event) = self.next_event().await {
            events.push(event);
        }
        events
    }
}

fn parse(block: &str) -> Message {
    let (mut id, mut kind, mut data) = (None, None, String::new());
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.parse().expect("a numeric id")),
            "event" => kind = Some(value.to_owned()),
            "data" => data.push_str(value),
            other => panic!("unexpected field {other} in {block:?}"),
        }
    }
    match id {
        Some(id) => Message::Event {
            id,
            kind: kind.expect("an event type"),
            data: serde_json::from_str(&data).expect("JSON data"),
        },
        None => Message::Comment,
    }
}

fn ids(events: &[(i64, String, Value)]) -> Vec<i64> {
    events.iter().map(|(id, _, _)| *id).collect()
}

backend_tests!(a_jobs_stream_follows_it_live_and_ends_after_its_last_event);
async fn a_jobs_stream_follows_it_live_and_ends_after_its_last_event(app: &TestApp) {
    let id = submit_raw(app, json!({"prompt": "followed"})).await;
    let path = format!("/v1/jobs/{id}/events");
    let events = Reader::open(app, &path, None).await.until_it_ends().await;

    let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_told_a_succeeding_job(&kinds);
    assert!(ids(&events).windows(2).all(|w| w[0] < w[1]));
    // Each message is the event as the API shows it, its id the event's sequence.
    for (sequence, kind, data) in &events {
        assert_eq!(data["sequence"], *sequence);
        assert_eq!(data["type"], kind.as_str());
        assert_eq!(
            data,
            &app.get_json(&format!("/v1/events/{}", data["id"].as_str().unwrap()))
                .await
        );
    }

    // Reconnecting after the first event replays the rest and ends; after the last, it ends
    // at once.
    let first = events[0].0.to_string();
    let rest = Reader::open(app, &path, Some(&first))
        .await
        .until_it_ends()
        .await;
    assert_eq!(rest, events[1..].to_vec());
    let last = events.last().unwrap().0.to_string();
    assert_eq!(
        Reader::open(app, &path, Some(&last))
            .await
            .until_it_ends()
            .await,
        []
    );
    // `after` does what the header does; the header wins.
    let by_query = Reader::open(app, &format!("{path}?after={first}"), None)
        .await
        .until_it_ends()
        .await;
    assert_eq!(by_query, events[1..].to_vec());
    let header_wins = Reader::open(app, &format!("{path}?after=0"), Some(&last))
        .await
        .until_it_ends()
        .await;
    assert_eq!(header_wins, []);
}

backend_tests!(a_stream_resumed_from_its_last_event_id_loses_and_repeats_nothing);
async fn a_stream_resumed_from_its_last_event_id_loses_and_repeats_nothing(app: &TestApp) {
    let mut stream = Reader::open(app, "/v1/events/stream", None).await;
    let first_jobs: Vec<String> = futures_util::future::join_all(
        (0..3).map(|n| submit_raw(app, json!({"prompt": format!("first {n}")}))),
    )
    .await;
    let mut seen = vec![stream.next_event().await.unwrap()];
    seen.push(stream.next_event().await.unwrap());
    // The client goes away mid-way; more happens while it is gone.
    drop(stream);
    let more_jobs: Vec<String> = futures_util::future::join_all(
        (0..3).map(|n| submit_raw(app, json!({"prompt": format!("more {n}")}))),
    )
    .await;
    for id in first_jobs.iter().chain(&more_jobs) {
        app.wait_for_status(id, "succeeded").await;
    }
    let all = eventually("every job's end listed")
        .until(async || {
            let page = app.get_json("/v1/events?limit=100").await;
            let items = page["items"].as_array().unwrap().clone();
            let ended = items
                .iter()
                .filter(|e| e["type"] == "job.succeeded")
                .count();
            (ended == 6).then_some(items)
        })
        .await;

    let last_seen = seen.last().unwrap().0.to_string();
    let mut resumed = Reader::open(app, "/v1/events/stream", Some(&last_seen)).await;
    while seen.len() < all.len() {
        seen.push(
            resumed
                .next_event()
                .await
                .expect("the tenant's stream does not end"),
        );
    }
    let listed: Vec<i64> = all
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(ids(&seen), listed, "every event once, in order");
    for ((_, _, data), listed) in seen.iter().zip(&all) {
        assert_eq!(data, listed);
    }
}

backend_tests!(a_batchs_stream_carries_its_jobs_and_ends_when_it_completes);
async fn a_batchs_stream_carries_its_jobs_and_ends_when_it_completes(app: &TestApp) {
    let (avatar, _) = crate::avatars::trained_with_lora_copy(app).await;
    let batch = generate(
        app,
        json!({"avatar_id": avatar, "prompts": ["one", "two", "three"]}),
    )
    .await;
    let batch_id = id_of(&batch);
    let events = Reader::open(app, &format!("/v1/batches/{batch_id}/events"), None)
        .await
        .until_it_ends()
        .await;
    let (_, last_kind, last) = events.last().unwrap();
    assert_eq!(last_kind, "batch.completed");
    assert_eq!(
        last["data"],
        app.get_json(&format!("/v1/batches/{batch_id}")).await
    );
    let jobs: Vec<&Value> = batch["jobs"].as_array().unwrap().iter().collect();
    for job in jobs {
        let ended = events
            .iter()
            .filter(|(_, kind, data)| kind == "job.succeeded" && data["data"]["id"] == job["id"])
            .count();
        assert_eq!(ended, 1, "job {}", job["id"]);
    }
}

backend_tests!(
    a_quiet_stream_sends_keep_alives,
    |config: &mut falgate::config::Config| {
        config.connections.stream_keep_alive = Duration::from_secs(1);
    }
);
async fn a_quiet_stream_sends_keep_alives(app: &TestApp) {
    let mut stream = Reader::open(app, "/v1/events/stream", None).await;
    assert_eq!(stream.next().await, Some(Message::Comment));
    assert_eq!(stream.next().await, Some(Message::Comment));
}

backend_tests!(streams_refuse_what_they_cannot_follow);
async fn streams_refuse_what_they_cannot_follow(app: &TestApp) {
    let unknown = uuid::Uuid::now_v7();
    problem(
        app.get(&format!("/v1/jobs/{unknown}/events")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        app.get(&format!("/v1/batches/{unknown}/events")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // Another tenant's job is not found either.
    let id = submit_raw(app, json!({"prompt": "mine"})).await;
    let other = app.new_key("other").await;
    problem(
        app.get_as(&other, &format!("/v1/jobs/{id}/events")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    for bad in ["x", "-1", "1.5", ""] {
        let response = app
            .request(reqwest::Method::GET, "/v1/events/stream")
            .header("Last-Event-ID", bad)
            .send()
            .await
            .unwrap();
        let problem = validation_problem(response).await;
        assert_eq!(fields(&problem), ["Last-Event-ID"], "{bad:?}");
    }
    assert_queries_refused(
        app,
        &[
            ("/v1/events/stream?after=-1", &["after"]),
            ("/v1/events/stream?colour=red", &["colour"]),
        ],
    )
    .await;
}
