//! The requests many tests make to set a scene: API keys, avatars, photos, trainings,
//! generations and jobs, each built in one place.

use super::{TestApp, eventually, validation_problem};
use falgate::emulator::{FaultRule, HttpFault};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

impl TestApp {
    /// GET `path` with this test's key.
    pub async fn get(&self, path: &str) -> Response {
        self.send(Method::GET, path).await
    }

    /// DELETE `path` with this test's key.
    pub async fn delete(&self, path: &str) -> Response {
        self.send(Method::DELETE, path).await
    }

    /// POST to `path`, without a body, with this test's key.
    pub async fn post(&self, path: &str) -> Response {
        self.send(Method::POST, path).await
    }

    async fn send(&self, method: Method, path: &str) -> Response {
        self.request(method, path).send().await.expect("send")
    }

    /// POST `path` with `body` as JSON and this test's key.
    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("send")
    }

    /// POST `path` with `body` as it is, labelled `content_type` if one is given.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Response {
        let request = self.request(Method::POST, path);
        let request = match content_type {
            Some(content_type) => request.header("content-type", content_type),
            None => request,
        };
        request.body(body).send().await.expect("send")
    }

    /// GET `path` with `key` instead of this test's own.
    pub async fn get_as(&self, key: &str, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("send")
    }
}

/// The `id` of a created resource.
pub fn id_of(resource: &Value) -> String {
    resource["id"].as_str().expect("an id").to_owned()
}

/// The items of a list page.
pub fn items(page: &Value) -> &Vec<Value> {
    page["items"].as_array().expect("a list page")
}

/// POST /v1/avatars for an avatar of `kind`, expecting 201; answers the avatar.
pub async fn create_avatar(app: &TestApp, kind: &str) -> Value {
    let response = app
        .post_json(
            "/v1/avatars",
            &json!({"name": format!("{kind} avatar"), "kind": kind}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.expect("json")
}

/// A real PNG of `width`×`height`, different for every `n`.
pub fn photo(n: u64, width: u32, height: u32) -> Vec<u8> {
    falgate::emulator::png::render(width, height, n, "test photo")
}

/// A fresh multipart boundary.
pub fn new_boundary() -> String {
    format!("falgate-{}", uuid::Uuid::new_v4().simple())
}

/// The content type of a multipart body with `boundary`.
pub fn multipart_content_type(boundary: &str) -> String {
    format!("multipart/form-data; boundary={boundary}")
}

/// One part of a multipart body: its headers, for a file named `name`.
pub fn part_head(boundary: &str, name: &str) -> Vec<u8> {
    format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes()
}

/// A whole multipart body with one part per file.
pub fn multipart(boundary: &str, files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, bytes) in files {
        body.extend_from_slice(&part_head(boundary, name));
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// The bytes FAL's runner fetched from `url` (a training's ZIP, a LoRA file).
pub fn fetched_by_fal(app: &TestApp, url: &str) -> Vec<u8> {
    app.fal
        .downloads()
        .into_iter()
        .find(|d| d.url == url)
        .and_then(|d| d.bytes)
        .unwrap_or_else(|| panic!("FAL fetched nothing from {url}"))
        .to_vec()
}

/// A text part named `caption`: the caption of the file part before it.
pub fn caption_part(boundary: &str, text: &str) -> Vec<u8> {
    format!("--{boundary}\r\nContent-Disposition: form-data; name=\"caption\"\r\n\r\n{text}\r\n")
        .into_bytes()
}

/// POST /v1/avatars/{avatar}/photos with `files` in one request with a Content-Length.
pub async fn upload(app: &TestApp, avatar: &str, files: &[(&str, Vec<u8>)]) -> Response {
    let boundary = new_boundary();
    post_photo_form(app, avatar, &boundary, multipart(&boundary, files)).await
}

/// POST /v1/avatars/{avatar}/photos with `body` as a multipart form framed by `boundary`,
/// whether or not the body is one.
pub async fn post_photo_form(
    app: &TestApp,
    avatar: &str,
    boundary: &str,
    body: impl Into<reqwest::Body>,
) -> Response {
    app.request(Method::POST, &format!("/v1/avatars/{avatar}/photos"))
        .header("content-type", multipart_content_type(boundary))
        .body(body)
        .send()
        .await
        .expect("send")
}

/// An avatar of `kind` with `count` accepted photos; answers the avatar and the photos' bytes.
pub async fn avatar_with_photos(app: &TestApp, kind: &str, count: u64) -> (Value, Vec<Vec<u8>>) {
    let avatar = create_avatar(app, kind).await;
    let photos: Vec<Vec<u8>> = (0..count).map(|n| photo(n, 640, 512)).collect();
    let names: Vec<String> = (0..count).map(|n| format!("p{n}.png")).collect();
    let files: Vec<(&str, Vec<u8>)> = names
        .iter()
        .map(String::as_str)
        .zip(photos.iter().cloned())
        .collect();
    let response = upload(app, &id_of(&avatar), &files).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(items(&body).len(), count as usize);
    (avatar, photos)
}

/// An avatar of `kind` with the ten photos a training needs; answers its id.
pub async fn trainable_avatar(app: &TestApp, kind: &str) -> String {
    let (avatar, _) = avatar_with_photos(app, kind, 10).await;
    id_of(&avatar)
}

/// The `(field, message)` of each refused file.
pub fn refusals(problem: &Value) -> Vec<(String, String)> {
    problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["field"].as_str().unwrap().to_owned(),
                e["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// POST /v1/avatars/{avatar}/trainings with `body`.
pub async fn train(app: &TestApp, avatar: &str, body: Value) -> Response {
    app.post_json(&format!("/v1/avatars/{avatar}/trainings"), &body)
        .await
}

/// [`train`], answering the JSON body (the training job, when it started).
pub async fn train_json(app: &TestApp, avatar: &str, body: Value) -> Value {
    train(app, avatar, body).await.json().await.expect("json")
}

/// Polls until the avatar is in `status`; answers the avatar.
pub async fn wait_for_avatar(app: &TestApp, id: &str, status: &str) -> Value {
    eventually(format_args!("avatar {status}"))
        .until(async || {
            let avatar = app.get_json(&format!("/v1/avatars/{id}")).await;
            (avatar["status"] == status).then_some(avatar)
        })
        .await
}

/// POST /v1/generations with `body`, expecting 202; answers the batch.
pub async fn generate(app: &TestApp, body: Value) -> Value {
    let response = app.post_json("/v1/generations", &body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    response.json().await.expect("json")
}

/// Polls until the batch has finished; answers it.
pub async fn wait_for_batch(app: &TestApp, id: &str) -> Value {
    eventually("the batch to finish")
        .until(async || {
            let batch = app.get_json(&format!("/v1/batches/{id}")).await;
            (batch["status"] != "running").then_some(batch)
        })
        .await
}

/// POST /v1/jobs for a raw `fal-ai/flux-lora` job with `input`, expecting 202; answers its id.
pub async fn submit_raw(app: &TestApp, input: Value) -> String {
    let response = app
        .post_json(
            "/v1/jobs",
            &json!({"endpoint": "fal-ai/flux-lora", "input": input}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    id_of(&response.json().await.expect("json"))
}

/// Arms `fault` for FAL's next `count` submits, then submits a raw job for `prompt` as
/// [`submit_raw`] does; answers its id.
pub async fn submit_raw_meeting(
    app: &TestApp,
    fault: HttpFault,
    count: u32,
    prompt: &str,
) -> String {
    app.fal.inject_fault(FaultRule::submit(fault, count));
    submit_raw(app, json!({ "prompt": prompt })).await
}

/// Checks that `response` is a 422 validation problem naming exactly `expected`, in any order;
/// `context` says which request it answers. Answers the problem.
pub async fn assert_refused_naming(
    response: Response,
    expected: &[&str],
    context: impl std::fmt::Display,
) -> Value {
    let problem = validation_problem(response).await;
    let mut named = super::fields(&problem);
    named.sort();
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    assert_eq!(named, expected, "{context}: {problem}");
    problem
}

/// POSTs each body of the table to `path` and checks that each is refused with a 422 naming
/// exactly its fields. Answers the problems, in the table's order.
pub async fn assert_bodies_refused(
    app: &TestApp,
    path: &str,
    table: &[(Value, &[&str])],
) -> Vec<Value> {
    let mut problems = Vec::new();
    for (body, expected) in table {
        let response = app.post_json(path, body).await;
        problems.push(
            assert_refused_naming(response, expected, format_args!("POST {path} {body}")).await,
        );
    }
    problems
}

/// GETs each path of the table and checks that each is refused with a 422 naming exactly its
/// parameters.
pub async fn assert_queries_refused(app: &TestApp, table: &[(&str, &[&str])]) {
    for (path, expected) in table {
        let response = app.request(Method::GET, path).send().await.expect("send");
        assert_refused_naming(response, expected, format_args!("GET {path}")).await;
    }
}
