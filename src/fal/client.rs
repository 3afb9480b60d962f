//! HTTP client for FAL's queue and storage APIs.
//!
//! One `reqwest::Client` for the whole process. The key travels only to the configured
//! queue/REST origins: URLs that FAL hands back (status_url, …) are used verbatim, but a
//! URL pointing at another origin is refused rather than sent our key.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::Bytes;
use reqwest::Url;
use serde_json::Value;

use super::Secret;
use super::retry::parse_retry_after;
use super::wire::{
    CancelResponse, CancelStatus, Detail, ErrorDetail, QueueStatus, SubmitResponse,
    UploadInitiateResponse,
};

/// Output bodies above this are refused (a FAL result is JSON with URLs, not media).
const MAX_RESULT_BYTES: usize = 32 * 1024 * 1024;
/// Error/status bodies are small; cap what we buffer from a misbehaving proxy.
const MAX_SMALL_BYTES: usize = 1024 * 1024;

const STILL_IN_PROGRESS: &str = "Request is still in progress";

#[derive(Debug, Clone)]
pub struct FalConfig {
    pub queue_base: Url,
    pub rest_base: Url,
    pub key: Secret,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long one PUT of file bytes to FAL's storage may take (a whole file, or one part).
    pub upload_timeout: Duration,
    /// Files larger than this go up in parts, as FAL's own clients do above 90 MB.
    pub multipart_above: u64,
    /// The size of each part of a multipart upload.
    pub upload_part_bytes: usize,
}

impl FalConfig {
    /// FAL's public hosts with conservative timeouts.
    pub fn production(key: Secret) -> Self {
        Self::new(
            Url::parse("https://queue.fal.run/").expect("static URL"),
            Url::parse("https://rest.fal.ai/").expect("static URL"),
            key,
        )
    }

    pub fn new(queue_base: Url, rest_base: Url, key: Secret) -> Self {
        Self {
            queue_base,
            rest_base,
            key,
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            upload_timeout: Duration::from_secs(600),
            multipart_above: 90 * 1024 * 1024,
            upload_part_bytes: 10 * 1024 * 1024,
        }
    }
}

/// What went wrong talking to FAL, classified for the retry policy. Boxed so that
/// `Result<_, FalError>` stays small; fields are reached through `Deref`.
#[derive(Clone, PartialEq)]
pub struct FalError(Box<FalErrorInfo>);

impl std::ops::Deref for FalError {
    type Target = FalErrorInfo;
    fn deref(&self) -> &FalErrorInfo {
        &self.0
    }
}

impl std::ops::DerefMut for FalError {
    fn deref_mut(&mut self) -> &mut FalErrorInfo {
        &mut self.0
    }
}

#[derive(Clone, PartialEq)]
pub struct FalErrorInfo {
    pub kind: FalErrorKind,
    /// HTTP status when FAL (or a proxy in front of it) answered.
    pub status: Option<u16>,
    /// FAL's `detail`, as sent (string or list of `{loc, msg, type}`).
    pub detail: Option<Value>,
    /// From the body's `error_type` or the `X-Fal-Error-Type` header.
    pub error_type: Option<String>,
    pub retry_after: Option<Duration>,
    /// `X-Fal-Request-Timeout-Type: user`: our own start deadline expired; retrying
    /// would only expire again.
    pub user_timeout: bool,
    /// `x-fal-request-id` of the answer, if any (its absence marks an ingress error).
    pub fal_request_id: Option<String>,
    /// True when FAL may have acted on the request although we got no usable answer
    /// (timeout or reset after sending, gateway error). For a submit this means a job
    /// may exist at FAL: expect a callback before submitting again.
    pub may_have_reached_fal: bool,
    /// Human text. Never contains the key or a URL (URLs carry our callback token).
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FalErrorKind {
    /// FAL answered with a non-success status.
    Http,
    /// The result is not ready (`400 Request is still in progress`).
    NotReady,
    /// Connecting failed: the request never left.
    Connect,
    /// No answer within the deadline.
    Timeout,
    /// Connection broke after connecting (reset, closed mid-answer).
    Transport,
    /// An answer we could not read as the expected JSON.
    Decode,
    /// A URL was unusable or pointed away from FAL's configured origin.
    InvalidUrl,
    /// The HTTP client could not be built.
    Build,
}

impl FalError {
    fn new(kind: FalErrorKind, message: impl Into<String>) -> Self {
        Self(Box::new(FalErrorInfo {
            kind,
            status: None,
            detail: None,
            error_type: None,
            retry_after: None,
            user_timeout: false,
            fal_request_id: None,
            may_have_reached_fal: false,
            message: message.into(),
        }))
    }

    /// Whether the same call may succeed later.
    pub fn retryable(&self) -> bool {
        match self.kind {
            FalErrorKind::Http => match self.status {
                Some(504) => !self.user_timeout,
                Some(408 | 429 | 502 | 503) => true,
                _ => false,
            },
            FalErrorKind::NotReady
            | FalErrorKind::Connect
            | FalErrorKind::Timeout
            | FalErrorKind::Transport => true,
            FalErrorKind::Decode | FalErrorKind::InvalidUrl | FalErrorKind::Build => false,
        }
    }

    /// One line from FAL's detail, for job error messages.
    pub fn detail_summary(&self) -> Option<String> {
        let detail: Detail = serde_json::from_value(self.detail.clone()?).ok()?;
        Some(
            ErrorDetail {
                detail: Some(detail),
                error_type: None,
            }
            .summary(),
        )
    }

    fn from_reqwest(err: reqwest::Error) -> Self {
        // `without_url`: the submit URL carries our callback token.
        let kind = if err.is_connect() {
            FalErrorKind::Connect
        } else if err.is_timeout() {
            FalErrorKind::Timeout
        } else if err.is_decode() {
            FalErrorKind::Decode
        } else if err.is_builder() {
            FalErrorKind::Build
        } else {
            FalErrorKind::Transport
        };
        let mut e = Self::new(kind, error_chain(&err.without_url()));
        // A failed connect never sent a byte; anything later may have been processed.
        e.may_have_reached_fal = !matches!(kind, FalErrorKind::Connect | FalErrorKind::Build);
        e
    }

    fn from_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Self {
        let parsed = serde_json::from_slice::<Value>(body).ok();
        let detail = parsed.as_ref().and_then(|v| v.get("detail")).cloned();
        let header_str = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let error_type = parsed
            .as_ref()
            .and_then(|v| v.get("error_type"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| header_str("x-fal-error-type"));
        let not_ready = status == StatusCode::BAD_REQUEST
            && detail.as_ref().and_then(Value::as_str) == Some(STILL_IN_PROGRESS);
        let message = match &detail {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None if parsed.is_some() => String::from_utf8_lossy(body).chars().take(300).collect(),
            // Non-JSON (nginx HTML): the status says enough.
            None => status
                .canonical_reason()
                .unwrap_or("unexpected answer")
                .into(),
        };
        let mut e = Self::new(
            if not_ready {
                FalErrorKind::NotReady
            } else {
                FalErrorKind::Http
            },
            message,
        );
        e.status = Some(status.as_u16());
        e.detail = detail;
        e.error_type = error_type;
        e.retry_after = header_str("retry-after").and_then(|v| parse_retry_after(&v));
        e.user_timeout = header_str("x-fal-request-timeout-type")
            .is_some_and(|v| v.eq_ignore_ascii_case("user"));
        e.fal_request_id = header_str("x-fal-request-id");
        // 500/502/504 can come from a gateway after the request was forwarded, an error page
        // of FAL's ingress included (a 504 there means the queue did not answer in time, not
        // that it did nothing); 4xx and 503 are refusals before any work was queued.
        e.may_have_reached_fal = matches!(status.as_u16(), 500 | 502 | 504);
        e
    }
}

impl fmt::Display for FalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FAL {:?}", self.kind)?;
        if let Some(s) = self.status {
            write!(f, " {s}")?;
        }
        if let Some(t) = &self.error_type {
            write!(f, " ({t})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl fmt::Debug for FalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FalError")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("error_type", &self.error_type)
            .field("retry_after", &self.retry_after)
            .field("user_timeout", &self.user_timeout)
            .field("may_have_reached_fal", &self.may_have_reached_fal)
            .field("message", &self.message)
            .finish()
    }
}

impl std::error::Error for FalError {}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The outcome of fetching a completed request's result.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelResult {
    /// 2xx: the model's output JSON.
    Output(Value),
    /// The model (or FAL on its behalf) failed the request; FAL replays the error status
    /// and body. `body` is the JSON, or a JSON string holding the text if it was not JSON.
    ModelError {
        status: u16,
        body: Value,
        error_type: Option<String>,
    },
}

/// Answer of a cancel call. The two "negative" answers are outcomes, not errors: the
/// caller learns the request already finished or never existed.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    CancellationRequested,
    AlreadyCompleted,
    NotFound,
    /// Listed by FAL's docs without explanation.
    Ok,
    Other {
        status: u16,
        body: String,
    },
}

#[derive(Clone)]
pub struct FalClient {
    http: reqwest::Client,
    cfg: Arc<FalConfig>,
}

impl fmt::Debug for FalClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FalClient").field("cfg", &self.cfg).finish()
    }
}

impl FalClient {
    /// Builds the one HTTP client. The process must have a rustls provider installed
    /// (`main` does; tests call [`super::ensure_crypto_provider`]).
    pub fn new(cfg: FalConfig) -> Result<Self, FalError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.connect_timeout)
            .user_agent(concat!("falgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FalError::new(FalErrorKind::Build, error_chain(&e)))?;
        Ok(Self {
            http,
            cfg: Arc::new(cfg),
        })
    }

    /// The shared HTTP client (for the JWKS cache: one pool, one TLS config).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn config(&self) -> &FalConfig {
        &self.cfg
    }

    fn auth(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Key {}", self.cfg.key.expose()))
            .unwrap_or_else(|_| HeaderValue::from_static("Key invalid"));
        // Keeps the value out of hyper/reqwest debug output.
        v.set_sensitive(true);
        v
    }

    /// `POST {queue_base}/{endpoint}[?fal_webhook=…]`. The webhook goes in the query,
    /// never in the input, as FAL requires.
    pub async fn submit(
        &self,
        endpoint: &str,
        input: &Value,
        webhook: Option<&Url>,
    ) -> Result<SubmitResponse, FalError> {
        let mut url = endpoint_url(&self.cfg.queue_base, endpoint)?;
        if let Some(hook) = webhook {
            url.query_pairs_mut()
                .append_pair("fal_webhook", hook.as_str());
        }
        let resp = self
            .http
            .post(url)
            .header(header::AUTHORIZATION, self.auth())
            .header(header::ACCEPT, "application/json")
            .json(input)
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        let (status, headers, body) = read(resp, MAX_SMALL_BYTES).await?;
        if !status.is_success() {
            return Err(FalError::from_response(status, &headers, &body));
        }
        serde_json::from_slice(&body).map_err(|e| {
            // FAL said yes but we cannot read the id: a job probably exists.
            let mut err = FalError::new(FalErrorKind::Decode, format!("submit answer: {e}"));
            err.status = Some(status.as_u16());
            err.may_have_reached_fal = true;
            err
        })
    }

    /// `GET status_url?logs=1|0`.
    pub async fn status(&self, status_url: &str, logs: bool) -> Result<QueueStatus, FalError> {
        let mut url = self.queue_url(status_url)?;
        url.query_pairs_mut()
            .append_pair("logs", if logs { "1" } else { "0" });
        let resp = self
            .http
            .get(url)
            .header(header::AUTHORIZATION, self.auth())
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        let (status, headers, body) = read(resp, MAX_SMALL_BYTES).await?;
        if !status.is_success() {
            return Err(FalError::from_response(status, &headers, &body));
        }
        serde_json::from_slice(&body).map_err(|e| {
            let mut err = FalError::new(FalErrorKind::Decode, format!("status answer: {e}"));
            err.status = Some(status.as_u16());
            err
        })
    }

    /// FAL's status, result and cancel URLs of a request, built as FAL's own client builds
    /// them (`{queue}/{owner}/{alias}/requests/{id}`), for a request whose id is known but
    /// whose submit answer was lost.
    pub fn request_urls(&self, endpoint: &str, request_id: &str) -> RequestUrls {
        let base = format!(
            "{}/{}",
            requests_base(&self.cfg.queue_base, endpoint),
            form_urlencoded::byte_serialize(request_id.as_bytes()).collect::<String>()
        );
        RequestUrls {
            status: format!("{base}/status"),
            cancel: format!("{base}/cancel"),
            response: base,
        }
    }

    /// `GET response_url`: the model's output, or its error replayed by FAL.
    ///
    /// A 5xx is FAL's verdict on the model only when FAL's COMPLETED status said the request
    /// failed, and with the same error type when it named one. Otherwise it is an outage of
    /// this call, answered as a retryable error: the result is still there to fetch.
    pub async fn result(
        &self,
        response_url: &str,
        reported: &ReportedEnd,
    ) -> Result<ModelResult, FalError> {
        let url = self.queue_url(response_url)?;
        let resp = self
            .http
            .get(url)
            .header(header::AUTHORIZATION, self.auth())
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        let (status, headers, body) = read(resp, MAX_RESULT_BYTES).await?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map(ModelResult::Output)
                .map_err(|e| {
                    let mut err =
                        FalError::new(FalErrorKind::Decode, format!("result answer: {e}"));
                    err.status = Some(status.as_u16());
                    err
                });
        }
        let err = FalError::from_response(status, &headers, &body);
        let json = serde_json::from_slice::<Value>(&body).ok();
        // Errors about *this call* (auth, unknown id, throttling, a proxy's HTML page)
        // are not the model's verdict; everything else with a body is.
        let about_the_call = err.kind == FalErrorKind::NotReady
            || matches!(status.as_u16(), 401 | 403 | 404 | 405 | 408 | 429)
            || (json.is_none() && err.retryable())
            || (status.is_server_error() && !reported.explains(err.error_type.as_deref()));
        if about_the_call && status.is_server_error() {
            let mut err = err;
            // Retryable whatever the code: the request is done, only this answer failed.
            err.kind = FalErrorKind::Transport;
            return Err(err);
        }
        if about_the_call {
            return Err(err);
        }
        Ok(ModelResult::ModelError {
            status: status.as_u16(),
            body: json.unwrap_or_else(|| Value::String(String::from_utf8_lossy(&body).into())),
            error_type: err.0.error_type,
        })
    }

    /// `PUT cancel_url`.
    pub async fn cancel(&self, cancel_url: &str) -> Result<CancelOutcome, FalError> {
        let url = self.queue_url(cancel_url)?;
        let resp = self
            .http
            .put(url)
            .header(header::AUTHORIZATION, self.auth())
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        let (status, headers, body) = read(resp, MAX_SMALL_BYTES).await?;
        let parsed = serde_json::from_slice::<CancelResponse>(&body).ok();
        let code = status.as_u16();
        match (code, parsed.map(|p| p.status)) {
            (_, Some(CancelStatus::AlreadyCompleted)) if code == 400 || status.is_success() => {
                Ok(CancelOutcome::AlreadyCompleted)
            }
            (_, Some(CancelStatus::NotFound)) if code == 404 || status.is_success() => {
                Ok(CancelOutcome::NotFound)
            }
            (_, Some(CancelStatus::CancellationRequested)) if status.is_success() => {
                Ok(CancelOutcome::CancellationRequested)
            }
            (_, Some(CancelStatus::Ok)) if status.is_success() => Ok(CancelOutcome::Ok),
            _ if status.is_success() => Ok(CancelOutcome::Other {
                status: code,
                body: String::from_utf8_lossy(&body).chars().take(1000).collect(),
            }),
            _ => Err(FalError::from_response(status, &headers, &body)),
        }
    }

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
            let resp = self
                .http
                .put(put_url)
                .header(header::CONTENT_TYPE, content_type)
                .header(header::CONTENT_LENGTH, length)
                .timeout(self.cfg.upload_timeout)
                .body(reqwest::Body::wrap_stream(chunks))
                .send()
                .await
                .map_err(FalError::from_reqwest)?;
            read_success(resp, MAX_SMALL_BYTES).await?;
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
        let resp = self
            .http
            .post(complete)
            .header(header::ACCEPT, "application/json")
            .json(&serde_json::json!({"parts": parts}))
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        read_success(resp, MAX_SMALL_BYTES).await?;
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
        let resp = self
            .http
            .post(url)
            .header(header::AUTHORIZATION, self.auth())
            .header(header::ACCEPT, "application/json")
            .json(&serde_json::json!({"content_type": content_type, "file_name": file_name}))
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        let body = read_success(resp, MAX_SMALL_BYTES).await?;
        serde_json::from_slice(&body).map_err(|e| {
            FalError::new(FalErrorKind::Decode, format!("upload initiate answer: {e}"))
        })
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
            let sent = self
                .http
                .put(url.clone())
                .header(header::CONTENT_LENGTH, part.len())
                .timeout(self.cfg.upload_timeout)
                .body(part.clone())
                .send()
                .await;
            let resp = match sent {
                Ok(resp) => resp,
                Err(e) => {
                    last_error = Some(FalError::from_reqwest(e));
                    continue;
                }
            };
            let (status, headers, body) = read(resp, MAX_SMALL_BYTES).await?;
            if !status.is_success() {
                last_error = Some(FalError::from_response(status, &headers, &body));
                continue;
            }
            let from_json = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("etag").and_then(Value::as_str).map(str::to_owned));
            let from_header = headers
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

    /// Parses a URL FAL gave us and checks it stays on the queue origin, so that a
    /// tampered or unexpected answer cannot make us send the key elsewhere.
    fn queue_url(&self, url: &str) -> Result<Url, FalError> {
        let parsed = Url::parse(url)
            .map_err(|e| FalError::new(FalErrorKind::InvalidUrl, format!("bad FAL URL: {e}")))?;
        if parsed.origin() != self.cfg.queue_base.origin() {
            return Err(FalError::new(
                FalErrorKind::InvalidUrl,
                format!(
                    "refusing to send the FAL key to {}",
                    parsed.origin().ascii_serialization()
                ),
            ));
        }
        Ok(parsed)
    }
}

/// Reads a whole answer that must be a success; another status becomes FAL's error.
async fn read_success(resp: reqwest::Response, limit: usize) -> Result<Bytes, FalError> {
    let (status, headers, body) = read(resp, limit).await?;
    if !status.is_success() {
        return Err(FalError::from_response(status, &headers, &body));
    }
    Ok(body)
}

/// Reads a whole answer, refusing bodies larger than `limit`.
async fn read(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<(StatusCode, HeaderMap, Bytes), FalError> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(FalError::from_reqwest)? {
        if buf.len() + chunk.len() > limit {
            let mut e = FalError::new(FalErrorKind::Decode, "answer too large");
            e.status = Some(status.as_u16());
            e.may_have_reached_fal = true;
            return Err(e);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((status, headers, buf.freeze()))
}

/// `{base}/{endpoint}` with the endpoint checked segment by segment: it becomes a path,
/// and `..` or a `?` would point the key-bearing request somewhere unintended.
pub fn endpoint_url(base: &Url, endpoint: &str) -> Result<Url, FalError> {
    let endpoint = endpoint.trim_matches('/');
    let valid = !endpoint.is_empty()
        && endpoint.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        });
    if !valid {
        return Err(FalError::new(
            FalErrorKind::InvalidUrl,
            format!("invalid endpoint id {endpoint:?}"),
        ));
    }
    let joined = format!("{}/{endpoint}", base.as_str().trim_end_matches('/'));
    Url::parse(&joined).map_err(|e| FalError::new(FalErrorKind::InvalidUrl, e.to_string()))
}

/// The owner/alias part of an endpoint id (three segments for `workflows`/`comfy`):
/// FAL's status/result/cancel URLs live under it, not under the full id.
pub fn app_prefix(endpoint: &str) -> String {
    let parts: Vec<&str> = endpoint
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let n = if matches!(parts.first(), Some(&"workflows" | &"comfy")) {
        3
    } else {
        2
    };
    parts[..n.min(parts.len())].join("/")
}

/// `{queue_base}/{owner}/{alias}/requests`. The URLs a submit returns are used where known;
/// these are built only for a request whose submit answer was lost.
pub fn requests_base(queue_base: &Url, endpoint: &str) -> String {
    format!(
        "{}/{}/requests",
        queue_base.as_str().trim_end_matches('/'),
        app_prefix(endpoint)
    )
}

/// How FAL's COMPLETED status said a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReportedEnd {
    /// No error on the status: the result holds the output.
    #[default]
    Succeeded,
    /// The status carried an error, of this type when it named one.
    Failed { error_type: Option<String> },
}

impl ReportedEnd {
    /// Whether a failed result answer with `error_type` is the failure the status reported.
    fn explains(&self, error_type: Option<&str>) -> bool {
        match self {
            Self::Succeeded => false,
            Self::Failed { error_type: None } => true,
            Self::Failed {
                error_type: Some(reported),
            } => error_type == Some(reported.as_str()),
        }
    }
}

/// Where to ask FAL about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestUrls {
    pub status: String,
    pub response: String,
    pub cancel: String,
}

/// `{origin}{path}/{segment}{query}` of a multipart upload URL: where its parts and its
/// completion go.
fn upload_part_url(upload_url: &Url, segment: &str) -> Url {
    let mut url = upload_url.clone();
    let path = format!("{}/{segment}", upload_url.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let base = Url::parse("https://queue.fal.run/").unwrap();
        assert_eq!(
            endpoint_url(&base, "fal-ai/flux-pro/v1.1-ultra-finetuned")
                .unwrap()
                .as_str(),
            "https://queue.fal.run/fal-ai/flux-pro/v1.1-ultra-finetuned"
        );
        let prefixed = Url::parse("http://127.0.0.1:9/fal").unwrap();
        assert_eq!(
            endpoint_url(&prefixed, "/fal-ai/flux-lora/")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:9/fal/fal-ai/flux-lora"
        );
        for bad in [
            "", "/", "a/../b", "a//b", "a/b?x=1", "a/b#f", "a b/c", "a/%2e%2e",
        ] {
            assert!(endpoint_url(&base, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            app_prefix("fal-ai/flux-pro/v1.1-ultra-finetuned"),
            "fal-ai/flux-pro"
        );
        assert_eq!(app_prefix("fal-ai/flux-lora"), "fal-ai/flux-lora");
        assert_eq!(app_prefix("workflows/me/flow/x"), "workflows/me/flow");
        assert_eq!(app_prefix("comfy/me/flow"), "comfy/me/flow");
        let base = Url::parse("https://queue.fal.run/").unwrap();
        assert_eq!(
            requests_base(&base, "fal-ai/flux-pro/v1.1-ultra-finetuned"),
            "https://queue.fal.run/fal-ai/flux-pro/requests"
        );
    }

    fn http_error(code: u16, headers: &[(&str, &str)], body: &str) -> FalError {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        FalError::from_response(StatusCode::from_u16(code).unwrap(), &map, body.as_bytes())
    }

    #[test]
    fn classification() {
        for code in [408, 429, 502, 503, 504] {
            assert!(http_error(code, &[], "").retryable(), "{code}");
        }
        for code in [400, 401, 403, 404, 422, 500] {
            assert!(!http_error(code, &[], "{}").retryable(), "{code}");
        }
        let user = http_error(504, &[("X-Fal-Request-Timeout-Type", "user")], "{}");
        assert!(user.user_timeout && !user.retryable());

        let e = http_error(
            429,
            &[("Retry-After", "7")],
            r#"{"detail": "queue full", "error_type": "queue_full"}"#,
        );
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.error_type.as_deref(), Some("queue_full"));
        assert_eq!(e.detail, Some(Value::String("queue full".into())));
        assert!(!e.may_have_reached_fal);

        let e = http_error(
            503,
            &[("X-Fal-Error-Type", "runner_scheduling_failure")],
            "x",
        );
        assert_eq!(e.error_type.as_deref(), Some("runner_scheduling_failure"));

        let e = http_error(
            422,
            &[],
            r#"{"detail": [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]}"#,
        );
        assert_eq!(
            e.detail_summary().as_deref(),
            Some("body.prompt: Field required")
        );

        // A gateway error, FAL's ingress page included, may hide a queued request.
        let e = http_error(502, &[], "<html><center>nginx</center></html>");
        assert!(e.retryable() && e.may_have_reached_fal && e.fal_request_id.is_none());
        let e = http_error(500, &[], r#"{"detail": "Internal server error"}"#);
        assert!(e.may_have_reached_fal);

        let e = http_error(400, &[], r#"{"detail": "Request is still in progress"}"#);
        assert_eq!(e.kind, FalErrorKind::NotReady);
        assert!(e.retryable());
    }

    #[test]
    fn debug_and_display_never_show_the_key() {
        let cfg = FalConfig::production(Secret::from("key-id:very-secret-value"));
        crate::fal::ensure_crypto_provider();
        let client = FalClient::new(cfg).unwrap();
        let dbg = format!("{client:?}");
        assert!(!dbg.contains("very-secret-value"), "{dbg}");
        assert!(!format!("{:?}", client.auth()).contains("very-secret-value"));
        let e = http_error(
            401,
            &[],
            r#"{"detail": "No user found for Key ID and Secret"}"#,
        );
        assert!(!format!("{e} {e:?}").contains("very-secret-value"));
    }

    #[tokio::test]
    async fn refuses_foreign_urls_and_reports_connect_errors() {
        crate::fal::ensure_crypto_provider();
        // Port 9 on loopback: nothing listens, connection refused at once.
        let base = Url::parse("http://127.0.0.1:9/").unwrap();
        let client =
            FalClient::new(FalConfig::new(base.clone(), base, Secret::from("k:s"))).unwrap();
        let e = client
            .status("https://evil.example/fal-ai/x/requests/1/status", false)
            .await
            .unwrap_err();
        assert_eq!(e.kind, FalErrorKind::InvalidUrl);
        let e = client
            .submit("fal-ai/flux-lora", &serde_json::json!({}), None)
            .await
            .unwrap_err();
        assert_eq!(e.kind, FalErrorKind::Connect);
        assert!(e.retryable() && !e.may_have_reached_fal);
    }
}
