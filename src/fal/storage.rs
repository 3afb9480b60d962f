//! FAL's storage: uploading files (whole, or in parts above a size), and reading the public
//! files FAL's CDN serves, such as a trained LoRA. CDN and signed upload URLs get no key.

use std::time::Duration;

use axum::http::{StatusCode, header};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::Url;
use serde_json::Value;

use super::client::{Answer, FalClient, MAX_SMALL_BYTES};
use super::error::{FalError, FalErrorKind};
use super::urls::{endpoint_url, upload_part_url};
use super::wire::UploadInitiateResponse;

/// What FAL's CDN said of a file asked for by [`FalClient::probe_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileProbe {
    /// The file is served.
    Served,
    /// The file is gone: 404 or 410, or 403, which a CDN also answers for a file it no longer
    /// has.
    Gone(StatusCode),
}

impl FalClient {
    /// Uploads bytes to FAL storage and returns the public `file_url` to pass as model
    /// input. The PUT to the signed upload URL carries no key: it is a CDN host.
    pub async fn upload(
        &self,
        bytes: Bytes,
        content_type: &str,
        file_name: &str,
    ) -> Result<String, FalError> {
        let length = bytes.len() as u64;
        let chunks = futures_util::stream::once(async move { Ok(bytes) });
        self.upload_stream(chunks, length, content_type, file_name)
            .await
    }

    /// [`upload`](Self::upload) of `length` bytes read from a stream, for files too large to
    /// hold in memory. Up to `multipart_above` bytes go in one PUT with their length (signed
    /// upload URLs commonly refuse chunked bodies); larger files go in parts of
    /// `upload_part_bytes`, as FAL's JS client does: `initiate-multipart`, a PUT per part to
    /// `{upload_url}/{n}`, then `{upload_url}/complete` with every part's etag.
    pub async fn upload_stream<S>(
        &self,
        chunks: S,
        length: u64,
        content_type: &str,
        file_name: &str,
    ) -> Result<String, FalError>
    where
        S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        if length <= self.cfg.multipart_above {
            let init = self
                .initiate_upload("storage/upload/initiate", content_type, file_name)
                .await?;
            let put_url = Url::parse(&init.upload_url)
                .map_err(|e| FalError::new(FalErrorKind::InvalidUrl, format!("upload_url: {e}")))?;
            let request = self
                .http
                .put(put_url)
                .header(header::CONTENT_TYPE, content_type)
                .header(header::CONTENT_LENGTH, length)
                .timeout(self.cfg.upload_timeout)
                .body(reqwest::Body::wrap_stream(chunks));
            self.send_without_key(request, MAX_SMALL_BYTES)
                .await?
                .success()?;
            return Ok(init.file_url);
        }

        let init = self
            .initiate_upload("storage/upload/initiate-multipart", content_type, file_name)
            .await?;
        let upload_url = Url::parse(&init.upload_url)
            .map_err(|e| FalError::new(FalErrorKind::InvalidUrl, format!("upload_url: {e}")))?;
        let part_bytes = self.cfg.upload_part_bytes.max(1);
        let mut parts = Vec::new();
        let mut buffer = bytes::BytesMut::with_capacity(part_bytes);
        let mut chunks = std::pin::pin!(chunks);
        loop {
            let next = futures_util::StreamExt::next(&mut chunks)
                .await
                .transpose()
                .map_err(|e| {
                    FalError::new(FalErrorKind::Transport, format!("reading the file: {e}"))
                })?;
            let finished = next.is_none();
            if let Some(chunk) = next {
                buffer.extend_from_slice(&chunk);
            }
            while buffer.len() >= part_bytes || (finished && !buffer.is_empty()) {
                let part = buffer.split_to(buffer.len().min(part_bytes)).freeze();
                let number = parts.len() as u32 + 1;
                let etag = self.put_part(&upload_url, number, part).await?;
                parts.push(serde_json::json!({"partNumber": number, "etag": etag}));
            }
            if finished {
                break;
            }
        }
        let complete = upload_part_url(&upload_url, "complete");
        let request = self
            .http
            .post(complete)
            .header(header::ACCEPT, "application/json")
            .json(&serde_json::json!({"parts": parts}));
        self.send_without_key(request, MAX_SMALL_BYTES)
            .await?
            .success()?;
        Ok(init.file_url)
    }

    /// Asks FAL's storage for a signed upload URL (`storage/upload/initiate…`).
    async fn initiate_upload(
        &self,
        path: &str,
        content_type: &str,
        file_name: &str,
    ) -> Result<UploadInitiateResponse, FalError> {
        let mut url = endpoint_url(&self.cfg.rest_base, path)?;
        url.query_pairs_mut()
            .append_pair("storage_type", "fal-cdn-v3");
        let request = self
            .http
            .post(url)
            .header(header::ACCEPT, "application/json")
            .json(&serde_json::json!({"content_type": content_type, "file_name": file_name}));
        self.send_with_key(request, MAX_SMALL_BYTES)
            .await?
            .success()?
            .json("upload initiate")
    }

    /// PUTs one part (tried up to three times, as FAL's JS client does) and answers its etag:
    /// from the JSON answer `{partNumber, etag}`, or else the `ETag` header.
    async fn put_part(
        &self,
        upload_url: &Url,
        number: u32,
        part: Bytes,
    ) -> Result<String, FalError> {
        let url = upload_part_url(upload_url, &number.to_string());
        let mut last_error = None;
        for _ in 0..3 {
            let request = self
                .http
                .put(url.clone())
                .header(header::CONTENT_LENGTH, part.len())
                .timeout(self.cfg.upload_timeout)
                .body(part.clone());
            let answer = match self.send_without_key(request, MAX_SMALL_BYTES).await {
                Ok(answer) if answer.status.is_success() => answer,
                Ok(answer) => {
                    last_error = Some(answer.error());
                    continue;
                }
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let from_json = serde_json::from_slice::<Value>(&answer.body)
                .ok()
                .and_then(|v| v.get("etag").and_then(Value::as_str).map(str::to_owned));
            let from_header = answer
                .headers
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return from_json.or(from_header).ok_or_else(|| {
                FalError::new(
                    FalErrorKind::Decode,
                    format!("part {number}: no etag in the answer"),
                )
            });
        }
        Err(last_error
            .unwrap_or_else(|| FalError::new(FalErrorKind::Transport, "part upload failed")))
    }

    /// A public file of FAL's (a LoRA, an image), as a stream of its bytes. Another status
    /// than a success is FAL's error.
    pub async fn download(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<impl Stream<Item = Result<Bytes, FalError>> + use<>, FalError> {
        let url = public_url(url)?;
        let response = self
            .http
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        if !response.status().is_success() {
            return Err(Answer::read(response, MAX_SMALL_BYTES).await?.error());
        }
        Ok(response
            .bytes_stream()
            .map(|chunk| chunk.map_err(FalError::from_reqwest)))
    }

    /// Whether FAL's CDN still serves `url`, asking for its first byte only so that a large
    /// file is not sent. An answer that is neither served nor gone is FAL's error.
    pub async fn probe_file(&self, url: &str, timeout: Duration) -> Result<FileProbe, FalError> {
        let url = public_url(url)?;
        let response = self
            .http
            .get(url)
            .header(header::RANGE, "bytes=0-0")
            .timeout(timeout)
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        let status = response.status();
        if status == StatusCode::PARTIAL_CONTENT {
            // One byte: read it, so that the connection goes back to the pool.
            let _ = response.bytes().await;
            return Ok(FileProbe::Served);
        }
        // A 200 is the whole file (the range was ignored): dropped unread, its connection
        // closes.
        if status.is_success() {
            return Ok(FileProbe::Served);
        }
        if matches!(status.as_u16(), 403 | 404 | 410) {
            return Ok(FileProbe::Gone(status));
        }
        Err(Answer::read(response, MAX_SMALL_BYTES).await?.error())
    }
}

/// A URL FAL handed us for one of its public files.
fn public_url(url: &str) -> Result<Url, FalError> {
    Url::parse(url).map_err(|e| FalError::new(FalErrorKind::InvalidUrl, format!("file URL: {e}")))
}
