//! Every malformed request gets a 4xx problem document, never a 5xx or plain text.

use crate::backend_tests;
use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

backend_tests!(body_validation_names_the_field);
async fn body_validation_names_the_field(app: &TestApp) {
    assert_bodies_refused(
        app,
        "/v1/jobs",
        &[
            (
                json!({"endpoint": "fal-ai/not-allowed", "input": {}}),
                &["endpoint"],
            ),
            // FAL retired it: not on the default allow-list.
            (
                json!({"endpoint": "fal-ai/flux-pro-trainer", "input": {}}),
                &["endpoint"],
            ),
            (json!({"endpoint": "no-slash", "input": {}}), &["endpoint"]),
            (
                json!({"endpoint": "fal-ai/flux-lora", "input": "a string"}),
                &["input"],
            ),
            (
                json!({"endpoint": "fal-ai/flux-lora", "input": [1, 2]}),
                &["input"],
            ),
            (
                json!({"endpoint": "fal-ai/flux-lora", "input": {}, "extra": 1}),
                &["extra"],
            ),
            (json!({"input": {}}), &["endpoint"]),
            (json!({"endpoint": 42, "input": {}}), &["endpoint"]),
            (json!([1, 2, 3]), &["body"]),
            (
                json!(["fal-ai/flux-lora", {"prompt": "positional"}]),
                &["body"],
            ),
            (json!("fal-ai/flux-lora"), &["body"]),
            (
                json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "a\u{0}b"}}),
                &["input.prompt"],
            ),
        ],
    )
    .await;
    // Unknown fields are named in the message.
    let [body] = assert_bodies_refused(
        app,
        "/v1/jobs",
        &[(
            json!({"endpoint": "fal-ai/flux-lora", "input": {}, "priority": "high"}),
            &["priority"],
        )],
    )
    .await
    .try_into()
    .unwrap();
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("priority"),
        "{body}"
    );
    assert_nothing_stored(app, 0).await;
}

/// No job was stored, and only the `avatars` the test made itself.
async fn assert_nothing_stored(app: &TestApp, avatars: usize) {
    assert_eq!(items(&app.get_json("/v1/jobs").await).len(), 0);
    assert_eq!(items(&app.get_json("/v1/avatars").await).len(), avatars);
}

backend_tests!(malformed_bodies_are_client_errors);
async fn malformed_bodies_are_client_errors(app: &TestApp) {
    let job = r#"{"endpoint":"fal-ai/flux-lora","input":{}}"#;
    for (content_type, body, status, code) in [
        (
            Some("application/json"),
            "{\"endpoint\": ",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            None,
            job,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Some("text/plain"),
            job,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ] {
        let response = app.post_raw("/v1/jobs", content_type, body).await;
        problem(response, status, code).await;
    }
}

backend_tests!(bodies_over_the_limit_get_413, |config| {
    config.body_limit = 2048;
});
async fn bodies_over_the_limit_get_413(app: &TestApp) {
    let big = "x".repeat(4096);
    let response = app
        .request(Method::POST, "/v1/jobs")
        .json(&json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": big}}))
        .send()
        .await
        .unwrap();
    let body = problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(body["detail"].as_str().unwrap().contains("2048"), "{body}");
    // Just under the limit is fine.
    app.create_job(&app.key, &"y".repeat(1500)).await;
}

backend_tests!(a_malformed_job_id_is_a_422_naming_the_id);
async fn a_malformed_job_id_is_a_422_naming_the_id(app: &TestApp) {
    assert_queries_refused(
        app,
        &[
            ("/v1/jobs/not-a-uuid", &["id"]),
            // Not even text: the same 422, never an undeclared 400.
            ("/v1/jobs/%FF", &["id"]),
            ("/v1/avatars/%FF/photos/%FE", &["id"]),
        ],
    )
    .await;
    let response = app.post("/v1/jobs/123/cancel").await;
    validation_problem(response).await;
}

backend_tests!(a_bad_list_query_is_a_422_naming_the_parameter);
async fn a_bad_list_query_is_a_422_naming_the_parameter(app: &TestApp) {
    assert_queries_refused(
        app,
        &[
            ("/v1/jobs?status=done", &["status"]),
            ("/v1/jobs?status=COMPLETED", &["status"]),
            ("/v1/jobs?kind=video", &["kind"]),
            ("/v1/jobs?limit=0", &["limit"]),
            ("/v1/jobs?limit=101", &["limit"]),
            ("/v1/jobs?limit=ten", &["limit"]),
            ("/v1/jobs?avatar_id=7", &["avatar_id"]),
            ("/v1/jobs?cursor=garbage", &["cursor"]),
            ("/v1/jobs?colour=red", &["colour"]),
        ],
    )
    .await;
}

backend_tests!(unknown_routes_and_methods_answer_in_problem_json);
async fn unknown_routes_and_methods_answer_in_problem_json(app: &TestApp) {
    let response = app.get("/v1/nothing-here").await;
    problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = app.delete("/v1/jobs").await;
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    let body = problem(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("DELETE"),
        "{body}"
    );
    let mut allowed: Vec<&str> = allow.split(',').map(str::trim).collect();
    allowed.sort_unstable();
    assert_eq!(allowed, ["GET", "HEAD", "POST"], "{allow}");
    let job = uuid::Uuid::now_v7();
    let response = app
        .request(Method::PUT, &format!("/v1/jobs/{job}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "POST");
    problem(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    let id = uuid::Uuid::now_v7();
    let response = app.get(&format!("/v1/jobs/{id}")).await;
    let body = problem(response, StatusCode::NOT_FOUND, "not_found").await;
    assert!(body["detail"].as_str().unwrap().contains(&id.to_string()));
}

backend_tests!(request_ids_are_echoed_or_made);
async fn request_ids_are_echoed_or_made(app: &TestApp) {
    let response = app
        .request(Method::GET, "/v1/jobs/not-a-uuid")
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-abc-123");
    let body = validation_problem(response).await;
    assert_eq!(body["request_id"], "trace-abc-123");

    let response = app.get("/v1/jobs").await;
    let made = response.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(made).is_ok(), "{made}");
}

/// The message given for `field`.
fn message_for<'a>(problem: &'a serde_json::Value, field: &str) -> &'a str {
    problem["errors"]
        .as_array()
        .and_then(|errors| errors.iter().find(|e| e["field"] == field))
        .and_then(|e| e["message"].as_str())
        .unwrap_or_else(|| panic!("no error for `{field}`: {problem}"))
}

backend_tests!(every_wrong_field_of_a_body_is_named);
async fn every_wrong_field_of_a_body_is_named(app: &TestApp) {
    let avatar = id_of(&create_avatar(app, "character").await);
    let trainings = format!("/v1/avatars/{avatar}/trainings");
    let cases = [
        // Wrong types, an unknown field and a missing one, all at once.
        (
            "/v1/jobs",
            json!({"endpoint": 42, "input": "x", "priority": "high"}),
            vec!["endpoint", "input", "priority"],
        ),
        ("/v1/jobs", json!({}), vec!["endpoint", "input"]),
        // Values of the right type that are refused, along with wrong types.
        (
            "/v1/avatars",
            json!({"name": "", "kind": "robot", "trigger_phrase": "x".repeat(51)}),
            vec!["kind", "name", "trigger_phrase"],
        ),
        (
            "/v1/generations",
            json!({
                "avatar_id": "nope", "prompt": "x", "num_images": 9, "output_format": "gif",
                "aspect_ratio": "5:4", "negative_prompt": "", "preset": "best"
            }),
            vec![
                "aspect_ratio",
                "avatar_id",
                "negative_prompt",
                "num_images",
                "output_format",
                "preset",
            ],
        ),
        (
            "/v1/avatars",
            json!({"kind": "robot", "trigger_phrase": 5}),
            vec!["kind", "name", "trigger_phrase"],
        ),
        (
            "/v1/avatars",
            json!({"name": " ", "kind": "style", "trigger_phrase": ""}),
            vec!["name", "trigger_phrase"],
        ),
        (
            &trainings,
            json!({"model": "sdxl", "preset": "best", "colour": "red"}),
            vec!["colour", "model", "preset"],
        ),
        (
            &trainings,
            json!({"images_data_url": "ftp://x/y.zip", "overrides": {"steps": -1, "nonsense": 1}}),
            vec!["images_data_url", "overrides.nonsense", "overrides.steps"],
        ),
        (
            "/v1/generations",
            json!({"avatar_id": "nope", "prompt": "x", "preset": "best", "num_images": "four"}),
            vec!["avatar_id", "num_images", "preset"],
        ),
        (
            "/v1/generations",
            json!({"prompts": ["a", 7], "seed": -1}),
            vec!["avatar_id", "prompts[1]", "seed"],
        ),
        (
            "/v1/generations",
            json!({"avatar_id": avatar, "prompts": ["a", " "], "num_images": 9, "output_format": "gif"}),
            vec!["num_images", "output_format", "prompts[1]"],
        ),
        // Rules across fields are named along with the fields that did not parse.
        (
            "/v1/generations",
            json!({"avatar_id": "nope"}),
            vec!["avatar_id", "prompt"],
        ),
        (
            "/v1/generations",
            json!({"avatar_id": "nope", "prompt": "x", "prompts": ["y"], "image_size": "huge"}),
            vec!["avatar_id", "image_size", "prompt"],
        ),
        (
            "/v1/generations",
            json!({"avatar_id": avatar, "prompts": [], "safety_tolerance": "9"}),
            vec!["prompts", "safety_tolerance"],
        ),
        // Rules of this server's configuration too.
        (
            "/v1/jobs",
            json!({"endpoint": "fal-ai/not-allowed", "input": [1]}),
            vec!["endpoint", "input"],
        ),
        (
            "/v1/generations",
            json!({"avatar_id": "nope", "prompts": vec!["x"; 11]}),
            vec!["avatar_id", "prompts"],
        ),
    ];
    for (path, body, expected) in cases {
        let response = app.post_json(path, &body).await;
        let problem =
            assert_refused_naming(response, &expected, format_args!("{path} {body}")).await;
        for field in &expected {
            assert!(
                problem["detail"].as_str().unwrap().contains(field),
                "{problem}"
            );
        }
    }
    assert_nothing_stored(app, 1).await;
}

backend_tests!(a_missing_field_is_named_and_said_to_be_missing);
async fn a_missing_field_is_named_and_said_to_be_missing(app: &TestApp) {
    let [body] = assert_bodies_refused(app, "/v1/avatars", &[(json!({}), &["kind", "name"])])
        .await
        .try_into()
        .unwrap();
    assert_eq!(message_for(&body, "name"), "is required");
    assert_eq!(message_for(&body, "kind"), "is required");
    assert_nothing_stored(app, 0).await;
}

backend_tests!(every_unknown_field_is_named_as_unknown);
async fn every_unknown_field_is_named_as_unknown(app: &TestApp) {
    let [body] = assert_bodies_refused(
        app,
        "/v1/jobs",
        &[(
            json!({"endpoint": "fal-ai/flux-lora", "input": {}, "priority": 1, "when": 2}),
            &["priority", "when"],
        )],
    )
    .await
    .try_into()
    .unwrap();
    assert!(
        message_for(&body, "when").contains("unknown field"),
        "{body}"
    );
    assert_nothing_stored(app, 0).await;
}

backend_tests!(every_wrong_query_parameter_is_named);
async fn every_wrong_query_parameter_is_named(app: &TestApp) {
    assert_queries_refused(
        app,
        &[
            (
                "/v1/jobs?limit=ten&status=done&kind=video&colour=red",
                &["colour", "kind", "limit", "status"],
            ),
            (
                "/v1/jobs?avatar_id=7&status=running&status=failed",
                &["avatar_id", "status"],
            ),
            ("/v1/jobs?limit=0&cursor=garbage", &["cursor", "limit"]),
            ("/v1/jobs?limit=0&status=done", &["limit", "status"]),
            ("/v1/avatars?limit=-1&page=2", &["limit", "page"]),
            ("/v1/avatars?limit=500&cursor=x", &["cursor", "limit"]),
        ],
    )
    .await;
}

backend_tests!(a_callback_without_its_token_names_the_token);
async fn a_callback_without_its_token_names_the_token(app: &TestApp) {
    // The parameter is named, not the query.
    let job = uuid::Uuid::now_v7();
    let response = app
        .client
        .post(app.url(&format!("/v1/fal/webhook/{job}?tok=1")))
        .body("{}")
        .send()
        .await
        .unwrap();
    let body = validation_problem(response).await;
    assert_eq!(fields(&body), ["token"]);
    assert_eq!(message_for(&body, "token"), "is required");
}
