//! Idempotency keys: a client's promise that two requests carrying the same key mean one action.

use sha2::{Digest, Sha256};

/// A validated `Idempotency-Key` header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("must not be empty");
        }
        if raw.len() > Self::MAX_LEN {
            return Err("must be at most 255 characters");
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("may only hold visible ASCII characters");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What makes two requests "the same": the route and the meaning of the body. JSON bodies are
/// fingerprinted in canonical form (sorted keys, no insignificant space), so key order and
/// whitespace do not make a retry look different.
pub fn fingerprint(route: &str, canonical_body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(route.as_bytes());
    hasher.update([0]);
    hasher.update(canonical_body);
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(IdempotencyKey::parse("order-42").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse(&"x".repeat(256)).is_err());
    }

    #[test]
    fn fingerprints_depend_on_route_and_body() {
        let a = fingerprint("POST /v1/jobs", b"{\"a\":1}");
        assert_eq!(a, fingerprint("POST /v1/jobs", b"{\"a\":1}"));
        assert_ne!(a, fingerprint("POST /v1/jobs", b"{\"a\":2}"));
        assert_ne!(a, fingerprint("POST /v1/avatars", b"{\"a\":1}"));
    }
}
