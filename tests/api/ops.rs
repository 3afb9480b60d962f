//! Health, readiness, shutdown.

use crate::backend_tests;
use crate::support::*;
use falgate::app::App;
use serde_json::Value;

backend_tests!(health_and_readiness_answer);
async fn health_and_readiness_answer(app: &TestApp) {
    let health: Value = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["sandbox"], false);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["pending_migrations"], serde_json::json!([]));
}

async fn unmigrated_database_is_not_ready(backend: Backend) {
    falgate::install_crypto_provider();
    let Some(database) = TestDatabase::create(backend).await else {
        return;
    };
    let mut config = config_for(&database.url);
    config.migrate_on_start = false;
    let storage_dir = config.avatars.storage_dir.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = App::build(config, listener).await.unwrap();
    let url = format!("http://{}/readyz", app.local_addr());
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert!(!body["pending_migrations"].as_array().unwrap().is_empty());

    // `falgate migrate` (here: the store's migrate) makes it ready without a restart.
    app.store().migrate().await.unwrap();
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    app.shutdown().await;
    database.drop_database().await;
    let _ = std::fs::remove_dir_all(storage_dir);
}

backend_tests!(unmigrated_database_is_not_ready(Backend));

#[tokio::test]
async fn shutdown_stops_accepting_connections() {
    falgate::install_crypto_provider();
    let database = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config_for(&database.url);
    let storage_dir = config.avatars.storage_dir.clone();
    let app = App::build(config, listener).await.unwrap();
    let addr = app.local_addr();
    assert!(
        reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap()
            .status()
            .is_success()
    );
    app.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    database.drop_database().await;
    let _ = std::fs::remove_dir_all(storage_dir);
}

backend_tests!(metrics_count_responses_and_jobs, without_workers);
async fn metrics_count_responses_and_jobs(app: &TestApp) {
    app.create_job(&app.key, "counted").await;
    let _ = app.client.get(app.url("/v1/jobs")).send().await.unwrap(); // a 401
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains("falgate_jobs{status=\"pending\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("falgate_jobs{status=\"succeeded\"} 0"),
        "{text}"
    );
    assert!(text.contains("falgate_fal_key_refused 0"), "{text}");
    let line = |class: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "falgate_http_responses_total{{class=\"{class}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap()
    };
    assert!(line("2xx") >= 1 && line("4xx") >= 1, "{text}");
}
