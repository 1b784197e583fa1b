//! The HTTP server: the router of every endpoint, and the layers around it.

mod ruma_glue;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router, extract::DefaultBodyLimit, response::IntoResponse, routing::get, serve::ListenerExt,
};
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{Any, CorsLayer},
    trace::TraceLayer,
};

pub use self::ruma_glue::{Ruma, RumaResponse, route, route_with};
use crate::{
    api::{client as api, server},
    error::Error,
    service::Services,
};

pub fn router(services: Arc<Services>) -> Router {
    let r = Router::new();
    // Discovery
    let r = route(r, api::discovery::versions);
    let r = route(r, api::discovery::well_known);
    let r = route(r, api::discovery::capabilities);
    // Accounts
    let r = route(r, api::account::register);
    let r = route(r, api::account::available);
    let r = route(r, api::account::token_validity);
    let r = route(r, api::account::whoami);
    let r = route(r, api::account::change_password);
    let r = route(r, api::account::deactivate);
    let r = route(r, api::account::threepids);
    let r = route(r, api::session::login_types);
    let r = route(r, api::session::login);
    let r = route(r, api::session::get_token);
    let r = route(r, api::session::logout);
    let r = route(r, api::session::logout_all);
    let r = route(r, api::device::list);
    let r = route(r, api::device::get);
    let r = route(r, api::device::update);
    let r = route(r, api::device::delete);
    let r = route(r, api::device::delete_many);
    let r = route(r, api::profile::get);
    let r = route(r, api::profile::get_displayname);
    let r = route(r, api::profile::set_displayname);
    let r = route(r, api::profile::get_avatar);
    let r = route(r, api::profile::set_avatar);
    let r = route(r, api::account_data::set_global);
    let r = route(r, api::account_data::get_global);
    let r = route(r, api::account_data::set_room);
    let r = route(r, api::account_data::get_room);
    let r = route(r, api::account_data::tags);
    let r = route(r, api::account_data::put_tag);
    let r = route(r, api::account_data::remove_tag);
    let r = route(r, api::account_data::create);
    let r = route(r, api::account_data::get);
    let r = route(r, api::directory::search);
    // Rooms
    let r = route(r, api::room::create);
    let r = route(r, api::room::event);
    let r = route(r, api::room::room_aliases);
    let r = route(r, api::room::upgrade);
    let r = route(r, api::membership::join_by_id);
    let r = route(r, api::membership::join);
    let r = route(r, api::membership::knock);
    let r = route(r, api::membership::invite);
    let r = route(r, api::membership::leave);
    let r = route(r, api::membership::forget);
    let r = route(r, api::membership::kick);
    let r = route(r, api::membership::ban);
    let r = route(r, api::membership::unban);
    let r = route(r, api::membership::joined);
    let r = route(r, api::membership::members);
    let r = route(r, api::membership::joined_members_of);
    let r = route(r, api::message::send);
    let r = route(r, api::message::redact);
    let r = route(r, api::message::messages);
    let r = route(r, api::state::all);
    let r = route(r, api::state::one);
    let r = route(r, api::state::send);
    let r = route(r, api::directory::put_alias);
    let r = route(r, api::directory::get_alias);
    let r = route(r, api::directory::remove_alias);
    let r = route(r, api::directory::public_rooms);
    let r = route(r, api::directory::public_rooms_filtered);
    let r = route(r, api::directory::visibility);
    let r = route(r, api::directory::set_visibility);
    let r = route(r, api::message::context);
    let r = route(r, api::message::timestamp_to_event);
    // Sync and ephemeral data
    let r = route_with(r, api::sync::sync_events);
    let r = route(r, api::ephemeral::typing);
    let r = route(r, api::ephemeral::receipt);
    let r = route(r, api::ephemeral::read_markers);
    let r = route(r, api::ephemeral::get_status);
    let r = route(r, api::ephemeral::set_status);
    // Push rules
    let r = route(r, api::push::all);
    let r = route(r, api::push::global);
    let r = route(r, api::push::get);
    let r = route(r, api::push::set);
    let r = route(r, api::push::delete);
    let r = route(r, api::push::get_enabled);
    let r = route(r, api::push::set_enabled);
    let r = route(r, api::push::get_actions);
    let r = route(r, api::push::set_actions);
    let r = route(r, api::push::pushers);
    let r = route(r, api::push::set_pusher);
    let r = route(r, api::push::notifications);
    // End-to-end encryption
    let r = route(r, api::keys::upload);
    let r = route(r, api::keys::query);
    let r = route(r, api::keys::claim);
    let r = route(r, api::keys::changes);
    let r = route(r, api::keys::upload_signing_keys);
    let r = route(r, api::keys::upload_signatures);
    let r = route(r, api::to_device::send);
    let r = route(r, api::backup::create_version);
    let r = route(r, api::backup::latest_version);
    let r = route(r, api::backup::get_version);
    let r = route(r, api::backup::update_version);
    let r = route(r, api::backup::delete_version);
    let r = route(r, api::backup::put_keys);
    let r = route(r, api::backup::put_room_keys);
    let r = route(r, api::backup::put_session_key);
    let r = route(r, api::backup::get_keys);
    let r = route(r, api::backup::get_room_keys);
    let r = route(r, api::backup::get_session_key);
    let r = route(r, api::backup::delete_keys);
    let r = route(r, api::backup::delete_room_keys);
    let r = route(r, api::backup::delete_session_key);
    // Appservices and third-party lookups
    let r = route(r, api::appservice::ping);
    let r = route(r, api::appservice::protocols);
    let r = route(r, api::appservice::protocol);
    let r = route(r, api::appservice::locations);
    let r = route(r, api::appservice::location_for_alias);
    let r = route(r, api::appservice::users);
    let r = route(r, api::appservice::user_for_id);
    // Media
    let r = route(r, api::media::upload);
    let r = route(r, api::media::create);
    let r = route_with(r, api::media::upload_to);
    let r = route(r, api::media::config);
    let r = route(r, api::media::legacy_config);
    let r = route_with(r, api::media::download);
    let r = route_with(r, api::media::download_as);
    let r = route_with(r, api::media::thumbnail);
    let r = route_with(r, api::media::legacy_download);
    let r = route_with(r, api::media::legacy_download_as);
    let r = route_with(r, api::media::legacy_thumbnail);

    let r = r
        .route(
            "/_synapse/admin/v1/register",
            get(api::admin::nonce).post(api::admin::register),
        )
        .route("/_matrix/key/v2/server", get(server::server_keys))
        .route("/_matrix/key/v2/server/{key_id}", get(server::server_keys))
        .route("/health", get(|| async { "OK" }));

    // Bodies are read (and limited) by the `Ruma` extractor: JSON bodies to
    // `limits.max_request_bytes`, uploads to `media.max_upload_bytes`.
    let limit = services
        .globals
        .config
        .limits
        .max_request_bytes
        .max(services.media.max_upload_bytes());
    r.fallback(|| async {
        Error::unrecognized(http::StatusCode::NOT_FOUND, "Unrecognized request").into_response()
    })
    .method_not_allowed_fallback(|| async {
        Error::unrecognized(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed for this endpoint",
        )
        .into_response()
    })
    .layer(DefaultBodyLimit::max(limit))
    .layer(
        CorsLayer::new()
            .allow_origin(Any)
            .allow_methods([
                http::Method::GET,
                http::Method::POST,
                http::Method::PUT,
                http::Method::DELETE,
                http::Method::OPTIONS,
            ])
            .allow_headers([
                http::header::AUTHORIZATION,
                http::header::CONTENT_TYPE,
                http::HeaderName::from_static("x-requested-with"),
            ])
            .max_age(Duration::from_secs(86400)),
    )
    .layer(CatchPanicLayer::custom(|_| {
        Error::internal("handler panicked").into_response()
    }))
    .layer(TraceLayer::new_for_http())
    .with_state(services)
}

/// Serve until `shutdown` resolves.
pub async fn serve(
    services: Arc<Services>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(services).into_make_service_with_connect_info::<SocketAddr>();
    // Answers leave as soon as they are written: Nagle's algorithm would hold a small
    // one back until the peer had acknowledged what went before.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
