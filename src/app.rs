//! Builds the running service: the store, the FAL client, the HTTP server and the workers, with
//! one shutdown that stops them in order (stop accepting, let in-flight work finish, close).

use crate::blobs::Blobs;
use crate::config::{Config, Secret};
use crate::emulator::{EmulatorConfig, EmulatorHandle};
use crate::fal::client::{FalClient, FalConfig};
use crate::fal::signature::JwksCache;
use crate::fal::token::CallbackUrls;
use crate::state::{AppState, Parts};
use crate::store::{Store, StoreError, StoreOptions};
use crate::worker::WorkerContext;
use reqwest::Url;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("could not build the FAL client: {0}")]
    Fal(String),
}

/// A running falgate.
pub struct App {
    addr: SocketAddr,
    state: AppState,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    workers: Vec<JoinHandle<()>>,
    emulator: Option<EmulatorHandle>,
}

impl App {
    /// Opens the database (migrating it unless told not to), starts the workers, and serves on
    /// `listener`. In sandbox mode a FAL emulator is started first and every FAL URL points at it.
    pub async fn build(mut config: Config, listener: TcpListener) -> Result<Self, StartError> {
        let addr = listener.local_addr()?;
        let emulator = if config.sandbox {
            Some(start_sandbox(&mut config, addr).await?)
        } else {
            None
        };
        let store = Store::connect(
            config.database.url.expose(),
            &StoreOptions {
                max_connections: config.database.max_connections,
                ..StoreOptions::default()
            },
        )
        .await?;
        if config.migrate_on_start {
            store.migrate().await?;
        }
        let mut app = Self::serve(config, store, listener)?;
        app.emulator = emulator;
        Ok(app)
    }

    /// Starts serving and working with an already opened store.
    pub fn serve(config: Config, store: Store, listener: TcpListener) -> Result<Self, StartError> {
        let addr = listener.local_addr()?;
        let fal_key = config
            .fal_key
            .clone()
            .ok_or_else(|| StartError::Fal("no FAL key configured".into()))?;
        let mut fal_config = FalConfig::new(
            config.fal_urls.queue.clone(),
            config.fal_urls.rest.clone(),
            fal_key,
        );
        // A call to FAL must end well within the lease that guards it, or another worker could
        // take the job over and submit it again while the first call is still out.
        fal_config.request_timeout = fal_config
            .request_timeout
            .min(config.workers.lease.mul_f64(0.75));
        let fal = FalClient::new(fal_config).map_err(|e| StartError::Fal(e.to_string()))?;
        let jwks = JwksCache::with_settings(
            fal.http().clone(),
            config.fal_urls.jwks.clone(),
            JwksCache::DEFAULT_TTL,
            config.fal_urls.jwks_min_refetch,
        );
        let callbacks = match (&config.public_url, config.webhook_secrets.is_empty()) {
            (Some(base), false) => Some(
                CallbackUrls::new(base.clone(), config.webhook_secrets.clone())
                    .map_err(|e| StartError::Fal(e.to_string()))?,
            ),
            _ => None,
        };
        if callbacks.is_none() {
            tracing::warn!(
                "FALGATE_PUBLIC_URL is not set: jobs are followed by polling FAL only, \
                 without callbacks"
            );
        }
        let blobs = Blobs::open(&config.avatars.storage_dir)
            .map_err(|e| StartError::Io(std::io::Error::other(e.to_string())))?;
        let (shutdown, stopping) = watch::channel(false);
        let webhooks = crate::webhooks::WebhookSender::new(config.webhooks.clone())
            .map_err(|e| StartError::Io(std::io::Error::other(e)))?;
        let state = AppState::new(Parts {
            config,
            store,
            fal,
            jwks,
            callbacks,
            blobs,
            stopping: stopping.clone(),
            webhooks,
        });
        let workers = if state.config.run_workers {
            crate::worker::spawn(
                WorkerContext::new(&state, crate::http::events::webhook_body),
                stopping.clone(),
            )
        } else {
            Vec::new()
        };
        let router = crate::http::router(state.clone());
        // Each upload under way keeps a temporary file open per photo, and one more to decode.
        let avatars = &state.config.avatars;
        let upload_files = avatars.upload_concurrency * (avatars.max_photos as usize + 1);
        let limits = crate::http::server::Limits::fitted(
            &state.config.connections,
            state.config.database.max_connections,
            upload_files,
        );
        let server = tokio::spawn(crate::http::server::serve(
            listener, router, limits, stopping,
        ));
        Ok(Self {
            addr,
            state,
            shutdown,
            server,
            workers,
            emulator: None,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The in-process FAL emulator of sandbox mode.
    pub fn sandbox_emulator(&self) -> Option<&EmulatorHandle> {
        self.emulator.as_ref()
    }

    /// Stops accepting connections and claiming jobs, gives in-flight requests and submits up to
    /// the configured bound to finish, then closes the database.
    pub async fn shutdown(self) {
        let bound = self.state.config.shutdown_timeout;
        let _ = self.shutdown.send(true);
        let mut server = self.server;
        let workers = futures_util::future::join_all(self.workers);
        let both = async {
            let served = (&mut server).await;
            workers.await;
            served
        };
        match tokio::time::timeout(bound, both).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::error!(error = %err, "server stopped with an error"),
            Ok(Err(err)) => tracing::error!(error = %err, "server task failed"),
            Err(_) => {
                tracing::warn!(
                    seconds = bound.as_secs(),
                    "in-flight work did not finish in time; leases will hand it to the next start"
                );
                server.abort();
            }
        }
        if let Some(emulator) = self.emulator {
            emulator.shutdown().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.state.store.close()).await;
    }

    /// Serves until SIGINT or SIGTERM, then shuts down.
    pub async fn run_until_signalled(self) {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; finishing in-flight work");
        self.shutdown().await;
        tracing::info!("stopped");
    }
}

/// Starts the emulator on loopback and points every FAL setting of `config` at it. Callbacks
/// come back to this process at its own address, signed with a secret made for this run.
async fn start_sandbox(
    config: &mut Config,
    app_addr: SocketAddr,
) -> Result<EmulatorHandle, StartError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let emulator = crate::emulator::spawn(EmulatorConfig::default(), listener).await;
    let base = emulator.base_url();
    config.fal_key = Some(EmulatorConfig::default().key);
    config.fal_urls.queue = base.clone();
    config.fal_urls.rest = base;
    config.fal_urls.jwks = emulator.jwks_url();
    let host = if app_addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        app_addr.ip()
    };
    let own = SocketAddr::new(host, app_addr.port());
    config.public_url =
        Some(Url::parse(&format!("http://{own}")).map_err(|e| StartError::Fal(e.to_string()))?);
    config.webhook_secrets = vec![Secret::new(random_secret())];
    Ok(emulator)
}

fn random_secret() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
