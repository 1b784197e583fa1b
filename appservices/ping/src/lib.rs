//! The ping bot: invite it to a room and it answers `!ping` with `pong` and how long the
//! message took to reach it. Small, but it exercises everything an appservice needs:
//! transactions, the bot user, auto-join, commands with generated help.

use std::time::{SystemTime, UNIX_EPOCH};

use salon_appservice_kit::{
    Command, Commands, Event, Handler, Kit, Running, Settings,
    registration::{Registration, Template},
};

pub const ID: &str = "ping";
pub const LOCALPART: &str = "ping";

pub fn commands() -> Commands {
    Commands::new(
        "!",
        vec![Command {
            name: "ping",
            params: vec![],
            description: "Answer with pong and how long your message took to reach the bot",
        }],
    )
}

/// The registration the ping bot needs: its own user, nothing exclusive beyond it.
pub fn template(url: Option<String>) -> Template<'static> {
    Template {
        id: ID,
        url,
        sender_localpart: LOCALPART,
        users: vec![],
        aliases: vec![],
        protocols: vec![],
        receive_ephemeral: false,
    }
}

pub struct Ping;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Handler for Ping {
    async fn on_event(&self, kit: &Kit, event: &Event) -> anyhow::Result<()> {
        if event.kind() != "m.room.message" || event.sender().as_deref() == Some(kit.bot_id()) {
            return Ok(());
        }
        let (Some(room), Some(commands)) = (event.room_id(), &kit.commands) else {
            return Ok(());
        };
        let Some(invocation) = commands.parse(event.content()) else {
            return Ok(());
        };
        match invocation.command.as_str() {
            "ping" => {
                let took = event
                    .origin_server_ts()
                    .map(|ts| now_ms().saturating_sub(ts));
                let text = match took {
                    Some(ms) => format!("pong ({ms} ms)"),
                    None => "pong".to_owned(),
                };
                kit.bot.send_notice(&room, &text, None).await?;
            }
            "help" => kit.reply_help(&room, "Ping bot commands:").await?,
            _ => {}
        }
        Ok(())
    }
}

fn settings(
    registration: Registration,
    homeserver_url: String,
    server_name: salon_appservice_kit::ruma::OwnedServerName,
    listen: std::net::SocketAddr,
    store_dir: std::path::PathBuf,
) -> Settings {
    Settings {
        registration,
        homeserver_url,
        server_name,
        listen,
        store_dir,
        auto_join: true,
        commands: Some(commands()),
    }
}

/// Start the ping bot with a registration the homeserver knows.
pub async fn start(
    registration: Registration,
    homeserver_url: String,
    server_name: salon_appservice_kit::ruma::OwnedServerName,
    listen: std::net::SocketAddr,
    store_dir: std::path::PathBuf,
) -> anyhow::Result<Running> {
    salon_appservice_kit::start(
        settings(registration, homeserver_url, server_name, listen, store_dir),
        Ping,
    )
    .await
}

/// Start the ping bot on a listener bound (and registered) beforehand.
pub async fn start_on(
    listener: tokio::net::TcpListener,
    registration: Registration,
    homeserver_url: String,
    server_name: salon_appservice_kit::ruma::OwnedServerName,
    store_dir: std::path::PathBuf,
) -> anyhow::Result<Running> {
    let listen = listener.local_addr()?;
    salon_appservice_kit::start_on(
        listener,
        settings(registration, homeserver_url, server_name, listen, store_dir),
        Ping,
    )
    .await
}
