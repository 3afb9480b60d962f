//! falgate's integration tests: the real app on port 0, spoken to over HTTP.

mod support;

mod auth;
mod avatars;
mod chaos;
mod cli;
mod crash;
mod errors;
mod events;
mod hostile;
mod idempotency;
mod jobs;
mod openapi;
mod ops;
mod outcomes;
mod photos;
mod pipeline;
mod streams;
mod trainers;
mod webhooks;
