//! The shared framework of Salon's appservices and bridges.
//!
//! An appservice built on the kit gets: its registration (loaded or generated,
//! [`registration`]), the HTTP endpoints the homeserver calls, with transactions that are
//! idempotent by id and written to its own store before they are acknowledged (so a
//! crash neither loses nor replays work, [`server`]), an intent API to act as its bot or
//! its ghosts ([`intent`]), bot commands with generated help ([`commands`]), bridge info
//! state ([`bridge`]) and a small store ([`store`]).
//!
//! It speaks only the standard appservice and client-server APIs, so an appservice made
//! with it runs against any homeserver; `salon serve` runs the bundled ones in-process.

pub mod bridge;
pub mod commands;
pub mod intent;
pub mod registration;
pub mod server;
pub mod store;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

pub use ruma;
use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, UserId};
use serde_json::Value as JsonValue;

pub use self::{
    commands::{Command, Commands, Invocation, Param},
    intent::{Homeserver, Intent, MatrixError, is_errcode},
    registration::Registration,
    store::Store,
};

/// An event the homeserver pushed, in the client-server format (with `room_id`).
#[derive(Clone, Debug)]
pub struct Event(pub JsonValue);

impl Event {
    fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.as_str())
    }
    pub fn kind(&self) -> &str {
        self.str("type").unwrap_or_default()
    }
    pub fn sender(&self) -> Option<OwnedUserId> {
        self.str("sender").and_then(|s| UserId::parse(s).ok())
    }
    pub fn room_id(&self) -> Option<OwnedRoomId> {
        self.str("room_id").and_then(|s| RoomId::parse(s).ok())
    }
    pub fn event_id(&self) -> Option<&str> {
        self.str("event_id")
    }
    pub fn state_key(&self) -> Option<&str> {
        self.str("state_key")
    }
    pub fn content(&self) -> &JsonValue {
        self.0.get("content").unwrap_or(&JsonValue::Null)
    }
    pub fn origin_server_ts(&self) -> Option<u64> {
        self.0.get("origin_server_ts").and_then(|v| v.as_u64())
    }
    /// `membership` of an `m.room.member` event.
    pub fn membership(&self) -> Option<&str> {
        (self.kind() == "m.room.member")
            .then(|| self.content().get("membership").and_then(|m| m.as_str()))
            .flatten()
    }
    /// The text of an `m.room.message`.
    pub fn body(&self) -> Option<&str> {
        (self.kind() == "m.room.message")
            .then(|| self.content().get("body").and_then(|b| b.as_str()))
            .flatten()
    }
}

/// Everything a handler works with.
pub struct Kit {
    pub registration: Registration,
    pub homeserver: Homeserver,
    pub store: Store,
    /// The appservice's own user (`sender_localpart`).
    pub bot: Intent,
    pub commands: Option<Commands>,
}

impl Kit {
    pub fn bot_id(&self) -> &UserId {
        &self.bot.user_id
    }

    /// Act as a ghost (registering it on first use).
    pub fn ghost(&self, user: &UserId) -> Intent {
        self.homeserver.intent(user)
    }

    /// Answer a help request with the commands' generated help.
    pub async fn reply_help(&self, room: &RoomId, title: &str) -> anyhow::Result<()> {
        if let Some(commands) = &self.commands {
            let (plain, html) = commands.help(title);
            self.bot.send_notice(room, &plain, Some(&html)).await?;
        }
        Ok(())
    }

    /// Publish the command descriptions (MSC4391) in a room, where the bot may.
    pub async fn publish_commands(&self, room: &RoomId) {
        let Some(commands) = &self.commands else {
            return;
        };
        for (state_key, content) in commands.description_events(self.bot_id()) {
            if let Err(e) = self
                .bot
                .send_state(room, commands::DESCRIPTION_EVENT_TYPE, &state_key, &content)
                .await
            {
                tracing::debug!(room_id = %room, error = %e, "cannot publish command descriptions");
                return;
            }
        }
    }
}

/// What an appservice does with what the homeserver sends and asks.
pub trait Handler: Send + Sync + 'static {
    /// One event, in order. An error is logged; the event is not retried.
    fn on_event(&self, kit: &Kit, event: &Event)
    -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The homeserver asks whether a user of the namespace should exist (and the
    /// appservice may create it before answering `true`).
    fn query_user(&self, _kit: &Kit, _user: &str) -> impl Future<Output = bool> + Send {
        async { false }
    }

    /// The same for a room alias.
    fn query_alias(&self, _kit: &Kit, _alias: &str) -> impl Future<Output = bool> + Send {
        async { false }
    }

    /// Metadata of a third-party protocol the appservice declared.
    fn protocol(
        &self,
        _kit: &Kit,
        _protocol: &str,
    ) -> impl Future<Output = Option<JsonValue>> + Send {
        async { None }
    }
}

/// How to run an appservice.
pub struct Settings {
    pub registration: Registration,
    /// The client-server API of the homeserver (`http://127.0.0.1:8008`).
    pub homeserver_url: String,
    pub server_name: OwnedServerName,
    /// Where the homeserver's requests are received.
    pub listen: SocketAddr,
    pub store_dir: PathBuf,
    /// Join rooms the bot is invited to, and publish its command descriptions there.
    pub auto_join: bool,
    pub commands: Option<Commands>,
}

/// A running appservice.
pub struct Running {
    pub addr: SocketAddr,
    pub kit: Arc<Kit>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stop serving and finish the event being handled.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Serve until the process ends (standalone binaries).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Open the store, bind the listener, and start serving and handling events.
pub async fn start<H: Handler>(settings: Settings, handler: H) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    start_on(listener, settings, handler).await
}

/// Like [`start`], on a listener bound beforehand (`settings.listen` is not used): the
/// address can be registered with the homeserver before the appservice is ready, and
/// requests that arrive meanwhile wait in the listener's queue.
pub async fn start_on<H: Handler>(
    listener: tokio::net::TcpListener,
    settings: Settings,
    handler: H,
) -> anyhow::Result<Running> {
    let store = Store::open(&settings.store_dir)?;
    start_with_store(listener, settings, store, handler).await
}

/// Like [`start_on`], with the store opened beforehand (`settings.store_dir` is not
/// used): the appservice can keep its own records in it before serving.
pub async fn start_with_store<H: Handler>(
    listener: tokio::net::TcpListener,
    settings: Settings,
    store: Store,
    handler: H,
) -> anyhow::Result<Running> {
    let homeserver = Homeserver::new(
        &settings.homeserver_url,
        &settings.registration.as_token,
        settings.server_name.clone(),
        store.clone(),
    );
    let bot_id = homeserver.user_id(&settings.registration.sender_localpart)?;
    let kit = Arc::new(Kit {
        bot: homeserver.intent(&bot_id),
        homeserver,
        store,
        registration: settings.registration,
        commands: settings.commands,
    });
    server::start(kit, handler, listener, settings.auto_join).await
}
