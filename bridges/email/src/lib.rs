//! Salon's email bridge. Email threads become rooms and people outside reply by plain
//! email: an SMTP/LMTP listener takes mail for the organisation's domain into a durable
//! spool, a worker bridges each message into its thread's room as the sender's ghost,
//! and what staff write in those rooms goes out through the relay, threaded.
//!
//! It is a genuine appservice built on the kit: `salon serve` runs it in-process when
//! `[bridges.email] enabled = true`, and `salon-email` runs it against any homeserver.

pub mod address;
pub mod auth;
pub mod bridge;
pub mod config;
pub mod content;
pub mod outbound;
pub mod parse;
pub mod portal;
pub mod smtp;
pub mod spool;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use salon_appservice_kit::{
    Running, Settings, Store,
    registration::{Registration, Template},
    ruma::OwnedServerName,
};

pub use self::config::EmailConfig;
use self::{
    bridge::{EmailHandler, Rcpt, Shared},
    outbound::Queue,
    portal::Portals,
    smtp::{Protocol, Server},
    spool::Spool,
};

pub const ID: &str = "email";

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The registration the bridge needs: its bot, and exclusively the ghosts and the
/// aliases of its rooms.
pub fn template(server_name: &str, url: Option<String>) -> Template<'static> {
    let domain = regex_escape(server_name);
    Template {
        id: ID,
        url,
        sender_localpart: bridge::BOT_LOCALPART,
        users: vec![format!("@{}.*:{domain}", address::GHOST_PREFIX)],
        aliases: vec![format!("#_email_.*:{domain}")],
        protocols: vec!["email".to_owned()],
        receive_ephemeral: false,
    }
}

/// Finds the member of staff an email address belongs to (their directory or account
/// address, in any domain), as a localpart. `salon serve` answers from its accounts.
pub type StaffDirectory = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How to run the bridge.
pub struct Options {
    pub registration: Registration,
    /// The homeserver's client-server API.
    pub homeserver_url: String,
    pub server_name: OwnedServerName,
    /// The bridge's own store (spool, queue, conversations).
    pub store_dir: PathBuf,
    pub config: EmailConfig,
    /// Addresses of staff beyond `<localpart>@<domain>`.
    pub directory: Option<StaffDirectory>,
}

/// A running bridge.
pub struct Bridge {
    running: Running,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub smtp_addr: Option<SocketAddr>,
    pub lmtp_addr: Option<SocketAddr>,
    pub appservice_addr: SocketAddr,
    pub shared: Arc<Shared>,
}

impl Bridge {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.running.stop().await;
    }

    /// Serve until the process ends (the standalone binary).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        self.running.wait().await;
    }
}

/// Start the bridge, its appservice endpoints on `listener` (bound and registered
/// beforehand).
pub async fn start_on(listener: tokio::net::TcpListener, o: Options) -> anyhow::Result<Bridge> {
    let config = o.config;
    let domain = config
        .domain
        .clone()
        .unwrap_or_else(|| o.server_name.to_string())
        .to_ascii_lowercase();
    let hostname = config.hostname.clone().unwrap_or_else(|| domain.clone());
    let tls = match (&config.smtp.tls_cert, &config.smtp.tls_key) {
        (Some(cert), Some(key)) => Some(smtp::tls_acceptor(cert, key)?),
        (None, None) => None,
        _ => anyhow::bail!("bridges.email.smtp: tls_cert and tls_key go together"),
    };
    // Listeners first: a port in use stops start-up with a clear error.
    let smtp_listener = match config.smtp.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for SMTP on {addr}: {e}"))?,
        ),
        None => None,
    };
    let lmtp_listener = match config.lmtp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for LMTP on {addr}: {e}"))?,
        ),
        None => None,
    };
    let checker = if config.auth.enabled {
        Some(Arc::new(auth::Checker::new(
            config.auth.dns,
            &hostname,
            config.auth.on_dmarc_fail,
        )?))
    } else {
        None
    };
    let store = Store::open(&o.store_dir)?;
    let shared = Arc::new(Shared {
        domain: domain.clone(),
        portals: Portals::new(store.clone()),
        spool: Spool::open(store.clone())?,
        queue: Queue::new(store.clone()),
        lock: tokio::sync::Mutex::new(()),
        dkim: match &config.dkim.key {
            Some(key) => Some(outbound::dkim_signer(key, &domain, &config.dkim.selector)?),
            None => None,
        },
        config: config.clone(),
        directory: o.directory,
    });
    let listen = listener.local_addr()?;
    let running = salon_appservice_kit::start_with_store(
        listener,
        Settings {
            registration: o.registration,
            homeserver_url: o.homeserver_url,
            server_name: o.server_name,
            listen,
            store_dir: o.store_dir,
            auto_join: true,
            commands: Some(bridge::commands()),
        },
        store,
        EmailHandler {
            shared: shared.clone(),
        },
    )
    .await?;
    let kit = running.kit.clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let recipients = Arc::new(Rcpt {
        shared: shared.clone(),
        kit: kit.clone(),
    });
    let mut addrs = [None, None];
    for (i, (listener, protocol)) in [
        (smtp_listener, Protocol::Smtp),
        (lmtp_listener, Protocol::Lmtp),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(listener) = listener else { continue };
        addrs[i] = Some(listener.local_addr()?);
        let server = Arc::new(Server::new(
            protocol,
            hostname.clone(),
            domain.clone(),
            config.smtp.clone(),
            // STARTTLS on the SMTP listener; LMTP comes from a local MTA.
            if protocol == Protocol::Smtp {
                tls.clone()
            } else {
                None
            },
            shared.spool.clone(),
            recipients.clone(),
            // A local MTA in front checks mail itself before handing it over.
            if protocol == Protocol::Smtp {
                checker.clone()
            } else {
                None
            },
        ));
        tracing::info!(address = %addrs[i].unwrap_or(listen), protocol = ?protocol, "email bridge listening");
        tasks.push(tokio::spawn(smtp::serve(server, listener, stopped.clone())));
    }
    tasks.push(tokio::spawn(bridge::run_inbound(
        kit.clone(),
        shared.clone(),
        stopped.clone(),
    )));
    tasks.push(tokio::spawn(outbound::run(
        kit,
        shared.queue.clone(),
        config.relay.clone(),
        stopped,
    )));
    Ok(Bridge {
        appservice_addr: running.addr,
        running,
        stop,
        tasks,
        smtp_addr: addrs[0],
        lmtp_addr: addrs[1],
        shared,
    })
}

/// Start the bridge with its appservice endpoints on `config.appservice_listen`.
pub async fn start(o: Options) -> anyhow::Result<Bridge> {
    let listener = tokio::net::TcpListener::bind(o.config.appservice_listen).await?;
    start_on(listener, o).await
}
