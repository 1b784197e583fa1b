//! The bridge's rules: where an inbound mail goes (its thread's room, a mailbox room's
//! thread, or a new room), who is in it, what staff write that goes out by mail, and the
//! `!email` commands.

use std::{sync::Arc, time::Duration};

use salon_appservice_kit::{
    Command, Commands, Event, Handler, Intent, Kit, Param,
    bridge::{BRIDGE_EVENT_TYPES, BridgeInfo},
    is_errcode,
    ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId},
    store::Batch,
};
use serde_json::{Value as JsonValue, json};
use sha2::{Digest, Sha256};

use crate::{
    address::{self, GHOST_PREFIX},
    config::EmailConfig,
    content,
    outbound::{self, Draft, Outgoing, Queue},
    parse::{self, Kind, Mail, Person},
    portal::{self, Bridged, Conversation, Portals},
    smtp::{Recipients, Verdict},
    spool::{Spool, Spooled},
};

pub const BOT_LOCALPART: &str = "email";
const SPACE_KEY: &str = "space";
const KNOWN_USER: &str = "user:";

pub fn commands() -> Commands {
    let address = |description| Param {
        key: "address",
        kind: "string",
        description,
        required: true,
    };
    Commands::new(
        "!email ",
        vec![
            Command {
                name: "new",
                params: vec![
                    address("The outside address to write to"),
                    Param {
                        key: "subject",
                        kind: "string",
                        description: "The subject of the thread",
                        required: true,
                    },
                ],
                description: "Start an email thread in a new room; what you write there is mailed",
            },
            Command {
                name: "add",
                params: vec![address("The outside address to add")],
                description: "Add someone outside to this room's (or this thread's) email thread",
            },
            Command {
                name: "remove",
                params: vec![address("The outside address to remove")],
                description: "Stop mailing someone outside from this room (or thread)",
            },
            Command {
                name: "address",
                params: vec![Param {
                    key: "name",
                    kind: "string",
                    description: "The part before the @",
                    required: true,
                }],
                description: "Give this room a mailbox address: each new mail to it starts a thread here",
            },
            Command {
                name: "participants",
                params: vec![],
                description: "Who outside gets what is written here, and the reply address",
            },
        ],
    )
}

/// What the bridge shares between the listener, the workers and the event handler.
pub struct Shared {
    pub config: EmailConfig,
    /// The mail domain.
    pub domain: String,
    pub portals: Portals,
    pub spool: Spool,
    pub queue: Queue,
    /// Conversations are read, changed and written under this lock.
    pub lock: tokio::sync::Mutex<()>,
    pub dkim: Option<outbound::Signer>,
    pub directory: Option<crate::StaffDirectory>,
}

impl Shared {
    /// The localpart of the member of staff an address belongs to, by the directory
    /// (any domain), else by its local part when it is in the mail domain.
    fn staff_localpart(&self, addr: &str) -> Option<String> {
        if let Some(local) = self.directory.as_ref().and_then(|d| d(addr)) {
            return Some(local);
        }
        self.ours(addr).then(|| address::local_of(addr).to_owned())
    }

    /// Someone outside: not the mail domain and no member of staff.
    fn external(&self, addr: &str) -> bool {
        !self.ours(addr) && self.directory.as_ref().and_then(|d| d(addr)).is_none()
    }

    fn reply_address(&self, c: &Conversation) -> String {
        format!("reply+{}@{}", c.reply_token, self.domain)
    }

    fn ours(&self, addr: &str) -> bool {
        address::domain_of(addr) == self.domain
    }
}

fn is_ghost(user: &UserId) -> bool {
    user.localpart().starts_with(GHOST_PREFIX)
}

fn ghost_id(kit: &Kit, addr: &str) -> anyhow::Result<OwnedUserId> {
    kit.homeserver.user_id(&address::ghost_localpart(addr))
}

/// A transaction id derived from a mail, so a retried bridging sends nothing twice.
fn txn_for(message_id: &str, n: usize) -> String {
    format!(
        "mail.{}.{n}",
        hex::encode(&Sha256::digest(message_id.as_bytes())[..12])
    )
}

fn alias_for(message_id: &str) -> String {
    format!(
        "_email_t_{}",
        hex::encode(&Sha256::digest(message_id.as_bytes())[..12])
    )
}

/// A Matrix localpart a mail local part can name.
fn valid_localpart(local: &str) -> bool {
    !local.is_empty()
        && local.len() <= 255
        && local
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b))
}

/// Checks `RCPT TO` against reply addresses, mailbox rooms and accounts.
pub struct Rcpt {
    pub shared: Arc<Shared>,
    pub kit: Arc<Kit>,
}

impl Recipients for Rcpt {
    async fn check(&self, addr: &str) -> Verdict {
        let local = address::local_of(addr);
        let lookup = || -> anyhow::Result<Option<Verdict>> {
            if let Some(token) = local.strip_prefix("reply+") {
                return Ok(Some(
                    if self.shared.portals.by_reply_token(token)?.is_some() {
                        Verdict::Accept
                    } else {
                        Verdict::Unknown
                    },
                ));
            }
            if self.shared.portals.mailbox_room(local)?.is_some() {
                return Ok(Some(Verdict::Accept));
            }
            if self
                .kit
                .store
                .get(format!("{KNOWN_USER}{local}"))?
                .is_some()
            {
                return Ok(Some(Verdict::Accept));
            }
            Ok(None)
        };
        match lookup() {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "the bridge store is unreadable");
                return Verdict::Later;
            }
        }
        let resolved = self
            .shared
            .staff_localpart(addr)
            .unwrap_or_else(|| local.to_owned());
        let local = resolved.as_str();
        if !valid_localpart(local) || local.starts_with(GHOST_PREFIX) || local == BOT_LOCALPART {
            return Verdict::Unknown;
        }
        let Ok(user) = self.kit.homeserver.user_id(local) else {
            return Verdict::Unknown;
        };
        match self.kit.bot.profile(&user).await {
            Ok(Some(_)) => {
                let _ = self.kit.store.put(format!("{KNOWN_USER}{local}"), b"1");
                Verdict::Accept
            }
            Ok(None) => Verdict::Unknown,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a recipient with the homeserver");
                Verdict::Later
            }
        }
    }
}

/// The staff account an address of our domain belongs to, if any.
async fn local_user(shared: &Shared, kit: &Kit, addr: &str) -> Option<OwnedUserId> {
    let local = shared.staff_localpart(addr)?;
    let local = local.as_str();
    if local.starts_with("reply+") || !valid_localpart(local) || local.starts_with(GHOST_PREFIX) {
        return None;
    }
    if shared.ours(addr)
        && shared
            .portals
            .mailbox_room(address::local_of(addr))
            .ok()
            .flatten()
            .is_some()
    {
        return None;
    }
    let user = kit.homeserver.user_id(local).ok()?;
    if kit
        .store
        .get(format!("{KNOWN_USER}{local}"))
        .ok()
        .flatten()
        .is_some()
    {
        return Some(user);
    }
    match kit.bot.profile(&user).await {
        Ok(Some(_)) => {
            let _ = kit.store.put(format!("{KNOWN_USER}{local}"), b"1");
            Some(user)
        }
        _ => None,
    }
}

/// Bridge spooled mail into rooms, oldest first, until told to stop. A message that
/// cannot be bridged because the homeserver is unreachable waits (and those behind it).
pub async fn run_inbound(
    kit: Arc<Kit>,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(200);
    let mut failures = 0u32;
    loop {
        let notified = shared.spool.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut retry_in = None;
        loop {
            if *stop.borrow() {
                return;
            }
            let next = match shared.spool.oldest() {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "the spool is unreadable");
                    retry_in = Some(Duration::from_secs(5));
                    break;
                }
            };
            let Some(m) = next else { break };
            match bridge_one(&kit, &shared, &m).await {
                Ok(()) => {
                    delay = Duration::from_millis(200);
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    let unreachable = e.downcast_ref::<reqwest::Error>().is_some()
                        || e.downcast_ref::<salon_appservice_kit::MatrixError>()
                            .is_some_and(|m| m.status >= 500 || m.status == 429);
                    if !unreachable && failures >= 5 {
                        tracing::error!(queue_id = %m.id, error = %e, "cannot bridge a mail; set aside in the store");
                        let _ = shared.spool.set_aside(&m);
                        failures = 0;
                        continue;
                    }
                    tracing::warn!(queue_id = %m.id, error = %e, "cannot bridge a mail yet; will retry");
                    retry_in = Some(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                    break;
                }
            }
        }
        let sleep = tokio::time::sleep(retry_in.unwrap_or(Duration::from_secs(3600)));
        tokio::select! {
            _ = &mut notified, if retry_in.is_none() => {}
            _ = sleep => {}
            _ = stop.changed() => return,
        }
    }
}

/// Where a mail belongs, by its reply address or its threading headers.
fn known_conversation(
    shared: &Shared,
    m: &Spooled,
    mail: &Mail,
) -> anyhow::Result<Option<Conversation>> {
    for rcpt in &m.envelope.rcpts {
        if let Some(token) = address::local_of(rcpt).strip_prefix("reply+")
            && let Some(c) = shared.portals.by_reply_token(token)?
        {
            return Ok(Some(c));
        }
    }
    for id in mail.in_reply_to.iter().chain(mail.references.iter().rev()) {
        if let Some(b) = shared.portals.bridged(id)?
            && let Some(c) = shared.portals.get(&b.conversation)?
        {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

async fn bridge_one(kit: &Kit, shared: &Shared, m: &Spooled) -> anyhow::Result<()> {
    let mut mail = parse::parse(&m.raw);
    if shared.portals.bridged(&mail.message_id)?.is_some() {
        tracing::info!(message_id = %mail.message_id, "mail already bridged; dropping the copy");
        return shared.spool.done(&m.key, Batch::default());
    }
    if mail.from.is_none() && !m.envelope.mail_from.is_empty() {
        mail.from = Some(Person {
            address: m.envelope.mail_from.clone(),
            name: None,
        });
    }
    let _guard = shared.lock.lock().await;
    if m.envelope.quarantine {
        return quarantine(kit, shared, m, &mail).await;
    }
    if let Kind::Bounce { failed } = &mail.kind {
        return bridge_bounce(kit, shared, m, &mail, failed).await;
    }
    // (conversation, whether the mail starts a thread in a mailbox room)
    let mut targets: Vec<(Conversation, bool)> = Vec::new();
    if let Some(c) = known_conversation(shared, m, &mail)? {
        targets.push((c, false));
    } else {
        // Mail to a room's mailbox starts a thread there; mail to people starts a room.
        let mut people = Vec::new();
        for rcpt in &m.envelope.rcpts {
            let local = address::local_of(rcpt);
            if let Some(room) = shared.portals.mailbox_room(local)? {
                let conv = Conversation {
                    room_id: room,
                    thread_root: None,
                    subject: mail.subject.clone(),
                    reply_token: portal::new_reply_token(),
                    ..Default::default()
                };
                targets.push((conv, true));
            } else if let Some(local) = shared.staff_localpart(rcpt)
                && let Ok(user) = kit.homeserver.user_id(&local)
            {
                people.push(user);
            }
        }
        if !people.is_empty() || targets.is_empty() {
            let room = new_room(kit, shared, &mail, &people).await?;
            let conv = Conversation {
                room_id: room.to_string(),
                thread_root: None,
                subject: mail.subject.clone(),
                reply_token: portal::new_reply_token(),
                ..Default::default()
            };
            targets.push((conv, false));
            // Everyone named in the headers who is staff is in the room too.
            for p in mail.to.iter().chain(mail.cc.iter()) {
                if let Some(user) = local_user(shared, kit, &p.address).await
                    && !people.contains(&user)
                {
                    let _ = kit.bot.invite(&room, &user).await;
                }
            }
        }
    }
    let mut batch = Batch::default();
    for (n, (mut conv, starts_thread)) in targets.into_iter().enumerate() {
        for p in mail.from.iter().chain(mail.to.iter()).chain(mail.cc.iter()) {
            if shared.external(&p.address) {
                conv.add_external(p);
            }
        }
        let event_id = post(kit, shared, &conv, &mail, n, starts_thread).await?;
        if starts_thread {
            conv.thread_root = Some(event_id.clone());
        }
        conv.remember(&mail.message_id);
        shared.portals.put(&mut batch, &conv)?;
        shared.portals.mark(
            &mut batch,
            &mail.message_id,
            &Bridged {
                conversation: conv.key(),
                event_id,
            },
        )?;
    }
    tracing::info!(message_id = %mail.message_id, queue_id = %m.id, "mail bridged");
    shared.spool.done(&m.key, batch)
}

async fn bridge_bounce(
    kit: &Kit,
    shared: &Shared,
    m: &Spooled,
    mail: &Mail,
    failed: &[String],
) -> anyhow::Result<()> {
    // The bounce quotes the original's headers; its Message-ID finds the room.
    let mut conv = known_conversation(shared, m, mail)?;
    if conv.is_none() {
        for a in &mail.attachments {
            let inner = parse::parse(&a.bytes);
            if let Some(b) = shared.portals.bridged(&inner.message_id)? {
                conv = shared.portals.get(&b.conversation)?;
                break;
            }
        }
    }
    let Some(conv) = conv else {
        tracing::info!(message_id = %mail.message_id, "a bounce for no known thread; dropped");
        return shared.spool.done(&m.key, Batch::default());
    };
    let room = RoomId::parse(&conv.room_id)?;
    let who = if failed.is_empty() {
        "a recipient".to_owned()
    } else {
        failed.join(", ")
    };
    let mut content = json!({
        "msgtype": "m.notice",
        "body": format!("Mail to {who} could not be delivered ({}).", mail.subject),
    });
    thread_relation(&mut content, &conv);
    kit.bot
        .send(
            &room,
            "m.room.message",
            &content,
            Some(&txn_for(&mail.message_id, 0)),
        )
        .await?;
    done_as_notice(shared, m, &mail.message_id, conv.key())
}

/// Mail that failed its domain's DMARC policy: shown to the reviewers, whole, in the
/// review room, and to nobody else.
async fn quarantine(kit: &Kit, shared: &Shared, m: &Spooled, mail: &Mail) -> anyhow::Result<()> {
    let alias_local = "_email_review";
    let room = match kit
        .bot
        .resolve_alias(&format!("#{alias_local}:{}", kit.homeserver.server_name))
        .await?
    {
        Some(r) => r,
        None => {
            kit.bot
                .create_room(&json!({
                    "name": "Email review",
                    "topic": "Mail that failed its sender's DMARC policy; nobody else has seen it",
                    "preset": "private_chat",
                    "room_alias_name": alias_local,
                    "invite": shared.config.auth.reviewers,
                }))
                .await?
        }
    };
    let from = mail
        .from
        .as_ref()
        .map(|p| p.address.clone())
        .unwrap_or_else(|| m.envelope.mail_from.clone());
    let text = format!(
        "Quarantined: mail from {from} to {} failed DMARC (“{}”). The message is attached as it arrived.",
        m.envelope.rcpts.join(", "),
        mail.subject
    );
    let notice = json!({ "msgtype": "m.notice", "body": text });
    kit.bot
        .send(
            &room,
            "m.room.message",
            &notice,
            Some(&txn_for(&mail.message_id, 0)),
        )
        .await?;
    let mxc = kit
        .bot
        .upload(m.raw.clone(), "message/rfc822", "quarantined.eml")
        .await?;
    let file = json!({
        "msgtype": "m.file",
        "body": "quarantined.eml",
        "url": mxc,
        "info": { "mimetype": "message/rfc822", "size": m.raw.len() },
    });
    kit.bot
        .send(
            &room,
            "m.room.message",
            &file,
            Some(&txn_for(&mail.message_id, 1)),
        )
        .await?;
    done_as_notice(shared, m, &mail.message_id, format!("quarantine:{room}"))
}

/// Take a mail the bot answered with notices (a bounce, a quarantine) out of the spool,
/// recorded as bridged so a copy is not handled again.
fn done_as_notice(
    shared: &Shared,
    m: &Spooled,
    message_id: &str,
    conversation: String,
) -> anyhow::Result<()> {
    let mut batch = Batch::default();
    let bridged = Bridged {
        conversation,
        event_id: String::new(),
    };
    shared.portals.mark(&mut batch, message_id, &bridged)?;
    shared.spool.done(&m.key, batch)
}

fn thread_relation(content: &mut JsonValue, conv: &Conversation) {
    if let Some(root) = &conv.thread_root {
        content["m.relates_to"] = json!({
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": true,
            "m.in_reply_to": { "event_id": root },
        });
    }
}

/// The "Email" space new rooms go in (made once; its alias makes a retry find it).
async fn space(kit: &Kit, shared: &Shared) -> anyhow::Result<OwnedRoomId> {
    if let Some(v) = kit.store.get(SPACE_KEY)? {
        return Ok(OwnedRoomId::try_from(String::from_utf8_lossy(&v).as_ref())?);
    }
    let alias_local = "_email_space";
    let body = json!({
        "name": shared.config.inbound.space_name,
        "topic": "Email threads bridged into rooms",
        "preset": "private_chat",
        "room_alias_name": alias_local,
        "creation_content": { "type": "m.space" },
        "power_level_content_override": { "events_default": 100, "invite": 0 },
    });
    let room = create_aliased(kit, &body, alias_local).await?;
    kit.store.put(SPACE_KEY, room.as_str())?;
    Ok(room)
}

/// Create a room with an alias of ours; when the alias exists already (a retry after a
/// crash), the room it names.
async fn create_aliased(
    kit: &Kit,
    body: &JsonValue,
    alias_local: &str,
) -> anyhow::Result<OwnedRoomId> {
    match kit.bot.create_room(body).await {
        Ok(r) => Ok(r),
        Err(e) if is_errcode(&e, "M_ROOM_IN_USE") => {
            let alias = format!("#{alias_local}:{}", kit.homeserver.server_name);
            kit.bot
                .resolve_alias(&alias)
                .await?
                .ok_or_else(|| anyhow::anyhow!("the alias {alias} points nowhere"))
        }
        Err(e) => Err(e),
    }
}

/// A portal room in the Email space: `body` (a `createRoom` body, with an alias of ours
/// when a retry must find the same room) gets the bridge info and the space parent; the
/// room becomes the space's child, the staff in `people` are invited to the space, and
/// the bot publishes its commands there.
async fn create_portal(
    kit: &Kit,
    shared: &Shared,
    info: &BridgeInfo<'_>,
    mut body: JsonValue,
    people: &[&UserId],
) -> anyhow::Result<OwnedRoomId> {
    let space = space(kit, shared).await?;
    let (state_key, bridge) = info.state();
    let mut initial_state: Vec<JsonValue> = BRIDGE_EVENT_TYPES
        .iter()
        .map(|t| json!({ "type": t, "state_key": state_key, "content": bridge }))
        .collect();
    initial_state.push(json!({
        "type": "m.space.parent",
        "state_key": space,
        "content": { "via": [kit.homeserver.server_name], "canonical": true },
    }));
    body["preset"] = json!("private_chat");
    body["initial_state"] = json!(initial_state);
    let room = match body["room_alias_name"].as_str().map(str::to_owned) {
        Some(alias_local) => create_aliased(kit, &body, &alias_local).await?,
        None => kit.bot.create_room(&body).await?,
    };
    kit.bot
        .send_state(
            &space,
            "m.space.child",
            room.as_str(),
            &json!({ "via": [kit.homeserver.server_name] }),
        )
        .await?;
    for user in people {
        let _ = kit.bot.invite(&space, user).await;
    }
    kit.publish_commands(&room).await;
    Ok(room)
}

/// A room for a new email thread: named after the subject, in the space, bridge info set,
/// the staff recipients invited. Its alias comes from the Message-ID, so bridging the
/// same mail again after a crash finds the room instead of making another.
async fn new_room(
    kit: &Kit,
    shared: &Shared,
    mail: &Mail,
    people: &[OwnedUserId],
) -> anyhow::Result<OwnedRoomId> {
    let info = BridgeInfo {
        bot: kit.bot_id(),
        creator: None,
        protocol: ("email", "Email"),
        channel: (&mail.message_id, &mail.subject),
    };
    let from = mail
        .from
        .as_ref()
        .map(|p| p.address.clone())
        .unwrap_or_default();
    let body = json!({
        "name": mail.subject,
        "topic": format!("Email thread with {from}"),
        "room_alias_name": alias_for(&mail.message_id),
        "invite": people,
    });
    let people: Vec<&UserId> = people.iter().map(|u| &**u).collect();
    create_portal(kit, shared, &info, body, &people).await
}

/// A ghost for an outside person, with their name, joined to the room.
async fn ghost_in(kit: &Kit, room: &RoomId, p: &Person) -> anyhow::Result<Intent> {
    let ghost = kit.ghost(&ghost_id(kit, &p.address)?);
    ghost.ensure_registered().await?;
    ghost.ensure_display_name(&p.display()).await?;
    if let Err(e) = ghost.ensure_joined(room).await {
        // A private room: the bot invites first.
        if let Err(ie) = kit.bot.invite(room, &ghost.user_id).await
            && !is_errcode(&ie, "M_FORBIDDEN")
        {
            return Err(ie);
        }
        ghost.ensure_joined(room).await.map_err(|_| e)?;
    }
    Ok(ghost)
}

/// Send the mail's text and files into its conversation as the sender's ghost; returns
/// the first event's id (the thread root when the mail starts a thread).
async fn post(
    kit: &Kit,
    shared: &Shared,
    conv: &Conversation,
    mail: &Mail,
    target: usize,
    starts_thread: bool,
) -> anyhow::Result<String> {
    let room = RoomId::parse(&conv.room_id)?;
    let sender = mail.from.clone().unwrap_or(Person {
        address: "unknown@invalid".to_owned(),
        name: Some("Unknown sender".to_owned()),
    });
    // Everyone outside in the thread is present in the room.
    for e in &conv.externals {
        if e.address != sender.address {
            let p = Person {
                address: e.address.clone(),
                name: e.name.clone(),
            };
            ghost_in(kit, &room, &p).await?;
        }
    }
    let ghost = ghost_in(kit, &room, &sender).await?;
    let trim = shared.config.inbound.trim_quotes;
    let mut text = if trim {
        content::trim_text_quote(&mail.text).to_owned()
    } else {
        mail.text.trim_end().to_owned()
    };
    let mut html = mail.html.as_deref().map(|h| {
        let h = if trim { content::trim_html_quote(h) } else { h };
        content::sanitise_html(h)
    });
    if text.trim().is_empty() {
        text = html
            .as_deref()
            .map(content::html_to_text)
            .unwrap_or_default();
    }
    text.retain(|c| c == '\n' || c == '\t' || !c.is_control());
    if starts_thread {
        // The root of a thread in a mailbox room names the subject.
        text = format!("{}\n\n{text}", mail.subject);
        html = html.map(|h| {
            format!(
                "<p><b>{}</b></p>{h}",
                salon_appservice_kit::commands::escape(&mail.subject)
            )
        });
    }
    let msgtype = if mail.kind == Kind::AutoReply {
        "m.notice"
    } else {
        "m.text"
    };
    let mut conv = conv.clone();
    let mut first: Option<String> = None;
    let mut n = target * 1000;
    if !text.trim().is_empty() || mail.attachments.is_empty() {
        let mut c = json!({ "msgtype": msgtype, "body": text });
        if let Some(h) = html.filter(|h| !h.is_empty()) {
            c["format"] = json!("org.matrix.custom.html");
            c["formatted_body"] = json!(h);
        }
        thread_relation(&mut c, &conv);
        let txn = txn_for(&mail.message_id, n);
        let id = ghost.send(&room, "m.room.message", &c, Some(&txn)).await?;
        first = Some(id.to_string());
    }
    for a in &mail.attachments {
        n += 1;
        if starts_thread && let Some(root) = &first {
            conv.thread_root = Some(root.clone());
        }
        let mxc = match ghost.upload(a.bytes.clone(), &a.mime, &a.filename).await {
            Ok(mxc) => mxc,
            Err(e) if is_errcode(&e, "M_TOO_LARGE") => {
                // Said in the room rather than retried for ever.
                let mut c = json!({
                    "msgtype": "m.notice",
                    "body": format!(
                        "The attachment {} ({} bytes) is larger than this server keeps.",
                        a.filename,
                        a.bytes.len()
                    ),
                });
                thread_relation(&mut c, &conv);
                let txn = txn_for(&mail.message_id, n);
                let id = ghost.send(&room, "m.room.message", &c, Some(&txn)).await?;
                first.get_or_insert(id.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        let msgtype = match a.mime.split('/').next() {
            Some("image") => "m.image",
            Some("video") => "m.video",
            Some("audio") => "m.audio",
            _ => "m.file",
        };
        let mut c = json!({
            "msgtype": msgtype,
            "body": a.filename,
            "filename": a.filename,
            "url": mxc,
            "info": { "mimetype": a.mime, "size": a.bytes.len() },
        });
        thread_relation(&mut c, &conv);
        let txn = txn_for(&mail.message_id, n);
        let id = ghost.send(&room, "m.room.message", &c, Some(&txn)).await?;
        first.get_or_insert(id.to_string());
    }
    first.ok_or_else(|| anyhow::anyhow!("nothing to post"))
}

/// The bridge as an appservice: what staff write in bridged rooms, and commands.
pub struct EmailHandler {
    pub shared: Arc<Shared>,
}

impl Handler for EmailHandler {
    async fn on_event(&self, kit: &Kit, event: &Event) -> anyhow::Result<()> {
        if event.kind() != "m.room.message" {
            return Ok(());
        }
        let (Some(sender), Some(room)) = (event.sender(), event.room_id()) else {
            return Ok(());
        };
        if is_ghost(&sender) || sender.as_str() == kit.bot_id().as_str() {
            return Ok(());
        }
        if let Some(commands) = &kit.commands
            && let Some(inv) = commands.parse(event.content())
        {
            return self.command(kit, &room, &sender, event, &inv).await;
        }
        self.outbound(kit, &room, &sender, event).await
    }

    async fn query_user(&self, _kit: &Kit, user: &str) -> bool {
        // Ghosts exist for any outside address.
        UserId::parse(user)
            .ok()
            .and_then(|u| address::address_of_ghost(u.localpart()))
            .is_some_and(|a| !self.shared.ours(&a))
    }
}

/// `m.relates_to` thread root of an event, if it is in a thread.
fn thread_of(event: &Event) -> Option<String> {
    let rel = event.content().get("m.relates_to")?;
    (rel.get("rel_type")?.as_str()? == "m.thread")
        .then(|| rel.get("event_id")?.as_str().map(str::to_owned))
        .flatten()
}

/// The text of a reply without its quoted fallback (`> ` lines, `<mx-reply>`).
fn strip_reply_fallback(content: &JsonValue) -> (String, Option<String>) {
    let body = content["body"].as_str().unwrap_or_default();
    let is_reply = content
        .get("m.relates_to")
        .and_then(|r| r.get("m.in_reply_to"))
        .is_some();
    let text = if is_reply && body.starts_with("> ") {
        body.split_once("\n\n").map(|(_, t)| t).unwrap_or(body)
    } else {
        body
    };
    let html = (content["format"].as_str() == Some("org.matrix.custom.html"))
        .then(|| content["formatted_body"].as_str())
        .flatten()
        .map(|h| match (h.find("<mx-reply>"), h.find("</mx-reply>")) {
            (Some(a), Some(b)) if a < b => format!("{}{}", &h[..a], &h[b + "</mx-reply>".len()..]),
            _ => h.to_owned(),
        });
    (text.to_owned(), html)
}

impl EmailHandler {
    async fn display_name(&self, kit: &Kit, user: &UserId) -> String {
        match kit.bot.profile(user).await {
            Ok(Some(p)) => p["displayname"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| user.localpart().to_owned()),
            _ => user.localpart().to_owned(),
        }
    }

    /// Mail what staff wrote to the conversation's people outside.
    async fn outbound(
        &self,
        kit: &Kit,
        room: &RoomId,
        sender: &UserId,
        event: &Event,
    ) -> anyhow::Result<()> {
        let shared = &self.shared;
        let Some(event_id) = event.event_id() else {
            return Ok(());
        };
        let _guard = shared.lock.lock().await;
        let key = portal::key(room.as_str(), thread_of(event).as_deref());
        let Some(mut conv) = shared.portals.get(&key)? else {
            return Ok(());
        };
        if conv.externals.is_empty() || shared.queue.contains(event_id)? {
            return Ok(());
        }
        let content = event.content();
        if content["m.relates_to"]["rel_type"] == "m.replace" {
            // An edit: the mail already went; mailing every correction would be noise.
            return Ok(());
        }
        let name = self.display_name(kit, sender).await;
        let msgtype = content["msgtype"].as_str().unwrap_or("m.text");
        let mut files = Vec::new();
        let (text, html) = match msgtype {
            "m.image" | "m.file" | "m.video" | "m.audio" => {
                let Some(url) = content["url"].as_str() else {
                    // Encrypted files cannot be mailed.
                    return Ok(());
                };
                let (bytes, mime) = kit.bot.download(url).await?;
                let filename = content["filename"]
                    .as_str()
                    .or(content["body"].as_str())
                    .map(parse::sanitise_filename)
                    .filter(|f| !f.is_empty())
                    .unwrap_or_else(|| "file".to_owned());
                let mime = content["info"]["mimetype"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or(mime);
                let text = format!("{name} sent a file: {filename}");
                files.push((filename, mime, bytes));
                (text, None)
            }
            "m.emote" => {
                let (t, _) = strip_reply_fallback(content);
                (format!("* {name} {t}"), None)
            }
            _ => strip_reply_fallback(content),
        };
        let subject = if conv.subject.to_ascii_lowercase().starts_with("re:") {
            conv.subject.clone()
        } else {
            format!("Re: {}", conv.subject)
        };
        let message_id = format!(
            "{}.salon@{}",
            hex::encode(&Sha256::digest(event_id.as_bytes())[..16]),
            shared.domain
        );
        let from_name = format!("{name} (Salon)");
        let reply_address = shared.reply_address(&conv);
        let raw = outbound::compose(&Draft {
            from_name: &from_name,
            from_address: &reply_address,
            to: conv
                .externals
                .iter()
                .map(|e| (e.name.clone(), e.address.clone()))
                .collect(),
            subject: &subject,
            message_id: &message_id,
            references: &conv.references,
            text: &text,
            html: html.as_deref(),
            files,
        })?;
        let raw = match &shared.dkim {
            Some(sign) => [sign(&raw)?.into_bytes(), raw].concat(),
            None => raw,
        };
        let out = Outgoing {
            room_id: room.to_string(),
            event_id: event_id.to_owned(),
            from: reply_address,
            rcpts: conv.externals.iter().map(|e| e.address.clone()).collect(),
            attempts: 0,
            first_attempt_ms: 0,
            next_attempt_ms: 0,
        };
        conv.remember(&message_id);
        let mut batch = Batch::default();
        shared.queue.enqueue(&mut batch, &out, &raw)?;
        shared.portals.put(&mut batch, &conv)?;
        shared.portals.mark(
            &mut batch,
            &message_id,
            &Bridged {
                conversation: conv.key(),
                event_id: event_id.to_owned(),
            },
        )?;
        kit.store.commit(batch)?;
        shared.queue.wake.notify_one();
        Ok(())
    }

    async fn command(
        &self,
        kit: &Kit,
        room: &RoomId,
        sender: &UserId,
        event: &Event,
        inv: &salon_appservice_kit::Invocation,
    ) -> anyhow::Result<()> {
        let shared = &self.shared;
        let reply =
            |text: String| async move { kit.bot.send_notice(room, &text, None).await.map(|_| ()) };
        let thread = thread_of(event);
        let key = portal::key(room.as_str(), thread.as_deref());
        match inv.command.as_str() {
            "help" => kit.reply_help(room, "Email bridge commands:").await,
            "new" => {
                let (Some(addr), Some(subject)) = (inv.arg(0, "address"), inv.arg(1, "subject"))
                else {
                    return reply("Usage: !email new <address> <subject>".into()).await;
                };
                let Some(addr) = address::normalise(&addr).filter(|a| !shared.ours(a)) else {
                    return reply(format!("{addr} is not an outside email address.")).await;
                };
                let _guard = shared.lock.lock().await;
                let info = BridgeInfo {
                    bot: kit.bot_id(),
                    creator: Some(sender),
                    protocol: ("email", "Email"),
                    channel: (&addr, &subject),
                };
                let body = json!({
                    "name": subject,
                    "topic": format!("Email thread with {addr}"),
                    "power_level_content_override": { "users": { sender: 100 } },
                });
                let new_room = create_portal(kit, shared, &info, body, &[sender]).await?;
                let person = Person {
                    address: addr.clone(),
                    name: None,
                };
                ghost_in(kit, &new_room, &person).await?;
                // Invited once the other side is in: the room is whole when it shows.
                kit.bot.invite(&new_room, sender).await?;
                let mut conv = Conversation {
                    room_id: new_room.to_string(),
                    thread_root: None,
                    subject: subject.clone(),
                    reply_token: portal::new_reply_token(),
                    ..Default::default()
                };
                conv.add_external(&person);
                shared.portals.save(&conv)?;
                kit.bot
                    .send_notice(
                        &new_room,
                        &format!("What you write here is mailed to {addr} with the subject “{subject}”; their replies arrive here."),
                        None,
                    )
                    .await?;
                reply(format!(
                    "Started an email thread with {addr}: you are invited to its room."
                ))
                .await
            }
            "add" | "address" if !bot_can_invite(kit, room).await => {
                reply(format!(
                    "I bring people outside into this room as ghosts, so I need to be allowed to invite here: give {} the invite power level first.",
                    kit.bot_id()
                ))
                .await
            }
            "add" | "remove" => {
                let Some(addr) = inv.arg(0, "address").and_then(|a| address::normalise(&a)) else {
                    return reply(format!("Usage: !email {} <address>", inv.command)).await;
                };
                if shared.ours(&addr) {
                    return reply(format!("{addr} is an address of this organisation: invite the person to the room instead.")).await;
                }
                let _guard = shared.lock.lock().await;
                let mut conv = match shared.portals.get(&key)? {
                    Some(c) => c,
                    None if inv.command == "add" => {
                        let name = event_room_name(kit, room).await;
                        Conversation {
                            room_id: room.to_string(),
                            thread_root: thread.clone(),
                            subject: name,
                            reply_token: portal::new_reply_token(),
                            ..Default::default()
                        }
                    }
                    None => return reply("This room has no email thread.".into()).await,
                };
                let person = Person {
                    address: addr.clone(),
                    name: None,
                };
                if inv.command == "add" {
                    conv.add_external(&person);
                    shared.portals.save(&conv)?;
                    ghost_in(kit, room, &person).await?;
                    reply(format!("{addr} now gets what is written here.")).await
                } else {
                    let before = conv.externals.len();
                    conv.externals.retain(|e| e.address != addr);
                    if conv.externals.len() == before {
                        return reply(format!("{addr} is not in this email thread.")).await;
                    }
                    shared.portals.save(&conv)?;
                    let ghost = kit.ghost(&ghost_id(kit, &addr)?);
                    let _ = ghost.leave(room).await;
                    reply(format!("{addr} no longer gets what is written here.")).await
                }
            }
            "address" => {
                let Some(name) = inv
                    .arg(0, "name")
                    .map(|n| n.trim().to_lowercase())
                    .filter(|n| {
                        valid_localpart(n)
                            && !n.starts_with("reply+")
                            && !n.starts_with(GHOST_PREFIX)
                            && n != BOT_LOCALPART
                    })
                else {
                    return reply(
                        "Usage: !email address <name> (letters, digits, . _ - only)".into(),
                    )
                    .await;
                };
                if let Some(other) = shared.portals.mailbox_room(&name)?
                    && other != room.as_str()
                {
                    return reply(format!(
                        "{name}@{} is already another room's address.",
                        shared.domain
                    ))
                    .await;
                }
                let user = kit.homeserver.user_id(&name)?;
                if kit.bot.profile(&user).await?.is_some() {
                    return reply(format!("{name}@{} is a person's address.", shared.domain)).await;
                }
                shared.portals.set_mailbox(&name, room.as_str())?;
                let address = format!("{name}@{}", shared.domain);
                let info = BridgeInfo {
                    bot: kit.bot_id(),
                    creator: Some(sender),
                    protocol: ("email", "Email"),
                    channel: (&address, &address),
                };
                let (state_key, content) = info.state();
                for t in BRIDGE_EVENT_TYPES {
                    if let Err(e) = kit.bot.send_state(room, t, &state_key, &content).await {
                        tracing::debug!(room_id = %room, error = %e, "cannot mark a mailbox room as bridged");
                        break;
                    }
                }
                reply(format!(
                    "This room now receives mail at {name}@{}: each new mail starts a thread here.",
                    shared.domain
                ))
                .await
            }
            "participants" => match shared.portals.get(&key)? {
                Some(c) if !c.externals.is_empty() => {
                    let list: Vec<String> = c
                        .externals
                        .iter()
                        .map(|e| match &e.name {
                            Some(n) => format!("{n} <{}>", e.address),
                            None => e.address.clone(),
                        })
                        .collect();
                    reply(format!(
                        "Mailed to: {}. Replies go to {}.",
                        list.join(", "),
                        shared.reply_address(&c)
                    ))
                    .await
                }
                _ => {
                    let mailbox = shared.portals.mailbox_of_room(room.as_str())?;
                    reply(match mailbox {
                        Some(m) => format!(
                            "Nobody outside yet; this room receives mail at {m}@{}.",
                            shared.domain
                        ),
                        None => "This room has no email thread.".to_owned(),
                    })
                    .await
                }
            },
            _ => Ok(()),
        }
    }
}

/// Whether the bot may invite in a room (it brings the ghosts of people outside in).
async fn bot_can_invite(kit: &Kit, room: &RoomId) -> bool {
    let Ok(pl) = kit.bot.state(room, "m.room.power_levels", "").await else {
        return false;
    };
    let level = |v: &JsonValue| v.as_i64().or_else(|| v.as_str()?.parse().ok());
    let mine = level(&pl["users"][kit.bot_id().as_str()])
        .or_else(|| level(&pl["users_default"]))
        .unwrap_or(0);
    mine >= level(&pl["invite"]).unwrap_or(0)
}

async fn event_room_name(kit: &Kit, room: &RoomId) -> String {
    kit.bot
        .state(room, "m.room.name", "")
        .await
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "Message from Salon".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_fallbacks_are_left_out_of_mail() {
        let (t, h) = strip_reply_fallback(&json!({
            "body": "> <@bob:x> earlier\n\nMy answer",
            "format": "org.matrix.custom.html",
            "formatted_body": "<mx-reply><blockquote>earlier</blockquote></mx-reply>My <b>answer</b>",
            "m.relates_to": { "m.in_reply_to": { "event_id": "$x" } },
        }));
        assert_eq!(t, "My answer");
        assert_eq!(h.as_deref(), Some("My <b>answer</b>"));
        let (t, h) = strip_reply_fallback(&json!({ "body": "> not a reply" }));
        assert_eq!(t, "> not a reply");
        assert_eq!(h, None);
    }

    #[test]
    fn derived_ids_are_stable_and_valid() {
        assert_eq!(txn_for("a@b", 1), txn_for("a@b", 1));
        assert_ne!(txn_for("a@b", 1), txn_for("a@b", 2));
        assert!(valid_localpart(&alias_for("<x>@y")));
        assert!(!valid_localpart("Alice"));
        assert!(valid_localpart("alice.martin"));
    }
}
