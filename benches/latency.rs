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
//! - baseline: the client sends `POST /bare` → 200 after one `INSERT`.

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
        if i >= WARMUP {
            sent_to_submit.push(submit.at.duration_since(sent).unwrap_or_default());
            accepted_to_submit.push(submit.at.duration_since(accepted).unwrap_or_default());
            callback.push(
                attempt
                    .at
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

    app.shutdown().await;
    fal.shutdown().await;
    database.remove().await;
}
