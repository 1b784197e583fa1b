//! Devices: list, get, rename, delete (with user-interactive auth).

use std::sync::Arc;

use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::client::{
        device::{Device, delete_device, delete_devices, get_device, get_devices, update_device},
        uiaa::{AuthFlow, AuthType},
    },
};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, users::DeviceRecord},
};

fn to_device(d: DeviceRecord) -> Device {
    let mut device = Device::new(d.device_id.into());
    device.display_name = d.display_name;
    device.last_seen_ip = d.last_seen_ip;
    device.last_seen_ts = d
        .last_seen_ts
        .and_then(|t| UInt::new(t))
        .map(MilliSecondsSinceUnixEpoch);
    device
}

pub async fn list(
    s: Arc<Services>,
    req: Ruma<get_devices::v3::Request>,
) -> Result<get_devices::v3::Response> {
    Ok(get_devices::v3::Response::new(
        s.users
            .devices(req.user())?
            .into_iter()
            .map(to_device)
            .collect(),
    ))
}

pub async fn get(
    s: Arc<Services>,
    req: Ruma<get_device::v3::Request>,
) -> Result<get_device::v3::Response> {
    let d = s
        .users
        .device(req.user(), &req.device_id)?
        .ok_or_else(|| Error::not_found("No such device"))?;
    Ok(get_device::v3::Response::new(to_device(d)))
}

pub async fn update(
    s: Arc<Services>,
    req: Ruma<update_device::v3::Request>,
) -> Result<update_device::v3::Response> {
    s.users
        .rename_device(req.user(), &req.device_id, req.display_name.clone())?;
    Ok(update_device::v3::Response::new())
}

pub async fn delete(
    s: Arc<Services>,
    req: Ruma<delete_device::v3::Request>,
) -> Result<delete_device::v3::Response> {
    if s.users.device(req.user(), &req.device_id)?.is_none() {
        return Err(Error::not_found("No such device"));
    }
    s.uiaa
        .check(
            &s.users,
            vec![AuthFlow::new(vec![AuthType::Password])],
            req.auth.as_ref(),
            Some(req.user()),
        )
        .await?;
    s.remove_device(req.user(), &req.device_id)?;
    Ok(delete_device::v3::Response::new())
}

pub async fn delete_many(
    s: Arc<Services>,
    req: Ruma<delete_devices::v3::Request>,
) -> Result<delete_devices::v3::Response> {
    s.uiaa
        .check(
            &s.users,
            vec![AuthFlow::new(vec![AuthType::Password])],
            req.auth.as_ref(),
            Some(req.user()),
        )
        .await?;
    for d in &req.devices {
        s.remove_device(req.user(), d)?;
    }
    Ok(delete_devices::v3::Response::new())
}
