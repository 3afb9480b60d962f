//! Pure types and rules: no I/O, nothing of ours imported. Everything here is parsed at the edge
//! and tested alone.

pub mod api_key;
pub mod archive;
pub mod avatar;
pub mod endpoint;
pub mod generation;
pub mod idempotency;
pub mod job;
pub mod photo;

use chrono::{DateTime, SubsecRound, Utc};

/// The current time at the precision both databases keep (microseconds), so that a time read
/// back equals the time written.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A field of a request that a domain rule refuses, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}
