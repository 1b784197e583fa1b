//! `salon-email`: the email bridge as its own process, against any homeserver.
//!
//! ```sh
//! salon-email --config email.toml --registration email.yaml \
//!     --homeserver http://127.0.0.1:8008 --server-name example.org
//! ```
//! The registration is generated on first run when the file does not exist; give it to
//! the homeserver (`salon admin appservice register email.yaml`), then start again.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "A Matrix bridge between email threads and rooms")]
struct Args {
    /// The bridge's settings (the keys of `[bridges.email]`); defaults when absent.
    #[arg(long, env = "EMAIL_CONFIG")]
    config: Option<PathBuf>,
    /// The registration file (generated when missing).
    #[arg(long, env = "EMAIL_REGISTRATION")]
    registration: PathBuf,
    /// The homeserver's client-server API.
    #[arg(
        long,
        env = "EMAIL_HOMESERVER",
        default_value = "http://127.0.0.1:8008"
    )]
    homeserver: String,
    /// The homeserver's server name (the domain of user ids).
    #[arg(long, env = "EMAIL_SERVER_NAME", default_value = "localhost")]
    server_name: String,
    /// The bridge's own store.
    #[arg(long, env = "EMAIL_DATA", default_value = "./email-data")]
    data: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config: salon_email::EmailConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Default::default(),
    };
    let existed = args.registration.exists();
    let url = format!("http://{}", config.appservice_listen);
    let registration = salon_appservice_kit::registration::load_or_generate(
        &args.registration,
        &salon_email::template(&args.server_name, Some(url)),
    )?;
    if !existed {
        println!(
            "wrote {}: register it with the homeserver, then start salon-email again",
            args.registration.display()
        );
        return Ok(());
    }
    let bridge = salon_email::start(salon_email::Options {
        registration,
        homeserver_url: args.homeserver,
        server_name: args.server_name.as_str().try_into()?,
        store_dir: args.data,
        config,
        directory: None,
    })
    .await?;
    tracing::info!(smtp = ?bridge.smtp_addr, lmtp = ?bridge.lmtp_addr, "salon-email is serving");
    bridge.wait().await;
    Ok(())
}
