//! What falgate's own upkeep costs as its tables grow, and what it holds in memory while it
//! follows many jobs. Run with `cargo bench --bench footprint` (SQLite), or with
//! `FALGATE_BENCH_POSTGRES_URL=postgres://…/postgres` for PostgreSQL (a fresh database per
//! figure, dropped after).
//!
//! 1. The reconciler's work per tick: the two statements of one round (claim the due jobs at
//!    FAL, then ask when the next falls due), timed over many rounds, first on a database of
//!    1,000 jobs all in flight, then on one of 100,000 finished jobs and the same 1,000 in
//!    flight. The claims lease for no time, so that every round finds the same due jobs and
//!    does the same work. Printed: the median round of each, and their ratio (the goal: the
//!    finished jobs cost the rounds at most twice as much).
//! 2. Memory with 1,000 jobs in flight: the `falgate` binary, spawned, serving against the
//!    emulator (in this process) with jobs that stay queued at FAL; 1,000 raw jobs are posted
//!    and followed until FAL holds them all, then the process's resident set is read from
//!    `/proc` (Linux only), beside its size when idle after start.

use falgate::domain::job::JobKind;
use falgate::emulator::{Durations, EmulatorConfig, EmulatorHandle};
use falgate::store::{ClaimKind, NewJob, Store, StoreOptions};
use std::time::{Duration, Instant};
use support::{Database, Pool, on_pool};
use uuid::Uuid;

mod support;

const IN_FLIGHT: usize = 1_000;
const FINISHED: usize = 100_000;
const ROUNDS: usize = 300;

fn new_jobs(tenant: Uuid, count: usize) -> Vec<NewJob> {
    (0..count)
        .map(|n| NewJob {
            id: Uuid::now_v7(),
            tenant,
            kind: JobKind::Generation,
            avatar_id: None,
            batch_id: None,
            endpoint: "fal-ai/flux-lora".into(),
            input: serde_json::json!({"prompt": format!("portrait {n}"), "num_images": 1}),
            sandbox: false,
            idempotency_key: None,
            created_at: falgate::domain::now(),
        })
        .collect()
}

/// Moves jobs straight to a state, as the pipeline would have left them. Setup only: the
/// product reaches SQL through its store alone.
async fn set_state(pool: &Pool, ids: &[Uuid], status: &str, finished: bool) {
    let ids: Vec<String> = ids.iter().map(|id| id.simple().to_string()).collect();
    let ids = serde_json::to_string(&ids).unwrap();
    let now = falgate::domain::now() - chrono::TimeDelta::seconds(1);
    let at = now.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false);
    let sql = match pool {
        Pool::Sqlite(_) => {
            "UPDATE jobs SET status = ?1, \
             fal_request_id = 'req-' || hex(id), \
             next_attempt_at = CASE WHEN ?3 THEN NULL ELSE ?4 END, \
             finished_at = CASE WHEN ?3 THEN ?4 ELSE NULL END, \
             submitted_at = ?4 \
             WHERE id IN (SELECT unhex(value) FROM json_each(?2))"
        }
        Pool::Postgres(_) => {
            "UPDATE jobs SET status = $1, fal_request_id = 'req-' || id::text, \
             next_attempt_at = CASE WHEN $3 THEN NULL ELSE $4::timestamptz END, \
             finished_at = CASE WHEN $3 THEN $4::timestamptz ELSE NULL END, \
             submitted_at = $4::timestamptz \
             WHERE id IN (SELECT value::uuid FROM jsonb_array_elements_text($2::jsonb))"
        }
    };
    on_pool!(pool, |conn| sqlx::query(sql)
        .bind(status)
        .bind(&ids)
        .bind(finished)
        .bind(&at)
        .execute(conn)
        .await
        .map(drop))
    .unwrap();
}

/// Adds `count` jobs in `status`, a thousand at a time.
async fn add_jobs(store: &Store, pool: &Pool, tenant: Uuid, count: usize, status: &str) {
    let finished = status != "submitted";
    let mut left = count;
    while left > 0 {
        let now = left.min(1_000);
        let jobs = new_jobs(tenant, now);
        let ids: Vec<Uuid> = jobs.iter().map(|job| job.id).collect();
        store.create_jobs(jobs, None, None).await.unwrap();
        set_state(pool, &ids, status, finished).await;
        left -= now;
    }
}

/// The median time of one reconciler round on a database holding `finished` finished jobs and
/// `IN_FLIGHT` due ones.
async fn reconciler_round(finished: usize) -> (Duration, String) {
    let (database, url) = Database::create("falgate_footprint").await;
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let (key, _) = store.issue_api_key("footprint").await.unwrap();
    let pool = Pool::connect(&database, &url).await;
    add_jobs(&store, &pool, key.id, finished, "succeeded").await;
    add_jobs(&store, &pool, key.id, IN_FLIGHT, "submitted").await;
    pool.close().await;
    let backend = database.backend().to_owned();
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let now = falgate::domain::now();
        let claimed = store
            .claim_jobs(ClaimKind::Poll, false, now, Duration::ZERO, 16)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 16, "every round finds due jobs");
        store.next_due(ClaimKind::Poll, false).await.unwrap();
        rounds.push(started.elapsed());
    }
    rounds.sort();
    store.close().await;
    database.remove().await;
    (rounds[rounds.len() / 2], backend)
}

/// The resident set of a process, from `/proc`.
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Kills the spawned server however the measurement ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn memory_in_flight() -> Option<(u64, u64)> {
    let (database, url) = Database::create("falgate_footprint").await;
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let (_, key) = store.issue_api_key("footprint").await.unwrap();
    store.close().await;
    let fal: EmulatorHandle = falgate::emulator::spawn(
        EmulatorConfig::fast(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    // Jobs stay queued at FAL for the whole measurement.
    fal.set_all_durations(Durations::new(600_000, 600_000));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap();
    let storage = std::env::temp_dir().join(format!("falgate-footprint-{}", Uuid::new_v4()));
    let server = Server(
        std::process::Command::new(env!("CARGO_BIN_EXE_falgate"))
            .arg("serve")
            .env("DATABASE_URL", &url)
            .env("FALGATE_STORAGE_DIR", &storage)
            .env("FALGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("FALGATE_PUBLIC_URL", format!("http://127.0.0.1:{port}"))
            .env(
                "FALGATE_WEBHOOK_SECRET",
                "footprint-webhook-secret-0123456789abcdef",
            )
            .env("FAL_KEY", EmulatorConfig::default().key.expose())
            .env("FAL_QUEUE_URL", fal.base_url().to_string())
            .env("FAL_REST_URL", fal.base_url().to_string())
            .env("FAL_JWKS_URL", fal.jwks_url().to_string())
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the falgate binary"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(Instant::now() < deadline, "falgate did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle = resident_kib(server.0.id())?;
    for n in 0..IN_FLIGHT {
        let response = client
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(&key.secret)
            .json(&serde_json::json!({
                "endpoint": "fal-ai/flux-lora",
                "input": {"prompt": format!("portrait photo of sks person {n}, golden hour")},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending: serde_json::Value = client
            .get(format!("{base}/v1/jobs?status=pending&limit=1"))
            .bearer_auth(&key.secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if pending["items"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "the jobs did not all reach FAL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few of the reconciler's rounds over the jobs in flight, as in a steady state.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let busy = resident_kib(server.0.id())?;
    drop(server);
    fal.shutdown().await;
    let _ = std::fs::remove_dir_all(&storage);
    database.remove().await;
    Some((idle, busy))
}

fn main() {
    falgate::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (small, backend) = reconciler_round(0).await;
        let (large, _) = reconciler_round(FINISHED).await;
        println!("backend: {backend}");
        println!(
            "reconciler round, {IN_FLIGHT} jobs in flight and nothing else:      median {:>8.3} ms",
            small.as_secs_f64() * 1e3
        );
        println!(
            "reconciler round, {IN_FLIGHT} in flight and {FINISHED} finished:    median {:>8.3} ms",
            large.as_secs_f64() * 1e3
        );
        println!(
            "ratio: {:.2}x (over {ROUNDS} rounds each)",
            large.as_secs_f64() / small.as_secs_f64()
        );
        match memory_in_flight().await {
            Some((idle, busy)) => println!(
                "falgate's resident set: {:.1} MiB idle after start, {:.1} MiB with {IN_FLIGHT} jobs in flight",
                idle as f64 / 1024.0,
                busy as f64 / 1024.0
            ),
            None => println!("resident set: not measured (no /proc)"),
        }
    });
}
