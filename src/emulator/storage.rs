//! Storage (`/storage/upload/initiate` + signed PUT + public file URLs) and the JWKS.

use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
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
    let (parts, body) = req.into_parts();
    if let Some(resp) = check_auth(&state, &parts.headers) {
        return resp;
    }
    let conn = parts
        .extensions
        .get::<ConnectInfo<ConnCtl>>()
        .map(|c| c.0.clone());
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
            "upload_url": format!("{base}/_cdn/upload/{token}"),
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
    with_fault(&state, FaultTarget::Upload, conn, |_| {}, work).await
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
    let file_url = format!("{}/files/{}/{}", state.base_url(), p.file_id, p.file_name);
    let mut inner = state.lock();
    inner.uploads.push(UploadRecord {
        file_url,
        file_name: p.file_name.clone(),
        content_type: p.content_type.clone(),
        size: body.len(),
        sha256: hex::encode(Sha256::digest(&body)),
        at: SystemTime::now(),
    });
    inner.files.insert(
        p.file_id,
        StoredFile {
            content_type: p.content_type,
            bytes: body,
        },
    );
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
