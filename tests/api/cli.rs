//! The command line, run as a user would run it.

use crate::support::*;
use std::process::Command;

fn falgate(args: &[&str], database_url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_falgate"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("FAL_KEY")
        .output()
        .expect("run falgate")
}

#[tokio::test]
async fn api_keys_are_created_listed_and_revoked() {
    let database = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let url = database.url.clone();

    let created = falgate(&["api-key", "create", "--name", "billing backend"], &url);
    assert!(created.status.success(), "{created:?}");
    let stdout = String::from_utf8(created.stdout).unwrap();
    let secret = stdout
        .lines()
        .find_map(|line| line.strip_prefix("key:"))
        .map(str::trim)
        .expect("the secret is printed");
    let prefix = stdout
        .lines()
        .find_map(|line| line.strip_prefix("prefix:"))
        .map(str::trim)
        .unwrap();
    assert!(secret.starts_with(prefix));

    let listed = falgate(&["api-key", "list"], &url);
    let listing = String::from_utf8(listed.stdout).unwrap();
    assert!(listing.contains("billing backend") && listing.contains(prefix));
    assert!(!listing.contains(secret), "the secret is shown once only");

    // The stored hash is what authenticates: the printed secret works against the store.
    let store = bare_store(&database).await;
    let hash = falgate::domain::api_key::hash_key(secret);
    assert!(store.find_live_api_key(&hash.0).await.unwrap().is_some());

    let revoked = falgate(&["api-key", "revoke", prefix], &url);
    assert!(revoked.status.success(), "{revoked:?}");
    assert!(store.find_live_api_key(&hash.0).await.unwrap().is_none());
    let again = falgate(&["api-key", "revoke", prefix], &url);
    assert!(!again.status.success());
    assert!(
        String::from_utf8(again.stderr)
            .unwrap()
            .contains("no live key")
    );
    store.close().await;
    database.drop_database().await;
}

#[test]
fn bad_configuration_stops_serve_naming_the_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_falgate"))
        .args(["serve"])
        .env("FALGATE_LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("FALGATE_LISTEN"), "{stderr}");
}

#[test]
fn openapi_prints_the_spec() {
    let output = Command::new(env!("CARGO_BIN_EXE_falgate"))
        .arg("openapi")
        .output()
        .unwrap();
    assert!(output.status.success());
    let spec: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(spec["info"]["title"], "falgate");
}

#[tokio::test]
async fn serve_refuses_to_start_without_a_fal_key_or_sandbox() {
    let database = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_falgate"))
        .arg("serve")
        .env("FALGATE_STORAGE_DIR", shared_scratch_dir())
        .env("DATABASE_URL", &database.url)
        .env_remove("FAL_KEY")
        .env_remove("FALGATE_SANDBOX")
        .env("FALGATE_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("FAL_KEY") && stderr.contains("--sandbox"),
        "{stderr}"
    );
    database.drop_database().await;
}

/// The README's first command: a sandbox that prints a key, runs a job through the built-in
/// emulator, and says it is a sandbox.
#[tokio::test]
async fn serve_sandbox_runs_a_job_end_to_end() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    falgate::install_crypto_provider();
    let database = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_falgate"))
        .args(["serve", "--sandbox"])
        .env("FALGATE_STORAGE_DIR", shared_scratch_dir())
        .env("DATABASE_URL", &database.url)
        .env("FALGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("FAL_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let key = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(key) = line.trim().strip_prefix("export FALGATE_KEY=") {
                return key.to_owned();
            }
        }
        panic!("no key printed");
    })
    .await
    .expect("the sandbox prints a key");

    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let health: serde_json::Value = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["sandbox"], true);
    let job: serde_json::Value = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "sandbox", "image_size": "square"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["sandbox"], true);
    let id = job["id"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let done = loop {
        let job: serde_json::Value = client
            .get(format!("{base}/v1/jobs/{id}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "succeeded" {
            break job;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let url = done["result"]["images"][0]["url"].as_str().unwrap();
    let png = client.get(url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    child.kill().await.ok();
    database.drop_database().await;
}
