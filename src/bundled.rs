//! The appservices that `salon serve` runs in its own process. Each gets a registration
//! generated once and kept in the database (its tokens stay the same across restarts),
//! listens on loopback, and talks to the homeserver over loopback HTTP like any other
//! appservice.

use std::{net::SocketAddr, sync::Arc};

use crate::service::Services;

/// The running bundled appservices.
#[derive(Default)]
pub struct Bundled {
    running: Vec<salon_appservice_kit::Running>,
    email: Option<salon_email::Bridge>,
}

impl Bundled {
    pub async fn stop(self) {
        if let Some(e) = self.email {
            e.stop().await;
        }
        for r in self.running {
            r.stop().await;
        }
    }
}

fn stored_registration(
    s: &Services,
    id: &str,
    template: &salon_appservice_kit::registration::Template<'_>,
) -> anyhow::Result<salon_appservice_kit::Registration> {
    let key = format!("bundled_registration:{id}");
    if let Some(v) = s.db.get("meta", key.as_bytes())? {
        return Ok(serde_json::from_slice(&v)?);
    }
    let reg = salon_appservice_kit::registration::generate(template);
    s.db.put_durable("meta", key.as_bytes(), &serde_json::to_vec(&reg)?)?;
    Ok(reg)
}

/// A bundled appservice registered with the homeserver, its listener bound, not yet
/// serving.
pub struct Prepared {
    ping: Option<(std::net::TcpListener, salon_appservice_kit::Registration)>,
    email: Option<(std::net::TcpListener, salon_appservice_kit::Registration)>,
    homeserver: SocketAddr,
}

/// Register the enabled bundled appservices and bind their listeners, before the
/// homeserver serves: their transactions start with the first event after start-up.
pub fn prepare(s: &Services, homeserver: SocketAddr) -> anyhow::Result<Prepared> {
    let config = &s.globals.config.appservices;
    let mut prepared = Prepared {
        ping: None,
        email: None,
        homeserver,
    };
    if config.ping.enabled {
        let mut registration = stored_registration(s, salon_ping::ID, &salon_ping::template(None))?;
        let listener = std::net::TcpListener::bind(config.ping.listen)?;
        listener.set_nonblocking(true)?;
        registration.url = Some(format!("http://{}", listener.local_addr()?));
        s.appservices.add_bundled(registration.clone())?;
        prepared.ping = Some((listener, registration));
    }
    let email = &s.globals.config.bridges.email;
    if email.enabled {
        let template = salon_email::template(s.globals.server_name().as_str(), None);
        let mut registration = stored_registration(s, salon_email::ID, &template)?;
        let listener = std::net::TcpListener::bind(email.appservice_listen)?;
        listener.set_nonblocking(true)?;
        registration.url = Some(format!("http://{}", listener.local_addr()?));
        s.appservices.add_bundled(registration.clone())?;
        prepared.email = Some((listener, registration));
    }
    Ok(prepared)
}

/// Staff are also reached at their account's (or directory entry's) email address.
fn staff_directory(s: Arc<Services>) -> salon_email::StaffDirectory {
    Arc::new(move |addr: &str| {
        let users = match s.users.all() {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the accounts for an email address");
                return None;
            }
        };
        users
            .into_iter()
            .find(|(_, r)| {
                !r.deactivated
                    && r.email
                        .as_deref()
                        .is_some_and(|e| e.trim().eq_ignore_ascii_case(addr))
            })
            .map(|(u, _)| u.localpart().to_owned())
    })
}

/// Start the prepared bundled appservices.
pub async fn start(s: &Arc<Services>, prepared: Prepared) -> anyhow::Result<Bundled> {
    let mut bundled = Bundled::default();
    let homeserver = prepared.homeserver;
    let ip = if homeserver.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        homeserver.ip()
    };
    if let Some((listener, registration)) = prepared.ping {
        let running = salon_ping::start_on(
            tokio::net::TcpListener::from_std(listener)?,
            registration,
            format!("http://{}", SocketAddr::new(ip, homeserver.port())),
            s.globals.server_name().to_owned(),
            s.globals
                .config
                .data_dir
                .join("appservices")
                .join(salon_ping::ID),
        )
        .await?;
        tracing::info!(address = %running.addr, "bundled appservice ping is running");
        bundled.running.push(running);
    }
    if let Some((listener, registration)) = prepared.email {
        let started = salon_email::start_on(
            tokio::net::TcpListener::from_std(listener)?,
            salon_email::Options {
                registration,
                homeserver_url: format!("http://{}", SocketAddr::new(ip, homeserver.port())),
                server_name: s.globals.server_name().to_owned(),
                store_dir: s.globals.config.data_dir.join("bridges").join("email"),
                config: s.globals.config.bridges.email.clone(),
                directory: Some(staff_directory(s.clone())),
            },
        )
        .await;
        // A bridge that cannot start (its port taken, a bad certificate) is reported,
        // and the homeserver and the other appservices serve on.
        match started {
            Ok(bridge) => {
                tracing::info!(smtp = ?bridge.smtp_addr, lmtp = ?bridge.lmtp_addr, "bundled email bridge is running");
                bundled.email = Some(bridge);
            }
            Err(e) => tracing::error!(error = %e, "the email bridge could not start"),
        }
    }
    Ok(bundled)
}
