//! The token in our callback URL: `base64url(HMAC-SHA256(secret, "fal-callback:" + job_id))`.
//!
//! It is checked before the Ed25519 signature so that a stranger cannot make us fetch the
//! JWKS or store a body for a job they guessed. Several secrets allow rotation: the first
//! signs new URLs, every one still verifies URLs already handed to FAL.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use reqwest::Url;
use sha2::Sha256;
use uuid::Uuid;

use super::Secret;

type HmacSha256 = Hmac<Sha256>;

const DOMAIN: &[u8] = b"fal-callback:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("at least one callback secret is required")]
    NoSecret,
    #[error("callback secrets must not be empty")]
    EmptySecret,
}

/// Signs and verifies callback URL tokens. `Debug` shows only how many secrets exist.
#[derive(Clone)]
pub struct CallbackSigner {
    secrets: Vec<Secret>,
}

impl std::fmt::Debug for CallbackSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackSigner")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl CallbackSigner {
    /// The first secret signs; all verify. Refuses an empty list or an empty secret,
    /// because either would make every token forgeable or unverifiable.
    pub fn new(secrets: Vec<Secret>) -> Result<Self, TokenError> {
        if secrets.is_empty() {
            return Err(TokenError::NoSecret);
        }
        if secrets.iter().any(Secret::is_empty) {
            return Err(TokenError::EmptySecret);
        }
        Ok(Self { secrets })
    }

    pub fn token(&self, job_id: &str) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.secrets[0], job_id).finalize().into_bytes())
    }

    /// Constant-time per secret (`Mac::verify_slice`). Which secret matched is not secret.
    pub fn verify(&self, job_id: &str, token: &str) -> bool {
        let Ok(given) = URL_SAFE_NO_PAD.decode(token.as_bytes()) else {
            return false;
        };
        if given.len() != 32 {
            return false;
        }
        self.secrets
            .iter()
            .any(|secret| mac(secret, job_id).verify_slice(&given).is_ok())
    }
}

/// The URL FAL calls back for a job: our public base, `/v1/fal/webhook/{job_id}`, and the
/// job's token. Only jobs submitted with such a URL can be told about by callbacks.
#[derive(Debug, Clone)]
pub struct CallbackUrls {
    base: Url,
    signer: CallbackSigner,
}

impl CallbackUrls {
    pub fn new(base: Url, secrets: Vec<Secret>) -> Result<Self, TokenError> {
        Ok(Self {
            base,
            signer: CallbackSigner::new(secrets)?,
        })
    }

    pub fn url_for(&self, job_id: Uuid) -> Url {
        let mut url = self.base.clone();
        let path = format!(
            "{}/v1/fal/webhook/{job_id}",
            self.base.path().trim_end_matches('/')
        );
        url.set_path(&path);
        url.query_pairs_mut()
            .append_pair("token", &self.signer.token(&job_id.to_string()));
        url
    }

    /// Whether `token` is the one a URL we handed out for `job_id` carries.
    pub fn verify(&self, job_id: Uuid, token: &str) -> bool {
        self.signer.verify(&job_id.to_string(), token)
    }
}

fn mac(secret: &Secret, job_id: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(secret.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(DOMAIN);
    mac.update(job_id.as_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secrets: &[&str]) -> CallbackSigner {
        CallbackSigner::new(secrets.iter().map(|s| Secret::from(*s)).collect()).unwrap()
    }

    #[test]
    fn roundtrip() {
        let s = signer(&["s3cret"]);
        let t = s.token("job-1");
        assert_eq!(t.len(), 43, "32 bytes in unpadded base64url");
        assert!(!t.contains('=') && !t.contains('+') && !t.contains('/'));
        assert!(s.verify("job-1", &t));
        assert_eq!(t, s.token("job-1"), "deterministic");
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256(key="key", "fal-callback:abc"), computed independently with Python's hmac.
        let s = signer(&["key"]);
        let expected = "i8cWzR8wL-izYo42UNhl8uauwnr7kklGPNVKFVGl4S4";
        assert_eq!(s.token("abc"), expected);
    }

    #[test]
    fn rotation() {
        let old = signer(&["old"]);
        let rotated = signer(&["new", "old"]);
        let old_token = old.token("job");
        assert!(rotated.verify("job", &old_token), "old URLs still accepted");
        let new_token = rotated.token("job");
        assert_ne!(new_token, old_token, "new secret signs");
        assert!(!old.verify("job", &new_token));
        assert!(signer(&["new"]).verify("job", &new_token));
    }

    #[test]
    fn refusals() {
        let s = signer(&["s3cret"]);
        let t = s.token("job-1");
        assert!(!s.verify("job-2", &t), "wrong job id");
        assert!(!s.verify("job-1", ""), "empty");
        assert!(!s.verify("job-1", "not base64!"), "garbage");
        assert!(!signer(&["other"]).verify("job-1", &t), "wrong secret");
        let mut tampered = t.clone().into_bytes();
        tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
        assert!(!s.verify("job-1", std::str::from_utf8(&tampered).unwrap()));
        assert!(!s.verify("job-1", &t[..t.len() - 1]), "truncated");
        assert!(!s.verify("job-1", &format!("{t}=")), "padded");
    }

    #[test]
    fn construction_and_debug() {
        assert_eq!(
            CallbackSigner::new(vec![]).unwrap_err(),
            TokenError::NoSecret
        );
        assert_eq!(
            CallbackSigner::new(vec![Secret::from("")]).unwrap_err(),
            TokenError::EmptySecret
        );
        let dbg = format!("{:?}", signer(&["topsecretvalue"]));
        assert!(!dbg.contains("topsecretvalue"), "{dbg}");
    }
}
