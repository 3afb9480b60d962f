//! FAL's queue: submit a request, ask its status, fetch its result, cancel it.

use axum::http::header;
use reqwest::Url;
use serde_json::Value;

use super::client::{FalClient, MAX_RESULT_BYTES, MAX_SMALL_BYTES};
use super::error::{FalError, FalErrorKind};
use super::urls::{RequestUrls, endpoint_url, requests_base};
use super::wire::{CancelResponse, CancelStatus, QueueStatus, SubmitResponse};

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

impl FalClient {
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
        let request = self
            .http
            .post(url)
            .header(header::ACCEPT, "application/json")
            .json(input);
        let answer = self
            .send_with_key(request, MAX_SMALL_BYTES)
            .await?
            .success()?;
        answer.json("submit").map_err(|mut err| {
            // FAL said yes but we cannot read the id: a job probably exists.
            err.may_have_reached_fal = true;
            err
        })
    }

    /// `GET status_url?logs=1|0`.
    pub async fn status(&self, status_url: &str, logs: bool) -> Result<QueueStatus, FalError> {
        let mut url = self.queue_url(status_url)?;
        url.query_pairs_mut()
            .append_pair("logs", if logs { "1" } else { "0" });
        let answer = self
            .send_with_key(self.http.get(url), MAX_SMALL_BYTES)
            .await?
            .success()?;
        answer.json("status")
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
        let answer = self
            .send_with_key(self.http.get(url), MAX_RESULT_BYTES)
            .await?;
        let status = answer.status;
        if status.is_success() {
            return answer.json("result").map(ModelResult::Output);
        }
        let err = answer.error();
        let json = serde_json::from_slice::<Value>(&answer.body).ok();
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
            body: json
                .unwrap_or_else(|| Value::String(String::from_utf8_lossy(&answer.body).into())),
            error_type: err.error_type.clone(),
        })
    }

    /// `PUT cancel_url`.
    pub async fn cancel(&self, cancel_url: &str) -> Result<CancelOutcome, FalError> {
        let url = self.queue_url(cancel_url)?;
        let answer = self
            .send_with_key(self.http.put(url), MAX_SMALL_BYTES)
            .await?;
        let status = answer.status;
        let parsed = serde_json::from_slice::<CancelResponse>(&answer.body).ok();
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
                body: String::from_utf8_lossy(&answer.body)
                    .chars()
                    .take(1000)
                    .collect(),
            }),
            _ => Err(answer.error()),
        }
    }
}
