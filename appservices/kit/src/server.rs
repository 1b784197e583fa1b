//! The endpoints a homeserver calls (`/_matrix/app/v1/…`), and the worker that hands
//! pushed events to the handler in order.
//!
//! A transaction is acknowledged only once its events are in the store's inbox and its
//! id is recorded, in one synced write; a transaction id seen before is acknowledged
//! without doing anything. The worker takes events from the inbox in order and deletes
//! each after handling it, so a crash resumes where it stopped.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::{Value as JsonValue, json};

use crate::{Event, Handler, Kit, Running, store::Batch};

const INBOX: &str = "kit:inbox:";
const TXN: &str = "kit:txn:";

struct Inner<H> {
    kit: Arc<Kit>,
    handler: H,
    next: AtomicU64,
    /// Serialises transactions, so that one id is never enqueued twice.
    accepting: tokio::sync::Mutex<()>,
    work: tokio::sync::Notify,
    auto_join: bool,
}

fn error(status: StatusCode, errcode: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "errcode": errcode, "error": message })),
    )
        .into_response()
}

/// The homeserver authenticates with the registration's `hs_token`.
fn authorised<H>(
    inner: &Inner<H>,
    headers: &HeaderMap,
    query: &std::collections::HashMap<String, String>,
) -> Result<(), Response> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_owned)
        .or_else(|| query.get("access_token").cloned());
    match token {
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "M_UNAUTHORIZED",
            "Missing hs_token",
        )),
        Some(t) if t == inner.kit.registration.hs_token => Ok(()),
        Some(_) => Err(error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "Wrong hs_token",
        )),
    }
}

type Q = Query<std::collections::HashMap<String, String>>;

async fn transaction<H: Handler>(
    State(inner): State<Arc<Inner<H>>>,
    Path(txn_id): Path<String>,
    Query(query): Q,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorised(&inner, &headers, &query) {
        return r;
    }
    let Ok(body) = serde_json::from_slice::<JsonValue>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            "The body is not JSON",
        );
    };
    let _guard = inner.accepting.lock().await;
    let key = format!("{TXN}{txn_id}");
    match inner.kit.store.get(&key) {
        Ok(Some(_)) => return Json(json!({})).into_response(),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "appservice store unreadable");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "M_UNKNOWN",
                "store error",
            );
        }
    }
    let mut batch = Batch::default();
    let mut queued = 0;
    for event in body
        .get("events")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
    {
        let seq = inner.next.fetch_add(1, Ordering::SeqCst);
        batch.put(format!("{INBOX}{seq:016x}"), event.to_string());
        queued += 1;
    }
    batch.put(&key, b"1");
    if let Err(e) = inner.kit.store.commit(batch) {
        tracing::error!(error = %e, "cannot store a transaction");
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "M_UNKNOWN",
            "store error",
        );
    }
    tracing::debug!(txn_id = %txn_id, events = queued, "transaction accepted");
    inner.work.notify_one();
    Json(json!({})).into_response()
}

async fn query_user<H: Handler>(
    State(inner): State<Arc<Inner<H>>>,
    Path(user): Path<String>,
    Query(query): Q,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorised(&inner, &headers, &query) {
        return r;
    }
    if inner.handler.query_user(&inner.kit, &user).await {
        Json(json!({})).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "No such user here")
    }
}

async fn query_alias<H: Handler>(
    State(inner): State<Arc<Inner<H>>>,
    Path(alias): Path<String>,
    Query(query): Q,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorised(&inner, &headers, &query) {
        return r;
    }
    if inner.handler.query_alias(&inner.kit, &alias).await {
        Json(json!({})).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "No such alias here")
    }
}

async fn protocol<H: Handler>(
    State(inner): State<Arc<Inner<H>>>,
    Path(protocol): Path<String>,
    Query(query): Q,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorised(&inner, &headers, &query) {
        return r;
    }
    match inner.handler.protocol(&inner.kit, &protocol).await {
        Some(p) => Json(p).into_response(),
        None => error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "Unknown protocol"),
    }
}

async fn ping<H: Handler>(
    State(inner): State<Arc<Inner<H>>>,
    Query(query): Q,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorised(&inner, &headers, &query) {
        return r;
    }
    Json(json!({})).into_response()
}

/// Hand inbox events to the handler, oldest first, until told to stop.
async fn work<H: Handler>(inner: Arc<Inner<H>>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let notified = inner.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        loop {
            if *stop.borrow() {
                return;
            }
            let next = match inner.kit.store.first(INBOX.as_bytes()) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "appservice inbox unreadable");
                    None
                }
            };
            let Some((key, value)) = next else { break };
            match serde_json::from_slice::<JsonValue>(&value) {
                Ok(v) => handle(&inner, &Event(v)).await,
                Err(e) => tracing::warn!(error = %e, "dropping an unreadable inbox entry"),
            }
            if let Err(e) = inner.kit.store.delete(&key) {
                tracing::error!(error = %e, "cannot remove a handled event from the inbox");
                break;
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = stop.changed() => return,
        }
    }
}

async fn handle<H: Handler>(inner: &Inner<H>, event: &Event) {
    let kit = &inner.kit;
    if inner.auto_join
        && event.membership() == Some("invite")
        && event.state_key() == Some(kit.bot_id().as_str())
        && let Some(room) = event.room_id()
    {
        match kit.bot.ensure_joined(&room).await {
            Ok(()) => kit.publish_commands(&room).await,
            Err(e) => tracing::warn!(room_id = %room, error = %e, "cannot accept an invite"),
        }
    }
    if let Err(e) = inner.handler.on_event(kit, event).await {
        tracing::warn!(event_id = event.event_id().unwrap_or_default(), error = %e, "handler failed on an event");
    }
}

pub(crate) async fn start<H: Handler>(
    kit: Arc<Kit>,
    handler: H,
    listener: tokio::net::TcpListener,
    auto_join: bool,
) -> anyhow::Result<Running> {
    let next = match kit.store.last(INBOX.as_bytes())? {
        Some((k, _)) => {
            let hex = String::from_utf8_lossy(&k[INBOX.len()..]).into_owned();
            u64::from_str_radix(&hex, 16).unwrap_or(0) + 1
        }
        None => 0,
    };
    let inner = Arc::new(Inner {
        kit: kit.clone(),
        handler,
        next: AtomicU64::new(next),
        accepting: tokio::sync::Mutex::new(()),
        work: tokio::sync::Notify::new(),
        auto_join,
    });
    let app = Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn_id}",
            put(transaction::<H>),
        )
        .route("/transactions/{txn_id}", put(transaction::<H>))
        .route("/_matrix/app/v1/users/{user_id}", get(query_user::<H>))
        .route("/users/{user_id}", get(query_user::<H>))
        .route("/_matrix/app/v1/rooms/{alias}", get(query_alias::<H>))
        .route("/rooms/{alias}", get(query_alias::<H>))
        .route(
            "/_matrix/app/v1/thirdparty/protocol/{protocol}",
            get(protocol::<H>),
        )
        .route("/_matrix/app/v1/ping", post(ping::<H>))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
                "Unrecognized request",
            )
        })
        .with_state(inner.clone());
    let addr: SocketAddr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut server_stop = stopped.clone();
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_stop.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "appservice server stopped");
        }
    });
    let worker = tokio::spawn(work(inner.clone(), stopped));
    // Events left from before a restart.
    inner.work.notify_one();
    Ok(Running {
        addr,
        kit,
        stop,
        tasks: vec![server, worker],
    })
}
