//! Test harness: a real Salon on an ephemeral loopback port with a temporary data
//! directory, and a small JSON client.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;

pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub dir: TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    pub shared_secret: String,
}

pub fn test_config(dir: &std::path::Path, extra: &[(&str, &str)]) -> salon::config::Config {
    let mut env: Vec<(String, String)> = vec![
        ("SALON_SERVER_NAME".into(), "localhost".into()),
        ("SALON_DATA_DIR".into(), dir.display().to_string()),
        ("SALON_REGISTRATION__MODE".into(), "open".into()),
        (
            "SALON_REGISTRATION__SHARED_SECRET".into(),
            "test-shared-secret".into(),
        ),
        ("SALON_RATE_LIMITS__ENABLED".into(), "false".into()),
        // Hundreds of servers start in a run: a smaller prepared log for each.
        ("SALON_DATABASE__PREPARED_LOG_MIB".into(), "2".into()),
    ];
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    salon::config::Config::load(None, env).expect("test config")
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, extra).await
    }

    pub async fn start_in(dir: TempDir, extra: &[(&str, &str)]) -> Self {
        let config = test_config(dir.path(), extra);
        let shared_secret = config
            .registration
            .shared_secret
            .clone()
            .unwrap_or_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let result = salon::run(config, listener, async move {
                let _ = rx.await;
            })
            .await;
            if let Err(e) = result {
                eprintln!("test server stopped with an error: {e:#}");
            }
        });
        let base = format!("http://{addr}");
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http
                .get(format!("{base}/_matrix/client/versions"))
                .send()
                .await
                && r.status().is_success()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            addr,
            base,
            dir,
            shutdown: Some(tx),
            handle: Some(handle),
            shared_secret,
        }
    }

    /// Stop the server cleanly and give back its data directory.
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        let dir = tempfile::tempdir().expect("placeholder");
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn client(&self) -> Client {
        Client {
            base: self.base.clone(),
            http: reqwest::Client::new(),
            token: None,
            user_id: String::new(),
            device_id: String::new(),
        }
    }

    /// Register a user with open registration and return a logged-in client.
    pub async fn user(&self, name: &str) -> Client {
        let mut c = self.client();
        let (status, body) = c
            .post(
                "/_matrix/client/v3/register",
                json!({ "username": name, "password": "correct horse battery", "auth": { "type": "m.login.dummy" } }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "register {name}: {body}");
        c.token = Some(body["access_token"].as_str().expect("token").to_owned());
        c.user_id = body["user_id"].as_str().expect("user id").to_owned();
        c.device_id = body["device_id"].as_str().expect("device id").to_owned();
        c
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
    pub user_id: String,
    pub device_id: String,
}

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

impl Client {
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request sent");
        let status = res.status();
        let text = res.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.request(Method::DELETE, path, None).await
    }

    /// A successful request's body; panics with the error otherwise.
    pub async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.request(method.clone(), path, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {value}");
        value
    }

    pub async fn create_room(&self, body: Value) -> String {
        let v = self
            .ok(Method::POST, "/_matrix/client/v3/createRoom", Some(body))
            .await;
        v["room_id"].as_str().expect("room id").to_owned()
    }

    pub async fn send_text(&self, room: &str, txn: &str, text: &str) -> String {
        let v = self
            .ok(
                Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                    enc(room),
                    enc(txn)
                ),
                Some(json!({ "msgtype": "m.text", "body": text })),
            )
            .await;
        v["event_id"].as_str().expect("event id").to_owned()
    }

    pub async fn join(&self, room: &str) -> (StatusCode, Value) {
        self.post(&format!("/_matrix/client/v3/join/{}", enc(room)), json!({}))
            .await
    }

    pub async fn state(&self, room: &str, kind: &str, key: &str) -> (StatusCode, Value) {
        self.get(&format!(
            "/_matrix/client/v3/rooms/{}/state/{}/{}",
            enc(room),
            kind,
            enc(key)
        ))
        .await
    }
}

pub fn errcode(v: &Value) -> &str {
    v["errcode"].as_str().unwrap_or("<none>")
}

/// Sends `requests` at once and gives, in their order, the body of each answered 200
/// and `None` for each refused; a refusal must carry the errcode `refused`.
pub async fn race<F>(requests: impl IntoIterator<Item = F>, refused: &str) -> Vec<Option<Value>>
where
    F: std::future::Future<Output = (StatusCode, Value)> + Send + 'static,
{
    let tasks: Vec<_> = requests.into_iter().map(tokio::spawn).collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (status, body) = task.await.expect("request task");
        if status == StatusCode::OK {
            answers.push(Some(body));
        } else {
            assert_eq!(errcode(&body), refused, "{body}");
            answers.push(None);
        }
    }
    answers
}
