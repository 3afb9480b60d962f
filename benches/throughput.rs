//! Intake throughput at the database's ceiling: `POST /v1/jobs` beside a bare axum handler on
//! the same database, under the same closed-loop load. Run with
//! `cargo bench --bench throughput` (SQLite, a fresh file), or with
//! `FALGATE_BENCH_POSTGRES_URL=postgres://…/postgres` for PostgreSQL (a fresh database is made on
//! that server for the run and dropped after). `FALGATE_BENCH_SECS` sets the measured time per
//! target (default 10), `FALGATE_BENCH_CONNECTIONS` the connections (default 32),
//! `FALGATE_BENCH_ROUNDS` how many times bare and intake take turns (default 3), and
//! `FALGATE_BENCH_DEPLOYED=0` skips the deployed run.
//!
//! The load, like wrk's: one client thread with its own current-thread runtime drives
//! `CONNECTIONS` keep-alive HTTP/1.1 connections over loopback, each sending its next request as
//! soon as the previous answer is read. Each target gets a warm-up (not counted), then a fixed
//! measured time; requests still out when it ends are not counted.
//!
//! Measured, for each target: completed requests per second, p50 and p99 of the time from
//! sending a request to having read its whole answer, and errors (transport failures or any
//! non-2xx answer).
//! - bare: `POST /bare` with the same JSON body → the handler parses it, `INSERT`s one row into
//!   a table of the same database, and answers 202;
//! - falgate intake: `POST /v1/jobs` with a realistic generation job: API-key authentication,
//!   validation, the job and its first history row stored durably, the 202 with the job. The
//!   workers are off, so that what is measured is intake, as the bare handler's is;
//! - falgate deployed: the same with the workers on and FAL the in-process emulator answering at
//!   once, so that every job is also claimed, submitted, and ended by its signed callback while
//!   the load runs, on the same two cores and the same database. This is the whole pipeline's
//!   throughput, not intake's: each job costs it several writes and three HTTP exchanges more.
//!
//! Bare and intake alternate for the rounds; the ratio judged is the median of the rounds'
//! ratios of throughput and of p99.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use falgate::app::App;
use falgate::emulator::{Durations, EmulatorConfig, EmulatorHandle};
use std::time::{Duration, Instant};
use support::{Database, Pool, on_pool};

mod support;

const WARMUP: Duration = Duration::from_secs(2);

/// What one target answered under load.
struct Run {
    name: &'static str,
    completed: usize,
    errors: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self) {
        println!(
            "{:<24} {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
            self.name,
            self.per_second(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.errors
        );
    }

    fn print_ratio_to(&self, bare: &Run) {
        println!(
            "{:<24} throughput {:>5.1} % of bare, p99 {:.2}x bare's",
            format!("{} / bare", self.name),
            100.0 * self.per_second() / bare.per_second(),
            self.p99.as_secs_f64() / bare.p99.as_secs_f64()
        );
    }
}

/// One request of the load: where, with which key, and the body.
#[derive(Clone)]
struct Target {
    url: String,
    bearer: Option<String>,
    body: String,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// A generation job as a client sends it: a prompt, the usual knobs, and a LoRA.
fn job_body(n: usize) -> String {
    serde_json::json!({
        "endpoint": "fal-ai/flux-lora",
        "input": {
            "prompt": format!(
                "portrait photo of sks person {n}, golden hour, 85mm lens, shallow depth of field"
            ),
            "image_size": {"width": 1024, "height": 1024},
            "num_inference_steps": 28,
            "guidance_scale": 3.5,
            "num_images": 1,
            "enable_safety_checker": true,
            "output_format": "jpeg",
            "loras": [{"path": "https://v3.fal.media/files/bench/pytorch_lora_weights.safetensors", "scale": 1.0}]
        }
    })
    .to_string()
}

/// Drives `connections` keep-alive connections from one client thread with its own
/// current-thread runtime, for the warm-up and then `measured`.
fn load(name: &'static str, target: Target, connections: usize, measured: Duration) -> Run {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        runtime.block_on(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(connections)
                .http1_only()
                .build()
                .expect("client");
            let start = Instant::now();
            let counted_from = start + WARMUP;
            let end = counted_from + measured;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..connections {
                let (client, target) = (client.clone(), target.clone());
                tasks.spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0usize;
                    while Instant::now() < end {
                        let sent = Instant::now();
                        let mut request = client
                            .post(&target.url)
                            .header("content-type", "application/json")
                            .body(target.body.clone());
                        if let Some(key) = &target.bearer {
                            request = request.bearer_auth(key);
                        }
                        let ok = match request.send().await {
                            Ok(response) => {
                                let success = response.status().is_success();
                                response.bytes().await.is_ok() && success
                            }
                            Err(_) => false,
                        };
                        let done = Instant::now();
                        if sent >= counted_from && done <= end {
                            if ok {
                                latencies.push(done - sent);
                            } else {
                                errors += 1;
                            }
                        }
                    }
                    (latencies, errors)
                });
            }
            let mut latencies = Vec::new();
            let mut errors = 0;
            while let Some(joined) = tasks.join_next().await {
                let (some, failed) = joined.expect("load task");
                latencies.extend(some);
                errors += failed;
            }
            latencies.sort();
            Run {
                name,
                completed: latencies.len(),
                errors,
                elapsed: measured,
                p50: percentile(&latencies, 0.5),
                p99: percentile(&latencies, 0.99),
            }
        })
    })
    .join()
    .expect("load thread")
}

#[derive(serde::Deserialize)]
struct BareJob {
    endpoint: String,
    input: serde_json::Value,
}

async fn bare_insert(State(db): State<Pool>, body: axum::Json<BareJob>) -> StatusCode {
    let job = body.0;
    let id = uuid::Uuid::now_v7();
    let at = chrono::Utc::now();
    let sql = "INSERT INTO bench_rows (id, endpoint, input, created_at) VALUES ($1, $2, $3, $4)";
    let inserted = on_pool!(&db, |pool| sqlx::query(sql)
        .bind(id)
        .bind(&job.endpoint)
        .bind(sqlx::types::Json(&job.input))
        .bind(at)
        .execute(pool)
        .await
        .map(drop));
    match inserted {
        Ok(()) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// falgate on `database_url` against the emulator, as deployed unless `workers` is false.
async fn start_falgate(database_url: &str, fal: &EmulatorHandle, workers: bool) -> App {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = support::config_against(database_url, fal, addr);
    config.run_workers = workers;
    App::build(config, listener).await.expect("falgate")
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    falgate::install_crypto_provider();
    let measured = Duration::from_secs(env_number("FALGATE_BENCH_SECS", 10).clamp(1, 120));
    let connections = env_number("FALGATE_BENCH_CONNECTIONS", 32).clamp(1, 256) as usize;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(measured, connections));
}

async fn run(measured: Duration, connections: usize) {
    let (database, database_url) = Database::create("falgate_bench").await;
    let body = job_body(1);

    // The bare handler's pool, configured as falgate's own.
    let bare = Pool::connect(&database, &database_url).await;
    bare.create_bench_rows("id {id} PRIMARY KEY, endpoint TEXT, input {json}, created_at {at}")
        .await;
    let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bare_addr = bare_listener.local_addr().unwrap();
    let router = Router::new()
        .route("/bare", post(bare_insert))
        .with_state(bare.clone());
    let bare_server = tokio::spawn(async move { axum::serve(bare_listener, router).await });

    let fal = falgate::emulator::spawn(
        EmulatorConfig::fast(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    fal.set_all_durations(Durations::new(0, 0));
    let (_, key) = {
        let store = falgate::store::Store::connect(&database_url, &Default::default())
            .await
            .expect("the bench database");
        store.migrate().await.expect("migrations");
        let issued = store.issue_api_key("bench").await.expect("an API key");
        store.close().await;
        issued
    };

    println!(
        "backend: {}; {connections} connections from one client thread; {} s warm-up, {} s measured",
        database.backend(),
        WARMUP.as_secs(),
        measured.as_secs()
    );
    let target = |url: String, bearer: Option<String>| Target {
        url,
        bearer,
        body: body.clone(),
    };
    // Bare and intake take turns, round after round, so that a drift of the machine (another
    // process, the page cache, the database growing) weighs on both alike; the ratio judged is
    // the median of the rounds'. Intake runs with the workers off: the pipeline's own writes
    // (claims, submissions, callbacks) are measured after, as deployed, and beside the emulator
    // they would otherwise be counted against intake.
    let rounds = env_number("FALGATE_BENCH_ROUNDS", 3).clamp(1, 20);
    let intake_app = start_falgate(&database_url, &fal, false).await;
    let mut ratios = Vec::new();
    let mut last = None;
    for round in 1..=rounds {
        println!("round {round} of {rounds}");
        let bare_run = load(
            "bare",
            target(format!("http://{bare_addr}/bare"), None),
            connections,
            measured,
        );
        bare_run.print();
        let intake = load(
            "falgate intake",
            target(
                format!("http://{}/v1/jobs", intake_app.local_addr()),
                Some(key.secret.clone()),
            ),
            connections,
            measured,
        );
        intake.print();
        intake.print_ratio_to(&bare_run);
        ratios.push((
            intake.per_second() / bare_run.per_second(),
            intake.p99.as_secs_f64() / bare_run.p99.as_secs_f64(),
        ));
        last = Some(bare_run);
    }
    intake_app.shutdown().await;
    let median = |pick: fn(&(f64, f64)) -> f64| {
        let mut values: Vec<f64> = ratios.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    println!(
        "median over {rounds} rounds: intake throughput {:.1} % of bare, p99 {:.2}x bare's",
        100.0 * median(|r| r.0),
        median(|r| r.1)
    );
    if std::env::var("FALGATE_BENCH_DEPLOYED").as_deref() != Ok("0") {
        let app = start_falgate(&database_url, &fal, true).await;
        let deployed = load(
            "falgate deployed",
            target(
                format!("http://{}/v1/jobs", app.local_addr()),
                Some(key.secret.clone()),
            ),
            connections,
            measured,
        );
        deployed.print();
        app.shutdown().await;
        if let Some(bare_run) = &last {
            deployed.print_ratio_to(bare_run);
        }
    }

    fal.shutdown().await;
    bare_server.abort();
    bare.close().await;
    database.remove().await;
}
