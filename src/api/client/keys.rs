//! End-to-end encryption keys: upload, query, claim, changes, cross-signing and
//! signatures.

use std::{collections::BTreeMap, sync::Arc};

use ruma::{
    UInt,
    api::client::{
        keys::{
            claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures,
            upload_signing_keys,
        },
        uiaa::{AuthFlow, AuthType},
    },
};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, e2ee::keys::signature_failure_json, sync::parse_since},
};

pub async fn upload(
    s: Arc<Services>,
    req: Ruma<upload_keys::v3::Request>,
) -> Result<upload_keys::v3::Response> {
    let counts = s.e2ee.upload_keys(
        req.user(),
        req.device(),
        req.device_keys.as_ref().map(|k| k.json()),
        &req.one_time_keys,
        &req.fallback_keys,
    )?;
    Ok(upload_keys::v3::Response::new(
        counts
            .into_iter()
            .map(|(alg, n)| (alg, UInt::new_saturating(n)))
            .collect(),
    ))
}

pub async fn query(
    s: Arc<Services>,
    req: Ruma<get_keys::v3::Request>,
) -> Result<get_keys::v3::Response> {
    let keys = s.e2ee.query_keys(req.user(), &req.device_keys)?;
    let mut res = get_keys::v3::Response::new();
    res.device_keys = keys.device_keys;
    res.master_keys = keys.master_keys;
    res.self_signing_keys = keys.self_signing_keys;
    res.user_signing_keys = keys.user_signing_keys;
    Ok(res)
}

pub async fn claim(
    s: Arc<Services>,
    req: Ruma<claim_keys::v3::Request>,
) -> Result<claim_keys::v3::Response> {
    Ok(claim_keys::v3::Response::new(
        s.e2ee.claim_keys(&req.one_time_keys)?,
    ))
}

pub async fn changes(
    s: Arc<Services>,
    req: Ruma<get_key_changes::v3::Request>,
) -> Result<get_key_changes::v3::Response> {
    let visible = s.db.stream.visible();
    let from = parse_since(&req.from, visible)?.pos;
    let to = parse_since(&req.to, visible)?.pos;
    let changes = s.e2ee.device_list_changes(req.user(), from, to.max(from))?;
    Ok(get_key_changes::v3::Response::new(
        changes.changed.into_iter().collect(),
        changes.left.into_iter().collect(),
    ))
}

pub async fn upload_signing_keys(
    s: Arc<Services>,
    req: Ruma<upload_signing_keys::v3::Request>,
) -> Result<upload_signing_keys::v3::Response> {
    let keys = s.e2ee.check_cross_signing_keys(
        req.user(),
        req.master_key.as_ref().map(|k| k.json()),
        req.self_signing_key.as_ref().map(|k| k.json()),
        req.user_signing_key.as_ref().map(|k| k.json()),
    )?;
    // Keys another request stored meanwhile can make an upload that needed no
    // password one that does: it is asked for then.
    let mut authenticated = false;
    loop {
        if !authenticated && s.e2ee.cross_signing_upload_needs_auth(req.user(), &keys)? {
            s.uiaa
                .check(
                    &s.users,
                    vec![AuthFlow::new(vec![AuthType::Password])],
                    req.auth.as_ref(),
                    Some(req.user()),
                )
                .await?;
            authenticated = true;
        }
        if s.e2ee
            .store_cross_signing_keys(req.user(), &keys, authenticated)?
        {
            return Ok(upload_signing_keys::v3::Response::new());
        }
    }
}

pub async fn upload_signatures(
    s: Arc<Services>,
    req: Ruma<upload_signatures::v3::Request>,
) -> Result<upload_signatures::v3::Response> {
    // `SignedKeys` keeps its map private; its JSON form is that map.
    let mut signed = BTreeMap::new();
    for (user, keys) in &req.signed_keys {
        let map: BTreeMap<String, Box<serde_json::value::RawValue>> =
            serde_json::from_str(&serde_json::to_string(keys)?)
                .map_err(|e| Error::bad_json(format!("signed keys of {user}: {e}")))?;
        signed.insert(user.clone(), map);
    }
    let failures = s.e2ee.upload_signatures(req.user(), &signed)?;
    let mut res = upload_signatures::v3::Response::new();
    for (user, by_key) in failures {
        let mut entries = BTreeMap::new();
        for (key_id, message) in by_key {
            entries.insert(
                key_id,
                serde_json::from_value(signature_failure_json(&message))?,
            );
        }
        res.failures.insert(user, entries);
    }
    Ok(res)
}
