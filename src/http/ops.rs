//! Operations: liveness, readiness.

use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the process answers.
    pub status: String,
    pub version: String,
    /// True when FAL is the built-in emulator: nothing reaches the real FAL.
    pub sandbox: bool,
}

/// Liveness
///
/// The process is up and serving.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive.", body = Health))
)]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        sandbox: state.sandbox(),
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    /// `ok`, or why the database is not usable.
    pub database: String,
    /// Versions of migrations that are known to this build but not applied.
    pub pending_migrations: Vec<i64>,
    /// `ok`, or `key_refused` when FAL refused our key on the last call (every job would fail).
    pub fal: String,
}

/// Readiness
///
/// Ready when the database answers, every migration is applied, and FAL has not refused our key.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve.", body = Readiness),
        (status = 503, description = "Not ready; the body says why.", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (database, pending_migrations) = match state.store.readiness().await {
        Ok(found) if found.pending_migrations.is_empty() => ("ok".to_owned(), Vec::new()),
        Ok(found) => ("migrations pending".to_owned(), found.pending_migrations),
        Err(err) => {
            tracing::warn!(error = %err, "readiness check failed");
            ("unreachable".to_owned(), Vec::new())
        }
    };
    let fal_ok = !state.fal_health.key_refused();
    let ready = database == "ok" && fal_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" }.into(),
            database,
            pending_migrations,
            fal: if fal_ok { "ok" } else { "key_refused" }.into(),
        }),
    )
}

/// Metrics
///
/// Prometheus text format: requests answered by status class, jobs by state, unconfirmed and
/// resent submits, and whether FAL refused our key.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Metrics in Prometheus text format.", body = String, content_type = "text/plain"),
        (status = 503, description = "The database is unavailable.", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn metrics(
    State(state): State<AppState>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), crate::error::ApiError> {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP falgate_http_responses_total HTTP responses by status class."
    );
    let _ = writeln!(out, "# TYPE falgate_http_responses_total counter");
    for (class, count) in state.http_counters.by_class() {
        let _ = writeln!(
            out,
            "falgate_http_responses_total{{class=\"{class}xx\"}} {count}"
        );
    }
    let _ = writeln!(out, "# HELP falgate_jobs Jobs by state.");
    let _ = writeln!(out, "# TYPE falgate_jobs gauge");
    let counts = state.store.count_jobs_by_status().await?;
    for status in crate::domain::job::JobStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| s == status.as_str())
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let _ = writeln!(out, "falgate_jobs{{status=\"{status}\"}} {n}");
    }
    for (name, help, counter) in [
        (
            "falgate_submits_unconfirmed_total",
            "Submits whose answer was lost or whose process stopped mid-call: FAL may hold a \
             request, and the job waits for its callback before anything is sent again.",
            &state.counters.submits_unconfirmed,
        ),
        (
            "falgate_submits_resent_total",
            "Jobs sent again after an unconfirmed submit, no callback having named them \
             within the wait.",
            &state.counters.submits_resent,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(
            out,
            "{name} {}",
            counter.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP falgate_fal_key_refused 1 when FAL refused our key on the last call."
    );
    let _ = writeln!(out, "# TYPE falgate_fal_key_refused gauge");
    let _ = writeln!(
        out,
        "falgate_fal_key_refused {}",
        u8::from(state.fal_health.key_refused())
    );
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    ))
}
