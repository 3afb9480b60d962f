//! The command line, run as a user would run it.

use crate::backend_tests;
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
/// Reads a sandbox's output until it prints its development key. The output stays the
/// child's: a server whose stdout is closed dies at its next line.
async fn printed_key(stdout: &mut tokio::process::ChildStdout) -> String {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(key) = line.trim().strip_prefix("export FALGATE_KEY=") {
                return key.to_owned();
            }
        }
        panic!("no key printed");
    })
    .await
    .expect("the sandbox prints a key")
}

#[tokio::test]
async fn serve_sandbox_runs_a_job_end_to_end() {
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
    let key = printed_key(child.stdout.as_mut().unwrap()).await;

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
    let done = eventually("the sandbox job to succeed")
        .every(std::time::Duration::from_millis(50))
        .or_last(async || {
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
                Ok(job)
            } else {
                Err(job)
            }
        })
        .await
        .unwrap_or_else(|job| panic!("{job}"));
    let url = done["result"]["images"][0]["url"].as_str().unwrap();
    let png = client.get(url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    child.kill().await.ok();
    database.drop_database().await;
}

/// Runs `falgate` with `env` on top of a clean environment for the variables it reads.
fn falgate_with(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_falgate"));
    command
        .args(args)
        .env_remove("FAL_KEY")
        .env_remove("FALGATE_SANDBOX")
        .env_remove("DATABASE_URL")
        .env("FALGATE_STORAGE_DIR", shared_scratch_dir());
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run falgate");
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn an_unopenable_sqlite_file_is_named_with_the_reason() {
    let missing_dir = std::env::temp_dir()
        .join(format!("falgate-missing-{}", uuid::Uuid::new_v4().simple()))
        .join("falgate.db");
    let url = format!("sqlite:{}", missing_dir.display());
    for args in [&["migrate"][..], &["api-key", "list"][..]] {
        let (ok, _, stderr) = falgate_with(args, &[("DATABASE_URL", &url)]);
        assert!(!ok);
        assert!(stderr.contains("DATABASE_URL"), "{stderr}");
        assert!(
            stderr.contains(&missing_dir.display().to_string()),
            "{stderr}"
        );
        assert!(stderr.contains("No such file or directory"), "{stderr}");
    }
}

#[test]
fn an_unreachable_postgres_server_is_named_at_once_without_the_password() {
    let port = free_port();
    let url = format!("postgres://falgate:hunter2-secret@127.0.0.1:{port}/falgate");
    let started = std::time::Instant::now();
    let (ok, _, stderr) = falgate_with(&["migrate"], &[("DATABASE_URL", &url)]);
    assert!(!ok);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "a refused connection is reported at once, not after the pool's timeout"
    );
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(!stderr.contains("pool timed out"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
#[cfg_attr(
    not(falgate_postgres_tests),
    ignore = "set FALGATE_TEST_POSTGRES_URL to run it"
)]
async fn a_missing_postgres_database_is_named() {
    // Only the server's address is taken from the test database; the name is one that does
    // not exist.
    let Some(database) = TestDatabase::create(Backend::Postgres).await else {
        return;
    };
    let missing = format!("falgate_missing_{}", uuid::Uuid::new_v4().simple());
    let mut url = reqwest::Url::parse(&database.url).unwrap();
    url.set_path(&format!("/{missing}"));
    let server = format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    );
    let (ok, _, stderr) = falgate_with(&["migrate"], &[("DATABASE_URL", url.as_str())]);
    assert!(!ok);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(stderr.contains(&format!("`{missing}`")), "{stderr}");
    assert!(stderr.contains(&server), "{stderr}");
    assert!(stderr.contains("no database"), "{stderr}");
    database.drop_database().await;
}

#[test]
fn bad_switches_in_the_environment_name_their_variable() {
    for (variable, value) in [
        ("FALGATE_SANDBOX", "maybe"),
        ("FALGATE_NO_MIGRATE", "2"),
        ("FALGATE_NO_WORKERS", "sure"),
    ] {
        let (ok, _, stderr) = falgate_with(&["serve"], &[(variable, value)]);
        assert!(!ok);
        assert!(
            stderr.starts_with(&format!("error: {variable}")),
            "{stderr}"
        );
        assert!(stderr.contains(&format!("`{value}`")), "{stderr}");
    }
    let (ok, _, stderr) = falgate_with(&["serve"], &[("FALGATE_LOG_FORMAT", "xml")]);
    assert!(!ok);
    assert!(stderr.contains("FALGATE_LOG_FORMAT"), "{stderr}");
    // Read as false, so a FAL key is asked for: the value was understood.
    for no in ["0", "FALSE", "off", "No"] {
        let (ok, _, stderr) = falgate_with(&["serve"], &[("FALGATE_SANDBOX", no)]);
        assert!(!ok);
        assert!(stderr.starts_with("error: FAL_KEY"), "{no}: {stderr}");
    }
}

/// Starts `falgate serve` in sandbox mode on `database_url` and returns the key it prints and
/// everything it logged until then (stderr is a pipe here, as when logs go to a file).
async fn sandbox_start(database_url: &str, switch: (&str, &str)) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let port = free_port();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_falgate"));
    command
        .arg("serve")
        .env("FALGATE_STORAGE_DIR", shared_scratch_dir())
        .env("DATABASE_URL", database_url)
        .env("FALGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .env_remove("FAL_KEY")
        .env_remove("FALGATE_SANDBOX")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if switch.0.starts_with("--") {
        command.arg(switch.0);
    } else {
        command.env(switch.0, switch.1);
    }
    let mut child = command.spawn().unwrap();
    let key = printed_key(child.stdout.as_mut().unwrap()).await;
    child.kill().await.unwrap();
    let mut logged = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logged)
        .await
        .unwrap();
    (key, logged)
}

backend_tests!(the_sandbox_keeps_one_live_key_per_database(Backend));
async fn the_sandbox_keeps_one_live_key_per_database(backend: Backend) {
    falgate::install_crypto_provider();
    let Some(database) = TestDatabase::create(backend).await else {
        return;
    };
    let url = database.url.clone();
    let (first, logged) = sandbox_start(&url, ("FALGATE_SANDBOX", "on")).await;
    assert!(logged.contains("SANDBOX MODE"), "{logged}");
    assert!(
        !logged.contains('\x1b'),
        "logs into a pipe carry no colour codes: {logged:?}"
    );
    let (second, _) = sandbox_start(&url, ("--sandbox", "")).await;
    assert_ne!(first, second);

    let store = bare_store(&database).await;
    let live = |secret: &str| {
        let hash = falgate::domain::api_key::hash_key(secret);
        let store = store.clone();
        async move { store.find_live_api_key(&hash.0).await.unwrap().is_some() }
    };
    assert!(!live(&first).await, "the first start's key is revoked");
    assert!(live(&second).await);
    let keys = store.list_api_keys().await.unwrap();
    let live_sandbox: Vec<_> = keys
        .iter()
        .filter(|k| k.name == "sandbox" && k.revoked_at.is_none())
        .collect();
    assert_eq!(live_sandbox.len(), 1, "{keys:?}");
    assert!(second.starts_with(&live_sandbox[0].prefix));

    let listed = falgate(&["api-key", "list"], &url);
    let listing = String::from_utf8(listed.stdout).unwrap();
    let live_rows: Vec<&str> = listing
        .lines()
        .filter(|line| line.ends_with("  sandbox") && line.contains("  -  "))
        .collect();
    assert_eq!(live_rows.len(), 1, "{listing}");
    assert!(live_rows[0].contains(&live_sandbox[0].prefix), "{listing}");
    store.close().await;
    database.drop_database().await;
}

#[tokio::test]
async fn api_key_list_lines_up_its_columns() {
    let database = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let url = database.url.clone();
    let mut prefixes = Vec::new();
    for name in ["a", "a rather longer name for a key"] {
        let created = falgate(&["api-key", "create", "--name", name], &url);
        let stdout = String::from_utf8(created.stdout).unwrap();
        prefixes.push(
            stdout
                .lines()
                .find_map(|line| line.strip_prefix("prefix:"))
                .map(|p| p.trim().to_owned())
                .unwrap(),
        );
    }
    assert!(
        falgate(&["api-key", "revoke", &prefixes[0]], &url)
            .status
            .success()
    );
    let listed = falgate(&["api-key", "list"], &url);
    assert!(listed.status.success());
    let listing = String::from_utf8(listed.stdout).unwrap();
    assert!(!listing.contains('\x1b'));
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 3, "{listing}");
    let header = lines[0];
    for column in ["PREFIX", "CREATED", "REVOKED", "NAME"] {
        let at = header.find(column).unwrap();
        for line in &lines[1..] {
            let chars: Vec<char> = line.chars().collect();
            assert!(
                chars[at - 2] == ' ' && chars[at - 1] == ' ' && chars[at] != ' ',
                "{column} does not line up:\n{listing}"
            );
        }
    }
    database.drop_database().await;
}

#[tokio::test]
async fn the_sandbox_key_name_is_reserved() {
    let database = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let refused = falgate(&["api-key", "create", "--name", "sandbox"], &database.url);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8(refused.stderr)
            .unwrap()
            .contains("choose another name")
    );
    database.drop_database().await;
}
