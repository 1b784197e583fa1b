//! Domain logic. [`Services`] is built once at start-up and handed to the HTTP layer;
//! each service receives the others it needs explicitly (no global state).

pub mod e2ee;
pub mod ephemeral;
pub mod globals;
pub mod media;
pub mod notifier;
pub mod push;
pub mod ratelimit;
pub mod rooms;
pub mod sync;
pub mod uiaa;
pub mod users;

use std::sync::Arc;

use crate::{config::Config, error::Result, storage::Db};

pub struct Services {
    pub db: Arc<Db>,
    pub globals: Arc<Globals>,
    pub users: Arc<users::Users>,
    pub uiaa: uiaa::Uiaa,
    pub rooms: rooms::Rooms,
    pub notifier: Arc<notifier::Notifier>,
    pub ephemeral: ephemeral::Ephemeral,
    pub e2ee: e2ee::E2ee,
    pub media: media::Media,
    pub push: Arc<push::Push>,
    pub login_limit: ratelimit::RateLimiter,
    pub register_limit: ratelimit::RateLimiter,
}

pub use globals::Globals;

impl Services {
    pub fn build(config: Config) -> Result<Arc<Self>> {
        let db = Db::open(&config.data_dir.join("db"), config.database.cache_mib)?;
        Self::with_db(config, db)
    }

    pub fn with_db(config: Config, db: Arc<Db>) -> Result<Arc<Self>> {
        let rl = config.rate_limits.clone();
        let globals = Arc::new(Globals::load(config, &db)?);
        let notifier = Arc::new(notifier::Notifier::default());
        let users = Arc::new(users::Users::new(db.clone(), notifier.clone()));
        let push = Arc::new(push::Push::new(
            db.clone(),
            users.clone(),
            globals.config.push.clone(),
        ));
        let state = Arc::new(rooms::state::StateService::new(db.clone()));
        let timeline = rooms::timeline::Timeline::new(
            db.clone(),
            globals.clone(),
            state,
            notifier.clone(),
            push.clone(),
        );
        let rooms = rooms::Rooms::new(db.clone(), globals.clone(), users.clone(), timeline);
        let e2ee = e2ee::E2ee::new(
            db.clone(),
            globals.server_name().to_owned(),
            users.clone(),
            notifier.clone(),
        );
        let media = media::Media::new(
            db.clone(),
            &globals.config.data_dir,
            globals.config.media.clone(),
        )?;
        Ok(Arc::new(Self {
            globals,
            users,
            uiaa: uiaa::Uiaa::default(),
            rooms,
            ephemeral: ephemeral::Ephemeral::new(db.clone(), notifier.clone()),
            e2ee,
            media,
            push,
            db,
            notifier,
            login_limit: ratelimit::RateLimiter::new(rl.login, rl.enabled),
            register_limit: ratelimit::RateLimiter::new(rl.register, rl.enabled),
        }))
    }
}

impl Services {
    /// Remove a device: its session, keys and pending messages, and the pushers it set.
    /// The people who share rooms with its owner learn that the device list changed.
    pub fn remove_device(&self, user: &ruma::UserId, device: &ruma::DeviceId) -> Result<bool> {
        if !self.e2ee.remove_device(user, device)? {
            return Ok(false);
        }
        self.push.delete_pushers_of_device(user, device.as_str())?;
        Ok(true)
    }

    /// Remove every device of the user except `keep`.
    pub fn remove_devices_except(
        &self,
        user: &ruma::UserId,
        keep: Option<&ruma::DeviceId>,
    ) -> Result<()> {
        for d in self.users.devices(user)? {
            if keep.is_some_and(|k| k.as_str() == d.device_id) {
                continue;
            }
            self.remove_device(user, d.device_id.as_str().into())?;
        }
        Ok(())
    }
}
