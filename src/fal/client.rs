//! The one HTTP client that speaks to FAL, and the helper every call goes through.
//!
//! One `reqwest::Client` for the whole process. The key travels only to the configured
//! queue/REST origins: URLs that FAL hands back (status_url, …) are used verbatim, but a
//! URL pointing at another origin is refused rather than sent our key. The calls themselves
//! live by API: `queue.rs` (submit, status, result, cancel) and `storage.rs` (uploads, and
//! downloads of FAL's public files).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::Bytes;
use reqwest::Url;
use serde::de::DeserializeOwned;

use super::Secret;
use super::error::{FalError, FalErrorKind, error_chain};

/// Output bodies above this are refused (a FAL result is JSON with URLs, not media).
pub(super) const MAX_RESULT_BYTES: usize = 32 * 1024 * 1024;
/// Error/status bodies are small; cap what we buffer from a misbehaving proxy.
pub(super) const MAX_SMALL_BYTES: usize = 1024 * 1024;

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

#[derive(Clone)]
pub struct FalClient {
    pub(super) http: reqwest::Client,
    pub(super) cfg: Arc<FalConfig>,
}

impl fmt::Debug for FalClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FalClient").field("cfg", &self.cfg).finish()
    }
}

impl FalClient {
    /// Builds the one HTTP client, installing the process's TLS provider if nobody has.
    pub fn new(cfg: FalConfig) -> Result<Self, FalError> {
        crate::install_crypto_provider();
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

    /// Sends `request` with our key and reads its whole answer, up to `limit` bytes. The
    /// caller has checked that the URL is FAL's ([`Self::queue_url`] or an endpoint URL).
    pub(super) async fn send_with_key(
        &self,
        request: reqwest::RequestBuilder,
        limit: usize,
    ) -> Result<Answer, FalError> {
        let response = request
            .header(header::AUTHORIZATION, self.auth())
            .send()
            .await
            .map_err(FalError::from_reqwest)?;
        Answer::read(response, limit).await
    }

    /// Sends `request` without our key (a signed storage URL, a public CDN file) and reads
    /// its whole answer, up to `limit` bytes.
    pub(super) async fn send_without_key(
        &self,
        request: reqwest::RequestBuilder,
        limit: usize,
    ) -> Result<Answer, FalError> {
        let response = request.send().await.map_err(FalError::from_reqwest)?;
        Answer::read(response, limit).await
    }

    /// Parses a URL FAL gave us and checks it stays on the queue origin, so that a
    /// tampered or unexpected answer cannot make us send the key elsewhere.
    pub(super) fn queue_url(&self, url: &str) -> Result<Url, FalError> {
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

/// A whole answer from FAL.
pub(super) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// Reads a whole answer, refusing bodies larger than `limit`.
    pub(super) async fn read(
        mut response: reqwest::Response,
        limit: usize,
    ) -> Result<Self, FalError> {
        let status = response.status();
        let headers = response.headers().clone();
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(FalError::from_reqwest)? {
            if buf.len() + chunk.len() > limit {
                let mut e = FalError::new(FalErrorKind::Decode, "answer too large");
                e.status = Some(status.as_u16());
                e.may_have_reached_fal = true;
                return Err(e);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Self {
            status,
            headers,
            body: buf.freeze(),
        })
    }

    /// FAL's error, as this answer states it.
    pub fn error(&self) -> FalError {
        FalError::from_response(self.status, &self.headers, &self.body)
    }

    /// The answer when it is a success; FAL's error otherwise.
    pub fn success(self) -> Result<Self, FalError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(self.error())
        }
    }

    /// The body as `T`; `what` names the answer in the error.
    pub fn json<T: DeserializeOwned>(&self, what: &str) -> Result<T, FalError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            let mut err = FalError::new(FalErrorKind::Decode, format!("{what} answer: {e}"));
            err.status = Some(self.status.as_u16());
            err
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fal::Secret;

    #[test]
    fn debug_and_display_never_show_the_key() {
        let cfg = FalConfig::production(Secret::from("key-id:very-secret-value"));
        crate::install_crypto_provider();
        let client = FalClient::new(cfg).unwrap();
        let dbg = format!("{client:?}");
        assert!(!dbg.contains("very-secret-value"), "{dbg}");
        assert!(!format!("{:?}", client.auth()).contains("very-secret-value"));
        let e = FalError::from_response(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            br#"{"detail": "No user found for Key ID and Secret"}"#,
        );
        assert!(!format!("{e} {e:?}").contains("very-secret-value"));
    }

    #[tokio::test]
    async fn refuses_foreign_urls_and_reports_connect_errors() {
        crate::install_crypto_provider();
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
