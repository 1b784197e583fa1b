//! Appservice-facing client endpoints: `/appservice/{id}/ping`, and the third-party
//! lookups (`/thirdparty/…`) that the homeserver answers by asking the appservices
//! that declared the protocol.

use std::{collections::BTreeMap, sync::Arc};

use ruma::api::client::{
    appservice::request_ping,
    thirdparty::{
        get_location_for_protocol, get_location_for_room_alias, get_protocol, get_protocols,
        get_user_for_protocol, get_user_for_user_id,
    },
};
use serde::de::DeserializeOwned;
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{
        Services,
        appservice::client::{self, enc},
    },
};

pub async fn ping(
    s: Arc<Services>,
    req: Ruma<request_ping::v1::Request>,
) -> Result<request_ping::v1::Response> {
    let appservice = req
        .appservice
        .clone()
        .ok_or_else(|| Error::forbidden("Only an appservice can ping itself"))?;
    if appservice.id() != req.appservice_id {
        return Err(Error::forbidden(
            "An appservice can only ping itself (the id does not match the as_token)",
        ));
    }
    let took = client::ping(
        &s.http,
        &appservice,
        req.transaction_id.as_deref().map(|t| t.as_str()),
    )
    .await?;
    Ok(request_ping::v1::Response::new(took))
}

fn query_string(fields: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Ask every appservice that declares `protocol` (or every appservice, for `None`) and
/// gather their answers.
async fn ask<T: DeserializeOwned>(
    s: &Services,
    protocol: Option<&str>,
    path_and_query: &str,
) -> Vec<T> {
    let mut out = Vec::new();
    for a in s.appservices.all() {
        let declares = a
            .registration
            .protocols
            .as_ref()
            .is_some_and(|p| protocol.is_none_or(|want| p.iter().any(|x| x == want)));
        if !declares {
            continue;
        }
        if let Some(v) = client::thirdparty(&s.http, &a, path_and_query).await {
            match serde_json::from_value::<T>(v) {
                Ok(t) => out.push(t),
                Err(e) => {
                    tracing::warn!(appservice = %a.id(), error = %e, "malformed third-party answer")
                }
            }
        }
    }
    out
}

pub async fn protocols(
    s: Arc<Services>,
    _req: Ruma<get_protocols::v3::Request>,
) -> Result<get_protocols::v3::Response> {
    let mut names: Vec<String> = s
        .appservices
        .all()
        .iter()
        .flat_map(|a| a.registration.protocols.clone().unwrap_or_default())
        .collect();
    names.sort();
    names.dedup();
    let mut protocols = BTreeMap::new();
    for name in names {
        let path = format!("protocol/{}", enc(&name));
        if let Some(p) = ask(&s, Some(&name), &path).await.into_iter().next() {
            protocols.insert(name, p);
        }
    }
    Ok(get_protocols::v3::Response::new(protocols))
}

pub async fn protocol(
    s: Arc<Services>,
    req: Ruma<get_protocol::v3::Request>,
) -> Result<get_protocol::v3::Response> {
    let path = format!("protocol/{}", enc(&req.protocol));
    let p = ask(&s, Some(&req.protocol), &path)
        .await
        .into_iter()
        .next()
        .ok_or_else(|| Error::not_found("No appservice provides this protocol"))?;
    Ok(get_protocol::v3::Response::new(p))
}

pub async fn locations(
    s: Arc<Services>,
    req: Ruma<get_location_for_protocol::v3::Request>,
) -> Result<get_location_for_protocol::v3::Response> {
    let path = format!(
        "location/{}{}",
        enc(&req.protocol),
        query_string(&req.fields)
    );
    let found: Vec<Vec<JsonValue>> = ask(&s, Some(&req.protocol), &path).await;
    Ok(get_location_for_protocol::v3::Response::new(
        found
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect(),
    ))
}

pub async fn location_for_alias(
    s: Arc<Services>,
    req: Ruma<get_location_for_room_alias::v3::Request>,
) -> Result<get_location_for_room_alias::v3::Response> {
    let path = format!("location?alias={}", enc(req.alias.as_str()));
    let found: Vec<Vec<JsonValue>> = ask(&s, None, &path).await;
    Ok(get_location_for_room_alias::v3::Response::new(
        found
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect(),
    ))
}

pub async fn users(
    s: Arc<Services>,
    req: Ruma<get_user_for_protocol::v3::Request>,
) -> Result<get_user_for_protocol::v3::Response> {
    let path = format!("user/{}{}", enc(&req.protocol), query_string(&req.fields));
    let found: Vec<Vec<JsonValue>> = ask(&s, Some(&req.protocol), &path).await;
    Ok(get_user_for_protocol::v3::Response::new(
        found
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect(),
    ))
}

pub async fn user_for_id(
    s: Arc<Services>,
    req: Ruma<get_user_for_user_id::v3::Request>,
) -> Result<get_user_for_user_id::v3::Response> {
    let path = format!("user?userid={}", enc(req.userid.as_str()));
    let found: Vec<Vec<JsonValue>> = ask(&s, None, &path).await;
    Ok(get_user_for_user_id::v3::Response::new(
        found
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect(),
    ))
}
