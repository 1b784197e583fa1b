//! Domain logic. [`Services`] is built once at start-up and handed to the HTTP layer;
//! each service receives the others it needs explicitly (no global state).

pub mod appservice;
pub mod e2ee;
pub mod ephemeral;
pub mod globals;
pub mod ldap;
pub mod locks;
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
    /// Each room's current members, kept in memory by the commits.
    pub members: Arc<rooms::members::MemberLists>,
    pub notifier: Arc<notifier::Notifier>,
    pub ephemeral: ephemeral::Ephemeral,
    pub e2ee: e2ee::E2ee,
    pub media: media::Media,
    pub push: Arc<push::Push>,
    pub appservices: appservice::Appservices,
    /// The directory, when `ldap.enabled`.
    pub ldap: Option<Arc<ldap::LdapService>>,
    /// For requests to appservices.
    pub http: reqwest::Client,
    pub login_limit: ratelimit::RateLimiter,
    pub register_limit: ratelimit::RateLimiter,
    pub sync_answers: sync::SharedAnswers,
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
        let members = Arc::new(rooms::members::MemberLists::new(db.clone()));
        let timeline = rooms::timeline::Timeline::new(
            db.clone(),
            globals.clone(),
            state,
            notifier.clone(),
            push.clone(),
            members.clone(),
        );
        let signed = timeline.sign_unsigned()?;
        if signed > 0 {
            tracing::warn!(
                events = signed,
                "signed events whose signatures were lost in a crash"
            );
        }
        let rooms = rooms::Rooms::new(db.clone(), globals.clone(), users.clone(), timeline);
        let e2ee = e2ee::E2ee::new(
            db.clone(),
            globals.server_name().to_owned(),
            users.clone(),
            notifier.clone(),
            members.clone(),
        );
        let appservices = appservice::Appservices::load(
            db.clone(),
            globals.server_name(),
            globals.config.appservices.registration_dir.as_deref(),
        )?;
        let ldap = if globals.config.ldap.enabled {
            Some(Arc::new(ldap::LdapService::new(
                globals.config.ldap.clone(),
            )?))
        } else {
            None
        };
        let media = media::Media::new(
            db.clone(),
            &globals.config.data_dir,
            globals.config.media.clone(),
        )?;
        Ok(Arc::new(Self {
            globals,
            users,
            uiaa: uiaa::Uiaa::new(ldap.clone()),
            rooms,
            members,
            ephemeral: ephemeral::Ephemeral::new(db.clone(), notifier.clone()),
            e2ee,
            media,
            push,
            appservices,
            ldap,
            http: appservice::client::http_client(),
            db,
            notifier,
            login_limit: ratelimit::RateLimiter::new(rl.login, rl.enabled),
            register_limit: ratelimit::RateLimiter::new(rl.register, rl.enabled),
            sync_answers: sync::SharedAnswers::default(),
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
        for d in self.users.devices_settled(user)? {
            if keep.is_some_and(|k| k.as_str() == d.device_id) {
                continue;
            }
            self.remove_device(user, d.device_id.as_str().into())?;
        }
        Ok(())
    }
}

impl Services {
    /// The room an alias points to; when there is none and an appservice claims the
    /// alias, the appservice is asked (it may create the room) and the lookup repeated.
    pub async fn resolve_alias(
        &self,
        alias: &ruma::RoomAliasId,
    ) -> Result<Option<ruma::OwnedRoomId>> {
        if let Some(room) = self.rooms.alias_target(alias)? {
            return Ok(Some(room));
        }
        for a in self.appservices.all() {
            if a.claims_alias(alias)
                && appservice::client::query_alias(&self.http, &a, alias.as_str()).await
                && let Some(room) = self.rooms.alias_target(alias)?
            {
                return Ok(Some(room));
            }
        }
        Ok(None)
    }

    /// Make sure a local user the request names exists: when it does not and an
    /// appservice claims it, the appservice is asked (it may register the user).
    pub async fn ask_appservices_about(&self, user: &ruma::UserId) -> Result<()> {
        if user.server_name() != self.globals.server_name() || self.users.exists(user)? {
            return Ok(());
        }
        for a in self.appservices.all() {
            if a.claims_user(user)
                && appservice::client::query_user(&self.http, &a, user.as_str()).await
                && self.users.exists(user)?
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Aliases in an appservice's exclusive namespace belong to that appservice alone.
    pub fn check_alias_namespace(
        &self,
        alias: &ruma::RoomAliasId,
        requester: Option<&appservice::Appservice>,
    ) -> Result<()> {
        match self.appservices.exclusive_owner_of_alias(alias) {
            Some(owner) if requester.is_none_or(|r| r.id() != owner.id()) => {
                Err(crate::error::Error::exclusive(format!(
                    "This alias belongs to the appservice {:?}",
                    owner.id()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Create the own user of every appservice that lacks one.
    pub async fn ensure_appservice_users(&self) -> Result<()> {
        for a in self.appservices.all() {
            if !self.users.exists(&a.sender)? {
                self.users.create(&a.sender, None, false, false).await?;
                tracing::info!(user_id = %a.sender, appservice = %a.id(), "created the appservice's user");
            }
        }
        Ok(())
    }
}

impl Services {
    /// Deactivate an account: it can never log in again, its devices are removed and
    /// it leaves every room (so members see it go). It is marked first, so that a
    /// login under way leaves no device behind.
    pub async fn deactivate_account(&self, user: &ruma::UserId) -> Result<()> {
        self.users.deactivate(user)?;
        self.remove_devices_except(user, None)?;
        for state in ["join", "invite", "knock"] {
            for room in self.rooms.rooms_with_membership(user, state)? {
                if let Err(e) = self
                    .rooms
                    .set_membership(&room, user, user, "leave", None, None)
                    .await
                {
                    tracing::warn!(room_id = %room, error = %e, "could not leave room while deactivating");
                }
            }
        }
        Ok(())
    }
}
