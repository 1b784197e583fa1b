//! Send-to-device messaging.

use std::{collections::BTreeMap, sync::Arc};

use ruma::api::client::to_device::send_event_to_device;

use crate::{error::Result, http::Ruma, service::Services};

pub async fn send(
    s: Arc<Services>,
    req: Ruma<send_event_to_device::v3::Request>,
) -> Result<send_event_to_device::v3::Response> {
    let messages = req
        .messages
        .iter()
        .map(|(user, targets)| {
            let targets: BTreeMap<_, _> = targets
                .iter()
                .map(|(target, content)| (target.clone(), content.json().to_owned()))
                .collect();
            (user.clone(), targets)
        })
        .collect();
    s.e2ee.send_to_device(
        req.user(),
        req.device(),
        &req.event_type.to_string(),
        req.txn_id.as_str(),
        &messages,
    )?;
    Ok(send_event_to_device::v3::Response::new())
}
