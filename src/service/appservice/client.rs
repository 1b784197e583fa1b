//! Requests from the homeserver to appservices (the application-service API), each
//! authenticated with the appservice's `hs_token`.

use std::time::{Duration, Instant};

use serde_json::Value as JsonValue;

use super::Appservice;
use crate::error::{Error, Result};

/// How long a query to an appservice may take: users wait for the answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("Salon/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

fn url(a: &Appservice, path: &str) -> Option<String> {
    a.registration
        .url
        .as_deref()
        .map(|base| format!("{}{path}", base.trim_end_matches('/')))
}

/// Percent-encode a path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What happened to one request.
pub enum Reply {
    Ok(JsonValue),
    /// The appservice answered with this status.
    Status(u16),
    /// No answer (connection refused, timeout…).
    Unreachable(String),
    NoUrl,
}

async fn request(
    http: &reqwest::Client,
    a: &Appservice,
    method: reqwest::Method,
    path: &str,
    body: Option<&JsonValue>,
    timeout: Duration,
) -> Reply {
    let Some(url) = url(a, path) else {
        return Reply::NoUrl;
    };
    let mut req = http
        .request(method, url)
        .bearer_auth(&a.registration.hs_token)
        .timeout(timeout);
    if let Some(b) = body {
        req = req.json(b);
    }
    match req.send().await {
        Ok(res) if res.status().is_success() => Reply::Ok(
            res.json()
                .await
                .unwrap_or(JsonValue::Object(Default::default())),
        ),
        Ok(res) => Reply::Status(res.status().as_u16()),
        Err(e) => Reply::Unreachable(e.to_string()),
    }
}

/// `PUT /_matrix/app/v1/transactions/{txnId}`.
pub async fn push_transaction(
    http: &reqwest::Client,
    a: &Appservice,
    txn_id: &str,
    body: &JsonValue,
) -> Reply {
    request(
        http,
        a,
        reqwest::Method::PUT,
        &format!("/_matrix/app/v1/transactions/{}", enc(txn_id)),
        Some(body),
        Duration::from_secs(30),
    )
    .await
}

/// `GET /_matrix/app/v1/users/{userId}`: does the appservice want this user to exist?
pub async fn query_user(http: &reqwest::Client, a: &Appservice, user: &str) -> bool {
    matches!(
        request(
            http,
            a,
            reqwest::Method::GET,
            &format!("/_matrix/app/v1/users/{}", enc(user)),
            None,
            QUERY_TIMEOUT,
        )
        .await,
        Reply::Ok(_)
    )
}

/// `GET /_matrix/app/v1/rooms/{alias}`: does the appservice want this alias to exist?
pub async fn query_alias(http: &reqwest::Client, a: &Appservice, alias: &str) -> bool {
    matches!(
        request(
            http,
            a,
            reqwest::Method::GET,
            &format!("/_matrix/app/v1/rooms/{}", enc(alias)),
            None,
            QUERY_TIMEOUT,
        )
        .await,
        Reply::Ok(_)
    )
}

/// `POST /_matrix/app/v1/ping`: how long the appservice took to answer.
pub async fn ping(
    http: &reqwest::Client,
    a: &Appservice,
    transaction_id: Option<&str>,
) -> Result<Duration> {
    let mut body = serde_json::json!({});
    if let Some(t) = transaction_id {
        body["transaction_id"] = JsonValue::String(t.to_owned());
    }
    let started = Instant::now();
    match request(
        http,
        a,
        reqwest::Method::POST,
        "/_matrix/app/v1/ping",
        Some(&body),
        Duration::from_secs(10),
    )
    .await
    {
        // Whole milliseconds, rounded up: a loopback answer in 0.3 ms is "1 ms", never
        // "0 ms", which clients read as no answer.
        Reply::Ok(_) => Ok(Duration::from_millis(
            (started.elapsed().as_micros() as u64).div_ceil(1000).max(1),
        )),
        Reply::NoUrl => Err(Error::ping_failed(
            ruma::api::error::ErrorKind::UrlNotSet,
            "This appservice has no URL to ping",
        )),
        Reply::Status(code) => {
            let mut data = ruma::api::error::BadStatusErrorData::new();
            data.status = http::StatusCode::from_u16(code).ok();
            Err(Error::ping_failed(
                ruma::api::error::ErrorKind::BadStatus(data),
                format!("The appservice answered with status {code}"),
            ))
        }
        Reply::Unreachable(why) if why.contains("timed out") => Err(Error::ping_failed(
            ruma::api::error::ErrorKind::ConnectionTimeout,
            "The appservice did not answer in time",
        )),
        Reply::Unreachable(why) => Err(Error::ping_failed(
            ruma::api::error::ErrorKind::ConnectionFailed,
            format!("Cannot reach the appservice: {why}"),
        )),
    }
}

/// A third-party lookup (`/_matrix/app/v1/thirdparty/…`), forwarded as it came.
pub async fn thirdparty(
    http: &reqwest::Client,
    a: &Appservice,
    path_and_query: &str,
) -> Option<JsonValue> {
    match request(
        http,
        a,
        reqwest::Method::GET,
        &format!("/_matrix/app/v1/thirdparty/{path_and_query}"),
        None,
        QUERY_TIMEOUT,
    )
    .await
    {
        Reply::Ok(v) => Some(v),
        _ => None,
    }
}
