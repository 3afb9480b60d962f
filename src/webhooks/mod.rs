//! Everything that speaks to the clients' webhook receivers: the guard on where webhooks may
//! go, and the sender that signs and posts them per Standard Webhooks.

pub mod guard;
pub mod sender;

pub use sender::{Sent, WebhookSender};
