//! Salon: a Matrix homeserver for an organisation's own staff.
//!
//! Layers, never upwards: [`http`] → [`api`] → [`service`] → [`storage`].

pub mod api;
pub mod config;
pub mod error;
pub mod http;
pub mod service;
pub mod storage;

use std::sync::Arc;

use crate::{config::Config, service::Services};

/// Start the homeserver on an already bound listener; returns when `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let services = Services::build(config)?;
    tracing::info!(
        server_name = %services.globals.server_name(),
        address = %listener.local_addr()?,
        key_id = %services.globals.key_id(),
        "Salon is serving"
    );
    http::serve(services.clone(), listener, shutdown).await?;
    services.db.flush()?;
    Ok(())
}

/// Shared by the binary and tests: build services without serving.
pub fn services(config: Config) -> anyhow::Result<Arc<Services>> {
    Ok(Services::build(config)?)
}
