//! The harness: the real app on port 0 with a fresh database per test, on SQLite always and on
//! PostgreSQL when `FALGATE_TEST_POSTGRES_URL` is set.

use falgate::app::App;
use falgate::config::Config;
use falgate::config::Secret;
use falgate::emulator::{EmulatorConfig, EmulatorHandle};
use falgate::store::{Store, StoreOptions};
use futures_util::FutureExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

mod resources;
mod wait;

pub use resources::*;
pub use wait::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One test's database: created fresh, dropped after.
pub struct TestDatabase {
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    File(PathBuf),
    PostgresDatabase { admin_url: String, name: String },
}

impl TestDatabase {
    /// A fresh database, or `None` when the backend is not configured (and not required).
    pub async fn create(backend: Backend) -> Option<Self> {
        match backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir()
                    .join(format!("falgate-test-{}.db", uuid::Uuid::new_v4().simple()));
                Some(Self {
                    url: format!("sqlite:{}", path.display()),
                    cleanup: Cleanup::File(path),
                })
            }
            Backend::Postgres => {
                let admin_url = match std::env::var("FALGATE_TEST_POSTGRES_URL") {
                    Ok(url) if !url.is_empty() => url,
                    _ => {
                        assert!(
                            std::env::var("FALGATE_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                            "FALGATE_REQUIRE_POSTGRES=1 but FALGATE_TEST_POSTGRES_URL is not set"
                        );
                        eprintln!("skipped: FALGATE_TEST_POSTGRES_URL is not set");
                        return None;
                    }
                };
                let name = format!("falgate_test_{}", uuid::Uuid::new_v4().simple());
                let admin = admin_connection(&admin_url).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .expect("create the test database");
                admin.close().await;
                let mut url = reqwest::Url::parse(&admin_url).expect("a postgres URL");
                url.set_path(&format!("/{name}"));
                Some(Self {
                    url: url.to_string(),
                    cleanup: Cleanup::PostgresDatabase { admin_url, name },
                })
            }
        }
    }

    pub async fn drop_database(self) {
        match self.cleanup {
            Cleanup::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Cleanup::PostgresDatabase { admin_url, name } => {
                let admin = admin_connection(&admin_url).await;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await
                .expect("drop the test database");
                admin.close().await;
            }
        }
    }
}

async fn admin_connection(url: &str) -> sqlx::PgPool {
    let connect = async {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
    };
    match connect.await {
        Ok(pool) => pool,
        Err(err) => panic!("cannot reach the test PostgreSQL server: {err}"),
    }
}

/// A running falgate with its own database, an API key for it, and its own FAL emulator.
pub struct TestApp {
    pub app: App,
    pub fal: EmulatorHandle,
    pub base: String,
    pub client: reqwest::Client,
    pub key: String,
    pub database_url: String,
}

impl TestApp {
    pub fn store(&self) -> &Store {
        self.app.store()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with this test's API key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&self.key)
    }

    /// The tenant this test's API key stands for: the key's id.
    pub async fn tenant(&self) -> uuid::Uuid {
        self.store()
            .find_live_api_key(&falgate::domain::api_key::hash_key(&self.key).0)
            .await
            .expect("read the key")
            .expect("a live key")
            .id
    }

    pub async fn new_key(&self, name: &str) -> String {
        let (_, key) = self.store().issue_api_key(name).await.expect("issue a key");
        key.secret
    }

    /// GET `path` with this test's key, answering the JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        self.request(Method::GET, path)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json")
    }

    /// GET /v1/jobs/{id}.
    pub async fn job(&self, id: &str) -> Value {
        let response = self
            .request(Method::GET, &format!("/v1/jobs/{id}"))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("json")
    }

    /// Waits until the job is in `status`; fails at once if it ends in another state.
    pub async fn wait_for_status(&self, id: &str, status: &str) -> Value {
        eventually(format_args!("job {id} {status}"))
            .or_last(async || {
                let job = self.job(id).await;
                let now = job["status"].as_str().unwrap_or_default();
                assert!(
                    now == status || !matches!(now, "succeeded" | "failed" | "canceled"),
                    "job ended {now}, not {status}: {job}"
                );
                if now == status { Ok(job) } else { Err(job) }
            })
            .await
            .unwrap_or_else(|last| panic!("job never reached {status}: {last}"))
    }

    /// POST /v1/jobs/{id}/cancel, expecting 200.
    pub async fn cancel(&self, id: &str) -> Value {
        let response = self
            .request(Method::POST, &format!("/v1/jobs/{id}/cancel"))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("json")
    }

    /// POST /v1/jobs with a valid raw job; answers the created job.
    pub async fn create_job(&self, key: &str, prompt: &str) -> Value {
        let response = self
            .client
            .post(self.url("/v1/jobs"))
            .bearer_auth(key)
            .json(&serde_json::json!({
                "endpoint": "fal-ai/flux-lora",
                "input": {"prompt": prompt},
            }))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.json().await.expect("json")
    }
}

pub const TEST_WEBHOOK_SECRET: &str = "test-webhook-secret-0123456789abcdef";

pub fn config_for(database_url: &str) -> Config {
    Config::for_database(database_url)
}

/// Points every FAL setting at `fal`, with callbacks to the app at `app_addr`, and timings
/// short enough for tests.
pub fn point_at_emulator(
    config: &mut Config,
    fal: &EmulatorHandle,
    app_addr: std::net::SocketAddr,
) {
    config.sandbox = false;
    config.fal_key = Some(EmulatorConfig::default().key);
    config.fal_urls.queue = fal.base_url();
    config.fal_urls.rest = fal.base_url();
    config.fal_urls.jwks = fal.jwks_url();
    config.fal_urls.jwks_min_refetch = Duration::ZERO;
    config.public_url = Some(format!("http://{app_addr}").parse().expect("a URL"));
    config.webhook_secrets = vec![Secret::new(TEST_WEBHOOK_SECRET)];
    config.workers.callback_grace = Duration::from_secs(1);
    config.workers.lease = Duration::from_secs(10);
}

/// Runs `test` against a fresh app on `backend`, then shuts the app down and drops its
/// database, whether the test passed or not.
pub async fn with_app(
    backend: Backend,
    configure: impl FnOnce(&mut Config),
    test: impl AsyncFnOnce(&TestApp),
) {
    falgate::install_crypto_provider();
    let Some(database) = TestDatabase::create(backend).await else {
        return;
    };
    let fal = falgate::emulator::spawn(
        EmulatorConfig::fast(),
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut config = config_for(&database.url);
    point_at_emulator(&mut config, &fal, listener.local_addr().expect("address"));
    configure(&mut config);
    let storage_dir = config.avatars.storage_dir.clone();
    let app = App::build(config, listener).await.expect("start the app");
    let base = format!("http://{}", app.local_addr());
    let key = {
        let (_, key) = app
            .store()
            .issue_api_key("test")
            .await
            .expect("issue a key");
        key.secret
    };
    let test_app = TestApp {
        app,
        fal,
        base,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        key,
        database_url: database.url.clone(),
    };
    let outcome = AssertUnwindSafe(test(&test_app)).catch_unwind().await;
    match outcome {
        Ok(()) => {
            test_app.app.shutdown().await;
            test_app.fal.shutdown().await;
            database.drop_database().await;
            let _ = std::fs::remove_dir_all(&storage_dir);
        }
        Err(panic) => {
            database.drop_database().await;
            let _ = std::fs::remove_dir_all(&storage_dir);
            std::panic::resume_unwind(panic);
        }
    }
}

/// Opens a store on a fresh database without starting an app.
pub async fn bare_store(database: &TestDatabase) -> Store {
    Store::connect(&database.url, &StoreOptions::default())
        .await
        .expect("connect")
}

/// Reads a problem document and checks its envelope.
pub async fn problem(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.expect("a JSON problem");
    assert_eq!(body["code"], code, "problem: {body}");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["title"].is_string() && body["detail"].is_string());
    assert_eq!(body["type"], format!("urn:falgate:problem:{code}"));
    assert_eq!(body["request_id"].as_str(), request_id.as_deref());
    body
}

/// Reads the 422 `validation_failed` problem, the answer to a request with a wrong field,
/// parameter or file, and checks its envelope.
pub async fn validation_problem(response: Response) -> Value {
    problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await
}

/// The fields a validation problem names.
pub fn fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Declares a scenario's two tests, `scenario::sqlite` and `scenario::postgres`; the second is
/// reported as ignored unless the build was told of a PostgreSQL server (see `build.rs`).
///
/// - `backend_tests!(scenario)`: `async fn scenario(app: &TestApp)` on a fresh app;
/// - `backend_tests!(scenario, configure)`: the same, `configure(&mut Config)` before it starts;
/// - `backend_tests!(scenario(Backend))`: `async fn scenario(backend: Backend)` sets itself up.
///
/// Only the two wrappers are stamped out: each scenario is an ordinary function that rustfmt,
/// clippy and go-to-definition see.
#[macro_export]
macro_rules! backend_tests {
    ($scenario:ident) => {
        $crate::backend_tests!($scenario, |_| {});
    };
    ($scenario:ident, $configure:expr) => {
        $crate::backend_tests!(@wrappers $scenario, |backend| {
            $crate::support::with_app(backend, $configure, super::$scenario)
        });
    };
    ($scenario:ident(Backend)) => {
        $crate::backend_tests!(@wrappers $scenario, super::$scenario);
    };
    (@wrappers $scenario:ident, $run:expr) => {
        mod $scenario {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                ($run)($crate::support::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[cfg_attr(
                not(falgate_postgres_tests),
                ignore = "set FALGATE_TEST_POSTGRES_URL to run it"
            )]
            async fn postgres() {
                ($run)($crate::support::Backend::Postgres).await;
            }
        }
    };
}

/// Runs one SQL statement on a test app's database behind the app's back, on whichever backend
/// it is, with each bind bound in order; answers how many rows it changed.
///
/// `execute_behind_the_apps_back!(app, "UPDATE … WHERE id = $1", id)`: a macro, since the query
/// and its binds have a different type on each backend.
#[macro_export]
macro_rules! execute_behind_the_apps_back {
    ($app:expr, $sql:expr $(, $bind:expr)* $(,)?) => {{
        let url = &$app.database_url;
        if url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
            let done = sqlx::query($sql)$(.bind($bind))*.execute(&pool).await;
            pool.close().await;
            done.expect("execute").rows_affected()
        } else {
            let pool = sqlx::PgPool::connect(url).await.expect("connect");
            let done = sqlx::query($sql)$(.bind($bind))*.execute(&pool).await;
            pool.close().await;
            done.expect("execute").rows_affected()
        }
    }};
}

/// Where falgate processes started by tests keep their files: in the temporary directory, never
/// in the working tree.
pub fn shared_scratch_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("falgate-test-files")
}

/// A port nobody listens on now, for a spawned server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The environment of a spawned `falgate serve` on `port`: its database, FAL at `fal`, callbacks
/// to itself signed with the test secret, files in the shared scratch directory. A test's own
/// settings go after these and win.
pub fn spawned_server_env(
    database_url: &str,
    fal: &EmulatorHandle,
    port: u16,
) -> Vec<(&'static str, String)> {
    vec![
        (
            "FALGATE_STORAGE_DIR",
            shared_scratch_dir().display().to_string(),
        ),
        ("DATABASE_URL", database_url.to_owned()),
        ("FALGATE_LISTEN", format!("127.0.0.1:{port}")),
        ("FALGATE_PUBLIC_URL", format!("http://127.0.0.1:{port}")),
        ("FALGATE_WEBHOOK_SECRET", TEST_WEBHOOK_SECRET.to_owned()),
        ("FAL_KEY", EmulatorConfig::default().key.expose().to_owned()),
        ("FAL_QUEUE_URL", fal.base_url().to_string()),
        ("FAL_REST_URL", fal.base_url().to_string()),
        ("FAL_JWKS_URL", fal.jwks_url().to_string()),
        // The tests' own output stays readable; a test that wants the server's warnings asks.
        ("RUST_LOG", "error".to_owned()),
    ]
}

/// For scenarios that move jobs themselves, through the store, with no worker racing them.
pub fn without_workers(config: &mut Config) {
    config.run_workers = false;
}

/// Waits until a spawned falgate at `base` answers `/readyz` with a success.
pub async fn wait_until_serving(client: &reqwest::Client, base: &str) {
    eventually("falgate to start")
        .every(Duration::from_millis(25))
        .until(async || {
            let response = client.get(format!("{base}/readyz")).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
}

/// How long the reconciler leaves a job to its callback before it asks FAL itself.
pub fn with_callback_grace(grace: Duration) -> impl FnOnce(&mut Config) {
    move |config| config.workers.callback_grace = grace
}

/// Asserts that a job's events, in order, follow the life of a job that succeeded: `submitted`,
/// `running`, `succeeded`, each at most once and in that order, ending with `succeeded`. FAL's
/// callback may come before its answer to the submit is recorded (the job then moves from
/// `pending` straight on), so `submitted` and `running` may be missing; the end never is.
pub fn assert_told_a_succeeding_job(told: &[&str]) {
    const LIFE: [&str; 3] = ["job.submitted", "job.running", "job.succeeded"];
    let steps: Vec<usize> = told
        .iter()
        .map(|kind| {
            LIFE.iter()
                .position(|step| step == kind)
                .unwrap_or_else(|| panic!("{kind} in the life of a succeeding job: {told:?}"))
        })
        .collect();
    assert!(
        steps.windows(2).all(|pair| pair[0] < pair[1]),
        "out of order or told twice: {told:?}"
    );
    assert_eq!(told.last(), Some(&"job.succeeded"), "{told:?}");
}
