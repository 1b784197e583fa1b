//! A minimal Matrix client: just what the scenarios need, over plain HTTP.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;

/// How the benchmark gets accounts on the server under test.
#[derive(Clone, Debug)]
pub enum Registration {
    /// Open registration with `m.login.dummy`.
    Open,
    /// Synapse-compatible shared-secret registration (`/_synapse/admin/v1/register`).
    SharedSecret(String),
    /// `m.login.registration_token`.
    Token(String),
}

#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
    pub user_id: String,
}

pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("http client")
}

async fn json_or_error(res: reqwest::Response, what: &str) -> anyhow::Result<Value> {
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{what}: HTTP {status}: {body}");
    }
    Ok(body)
}

pub async fn wait_ready(base: &str, limit: Duration) -> anyhow::Result<Duration> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let start = Instant::now();
    loop {
        if let Ok(r) = http
            .get(format!("{base}/_matrix/client/versions"))
            .send()
            .await
            && r.status().is_success()
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{base} did not answer /_matrix/client/versions within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn register(
    http: &reqwest::Client,
    base: &str,
    reg: &Registration,
    username: &str,
) -> anyhow::Result<Client> {
    let password = "benchmark password 1";
    let body = match reg {
        Registration::SharedSecret(secret) => {
            let nonce: Value = json_or_error(
                http.get(format!("{base}/_synapse/admin/v1/register"))
                    .send()
                    .await?,
                "nonce",
            )
            .await?;
            let nonce = nonce["nonce"].as_str().context("nonce")?.to_owned();
            let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes())?;
            for (i, part) in [nonce.as_str(), username, password, "notadmin"]
                .iter()
                .enumerate()
            {
                if i > 0 {
                    mac.update(b"\0");
                }
                mac.update(part.as_bytes());
            }
            let mac = hex::encode(mac.finalize().into_bytes());
            let req = json!({ "nonce": nonce, "username": username, "password": password, "admin": false, "mac": mac });
            json_or_error(
                http.post(format!("{base}/_synapse/admin/v1/register"))
                    .json(&req)
                    .send()
                    .await?,
                "shared-secret register",
            )
            .await?
        }
        Registration::Open | Registration::Token(_) => {
            let auth = match reg {
                Registration::Token(t) => {
                    json!({ "type": "m.login.registration_token", "token": t })
                }
                _ => json!({ "type": "m.login.dummy" }),
            };
            // A first request opens the interactive-auth session; the second completes it.
            let first = http
                .post(format!("{base}/_matrix/client/v3/register"))
                .json(&json!({ "username": username, "password": password }))
                .send()
                .await?;
            let session = first
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["session"].as_str().map(str::to_owned));
            let mut auth = auth;
            if let Some(s) = session {
                auth["session"] = Value::String(s);
            }
            let req = json!({ "username": username, "password": password, "auth": auth, "initial_device_display_name": "bench" });
            json_or_error(
                http.post(format!("{base}/_matrix/client/v3/register"))
                    .json(&req)
                    .send()
                    .await?,
                "register",
            )
            .await?
        }
    };
    Ok(Client {
        base: base.to_owned(),
        http: http.clone(),
        token: body["access_token"]
            .as_str()
            .context("access_token")?
            .to_owned(),
        user_id: body["user_id"].as_str().context("user_id")?.to_owned(),
    })
}

impl Client {
    /// A new device (and access token) for the same account.
    pub async fn login_again(&self) -> anyhow::Result<Client> {
        let req = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": self.user_id },
            "password": "benchmark password 1",
        });
        let body = json_or_error(
            self.http
                .post(format!("{}/_matrix/client/v3/login", self.base))
                .json(&req)
                .send()
                .await?,
            "login",
        )
        .await?;
        Ok(Client {
            token: body["access_token"]
                .as_str()
                .context("access_token")?
                .to_owned(),
            ..self.clone()
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.get_timed(path).await?.1)
    }

    /// A GET and the moment its whole answer had arrived (before it is parsed): what a
    /// wake-up latency ends with, without the benchmark's own JSON parsing in it.
    pub async fn get_timed(&self, path: &str) -> anyhow::Result<(Instant, Value)> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = res.status();
        let bytes = res.bytes().await?;
        let arrived = Instant::now();
        let body = parse(&bytes);
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {body}");
        }
        Ok((arrived, body))
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        json_or_error(res, path).await
    }

    pub async fn put(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let res = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        json_or_error(res, path).await
    }

    pub async fn create_room(&self, body: Value) -> anyhow::Result<String> {
        let v = self.post("/_matrix/client/v3/createRoom", body).await?;
        Ok(v["room_id"].as_str().context("room_id")?.to_owned())
    }

    pub async fn join(&self, room: &str) -> anyhow::Result<()> {
        self.post(&format!("/_matrix/client/v3/join/{}", enc(room)), json!({}))
            .await
            .map(|_| ())
    }

    pub async fn send_text(&self, room: &str, txn: &str, body: &str) -> anyhow::Result<String> {
        let v = self
            .put(
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                    enc(room),
                    enc(txn)
                ),
                json!({ "msgtype": "m.text", "body": body }),
            )
            .await?;
        Ok(v["event_id"].as_str().context("event_id")?.to_owned())
    }

    pub async fn sync(
        &self,
        since: Option<&str>,
        timeout_ms: u64,
        filter: Option<&str>,
    ) -> anyhow::Result<Value> {
        self.get(&sync_path(since, timeout_ms, filter)).await
    }

    /// A `/sync` and the moment its answer had arrived (before the generator parsed
    /// it: the time is the server's, not this client's JSON parser's).
    pub async fn sync_timed(
        &self,
        since: Option<&str>,
        timeout_ms: u64,
        filter: Option<&str>,
    ) -> anyhow::Result<(Instant, Value)> {
        self.get_timed(&sync_path(since, timeout_ms, filter)).await
    }
}

/// An answer as JSON; `null` when it is not JSON.
pub fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

pub fn sync_path(since: Option<&str>, timeout_ms: u64, filter: Option<&str>) -> String {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
    if let Some(s) = since {
        path.push_str(&format!("&since={}", enc(s)));
    }
    if let Some(f) = filter {
        path.push_str(&format!("&filter={}", enc(f)));
    }
    path
}
