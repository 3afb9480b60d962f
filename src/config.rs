//! One typed configuration, from flags and environment variables, validated at start.
//!
//! Every value is read as text by clap and parsed here, so that a bad value stops the process
//! with a message naming the variable it came from. Secrets are wrapped in [`Secret`], whose
//! `Debug` never shows them.

use crate::domain::endpoint::{EndpointId, default_allowed};
use clap::{Args, ValueEnum};
use reqwest::Url;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub use crate::fal::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The database flags every command that touches the database shares.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Database URL: `sqlite:PATH` (created on first run) or `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite:falgate.db",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Most connections the pool opens.
    #[arg(long, env = "FALGATE_DB_MAX_CONNECTIONS", default_value = "10")]
    pub db_max_connections: String,
}

/// Flags and variables of `falgate serve`.
///
/// Switches are read as text too (`--sandbox` alone means true), so that a variable such as
/// `FALGATE_SANDBOX=1` is judged here, under its own name, rather than by clap under the flag's.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Address to listen on.
    #[arg(long, env = "FALGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// FAL API key (`key_id:key_secret`).
    #[arg(long, env = "FAL_KEY", hide_env_values = true)]
    pub fal_key: Option<String>,

    /// Public base URL at which FAL can reach this service (for callbacks).
    #[arg(long, env = "FALGATE_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Secrets for signing callback URLs, comma-separated; the first signs, any verifies.
    #[arg(long, env = "FALGATE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Largest JSON request body, in bytes.
    #[arg(long, env = "FALGATE_BODY_LIMIT", default_value = "1048576")]
    pub body_limit: String,

    /// Largest FAL callback body, in bytes (results can carry images inline).
    #[arg(long, env = "FALGATE_CALLBACK_BODY_LIMIT", default_value = "33554432")]
    pub callback_body_limit: String,

    /// Seconds a client has to send a request's headers, counted from connecting or from the
    /// first byte of a next request on a kept-alive connection.
    #[arg(long, env = "FALGATE_HEADER_TIMEOUT_SECS", default_value = "10")]
    pub header_timeout_secs: String,

    /// Seconds a kept-alive connection may wait for its next request before it is closed, and
    /// a request body may send nothing before it is answered 400 (keep it above the idle
    /// timeout of a load balancer in front).
    #[arg(long, env = "FALGATE_IDLE_TIMEOUT_SECS", default_value = "75")]
    pub idle_timeout_secs: String,

    /// Most client connections open at once; lowered at start to fit the open-files limit.
    #[arg(long, env = "FALGATE_MAX_CONNECTIONS", default_value = "1024")]
    pub max_connections: String,

    /// Seconds between the keep-alive comments of an event stream with nothing to say (under
    /// the idle timeout of every proxy in between).
    #[arg(long, env = "FALGATE_STREAM_KEEPALIVE_SECS", default_value = "15")]
    pub stream_keepalive_secs: String,

    /// Milliseconds between two reads of FAL's status (queue position and logs) for a job
    /// that an event stream follows.
    #[arg(long, env = "FALGATE_STREAM_PROGRESS_MS", default_value = "1000")]
    pub stream_progress_ms: String,

    /// FAL endpoints that raw jobs may call, comma-separated.
    #[arg(long, env = "FALGATE_ALLOWED_ENDPOINTS")]
    pub allowed_endpoints: Option<String>,

    /// Seconds in-flight requests get to finish after a shutdown signal.
    #[arg(long, env = "FALGATE_SHUTDOWN_TIMEOUT_SECS", default_value = "20")]
    pub shutdown_timeout_secs: String,

    /// Do not run migrations at start (for several replicas: run `falgate migrate` once).
    #[arg(long, env = "FALGATE_NO_MIGRATE", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub no_migrate: Option<String>,

    /// Serve the API only; the workers that talk to FAL run in other replicas.
    #[arg(long, env = "FALGATE_NO_WORKERS", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub no_workers: Option<String>,

    /// Let webhook endpoints be plain http:// URLs (always allowed in sandbox).
    #[arg(long, env = "FALGATE_WEBHOOK_ALLOW_HTTP", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub webhook_allow_http: Option<String>,

    /// Networks (CIDR, comma-separated) that webhooks may reach although they are not public,
    /// such as a private network of your own. Sandbox adds loopback.
    #[arg(long, env = "FALGATE_WEBHOOK_ALLOWED_NETWORKS")]
    pub webhook_allowed_networks: Option<String>,

    /// Fixed addresses for webhook host names (`name=ip,name=ip`), looked up before DNS.
    #[arg(long, env = "FALGATE_WEBHOOK_HOSTS")]
    pub webhook_hosts: Option<String>,

    /// Seconds to wait before each webhook attempt after a failure, comma-separated; after the
    /// last, the delivery fails. Standard Webhooks' schedule by default.
    #[arg(
        long,
        env = "FALGATE_WEBHOOK_RETRY_SCHEDULE",
        default_value = "5,300,1800,7200,18000,36000,36000"
    )]
    pub webhook_retry_schedule: String,

    /// Seconds a webhook receiver has to answer.
    #[arg(long, env = "FALGATE_WEBHOOK_TIMEOUT_SECS", default_value = "15")]
    pub webhook_timeout_secs: String,

    /// Run against a built-in FAL emulator: no key needed, nothing reaches FAL.
    #[arg(long, env = "FALGATE_SANDBOX", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub sandbox: Option<String>,

    /// FAL's queue base URL.
    #[arg(long, env = "FAL_QUEUE_URL", default_value = "https://queue.fal.run")]
    pub fal_queue_url: String,

    /// FAL's REST base URL (storage uploads).
    #[arg(long, env = "FAL_REST_URL", default_value = "https://rest.fal.ai")]
    pub fal_rest_url: String,

    /// Where FAL publishes the keys that sign its callbacks.
    #[arg(
        long,
        env = "FAL_JWKS_URL",
        default_value = "https://rest.fal.ai/.well-known/jwks.json"
    )]
    pub fal_jwks_url: String,

    /// Least seconds between two fetches of FAL's key set prompted by an unknown signature
    /// (forged callbacks must not make us hammer FAL).
    #[arg(long, env = "FALGATE_JWKS_MIN_REFETCH_SECS", default_value = "30")]
    pub jwks_min_refetch_secs: String,

    /// Directory where falgate keeps its own files (training photos, copies of trained LoRA
    /// files).
    #[arg(long, env = "FALGATE_STORAGE_DIR", default_value = "falgate-data")]
    pub storage_dir: String,

    /// Fewest photos a training needs.
    #[arg(long, env = "FALGATE_MIN_PHOTOS", default_value = "10")]
    pub min_photos: String,

    /// Most photos an avatar may hold.
    #[arg(long, env = "FALGATE_MAX_PHOTOS", default_value = "20")]
    pub max_photos: String,

    /// Largest photo, in bytes.
    #[arg(long, env = "FALGATE_MAX_PHOTO_BYTES", default_value = "20971520")]
    pub max_photo_bytes: String,

    /// Largest photo upload request body, in bytes (all its files and the form around them).
    /// Default: the most photos an avatar may hold, each of the largest size, plus 64 KiB each.
    #[arg(long, env = "FALGATE_MAX_UPLOAD_BYTES")]
    pub max_upload_bytes: Option<String>,

    /// Photo uploads processed at once; one more is answered 503 with Retry-After.
    #[arg(long, env = "FALGATE_UPLOAD_CONCURRENCY", default_value = "4")]
    pub upload_concurrency: String,

    /// Most prompts in one generation batch.
    #[arg(long, env = "FALGATE_MAX_BATCH", default_value = "10")]
    pub max_batch: String,

    /// Let a training name a trainer FAL has deprecated (refused otherwise, naming its
    /// replacement).
    #[arg(long, env = "FALGATE_ALLOW_DEPRECATED_TRAINERS", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub allow_deprecated_trainers: Option<String>,

    /// Submits to FAL in flight at once.
    #[arg(long, env = "FALGATE_DISPATCH_CONCURRENCY", default_value = "8")]
    pub dispatch_concurrency: String,

    /// Seconds a job keeps retrying its submit (429, 5xx, timeouts) before it fails.
    #[arg(long, env = "FALGATE_SUBMIT_DEADLINE_SECS", default_value = "900")]
    pub submit_deadline_secs: String,

    /// Seconds a worker holds a job it claimed before another may take it over.
    #[arg(long, env = "FALGATE_LEASE_SECS", default_value = "60")]
    pub lease_secs: String,

    /// Seconds after submitting before the reconciler first asks FAL, when a callback is
    /// expected (without FALGATE_PUBLIC_URL it asks at once and backs off).
    #[arg(long, env = "FALGATE_CALLBACK_GRACE_SECS", default_value = "30")]
    pub callback_grace_secs: String,

    /// Seconds a generation or raw job whose submit may have reached FAL (its answer was lost,
    /// or the process died during the call) waits for FAL's callback before it is sent again.
    #[arg(
        long,
        env = "FALGATE_UNCONFIRMED_SUBMIT_WAIT_SECS",
        default_value = "600"
    )]
    pub unconfirmed_submit_wait_secs: String,

    /// The same wait for a training, whose callback comes only when it has finished.
    #[arg(
        long,
        env = "FALGATE_UNCONFIRMED_TRAINING_WAIT_SECS",
        default_value = "3600"
    )]
    pub unconfirmed_training_wait_secs: String,

    /// Days an event is kept (with its webhook deliveries and their attempts) before it is
    /// removed; one still being delivered is kept until its delivery ends.
    #[arg(long, env = "FALGATE_EVENT_RETENTION_DAYS", default_value = "30")]
    pub event_retention_days: String,

    /// Longest wait between two looks at one job.
    #[arg(long, env = "FALGATE_POLL_MAX_SECS", default_value = "30")]
    pub poll_max_secs: String,

    /// Seconds a generation may take, from creation, before it fails.
    #[arg(long, env = "FALGATE_GENERATION_DEADLINE_SECS", default_value = "1800")]
    pub generation_deadline_secs: String,

    /// Seconds a training may take, from creation, before it fails.
    #[arg(long, env = "FALGATE_TRAINING_DEADLINE_SECS", default_value = "10800")]
    pub training_deadline_secs: String,

    /// Seconds between two checks that FAL still serves a ready avatar's LoRA file; one it
    /// no longer serves is uploaded again from falgate's copy.
    #[arg(long, env = "FALGATE_LORA_CHECK_SECS", default_value = "3600")]
    pub lora_check_secs: String,
}

/// The database part of the configuration, validated.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub max_connections: u32,
}

/// Where FAL is.
#[derive(Debug, Clone)]
pub struct FalUrls {
    pub queue: Url,
    pub rest: Url,
    pub jwks: Url,
    /// Least time between two key-set fetches prompted by an unknown signature.
    pub jwks_min_refetch: Duration,
}

/// The knobs of the dispatcher and the reconciler.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub dispatch_concurrency: usize,
    pub submit_deadline: Duration,
    pub lease: Duration,
    pub callback_grace: Duration,
    pub poll_max: Duration,
    pub generation_deadline: Duration,
    pub training_deadline: Duration,
    pub lora_check_interval: Duration,
    /// How long a job whose submit may have reached FAL waits for evidence before it is sent
    /// again: generations and raw jobs, then trainings.
    pub unconfirmed_submit_wait: Duration,
    pub unconfirmed_training_wait: Duration,
    /// How long events are kept.
    pub event_retention: Duration,
}

/// The avatar features' limits.
#[derive(Debug, Clone)]
pub struct AvatarLimits {
    pub storage_dir: std::path::PathBuf,
    pub min_photos: u32,
    pub max_photos: u32,
    pub max_photo_bytes: usize,
    /// Largest photo upload request body.
    pub max_upload_bytes: u64,
    /// Photo uploads processed at once.
    pub upload_concurrency: usize,
    pub max_batch: u32,
    /// Whether a training may name a trainer FAL has deprecated.
    pub allow_deprecated_trainers: bool,
}

/// Where and how webhooks are delivered.
#[derive(Debug, Clone)]
pub struct WebhookDelivery {
    /// Plain http:// endpoints are accepted.
    pub allow_http: bool,
    /// Networks webhooks may reach although they are not public.
    pub allowed_networks: Vec<crate::domain::address::Network>,
    /// Host names with fixed addresses, looked up before DNS.
    pub hosts: Vec<(String, std::net::IpAddr)>,
    /// The wait before each attempt after the first; a delivery has one attempt more than
    /// this has entries.
    pub retry_schedule: Vec<Duration>,
    pub timeout: Duration,
}

/// How client connections are bounded.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Time between an event stream's keep-alive comments.
    pub stream_keep_alive: Duration,
    /// Time between two reads of FAL's status for a job an event stream follows.
    pub stream_progress: Duration,
}

/// The validated configuration of a running service.
#[derive(Debug, Clone)]
pub struct Config {
    pub avatars: AvatarLimits,
    /// FAL is the built-in emulator.
    pub sandbox: bool,
    pub fal_urls: FalUrls,
    pub workers: WorkerConfig,
    pub listen: SocketAddr,
    pub database: DatabaseConfig,
    pub fal_key: Option<Secret>,
    pub public_url: Option<Url>,
    pub webhook_secrets: Vec<Secret>,
    pub body_limit: usize,
    pub callback_body_limit: usize,
    pub connections: ConnectionLimits,
    pub allowed_endpoints: Vec<EndpointId>,
    pub shutdown_timeout: Duration,
    pub migrate_on_start: bool,
    /// Whether this process runs the dispatcher and the reconciler.
    pub run_workers: bool,
    pub webhooks: WebhookDelivery,
}

/// A configuration value that does not parse; the message names where it came from.
#[derive(Debug, thiserror::Error)]
#[error("{variable} (--{flag}): {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub flag: &'static str,
    pub problem: String,
}

fn invalid(variable: &'static str, flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        flag,
        problem: problem.into(),
    }
}

impl DatabaseArgs {
    pub fn validate(&self) -> Result<DatabaseConfig, ConfigError> {
        let url = self.database_url.trim();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "DATABASE_URL",
                "database-url",
                "must start with sqlite: or postgres://",
            ));
        }
        let max_connections = parse_number::<u32>(
            &self.db_max_connections,
            "FALGATE_DB_MAX_CONNECTIONS",
            "db-max-connections",
            1..=1000,
        )?;
        Ok(DatabaseConfig {
            url: Secret::new(url),
            max_connections,
        })
    }
}

impl ServeArgs {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let database = self.database.validate()?;
        let sandbox = parse_switch(&self.sandbox, "FALGATE_SANDBOX", "sandbox")?;
        let no_migrate = parse_switch(&self.no_migrate, "FALGATE_NO_MIGRATE", "no-migrate")?;
        let no_workers = parse_switch(&self.no_workers, "FALGATE_NO_WORKERS", "no-workers")?;
        let listen = self.listen.trim().parse().map_err(|_| {
            invalid(
                "FALGATE_LISTEN",
                "listen",
                format!("`{}` is not an address like 127.0.0.1:8080", self.listen),
            )
        })?;
        let fal_key = non_empty(&self.fal_key).map(|key| Secret::new(key.trim()));
        if let Some(key) = &fal_key
            && !key.expose().contains(':')
        {
            return Err(invalid(
                "FAL_KEY",
                "fal-key",
                "must look like `key_id:key_secret`",
            ));
        }
        let public_url = non_empty(&self.public_url)
            .map(|raw| {
                let url = Url::parse(raw.trim()).map_err(|e| {
                    invalid(
                        "FALGATE_PUBLIC_URL",
                        "public-url",
                        format!("not a URL: {e}"),
                    )
                })?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(invalid(
                        "FALGATE_PUBLIC_URL",
                        "public-url",
                        "must be an http(s) URL with a host",
                    ));
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(invalid(
                        "FALGATE_PUBLIC_URL",
                        "public-url",
                        "must not carry a query or fragment",
                    ));
                }
                Ok(url)
            })
            .transpose()?;
        let webhook_secrets: Vec<Secret> = non_empty(&self.webhook_secret)
            .map(|raw| {
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Secret::new)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(short) = webhook_secrets.iter().position(|s| s.expose().len() < 32) {
            return Err(invalid(
                "FALGATE_WEBHOOK_SECRET",
                "webhook-secret",
                format!("secret #{} is shorter than 32 characters", short + 1),
            ));
        }
        if public_url.is_some() && webhook_secrets.is_empty() {
            return Err(invalid(
                "FALGATE_WEBHOOK_SECRET",
                "webhook-secret",
                "is required when FALGATE_PUBLIC_URL is set: callback URLs must be signed",
            ));
        }
        let body_limit = parse_number::<usize>(
            &self.body_limit,
            "FALGATE_BODY_LIMIT",
            "body-limit",
            1024..=(64 << 20),
        )?;
        let callback_body_limit = parse_number::<usize>(
            &self.callback_body_limit,
            "FALGATE_CALLBACK_BODY_LIMIT",
            "callback-body-limit",
            1024..=(1 << 30),
        )?;
        let allowed_endpoints = match non_empty(&self.allowed_endpoints) {
            None => default_allowed()
                .into_iter()
                .map(|id| id.parse().expect("the default allow-list is valid"))
                .collect(),
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|id| {
                    id.parse::<EndpointId>().map_err(|e| {
                        invalid(
                            "FALGATE_ALLOWED_ENDPOINTS",
                            "allowed-endpoints",
                            format!("`{id}` {e}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let shutdown_timeout = Duration::from_secs(parse_number::<u64>(
            &self.shutdown_timeout_secs,
            "FALGATE_SHUTDOWN_TIMEOUT_SECS",
            "shutdown-timeout-secs",
            0..=3600,
        )?);
        let url_var = |raw: &str, variable: &'static str, flag: &'static str| {
            Url::parse(raw.trim())
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
                .ok_or_else(|| invalid(variable, flag, format!("`{raw}` is not an http(s) URL")))
        };
        let fal_urls = FalUrls {
            queue: url_var(&self.fal_queue_url, "FAL_QUEUE_URL", "fal-queue-url")?,
            rest: url_var(&self.fal_rest_url, "FAL_REST_URL", "fal-rest-url")?,
            jwks: url_var(&self.fal_jwks_url, "FAL_JWKS_URL", "fal-jwks-url")?,
            jwks_min_refetch: Duration::from_secs(parse_number::<u64>(
                &self.jwks_min_refetch_secs,
                "FALGATE_JWKS_MIN_REFETCH_SECS",
                "jwks-min-refetch-secs",
                0..=86_400,
            )?),
        };
        let secs = |raw: &str, variable: &'static str, flag: &'static str, max: u64| {
            parse_number::<u64>(raw, variable, flag, 1..=max).map(Duration::from_secs)
        };
        let workers = WorkerConfig {
            dispatch_concurrency: parse_number::<usize>(
                &self.dispatch_concurrency,
                "FALGATE_DISPATCH_CONCURRENCY",
                "dispatch-concurrency",
                1..=256,
            )?,
            submit_deadline: secs(
                &self.submit_deadline_secs,
                "FALGATE_SUBMIT_DEADLINE_SECS",
                "submit-deadline-secs",
                7 * 86_400,
            )?,
            lease: secs(&self.lease_secs, "FALGATE_LEASE_SECS", "lease-secs", 3600)?,
            callback_grace: secs(
                &self.callback_grace_secs,
                "FALGATE_CALLBACK_GRACE_SECS",
                "callback-grace-secs",
                86_400,
            )?,
            poll_max: secs(
                &self.poll_max_secs,
                "FALGATE_POLL_MAX_SECS",
                "poll-max-secs",
                3600,
            )?,
            generation_deadline: secs(
                &self.generation_deadline_secs,
                "FALGATE_GENERATION_DEADLINE_SECS",
                "generation-deadline-secs",
                7 * 86_400,
            )?,
            training_deadline: secs(
                &self.training_deadline_secs,
                "FALGATE_TRAINING_DEADLINE_SECS",
                "training-deadline-secs",
                7 * 86_400,
            )?,
            lora_check_interval: secs(
                &self.lora_check_secs,
                "FALGATE_LORA_CHECK_SECS",
                "lora-check-secs",
                30 * 86_400,
            )?,
            unconfirmed_submit_wait: secs(
                &self.unconfirmed_submit_wait_secs,
                "FALGATE_UNCONFIRMED_SUBMIT_WAIT_SECS",
                "unconfirmed-submit-wait-secs",
                7 * 86_400,
            )?,
            unconfirmed_training_wait: secs(
                &self.unconfirmed_training_wait_secs,
                "FALGATE_UNCONFIRMED_TRAINING_WAIT_SECS",
                "unconfirmed-training-wait-secs",
                7 * 86_400,
            )?,
            event_retention: Duration::from_secs(
                86_400
                    * parse_number::<u64>(
                        &self.event_retention_days,
                        "FALGATE_EVENT_RETENTION_DAYS",
                        "event-retention-days",
                        1..=3650,
                    )?,
            ),
        };
        let connections = ConnectionLimits {
            header_timeout: secs(
                &self.header_timeout_secs,
                "FALGATE_HEADER_TIMEOUT_SECS",
                "header-timeout-secs",
                3600,
            )?,
            idle_timeout: secs(
                &self.idle_timeout_secs,
                "FALGATE_IDLE_TIMEOUT_SECS",
                "idle-timeout-secs",
                86_400,
            )?,
            max_connections: parse_number::<usize>(
                &self.max_connections,
                "FALGATE_MAX_CONNECTIONS",
                "max-connections",
                1..=1_000_000,
            )?,
            stream_keep_alive: secs(
                &self.stream_keepalive_secs,
                "FALGATE_STREAM_KEEPALIVE_SECS",
                "stream-keepalive-secs",
                3600,
            )?,
            stream_progress: Duration::from_millis(parse_number::<u64>(
                &self.stream_progress_ms,
                "FALGATE_STREAM_PROGRESS_MS",
                "stream-progress-ms",
                50..=60_000,
            )?),
        };
        let min_photos = parse_number::<u32>(
            &self.min_photos,
            "FALGATE_MIN_PHOTOS",
            "min-photos",
            1..=1000,
        )?;
        let max_photos = parse_number::<u32>(
            &self.max_photos,
            "FALGATE_MAX_PHOTOS",
            "max-photos",
            min_photos..=1000,
        )?;
        let max_photo_bytes = parse_number::<usize>(
            &self.max_photo_bytes,
            "FALGATE_MAX_PHOTO_BYTES",
            "max-photo-bytes",
            1..=(200 << 20),
        )?;
        let max_upload_bytes = match non_empty(&self.max_upload_bytes) {
            // A form's boundaries and part headers are far smaller than 64 KiB a file.
            None => u64::from(max_photos) * (max_photo_bytes as u64 + (64 << 10)),
            Some(raw) => parse_number::<u64>(
                raw,
                "FALGATE_MAX_UPLOAD_BYTES",
                "max-upload-bytes",
                max_photo_bytes as u64..=(64 << 30),
            )?,
        };
        let avatars = AvatarLimits {
            storage_dir: std::path::PathBuf::from(self.storage_dir.trim()),
            min_photos,
            max_photos,
            max_photo_bytes,
            max_upload_bytes,
            upload_concurrency: parse_number::<usize>(
                &self.upload_concurrency,
                "FALGATE_UPLOAD_CONCURRENCY",
                "upload-concurrency",
                1..=1024,
            )?,
            max_batch: parse_number::<u32>(
                &self.max_batch,
                "FALGATE_MAX_BATCH",
                "max-batch",
                1..=100,
            )?,
            allow_deprecated_trainers: parse_switch(
                &self.allow_deprecated_trainers,
                "FALGATE_ALLOW_DEPRECATED_TRAINERS",
                "allow-deprecated-trainers",
            )?,
        };
        if avatars.storage_dir.as_os_str().is_empty() {
            return Err(invalid(
                "FALGATE_STORAGE_DIR",
                "storage-dir",
                "must not be empty",
            ));
        }
        let webhooks = self.webhook_delivery(sandbox)?;
        if !sandbox && fal_key.is_none() {
            return Err(invalid(
                "FAL_KEY",
                "fal-key",
                "is required to reach FAL; set it, or run `cargo run -- serve --sandbox` to use the \
                 built-in emulator",
            ));
        }
        Ok(Config {
            avatars,
            sandbox,
            fal_urls,
            workers,
            listen,
            database,
            fal_key,
            public_url,
            webhook_secrets,
            body_limit,
            callback_body_limit,
            connections,
            allowed_endpoints,
            shutdown_timeout,
            migrate_on_start: !no_migrate,
            run_workers: !no_workers,
            webhooks,
        })
    }
}

impl ServeArgs {
    fn webhook_delivery(&self, sandbox: bool) -> Result<WebhookDelivery, ConfigError> {
        let allow_http = sandbox
            || parse_switch(
                &self.webhook_allow_http,
                "FALGATE_WEBHOOK_ALLOW_HTTP",
                "webhook-allow-http",
            )?;
        let listed = |raw: &Option<String>| -> Vec<String> {
            non_empty(raw)
                .map(|raw| {
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut allowed_networks = listed(&self.webhook_allowed_networks)
            .iter()
            .map(|network| {
                network.parse().map_err(|e| {
                    invalid(
                        "FALGATE_WEBHOOK_ALLOWED_NETWORKS",
                        "webhook-allowed-networks",
                        e,
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if sandbox {
            allowed_networks.extend(["127.0.0.0/8", "::1"].map(|n| {
                n.parse::<crate::domain::address::Network>()
                    .expect("loopback")
            }));
        }
        let hosts = listed(&self.webhook_hosts)
            .iter()
            .map(|pair| {
                let refused = || {
                    invalid(
                        "FALGATE_WEBHOOK_HOSTS",
                        "webhook-hosts",
                        format!("`{pair}` is not `name=ip`"),
                    )
                };
                let (name, ip) = pair.split_once('=').ok_or_else(refused)?;
                let ip = ip.trim().parse().map_err(|_| refused())?;
                Ok((name.trim().to_ascii_lowercase(), ip))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let retry_schedule = self
            .webhook_retry_schedule
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|secs| {
                secs.parse::<f64>()
                    .ok()
                    .filter(|secs| (0.0..=86_400.0).contains(secs))
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        invalid(
                            "FALGATE_WEBHOOK_RETRY_SCHEDULE",
                            "webhook-retry-schedule",
                            format!("`{secs}` is not a number of seconds from 0 to 86400"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = parse_number::<u64>(
            &self.webhook_timeout_secs,
            "FALGATE_WEBHOOK_TIMEOUT_SECS",
            "webhook-timeout-secs",
            1..=300,
        )
        .map(Duration::from_secs)?;
        Ok(WebhookDelivery {
            allow_http,
            allowed_networks,
            hosts,
            retry_schedule,
            timeout,
        })
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.trim().is_empty())
}

/// A switch: absent or empty (`FALGATE_SANDBOX=`, as a blank line of an env file) is false;
/// the usual spellings of yes and no are taken in any case.
fn parse_switch(
    raw: &Option<String>,
    variable: &'static str,
    flag: &'static str,
) -> Result<bool, ConfigError> {
    let Some(raw) = raw else { return Ok(false) };
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "n" | "off" => Ok(false),
        _ => Err(invalid(
            variable,
            flag,
            format!("`{raw}` is not a switch: use true/false, 1/0, yes/no or on/off"),
        )),
    }
}

fn parse_number<T>(
    raw: &str,
    variable: &'static str,
    flag: &'static str,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display,
{
    let value: T = raw
        .trim()
        .parse()
        .map_err(|_| invalid(variable, flag, format!("`{raw}` is not a whole number")))?;
    if !range.contains(&value) {
        return Err(invalid(
            variable,
            flag,
            format!("{value} is outside {}..={}", range.start(), range.end()),
        ));
    }
    Ok(value)
}

impl Config {
    /// A configuration for tests and tools: the database at `database_url`, sandbox mode,
    /// everything else default.
    pub fn for_database(database_url: &str) -> Self {
        ServeArgs {
            database: DatabaseArgs {
                database_url: database_url.to_owned(),
                db_max_connections: "10".into(),
            },
            listen: "127.0.0.1:0".into(),
            fal_key: None,
            public_url: None,
            webhook_secret: None,
            body_limit: "1048576".into(),
            callback_body_limit: "33554432".into(),
            header_timeout_secs: "10".into(),
            idle_timeout_secs: "75".into(),
            max_connections: "1024".into(),
            stream_keepalive_secs: "15".into(),
            stream_progress_ms: "1000".into(),
            allowed_endpoints: None,
            shutdown_timeout_secs: "5".into(),
            no_migrate: None,
            no_workers: None,
            webhook_allow_http: None,
            webhook_allowed_networks: None,
            webhook_hosts: None,
            webhook_retry_schedule: "5,300,1800,7200,18000,36000,36000".into(),
            webhook_timeout_secs: "15".into(),
            sandbox: Some("true".into()),
            fal_queue_url: "https://queue.fal.run".into(),
            fal_rest_url: "https://rest.fal.ai".into(),
            fal_jwks_url: "https://rest.fal.ai/.well-known/jwks.json".into(),
            jwks_min_refetch_secs: "30".into(),
            storage_dir: std::env::temp_dir()
                .join(format!("falgate-files-{}", uuid::Uuid::new_v4().simple()))
                .display()
                .to_string(),
            min_photos: "10".into(),
            max_photos: "20".into(),
            max_photo_bytes: "20971520".into(),
            max_upload_bytes: None,
            upload_concurrency: "4".into(),
            max_batch: "10".into(),
            allow_deprecated_trainers: None,
            dispatch_concurrency: "8".into(),
            submit_deadline_secs: "900".into(),
            lease_secs: "60".into(),
            callback_grace_secs: "30".into(),
            unconfirmed_submit_wait_secs: "600".into(),
            unconfirmed_training_wait_secs: "3600".into(),
            event_retention_days: "30".into(),
            poll_max_secs: "30".into(),
            generation_deadline_secs: "1800".into(),
            training_deadline_secs: "10800".into(),
            lora_check_secs: "3600".into(),
        }
        .validate()
        .expect("the test configuration is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["falgate"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().serve.validate()
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&["--fal-key", "id:secret"]).unwrap();
        assert_eq!(config.allowed_endpoints.len(), default_allowed().len());
        assert!(config.migrate_on_start);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let err = parse(&[]).unwrap_err();
        assert!(err.to_string().starts_with("FAL_KEY"), "{err}");
        assert!(err.to_string().contains("--sandbox"), "{err}");
        assert!(parse(&["--sandbox"]).is_ok());
        let err = parse(&["--sandbox", "--fal-queue-url", "ftp://x"]).unwrap_err();
        assert!(err.to_string().starts_with("FAL_QUEUE_URL"), "{err}");
        let err = parse(&["--sandbox", "--lease-secs", "0"]).unwrap_err();
        assert!(err.to_string().starts_with("FALGATE_LEASE_SECS"), "{err}");
        let err = parse(&["--listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().starts_with("FALGATE_LISTEN"), "{err}");
        let err = parse(&["--body-limit", "lots"]).unwrap_err();
        assert!(err.to_string().starts_with("FALGATE_BODY_LIMIT"), "{err}");
        let err = parse(&["--sandbox", "--header-timeout-secs", "0"]).unwrap_err();
        assert!(
            err.to_string().starts_with("FALGATE_HEADER_TIMEOUT_SECS"),
            "{err}"
        );
        let err = parse(&["--sandbox", "--max-connections", "none"]).unwrap_err();
        assert!(
            err.to_string().starts_with("FALGATE_MAX_CONNECTIONS"),
            "{err}"
        );
        let err = parse(&["--sandbox", "--callback-body-limit", "12"]).unwrap_err();
        assert!(
            err.to_string().starts_with("FALGATE_CALLBACK_BODY_LIMIT"),
            "{err}"
        );
        let err = parse(&["--sandbox", "--upload-concurrency", "0"]).unwrap_err();
        assert!(
            err.to_string().starts_with("FALGATE_UPLOAD_CONCURRENCY"),
            "{err}"
        );
        // An upload must be able to carry at least one photo of the largest size.
        let err = parse(&["--sandbox", "--max-upload-bytes", "1000"]).unwrap_err();
        assert!(
            err.to_string().starts_with("FALGATE_MAX_UPLOAD_BYTES"),
            "{err}"
        );
        let config = parse(&["--sandbox", "--max-upload-bytes", "30000000"]).unwrap();
        assert_eq!(config.avatars.max_upload_bytes, 30_000_000);
        let config = parse(&["--sandbox", "--max-photos", "10"]).unwrap();
        assert_eq!(
            config.avatars.max_upload_bytes,
            10 * (20_971_520 + 65_536),
            "derived from the photo limits"
        );
        let err = parse(&["--database-url", "mysql://x"]).unwrap_err();
        assert!(err.to_string().starts_with("DATABASE_URL"), "{err}");
        let err = parse(&["--allowed-endpoints", "fal-ai/ok,bad"]).unwrap_err();
        assert!(err.to_string().contains("`bad`"), "{err}");
        let err = parse(&["--public-url", "https://example.com"]).unwrap_err();
        assert!(
            err.to_string().starts_with("FALGATE_WEBHOOK_SECRET"),
            "{err}"
        );
    }

    #[test]
    fn switches_take_the_usual_spellings() {
        for yes in ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " y "] {
            let config = parse(&[&format!("--sandbox={yes}")]).unwrap();
            assert!(config.sandbox, "{yes}");
        }
        for no in ["0", "false", "FALSE", "no", "off", "OFF", ""] {
            let config = parse(&["--fal-key", "id:secret", &format!("--sandbox={no}")]).unwrap();
            assert!(!config.sandbox, "{no}");
            let config = parse(&["--sandbox", &format!("--no-migrate={no}")]).unwrap();
            assert!(config.migrate_on_start, "{no}");
        }
        let config = parse(&["--sandbox", "--no-migrate", "--no-workers"]).unwrap();
        assert!(config.sandbox && !config.migrate_on_start && !config.run_workers);
        let err = parse(&["--sandbox=maybe"]).unwrap_err();
        assert!(err.to_string().starts_with("FALGATE_SANDBOX"), "{err}");
        assert!(err.to_string().contains("`maybe`"), "{err}");
        let err = parse(&["--sandbox", "--no-workers=2"]).unwrap_err();
        assert!(err.to_string().starts_with("FALGATE_NO_WORKERS"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let secret = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t";
        let config = parse(&[
            "--fal-key",
            "id:fal-secret-value",
            "--webhook-secret",
            secret,
            "--public-url",
            "https://falgate.example.com",
        ])
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains(secret));
        assert!(!shown.contains("fal-secret-value"));
        assert_eq!(config.webhook_secrets[0].expose(), secret);
    }
}
