//! The one error type of the HTTP API, rendered as `application/problem+json` (RFC 9457).
//!
//! Every failure a client can see goes through [`ApiError`]: handlers return it, extractors are
//! mapped onto it, and the fallback for unknown routes uses it. A 5xx never carries the cause in
//! its body; the cause is logged with the request id so an operator can find it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// One field that failed validation.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    /// Where the problem is: a JSON pointer-like dotted path (`input.prompt`), a query parameter
    /// or a header name.
    pub field: String,
    /// What is wrong with it, in words a developer can act on.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The problem document every error response carries.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:falgate:problem:<code>`).
    #[serde(rename = "type")]
    pub type_: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// A stable, machine-readable code (`validation_failed`, `not_found`, …).
    pub code: String,
    /// The id of this request (also in the `x-request-id` header); quote it when reporting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// For validation problems: every field that is wrong.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For a photo upload some of whose files were refused: the ids of the photos that were
    /// kept all the same (maybe none), in the order of their files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Vec<uuid::Uuid>>,
}

/// Every error the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    /// The route exists but does not take this method; the router adds the `Allow` header.
    #[error("this route does not take the {0} method; the `Allow` header lists those it takes")]
    MethodNotAllowed(String),
    #[error("{detail}")]
    ConflictCode { code: &'static str, detail: String },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// Some items of a request were refused (each named) and the others were kept.
    #[error("some items were refused")]
    PartlyRefused {
        refused: Vec<FieldError>,
        accepted: Vec<uuid::Uuid>,
    },
    #[error("{detail}")]
    Unprocessable { code: &'static str, detail: String },
    #[error("{0}")]
    ServiceUnavailable(String),
    /// This client holds as much of something as it may (open streams, say); it may try
    /// again once it holds less.
    #[error("{detail}")]
    TooMany { code: &'static str, detail: String },
    /// Too much of one kind of work is under way; the client may try again after
    /// `retry_after_secs` (sent as `Retry-After`).
    #[error("{detail}")]
    Busy {
        detail: String,
        retry_after_secs: u64,
    },
    /// A bug or an outage. The message is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::Internal(cause.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::ConflictCode { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) | Self::PartlyRefused { .. } | Self::Unprocessable { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ServiceUnavailable(_) | Self::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients can switch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::ConflictCode { code, .. }
            | Self::Unprocessable { code, .. }
            | Self::TooMany { code, .. } => code,
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Validation(_) | Self::PartlyRefused { .. } => "validation_failed",
            Self::ServiceUnavailable(_) => "service_unavailable",
            Self::Busy { .. } => "busy",
            Self::Internal(_) => "internal_error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "Bad request",
            Self::Unauthorized => "Unauthorized",
            Self::NotFound(_) => "Not found",
            Self::MethodNotAllowed(_) => "Method not allowed",
            Self::ConflictCode { .. } => "Conflict",
            Self::PayloadTooLarge { .. } => "Payload too large",
            Self::UnsupportedMediaType(_) => "Unsupported media type",
            Self::Validation(_) | Self::PartlyRefused { .. } => "Validation failed",
            Self::Unprocessable { .. } => "Unprocessable request",
            Self::TooMany { .. } => "Too many requests",
            Self::ServiceUnavailable(_) => "Service unavailable",
            Self::Busy { .. } => "Busy",
            Self::Internal(_) => "Internal server error",
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::Validation(errors) => {
                let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
                format!("the request has invalid fields: {}", fields.join(", "))
            }
            Self::PartlyRefused { refused, accepted } => {
                let fields: Vec<&str> = refused.iter().map(|e| e.field.as_str()).collect();
                format!(
                    "{} refused ({}); {} kept (listed in `accepted`)",
                    refused.len(),
                    fields.join(", "),
                    accepted.len()
                )
            }
            // Internals stay in the log.
            Self::Internal(_) => {
                "an internal error occurred; quote the request id when reporting it".to_owned()
            }
            other => other.to_string(),
        }
    }

    pub fn into_problem(self, request_id: Option<String>) -> Problem {
        let status = self.status();
        let code = self.code().to_owned();
        let problem = Problem {
            type_: format!("urn:falgate:problem:{code}"),
            title: self.title().to_owned(),
            status: status.as_u16(),
            detail: self.detail(),
            code,
            request_id,
            errors: Vec::new(),
            accepted: None,
        };
        match self {
            Self::Validation(errors) => Problem { errors, ..problem },
            Self::PartlyRefused { refused, accepted } => Problem {
                errors: refused,
                accepted: Some(accepted),
                ..problem
            },
            _ => problem,
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        match err {
            crate::store::StoreError::Unavailable(msg) => {
                tracing::error!(error = %msg, "database unavailable");
                Self::ServiceUnavailable("the database is unavailable; try again shortly".into())
            }
            // Two requests raced for one unique thing and this one lost: retrying settles it.
            crate::store::StoreError::UniqueTaken(_) => Self::ConflictCode {
                code: "conflict",
                detail: "another request changed the same thing at the same time; retry".into(),
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

// The request id travels to the error renderer through a task-local set by the request-id
// middleware, so that every problem document names its request without each handler passing
// it along.
tokio::task_local! {
    pub static REQUEST_ID: String;
}

pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(cause) = &self {
            tracing::error!(%cause, "internal error");
        }
        let unauthorized = matches!(self, Self::Unauthorized);
        let retry_after = match &self {
            Self::Busy {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        let problem = self.into_problem(current_request_id());
        let body = serde_json::to_vec(&problem).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if unauthorized {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="falgate""#),
            );
        }
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
