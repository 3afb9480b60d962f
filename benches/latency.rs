//! Latency of the happy path, beside a baseline: a bare axum handler doing one insert into the
//! same database. Run with `cargo bench --bench latency` (SQLite), or with
//! `FALGATE_BENCH_POSTGRES_URL=postgres://…/postgres` for PostgreSQL (a fresh database is made
//! on that server for the run and dropped after).
//!
//! Measured, over loopback with the emulator answering at once:
//! - submit: the client sends `POST /v1/jobs` → the emulator receives the FAL submit
//!   (the 202 is sent in between; "202 → submit" itself is also printed);
//! - callback: the emulator sends the signed callback → falgate answers 200, which it does only
//!   after the job is `succeeded` in the database;
//! - baseline: the client sends `POST /bare` → 200 after one `INSERT`;
//! - told: from the emulator sending the callback to a webhook receiver on loopback having the
//!   `job.succeeded` event, and to a client of `GET /v1/events/stream` having it;
//! - deliveries: every `job.succeeded` event redelivered to ten endpoints of a fast receiver,
//!   and the deliveries per second until the receiver has them all.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use falgate::app::App;
use falgate::emulator::{Durations, EmulatorConfig};
use std::time::{Duration, Instant, SystemTime};
use support::{Database, Pool, on_pool};

mod support;

const WARMUP: usize = 20;
const RUNS: usize = 300;
/// Endpoints the deliveries phase sends each event to.
const ENDPOINTS: usize = 10;

/// When each `job.succeeded` event reached a listener, by job id.
type Arrivals =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<SystemTime>>>>;

fn note_arrival(arrivals: &Arrivals, event: &serde_json::Value) {
    if event["type"] == "job.succeeded"
        && let Some(job) = event["data"]["id"].as_str()
    {
        arrivals
            .lock()
            .unwrap()
            .entry(job.to_owned())
            .or_default()
            .push(SystemTime::now());
    }
}

async fn receive_webhook(State(arrivals): State<Arrivals>, body: String) -> &'static str {
    let event: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    note_arrival(&arrivals, &event);
    "ok"
}

/// Follows the tenant's event stream, noting each arrival.
async fn follow_stream(client: reqwest::Client, url: String, key: String, arrivals: Arrivals) {
    let mut response = client.get(url).bearer_auth(key).send().await.unwrap();
    let mut buffer = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                let event: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
                note_arrival(&arrivals, &event);
            }
        }
    }
}

/// Waits until `arrivals` holds `count` arrivals for `job`; answers the first.
async fn arrived(arrivals: &Arrivals, job: &str, count: usize) -> SystemTime {
    loop {
        if let Some(times) = arrivals.lock().unwrap().get(job)
            && times.len() >= count
        {
            return times[0];
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(
    name: &str,
    mut samples: Vec<Duration>,
    baseline: Option<(Duration, Duration)>,
) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    let ratio = baseline
        .map(|(b50, b99)| {
            format!(
                "  ratio to baseline: p50 {:.2}x, p99 {:.2}x",
                p50.as_secs_f64() / b50.as_secs_f64(),
                p99.as_secs_f64() / b99.as_secs_f64()
            )
        })
        .unwrap_or_default();
    println!(
        "{name:<34} n={:<4} p50 {:>8.3} ms  p99 {:>8.3} ms{ratio}",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    (p50, p99)
}

async fn bare_insert(State(db): State<Pool>) -> &'static str {
    let id = uuid::Uuid::now_v7();
    let body = serde_json::json!({"prompt": "bench"});
    let at = chrono::Utc::now();
    on_pool!(&db, |pool| sqlx::query(
        "INSERT INTO bench_rows (id, input, created_at) VALUES ($1, $2, $3)"
    )
    .bind(id)
    .bind(sqlx::types::Json(&body))
    .bind(at)
    .execute(pool)
    .await
    .map(drop))
    .expect("insert");
    "ok"
}

fn main() {
    falgate::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let (database, database_url) = Database::create("falgate_latency").await;
    let backend = database.backend();
    let client = reqwest::Client::new();

    // Baseline: the same database, one insert per request.
    let bare = Pool::connect(&database, &database_url).await;
    bare.create_bench_rows("id {id} PRIMARY KEY, input {json}, created_at {at}")
        .await;
    let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bare_addr = bare_listener.local_addr().unwrap();
    let router = Router::new()
        .route("/bare", post(bare_insert))
        .with_state(bare);
    tokio::spawn(async move { axum::serve(bare_listener, router).await });

    // falgate against the emulator, which answers at once.
    let fal = falgate::emulator::spawn(
        EmulatorConfig::fast(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    fal.set_all_durations(Durations::new(0, 0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = support::config_against(&database_url, &fal, addr);
    // The reconciler stays out of the way: every job here ends through its callback.
    config.workers.callback_grace = Duration::from_secs(600);
    let app = App::build(config, listener).await.unwrap();
    let (_, key) = app.store().issue_api_key("bench").await.unwrap();

    // A webhook receiver and a stream client, each noting when a job's end reaches it.
    let webhooks: Arrivals = Default::default();
    let receiver_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver_addr = receiver_listener.local_addr().unwrap();
    let receiver = Router::new()
        .route("/hook", post(receive_webhook))
        .with_state(webhooks.clone());
    tokio::spawn(async move { axum::serve(receiver_listener, receiver).await });
    let endpoint = client
        .post(format!("http://{addr}/v1/webhook-endpoints"))
        .bearer_auth(&key.secret)
        .json(&serde_json::json!({"url": format!("http://{receiver_addr}/hook"), "event_types": ["job.succeeded"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(endpoint.status().as_u16(), 201);
    let streamed: Arrivals = Default::default();
    tokio::spawn(follow_stream(
        client.clone(),
        format!("http://{addr}/v1/events/stream"),
        key.secret.clone(),
        streamed.clone(),
    ));

    let mut baseline = Vec::new();
    for i in 0..WARMUP + RUNS {
        let started = Instant::now();
        let response = client
            .post(format!("http://{bare_addr}/bare"))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        if i >= WARMUP {
            baseline.push(started.elapsed());
        }
    }

    let mut sent_to_submit = Vec::new();
    let mut accepted_to_submit = Vec::new();
    let mut callback = Vec::new();
    let mut to_webhook = Vec::new();
    let mut to_stream = Vec::new();
    let mut ended = Vec::new();
    for i in 0..WARMUP + RUNS {
        let sent = SystemTime::now();
        let response = client
            .post(format!("http://{addr}/v1/jobs"))
            .bearer_auth(&key.secret)
            .json(&serde_json::json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": format!("bench {i}"), "image_size": {"width": 64, "height": 64}}}))
            .send()
            .await
            .unwrap();
        let accepted = SystemTime::now();
        assert_eq!(response.status().as_u16(), 202);
        let job: serde_json::Value = response.json().await.unwrap();
        let id = job["id"].as_str().unwrap().to_owned();
        // Wait for this job's callback to be answered before the next request, so that runs
        // do not overlap.
        let attempt = loop {
            let found = fal
                .callback_attempts()
                .into_iter()
                .find(|a| a.url.contains(&id));
            if let Some(attempt) = found.filter(|a| a.status.is_some()) {
                break attempt;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        assert_eq!(attempt.status, Some(200));
        let submit = fal
            .submits()
            .into_iter()
            .find(|s| s.webhook.as_deref().is_some_and(|w| w.contains(&id)))
            .unwrap();
        let webhook_at = arrived(&webhooks, &id, 1).await;
        let stream_at = arrived(&streamed, &id, 1).await;
        ended.push(id.clone());
        if i >= WARMUP {
            sent_to_submit.push(submit.at.duration_since(sent).unwrap_or_default());
            accepted_to_submit.push(submit.at.duration_since(accepted).unwrap_or_default());
            callback.push(
                attempt
                    .at
                    .duration_since(attempt.sent_at)
                    .unwrap_or_default(),
            );
            to_webhook.push(
                webhook_at
                    .duration_since(attempt.sent_at)
                    .unwrap_or_default(),
            );
            to_stream.push(
                stream_at
                    .duration_since(attempt.sent_at)
                    .unwrap_or_default(),
            );
        }
    }

    println!("backend: {backend}; {RUNS} sequential runs after {WARMUP} warm-up runs");
    let base = report("baseline: bare axum + 1 INSERT", baseline, None);
    report(
        "submit: POST /v1/jobs -> FAL submit",
        sent_to_submit,
        Some(base),
    );
    report("202 received -> FAL submit", accepted_to_submit, None);
    report("callback -> job succeeded (200)", callback, Some(base));
    report("callback -> webhook received", to_webhook, None);
    report("callback -> stream client has it", to_stream, None);

    // Deliveries per second: every job's end sent again to ten endpoints of the receiver.
    for _ in 1..ENDPOINTS {
        client
            .post(format!("http://{addr}/v1/webhook-endpoints"))
            .bearer_auth(&key.secret)
            .json(&serde_json::json!({"url": format!("http://{receiver_addr}/hook"), "event_types": ["job.succeeded"]}))
            .send()
            .await
            .unwrap();
    }
    let page =
        |after: i64| format!("http://{addr}/v1/events?type=job.succeeded&limit=100&after={after}");
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let listed: serde_json::Value = client
            .get(page(after))
            .bearer_auth(&key.secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let items = listed["items"].as_array().unwrap();
        events.extend(items.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        after = items
            .last()
            .map_or(after, |e| e["sequence"].as_i64().unwrap());
        if listed["has_more"] != true {
            break;
        }
    }
    let started = Instant::now();
    for event in &events {
        client
            .post(format!("http://{addr}/v1/events/{event}/redeliver"))
            .bearer_auth(&key.secret)
            .send()
            .await
            .unwrap();
    }
    for job in &ended {
        arrived(&webhooks, job, 1 + ENDPOINTS).await;
    }
    let took = started.elapsed();
    let deliveries = events.len() * ENDPOINTS;
    println!(
        "deliveries to a fast receiver: {deliveries} in {:.2} s, {:.0} per second",
        took.as_secs_f64(),
        deliveries as f64 / took.as_secs_f64()
    );

    app.shutdown().await;
    fal.shutdown().await;
    database.remove().await;
}
