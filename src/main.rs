//! The command line: everything else lives in the library.

use clap::{Parser, Subcommand};
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
    /// Log format.
    #[arg(
        long,
        env = "FALGATE_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    log_format: LogFormat,

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
    init_tracing(cli.log_format);
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
            if sandbox {
                let (_, key) = app
                    .store()
                    .issue_api_key("sandbox development key")
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
                println!("  Development API key (made for this run):");
                println!();
                println!("    export FALGATE_KEY={}", key.secret);
                println!();
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
            println!(
                "{:<36}  {:<12}  {:<25}  {:<25}  NAME",
                "ID", "PREFIX", "CREATED", "REVOKED"
            );
            for key in keys {
                println!(
                    "{:<36}  {:<12}  {:<25}  {:<25}  {}",
                    key.id,
                    key.prefix,
                    key.created_at.to_rfc3339(),
                    key.revoked_at
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "-".into()),
                    key.name
                );
            }
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
        Command::Emulator { addr, time_scale } => {
            let listener = tokio::net::TcpListener::bind(addr.trim())
                .await
                .map_err(|e| format!("could not listen on {addr}: {e}"))?;
            let config = falgate::emulator::EmulatorConfig {
                time_scale,
                ..Default::default()
            };
            let key = config.key.expose().to_owned();
            let emulator = falgate::emulator::spawn(config, listener).await;
            let base = emulator.base_url();
            println!("FAL emulator on {base}");
            println!("  FAL_KEY={key}");
            println!("  FAL_QUEUE_URL={base}");
            println!("  FAL_REST_URL={base}");
            println!("  FAL_JWKS_URL={}", emulator.jwks_url());
            println!("  controls: {base}_emulator/…");
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
