//! Pure types and rules: no I/O, nothing of ours imported. Everything here is parsed at the edge
//! and tested alone.

pub mod address;
pub mod api_key;
pub mod archive;
pub mod avatar;
pub mod endpoint;
pub mod event;
pub mod generation;
pub mod idempotency;
pub mod job;
pub mod photo;
pub mod trainers;

use chrono::{DateTime, SubsecRound, Utc};

/// A word that names none of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value `{0}`")]
pub struct UnknownVariant(pub String);

/// The value of `all` spelt `word`: the one lookup behind every enum's `FromStr`, so that an
/// enum's spelling is written once, in its `as_str`.
pub fn parse_spelling<T: Copy>(
    all: &[T],
    spell: fn(T) -> &'static str,
    word: &str,
) -> Result<T, UnknownVariant> {
    all.iter()
        .copied()
        .find(|value| spell(*value) == word)
        .ok_or_else(|| UnknownVariant(word.to_owned()))
}

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
