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
}

impl Bundled {
    pub async fn stop(self) {
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

/// Start the enabled bundled appservices; `homeserver` is where the homeserver listens.
pub async fn start(s: &Arc<Services>, homeserver: SocketAddr) -> anyhow::Result<Bundled> {
    let mut bundled = Bundled::default();
    let config = &s.globals.config.appservices;
    if config.ping.enabled {
        let mut registration = stored_registration(s, salon_ping::ID, &salon_ping::template(None))?;
        let listener_ip = if homeserver.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            homeserver.ip()
        };
        let running = salon_ping::start(
            registration.clone(),
            format!("http://{}", SocketAddr::new(listener_ip, homeserver.port())),
            s.globals.server_name().to_owned(),
            config.ping.listen,
            s.globals
                .config
                .data_dir
                .join("appservices")
                .join(salon_ping::ID),
        )
        .await?;
        registration.url = Some(format!("http://{}", running.addr));
        s.appservices.add_bundled(registration)?;
        tracing::info!(address = %running.addr, "bundled appservice ping is running");
        bundled.running.push(running);
    }
    Ok(bundled)
}
