//! Storage and the JWKS. Two upload flows, as FAL's clients use them:
//! - `/storage/upload/initiate` + signed PUT (and `initiate-multipart` + parts + complete),
//!   what FAL's JS client does;
//! - `/storage/auth/token` then `POST {base_url}/files/upload` with that token, the
//!   `fal-cdn-v3` flow FAL's Python client uses by default.
//!
//! Either way the file is then served at a public URL, `/files/{id}/{name}`.

use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::EmulatorState;
use super::faults::FaultTarget;
use super::listener::ConnCtl;
use super::queue::{check_auth, json_response, with_fault};
use super::state::{PendingUpload, StoredFile, UploadRecord};

pub(crate) async fn jwks(State(state): State<EmulatorState>) -> Response {
    json_response(200, &state.jwks())
}

#[derive(Deserialize, Default)]
struct InitiateBody {
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    file_name: Option<String>,
}

/// Keeps a file name usable as one URL path segment.
fn safe_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.trim_matches('.').is_empty() {
        "upload.bin".into()
    } else {
        cleaned
    }
}

pub(crate) async fn initiate(State(state): State<EmulatorState>, req: Request) -> Response {
    initiate_upload(state, req, "upload").await
}

/// `initiate-multipart`: the same answer, with an upload URL under which the parts go
/// (`{upload_url}/{n}`) and the completion (`{upload_url}/complete`).
pub(crate) async fn initiate_multipart(
    State(state): State<EmulatorState>,
    req: Request,
) -> Response {
    initiate_upload(state, req, "multipart").await
}

/// The connection of a call made with the FAL key (for faults aimed at it), or the refusal of
/// a call made without.
fn keyed_call(state: &EmulatorState, parts: &Parts) -> Result<Option<ConnCtl>, Box<Response>> {
    if let Some(resp) = check_auth(state, &parts.headers) {
        return Err(Box::new(resp));
    }
    Ok(parts
        .extensions
        .get::<ConnectInfo<ConnCtl>>()
        .map(|c| c.0.clone()))
}

async fn initiate_upload(state: EmulatorState, req: Request, kind: &str) -> Response {
    let (parts, body) = req.into_parts();
    let conn = match keyed_call(&state, &parts) {
        Ok(conn) => conn,
        Err(refused) => return *refused,
    };
    let bytes = axum::body::to_bytes(body, 1024 * 1024)
        .await
        .unwrap_or_default();
    let work = async {
        let init: InitiateBody = serde_json::from_slice(&bytes).unwrap_or_default();
        let file_name = safe_name(init.file_name.as_deref().unwrap_or("upload.bin"));
        let content_type = init
            .content_type
            .unwrap_or_else(|| "application/octet-stream".into());
        let token = uuid::Uuid::new_v4().simple().to_string();
        let file_id = uuid::Uuid::now_v7().simple().to_string();
        let base = state.base_url();
        let body = json!({
            "upload_url": format!("{base}/_cdn/{kind}/{token}"),
            "file_url": format!("{base}/files/{file_id}/{file_name}"),
        });
        state.lock().pending_uploads.insert(
            token,
            PendingUpload {
                file_id,
                file_name,
                content_type,
            },
        );
        json_response(200, &body)
    };
    with_fault(&state, FaultTarget::Upload, conn, work).await
}

/// `POST /storage/auth/token?storage_type=fal-cdn-v3`: a short-lived token for the CDN's
/// upload endpoint, which FAL's Python client asks for (and caches until `expires_at`)
/// before uploading. `base_url` is where the CDN takes uploads: here, the emulator itself.
pub(crate) async fn auth_token(State(state): State<EmulatorState>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let conn = match keyed_call(&state, &parts) {
        Ok(conn) => conn,
        Err(refused) => return *refused,
    };
    let work = async {
        let token = hex::encode(uuid::Uuid::new_v4().as_bytes());
        let expires = SystemTime::now() + state.config().upload_token_ttl;
        {
            let mut inner = state.lock();
            let now = SystemTime::now();
            inner.upload_tokens.retain(|_, until| *until > now);
            inner.upload_tokens.insert(token.clone(), expires);
        }
        json_response(
            200,
            &json!({
                "token": token,
                "token_type": UPLOAD_TOKEN_TYPE,
                "base_url": state.base_url(),
                "expires_at": iso_8601(expires),
            }),
        )
    };
    with_fault(&state, FaultTarget::Upload, conn, work).await
}

const UPLOAD_TOKEN_TYPE: &str = "Bearer";

/// An ISO-8601 time with an explicit `+00:00` offset, which every Python's
/// `datetime.fromisoformat` reads.
fn iso_8601(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// Why the CDN refuses an upload's `Authorization`, if it does.
fn upload_token_refusal(state: &EmulatorState, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let token = given
        .split_once(' ')
        .filter(|(kind, _)| kind.eq_ignore_ascii_case(UPLOAD_TOKEN_TYPE))
        .map(|(_, token)| token.trim());
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Some(json_response(
            401,
            &json!({"detail": "Missing upload token: send `Authorization: Bearer <token>` from /storage/auth/token"}),
        ));
    };
    let expires = state.lock().upload_tokens.get(token).copied();
    match expires {
        None => Some(json_response(
            401,
            &json!({"detail": "Invalid upload token"}),
        )),
        Some(until) if until <= SystemTime::now() => Some(json_response(
            401,
            &json!({"detail": "Upload token expired"}),
        )),
        Some(_) => None,
    }
}

/// `POST {base_url}/files/upload`: the file as the body, named by `X-Fal-File-Name`, typed by
/// `Content-Type`; answers `{"access_url": …}`, the file's public URL.
pub(crate) async fn upload_v3(State(state): State<EmulatorState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    // The token first: a caller without one is turned away before its body is read.
    if let Some(resp) = upload_token_refusal(&state, &headers) {
        return resp;
    }
    let Ok(body) = axum::body::to_bytes(body, super::MAX_UPLOAD_BYTES).await else {
        return json_response(
            413,
            &json!({"detail": "The file could not be read whole within the upload limit"}),
        );
    };
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let pending = PendingUpload {
        file_id: uuid::Uuid::now_v7().simple().to_string(),
        file_name: safe_name(header_text("x-fal-file-name").unwrap_or("upload.bin")),
        content_type: header_text(header::CONTENT_TYPE.as_str())
            .unwrap_or("application/octet-stream")
            .to_owned(),
    };
    let access_url = store_upload(&state, pending, body, 1);
    json_response(200, &json!({ "access_url": access_url }))
}

/// The signed upload URL: no Authorization, like a CDN pre-signed PUT.
pub(crate) async fn put_upload(
    State(state): State<EmulatorState>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let pending = state.lock().pending_uploads.get(&token).cloned();
    let Some(p) = pending else {
        return json_response(404, &json!({"detail": "Unknown upload URL"}));
    };
    store_upload(&state, p, body, 1);
    StatusCode::OK.into_response()
}

/// Keeps an uploaded file and records the upload; returns the file's public URL.
fn store_upload(state: &EmulatorState, p: PendingUpload, body: Bytes, parts: usize) -> String {
    let file_url = format!("{}/files/{}/{}", state.base_url(), p.file_id, p.file_name);
    let mut inner = state.lock();
    inner.uploads.push(UploadRecord {
        file_url: file_url.clone(),
        file_name: p.file_name.clone(),
        content_type: p.content_type.clone(),
        size: body.len(),
        sha256: hex::encode(Sha256::digest(&body)),
        parts,
        at: SystemTime::now(),
    });
    inner.files.insert(
        p.file_id,
        StoredFile {
            content_type: p.content_type,
            bytes: body,
        },
    );
    file_url
}

/// One part of a multipart upload: answered with its etag, as FAL's CDN does.
pub(crate) async fn put_part(
    State(state): State<EmulatorState>,
    Path((token, part)): Path<(String, u32)>,
    body: Bytes,
) -> Response {
    let mut inner = state.lock();
    if !inner.pending_uploads.contains_key(&token) || part == 0 {
        return json_response(404, &json!({"detail": "Unknown upload URL"}));
    }
    let etag = hex::encode(&Sha256::digest(&body)[..8]);
    inner
        .upload_parts
        .entry(token)
        .or_default()
        .insert(part, (etag.clone(), body));
    json_response(200, &json!({"partNumber": part, "etag": etag}))
}

#[derive(Deserialize)]
pub(crate) struct CompleteBody {
    parts: Vec<CompletedPart>,
}

#[derive(Deserialize)]
pub(crate) struct CompletedPart {
    #[serde(rename = "partNumber")]
    part_number: u32,
    etag: String,
}

/// Joins the listed parts, in order, into the file; every part must be listed with its etag.
pub(crate) async fn complete_multipart(
    State(state): State<EmulatorState>,
    Path(token): Path<String>,
    axum::Json(complete): axum::Json<CompleteBody>,
) -> Response {
    let (pending, stored) = {
        let inner = state.lock();
        let Some(pending) = inner.pending_uploads.get(&token).cloned() else {
            return json_response(404, &json!({"detail": "Unknown upload URL"}));
        };
        let stored = inner.upload_parts.get(&token).cloned().unwrap_or_default();
        (pending, stored)
    };
    let listed: Vec<(u32, &str)> = complete
        .parts
        .iter()
        .map(|p| (p.part_number, p.etag.as_str()))
        .collect();
    let expected: Vec<(u32, &str)> = stored
        .iter()
        .map(|(n, (etag, _))| (*n, etag.as_str()))
        .collect();
    if listed.is_empty() || listed != expected {
        return json_response(
            400,
            &json!({"detail": "The parts listed do not match the parts uploaded"}),
        );
    }
    let mut file = Vec::new();
    for (_, bytes) in stored.values() {
        file.extend_from_slice(bytes);
    }
    {
        let inner = &mut *state.lock();
        inner.pending_uploads.remove(&token);
        inner.upload_parts.remove(&token);
    }
    store_upload(&state, pending, Bytes::from(file), stored.len());
    StatusCode::OK.into_response()
}

/// Public file URL (no auth), like FAL's CDN.
pub(crate) async fn get_file(
    State(state): State<EmulatorState>,
    Path((id, _name)): Path<(String, String)>,
) -> Response {
    let file = state.lock().files.get(&id).cloned();
    match file {
        Some(f) => ([(header::CONTENT_TYPE, f.content_type)], f.bytes).into_response(),
        None => json_response(404, &json!({"detail": "Not Found"})),
    }
}

#[cfg(test)]
mod tests {
    use super::safe_name;

    #[test]
    fn names_are_single_segments() {
        assert_eq!(safe_name("train.zip"), "train.zip");
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("a b?.zip"), "a_b_.zip");
        assert_eq!(safe_name(".."), "upload.bin");
        assert_eq!(safe_name(""), "upload.bin");
    }
}
