//! Salon: a Matrix homeserver for an organisation's own staff.
//!
//! Layers, never upwards: [`http`] → [`api`] → [`service`] → [`storage`].

pub mod allocator;
pub mod api;
pub mod bundled;
pub mod config;
pub mod error;
pub mod http;
pub mod runtime;
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
    let address = listener.local_addr()?;
    let prepared = bundled::prepare(&services, address)?;
    services.ensure_appservice_users().await?;
    let (stop_push, push_stopped) = tokio::sync::oneshot::channel();
    let push_sender = tokio::spawn(service::push::sender::run(services.clone(), push_stopped));
    // Stops the appservice senders and the directory sync.
    let (stop_appservices, appservices_stopped) = tokio::sync::watch::channel(false);
    let mut appservice_senders =
        service::appservice::sender::spawn_all(services.clone(), appservices_stopped.clone())?;
    if services.ldap.is_some() {
        appservice_senders.push(tokio::spawn(service::ldap::run_periodic(
            services.clone(),
            appservices_stopped,
        )));
    }
    let trimmer = tokio::spawn(allocator::trim_after_bursts());
    let log = prepare_log(&services);
    // Answer clients at once; the bundled appservices open their stores meanwhile.
    let server = tokio::spawn(http::serve(services.clone(), listener, shutdown));
    let bundled = match bundled::start(&services, prepared).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "the bundled appservices could not start");
            bundled::Bundled::default()
        }
    };
    let served = server
        .await
        .map_err(|e| anyhow::anyhow!("the HTTP server task failed: {e}"))?;
    let _ = stop_push.send(());
    let _ = stop_appservices.send(true);
    let _ = push_sender.await;
    for task in appservice_senders {
        let _ = task.await;
    }
    bundled.stop().await;
    trimmer.abort();
    let _ = log.await;
    served?;
    services.db.flush()?;
    Ok(())
}

/// Prepares the write-ahead log for in-place commits (see `Db::prepare_log`) while
/// clients are already served.
fn prepare_log(services: &Arc<Services>) -> tokio::task::JoinHandle<()> {
    let db = services.db.clone();
    let bytes = services.globals.config.database.prepared_log_mib * 1024 * 1024;
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match db.prepare_log(bytes) {
            Ok(true) => tracing::debug!(
                mib = bytes >> 20,
                ms = started.elapsed().as_millis() as u64,
                "the write-ahead log is overwritten in place"
            ),
            Ok(false) if bytes > 0 => tracing::info!(
                "the write-ahead log files were prepared but not taken up; commits append"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "the write-ahead log could not be prepared"),
        }
    })
}

/// Shared by the binary and tests: build services without serving.
pub fn services(config: Config) -> anyhow::Result<Arc<Services>> {
    Ok(Services::build(config)?)
}
