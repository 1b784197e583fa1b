//! `salon-ping`: the ping bot as its own process, against any homeserver.
//!
//! ```sh
//! salon-ping --registration ping.yaml --url http://127.0.0.1:9010 \
//!     --homeserver http://127.0.0.1:8008 --server-name example.org
//! ```
//! The registration is generated on first run when the file does not exist; give it
//! to the homeserver (`salon admin appservice register ping.yaml`), then start again.

use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "A Matrix appservice that answers !ping")]
struct Args {
    /// The registration file (generated when missing).
    #[arg(long, env = "PING_REGISTRATION")]
    registration: PathBuf,
    /// The URL the homeserver reaches this appservice at (for a generated registration).
    #[arg(long, env = "PING_URL", default_value = "http://127.0.0.1:9010")]
    url: String,
    /// Where to listen for the homeserver's requests.
    #[arg(long, env = "PING_LISTEN", default_value = "127.0.0.1:9010")]
    listen: SocketAddr,
    /// The homeserver's client-server API.
    #[arg(long, env = "PING_HOMESERVER", default_value = "http://127.0.0.1:8008")]
    homeserver: String,
    /// The homeserver's server name (the domain of user ids).
    #[arg(long, env = "PING_SERVER_NAME", default_value = "localhost")]
    server_name: String,
    /// The bot's own store.
    #[arg(long, env = "PING_DATA", default_value = "./ping-data")]
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
    let existed = args.registration.exists();
    let registration = salon_appservice_kit::registration::load_or_generate(
        &args.registration,
        &salon_ping::template(Some(args.url.clone())),
    )?;
    if !existed {
        println!(
            "wrote {}: register it with the homeserver, then start salon-ping again",
            args.registration.display()
        );
        return Ok(());
    }
    let server_name = args.server_name.as_str().try_into()?;
    let running = salon_ping::start(
        registration,
        args.homeserver,
        server_name,
        args.listen,
        args.data,
    )
    .await?;
    tracing::info!(address = %running.addr, "salon-ping is serving");
    running.wait().await;
    Ok(())
}
