//! The server killed with SIGKILL while jobs are in every state, then restarted: every job
//! still reaches exactly one terminal state with exactly one result.

use crate::backend_tests;
use crate::support::*;
use falgate::emulator::{Durations, EmulatorConfig, FaultRule, HttpFault};
use falgate::store::Store;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tokio::process::{Child, Command};

fn start_server(database_url: &str, fal: &falgate::emulator::EmulatorHandle, port: u16) -> Child {
    start_server_with(database_url, fal, port, &[])
}

fn start_server_with(
    database_url: &str,
    fal: &falgate::emulator::EmulatorHandle,
    port: u16,
    settings: &[(&str, &str)],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_falgate"))
        .arg("serve")
        .envs(spawned_server_env(database_url, fal, port))
        .env("FALGATE_JWKS_MIN_REFETCH_SECS", "0")
        .env("FALGATE_CALLBACK_GRACE_SECS", "1")
        .env("FALGATE_LEASE_SECS", "2")
        // A submit cut off by the kill waits this long for its callback before it is resent.
        .env("FALGATE_UNCONFIRMED_SUBMIT_WAIT_SECS", "2")
        .envs(settings.iter().copied())
        .kill_on_drop(true)
        .spawn()
        .expect("start falgate")
}

/// GET `path` on the spawned server with `key`, answering the JSON body.
async fn get_json(client: &reqwest::Client, base: &str, key: &str, path: &str) -> Value {
    client
        .get(format!("{base}{path}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn statuses(client: &reqwest::Client, base: &str, key: &str) -> Vec<Value> {
    let page = get_json(client, base, key, "/v1/jobs?limit=100").await;
    items(&page).clone()
}

async fn job_detail(client: &reqwest::Client, base: &str, key: &str, id: &str) -> Value {
    get_json(client, base, key, &format!("/v1/jobs/{id}")).await
}

/// Polls the job list until `spread` holds for the counts of jobs by status.
async fn wait_for_jobs(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    what: &str,
    spread: impl Fn(&dyn Fn(&str) -> usize) -> bool,
) {
    eventually(what)
        .every(Duration::from_millis(10))
        .or_last(async || {
            let jobs = statuses(client, base, key).await;
            let count = |s: &str| jobs.iter().filter(|j| j["status"] == s).count();
            if spread(&count) { Ok(()) } else { Err(jobs) }
        })
        .await
        .unwrap_or_else(|jobs| panic!("waiting for {what}: {jobs:?}"));
}

/// A fresh, migrated database and an API key in it.
async fn migrated_database(backend: Backend) -> Option<(TestDatabase, String)> {
    falgate::install_crypto_provider();
    let database = TestDatabase::create(backend).await?;
    let store = Store::connect(&database.url, &Default::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let (_, key) = store.issue_api_key("crash test").await.unwrap();
    store.close().await;
    Some((database, key.secret))
}

async fn fast_emulator() -> falgate::emulator::EmulatorHandle {
    falgate::emulator::spawn(
        EmulatorConfig::fast(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
}

/// A free port for the server, its base URL, and a client for it.
fn address_and_client() -> (u16, String, reqwest::Client) {
    let port = free_port();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    (port, format!("http://127.0.0.1:{port}"), client)
}

async fn killed_and_restarted(backend: Backend) {
    let Some((database, key)) = migrated_database(backend).await else {
        return;
    };

    let fal = fast_emulator().await;
    fal.set_all_durations(Durations::new(0, 0));

    let (port, base, client) = address_and_client();
    let mut server = start_server(&database.url, &fal, port);
    wait_until_serving(&client, &base).await;

    let mut prompts = HashMap::new();
    let create = |i: i64| {
        let client = client.clone();
        let (base, key) = (base.clone(), key.clone());
        async move {
            let prompt = format!("crash {i}");
            let job: Value = client
                .post(format!("{base}/v1/jobs"))
                .bearer_auth(&key)
                .json(&json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": prompt, "seed": i}}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (job["id"].as_str().unwrap().to_owned(), prompt)
        }
    };
    // The jobs are spread over the states before the kill: some done, some held at FAL, and
    // some pending because FAL refuses their submits.
    for i in 0..4 {
        prompts.extend([create(i).await]);
    }
    wait_for_jobs(&client, &base, &key, "a job done", |count| {
        count("succeeded") > 0
    })
    .await;
    fal.set_all_durations(Durations::new(600_000, 600_000));
    for i in 4..12 {
        prompts.extend([create(i).await]);
    }
    wait_for_jobs(&client, &base, &key, "jobs held at FAL", |count| {
        count("pending") == 0
    })
    .await;
    fal.inject_fault(FaultRule::submit(FaultRule::status(503), 1000));
    for i in 12..24 {
        prompts.extend([create(i).await]);
    }
    eventually("submits refused")
        .every(Duration::from_millis(10))
        .until(async || {
            (fal.submits().iter().filter(|s| s.fault.is_some()).count() >= 6).then_some(())
        })
        .await;
    server.kill().await.expect("SIGKILL");
    server.wait().await.unwrap();

    let mut server = start_server(&database.url, &fal, port);
    wait_until_serving(&client, &base).await;
    // FAL takes submits again and lets the held requests finish, those from before the kill
    // included.
    fal.clear_faults();
    fal.set_all_durations(Durations::new(300, 600));
    let jobs = eventually("every job finished")
        .within(Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .or_last(async || {
            let jobs = statuses(&client, &base, &key).await;
            let finished = jobs.iter().all(|j| {
                matches!(
                    j["status"].as_str(),
                    Some("succeeded" | "failed" | "canceled")
                )
            });
            if finished { Ok(jobs) } else { Err(jobs) }
        })
        .await
        .unwrap_or_else(|jobs| panic!("jobs never finished: {jobs:?}"));
    assert_eq!(jobs.len(), 24);
    let requests: HashMap<String, falgate::emulator::RequestSnapshot> = fal
        .requests()
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    for job in &jobs {
        let id = job["id"].as_str().unwrap();
        assert_eq!(job["status"], "succeeded", "{job}");
        let detail = job_detail(&client, &base, &key, id).await;
        let ends = detail["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["from"] != e["to"] && e["to"] == "succeeded")
            .count();
        assert_eq!(ends, 1, "exactly one terminal transition: {detail}");
        // The one result is the output of the FAL request the job holds, for its own input.
        let held = &requests[detail["fal_request_id"].as_str().unwrap()];
        assert_eq!(held.input["prompt"].as_str(), Some(prompts[id].as_str()));
        assert_eq!(
            Some(&detail["result"]),
            held.outcome.as_ref().map(|o| &o.body)
        );
    }
    server.kill().await.ok();
    fal.shutdown().await;
    database.drop_database().await;
}

backend_tests!(killed_and_restarted(Backend));

/// Killed while a submit FAL took is still unanswered: after the restart the job waits for the
/// request's callback instead of sending the job again, and takes that request's outcome.
async fn killed_during_a_submit(backend: Backend) {
    let Some((database, key)) = migrated_database(backend).await else {
        return;
    };
    let fal = fast_emulator().await;
    // The request waits in FAL's queue until the restarted process is up to hear its callback.
    fal.set_all_durations(Durations::new(600_000, 0));
    fal.inject_fault(FaultRule::submit(HttpFault::AcceptThenHold, 1));
    let (port, base, client) = address_and_client();
    // A wait far longer than the test: a resend would have to be a blind one.
    let settings = [("FALGATE_UNCONFIRMED_SUBMIT_WAIT_SECS", "600")];
    let mut server = start_server_with(&database.url, &fal, port, &settings);
    wait_until_serving(&client, &base).await;
    let job: Value = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .json(&json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "mid-call"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    eventually("the submit to reach FAL")
        .every(Duration::from_millis(10))
        .until(async || (fal.held_calls() > 0).then_some(()))
        .await;
    server.kill().await.expect("SIGKILL");
    server.wait().await.unwrap();

    let mut server = start_server_with(&database.url, &fal, port, &settings);
    wait_until_serving(&client, &base).await;
    let request = fal.requests().remove(0);
    // Past several leases of the restarted process: nothing is sent again.
    let mut history = Value::Null;
    throughout(
        Duration::from_secs(5),
        Duration::from_millis(100),
        async || {
            assert_eq!(fal.submits().len(), 1, "sent again blind");
            history = job_detail(&client, &base, &key, &id).await;
            assert_eq!(history["status"], "pending", "{history}");
        },
    )
    .await;
    assert!(
        history["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"]["submit"] == "unconfirmed"),
        "{history}"
    );
    fal.set_request_durations(&request.id, Durations::new(0, 0));
    let done = eventually("the job to succeed")
        .or_last(async || {
            let job = job_detail(&client, &base, &key, &id).await;
            if job["status"] == "succeeded" {
                Ok(job)
            } else {
                Err(job)
            }
        })
        .await
        .unwrap_or_else(|job| panic!("never finished: {job}"));
    assert_eq!(done["fal_request_id"], request.id.as_str());
    assert_eq!(fal.submits().len(), 1);
    fal.release_held_calls();
    server.kill().await.ok();
    fal.shutdown().await;
    database.drop_database().await;
}

backend_tests!(killed_during_a_submit(Backend));

backend_tests!(a_receiver_down_across_a_kill_gets_every_event_once_it_is_back(Backend));

/// Killed while a receiver is down and its deliveries are failing: after the restart, and once
/// the receiver is back, every event reaches it once, signed.
async fn a_receiver_down_across_a_kill_gets_every_event_once_it_is_back(backend: Backend) {
    use crate::webhooks::{Receiver, ended};
    let Some((database, key)) = migrated_database(backend).await else {
        return;
    };
    let fal = fast_emulator().await;
    let (port, base, client) = address_and_client();
    // Nothing listens here until the receiver comes back.
    let receiver_port = free_port();
    let schedule = vec!["0.2"; 50].join(",");
    let settings = [
        ("FALGATE_WEBHOOK_ALLOW_HTTP", "true"),
        ("FALGATE_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ("FALGATE_WEBHOOK_HOSTS", "receiver.test=127.0.0.1"),
        ("FALGATE_WEBHOOK_RETRY_SCHEDULE", schedule.as_str()),
        // A delivery under way at the kill waits out its lease (the timeout and a little).
        ("FALGATE_WEBHOOK_TIMEOUT_SECS", "2"),
    ];
    let mut server = start_server_with(&database.url, &fal, port, &settings);
    wait_until_serving(&client, &base).await;
    let endpoint: Value = client
        .post(format!("{base}/v1/webhook-endpoints"))
        .bearer_auth(&key)
        .json(
            &json!({"url": format!("http://receiver.test:{receiver_port}/hook"),
                      "event_types": ["job.succeeded"]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = endpoint["secret"].as_str().expect("a secret").to_owned();
    let mut jobs = Vec::new();
    for n in 0..6 {
        let job: Value = client
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(&key)
            .json(
                &json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": format!("kept {n}")}}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        jobs.push(job["id"].as_str().unwrap().to_owned());
    }
    let deliveries = format!(
        "/v1/webhook-endpoints/{}/deliveries",
        endpoint["id"].as_str().unwrap()
    );
    eventually("every job's end failing to reach the receiver")
        .until(async || {
            let attempts = get_json(&client, &base, &key, &deliveries).await;
            let failing: std::collections::HashSet<String> = items(&attempts)
                .iter()
                .map(|a| a["event_id"].as_str().unwrap().to_owned())
                .collect();
            (failing.len() == jobs.len()).then_some(())
        })
        .await;
    server.kill().await.expect("SIGKILL");
    server.wait().await.unwrap();

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", receiver_port))
        .await
        .unwrap();
    let (receiver, _) = Receiver::serve(listener, &[]);
    let mut server = start_server_with(&database.url, &fal, port, &settings);
    wait_until_serving(&client, &base).await;
    let received = receiver
        .until("every job's end delivered", |r| {
            jobs.iter().all(|job| ended(r, job))
        })
        .await;
    let mut ids: Vec<&str> = received.iter().map(|r| r.webhook_id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), received.len(), "an event delivered twice");
    assert_eq!(received.len(), jobs.len());
    assert!(received.iter().all(|r| r.verifies_with(&secret)));
    server.kill().await.expect("SIGKILL");
    fal.shutdown().await;
    database.drop_database().await;
}
