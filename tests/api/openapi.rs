//! The OpenAPI document: committed, served, and telling the truth about auth and errors.

use crate::backend_test;
use reqwest::Method;
use serde_json::Value;

const COMMITTED: &str = include_str!("../../openapi/openapi.json");

#[test]
fn the_committed_spec_matches_the_code() {
    let generated = falgate::http::openapi().to_pretty_json().unwrap();
    assert!(
        generated.trim_end() == COMMITTED.trim_end(),
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn every_v1_operation_declares_bearer_auth_and_its_errors() {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut operations = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if !path.starts_with("/v1/") || path.starts_with("/v1/fal/webhook") {
                continue;
            }
            operations += 1;
            assert_eq!(
                operation["security"][0]["bearer"],
                serde_json::json!([]),
                "{method} {path}"
            );
            let responses = operation["responses"].as_object().unwrap();
            assert!(responses.contains_key("401"), "{method} {path} lacks 401");
            let problem =
                &responses["401"]["content"]["application/problem+json"]["schema"]["$ref"];
            assert_eq!(problem, "#/components/schemas/Problem", "{method} {path}");
        }
    }
    assert!(operations >= 4);
}

backend_test!(the_spec_and_swagger_ui_are_served, |app| {
    let served: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed: Value = serde_json::from_str(COMMITTED).unwrap();
    assert_eq!(served, committed);

    let docs = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), reqwest::StatusCode::OK);
    let html = docs.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    // The UI's assets are vendored: served from the binary, no network at build or run time.
    let config = app
        .request(Method::GET, "/docs/swagger-initializer.js")
        .send()
        .await
        .unwrap();
    assert_eq!(config.status(), reqwest::StatusCode::OK);
    assert!(config.text().await.unwrap().contains("/openapi.json"));
});
