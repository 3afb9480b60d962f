//! The command line: everything else lives in the library.

use clap::{Parser, Subcommand, ValueEnum};
use falgate::app::App;
use falgate::config::{DatabaseArgs, LogFormat, ServeArgs};
use falgate::store::{Store, StoreOptions};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "falgate",
    version,
    about = "A durable REST gateway in front of FAL"
)]
struct Cli {
    /// Log format: `text` or `json`.
    #[arg(
        long,
        env = "FALGATE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Manage API keys.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Print the OpenAPI document.
    Openapi,
    /// Run the FAL emulator alone (for local development against `FAL_QUEUE_URL` etc.).
    Emulator {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        addr: String,
        /// Multiplies the waits between callback retries (FAL's: 10 retries over 2 hours);
        /// 0.01 makes that 72 seconds.
        #[arg(long, default_value = "1", value_parser = falgate::emulator::parse_time_scale)]
        time_scale: f64,
        /// Base of every URL the emulator hands out (queue, upload and file URLs), for
        /// clients that reach it at another address: a proxy, a container's name. Default:
        /// `http://` and the listening address.
        #[arg(long, env = "FALGATE_EMULATOR_PUBLIC_URL")]
        public_url: Option<reqwest::Url>,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create a key and print its secret (shown this once only).
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List keys: name, prefix, created, revoked.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revoke a key by id or prefix; it stops working at once.
    Revoke {
        /// The key's id or its prefix (as shown by `list`).
        key: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    falgate::install_crypto_provider();
    let log_format = match LogFormat::from_str(cli.log_format.trim(), true) {
        Ok(format) => format,
        Err(_) => {
            eprintln!(
                "error: FALGATE_LOG_FORMAT (--log-format): `{}` is not `text` or `json`",
                cli.log_format
            );
            return ExitCode::FAILURE;
        }
    };
    init_tracing(log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Serve(args) => {
            let config = args.validate().map_err(|e| e.to_string())?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| format!("could not listen on {}: {e}", config.listen))?;
            let sandbox = config.sandbox;
            let app = App::build(config, listener)
                .await
                .map_err(|e| e.to_string())?;
            let base = format!("http://{}", app.local_addr());
            if !sandbox {
                let revoked = revoke_sandbox_keys(app.store())
                    .await
                    .map_err(|e| e.to_string())?;
                if revoked > 0 {
                    tracing::warn!(
                        revoked,
                        "this database served the sandbox: its development key is revoked"
                    );
                }
            }
            if sandbox {
                let (key, revoked) = renew_sandbox_key(app.store())
                    .await
                    .map_err(|e| e.to_string())?;
                let fal = app
                    .sandbox_emulator()
                    .map(|e| e.base_url().to_string())
                    .unwrap_or_default();
                tracing::warn!(emulator = %fal, "SANDBOX MODE: FAL is a built-in emulator; nothing reaches FAL and every job says sandbox: true");
                println!();
                println!("  falgate sandbox on {base}  (Swagger UI: {base}/docs)");
                println!("  FAL is emulated at {fal}: no job reaches the real FAL.");
                println!(
                    "  Development API key (`{SANDBOX_KEY_NAME}`, made at this start; valid until the next one):"
                );
                println!();
                println!("    export FALGATE_KEY={}", key.secret);
                println!();
                if revoked > 0 {
                    println!(
                        "  Earlier sandbox keys of this database revoked: {revoked}. Export this one."
                    );
                    println!();
                }
            }
            tracing::info!(address = %app.local_addr(), docs = %format!("{base}/docs"), "falgate is serving");
            app.run_until_signalled().await;
            Ok(())
        }
        Command::Migrate(database) => {
            let store = open_store(&database).await?;
            store.migrate().await.map_err(|e| e.to_string())?;
            println!("migrations applied ({})", store.backend_name());
            Ok(())
        }
        Command::ApiKey(ApiKeyCommand::Create { name, database }) => {
            let name = name.trim();
            if name.is_empty() || name.len() > 100 {
                return Err("--name must be 1 to 100 characters".into());
            }
            if name == SANDBOX_KEY_NAME || name == OLD_SANDBOX_KEY_NAME {
                return Err(format!(
                    "--name `{name}` is the sandbox's own: its keys are revoked whenever the \
                     sandbox starts; choose another name"
                ));
            }
            let store = migrated_store(&database).await?;
            let (record, key) = store.issue_api_key(name).await.map_err(|e| e.to_string())?;
            println!("id:     {}", record.id);
            println!("name:   {}", record.name);
            println!("prefix: {}", record.prefix);
            println!("key:    {}", key.secret);
            eprintln!("Keep the key now: it is not stored and cannot be shown again.");
            Ok(())
        }
        Command::ApiKey(ApiKeyCommand::List { database }) => {
            let store = migrated_store(&database).await?;
            let keys = store.list_api_keys().await.map_err(|e| e.to_string())?;
            let time = |t: chrono::DateTime<chrono::Utc>| {
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            };
            let mut rows = vec![[
                "ID".to_owned(),
                "PREFIX".to_owned(),
                "CREATED".to_owned(),
                "REVOKED".to_owned(),
                "NAME".to_owned(),
            ]];
            rows.extend(keys.into_iter().map(|key| {
                [
                    key.id.to_string(),
                    key.prefix,
                    time(key.created_at),
                    key.revoked_at.map(time).unwrap_or_else(|| "-".into()),
                    key.name,
                ]
            }));
            print!("{}", align_columns(&rows));
            Ok(())
        }
        Command::ApiKey(ApiKeyCommand::Revoke { key, database }) => {
            let store = migrated_store(&database).await?;
            let revoked = store
                .revoke_api_key(key.trim(), falgate::domain::now())
                .await
                .map_err(|e| e.to_string())?;
            if revoked {
                println!("revoked {key}");
                Ok(())
            } else {
                Err(format!(
                    "no live key matches `{key}` (give its id or its full prefix)"
                ))
            }
        }
        Command::Emulator {
            addr,
            time_scale,
            public_url,
        } => {
            let listener = tokio::net::TcpListener::bind(addr.trim())
                .await
                .map_err(|e| format!("could not listen on {addr}: {e}"))?;
            let config = falgate::emulator::EmulatorConfig {
                time_scale,
                public_base: public_url,
                ..Default::default()
            };
            let key = config.key.expose().to_owned();
            let emulator = falgate::emulator::spawn(config, listener).await;
            let base = emulator.base_url();
            println!("FAL emulator on {}, reached as {base}", emulator.addr());
            println!("  FAL_KEY={key}");
            println!("  FAL_QUEUE_URL={base}");
            println!("  FAL_REST_URL={base}");
            println!("  FAL_JWKS_URL={}", emulator.jwks_url());
            println!(
                "  controls: {}/_emulator/…",
                base.as_str().trim_end_matches('/')
            );
            let _ = tokio::signal::ctrl_c().await;
            emulator.shutdown().await;
            Ok(())
        }
        Command::Openapi => {
            let spec = falgate::http::openapi()
                .to_pretty_json()
                .map_err(|e| e.to_string())?;
            println!("{spec}");
            Ok(())
        }
    }
}

/// The name of the key the sandbox issues; each start revokes the ones before it, so that a
/// database holds one live sandbox key however often the sandbox is started.
const SANDBOX_KEY_NAME: &str = "sandbox";

/// Earlier versions named the sandbox's key so; those are revoked as well.
const OLD_SANDBOX_KEY_NAME: &str = "sandbox development key";

async fn renew_sandbox_key(
    store: &Store,
) -> Result<(falgate::domain::api_key::NewApiKey, usize), falgate::store::StoreError> {
    let revoked = revoke_sandbox_keys(store).await?;
    let (_, key) = store.issue_api_key(SANDBOX_KEY_NAME).await?;
    Ok((key, revoked))
}

/// Revokes the sandbox's live keys: before a new one is issued, and when the database is served
/// against the real FAL, where a development key printed to a terminal has no business.
async fn revoke_sandbox_keys(store: &Store) -> Result<usize, falgate::store::StoreError> {
    let now = falgate::domain::now();
    let mut revoked = 0;
    for key in store.list_api_keys().await? {
        if key.revoked_at.is_none()
            && (key.name == SANDBOX_KEY_NAME || key.name == OLD_SANDBOX_KEY_NAME)
            && store.revoke_api_key(&key.id.to_string(), now).await?
        {
            revoked += 1;
        }
    }
    Ok(revoked)
}

/// Rows as text columns, each as wide as its widest cell (counted in characters, since
/// names may hold any), two spaces apart; the last column is not padded.
fn align_columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < N {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(
                    ' ',
                    widths[i] - cell.chars().count() + 2,
                ));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

async fn open_store(database: &DatabaseArgs) -> Result<Store, String> {
    let config = database.validate().map_err(|e| e.to_string())?;
    Store::connect(
        config.url.expose(),
        &StoreOptions {
            max_connections: config.max_connections,
            ..StoreOptions::default()
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// Key management runs against a migrated database, so that a first `api-key create` on a
/// fresh SQLite file just works.
async fn migrated_store(database: &DatabaseArgs) -> Result<Store, String> {
    let store = open_store(database).await?;
    store.migrate().await.map_err(|e| e.to_string())?;
    Ok(store)
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    // Colour codes only help a person at a terminal; in a file or a pipe they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
