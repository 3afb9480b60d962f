//! Event streams: replay from `Last-Event-ID`, then live; a job's and a batch's end with them.

use crate::backend_tests;
use crate::support::*;
use falgate::emulator::Durations;
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
    /// FAL's progress of a job: a message with a type and no id, not an event.
    Progress(Value),
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

    /// The next event, passing over keep-alives and progress; `None` once the stream has
    /// ended.
    pub(crate) async fn next_event(&mut self) -> Option<(i64, String, Value)> {
        loop {
            match self.next().await? {
                Message::Event { id, kind, data } => return Some((id, kind, data)),
                Message::Progress(_) | Message::Comment => continue,
            }
        }
    }

    /// The next event or progress message, passing over keep-alives.
    async fn next_told(&mut self) -> Option<Message> {
        loop {
            match self.next().await? {
                Message::Comment => continue,
                told => return Some(told),
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
    match (id, kind) {
        (Some(id), kind) => Message::Event {
            id,
            kind: kind.expect("an event type"),
            data: serde_json::from_str(&data).expect("JSON data"),
        },
        (None, Some(kind)) => {
            assert_eq!(kind, "job.progress", "{block:?}");
            Message::Progress(serde_json::from_str(&data).expect("JSON data"))
        }
        (None, None) => Message::Comment,
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

/// Reads FAL's status every tenth of a second for followed jobs.
fn reading_progress_often(config: &mut falgate::config::Config) {
    config.connections.stream_progress = Duration::from_millis(100);
}

backend_tests!(
    a_jobs_stream_tells_its_place_in_fals_queue_and_its_log_lines,
    reading_progress_often
);
async fn a_jobs_stream_tells_its_place_in_fals_queue_and_its_log_lines(app: &TestApp) {
    app.fal.set_all_durations(Durations::new(600_000, 600_000));
    // Two requests ahead of it in FAL's queue, sent one after the other.
    let mut ahead = Vec::new();
    for prompt in ["first", "second"] {
        let id = submit_raw(app, json!({"prompt": prompt})).await;
        ahead.push(app.wait_for_status(&id, "submitted").await);
    }
    let id = submit_raw(app, json!({"prompt": "third"})).await;
    let job = app.wait_for_status(&id, "submitted").await;
    let request = job["fal_request_id"].as_str().unwrap().to_owned();
    let mut stream = Reader::open(app, &format!("/v1/jobs/{id}/events"), None).await;

    let mut told: Vec<Value> = Vec::new();
    // Reads until a progress message satisfies `until`, keeping every one.
    async fn progress_until(
        stream: &mut Reader,
        told: &mut Vec<Value>,
        until: impl Fn(&Value) -> bool,
    ) {
        loop {
            match stream.next_told().await.expect("the stream goes on") {
                Message::Progress(progress) => {
                    let done = until(&progress);
                    told.push(progress);
                    if done {
                        return;
                    }
                }
                Message::Event { kind, .. } => assert_eq!(kind, "job.submitted"),
                Message::Comment => unreachable!(),
            }
        }
    }
    progress_until(&mut stream, &mut told, |p| {
        p["fal_status"] == "in_queue" && p["queue_position"] == 2
    })
    .await;
    // The first request ahead finishes: one place forward.
    let first_request = ahead[0]["fal_request_id"].as_str().unwrap();
    app.fal
        .set_request_durations(first_request, Durations::new(0, 0));
    progress_until(&mut stream, &mut told, |p| p["queue_position"] == 1).await;
    // Its turn: it runs, and its log starts.
    app.fal
        .set_request_durations(&request, Durations::new(0, 600_000));
    progress_until(&mut stream, &mut told, |p| {
        p["fal_status"] == "in_progress"
            && p["logs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|line| line["message"] == "Request started")
    })
    .await;
    // It finishes: the stream ends with the job's last event.
    app.fal
        .set_request_durations(&request, Durations::new(0, 0));
    let mut last = None;
    while let Some(message) = stream.next_told().await {
        match message {
            Message::Progress(progress) => told.push(progress),
            Message::Event { kind, .. } => last = Some(kind),
            Message::Comment => unreachable!(),
        }
    }
    assert_eq!(last.as_deref(), Some("job.succeeded"));

    for progress in &told {
        assert_eq!(progress["job_id"], id.as_str());
        assert_eq!(progress["logs_skipped"], 0);
        // A place in the queue is told only while the job waits there.
        assert_eq!(
            progress.get("queue_position").is_some(),
            progress["fal_status"] == "in_queue",
            "{progress}"
        );
    }
    // The places only go forward.
    let places: Vec<u64> = told
        .iter()
        .filter_map(|p| p.get("queue_position").and_then(Value::as_u64))
        .collect();
    assert!(places.windows(2).all(|w| w[0] >= w[1]), "{places:?}");
    // Each of FAL's log lines is told once, in FAL's order: all of them, or all but those FAL
    // wrote as the job ended (when its end was recorded before they were read).
    let lines: Vec<&str> = told
        .iter()
        .flat_map(|p| p["logs"].as_array().unwrap())
        .map(|line| line["message"].as_str().unwrap())
        .collect();
    let fals_log = ["Request started", "Running inference", "Request completed"];
    assert!(
        !lines.is_empty() && fals_log.starts_with(&lines),
        "told {lines:?} of {fals_log:?}"
    );
    for line in told.iter().flat_map(|p| p["logs"].as_array().unwrap()) {
        assert!(line["timestamp"].is_string(), "{line}");
    }
}

backend_tests!(
    a_batchs_stream_tells_the_progress_of_its_jobs,
    reading_progress_often
);
async fn a_batchs_stream_tells_the_progress_of_its_jobs(app: &TestApp) {
    let (avatar, _) = crate::avatars::trained_with_lora_copy(app).await;
    app.fal.set_all_durations(Durations::new(0, 600_000));
    let batch = generate(app, json!({"avatar_id": avatar, "prompts": ["one", "two"]})).await;
    let batch_id = id_of(&batch);
    let jobs: Vec<String> = batch["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap().to_owned())
        .collect();
    let mut stream = Reader::open(app, &format!("/v1/batches/{batch_id}/events"), None).await;
    // Each running job's log is told.
    let mut started = std::collections::HashSet::new();
    while started.len() < jobs.len() {
        if let Message::Progress(progress) = stream.next_told().await.expect("the stream goes on")
            && progress["fal_status"] == "in_progress"
            && !progress["logs"].as_array().unwrap().is_empty()
        {
            started.insert(progress["job_id"].as_str().unwrap().to_owned());
        }
    }
    let mut expected: Vec<String> = jobs.clone();
    expected.sort();
    let mut started: Vec<String> = started.into_iter().collect();
    started.sort();
    assert_eq!(started, expected);
    app.fal.set_all_durations(Durations::new(0, 0));
    let rest = stream.until_it_ends().await;
    assert_eq!(rest.last().unwrap().1, "batch.completed");
}

backend_tests!(
    the_tenants_stream_carries_events_only,
    reading_progress_often
);
async fn the_tenants_stream_carries_events_only(app: &TestApp) {
    app.fal.set_all_durations(Durations::new(0, 2_000));
    let mut stream = Reader::open(app, "/v1/events/stream", None).await;
    let id = submit_raw(app, json!({"prompt": "quiet"})).await;
    loop {
        match stream.next_told().await.expect("the stream goes on") {
            Message::Progress(progress) => panic!("progress on the tenant's stream: {progress}"),
            Message::Event { kind, data, .. } => {
                if kind == "job.succeeded" && data["data"]["id"] == id.as_str() {
                    break;
                }
            }
            Message::Comment => unreachable!(),
        }
    }
}

backend_tests!(
    an_api_key_may_hold_thirty_two_streams_open_and_one_more_once_one_closes,
    |config: &mut falgate::config::Config| {
        // Closed connections are noticed at the next keep-alive.
        config.connections.stream_keep_alive = Duration::from_millis(200);
    }
);
async fn an_api_key_may_hold_thirty_two_streams_open_and_one_more_once_one_closes(app: &TestApp) {
    let mut open = Vec::new();
    for _ in 0..32 {
        open.push(Reader::open(app, "/v1/events/stream", None).await);
    }
    let id = submit_raw(app, json!({"prompt": "busy"})).await;
    for path in [
        "/v1/events/stream".to_owned(),
        format!("/v1/jobs/{id}/events"),
    ] {
        let refused = problem(
            app.get(&path).await,
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
        )
        .await;
        assert!(
            refused["detail"].as_str().unwrap().contains("32"),
            "{refused}"
        );
    }
    // Another key is not held back by this one's.
    let other = app.new_key("other").await;
    let response = app.get_as(&other, "/v1/events/stream").await;
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    // Once a stream closes, its place is free again.
    drop(open.pop());
    eventually("a place for one more stream")
        .until(async || {
            let response = app.get("/v1/events/stream").await;
            (response.status() == StatusCode::OK).then_some(())
        })
        .await;
}

backend_tests!(
    fal_is_asked_once_per_job_however_many_follow_it_and_not_after_they_leave,
    |config: &mut falgate::config::Config| {
        reading_progress_often(config);
        // Closed connections are noticed at the next keep-alive.
        config.connections.stream_keep_alive = Duration::from_millis(200);
    }
);
async fn fal_is_asked_once_per_job_however_many_follow_it_and_not_after_they_leave(app: &TestApp) {
    app.fal.set_all_durations(Durations::new(0, 600_000));
    let id = submit_raw(app, json!({"prompt": "watched"})).await;
    app.wait_for_status(&id, "submitted").await;
    let path = format!("/v1/jobs/{id}/events");
    let mut streams = vec![
        Reader::open(app, &path, None).await,
        Reader::open(app, &path, None).await,
    ];
    for stream in &mut streams {
        // Each is told the job's log so far.
        loop {
            if let Message::Progress(progress) = stream.next_told().await.unwrap()
                && progress["fal_status"] == "in_progress"
            {
                assert_eq!(progress["logs"][0]["message"], "Request started");
                break;
            }
        }
    }
    let progress = &app.app.state().progress;
    assert_eq!(progress.reading(), 1);
    drop(streams);
    eventually("FAL's status no longer read")
        .until(async || (progress.reading() == 0).then_some(()))
        .await;
}
