//! API keys: `fgk_` + 43 characters of base64url randomness. Only the SHA-256 of a key is
//! stored; the key itself is shown once, when it is made.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;

const SCHEME: &str = "fgk_";
/// How many characters of a key are kept in the clear to recognise it in listings.
const PREFIX_LEN: usize = SCHEME.len() + 8;

/// A freshly made key: its secret is here only until it is printed.
pub struct NewApiKey {
    pub secret: String,
    pub prefix: String,
    pub hash: KeyHash,
}

impl fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewApiKey")
            .field("prefix", &self.prefix)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// The stored form of a key: hex SHA-256 of the whole key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHash(pub String);

impl NewApiKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("{SCHEME}{}", URL_SAFE_NO_PAD.encode(bytes));
        let prefix = secret[..PREFIX_LEN].to_owned();
        let hash = hash_key(&secret);
        Self {
            secret,
            prefix,
            hash,
        }
    }
}

pub fn hash_key(secret: &str) -> KeyHash {
    KeyHash(hex::encode(Sha256::digest(secret.as_bytes())))
}

/// Whether a presented bearer token has the shape of one of our keys; anything else is refused
/// before it costs a database lookup.
pub fn looks_like_key(token: &str) -> bool {
    token.len() == SCHEME.len() + 43
        && token.starts_with(SCHEME)
        && token[SCHEME.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_unique_recognisable_and_hashed() {
        let a = NewApiKey::generate();
        let b = NewApiKey::generate();
        assert_ne!(a.secret, b.secret);
        assert!(looks_like_key(&a.secret));
        assert!(a.secret.starts_with(&a.prefix));
        assert_eq!(hash_key(&a.secret), a.hash);
        assert_eq!(a.hash.0.len(), 64);
        assert!(!format!("{a:?}").contains(&a.secret));
    }

    #[test]
    fn other_tokens_do_not_look_like_keys() {
        assert!(!looks_like_key(""));
        assert!(!looks_like_key("fgk_short"));
        let key = NewApiKey::generate().secret;
        assert!(!looks_like_key(&key.replace("fgk_", "abc_")));
        assert!(!looks_like_key(&format!("{}!", &key[..key.len() - 1])));
    }
}
