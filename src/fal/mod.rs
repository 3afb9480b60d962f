//! Everything that speaks FAL: wire types, the HTTP client, callback URL tokens and
//! Ed25519 webhook verification. Uses nothing else of ours so that the emulator and the
//! app can both depend on it.

pub mod client;
pub mod error;
pub mod outcome;
pub mod progress;
pub mod queue;
pub mod retry;
pub mod secret;
pub mod signature;
pub mod storage;
pub mod token;
pub mod urls;
pub mod wire;

pub use client::{FalClient, FalConfig};
pub use error::{FalError, FalErrorClass, FalErrorInfo, FalErrorKind};
pub use queue::{CancelOutcome, ModelResult, ReportedEnd};
pub use secret::Secret;
pub use signature::{JwksCache, SignatureError, Verdict, WebhookHeaders};
pub use storage::FileProbe;
pub use token::CallbackSigner;
pub use urls::RequestUrls;
