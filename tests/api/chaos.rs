//! Chaos: a bounded load of raw jobs, trainings and generations while FAL misbehaves at seeded
//! random rates and the server is killed with SIGKILL and restarted at random moments. Once the
//! faults are lifted and everything has settled, every job is compared with the emulator's
//! record of what FAL did: none lost, none stuck, none run twice, none whose outcome differs.
//!
//! The short version runs with the suite. `FALGATE_CHAOS_LONG=1` runs the long one (more jobs,
//! more kills); `FALGATE_CHAOS_SEED=<n>` replays a seed (printed by every run).

use crate::backend_tests;
use crate::support::*;
use falgate::emulator::{
    CallbackAttempt, CallbackFault, Durations, EmulatorConfig, EmulatorHandle, FaultRates,
    FaultRule, FaultTarget, HttpFault, ModelFailure, RatedCallbackFault, RatedHttpFault,
    RatedModelFailure, RequestEnd, RequestRecord,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How much load, how many kills, how long to wait for the dust to settle.
#[derive(Debug, Clone)]
struct Plan {
    long: bool,
    raw_jobs: usize,
    /// Clients sending raw jobs at once.
    submitters: usize,
    /// Pause of a submitter between two jobs.
    pause_ms: (u64, u64),
    avatars: usize,
    /// Prompts of the one generation batch made on each avatar that is ready.
    generations_per_avatar: usize,
    /// Share of raw jobs a client cancels a moment after creating them.
    cancel_share: f64,
    kills: usize,
    /// Time between a restart being ready and the next kill.
    kill_gap_ms: (u64, u64),
    /// Time the server stays dead.
    down_ms: (u64, u64),
    /// How long a client keeps retrying one call (the server may be down meanwhile).
    call_patience: Duration,
    /// How long a client waits for its avatar to be trained before it gives up generating.
    training_patience: Duration,
    /// How long, once faults are lifted, every job and every FAL request has to finish.
    settle: Duration,
}

impl Plan {
    fn from_env() -> Self {
        let long = std::env::var("FALGATE_CHAOS_LONG").is_ok_and(|v| v == "1");
        if long {
            Self {
                long,
                raw_jobs: 300,
                submitters: 4,
                pause_ms: (50, 400),
                avatars: 8,
                generations_per_avatar: 3,
                cancel_share: 0.1,
                kills: 12,
                kill_gap_ms: (1500, 5000),
                down_ms: (0, 1500),
                call_patience: Duration::from_secs(30),
                training_patience: Duration::from_secs(90),
                settle: Duration::from_secs(180),
            }
        } else {
            Self {
                long,
                raw_jobs: 100,
                submitters: 3,
                pause_ms: (50, 350),
                avatars: 3,
                generations_per_avatar: 2,
                cancel_share: 0.1,
                kills: 5,
                kill_gap_ms: (1000, 3000),
                down_ms: (0, 800),
                call_patience: Duration::from_secs(20),
                training_patience: Duration::from_secs(30),
                settle: Duration::from_secs(60),
            }
        }
    }
}

fn seed() -> u64 {
    match std::env::var("FALGATE_CHAOS_SEED") {
        Ok(raw) => raw
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FALGATE_CHAOS_SEED={raw} is not a number")),
        Err(_) => rand::random(),
    }
}

/// A generator of its own for each part of the load, so one part's draws do not shift
/// another's when the seed is replayed.
fn rng_for(seed: u64, part: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// FAL's misbehaviour: every fault the issue lists, at rates drawn from the seed.
fn fault_rates(seed: u64) -> FaultRates {
    let mut rng = rng_for(seed, 1);
    let mut rate = |low: f64, high: f64| rng.random_range(low..high);
    let status = |code: u16| FaultRule::status(code);
    FaultRates {
        seed,
        http: vec![
            RatedHttpFault {
                target: FaultTarget::Submit,
                fault: status(429),
                rate: rate(0.04, 0.10),
            },
            RatedHttpFault {
                target: FaultTarget::Submit,
                fault: status(503),
                rate: rate(0.03, 0.08),
            },
            RatedHttpFault {
                target: FaultTarget::Submit,
                fault: HttpFault::Nginx502,
                rate: rate(0.02, 0.06),
            },
            RatedHttpFault {
                target: FaultTarget::Submit,
                fault: HttpFault::AcceptThenReset,
                rate: rate(0.03, 0.08),
            },
            // Slow, and slower than falgate's lease (2 s here).
            RatedHttpFault {
                target: FaultTarget::Submit,
                fault: HttpFault::Delay { delay_ms: 800 },
                rate: rate(0.02, 0.06),
            },
            RatedHttpFault {
                target: FaultTarget::Submit,
                fault: HttpFault::Delay { delay_ms: 2500 },
                rate: rate(0.01, 0.04),
            },
            RatedHttpFault {
                target: FaultTarget::Status,
                fault: status(500),
                rate: rate(0.04, 0.10),
            },
            RatedHttpFault {
                target: FaultTarget::Status,
                fault: status(503),
                rate: rate(0.04, 0.10),
            },
            RatedHttpFault {
                target: FaultTarget::Result,
                fault: status(500),
                rate: rate(0.05, 0.12),
            },
            RatedHttpFault {
                target: FaultTarget::Result,
                fault: status(503),
                rate: rate(0.05, 0.12),
            },
        ],
        callbacks: [
            CallbackFault::Drop,
            CallbackFault::Duplicate,
            CallbackFault::Delay { delay_ms: 1500 },
            CallbackFault::Reorder,
            CallbackFault::StaleTimestamp,
            CallbackFault::BadSignature,
        ]
        .into_iter()
        .map(|fault| RatedCallbackFault {
            fault,
            rate: rate(0.03, 0.07),
        })
        .collect(),
        // FAL's own verdict: the model refuses the input.
        models: vec![RatedModelFailure {
            failure: ModelFailure::new(422),
            rate: rate(0.03, 0.08),
        }],
    }
}

/// The `falgate serve` process, killed and started again on the same port and database.
struct Server {
    child: Option<Child>,
    port: u16,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
}

impl Server {
    fn new(database_url: &str, fal: &EmulatorHandle, storage: &std::path::Path) -> Self {
        let port = free_port();
        let mut env = spawned_server_env(database_url, fal, port);
        env.extend([
            ("FALGATE_STORAGE_DIR", storage.display().to_string()),
            ("FALGATE_JWKS_MIN_REFETCH_SECS", "0".into()),
            // Short enough to settle in seconds, long enough for FAL's (scaled) answers.
            ("FALGATE_CALLBACK_GRACE_SECS", "1".into()),
            ("FALGATE_LEASE_SECS", "2".into()),
            ("FALGATE_POLL_MAX_SECS", "2".into()),
            // A submit whose fate is unknown waits for its callback longer than FAL's callback
            // retries take here (about 7 s at the emulator's time scale) before it is resent.
            (
                "FALGATE_UNCONFIRMED_SUBMIT_WAIT_SECS",
                UNCONFIRMED_WAIT.as_secs().to_string(),
            ),
            (
                "FALGATE_UNCONFIRMED_TRAINING_WAIT_SECS",
                UNCONFIRMED_TRAINING_WAIT.as_secs().to_string(),
            ),
            ("FALGATE_MIN_PHOTOS", PHOTOS.to_string()),
            // Kept in the server's log file, for the diagnosis of a failed run.
            ("RUST_LOG", "warn".into()),
        ]);
        let log = std::env::temp_dir().join(format!(
            "falgate-chaos-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        Self {
            child: None,
            port,
            env,
            log,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the server log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_falgate"));
        command
            .arg("serve")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        for (name, value) in &self.env {
            command.env(name, value);
        }
        self.child = Some(command.spawn().expect("start falgate"));
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("SIGKILL");
            child.wait().await.expect("reap");
        }
    }

    async fn wait_ready(&self, http: &reqwest::Client) {
        wait_until_serving(http, &self.base()).await;
    }
}

/// Photos per avatar (the server is told this is enough to train).
const PHOTOS: u64 = 4;

/// How long falgate waits for evidence of a submit whose answer it may have missed, before it
/// sends the job again: generations and raw jobs, then trainings.
const UNCONFIRMED_WAIT: Duration = Duration::from_secs(9);
const UNCONFIRMED_TRAINING_WAIT: Duration = Duration::from_secs(10);

/// A client that outlives the server's deaths: a call is sent again (with the same
/// idempotency key, for creating POSTs) until it gets an answer that a kill did not cause.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
    patience: Duration,
}

impl Api {
    /// `None` when no answer came within the patience.
    async fn call(
        &self,
        make: impl Fn(&reqwest::Client, &str) -> RequestBuilder,
    ) -> Option<(StatusCode, Value)> {
        // A retryable answer still standing at the deadline is the answer.
        let answer = eventually("an answer a kill did not cause")
            .within(self.patience)
            .every(Duration::from_millis(100))
            .or_last(async || {
                let response = make(&self.http, &self.base)
                    .bearer_auth(&self.key)
                    .send()
                    .await
                    .map_err(|_| None)?;
                let status = response.status();
                // A body cut off by a kill is no answer.
                let bytes = response.bytes().await.map_err(|_| None)?;
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let again = status.is_server_error()
                    || (status == StatusCode::CONFLICT && body["code"] == "idempotency_key_in_use");
                if again {
                    Err(Some((status, body)))
                } else {
                    Ok((status, body))
                }
            })
            .await;
        answer.map_or_else(|last| last, Some)
    }

    async fn get(&self, path: &str) -> Option<(StatusCode, Value)> {
        self.call(|http, base| http.get(format!("{base}{path}")))
            .await
    }
}

/// What the clients were told and did.
#[derive(Default)]
struct Ledger {
    /// Jobs answered 202 (or 201 with jobs), by id: their kind and a label.
    accepted: BTreeMap<String, String>,
    /// Jobs a client asked to cancel (whether or not the answer came back).
    cancels: BTreeSet<String>,
    /// Creating calls that never got an answer, or an unexpected one.
    unanswered: Vec<String>,
    /// Avatars: (id, status at the end of its flow).
    avatars: Vec<(String, String)>,
}

impl Ledger {
    fn note(ledger: &Mutex<Ledger>, f: impl FnOnce(&mut Ledger)) {
        f(&mut ledger.lock().unwrap());
    }
}

/// One submitter's share of the raw jobs.
async fn raw_jobs(api: &Api, plan: &Plan, seed: u64, who: usize, ledger: &Mutex<Ledger>) {
    let mut rng = rng_for(seed, 100 + who as u64);
    for i in (who..plan.raw_jobs).step_by(plan.submitters) {
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(plan.pause_ms.0..=plan.pause_ms.1),
        ))
        .await;
        let key = uuid::Uuid::new_v4().to_string();
        let body = json!({
            "endpoint": "fal-ai/flux-lora",
            "input": {"prompt": format!("chaos {i}"), "seed": i,
                      "image_size": {"width": 256, "height": 256}},
        });
        let answer = api
            .call(|http, base| {
                http.post(format!("{base}/v1/jobs"))
                    .header("idempotency-key", &key)
                    .json(&body)
            })
            .await;
        let id = match answer {
            Some((StatusCode::ACCEPTED, job)) => job["id"].as_str().unwrap().to_owned(),
            other => {
                Ledger::note(ledger, |l| {
                    l.unanswered.push(format!("raw job {i}: {other:?}"));
                });
                continue;
            }
        };
        Ledger::note(ledger, |l| {
            l.accepted.insert(id.clone(), format!("raw {i}"));
        });
        if rng.random_bool(plan.cancel_share) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
            Ledger::note(ledger, |l| {
                l.cancels.insert(id.clone());
            });
            let path = format!("/v1/jobs/{id}/cancel");
            api.call(|http, base| http.post(format!("{base}{path}")))
                .await;
        }
    }
}

/// A multipart body with one PNG part per photo.
fn photos_body(avatar: usize) -> (String, Vec<u8>) {
    let boundary = format!("chaos-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for n in 0..PHOTOS {
        let png = falgate::emulator::png::render(640, 512, avatar as u64 * 100 + n, "chaos");
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"p{n}.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&png);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Creates an avatar, uploads its photos, trains it and, once it is ready, generates on it.
async fn avatar_flow(api: &Api, plan: &Plan, seed: u64, n: usize, ledger: &Mutex<Ledger>) {
    let mut rng = rng_for(seed, 1000 + n as u64);
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
    let kind = if n % 3 == 2 { "style" } else { "character" };
    let fail = |what: String| Ledger::note(ledger, |l| l.unanswered.push(what));
    let key = uuid::Uuid::new_v4().to_string();
    let created = api
        .call(|http, base| {
            http.post(format!("{base}/v1/avatars"))
                .header("idempotency-key", &key)
                .json(&json!({"name": format!("chaos {n}"), "kind": kind}))
        })
        .await;
    let Some((StatusCode::CREATED, avatar)) = created else {
        return fail(format!("avatar {n}: {created:?}"));
    };
    let id = avatar["id"].as_str().unwrap().to_owned();
    let (content_type, body) = photos_body(n);
    let key = uuid::Uuid::new_v4().to_string();
    let uploaded = api
        .call(|http, base| {
            http.post(format!("{base}/v1/avatars/{id}/photos"))
                .header("idempotency-key", &key)
                .header("content-type", &content_type)
                .body(body.clone())
        })
        .await;
    if !matches!(uploaded, Some((StatusCode::CREATED, _))) {
        return fail(format!("photos of avatar {n}: {uploaded:?}"));
    }
    let key = uuid::Uuid::new_v4().to_string();
    let trained = api
        .call(|http, base| {
            http.post(format!("{base}/v1/avatars/{id}/trainings"))
                .header("idempotency-key", &key)
                .json(&json!({}))
        })
        .await;
    let Some((StatusCode::ACCEPTED, job)) = trained else {
        return fail(format!("training of avatar {n}: {trained:?}"));
    };
    Ledger::note(ledger, |l| {
        l.accepted.insert(
            job["id"].as_str().unwrap().to_owned(),
            format!("training of avatar {n} ({kind})"),
        );
    });
    // The training ends (or not) while the server keeps dying; the settle phase judges it.
    let status = eventually(format_args!("avatar {n} trained"))
        .within(plan.training_patience)
        .every(Duration::from_millis(200))
        .or_last(async || {
            let status = match api.get(&format!("/v1/avatars/{id}")).await {
                Some((StatusCode::OK, avatar)) => {
                    avatar["status"].as_str().unwrap_or("").to_owned()
                }
                _ => String::new(),
            };
            if matches!(status.as_str(), "ready" | "failed") {
                Ok(status)
            } else {
                Err(status)
            }
        })
        .await
        .unwrap_or_else(|last| last);
    Ledger::note(ledger, |l| l.avatars.push((id.clone(), status.clone())));
    if status != "ready" {
        return;
    }
    let prompts: Vec<String> = (0..plan.generations_per_avatar)
        .map(|g| format!("chaos portrait {n}.{g}"))
        .collect();
    let key = uuid::Uuid::new_v4().to_string();
    let generated = api
        .call(|http, base| {
            http.post(format!("{base}/v1/generations"))
                .header("idempotency-key", &key)
                .json(&json!({"avatar_id": id, "prompts": prompts}))
        })
        .await;
    let Some((StatusCode::ACCEPTED, batch)) = generated else {
        return fail(format!("generations on avatar {n}: {generated:?}"));
    };
    Ledger::note(ledger, |l| {
        for job in batch["jobs"].as_array().into_iter().flatten() {
            l.accepted.insert(
                job["id"].as_str().unwrap().to_owned(),
                format!("generation on avatar {n}"),
            );
        }
    });
}

/// Kills the server `plan.kills` times at random moments, restarting it after a random
/// downtime; answers the moments of the kills.
async fn killer(
    server: &mut Server,
    plan: &Plan,
    seed: u64,
    http: &reqwest::Client,
) -> Vec<SystemTime> {
    let mut rng = rng_for(seed, 2);
    let mut kills = Vec::new();
    for _ in 0..plan.kills {
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(plan.kill_gap_ms.0..=plan.kill_gap_ms.1),
        ))
        .await;
        kills.push(SystemTime::now());
        server.kill().await;
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(plan.down_ms.0..=plan.down_ms.1),
        ))
        .await;
        server.start();
        server.wait_ready(http).await;
    }
    kills
}

/// Every job of the key, through the paged list.
async fn all_jobs(api: &Api) -> Vec<Value> {
    let mut jobs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=100&cursor={c}"),
            None => "/v1/jobs?limit=100".to_owned(),
        };
        let (status, page) = api.get(&path).await.expect("the job list answers");
        assert_eq!(status, StatusCode::OK, "{page}");
        jobs.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return jobs,
        }
    }
}

fn is_terminal(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "canceled")
    )
}

/// Could falgate have missed that `request` exists, waiting as long as it was told to?
/// Only if the answer to its submit may never have reached falgate (FAL reset the connection,
/// or the process was killed around the call) and no callback naming it was acknowledged
/// within that wait (it was dropped, badly signed, or kept failing). Then no client could have
/// known, and sending the job again was the only way on.
fn unseen(
    request: &RequestRecord,
    wait: Duration,
    kills: &[SystemTime],
    callbacks: &[&CallbackAttempt],
) -> bool {
    let at = request.submitted_at;
    // From just before the call arrived to well after a slow answer could have been stored.
    let near_a_kill = kills
        .iter()
        .any(|k| *k + Duration::from_millis(500) >= at && *k <= at + Duration::from_secs(4));
    let answer_maybe_lost =
        request.submit_fault.as_deref() == Some("accept_then_reset") || near_a_kill;
    let acknowledged = callbacks.iter().any(|c| {
        c.request_id == request.request_id
            && c.status.is_some_and(|s| (200..300).contains(&s))
            && c.sent_at < at + wait
    });
    answer_maybe_lost && !acknowledged
}

/// What went wrong with one job, for the report.
struct Finding {
    job: String,
    label: String,
    problem: String,
}

async fn chaos(backend: Backend) {
    falgate::install_crypto_provider();
    let plan = Plan::from_env();
    let seed = seed();
    let Some(database) = TestDatabase::create(backend).await else {
        return;
    };
    eprintln!(
        "chaos[{backend:?}] seed={seed} (replay: FALGATE_CHAOS_SEED={seed}{})",
        if plan.long {
            " FALGATE_CHAOS_LONG=1"
        } else {
            ""
        }
    );
    let store = falgate::store::Store::connect(&database.url, &Default::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let (_, key) = store.issue_api_key("chaos").await.unwrap();
    store.close().await;

    let fal = falgate::emulator::spawn(
        EmulatorConfig {
            generation: Durations::new(100, 400),
            training: Durations::new(300, 1200),
            // FAL's ten callback retries over two hours, in about seven seconds.
            time_scale: 0.001,
            ..EmulatorConfig::fast()
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    let rates = fault_rates(seed);
    fal.set_fault_rates(rates.clone()).expect("valid rates");

    let storage = shared_scratch_dir().join(format!("chaos-{}", uuid::Uuid::new_v4().simple()));
    let mut server = Server::new(&database.url, &fal, &storage);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    server.start();
    server.wait_ready(&http).await;
    eprintln!("chaos[{backend:?}] server log: {}", server.log.display());
    let api = Api {
        http: http.clone(),
        base: server.base(),
        key: key.secret.clone(),
        patience: plan.call_patience,
    };

    // The load and the kills, together.
    let ledger = Mutex::new(Ledger::default());
    let started = Instant::now();
    let load = async {
        let raw = futures_util::future::join_all(
            (0..plan.submitters).map(|who| raw_jobs(&api, &plan, seed, who, &ledger)),
        );
        let avatars = futures_util::future::join_all(
            (0..plan.avatars).map(|n| avatar_flow(&api, &plan, seed, n, &ledger)),
        );
        tokio::join!(raw, avatars);
    };
    let ((), kills) = tokio::join!(load, killer(&mut server, &plan, seed, &http));
    let loaded_in = started.elapsed();

    // Faults lifted: everything must now settle.
    fal.clear_faults();
    fal.release_held_callback();
    // Whatever has not settled by then is judged as it stands.
    let jobs = eventually("every job and FAL request to finish")
        .within(plan.settle)
        .every(Duration::from_millis(250))
        .or_last(async || {
            let jobs = all_jobs(&api).await;
            let fal_busy = fal
                .record()
                .iter()
                .any(|r| r.verdict == RequestEnd::Unfinished);
            if jobs.iter().all(is_terminal) && !fal_busy {
                Ok(jobs)
            } else {
                Err(jobs)
            }
        })
        .await
        .unwrap_or_else(|unsettled| unsettled);
    let settled_in = started.elapsed() - loaded_in;

    // The comparison.
    let ledger = ledger.into_inner().unwrap();
    let record = fal.record();
    let attempts = fal.callback_attempts();
    let by_id: HashMap<&str, &Value> = jobs
        .iter()
        .map(|j| (j["id"].as_str().unwrap(), j))
        .collect();
    let mut lost = Vec::new();
    for (id, label) in &ledger.accepted {
        if !by_id.contains_key(id.as_str()) {
            lost.push(Finding {
                job: id.clone(),
                label: label.clone(),
                problem: "answered 202 but not in the job list".into(),
            });
        }
    }
    let orphans: Vec<&RequestRecord> = record
        .iter()
        .filter(|r| {
            r.webhook_job_id
                .as_deref()
                .is_none_or(|j| !by_id.contains_key(j))
        })
        .collect();
    let (mut stuck, mut twice, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
    let mut unavoidable = Vec::new();
    let mut diagnoses: Vec<String> = Vec::new();
    for job in &jobs {
        let id = job["id"].as_str().unwrap();
        let label = ledger
            .accepted
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("{} (its 202 never arrived)", job["kind"]));
        let mine: Vec<&RequestRecord> = record
            .iter()
            .filter(|r| r.webhook_job_id.as_deref() == Some(id))
            .collect();
        let callbacks: Vec<&CallbackAttempt> = attempts
            .iter()
            .filter(|a| mine.iter().any(|r| r.request_id == a.request_id))
            .collect();
        let mut problems = Vec::new();

        if !is_terminal(job) {
            problems.push((&mut stuck, format!("still {}", job["status"])));
        }

        // Run twice: more than one request reached a runner, not counting the ones falgate
        // could not have known about when it sent the job again.
        let ran: Vec<&&RequestRecord> = mine.iter().filter(|r| r.ran).collect();
        let wait = if job["kind"] == "training" {
            UNCONFIRMED_TRAINING_WAIT
        } else {
            UNCONFIRMED_WAIT
        };
        let mut billed = ran.len();
        let mut excused = Vec::new();
        for r in ran.iter().take(ran.len().saturating_sub(1)) {
            if unseen(r, wait, &kills, &callbacks) {
                billed -= 1;
                excused.push(r.request_id.clone());
            }
        }
        if !excused.is_empty() {
            let why = format!("resent after request {} went unseen", excused.join(", "));
            unavoidable.push(diagnose(&api, id, &label, &[why], &mine, &callbacks).await);
        }
        if billed > 1 {
            problems.push((
                &mut twice,
                format!("{billed} requests ran at FAL (of {} sent)", mine.len()),
            ));
        }

        // The outcome is FAL's.
        if is_terminal(job) {
            let kept = job["fal_request_id"]
                .as_str()
                .and_then(|rid| mine.iter().find(|r| r.request_id == rid));
            let status = job["status"].as_str().unwrap();
            let verdict = match (status, kept) {
                // Cancelled by its client: no request of it ran to a result falgate could have
                // known of (a cancel that came too late leaves the job succeeded).
                ("canceled", _) if ledger.cancels.contains(id) => mine
                    .iter()
                    .find(|r| r.verdict == RequestEnd::Ok && !unseen(r, wait, &kills, &callbacks))
                    .map(|r| {
                        format!(
                            "canceled, but FAL's request {} ran to a result",
                            r.request_id
                        )
                    }),
                ("canceled", _) => Some("canceled, but no client cancelled it".to_owned()),
                (_, None) => Some(format!(
                    "{status} without a FAL request of its own (holds {}): {}",
                    job["fal_request_id"], job["error"]
                )),
                ("succeeded", Some(r)) => match r.verdict {
                    RequestEnd::Ok if r.output.as_ref() == Some(&job["result"]) => None,
                    RequestEnd::Ok => Some("succeeded with another output than FAL's".into()),
                    other => Some(format!("succeeded, but FAL's request ended {other:?}")),
                },
                ("failed", Some(r)) => match r.verdict {
                    RequestEnd::ModelError { .. }
                        if r.output.as_ref() == Some(&job["error"]["detail"]) =>
                    {
                        None
                    }
                    other => Some(format!(
                        "failed ({}: {}), but FAL's request ended {other:?}",
                        job["error"]["code"], job["error"]["message"]
                    )),
                },
                (other, _) => Some(format!("ended {other}")),
            };
            if let Some(v) = verdict {
                problems.push((&mut wrong, v));
            }
        }

        if problems.is_empty() {
            continue;
        }
        let summary: Vec<String> = problems.iter().map(|(_, p)| p.clone()).collect();
        for (bucket, problem) in problems {
            bucket.push(Finding {
                job: id.to_owned(),
                label: label.clone(),
                problem,
            });
        }
        diagnoses.push(diagnose(&api, id, &label, &summary, &mine, &callbacks).await);
    }

    let jobs_by_kind = |kind: &str| jobs.iter().filter(|j| j["kind"] == kind).count();
    let ready = ledger.avatars.iter().filter(|(_, s)| s == "ready").count();
    eprintln!(
        "chaos[{backend:?}] seed={seed} jobs={} (raw {}, training {}, generation {}) kills={} \
         lost={} stuck={} run_twice={} wrong_outcome={} | orphan_requests={} \
         unavoidable_resends={} unanswered_posts={} cancels={} avatars_ready={ready}/{} \
         fal_requests={} load={:.1}s settle={:.1}s",
        jobs.len(),
        jobs_by_kind("raw"),
        jobs_by_kind("training"),
        jobs_by_kind("generation"),
        kills.len(),
        lost.len(),
        stuck.len(),
        twice.len(),
        wrong.len(),
        orphans.len(),
        unavoidable.len(),
        ledger.unanswered.len(),
        ledger.cancels.len(),
        ledger.avatars.len(),
        record.len(),
        loaded_in.as_secs_f64(),
        settled_in.as_secs_f64(),
    );
    eprintln!(
        "chaos[{backend:?}] fault rates: {}",
        serde_json::to_string(&rates).unwrap()
    );
    for story in &unavoidable {
        eprintln!("chaos[{backend:?}] an unavoidable resend:\n{story}");
    }
    for line in &ledger.unanswered {
        eprintln!("chaos[{backend:?}] no answer: {line}");
    }
    for r in &orphans {
        eprintln!(
            "chaos[{backend:?}] orphan FAL request {} for {:?}: {:?}",
            r.request_id, r.webhook_job_id, r.verdict
        );
    }
    for d in &diagnoses {
        eprintln!("{d}");
    }

    server.kill().await;
    fal.shutdown().await;
    database.drop_database().await;
    let _ = std::fs::remove_dir_all(&storage);
    let failed = !(lost.is_empty()
        && stuck.is_empty()
        && twice.is_empty()
        && wrong.is_empty()
        && orphans.is_empty());
    if !failed {
        let _ = std::fs::remove_file(&server.log);
    }
    let list = |findings: &[Finding]| {
        findings
            .iter()
            .map(|f| format!("{} ({}): {}", f.job, f.label, f.problem))
            .collect::<Vec<_>>()
    };
    assert!(
        !failed,
        "chaos[{backend:?}] seed={seed}: lost {:?}; stuck {:?}; run twice {:?}; wrong outcome {:?}; \
         orphan FAL requests {}",
        list(&lost),
        list(&stuck),
        list(&twice),
        list(&wrong),
        orphans.len()
    );
}

/// One job's story: its history at falgate and its requests and callbacks at FAL.
async fn diagnose(
    api: &Api,
    id: &str,
    label: &str,
    problems: &[String],
    requests: &[&RequestRecord],
    callbacks: &[&CallbackAttempt],
) -> String {
    let mut out = format!("--- job {id} ({label}): {}\n", problems.join("; "));
    if let Some((_, detail)) = api.get(&format!("/v1/jobs/{id}")).await {
        out += &format!(
            "  falgate: status {} fal_request_id {} attempts {} error {}\n",
            detail["status"], detail["fal_request_id"], detail["attempts"], detail["error"]
        );
        for e in detail["events"].as_array().into_iter().flatten() {
            out += &format!(
                "    {} {} -> {} by {} {}\n",
                e["at"].as_str().unwrap_or(""),
                e["from"],
                e["to"],
                e["source"],
                if e["detail"].is_null() {
                    String::new()
                } else {
                    e["detail"].to_string()
                }
            );
        }
    }
    for r in requests {
        out += &format!(
            "  FAL request {} ran={} ended {:?} submit_fault={:?}\n",
            r.request_id, r.ran, r.verdict, r.submit_fault
        );
        for c in callbacks.iter().filter(|c| c.request_id == r.request_id) {
            out += &format!(
                "    callback delivery {} attempt {}: fault {:?} answered {:?} {}\n",
                c.delivery,
                c.attempt,
                c.fault,
                c.status,
                c.error.as_deref().unwrap_or("")
            );
        }
    }
    out
}

backend_tests!(chaos(Backend));
