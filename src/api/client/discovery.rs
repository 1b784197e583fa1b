//! `/versions`, `/.well-known/matrix/client`, `/capabilities`.

use std::{collections::BTreeMap, sync::Arc};

use ruma::api::client::discovery::{
    discover_homeserver, get_capabilities,
    get_capabilities::v3::{Capabilities, RoomVersionStability, RoomVersionsCapability},
    get_supported_versions,
};

use crate::{
    error::Result,
    http::Ruma,
    service::{Services, rooms::SUPPORTED_VERSIONS},
};

pub async fn versions(
    _: Arc<Services>,
    _: Ruma<get_supported_versions::Request>,
) -> Result<get_supported_versions::Response> {
    let versions = [
        "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
        "v1.11", "v1.12",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let mut res = get_supported_versions::Response::new(versions);
    res.unstable_features = BTreeMap::new();
    Ok(res)
}

pub async fn well_known(
    s: Arc<Services>,
    _: Ruma<discover_homeserver::Request>,
) -> Result<discover_homeserver::Response> {
    Ok(discover_homeserver::Response::new(
        discover_homeserver::HomeserverInfo::new(s.globals.config.base_url()),
    ))
}

pub async fn capabilities(
    s: Arc<Services>,
    _: Ruma<get_capabilities::v3::Request>,
) -> Result<get_capabilities::v3::Response> {
    let mut caps = Capabilities::new();
    let available = SUPPORTED_VERSIONS
        .iter()
        .map(|v| (v.clone(), RoomVersionStability::Stable))
        .collect();
    caps.room_versions =
        RoomVersionsCapability::new(s.globals.config.rooms.default_version.clone(), available);
    caps.change_password.enabled = true;
    Ok(get_capabilities::v3::Response::new(caps))
}
