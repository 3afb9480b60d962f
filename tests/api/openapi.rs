//! The OpenAPI document: committed, served, and telling the truth about auth and errors.

use crate::backend_tests;
use crate::support::*;
use reqwest::Method;
use serde_json::{Value, json};

pub(crate) const COMMITTED: &str = include_str!("../../openapi/openapi.json");

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
            let problem = &resolve(&spec, &responses["401"])["content"]["application/problem+json"]
                ["schema"]["$ref"];
            assert_eq!(problem, "#/components/schemas/Problem", "{method} {path}");
        }
    }
    assert!(operations >= 4);
}

backend_tests!(the_spec_and_swagger_ui_are_served);
async fn the_spec_and_swagger_ui_are_served(app: &TestApp) {
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
    let config = app.get("/docs/swagger-initializer.js").await;
    assert_eq!(config.status(), reqwest::StatusCode::OK);
    let config = config.text().await.unwrap();
    assert!(config.contains("/openapi.json"));
    // Swagger UI sends the spec's URL to an online validator unless told not to.
    let compact: String = config.split_whitespace().collect();
    assert!(compact.contains(r#""validatorUrl":"none""#), "{config}");
}

/// Every route and method, with every status it can answer. 500 and 503 (database down, or the
/// connection limit reached) can come from any route but the liveness probe; 401 from any
/// route behind an API key; 400, 413 and 415 from any route that reads a body of a content type.
const ANSWERS: &[(&str, &str, &[u16])] = &[
    ("get", "/healthz", &[200, 500]),
    ("get", "/readyz", &[200, 500, 503]),
    ("get", "/metrics", &[200, 500, 503]),
    ("get", "/v1/jobs", &[200, 401, 422, 500, 503]),
    (
        "post",
        "/v1/jobs",
        &[202, 400, 401, 409, 413, 415, 422, 500, 503],
    ),
    ("get", "/v1/jobs/{id}", &[200, 401, 404, 422, 500, 503]),
    (
        "post",
        "/v1/jobs/{id}/cancel",
        &[200, 401, 404, 409, 422, 500, 503],
    ),
    (
        "post",
        "/v1/fal/webhook/{job_id}",
        &[200, 400, 401, 413, 422, 500, 503],
    ),
    ("get", "/v1/avatars", &[200, 401, 422, 500, 503]),
    (
        "post",
        "/v1/avatars",
        &[201, 400, 401, 409, 413, 415, 422, 500, 503],
    ),
    ("get", "/v1/avatars/{id}", &[200, 401, 404, 422, 500, 503]),
    (
        "delete",
        "/v1/avatars/{id}",
        &[204, 401, 404, 422, 500, 503],
    ),
    (
        "get",
        "/v1/avatars/{id}/lora",
        &[200, 401, 404, 422, 500, 503],
    ),
    (
        "get",
        "/v1/avatars/{id}/photos",
        &[200, 401, 404, 422, 500, 503],
    ),
    (
        "post",
        "/v1/avatars/{id}/photos",
        &[201, 400, 401, 404, 409, 413, 415, 422, 500, 503],
    ),
    (
        "get",
        "/v1/avatars/{id}/photos/{photo_id}",
        &[200, 401, 404, 422, 500, 503],
    ),
    (
        "patch",
        "/v1/avatars/{id}/photos/{photo_id}",
        &[200, 400, 401, 404, 413, 415, 422, 500, 503],
    ),
    (
        "delete",
        "/v1/avatars/{id}/photos/{photo_id}",
        &[204, 401, 404, 422, 500, 503],
    ),
    (
        "post",
        "/v1/avatars/{id}/trainings",
        &[202, 400, 401, 404, 409, 413, 415, 422, 500, 503],
    ),
    (
        "post",
        "/v1/generations",
        &[202, 400, 401, 404, 409, 413, 415, 422, 500, 503],
    ),
    ("get", "/v1/batches/{id}", &[200, 401, 404, 422, 500, 503]),
    ("get", "/v1/events", &[200, 401, 422, 500, 503]),
    ("get", "/v1/events/{id}", &[200, 401, 404, 422, 500, 503]),
    ("get", "/v1/trainers", &[200, 401, 500, 503]),
    ("get", "/v1/events/stream", &[200, 401, 422, 429, 500, 503]),
    (
        "get",
        "/v1/jobs/{id}/events",
        &[200, 401, 404, 422, 429, 500, 503],
    ),
    (
        "get",
        "/v1/batches/{id}/events",
        &[200, 401, 404, 422, 429, 500, 503],
    ),
    ("get", "/v1/webhook-endpoints", &[200, 401, 500, 503]),
    (
        "post",
        "/v1/webhook-endpoints",
        &[201, 400, 401, 413, 415, 422, 500, 503],
    ),
    (
        "get",
        "/v1/webhook-endpoints/{id}",
        &[200, 401, 404, 422, 500, 503],
    ),
    (
        "patch",
        "/v1/webhook-endpoints/{id}",
        &[200, 400, 401, 404, 413, 415, 422, 500, 503],
    ),
    (
        "delete",
        "/v1/webhook-endpoints/{id}",
        &[204, 401, 404, 422, 500, 503],
    ),
    (
        "post",
        "/v1/webhook-endpoints/{id}/rotate-secret",
        &[200, 401, 404, 422, 500, 503],
    ),
    (
        "post",
        "/v1/webhook-endpoints/{id}/test",
        &[202, 401, 404, 409, 422, 429, 500, 503],
    ),
    (
        "get",
        "/v1/webhook-endpoints/{id}/deliveries",
        &[200, 401, 404, 422, 500, 503],
    ),
    ("get", "/v1/webhooks/default-secret", &[200, 401, 500, 503]),
    (
        "post",
        "/v1/events/{id}/redeliver",
        &[202, 401, 404, 422, 500, 503],
    ),
];

/// Follows a local `$ref` (`#/components/...`) in the spec; anything else is answered as is.
fn resolve<'a>(spec: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(pointer) => spec
            .pointer(pointer.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {pointer}")),
        None => value,
    }
}

#[test]
fn every_route_declares_exactly_the_statuses_it_can_answer() {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    let mut declared = std::collections::BTreeMap::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let statuses: Vec<u16> = operation["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|s| s.parse().unwrap())
                .collect();
            declared.insert((method.clone(), path.clone()), statuses);
        }
    }
    let mut wrong = Vec::new();
    for (method, path, answers) in ANSWERS {
        let key = (method.to_string(), path.to_string());
        match declared.remove(&key) {
            None => wrong.push(format!("{method} {path}: not in the spec")),
            Some(statuses) => {
                let missing: Vec<_> = answers.iter().filter(|s| !statuses.contains(s)).collect();
                let extra: Vec<_> = statuses.iter().filter(|s| !answers.contains(s)).collect();
                if !missing.is_empty() || !extra.is_empty() {
                    wrong.push(format!(
                        "{method} {path}: undeclared {missing:?}, declared but never answered {extra:?}"
                    ));
                }
            }
        }
    }
    for (method, path) in declared.keys() {
        wrong.push(format!("{method} {path}: in the spec but not in the table"));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Every error answer is a problem document a generator can type.
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                let status: u16 = status.parse().unwrap();
                if status < 400 || path == "/readyz" {
                    continue;
                }
                let schema = &resolve(&spec, response)["content"]["application/problem+json"]["schema"]
                    ["$ref"];
                assert_eq!(
                    schema, "#/components/schemas/Problem",
                    "{method} {path} {status}"
                );
            }
        }
    }
}

#[test]
fn downloads_and_metrics_have_a_content_type_and_schema() {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    let lora = &spec["paths"]["/v1/avatars/{id}/lora"]["get"]["responses"]["200"]["content"];
    let lora = resolve(&spec, &lora["application/octet-stream"]["schema"]);
    assert_eq!(
        (&lora["type"], &lora["format"]),
        (&json!("string"), &json!("binary"))
    );
    let metrics = &spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"];
    assert_eq!(metrics["text/plain"]["schema"]["type"], "string");
}

#[test]
fn the_spec_holds_the_rules_the_server_enforces() {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    let schemas = &spec["components"]["schemas"];
    for path in ["/v1/jobs", "/v1/avatars"] {
        let limit = spec["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap();
        assert_eq!(
            (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
            (&json!(1), &json!(100)),
            "{path}"
        );
    }
    let mut keys = 0;
    for item in spec["paths"].as_object().unwrap().values() {
        for operation in item.as_object().unwrap().values() {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                if parameter["name"] == "Idempotency-Key" {
                    keys += 1;
                    let schema = &parameter["schema"];
                    assert_eq!(
                        (
                            &schema["minLength"],
                            &schema["maxLength"],
                            &schema["pattern"]
                        ),
                        (&json!(1), &json!(255), &json!("^[!-~]+$"))
                    );
                }
            }
        }
    }
    assert_eq!(keys, 5, "every creating POST takes an Idempotency-Key");
    let name = &schemas["CreateAvatarRequest"]["properties"]["name"];
    assert_eq!(
        (&name["minLength"], &name["maxLength"]),
        (&json!(1), &json!(100))
    );
    // Text the server trims and refuses when nothing is left: at least one visible character.
    let generation = &schemas["CreateGenerationRequest"]["allOf"][0]["properties"];
    for text in [
        name,
        &schemas["CreateAvatarRequest"]["properties"]["trigger_phrase"],
        &generation["prompt"],
        &generation["prompts"]["items"],
    ] {
        assert_eq!(text["pattern"], "\\S", "{text}");
    }
    for path in ["/v1/jobs", "/v1/avatars"] {
        let cursor = spec["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "cursor")
            .unwrap();
        assert_eq!(cursor["schema"]["pattern"], "^[A-Za-z0-9_-]+$", "{path}");
    }
    assert_eq!(schemas["PhotoUpload"]["properties"]["files"]["minItems"], 1);
    let endpoints = &schemas["CreateJobRequest"]["properties"]["endpoint"];
    assert_eq!(
        endpoints["enum"],
        json!(falgate::domain::endpoint::default_allowed())
    );
    assert!(
        endpoints["description"]
            .as_str()
            .unwrap()
            .contains("FALGATE_ALLOWED_ENDPOINTS")
    );
}

/// A strict validator for what `method path` answers with `status`: `$ref`s resolve against the
/// spec's components, formats are checked, and a property the spec does not declare is an error.
fn validator(spec: &Value, method: &str, path: &str, status: &str) -> jsonschema::Validator {
    let response = resolve(spec, &spec["paths"][path][method]["responses"][status]);
    let content = &response["content"];
    let schema = content
        .get("application/json")
        .or_else(|| content.get("application/problem+json"))
        .unwrap_or_else(|| panic!("{method} {path} {status} declares no JSON body"))["schema"]
        .clone();
    let mut schemas = spec["components"]["schemas"].clone();
    // A job with its history is the job's fields and `events`, one closed object.
    let mut detail = schemas["JobView"].clone();
    detail["properties"]["events"] =
        schemas["JobDetail"]["allOf"][1]["properties"]["events"].clone();
    detail["required"]
        .as_array_mut()
        .unwrap()
        .push(json!("events"));
    schemas["JobDetail"] = detail;
    close_objects(&mut schemas);
    let root = json!({"components": {"schemas": schemas}, "allOf": [schema]});
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("{method} {path} {status}: {e}"))
}

/// Every object schema with declared properties refuses the undeclared ones, and an integer of
/// a declared width holds no number past it, as a generated client's validator reads them.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), json!(false));
            }
            let (min, max) = match map.get("format").and_then(Value::as_str) {
                Some("int64") => (json!(i64::MIN), json!(i64::MAX)),
                Some("int32") => (json!(i32::MIN), json!(i32::MAX)),
                _ => (Value::Null, Value::Null),
            };
            if !min.is_null() {
                map.entry("minimum").or_insert(min);
                map.entry("maximum").or_insert(max);
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

pub(crate) fn assert_valid(spec: &Value, method: &str, path: &str, status: &str, body: &Value) {
    let validator = validator(spec, method, path, status);
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not match the spec:\n{}\n{body:#}",
        errors.join("\n")
    );
}

/// A seed above 2^63 (a real one FAL answered) and the largest a seed can be.
const BIG_SEED: &str = "17454220438242315174";
const MAX_SEED: u64 = u64::MAX;

backend_tests!(real_responses_match_the_spec_strictly);
async fn real_responses_match_the_spec_strictly(app: &TestApp) {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    let (avatar, _) = crate::avatars::trained_with_lora_copy(app).await;

    // One seed as a string of digits, one as a JSON integer: both are taken exactly.
    let mut batches = Vec::new();
    for seed in [json!(BIG_SEED), json!(MAX_SEED)] {
        let response = app
            .request(Method::POST, "/v1/generations")
            .json(&json!({"avatar_id": avatar, "prompts": ["a lighthouse", "a harbour"], "seed": seed}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
        let created: Value = response.json().await.unwrap();
        assert_valid(&spec, "post", "/v1/generations", "202", &created);
        let id = created["id"].as_str().unwrap().to_owned();
        let done = wait_for_batch(app, &id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_valid(&spec, "get", "/v1/batches/{id}", "200", &done);
        batches.push((seed, done));
    }
    for (seed, batch) in &batches {
        let exact: u64 = match seed {
            Value::String(digits) => digits.parse().unwrap(),
            other => other.as_u64().unwrap(),
        };
        for job in batch["jobs"].as_array().unwrap() {
            assert_eq!(
                job["input"]["seed"].as_u64(),
                Some(exact),
                "sent to FAL exactly"
            );
            assert_eq!(
                job["result"]["seed"].as_u64(),
                Some(exact),
                "FAL's output verbatim"
            );
            assert_eq!(job["output"]["seed"], json!(exact.to_string()), "{job}");
            let id = job["id"].as_str().unwrap();
            let detail = app.job(id).await;
            assert_eq!(detail["output"]["seed"], json!(exact.to_string()));
            assert_valid(&spec, "get", "/v1/jobs/{id}", "200", &detail);
        }
    }

    let page = app.get_json("/v1/jobs?limit=100").await;
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        5,
        "a training and four generations"
    );
    assert_valid(&spec, "get", "/v1/jobs", "200", &page);
    let one = app.get_json(&format!("/v1/avatars/{avatar}")).await;
    assert!(!one["artifact"]["lora_copy"].is_null());
    assert_valid(&spec, "get", "/v1/avatars/{id}", "200", &one);
    let avatars = app.get_json("/v1/avatars").await;
    assert_valid(&spec, "get", "/v1/avatars", "200", &avatars);
    let photos = app.get_json(&format!("/v1/avatars/{avatar}/photos")).await;
    assert_eq!(photos["items"].as_array().unwrap().len(), 10);
    assert_valid(&spec, "get", "/v1/avatars/{id}/photos", "200", &photos);
    let photo_id = photos["items"][0]["id"].as_str().unwrap();
    let photo = app
        .get_json(&format!("/v1/avatars/{avatar}/photos/{photo_id}"))
        .await;
    assert_valid(
        &spec,
        "get",
        "/v1/avatars/{id}/photos/{photo_id}",
        "200",
        &photo,
    );
    // Events of every kind of resource: an avatar, jobs, batches.
    let events = eventually("the batches told complete")
        .until(async || {
            let events = app.get_json("/v1/events?limit=100").await;
            let told: Vec<&str> = events["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["type"].as_str().unwrap())
                .collect();
            let completed = told.iter().filter(|t| **t == "batch.completed").count();
            (told.contains(&"avatar.ready") && completed == 2).then_some(events)
        })
        .await;
    assert_valid(&spec, "get", "/v1/events", "200", &events);
    let event = app
        .get_json(&format!(
            "/v1/events/{}",
            events["items"][0]["id"].as_str().unwrap()
        ))
        .await;
    assert_valid(&spec, "get", "/v1/events/{id}", "200", &event);
    let raw = app.create_job(&app.key, "a raw job").await;
    assert_valid(&spec, "post", "/v1/jobs", "202", &raw);
    let cancel = app
        .post(&format!("/v1/jobs/{}/cancel", raw["id"].as_str().unwrap()))
        .await;
    // The emulator may have finished the job already: either answer is in the spec.
    let status = cancel.status().as_u16().to_string();
    let cancel: Value = cancel.json().await.unwrap();
    assert_valid(&spec, "post", "/v1/jobs/{id}/cancel", &status, &cancel);

    // Errors too: a problem document with its field list, and one without.
    let refused = app.get("/v1/jobs?limit=0").await;
    assert_eq!(refused.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    let refused: Value = refused.json().await.unwrap();
    assert_valid(&spec, "get", "/v1/jobs", "422", &refused);
    let unknown: Value = app
        .get_json(&format!("/v1/jobs/{}", uuid::Uuid::now_v7()))
        .await;
    assert_valid(&spec, "get", "/v1/jobs/{id}", "404", &unknown);
}

/// A validator for a component schema of the spec (a request body).
fn component_validator(spec: &Value, name: &str) -> jsonschema::Validator {
    let root = json!({
        "components": spec["components"].clone(),
        "$ref": format!("#/components/schemas/{name}"),
    });
    jsonschema::draft202012::options().build(&root).unwrap()
}

backend_tests!(seeds_are_taken_as_integers_or_digits_and_nothing_else);
async fn seeds_are_taken_as_integers_or_digits_and_nothing_else(app: &TestApp) {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    let request = component_validator(&spec, "CreateGenerationRequest");
    let avatar = uuid::Uuid::now_v7();
    // What the spec refuses, the server refuses, naming the field.
    for seed in [
        json!(-1),
        json!(1.5),
        json!("12a"),
        json!(""),
        json!(" 7"),
        json!(true),
        // Past u64, which a pattern cannot bound (the spec says so in words).
        json!("18446744073709551616"),
    ] {
        let body = json!({"avatar_id": avatar, "prompt": "x", "seed": seed});
        assert!(
            !request.is_valid(&body) || seed == "18446744073709551616",
            "the spec takes seed {seed}"
        );
        let response = app.post_json("/v1/generations", &body).await;
        assert_refused_naming(response, &["seed"], format_args!("seed {seed}")).await;
    }
    // What the spec takes gets past the body's checks (to the unknown avatar).
    for seed in [
        json!(0),
        json!(u64::MAX),
        json!("18446744073709551615"),
        json!("007"),
        Value::Null,
    ] {
        let body = json!({"avatar_id": avatar, "prompt": "x", "seed": seed});
        assert!(request.is_valid(&body), "the spec refuses seed {seed}");
        let response = app.post_json("/v1/generations", &body).await;
        problem(response, reqwest::StatusCode::NOT_FOUND, "not_found").await;
    }
    // Exactly one of `prompt` and `prompts`, in the spec as on the server; a `null` is
    // as good as absent.
    for body in [
        json!({"avatar_id": avatar, "prompt": null, "prompts": ["y"]}),
        json!({"avatar_id": avatar, "prompt": "x", "prompts": null}),
    ] {
        assert!(request.is_valid(&body), "the spec refuses {body}");
        let response = app.post_json("/v1/generations", &body).await;
        problem(response, reqwest::StatusCode::NOT_FOUND, "not_found").await;
    }
    for body in [
        json!({"avatar_id": avatar}),
        json!({"avatar_id": avatar, "prompt": "x", "prompts": ["y"]}),
    ] {
        assert!(!request.is_valid(&body), "the spec takes {body}");
        let response = app.post_json("/v1/generations", &body).await;
        assert_eq!(
            response.status(),
            reqwest::StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
    }
}

backend_tests!(a_server_serves_a_spec_with_its_own_limits, |config| {
    config
        .allowed_endpoints
        .push("fal-ai/flux/dev".parse().unwrap());
    config.avatars.max_photos = 12;
    config.avatars.max_batch = 3;
});
async fn a_server_serves_a_spec_with_its_own_limits(app: &TestApp) {
    let served: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &served["components"]["schemas"];
    let endpoints = schemas["CreateJobRequest"]["properties"]["endpoint"]["enum"]
        .as_array()
        .unwrap();
    assert!(
        endpoints.contains(&json!("fal-ai/flux/dev")),
        "{endpoints:?}"
    );
    assert_eq!(
        schemas["PhotoUpload"]["properties"]["files"]["maxItems"],
        12
    );
    assert_eq!(
        schemas["CreateGenerationRequest"]["allOf"][0]["properties"]["prompts"]["maxItems"],
        3
    );
    let created = app
        .request(Method::POST, "/v1/jobs")
        .json(&json!({"endpoint": "fal-ai/flux/dev", "input": {"prompt": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), reqwest::StatusCode::ACCEPTED);
}

#[test]
fn the_response_validator_is_strict() {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    let validator = validator(&spec, "get", "/v1/jobs", "200");
    assert!(validator.is_valid(&json!({"items": [], "next_cursor": null})));
    // A property the spec does not declare.
    assert!(!validator.is_valid(&json!({"items": [], "next_cursor": null, "total": 3})));
    // An int32 past its width, as a generated client would refuse it.
    let job_view = validator_for_component(&spec, "JobView");
    let mut job = json!({
        "id": uuid::Uuid::now_v7(), "kind": "raw", "status": "pending",
        "endpoint": "fal-ai/flux-lora", "input": {}, "attempts": 0, "sandbox": true,
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
    });
    assert!(job_view.is_valid(&job), "{job}");
    job["attempts"] = json!(1u64 << 40);
    assert!(!job_view.is_valid(&job));
    job["attempts"] = json!(0);
    job["output"] = json!({"images": [], "has_nsfw_concepts": [], "seed": 17454220438242315174u64});
    assert!(!job_view.is_valid(&job), "a seed is digits, not a number");
    job["output"]["seed"] = json!(BIG_SEED);
    assert!(job_view.is_valid(&job));
}

/// The strict validator of one component schema.
fn validator_for_component(spec: &Value, name: &str) -> jsonschema::Validator {
    let mut schemas = spec["components"]["schemas"].clone();
    close_objects(&mut schemas);
    let root = json!({
        "components": {"schemas": schemas},
        "$ref": format!("#/components/schemas/{name}"),
    });
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap()
}

backend_tests!(
    every_creating_post_declares_the_body_errors_it_answers,
    |config| {
        config.body_limit = 2048;
        config.avatars.max_upload_bytes = 4096;
    }
);
async fn every_creating_post_declares_the_body_errors_it_answers(app: &TestApp) {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    let avatar: Value = app
        .request(Method::POST, "/v1/avatars")
        .json(&json!({"name": "Ada", "kind": "character"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = avatar["id"].as_str().unwrap();
    let json_posts = [
        ("/v1/jobs", "/v1/jobs".to_owned()),
        ("/v1/avatars", "/v1/avatars".to_owned()),
        (
            "/v1/avatars/{id}/trainings",
            format!("/v1/avatars/{id}/trainings"),
        ),
        ("/v1/generations", "/v1/generations".to_owned()),
    ];
    let photos = (
        "/v1/avatars/{id}/photos",
        format!("/v1/avatars/{id}/photos"),
    );
    let big = "x".repeat(8192);
    let mut answered = Vec::new();
    for (route, url) in &json_posts {
        for (content_type, body) in [
            ("application/json", "{\"not json".to_owned()),
            ("text/plain", "{}".to_owned()),
            ("application/json", format!("{{\"pad\": \"{big}\"}}")),
        ] {
            let response = app
                .request(Method::POST, url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            answered.push((*route, response.status().as_u16(), response));
        }
    }
    let (route, url) = &photos;
    let boundary = "b0undary";
    for (content_type, body) in [
        (
            format!("multipart/form-data; boundary={boundary}"),
            "garbage, no parts".to_owned(),
        ),
        ("application/json".to_owned(), "{}".to_owned()),
        (
            format!("multipart/form-data; boundary={boundary}"),
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n{big}\r\n--{boundary}--\r\n"
            ),
        ),
    ] {
        let response = app
            .request(Method::POST, url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        answered.push((*route, response.status().as_u16(), response));
    }
    for chunk in answered.chunks(3) {
        let route = chunk[0].0;
        let statuses: Vec<u16> = chunk.iter().map(|(_, status, _)| *status).collect();
        assert_eq!(statuses, [400, 415, 413], "POST {route}");
    }
    for (route, status, response) in answered {
        let body: Value = response.json().await.unwrap();
        assert_valid(&spec, "post", route, &status.to_string(), &body);
    }
}

#[test]
fn deliveries_are_described_as_webhooks_a_generator_can_type() {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    let delivery = &spec["webhooks"]["event"]["post"];
    assert_eq!(
        delivery["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/EventView"
    );
    let headers: Vec<&str> = delivery["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        headers,
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
    );
    // Every event type is named in the schema the body refers to.
    let types = &spec["components"]["schemas"]["EventType"]["enum"];
    for kind in [
        "job.succeeded",
        "avatar.ready",
        "batch.completed",
        "webhook_endpoint.test",
    ] {
        assert!(types.as_array().unwrap().contains(&json!(kind)), "{kind}");
    }
}
