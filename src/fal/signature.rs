//! Ed25519 verification of FAL webhook deliveries, and a JWKS cache.
//!
//! Message = `request_id \n user_id \n timestamp \n hex(sha256(raw body))`, signed with one
//! of the keys FAL publishes. No `kid` is sent, so every key is tried. The body is verified
//! as received: never re-serialize it before checking.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, VerifyingKey};
use reqwest::Url;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// FAL's documented leeway between its timestamp and our clock.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 300;

pub const HEADER_REQUEST_ID: &str = "x-fal-webhook-request-id";
pub const HEADER_USER_ID: &str = "x-fal-webhook-user-id";
pub const HEADER_TIMESTAMP: &str = "x-fal-webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "x-fal-webhook-signature";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A required `X-Fal-Webhook-*` header is absent or not visible ASCII: reject (401).
    #[error("missing or unreadable header {0}")]
    MissingHeader(&'static str),
    /// No key to check against (none cached, fetch failed): answer 503 so FAL retries.
    #[error("webhook keys unavailable: {0}")]
    KeysUnavailable(String),
}

/// Outcome of a check that could be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A published key signed this exact body. `stale` = timestamp more than 300 s from
    /// our clock: authentic but possibly replayed, so store it without trusting it.
    Valid {
        stale: bool,
    },
    Invalid(InvalidReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// Signature is not 128 hex chars.
    MalformedSignature,
    /// Timestamp is not a decimal integer.
    MalformedTimestamp,
    /// Well-formed, but no key verifies it (forged, tampered, or signed by a key we lack).
    NoKeyMatched,
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid { .. })
    }
}

/// The four signed headers, verbatim (the signature covers their exact text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookHeaders {
    pub request_id: String,
    pub user_id: String,
    pub timestamp: String,
    pub signature: String,
}

impl WebhookHeaders {
    /// `HeaderMap` lookups are case-insensitive, as HTTP header names are.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, SignatureError> {
        let get = |name: &'static str| -> Result<String, SignatureError> {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or(SignatureError::MissingHeader(name))
        };
        Ok(Self {
            request_id: get(HEADER_REQUEST_ID)?,
            user_id: get(HEADER_USER_ID)?,
            timestamp: get(HEADER_TIMESTAMP)?,
            signature: get(HEADER_SIGNATURE)?,
        })
    }
}

/// The bytes FAL signs for a delivery.
pub fn signed_message(request_id: &str, user_id: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    let body_hash = hex::encode(Sha256::digest(body));
    format!("{request_id}\n{user_id}\n{timestamp}\n{body_hash}").into_bytes()
}

/// Checks a delivery against `keys`. `Err` only when there is no key at all, which the
/// caller must treat as "cannot decide" (503), not as a forgery.
pub fn verify(
    headers: &WebhookHeaders,
    raw_body: &[u8],
    keys: &[VerifyingKey],
    now_unix: i64,
) -> Result<Verdict, SignatureError> {
    if keys.is_empty() {
        return Err(SignatureError::KeysUnavailable("no keys".into()));
    }
    let sig_hex = headers.signature.trim();
    let Some(signature) = (sig_hex.len() == 128)
        .then(|| hex::decode(sig_hex).ok())
        .flatten()
        .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
        .map(|b| Signature::from_bytes(&b))
    else {
        return Ok(Verdict::Invalid(InvalidReason::MalformedSignature));
    };
    // Parse strictly (digits only) so the signed text and the number we judge agree.
    let ts_text = headers.timestamp.as_str();
    let Some(ts) = (!ts_text.is_empty() && ts_text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| ts_text.parse::<i64>().ok())
        .flatten()
    else {
        return Ok(Verdict::Invalid(InvalidReason::MalformedTimestamp));
    };
    let message = signed_message(&headers.request_id, &headers.user_id, ts_text, raw_body);
    // verify_strict rejects small-order keys and malleable signatures; FAL's signatures
    // are standard RFC 8032 ones and pass it.
    if keys
        .iter()
        .any(|k| k.verify_strict(&message, &signature).is_ok())
    {
        let stale = now_unix.saturating_sub(ts).abs() > TIMESTAMP_TOLERANCE_SECS;
        Ok(Verdict::Valid { stale })
    } else {
        Ok(Verdict::Invalid(InvalidReason::NoKeyMatched))
    }
}

#[derive(Deserialize)]
struct JwksDoc {
    #[serde(default)]
    keys: Vec<serde_json::Value>,
}

/// Ed25519 keys of a JWKS document. Keys of other types, with an undecodable `x`, or not
/// on the curve are skipped: one odd entry must not disable the others. `x` may be
/// padded (FAL pads) or unpadded (RFC 7517) base64url.
pub fn parse_jwks(bytes: &[u8]) -> Vec<VerifyingKey> {
    let Ok(doc) = serde_json::from_slice::<JwksDoc>(bytes) else {
        return Vec::new();
    };
    doc.keys
        .iter()
        .filter_map(|k| {
            let field = |name: &str| k.get(name).and_then(|v| v.as_str());
            if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
                return None;
            }
            if field("use").is_some_and(|u| u != "sig") {
                return None;
            }
            let x = field("x")?.trim_end_matches('=');
            let raw = URL_SAFE_NO_PAD.decode(x).ok()?;
            let bytes: [u8; 32] = raw.try_into().ok()?;
            VerifyingKey::from_bytes(&bytes).ok()
        })
        .collect()
}

/// Encodes a key as a JWKS entry the way FAL does (padded base64url `x`).
pub fn jwk_for(key: &VerifyingKey, kid: &str) -> serde_json::Value {
    use base64::engine::general_purpose::URL_SAFE;
    serde_json::json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "kid": kid,
        "x": URL_SAFE.encode(key.as_bytes()),
        "use": "sig",
    })
}

/// Caches FAL's JWKS for at most `ttl` (FAL: "do not cache longer than 24 hours") and
/// refetches once when no cached key verifies, at most once per `min_refetch_interval`
/// so that a stream of forged callbacks cannot turn us into a JWKS hammer.
#[derive(Clone)]
pub struct JwksCache {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    url: Url,
    ttl: Duration,
    min_refetch_interval: Duration,
    fetch_timeout: Duration,
    state: tokio::sync::Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    keys: Vec<VerifyingKey>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    fetches: u64,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("url", &self.inner.url.as_str())
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

impl JwksCache {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
    pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

    pub fn new(http: reqwest::Client, url: Url) -> Self {
        Self::with_settings(
            http,
            url,
            Self::DEFAULT_TTL,
            Self::DEFAULT_MIN_REFETCH_INTERVAL,
        )
    }

    pub fn with_settings(
        http: reqwest::Client,
        url: Url,
        ttl: Duration,
        min_refetch_interval: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                http,
                url,
                ttl,
                min_refetch_interval,
                fetch_timeout: Duration::from_secs(10),
                state: tokio::sync::Mutex::new(CacheState::default()),
            }),
        }
    }

    /// How many fetches were attempted (for tests and metrics).
    pub async fn fetch_count(&self) -> u64 {
        self.inner.state.lock().await.fetches
    }

    /// Cached keys, fetched when absent or older than the TTL. An expired set is still
    /// used when a refetch fails: FAL rotates rarely and refusing every callback would be
    /// worse than trusting yesterday's keys.
    pub async fn keys(&self) -> Result<Vec<VerifyingKey>, SignatureError> {
        let mut state = self.inner.state.lock().await;
        let fresh = state
            .fetched_at
            .is_some_and(|t| t.elapsed() < self.inner.ttl);
        if fresh && !state.keys.is_empty() {
            return Ok(state.keys.clone());
        }
        if self.may_fetch(&state) {
            match self.fetch(&mut state).await {
                Ok(()) => {}
                Err(e) if state.keys.is_empty() => return Err(e),
                Err(e) => tracing::warn!(error = %e, "JWKS refresh failed; using expired keys"),
            }
        }
        if state.keys.is_empty() {
            return Err(SignatureError::KeysUnavailable(
                "no usable key fetched yet".into(),
            ));
        }
        Ok(state.keys.clone())
    }

    /// Verifies with the cached keys, refetching once if none matched (FAL rotated).
    pub async fn verify_with_refetch(
        &self,
        headers: &WebhookHeaders,
        raw_body: &[u8],
        now_unix: i64,
    ) -> Result<Verdict, SignatureError> {
        let keys = self.keys().await?;
        let verdict = verify(headers, raw_body, &keys, now_unix)?;
        if verdict != Verdict::Invalid(InvalidReason::NoKeyMatched) {
            return Ok(verdict);
        }
        let mut state = self.inner.state.lock().await;
        // Another task may have refreshed while we verified: use its keys first.
        if state.keys != keys {
            let again = verify(headers, raw_body, &state.keys, now_unix);
            if !matches!(again, Ok(Verdict::Invalid(InvalidReason::NoKeyMatched))) {
                return again;
            }
        }
        if !self.may_fetch(&state) {
            return Ok(verdict);
        }
        match self.fetch(&mut state).await {
            Ok(()) => verify(headers, raw_body, &state.keys, now_unix),
            // We still hold keys that merely did not match: that is a verdict, not an outage.
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refetch after unknown signature failed");
                Ok(verdict)
            }
        }
    }

    fn may_fetch(&self, state: &CacheState) -> bool {
        state
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.inner.min_refetch_interval)
    }

    async fn fetch(&self, state: &mut CacheState) -> Result<(), SignatureError> {
        state.last_attempt = Some(Instant::now());
        state.fetches += 1;
        let unavailable = |e: String| SignatureError::KeysUnavailable(e);
        let resp = self
            .inner
            .http
            .get(self.inner.url.clone())
            .timeout(self.inner.fetch_timeout)
            .send()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("JWKS answered {}", resp.status())));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        let keys = parse_jwks(&body);
        if keys.is_empty() {
            return Err(unavailable("JWKS holds no usable Ed25519 key".into()));
        }
        state.keys = keys;
        state.fetched_at = Some(Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const DIR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fal-webhook-golden/"
    );
    const NOW: i64 = 1784206014;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{DIR}{name}")).expect("golden fixture")
    }

    fn golden() -> (WebhookHeaders, Vec<u8>, Vec<VerifyingKey>) {
        let raw: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(&fixture("headers.json")).unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in &raw {
            map.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let headers = WebhookHeaders::from_headers(&map).unwrap();
        (
            headers,
            fixture("body.json"),
            parse_jwks(&fixture("jwks.json")),
        )
    }

    #[test]
    fn golden_vector_verifies_with_first_key_only() {
        let (h, body, keys) = golden();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            verify(&h, &body, &keys, NOW),
            Ok(Verdict::Valid { stale: false })
        );
        assert_eq!(
            verify(&h, &body, &keys[..1], NOW),
            Ok(Verdict::Valid { stale: false })
        );
        assert_eq!(
            verify(&h, &body, &keys[1..], NOW),
            Ok(Verdict::Invalid(InvalidReason::NoKeyMatched))
        );
    }

    #[test]
    fn golden_vector_any_byte_change_fails() {
        let (h, body, keys) = golden();
        // Only the signing key: the second never matches, and debug-build Ed25519 is slow.
        let keys = &keys[..1];
        for i in 0..body.len() {
            let mut b = body.clone();
            b[i] ^= 0x01;
            assert!(!verify(&h, &b, keys, NOW).unwrap().is_valid(), "byte {i}");
        }
        let mut longer = body.clone();
        longer.push(b'\n');
        assert!(!verify(&h, &longer, keys, NOW).unwrap().is_valid());

        let mutate = |s: &str| -> Vec<String> {
            (0..s.len())
                .map(|i| {
                    let mut b = s.as_bytes().to_vec();
                    b[i] = if b[i] == b'1' { b'2' } else { b'1' };
                    String::from_utf8(b).unwrap()
                })
                .collect()
        };
        for v in mutate(&h.request_id) {
            let h2 = WebhookHeaders {
                request_id: v,
                ..h.clone()
            };
            assert!(!verify(&h2, &body, keys, NOW).unwrap().is_valid());
        }
        for v in mutate(&h.user_id) {
            let h2 = WebhookHeaders {
                user_id: v,
                ..h.clone()
            };
            assert!(!verify(&h2, &body, keys, NOW).unwrap().is_valid());
        }
        for v in mutate(&h.timestamp) {
            let h2 = WebhookHeaders {
                timestamp: v,
                ..h.clone()
            };
            assert!(!verify(&h2, &body, keys, NOW).unwrap().is_valid());
        }
        for v in mutate(&h.signature) {
            let h2 = WebhookHeaders {
                signature: v,
                ..h.clone()
            };
            assert!(!verify(&h2, &body, keys, NOW).unwrap().is_valid());
        }
    }

    #[test]
    fn golden_vector_clock_skew_is_stale() {
        let (h, body, keys) = golden();
        for now in [NOW + 300, NOW - 300] {
            assert_eq!(
                verify(&h, &body, &keys, now),
                Ok(Verdict::Valid { stale: false })
            );
        }
        for now in [NOW + 301, NOW - 301] {
            assert_eq!(
                verify(&h, &body, &keys, now),
                Ok(Verdict::Valid { stale: true })
            );
        }
    }

    #[test]
    fn malformed_inputs() {
        let (h, body, keys) = golden();
        let short = WebhookHeaders {
            signature: "abcd".into(),
            ..h.clone()
        };
        assert_eq!(
            verify(&short, &body, &keys, NOW),
            Ok(Verdict::Invalid(InvalidReason::MalformedSignature))
        );
        let nonhex = WebhookHeaders {
            signature: "zz".repeat(64),
            ..h.clone()
        };
        assert_eq!(
            verify(&nonhex, &body, &keys, NOW),
            Ok(Verdict::Invalid(InvalidReason::MalformedSignature))
        );
        for ts in [
            "",
            "-1784206014",
            "1784206014.0",
            " 1784206014",
            "99999999999999999999",
        ] {
            let bad = WebhookHeaders {
                timestamp: ts.into(),
                ..h.clone()
            };
            assert_eq!(
                verify(&bad, &body, &keys, NOW),
                Ok(Verdict::Invalid(InvalidReason::MalformedTimestamp)),
                "{ts:?}"
            );
        }
        assert!(matches!(
            verify(&h, &body, &[], NOW),
            Err(SignatureError::KeysUnavailable(_))
        ));
    }

    #[test]
    fn headers_are_case_insensitive_and_required() {
        let mut map = HeaderMap::new();
        map.insert("X-FAL-WEBHOOK-REQUEST-ID", HeaderValue::from_static("r"));
        map.insert("x-fal-webhook-user-id", HeaderValue::from_static("u"));
        map.insert("X-Fal-Webhook-Timestamp", HeaderValue::from_static("1"));
        assert_eq!(
            WebhookHeaders::from_headers(&map),
            Err(SignatureError::MissingHeader(HEADER_SIGNATURE))
        );
        map.insert("X-Fal-Webhook-Signature", HeaderValue::from_static("s"));
        let h = WebhookHeaders::from_headers(&map).unwrap();
        assert_eq!((h.request_id.as_str(), h.signature.as_str()), ("r", "s"));
    }

    #[test]
    fn jwks_parsing_is_tolerant() {
        let (_, _, keys) = golden();
        let padded = URL_SAFE_NO_PAD.encode(keys[0].as_bytes());
        let doc = serde_json::json!({"keys": [
            {"kty": "RSA", "n": "abc", "e": "AQAB"},
            {"kty": "OKP", "crv": "X25519", "x": padded},
            {"kty": "OKP", "crv": "Ed25519", "x": "not base64!"},
            {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"},
            {"kty": "OKP", "crv": "Ed25519", "x": padded, "use": "enc"},
            {"kty": "OKP", "crv": "Ed25519"},
            {"kty": "OKP", "crv": "Ed25519", "x": padded},
            jwk_for(&keys[1], "k2"),
        ]});
        let parsed = parse_jwks(doc.to_string().as_bytes());
        assert_eq!(parsed, vec![keys[0], keys[1]]);
        assert!(
            jwk_for(&keys[1], "k2")["x"]
                .as_str()
                .unwrap()
                .ends_with('=')
        );
        assert!(parse_jwks(b"not json").is_empty());
        assert!(parse_jwks(b"{}").is_empty());
    }

    /// Serves a JWKS whose content the test can change, counting hits.
    async fn jwks_server(
        body: Arc<std::sync::Mutex<(u16, String)>>,
        hits: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Url {
        use axum::{Router, routing::get};
        let app = Router::new().route(
            "/.well-known/jwks.json",
            get(move || {
                let body = body.clone();
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (code, text) = body.lock().unwrap().clone();
                    (axum::http::StatusCode::from_u16(code).unwrap(), text)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Url::parse(&format!("http://{addr}/.well-known/jwks.json")).unwrap()
    }

    #[tokio::test]
    async fn cache_refetches_once_on_unknown_key_and_rate_limits() {
        crate::install_crypto_provider();
        let (h, body, _) = golden();
        let jwks_all = String::from_utf8(fixture("jwks.json")).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&jwks_all).unwrap();
        let only_second = serde_json::json!({"keys": [doc["keys"][1].clone()]}).to_string();

        let served = Arc::new(std::sync::Mutex::new((200, only_second)));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let url = jwks_server(served.clone(), hits.clone()).await;
        let http = reqwest::Client::new();
        let cache = JwksCache::with_settings(
            http,
            url,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );

        // Cached set lacks the signing key; a refetch inside the interval is refused.
        assert_eq!(
            cache.verify_with_refetch(&h, &body, NOW).await,
            Ok(Verdict::Invalid(InvalidReason::NoKeyMatched))
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);

        // With a zero interval the unknown signature triggers exactly one refetch.
        served.lock().unwrap().1 = jwks_all;
        let cache = JwksCache::with_settings(
            reqwest::Client::new(),
            cache.inner.url.clone(),
            Duration::from_secs(3600),
            Duration::ZERO,
        );
        {
            // Prime with the old set.
            let mut st = cache.inner.state.lock().await;
            st.keys = parse_jwks(
                serde_json::json!({"keys": [doc["keys"][1].clone()]})
                    .to_string()
                    .as_bytes(),
            );
            st.fetched_at = Some(Instant::now());
        }
        let before = hits.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            cache.verify_with_refetch(&h, &body, NOW).await,
            Ok(Verdict::Valid { stale: false })
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), before + 1);
        // Now cached: no more fetches.
        assert!(
            cache
                .verify_with_refetch(&h, &body, NOW)
                .await
                .unwrap()
                .is_valid()
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), before + 1);
    }

    #[tokio::test]
    async fn cache_fetch_failure_without_keys_is_unavailable() {
        crate::install_crypto_provider();
        let (h, body, _) = golden();
        let served = Arc::new(std::sync::Mutex::new((500, "oops".to_string())));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let url = jwks_server(served.clone(), hits.clone()).await;
        let cache = JwksCache::with_settings(
            reqwest::Client::new(),
            url,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        assert!(matches!(
            cache.verify_with_refetch(&h, &body, NOW).await,
            Err(SignatureError::KeysUnavailable(_))
        ));
        // Rate limit also holds for failures: a second callback does not refetch.
        assert!(cache.keys().await.is_err());
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(cache.fetch_count().await, 1);

        // Garbage JWKS counts as unavailable too.
        served.lock().unwrap().0 = 200;
        let cache = JwksCache::new(reqwest::Client::new(), cache.inner.url.clone());
        assert!(matches!(
            cache.keys().await,
            Err(SignatureError::KeysUnavailable(_))
        ));
    }
}
