//! The client-server API, one file per chapter of the spec.

pub mod account;
pub mod account_data;
pub mod admin;
pub mod appservice;
pub mod backup;
pub mod device;
pub mod directory;
pub mod discovery;
pub mod ephemeral;
pub mod keys;
pub mod media;
pub mod membership;
pub mod message;
pub mod profile;
pub mod push;
pub mod room;
pub mod session;
pub mod state;
pub mod sync;
pub mod to_device;
