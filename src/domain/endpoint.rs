//! FAL endpoint ids (`owner/alias[/path…]`), parsed once at the edge.

use super::trainers::{self, BaseFamily};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The default allow-list for raw jobs: FAL's current trainers, and the endpoints their weights
/// (and finetunes made before FAL deprecated its pro trainer) generate on. A trainer FAL has
/// deprecated is left out, as `auto` never picks one; an operator who still needs it names it
/// in `FALGATE_ALLOWED_ENDPOINTS`.
pub fn default_allowed() -> Vec<&'static str> {
    let generation = BaseFamily::ALL.map(BaseFamily::generation_endpoint);
    let trainers = trainers::all()
        .iter()
        .filter(|entry| entry.is_current())
        .map(|entry| entry.endpoint);
    generation.into_iter().chain(trainers).collect()
}

/// A syntactically valid FAL endpoint id. Whether it may be called is the allow-list's business.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EndpointId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointIdError {
    #[error("must have at least two segments, `owner/alias`")]
    TooFewSegments,
    #[error("is longer than 200 characters")]
    TooLong,
    #[error("segment `{0}` may only hold letters, digits, `-`, `_` and `.`")]
    BadSegment(String),
}

impl EndpointId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EndpointId {
    type Err = EndpointIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 200 {
            return Err(EndpointIdError::TooLong);
        }
        let segments: Vec<&str> = s.split('/').collect();
        if segments.len() < 2 {
            return Err(EndpointIdError::TooFewSegments);
        }
        for segment in &segments {
            let fine = !segment.is_empty()
                && *segment != "."
                && *segment != ".."
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !fine {
                return Err(EndpointIdError::BadSegment((*segment).to_owned()));
            }
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for EndpointId {
    type Error = EndpointIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<EndpointId> for String {
    fn from(value: EndpointId) -> Self {
        value.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_real_endpoint_ids() {
        for id in default_allowed() {
            assert_eq!(id.parse::<EndpointId>().unwrap().as_str(), id);
        }
        assert!("workflows/owner/app/sub".parse::<EndpointId>().is_ok());
    }

    #[test]
    fn refuses_malformed_ids() {
        assert_eq!(
            "flux".parse::<EndpointId>(),
            Err(EndpointIdError::TooFewSegments)
        );
        for bad in [
            "fal-ai/",
            "/flux",
            "fal-ai//x",
            "fal-ai/../x",
            "fal ai/x",
            "fal-ai/x?y=1",
        ] {
            assert!(bad.parse::<EndpointId>().is_err(), "{bad}");
        }
        assert_eq!(
            "a/".repeat(101).parse::<EndpointId>(),
            Err(EndpointIdError::TooLong)
        );
    }

    #[test]
    fn raw_jobs_reach_no_retired_trainer_by_default() {
        let allowed = default_allowed();
        assert!(!allowed.contains(&"fal-ai/flux-pro-trainer"));
        for endpoint in [
            "fal-ai/flux-lora",
            "fal-ai/flux-lora-portrait-trainer",
            "fal-ai/wan-22-image-trainer",
            "fal-ai/wan/v2.2-a14b/text-to-image/lora",
            "fal-ai/flux-pro/v1.1-ultra-finetuned",
        ] {
            assert!(allowed.contains(&endpoint), "{endpoint}");
        }
    }
}
