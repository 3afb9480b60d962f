//! Every malformed request gets a 4xx problem document, never a 5xx or plain text.

use crate::backend_test;
use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

backend_test!(body_validation_names_the_field, |app| {
    let cases = [
        (
            json!({"endpoint": "fal-ai/not-allowed", "input": {}}),
            "endpoint",
        ),
        (json!({"endpoint": "no-slash", "input": {}}), "endpoint"),
        (
            json!({"endpoint": "fal-ai/flux-lora", "input": "a string"}),
            "input",
        ),
        (
            json!({"endpoint": "fal-ai/flux-lora", "input": [1, 2]}),
            "input",
        ),
        (
            json!({"endpoint": "fal-ai/flux-lora", "input": {}, "extra": 1}),
            "extra",
        ),
        (json!({"input": {}}), "body"),
        (json!({"endpoint": 42, "input": {}}), "endpoint"),
        (json!([1, 2, 3]), "body"),
        (
            json!(["fal-ai/flux-lora", {"prompt": "positional"}]),
            "body",
        ),
        (json!("fal-ai/flux-lora"), "body"),
        (
            json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "a\u{0}b"}}),
            "input.prompt",
        ),
    ];
    for (body, field) in cases {
        let response = app
            .request(Method::POST, "/v1/jobs")
            .json(&body)
            .send()
            .await
            .unwrap();
        let problem = problem(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        )
        .await;
        assert_eq!(fields(&problem), vec![field.to_owned()], "{body}");
    }
    // Unknown fields are named in the message.
    let response = app
        .request(Method::POST, "/v1/jobs")
        .json(&json!({"endpoint": "fal-ai/flux-lora", "input": {}, "priority": "high"}))
        .send()
        .await
        .unwrap();
    let body = problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("priority"),
        "{body}"
    );

    // Nothing was stored by any of them.
    let list: serde_json::Value = app.get_json("/v1/jobs").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
});

backend_test!(malformed_bodies_are_client_errors, |app| {
    let response = app
        .request(Method::POST, "/v1/jobs")
        .header("content-type", "application/json")
        .body("{\"endpoint\": ")
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST, "bad_request").await;

    let response = app
        .request(Method::POST, "/v1/jobs")
        .body(r#"{"endpoint":"fal-ai/flux-lora","input":{}}"#)
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    let response = app
        .request(Method::POST, "/v1/jobs")
        .header("content-type", "text/plain")
        .body(r#"{"endpoint":"fal-ai/flux-lora","input":{}}"#)
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
});

backend_test!(
    bodies_over_the_limit_get_413,
    |config| {
        config.body_limit = 2048;
    },
    |app| {
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
);

backend_test!(bad_paths_and_queries_are_422s_naming_the_parameter, |app| {
    let response = app
        .request(Method::GET, "/v1/jobs/not-a-uuid")
        .send()
        .await
        .unwrap();
    let body = problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(fields(&body), vec!["id"]);

    let response = app
        .request(Method::POST, "/v1/jobs/123/cancel")
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;

    for (query, field) in [
        ("status=done", "status"),
        ("status=COMPLETED", "status"),
        ("kind=video", "kind"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("avatar_id=7", "avatar_id"),
        ("cursor=garbage", "cursor"),
        ("colour=red", "colour"),
    ] {
        let response = app
            .request(Method::GET, &format!("/v1/jobs?{query}"))
            .send()
            .await
            .unwrap();
        let body = problem(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        )
        .await;
        assert_eq!(fields(&body), vec![field.to_owned()], "{query}: {body}");
    }
});

backend_test!(unknown_routes_and_methods_answer_in_problem_json, |app| {
    let response = app
        .request(Method::GET, "/v1/nothing-here")
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = app
        .request(Method::DELETE, "/v1/jobs")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let id = uuid::Uuid::now_v7();
    let response = app
        .request(Method::GET, &format!("/v1/jobs/{id}"))
        .send()
        .await
        .unwrap();
    let body = problem(response, StatusCode::NOT_FOUND, "not_found").await;
    assert!(body["detail"].as_str().unwrap().contains(&id.to_string()));
});

backend_test!(request_ids_are_echoed_or_made, |app| {
    let response = app
        .request(Method::GET, "/v1/jobs/not-a-uuid")
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-abc-123");
    let body = problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(body["request_id"], "trace-abc-123");

    let response = app.request(Method::GET, "/v1/jobs").send().await.unwrap();
    let made = response.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(made).is_ok(), "{made}");
});
