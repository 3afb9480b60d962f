//! Everything that speaks FAL: wire types, the HTTP client, callback URL tokens and
//! Ed25519 webhook verification. Uses nothing else of ours so that the emulator and the
//! app can both depend on it.

pub mod client;
pub mod retry;
pub mod secret;
pub mod signature;
pub mod token;
pub mod wire;

pub use client::{
    CancelOutcome, FalClient, FalConfig, FalError, FalErrorInfo, FalErrorKind, ModelResult,
};
pub use secret::Secret;
pub use signature::{JwksCache, SignatureError, Verdict, WebhookHeaders};
pub use token::CallbackSigner;

/// Installs the rustls `ring` provider once per process.
///
/// reqwest is built with `rustls-no-provider`, so building a client panics unless a
/// process-wide provider exists. The binary installs it at start; tests and the emulator
/// call this instead. A second install returns `Err`, which only means someone was first.
pub fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
