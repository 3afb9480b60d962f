//! Posting one webhook: the event as JSON, signed per Standard Webhooks (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature`), through a client that reaches only addresses the
//! guard allows, follows no redirect and uses no proxy.

use super::guard::{GuardedResolver, Refusal, check_shape};
use crate::config::WebhookDelivery;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most of a receiver's answer kept with its attempt.
const RESPONSE_START: usize = 1024;

/// What came of one post.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub status: Option<u16>,
    /// The start of the answer's body.
    pub response_start: Option<String>,
    /// Why no answer came.
    pub error: Option<String>,
    pub took: Duration,
}

impl Sent {
    pub fn succeeded(&self) -> bool {
        self.status
            .is_some_and(|status| (200..300).contains(&status))
    }
}

#[derive(Clone)]
pub struct WebhookSender {
    http: reqwest::Client,
    config: Arc<WebhookDelivery>,
}

impl WebhookSender {
    pub fn new(config: WebhookDelivery) -> Result<Self, String> {
        let config = Arc::new(config);
        let http = reqwest::Client::builder()
            .dns_resolver(GuardedResolver {
                config: config.clone(),
            })
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("falgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("the webhook client: {e}"))?;
        Ok(Self { http, config })
    }

    pub fn config(&self) -> &WebhookDelivery {
        &self.config
    }

    /// Posts `body` to `url`, signed with each of `secrets` (`whsec_…`), as message `id`.
    pub async fn send(&self, url: &str, id: &str, body: &str, secrets: &[&str]) -> Sent {
        let started = Instant::now();
        let failed = |error: String| Sent {
            status: None,
            response_start: None,
            error: Some(error),
            took: started.elapsed(),
        };
        let url: reqwest::Url = match url.parse() {
            Ok(url) => url,
            Err(e) => return failed(format!("not a URL: {e}")),
        };
        if let Err(refused) = check_shape(&url, &self.config) {
            return failed(refused.to_string());
        }
        // An IP literal is not looked up, so the resolver's check does not see it.
        if let Some(host) = url.host_str()
            && host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok()
            && let Err(refused) = super::guard::resolve(host, 0, &self.config).await
        {
            return failed(refused.to_string());
        }
        let timestamp = chrono::Utc::now().timestamp();
        let signature = match sign(id, timestamp, body, secrets) {
            Ok(signature) => signature,
            Err(e) => return failed(e),
        };
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
            .await;
        match response {
            Ok(response) => {
                let status = response.status().as_u16();
                let response_start = read_start(response).await;
                Sent {
                    status: Some(status),
                    response_start,
                    error: None,
                    took: started.elapsed(),
                }
            }
            Err(e) => failed(describe(&e)),
        }
    }
}

/// `v1,<signature>` for each secret, space-separated, as Standard Webhooks allows.
fn sign(id: &str, timestamp: i64, body: &str, secrets: &[&str]) -> Result<String, String> {
    let mut signatures = Vec::with_capacity(secrets.len());
    for secret in secrets {
        let signer = standardwebhooks::Webhook::new(secret)
            .map_err(|_| "the endpoint's secret is not valid base64".to_owned())?;
        signatures.push(
            signer
                .sign(id, timestamp, body.as_bytes())
                .map_err(|e| format!("signing: {e}"))?,
        );
    }
    Ok(signatures.join(" "))
}

async fn read_start(mut response: reqwest::Response) -> Option<String> {
    let mut start = Vec::new();
    while start.len() < RESPONSE_START {
        match response.chunk().await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk),
            _ => break,
        }
    }
    start.truncate(RESPONSE_START);
    (!start.is_empty()).then(|| String::from_utf8_lossy(&start).into_owned())
}

/// A transport failure in words a client can act on, without the URL's query (which may hold
/// the client's own token).
fn describe(error: &reqwest::Error) -> String {
    let refused = std::error::Error::source(error).and_then(|mut source| {
        loop {
            if let Some(refusal) = source.downcast_ref::<Refusal>() {
                return Some(refusal.to_string());
            }
            source = source.source()?;
        }
    });
    if let Some(refused) = refused {
        return refused;
    }
    if error.is_timeout() {
        "the receiver did not answer in time".into()
    } else if error.is_connect() {
        "could not connect to the receiver".into()
    } else {
        "the request to the receiver failed".into()
    }
}
