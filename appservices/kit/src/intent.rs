//! Acting on the homeserver as the appservice's bot or one of its ghosts: every request
//! carries the `as_token` and names the user with `?user_id=` (masquerading).

use std::time::Duration;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value as JsonValue, json};

use crate::store::Store;

/// A homeserver error, as the client-server API reports it.
#[derive(Debug)]
pub struct MatrixError {
    pub status: u16,
    pub errcode: String,
    pub error: String,
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.errcode, self.error)
    }
}

impl std::error::Error for MatrixError {}

/// Whether an error is the homeserver's `errcode`.
pub fn is_errcode(e: &anyhow::Error, errcode: &str) -> bool {
    e.downcast_ref::<MatrixError>()
        .is_some_and(|m| m.errcode == errcode)
}

pub(crate) fn enc(s: &str) -> String {
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

/// A JSON answer of the homeserver: its body on success, else its Matrix error.
async fn json_answer(res: reqwest::Response) -> anyhow::Result<JsonValue> {
    let status = res.status().as_u16();
    let value: JsonValue = res.json().await.unwrap_or(JsonValue::Null);
    if (200..300).contains(&status) {
        return Ok(value);
    }
    Err(MatrixError {
        status,
        errcode: value["errcode"].as_str().unwrap_or("M_UNKNOWN").to_owned(),
        error: value["error"].as_str().unwrap_or_default().to_owned(),
    }
    .into())
}

/// The homeserver, as the appservice reaches it.
#[derive(Clone)]
pub struct Homeserver {
    http: reqwest::Client,
    base: String,
    as_token: String,
    pub server_name: ruma::OwnedServerName,
    store: Store,
}

impl Homeserver {
    pub fn new(
        base: &str,
        as_token: &str,
        server_name: ruma::OwnedServerName,
        store: Store,
    ) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_owned(),
            as_token: as_token.to_owned(),
            server_name,
            store,
        }
    }

    /// Act as `user` (the bot or a ghost).
    pub fn intent(&self, user: &UserId) -> Intent {
        Intent {
            hs: self.clone(),
            user_id: user.to_owned(),
        }
    }

    /// A user id on the homeserver's domain.
    pub fn user_id(&self, localpart: &str) -> anyhow::Result<OwnedUserId> {
        Ok(UserId::parse_with_server_name(
            localpart,
            &self.server_name,
        )?)
    }
}

/// One user the appservice acts as.
#[derive(Clone)]
pub struct Intent {
    hs: Homeserver,
    pub user_id: OwnedUserId,
}

impl Intent {
    /// A client-server API request as this user.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&JsonValue>,
    ) -> anyhow::Result<JsonValue> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!(
            "{}{path}{sep}user_id={}",
            self.hs.base,
            enc(self.user_id.as_str())
        );
        let mut req = self
            .hs
            .http
            .request(method, url)
            .bearer_auth(&self.hs.as_token);
        if let Some(b) = body {
            req = req.json(b);
        }
        json_answer(req.send().await?).await
    }

    /// Register the user (once; remembered in the store).
    pub async fn ensure_registered(&self) -> anyhow::Result<()> {
        let key = format!("kit:registered:{}", self.user_id);
        if self.hs.store.get(&key)?.is_some() {
            return Ok(());
        }
        let body = json!({
            "type": "m.login.application_service",
            "username": self.user_id.localpart(),
            "inhibit_login": true,
        });
        match self.raw_post("/_matrix/client/v3/register", &body).await {
            Ok(_) => {}
            Err(e) if is_errcode(&e, "M_USER_IN_USE") => {}
            Err(e) => return Err(e),
        }
        self.hs.store.put(&key, b"1")
    }

    /// POST without `?user_id=` (registration names the user in the body).
    async fn raw_post(&self, path: &str, body: &JsonValue) -> anyhow::Result<JsonValue> {
        let res = self
            .hs
            .http
            .post(format!("{}{path}", self.hs.base))
            .bearer_auth(&self.hs.as_token)
            .json(body)
            .send()
            .await?;
        json_answer(res).await
    }

    /// Set the display name, when it differs from the one last set.
    pub async fn ensure_display_name(&self, name: &str) -> anyhow::Result<()> {
        let key = format!("kit:displayname:{}", self.user_id);
        if self.hs.store.get(&key)?.as_deref() == Some(name.as_bytes()) {
            return Ok(());
        }
        self.ensure_registered().await?;
        self.request(
            reqwest::Method::PUT,
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                enc(self.user_id.as_str())
            ),
            Some(&json!({ "displayname": name })),
        )
        .await?;
        self.hs.store.put(&key, name.as_bytes())
    }

    /// Join a room (registering first when needed).
    pub async fn ensure_joined(&self, room: &RoomId) -> anyhow::Result<()> {
        self.ensure_registered().await?;
        self.request(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/join", enc(room.as_str())),
            Some(&json!({})),
        )
        .await?;
        Ok(())
    }

    pub async fn leave(&self, room: &RoomId) -> anyhow::Result<()> {
        self.request(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/leave", enc(room.as_str())),
            Some(&json!({})),
        )
        .await?;
        Ok(())
    }

    pub async fn invite(&self, room: &RoomId, user: &UserId) -> anyhow::Result<()> {
        self.request(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(room.as_str())),
            Some(&json!({ "user_id": user })),
        )
        .await?;
        Ok(())
    }

    /// Send a message event; the transaction id makes a retry of the same call safe.
    pub async fn send(
        &self,
        room: &RoomId,
        event_type: &str,
        content: &JsonValue,
        txn_id: Option<&str>,
    ) -> anyhow::Result<OwnedEventId> {
        let txn = txn_id
            .map(str::to_owned)
            .unwrap_or_else(crate::registration::random_token);
        let v = self
            .request(
                reqwest::Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/{}/{}",
                    enc(room.as_str()),
                    enc(event_type),
                    enc(&txn)
                ),
                Some(content),
            )
            .await?;
        Ok(OwnedEventId::try_from(
            v["event_id"].as_str().unwrap_or_default(),
        )?)
    }

    pub async fn send_text(&self, room: &RoomId, text: &str) -> anyhow::Result<OwnedEventId> {
        self.send(
            room,
            "m.room.message",
            &json!({ "msgtype": "m.text", "body": text }),
            None,
        )
        .await
    }

    /// A notice with an HTML body (bots answer with notices, which never notify).
    pub async fn send_notice(
        &self,
        room: &RoomId,
        text: &str,
        html: Option<&str>,
    ) -> anyhow::Result<OwnedEventId> {
        let mut content = json!({ "msgtype": "m.notice", "body": text });
        if let Some(html) = html {
            content["format"] = json!("org.matrix.custom.html");
            content["formatted_body"] = json!(html);
        }
        self.send(room, "m.room.message", &content, None).await
    }

    /// The content of a state event of a room.
    pub async fn state(
        &self,
        room: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> anyhow::Result<JsonValue> {
        self.request(
            reqwest::Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/{}/{}",
                enc(room.as_str()),
                enc(event_type),
                enc(state_key)
            ),
            None,
        )
        .await
    }

    pub async fn send_state(
        &self,
        room: &RoomId,
        event_type: &str,
        state_key: &str,
        content: &JsonValue,
    ) -> anyhow::Result<OwnedEventId> {
        let v = self
            .request(
                reqwest::Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/state/{}/{}",
                    enc(room.as_str()),
                    enc(event_type),
                    enc(state_key)
                ),
                Some(content),
            )
            .await?;
        Ok(OwnedEventId::try_from(
            v["event_id"].as_str().unwrap_or_default(),
        )?)
    }

    /// Upload a file to the media repository; returns its `mxc://` URI.
    pub async fn upload(
        &self,
        bytes: Vec<u8>,
        mime: &str,
        filename: &str,
    ) -> anyhow::Result<String> {
        self.ensure_registered().await?;
        let url = format!(
            "{}/_matrix/media/v3/upload?filename={}&user_id={}",
            self.hs.base,
            enc(filename),
            enc(self.user_id.as_str())
        );
        let res = self
            .hs
            .http
            .post(url)
            .bearer_auth(&self.hs.as_token)
            .header(reqwest::header::CONTENT_TYPE, mime)
            .body(bytes)
            .send()
            .await?;
        let value = json_answer(res).await?;
        value["content_uri"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("the upload answer has no content_uri"))
    }

    /// Download a file of the media repository (authenticated media), with its type.
    pub async fn download(&self, mxc: &str) -> anyhow::Result<(Vec<u8>, String)> {
        let rest = mxc
            .strip_prefix("mxc://")
            .ok_or_else(|| anyhow::anyhow!("not an mxc URI: {mxc}"))?;
        let (server, id) = rest
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("not an mxc URI: {mxc}"))?;
        let url = format!(
            "{}/_matrix/client/v1/media/download/{}/{}?user_id={}",
            self.hs.base,
            enc(server),
            enc(id),
            enc(self.user_id.as_str())
        );
        let res = self
            .hs
            .http
            .get(url)
            .bearer_auth(&self.hs.as_token)
            .send()
            .await?;
        if !res.status().is_success() {
            return Err(json_answer(res)
                .await
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the download failed without a Matrix error")));
        }
        let mime = res
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        Ok((res.bytes().await?.to_vec(), mime))
    }

    /// The room an alias points to, if any.
    pub async fn resolve_alias(&self, alias: &str) -> anyhow::Result<Option<OwnedRoomId>> {
        match self
            .request(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/directory/room/{}", enc(alias)),
                None,
            )
            .await
        {
            Ok(v) => Ok(Some(OwnedRoomId::try_from(
                v["room_id"].as_str().unwrap_or_default(),
            )?)),
            Err(e) if is_errcode(&e, "M_NOT_FOUND") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A user's profile (`displayname`, `avatar_url`); `None` when there is no such user.
    pub async fn profile(&self, user: &UserId) -> anyhow::Result<Option<JsonValue>> {
        match self
            .request(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/profile/{}", enc(user.as_str())),
                None,
            )
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_errcode(&e, "M_NOT_FOUND") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create a room (a portal) with the given `createRoom` body.
    pub async fn create_room(&self, body: &JsonValue) -> anyhow::Result<OwnedRoomId> {
        self.ensure_registered().await?;
        let v = self
            .request(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(body),
            )
            .await?;
        Ok(OwnedRoomId::try_from(
            v["room_id"].as_str().unwrap_or_default(),
        )?)
    }
}
