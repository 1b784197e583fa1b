//! Delivers queued notifications to push gateways (`POST /_matrix/push/v1/notify`, the
//! push gateway API that Sygnal implements).
//!
//! The queue lives in RocksDB, written with the event that caused it, so nothing is lost
//! to a crash or a gateway that is down. Each item is retried with exponential backoff
//! until the gateway takes it or `push.max_retry_hours` pass; a gateway that names a
//! push key as `rejected` loses that pusher. One item that keeps failing holds back
//! later items of the same pusher only, never other pushers.

use std::{collections::HashSet, sync::Arc, time::Duration};

use ruma::{
    UserId,
    api::client::push::{Pusher, PusherKind},
    push::{Action, PushFormat},
};
use serde_json::{Value as JsonValue, json};

use super::QueuedPush;
use crate::{
    error::Result,
    service::{Services, users::now_ms},
};

/// Longest pause between two tries of one notification.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Run until `stop` resolves: deliver what is due, then sleep until something is
/// queued or the next retry is due.
pub async fn run(s: Arc<Services>, stop: tokio::sync::oneshot::Receiver<()>) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(s.push.config.timeout_secs))
        .user_agent(concat!("Salon/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the push HTTP client; push is off");
            return;
        }
    };
    tokio::pin!(stop);
    loop {
        let queued = s.push.queued.notified();
        tokio::pin!(queued);
        queued.as_mut().enable();
        let next = match deliver_due(&s, &client).await {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "push delivery round failed");
                Some(now_ms() + 5_000)
            }
        };
        let wait = next
            .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
            .unwrap_or(MAX_BACKOFF);
        tokio::select! {
            _ = &mut stop => return,
            _ = &mut queued => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

enum Outcome {
    Delivered {
        rejected: Vec<String>,
    },
    /// The gateway refused the request itself: retrying would not help.
    Refused(String),
    /// Network trouble, a timeout, 5xx or 429: try again later.
    Failed(String),
}

/// Try every item that is due, oldest first. Returns when the next retry is due.
async fn deliver_due(s: &Services, client: &reqwest::Client) -> Result<Option<u64>> {
    let now = now_ms();
    let mut next: Option<u64> = None;
    let mut blocked: HashSet<(String, String)> = HashSet::new();
    let items: Vec<(Box<[u8]>, QueuedPush)> =
        s.db.scan_prefix("push_queue", b"")
            .map(|r| {
                let (k, v) = r?;
                Ok((k, serde_json::from_slice(&v)?))
            })
            .collect::<Result<_>>()?;
    for (key, mut item) in items {
        let pusher_id = (item.app_id.clone(), item.pushkey.clone());
        if blocked.contains(&pusher_id) {
            continue;
        }
        if item.next_try_ms > now {
            blocked.insert(pusher_id);
            next = Some(next.map_or(item.next_try_ms, |n| n.min(item.next_try_ms)));
            continue;
        }
        let Some(record) = s.push.pusher(&item.user, &item.app_id, &item.pushkey)? else {
            // The pusher is gone: so is its work.
            delete(s, &key)?;
            continue;
        };
        let pusher = record.parsed()?;
        let outcome = match payload(s, &item, &pusher) {
            Ok(Some((url, body))) => post(client, &url, &body).await,
            Ok(None) => Outcome::Refused("nothing to send".to_owned()),
            Err(e) => Outcome::Refused(e.to_string()),
        };
        match outcome {
            Outcome::Delivered { rejected } => {
                delete(s, &key)?;
                if rejected.iter().any(|k| *k == item.pushkey) {
                    tracing::info!(user_id = %item.user, app_id = %item.app_id, "push gateway rejected the push key; removing the pusher");
                    s.push
                        .delete_pusher(&item.user, &item.app_id, &item.pushkey)?;
                }
            }
            Outcome::Refused(why) => {
                tracing::warn!(user_id = %item.user, app_id = %item.app_id, reason = %why, "push gateway refused a notification; dropped");
                delete(s, &key)?;
            }
            Outcome::Failed(why) => {
                if item.first_try_ms == 0 {
                    item.first_try_ms = now;
                }
                item.attempts += 1;
                let give_up = now.saturating_sub(item.first_try_ms)
                    > s.push.config.max_retry_hours * 3_600_000;
                if give_up {
                    tracing::warn!(user_id = %item.user, app_id = %item.app_id, reason = %why, attempts = item.attempts, "giving up on a notification");
                    delete(s, &key)?;
                    continue;
                }
                let backoff =
                    Duration::from_secs(1u64 << (item.attempts - 1).min(12)).min(MAX_BACKOFF);
                item.next_try_ms = now + backoff.as_millis() as u64;
                tracing::debug!(user_id = %item.user, reason = %why, retry_in_ms = backoff.as_millis() as u64, "push delivery failed; will retry");
                s.db.put_durable("push_queue", &key, &serde_json::to_vec(&item)?)?;
                next = Some(next.map_or(item.next_try_ms, |n| n.min(item.next_try_ms)));
                blocked.insert(pusher_id);
            }
        }
    }
    Ok(next)
}

fn delete(s: &Services, key: &[u8]) -> Result<()> {
    let mut batch = crate::storage::Batch::default();
    batch.delete(&s.db, "push_queue", key);
    s.db.commit(batch)
}

async fn post(client: &reqwest::Client, url: &str, body: &JsonValue) -> Outcome {
    let res = match client.post(url).json(body).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let status = res.status();
    if status.is_success() {
        let rejected = res
            .json::<JsonValue>()
            .await
            .ok()
            .and_then(|v| {
                v.get("rejected").and_then(|r| r.as_array()).map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default();
        Outcome::Delivered { rejected }
    } else if status.is_server_error() || status.as_u16() == 429 {
        Outcome::Failed(format!("gateway answered {status}"))
    } else {
        Outcome::Refused(format!("gateway answered {status}"))
    }
}

/// The notification for the gateway, per the push gateway API: the event (or only its
/// id, for `event_id_only` pushers), names to show, the badge count, and the device.
fn payload(
    s: &Services,
    item: &QueuedPush,
    pusher: &Pusher,
) -> Result<Option<(String, JsonValue)>> {
    let PusherKind::Http(http) = &pusher.kind else {
        return Ok(None);
    };
    let tl = &s.rooms.timeline;
    let Some(event) = tl.stored(item.event_short)? else {
        return Ok(None);
    };
    let unread = badge_count(s, &item.user)?;
    let mut tweaks = serde_json::Map::new();
    for action in &item.actions {
        if let Action::SetTweak(tweak) = action {
            // A tweak serialises as {"set_tweak": name, "value": v}; the gateway wants
            // {name: v}, with `true` for a highlight without a value.
            let t = serde_json::to_value(tweak)?;
            if let Some(name) = t.get("set_tweak").and_then(|n| n.as_str()) {
                let value = t.get("value").cloned().unwrap_or(JsonValue::Bool(true));
                tweaks.insert(name.to_owned(), value);
            }
        }
    }
    let mut data = serde_json::Value::Object(http.data.clone());
    if let Some(o) = data.as_object_mut() {
        o.remove("url");
    }
    let device = json!({
        "app_id": pusher.ids.app_id,
        "pushkey": pusher.ids.pushkey,
        "pushkey_ts": 0,
        "data": data,
        "tweaks": tweaks,
    });
    let is_message = matches!(
        event.pdu.kind.to_string().as_str(),
        "m.room.message" | "m.room.encrypted"
    );
    let mut notification = json!({
        "event_id": event.pdu.event_id,
        "room_id": item.room_id,
        "counts": { "unread": unread },
        "devices": [device],
        "prio": if is_message || item.actions.iter().any(Action::is_highlight) { "high" } else { "low" },
    });
    if http.format != Some(PushFormat::EventIdOnly) {
        let room_short = tl.room_short(&item.room_id)?.unwrap_or(0);
        let room_name = tl
            .current_state_content(room_short, "m.room.name", "")?
            .and_then(|c| c.get("name").and_then(|n| n.as_str()).map(str::to_owned));
        let sender_name = tl
            .current_state_content(room_short, "m.room.member", event.pdu.sender.as_str())?
            .and_then(|c| {
                c.get("displayname")
                    .and_then(|n| n.as_str())
                    .map(str::to_owned)
            });
        let n = notification.as_object_mut().expect("an object");
        n.insert("type".to_owned(), json!(event.pdu.kind.to_string()));
        n.insert("sender".to_owned(), json!(event.pdu.sender));
        n.insert("content".to_owned(), event.pdu.content_json());
        if let Some(name) = sender_name {
            n.insert("sender_display_name".to_owned(), json!(name));
        }
        if let Some(name) = room_name {
            n.insert("room_name".to_owned(), json!(name));
        }
        if let Some(sk) = &event.pdu.state_key {
            n.insert("user_is_target".to_owned(), json!(sk == item.user.as_str()));
        }
    }
    Ok(Some((
        http.url.clone(),
        json!({ "notification": notification }),
    )))
}

/// The badge: how many rooms have unread notifications for the user.
fn badge_count(s: &Services, user: &UserId) -> Result<u64> {
    let now = s.db.stream.visible();
    let mut rooms = 0;
    for room in crate::service::rooms::timeline::joined_room_shorts(&s.db, user)? {
        let read = crate::service::sync::read_position(
            s,
            user,
            room,
            crate::service::sync::ReadScope::Main,
        )?;
        let (counts, _) = s.push.counts(user, room, read, read, now, None)?;
        if counts.notifications > 0 {
            rooms += 1;
        }
    }
    Ok(rooms)
}
