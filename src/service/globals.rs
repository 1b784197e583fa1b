//! Server-wide facts: the configuration, the server's signing key, generated secrets.

use std::sync::Arc;

use rand::{Rng, distributions::Alphanumeric};
use ruma::{OwnedServerName, ServerName, signatures::Ed25519KeyPair};

use crate::{
    config::Config,
    error::{Error, Result},
    storage::Db,
};

pub struct Globals {
    pub config: Config,
    pub keypair: Ed25519KeyPair,
    /// Secret for Synapse-compatible shared-secret registration.
    pub shared_secret: String,
}

impl Globals {
    pub fn load(config: Config, db: &Arc<Db>) -> Result<Self> {
        let keypair = load_or_create_key(db)?;
        let shared_secret = match &config.registration.shared_secret {
            Some(s) => s.clone(),
            None => match db.get("meta", b"registration_shared_secret")? {
                Some(v) => String::from_utf8_lossy(&v).into_owned(),
                None => {
                    let s = random_string(48);
                    db.put_durable("meta", b"registration_shared_secret", s.as_bytes())?;
                    s
                }
            },
        };
        Ok(Self {
            config,
            keypair,
            shared_secret,
        })
    }

    pub fn server_name(&self) -> &ServerName {
        &self.config.server_name
    }

    pub fn owned_server_name(&self) -> OwnedServerName {
        self.config.server_name.clone()
    }

    /// `ed25519:<version>`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.keypair.version())
    }
}

fn load_or_create_key(db: &Arc<Db>) -> Result<Ed25519KeyPair> {
    if let Some(stored) = db.get("meta", b"signing_key")? {
        let (version, der) = stored.split_at(stored.iter().position(|b| *b == 0).unwrap_or(0));
        let version = String::from_utf8_lossy(version).into_owned();
        return Ed25519KeyPair::from_der(&der[1..], version)
            .map_err(|e| Error::internal(format!("stored signing key is unreadable: {e}")));
    }
    let der = Ed25519KeyPair::generate();
    let version = random_string(6);
    let keypair = Ed25519KeyPair::from_der(&der, version.clone())
        .map_err(|e| Error::internal(format!("generated signing key is unreadable: {e}")))?;
    let mut stored = version.into_bytes();
    stored.push(0);
    stored.extend_from_slice(&der);
    db.put_durable("meta", b"signing_key", &stored)?;
    tracing::info!(key_id = %format!("ed25519:{}", keypair.version()), "generated the server signing key");
    Ok(keypair)
}

pub fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}
