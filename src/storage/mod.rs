//! RocksDB storage: key spaces and their column families, key codecs, atomic batches,
//! short ids, the stream.
//!
//! This layer knows keys and bytes, nothing of Matrix rules. Services decide what to
//! store; they group all writes of one operation into a [`Batch`] and commit it with
//! [`Db::commit`], which is durable (fsync'd write-ahead log) when it returns, and which
//! RocksDB group-commits when many writers commit at once.

mod keys;
mod stream;

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use rust_rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBPinnableSlice,
    Direction, IteratorMode, LruCacheOptions, Options, ReadOptions, SstFileManager, WriteBatch,
    WriteOptions,
};

pub use self::{
    keys::*,
    stream::{NewestByRoom, StreamAllocator, StreamTicket},
};
use crate::error::{Error, Result};

/// A value read from the database and held in place, not copied out.
pub struct Pinned<'a>(DBPinnableSlice<'a>);

impl std::ops::Deref for Pinned<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// Memory all memtables together may hold before the largest is flushed to disk. With
/// dozens of column families, per-family write buffers alone would let them grow to
/// hundreds of MiB.
const MEMTABLE_BUDGET: usize = 16 * 1024 * 1024;

/// The column family the small key spaces share: RocksDB's default one, which every
/// database has anyway.
const SHARED_FAMILY: &str = rust_rocksdb::DEFAULT_COLUMN_FAMILY_NAME;

/// One key space of the database (see [`KEY_SPACES`]).
pub struct KeySpace {
    pub name: &'static str,
    /// `None`: a column family of its own, named like the space. `Some(tag)`: in the
    /// shared family, every key prefixed with `tag`.
    pub tag: Option<u8>,
    pub holds: &'static str,
}

impl KeySpace {
    const fn own(name: &'static str, holds: &'static str) -> Self {
        Self {
            name,
            tag: None,
            holds,
        }
    }

    const fn shared(tag: u8, name: &'static str, holds: &'static str) -> Self {
        Self {
            name,
            tag: Some(tag),
            holds,
        }
    }

    /// The name of the column family the space lives in.
    fn family(&self) -> &'static str {
        match self.tag {
            None => self.name,
            Some(_) => SHARED_FAMILY,
        }
    }
}

/// Every key space, with where it lives and what it holds. Keys are big-endian so that
/// prefix scans walk in order; `SEP` (0xff, never in UTF-8) separates string parts.
///
/// The big and busy spaces (events, their metadata, timelines, the stream, state) have a
/// RocksDB column family each. The many small ones share the default family, each under
/// its own one-byte tag, which the storage layer puts before every key and takes off
/// again: a column family costs about 55 KiB of memory and its own entries in the
/// manifest whether it holds anything or not. Tags are part of the on-disk format:
/// never reuse or change one.
pub const KEY_SPACES: &[KeySpace] = &[
    KeySpace::shared(
        1,
        "meta",
        "schema version, server signing key, generated secrets",
    ),
    KeySpace::own("shortids", "kind byte + long identifier → u64 short id"),
    KeySpace::own("longids", "u64 short id → kind byte + long identifier"),
    KeySpace::shared(
        2,
        "users",
        "user id → account record (password hash, admin, deactivated, profile)",
    ),
    KeySpace::shared(3, "devices", "user id SEP device id → device record"),
    KeySpace::shared(
        4,
        "access_tokens",
        "access token → user id \\u{1} device id \\u{1} client session id",
    ),
    KeySpace::shared(
        5,
        "login_tokens",
        "short-lived m.login.token → user id and expiry",
    ),
    KeySpace::shared(
        6,
        "registration_tokens",
        "registration token → allowed uses, completed uses, expiry",
    ),
    KeySpace::shared(
        7,
        "account_data",
        "user id SEP room id (empty for global) SEP type → content",
    ),
    KeySpace::shared(8, "filters", "user id SEP filter id → filter definition"),
    KeySpace::own("pdus", "event short id → PDU as canonical JSON"),
    KeySpace::own(
        "client_parts",
        "event short id → what a history page shows of it (id, type, sender, content, …)",
    ),
    KeySpace::own(
        "event_meta",
        "event short id → room, stream position, state groups, transaction id",
    ),
    KeySpace::own(
        "timeline",
        "room short id + inverted stream position (newest first) → event short id",
    ),
    KeySpace::own(
        "stream",
        "stream position → event short id, across all rooms (for sync)",
    ),
    KeySpace::shared(
        9,
        "rooms",
        "room short id → room record: version, forward extremities, depth, state group",
    ),
    KeySpace::own(
        "state_groups",
        "state group id → parent group and delta, or a full snapshot",
    ),
    KeySpace::own(
        "room_state",
        "room short id + state-key short id → event short id (current state)",
    ),
    KeySpace::shared(
        10,
        "user_rooms",
        "user short id + room short id → membership",
    ),
    KeySpace::shared(
        11,
        "room_members",
        "room short id + user short id → membership",
    ),
    KeySpace::shared(12, "aliases", "room alias → room id and creator"),
    KeySpace::shared(13, "room_aliases", "room short id SEP alias → empty"),
    KeySpace::shared(
        14,
        "public_rooms",
        "room short id → empty, for rooms listed in the public directory",
    ),
    KeySpace::shared(
        15,
        "txn_ids",
        "user id SEP device id SEP transaction id → event id",
    ),
    KeySpace::shared(
        16,
        "user_stream",
        "user short id + stream position → what changed for the user (account data …)",
    ),
    KeySpace::shared(
        17,
        "receipts",
        "room short id + user short id + receipt type SEP thread → event id, timestamp",
    ),
    KeySpace::shared(
        18,
        "receipt_stream",
        "room short id + stream position → the receipt that changed",
    ),
    KeySpace::shared(
        19,
        "receipt_rooms",
        "stream position → room short id, for readers of receipts across rooms",
    ),
    KeySpace::shared(
        20,
        "membership_stream",
        "stream position → room short id + user short id + joined (1) or left (0)",
    ),
    KeySpace::shared(
        21,
        "device_keys",
        "user id SEP device id → the device's signed identity keys",
    ),
    KeySpace::shared(
        22,
        "one_time_keys",
        "user id SEP device id SEP algorithm SEP key id → one-time key",
    ),
    KeySpace::shared(
        23,
        "fallback_keys",
        "user id SEP device id SEP algorithm → fallback key and whether it was used",
    ),
    KeySpace::shared(
        24,
        "cross_signing_keys",
        "user id SEP master|self_signing|user_signing → cross-signing key",
    ),
    KeySpace::shared(
        25,
        "key_signatures",
        "user id SEP signed key id SEP signer user id SEP signer key id → signature",
    ),
    KeySpace::shared(
        26,
        "device_list_stream",
        "stream position → user id whose devices or keys changed",
    ),
    KeySpace::shared(
        27,
        "to_device",
        "user id SEP device id SEP stream position + index → to-device message",
    ),
    KeySpace::shared(
        28,
        "backup_versions",
        "user id SEP version (u64) → backup algorithm, auth data, etag, key count",
    ),
    KeySpace::shared(
        29,
        "backup_keys",
        "user id SEP version (u64) SEP room id SEP session id → backed-up room key",
    ),
    KeySpace::shared(
        30,
        "media",
        "media id → file hash, content type, file name, size, uploader (or a pending upload)",
    ),
    KeySpace::shared(
        31,
        "media_thumbnails",
        "media id SEP width x height SEP method → thumbnail hash and content type",
    ),
    KeySpace::shared(
        32,
        "push_actions",
        "user short id + room short id + stream position → what the push rules said",
    ),
    KeySpace::shared(
        33,
        "user_notifications",
        "user short id + stream position → room short id, for /notifications",
    ),
    KeySpace::shared(34, "pushers", "user id SEP app id SEP push key → pusher"),
    KeySpace::shared(
        35,
        "push_queue",
        "stream position + user short id + push key → notification for a push gateway",
    ),
    KeySpace::shared(
        36,
        "appservices",
        "appservice id → registration added with `salon admin appservice register`",
    ),
    KeySpace::shared(
        37,
        "appservice_state",
        "appservice id → delivery cursor, next transaction id, the transaction in flight",
    ),
    KeySpace::shared(
        38,
        "unsigned_events",
        "event short id → empty: the event's PDU was stored before its signature",
    ),
];

/// The schema this build reads and writes. Opening an older database runs the
/// migrations from its version up; a newer one is refused.
pub const SCHEMA_VERSION: u64 = 2;

/// Forward migrations, indexed by the version they migrate *from*.
type Migration = fn(&Db) -> Result<()>;
const MIGRATIONS: &[Migration] = &[timeline_newest_first];

/// 1 → 2: timeline keys carry the inverted position ([`timeline_key`]). Stream
/// positions stay below 2^63, inverted ones above: an entry already rewritten is
/// recognised, so a migration cut short by a crash simply runs again.
fn timeline_newest_first(db: &Db) -> Result<()> {
    const CHUNK: usize = 10_000;
    let mut batch = Batch::default();
    let mut pending = 0;
    for item in db
        .db
        .iterator_cf(db.space("timeline").0, IteratorMode::Start)
    {
        let (k, v) = item?;
        if k.len() != 16 || u64_at(&k, 1) >= 1 << 63 {
            continue;
        }
        batch.delete(db, "timeline", &k);
        batch.put(
            db,
            "timeline",
            &timeline_key(u64_at(&k, 0), u64_at(&k, 1)),
            &v,
        );
        pending += 1;
        if pending == CHUNK {
            db.commit(std::mem::take(&mut batch))?;
            pending = 0;
        }
    }
    db.commit(batch)
}

/// Moves the entries of spaces that had a column family of their own in an older layout
/// into the shared family, under their tags, then drops the emptied family. Each chunk
/// moves atomically and durably (the copies and the deletions in one synced batch), so a
/// move cut short by a crash simply goes on at the next start.
fn share_own_families(db: &mut DB, opened: &[String]) -> Result<()> {
    const CHUNK: usize = 10_000;
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    for space in KEY_SPACES {
        let Some(tag) = space.tag else { continue };
        if !opened.iter().any(|name| name == space.name) {
            continue;
        }
        {
            let (Some(old), Some(shared)) = (db.cf_handle(space.name), db.cf_handle(SHARED_FAMILY))
            else {
                continue;
            };
            let mut batch = WriteBatch::default();
            let mut moved = 0;
            for item in db.iterator_cf(old, IteratorMode::Start) {
                let (k, v) = item?;
                batch.put_cf(shared, tagged(Some(tag), &k), v);
                batch.delete_cf(old, k);
                moved += 1;
                if moved % CHUNK == 0 {
                    db.write_opt(&std::mem::take(&mut batch), &synced)?;
                }
            }
            db.write_opt(&batch, &synced)?;
        }
        db.drop_cf(space.name)?;
    }
    Ok(())
}

/// The column families of today's layout: the shared one and the spaces' own.
fn families() -> impl Iterator<Item = &'static str> {
    std::iter::once(SHARED_FAMILY).chain(KEY_SPACES.iter().filter_map(|s| match s.tag {
        None => Some(s.name),
        Some(_) => None,
    }))
}

/// A key as stored: the space's tag, if it has one, then the key.
fn tagged(tag: Option<u8>, key: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match tag {
        None => key.into(),
        Some(t) => {
            let mut k = Vec::with_capacity(key.len() + 1);
            k.push(t);
            k.extend_from_slice(key);
            k.into()
        }
    }
}

/// Group commit of the write-ahead log. One caller at a time (the leader) syncs the
/// log, round after round while anyone still waits for a later write; the others wait,
/// blocking threads on the condition variable, async tasks on the watch channel, which
/// counts finished rounds, so that waiting takes no thread.
struct WalSync {
    state: Mutex<WalState>,
    done: parking_lot::Condvar,
    rounds: tokio::sync::watch::Sender<u64>,
}

impl Default for WalSync {
    fn default() -> Self {
        WalSync {
            state: Mutex::default(),
            done: parking_lot::Condvar::new(),
            rounds: tokio::sync::watch::channel(0).0,
        }
    }
}

#[derive(Default)]
struct WalState {
    /// Every write up to this sequence number is durable.
    synced: u64,
    /// The highest sequence number someone waits for.
    wanted: u64,
    /// A leader is syncing.
    syncing: bool,
}

/// Short ids of users, rooms and state keys, both ways. A mapping never changes once
/// given, and syncs look the same few up for every room; events, far more numerous and
/// each read seldom, are left to RocksDB's block cache.
#[derive(Default)]
struct IdCache {
    short: HashMap<Vec<u8>, u64>,
    long: HashMap<u64, String>,
}

/// Mappings each direction of the [`IdCache`] holds before it starts over.
const ID_CACHE_ENTRIES: usize = 8192;

impl IdCache {
    fn remember(&mut self, key: &[u8], short: u64) {
        let (Some(kind), Some(long)) = (key.first(), key.get(1..)) else {
            return;
        };
        if *kind == IdKind::Event as u8 {
            return;
        }
        if self.short.len() >= ID_CACHE_ENTRIES {
            self.short.clear();
        }
        if self.long.len() >= ID_CACHE_ENTRIES {
            self.long.clear();
        }
        let long = String::from_utf8_lossy(long).into_owned();
        self.short.insert(key.to_vec(), short);
        self.long.insert(short, long);
    }
}

pub struct Db {
    db: DB,
    spaces: HashMap<&'static str, &'static KeySpace>,
    wal: WalSync,
    ids: Mutex<IdCache>,
    short_lock: Mutex<()>,
    next_short: AtomicU64,
    pub stream: StreamAllocator,
}

pub struct Batch {
    inner: WriteBatch,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            inner: WriteBatch::default(),
        }
    }
}

impl Db {
    pub fn open(path: &Path, cache_mib: usize) -> Result<Arc<Self>> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", path.display())))?;
        // A block bigger than its shard of the cache is read again at every use: few
        // shards (two cores share them), and indexes and filters cut into partitions
        // of table-block size, so that a big table file's index is not one block of
        // hundreds of KiB decompressed for every lookup. The top level of each is kept
        // in the cache for as long as its table file is open.
        let mut cache_opts = LruCacheOptions::default();
        cache_opts.set_capacity(cache_mib.max(1) * 1024 * 1024);
        cache_opts.set_num_shard_bits(2);
        let cache = Cache::new_lru_cache_opts(&cache_opts);
        let mut block = BlockBasedOptions::default();
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);
        block.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        block.set_partition_filters(true);
        block.set_metadata_block_size(4096);
        block.set_cache_index_and_filter_blocks(true);
        block.set_cache_index_and_filter_blocks_with_high_priority(true);
        block.set_pin_top_level_index_and_filter(true);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(3);
        db_opts.set_max_total_wal_size(64 * 1024 * 1024);
        db_opts.set_compression_type(rust_rocksdb::DBCompressionType::Lz4);
        db_opts.set_enable_pipelined_write(true);
        // Opening table files costs RocksDB a pool of threads per column family unless
        // it does so itself (nearly half of a restart, measured); the statistics it
        // would otherwise read from every table file at open only tune compaction.
        db_opts.set_max_file_opening_threads(1);
        db_opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        db_opts.set_skip_stats_update_on_db_open(true);
        // Every commit syncs the write-ahead log. Appending to a fresh log file makes
        // each sync write the file's size (its inode) as well as the data; a log file
        // reused after a flush is overwritten in place, so its syncs write the data
        // alone. Records of a reused file carry their log's number, so old contents
        // past the end are never replayed.
        db_opts.set_recycle_log_file_num(2);
        // Files are deleted by a thread of RocksDB's own, not where they fall due: a
        // start deletes the last run's two log files (16 MiB each, prepared for
        // reuse: `Db::prepare_log`), and on a file system mounted with `discard` each
        // deletion waits for the disk to be told of the freed blocks (about 5 ms a
        // file here), which made starts 9 ms slower. RocksDB deletes at once whatever
        // would take the trash past a ratio of the table files' size (a new database's
        // are a few KiB): no ratio here, the rate is high enough that what waits in
        // the trash stays small. A start deletes what a stop left there.
        let deleter = SstFileManager::new();
        deleter.set_delete_rate_bytes_per_second(256 * 1024 * 1024);
        deleter.set_max_trash_db_ratio(1e9);
        db_opts.set_sst_file_manager(&deleter);

        let family_options = || {
            let mut o = Options::default();
            o.set_block_based_table_factory(&block);
            o.set_compression_type(rust_rocksdb::DBCompressionType::Lz4);
            o.set_bottommost_compression_type(rust_rocksdb::DBCompressionType::Zstd);
            o.set_write_buffer_size(8 * 1024 * 1024);
            o.set_arena_block_size(64 * 1024);
            o
        };
        // RocksDB opens a database only with all of its column families: besides the
        // families of today's layout, those an older layout gave the spaces that now
        // share one (moved below), and any this build does not know (left alone).
        let existing = if path.join("CURRENT").exists() {
            DB::list_cf(&db_opts, path)?
        } else {
            Vec::new()
        };
        let mut families: Vec<String> = families().map(str::to_owned).collect();
        for name in existing {
            if !families.contains(&name) {
                families.push(name);
            }
        }
        let mut db = DB::open_cf_descriptors(
            &db_opts,
            path,
            families
                .iter()
                .map(|name| ColumnFamilyDescriptor::new(name, family_options())),
        )
        .map_err(|e| {
            if e.to_string().contains("lock") {
                Error::internal(format!(
                    "the database at {} is in use by another Salon process; stop it first",
                    path.display()
                ))
            } else {
                Error::from(e)
            }
        })?;
        share_own_families(&mut db, &families)?;
        let this = Self {
            db,
            spaces: KEY_SPACES.iter().map(|s| (s.name, s)).collect(),
            wal: WalSync::default(),
            ids: Mutex::new(IdCache::default()),
            short_lock: Mutex::new(()),
            next_short: AtomicU64::new(1),
            stream: StreamAllocator::new(0),
        };
        this.check_schema()?;
        let last_short = this.last_key_u64("longids")?.unwrap_or(0);
        this.next_short.store(last_short + 1, Ordering::SeqCst);
        let last_pos = this.last_key_u64("stream")?.unwrap_or(0);
        let meta_pos = this
            .get("meta", b"stream_position")?
            .map(|v| decode_u64(&v))
            .unwrap_or(0);
        this.stream.reset(last_pos.max(meta_pos));
        Ok(Arc::new(this))
    }

    fn check_schema(&self) -> Result<()> {
        let stored = self.get("meta", b"schema_version")?.map(|v| decode_u64(&v));
        match stored {
            None => self.put_durable("meta", b"schema_version", &SCHEMA_VERSION.to_be_bytes()),
            Some(v) if v > SCHEMA_VERSION => Err(Error::internal(format!(
                "the database has schema version {v}, newer than this build's {SCHEMA_VERSION}; upgrade Salon"
            ))),
            Some(mut v) => {
                while v < SCHEMA_VERSION {
                    let migrate = MIGRATIONS.get(v as usize - 1).ok_or_else(|| {
                        Error::internal(format!("no migration from schema version {v}"))
                    })?;
                    migrate(self)?;
                    v += 1;
                    self.put_durable("meta", b"schema_version", &v.to_be_bytes())?;
                }
                Ok(())
            }
        }
    }

    /// The column family a key space lives in, and the tag its keys carry there.
    fn space(&self, name: &str) -> (&rust_rocksdb::ColumnFamily, Option<u8>) {
        let space = self
            .spaces
            .get(name)
            .unwrap_or_else(|| panic!("key space {name} is not declared"));
        let family = self
            .db
            .cf_handle(space.family())
            .unwrap_or_else(|| panic!("column family {} is not open", space.family()));
        (family, space.tag)
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (family, tag) = self.space(cf);
        Ok(self.db.get_cf(family, tagged(tag, key))?)
    }

    /// Several keys of one space at once (RocksDB batches the table lookups);
    /// the values come back in the order of `keys`.
    pub fn get_many(&self, cf: &str, keys: &[[u8; 8]]) -> Result<Vec<Option<Vec<u8>>>> {
        self.get_many_map(cf, keys, |_, v| Ok(v.to_vec()))
    }

    /// Like [`Db::get_many`], handing each value (with the index of its key) to
    /// `decode` where RocksDB holds it instead of copying it out first.
    pub fn get_many_map<T>(
        &self,
        cf: &str,
        keys: &[[u8; 8]],
        mut decode: impl FnMut(usize, &[u8]) -> Result<T>,
    ) -> Result<Vec<Option<T>>> {
        self.get_many_pinned(cf, keys)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| v.map(|v| decode(i, &v)).transpose())
            .collect()
    }

    /// Like [`Db::get_many`], the values left where RocksDB holds them (pinned) for as
    /// long as the caller keeps them: for reads that only look into the values and
    /// should not pay for a copy of each.
    pub fn get_many_pinned(&self, cf: &str, keys: &[[u8; 8]]) -> Result<Vec<Option<Pinned<'_>>>> {
        let (family, tag) = self.space(cf);
        let mut sorted: Vec<(usize, &[u8; 8])> = keys.iter().enumerate().collect();
        sorted.sort_by_key(|(_, k)| **k);
        let stored: Vec<_> = sorted.iter().map(|(_, k)| tagged(tag, &k[..])).collect();
        let values = self
            .db
            .batched_multi_get_cf(family, stored.iter().map(|k| &k[..]), true);
        let mut out: Vec<Option<Pinned<'_>>> =
            std::iter::repeat_with(|| None).take(keys.len()).collect();
        for ((i, _), v) in sorted.into_iter().zip(values) {
            out[i] = v?.map(Pinned);
        }
        Ok(out)
    }

    pub fn exists(&self, cf: &str, key: &[u8]) -> Result<bool> {
        let (family, tag) = self.space(cf);
        Ok(self.db.get_pinned_cf(family, tagged(tag, key))?.is_some())
    }

    /// A single durable write, outside any batch.
    pub fn put_durable(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let mut b = Batch::default();
        b.put(self, cf, key, value);
        self.commit(b)
    }

    /// Commit a batch atomically; when this returns the batch survives a crash.
    pub fn commit(&self, batch: Batch) -> Result<()> {
        let seq = self.write(batch)?;
        self.sync_to(seq)
    }

    /// Apply a batch atomically and return its sequence number. It is readable at once
    /// but not yet durable: call [`Db::sync_to`] before telling anyone it is saved.
    pub fn write(&self, batch: Batch) -> Result<u64> {
        if batch.inner.is_empty() {
            // Nothing to apply: everything the caller wrote before is already covered.
            return Ok(self.db.latest_sequence_number());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        self.db.write_opt(&batch.inner, &opts)?;
        Ok(self.db.latest_sequence_number())
    }

    /// Make every write so far durable.
    pub fn sync_all(&self) -> Result<()> {
        self.sync_to(self.db.latest_sequence_number())
    }

    /// Make every write up to sequence `seq` durable, blocking the thread. Group commit:
    /// while one caller syncs the write-ahead log, the others wait and are covered by the
    /// same or the next sync, so many concurrent writers share each fsync.
    pub fn sync_to(&self, seq: u64) -> Result<()> {
        let mut state = self.wal.state.lock();
        loop {
            if state.synced >= seq {
                return Ok(());
            }
            state.wanted = state.wanted.max(seq);
            if state.syncing {
                self.wal.done.wait(&mut state);
                continue;
            }
            state.syncing = true;
            drop(state);
            self.lead_syncs()?;
            state = self.wal.state.lock();
        }
    }

    /// [`Db::sync_to`] for async callers: a task that finds a sync under way waits for
    /// it without holding a thread; only a task that must lead takes a blocking thread.
    pub async fn sync_to_async(self: &Arc<Self>, seq: u64) -> Result<()> {
        let mut rounds = self.wal.rounds.subscribe();
        loop {
            let lead = {
                let mut state = self.wal.state.lock();
                if state.synced >= seq {
                    return Ok(());
                }
                state.wanted = state.wanted.max(seq);
                !std::mem::replace(&mut state.syncing, true)
            };
            if lead {
                let db = self.clone();
                match tokio::task::spawn_blocking(move || db.lead_syncs()).await {
                    Ok(led) => led?,
                    Err(e) => {
                        // The leader never ran or did not finish: let the next one lead.
                        self.wal.state.lock().syncing = false;
                        self.end_sync_round();
                        return Err(Error::internal(format!("log sync task failed: {e}")));
                    }
                }
                continue;
            }
            // A round finished: covered now, or lead the next one.
            rounds
                .changed()
                .await
                .map_err(|_| Error::internal("the log sync rounds stopped"))?;
        }
    }

    /// Wake every waiter, blocking or async, to look at the state after a sync round.
    fn end_sync_round(&self) {
        self.wal.done.notify_all();
        self.wal.rounds.send_modify(|r| *r += 1);
    }

    /// Sync the log as the leader, again while some waiter wants a write the last round
    /// did not cover, then step down. A failed round ends the leadership with its error;
    /// whoever still waits leads the next attempt and meets the error itself if it lasts.
    fn lead_syncs(&self) -> Result<()> {
        loop {
            let target = self.db.latest_sequence_number();
            let result = self.db.flush_wal(true);
            let mut state = self.wal.state.lock();
            if result.is_ok() {
                state.synced = state.synced.max(target);
            }
            let more = result.is_ok() && state.wanted > state.synced;
            if !more {
                state.syncing = false;
            }
            drop(state);
            self.end_sync_round();
            result?;
            if !more {
                return Ok(());
            }
        }
    }

    /// All entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        cf: &str,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>)>> + 'a {
        self.scan_from(cf, prefix, prefix, true)
    }

    /// Entries from `from` (inclusive) in the given direction, while keys keep `prefix`.
    pub fn scan_from<'a>(
        &'a self,
        cf: &str,
        prefix: &'a [u8],
        from: &[u8],
        forward: bool,
    ) -> impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>)>> + 'a {
        let (family, tag) = self.space(cf);
        let dir = if forward {
            Direction::Forward
        } else {
            Direction::Reverse
        };
        let stored_prefix = tagged(tag, prefix).into_owned();
        let opts = within(&stored_prefix);
        self.db
            .iterator_cf_opt(family, opts, IteratorMode::From(&tagged(tag, from), dir))
            .map(|r| r.map_err(Error::from))
            .take_while(move |r| {
                r.as_ref()
                    .map(|(k, _)| k.starts_with(&stored_prefix))
                    .unwrap_or(true)
            })
            .map(move |r| {
                r.map(|(k, v)| match tag {
                    None => (k, v),
                    Some(_) => (k[1..].into(), v),
                })
            })
    }

    /// Like [`Db::scan_from`], without copying each entry: `visit` sees the key and the
    /// value in place and says whether to go on. RocksDB is told where the prefix
    /// ends, so it does not read table blocks beyond it.
    pub fn visit_from(
        &self,
        cf: &str,
        prefix: &[u8],
        from: &[u8],
        forward: bool,
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let (family, tag) = self.space(cf);
        let prefix = tagged(tag, prefix);
        let mut it = self.db.raw_iterator_cf_opt(family, within(&prefix));
        if forward {
            it.seek(tagged(tag, from));
        } else {
            it.seek_for_prev(tagged(tag, from));
        }
        let skip = usize::from(tag.is_some());
        while let Some((k, v)) = it.item() {
            if !k.starts_with(&prefix) || !visit(&k[skip..], v) {
                break;
            }
            if forward {
                it.next();
            } else {
                it.prev();
            }
        }
        Ok(it.status()?)
    }

    /// The first eight bytes of the last key in a space, as a number.
    fn last_key_u64(&self, cf: &str) -> Result<Option<u64>> {
        let (family, tag) = self.space(cf);
        let mut it = self
            .db
            .raw_iterator_cf_opt(family, within(&tagged(tag, &[])));
        it.seek_to_last();
        match it.key() {
            Some(k) => {
                let k = &k[usize::from(tag.is_some())..];
                Ok((k.len() >= 8).then(|| decode_u64(&k[..8])))
            }
            None => {
                it.status()?;
                Ok(None)
            }
        }
    }

    /// The short id of a long identifier of the given kind, if it has one.
    pub fn short_id(&self, kind: IdKind, long: &str) -> Result<Option<u64>> {
        let key = kind.key(long);
        if let Some(short) = self.ids.lock().short.get(&key) {
            return Ok(Some(*short));
        }
        let Some(v) = self.get("shortids", &key)? else {
            return Ok(None);
        };
        let short = decode_u64(&v);
        self.ids.lock().remember(&key, short);
        Ok(Some(short))
    }

    /// The short id of a long identifier, allocating one when new. A new mapping is
    /// written at once (unsynced); the durable commit that uses it syncs the log up to it.
    pub fn get_or_create_short_id(&self, kind: IdKind, long: &str) -> Result<u64> {
        if let Some(id) = self.short_id(kind, long)? {
            return Ok(id);
        }
        let _guard = self.short_lock.lock();
        if let Some(id) = self.short_id(kind, long)? {
            return Ok(id);
        }
        self.new_short_id(kind.key(long))
    }

    /// A short id for a long identifier that cannot have one yet, without looking:
    /// the id of an event this server has just hashed (its hash covers its place in
    /// the room, so no stored event has it), or of a room it is creating under the
    /// room's lock. Nobody else can ask for that identifier before `batch` commits, so
    /// the mapping is staged there, stored with what uses it instead of in a write of
    /// its own. A batch never committed leaves its short id unused.
    pub fn create_short_id(&self, batch: &mut Batch, kind: IdKind, long: &str) -> u64 {
        let key = kind.key(long);
        let id = self.stage_short_id(batch, &key);
        self.ids.lock().remember(&key, id);
        id
    }

    /// The next short id, its mapping to and from `key` staged in `batch`.
    fn stage_short_id(&self, batch: &mut Batch, key: &[u8]) -> u64 {
        let id = self.next_short.fetch_add(1, Ordering::SeqCst);
        batch.put(self, "shortids", key, &id.to_be_bytes());
        batch.put(self, "longids", &id.to_be_bytes(), key);
        id
    }

    /// A new mapping, written at once: [`Db::get_or_create_short_id`] hands it to any
    /// caller from then on, whichever of their batches commits first.
    fn new_short_id(&self, key: Vec<u8>) -> Result<u64> {
        let mut b = Batch::default();
        let id = self.stage_short_id(&mut b, &key);
        self.db.write(&b.inner)?;
        self.ids.lock().remember(&key, id);
        Ok(id)
    }

    /// The long identifier behind a short id.
    pub fn long_id(&self, short: u64) -> Result<Option<String>> {
        if let Some(long) = self.ids.lock().long.get(&short) {
            return Ok(Some(long.clone()));
        }
        let Some(key) = self.get("longids", &short.to_be_bytes())? else {
            return Ok(None);
        };
        self.ids.lock().remember(&key, short);
        Ok(Some(
            String::from_utf8_lossy(key.get(1..).unwrap_or_default()).into_owned(),
        ))
    }

    /// A fresh number from the short-id sequence, for things that have no long name
    /// (state groups).
    pub fn next_sequence(&self) -> u64 {
        self.next_short.fetch_add(1, Ordering::SeqCst)
    }

    /// Flush memtables (used before a clean shutdown; correctness never depends on it).
    pub fn flush(&self) -> Result<()> {
        for name in families() {
            if let Some(family) = self.db.cf_handle(name) {
                self.db.flush_cf(family)?;
            }
        }
        Ok(())
    }

    /// Gives the write-ahead log files of at least `bytes` that commits overwrite in
    /// place, the current one and the next, and says whether the log now writes into
    /// one.
    ///
    /// A sync of a log file that grows must also write the file's new size (its inode:
    /// a second request to the disk, or a journal entry where the file system keeps a
    /// journal); a sync of a reused file writes the data alone (on ext4 here: a median
    /// `fdatasync` of 0.16 against 0.12 ms, and a shorter tail). RocksDB reuses only
    /// the log files of the running process, once every column family has flushed what
    /// they hold, so after a start every commit appends until the memtables have
    /// flushed twice, which on a quiet server can take days. This fills the current log with log-only records (never put into a
    /// memtable or a table file, passed over when the log is replayed), in synced
    /// steps so that no commit waits for more than one of them, then flushes the
    /// memtables so that RocksDB moves to a new log and keeps the filled one for reuse;
    /// fills the new one and flushes again, so that the first file comes back as the
    /// current log and the second waits for reuse after it (a retired log file is cut
    /// to what was written into it, so after that the files keep the length the log
    /// reaches between flushes).
    pub fn prepare_log(&self, bytes: usize) -> Result<bool> {
        if bytes == 0 {
            return Ok(false);
        }
        let mut filled = 0;
        for round in 0u64..6 {
            let size = self.current_log_size()?;
            if size >= bytes as u64 {
                if filled >= 2 {
                    return Ok(true);
                }
            } else {
                self.fill_log(bytes - size as usize)?;
                filled += 1;
            }
            // A flush needs something to flush: the round's number.
            self.put_durable("meta", b"log_switches", &round.to_be_bytes())?;
            self.flush()?;
            // The retired file is listed for reuse just after the flush returns.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(false)
    }

    /// Appends `bytes` of log-only records to the current log file.
    fn fill_log(&self, bytes: usize) -> Result<()> {
        const STEP: usize = 256 * 1024;
        let mut synced = WriteOptions::default();
        synced.set_sync(true);
        let filler = vec![0u8; STEP];
        let mut written = 0;
        while written < bytes {
            let mut batch = WriteBatch::default();
            batch.put_log_data(&filler[..STEP.min(bytes - written)]);
            self.db.write_opt(&batch, &synced)?;
            written += STEP;
        }
        Ok(())
    }

    /// The size of the log file RocksDB writes into: the one of the highest number (a
    /// reused file is renamed to its new number).
    fn current_log_size(&self) -> Result<u64> {
        let mut newest: Option<(u64, u64)> = None;
        let entries = std::fs::read_dir(self.db.path())
            .map_err(|e| Error::internal(format!("cannot list the database: {e}")))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if newest.is_none_or(|(n, _)| number > n) {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                newest = Some((number, size));
            }
        }
        Ok(newest.map_or(0, |(_, size)| size))
    }
}

impl Batch {
    pub fn put(&mut self, db: &Db, cf: &str, key: &[u8], value: &[u8]) {
        let (family, tag) = db.space(cf);
        self.inner.put_cf(family, tagged(tag, key), value);
    }
    pub fn delete(&mut self, db: &Db, cf: &str, key: &[u8]) {
        let (family, tag) = db.space(cf);
        self.inner.delete_cf(family, tagged(tag, key));
    }
}

/// Read options that keep an iterator inside `prefix` (no bounds for an empty one):
/// without them RocksDB steps over deleted entries beyond the prefix (another space's,
/// in a shared family) only to find the end.
fn within(prefix: &[u8]) -> ReadOptions {
    let mut opts = ReadOptions::default();
    if !prefix.is_empty() {
        opts.set_iterate_lower_bound(prefix);
        if let Some(end) = prefix_end(prefix) {
            opts.set_iterate_upper_bound(end);
        }
    }
    opts
}

/// The first key after every key that starts with `prefix`; none when the prefix is
/// all 0xff bytes.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_are_stable_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let db = Db::open(dir.path(), 8).unwrap();
            let a = db.get_or_create_short_id(IdKind::Room, "!a:x").unwrap();
            let b = db.get_or_create_short_id(IdKind::User, "@b:x").unwrap();
            assert_eq!(a, db.get_or_create_short_id(IdKind::Room, "!a:x").unwrap());
            assert_ne!(a, b);
            db.put_durable("meta", b"x", b"y").unwrap();
            (a, b)
        };
        let db = Db::open(dir.path(), 8).unwrap();
        assert_eq!(db.short_id(IdKind::Room, "!a:x").unwrap(), Some(a));
        assert_eq!(db.long_id(b).unwrap().as_deref(), Some("@b:x"));
        let c = db.get_or_create_short_id(IdKind::Event, "$c").unwrap();
        assert!(c > a && c > b, "new ids never reuse old ones");
        let mut staged = Batch::default();
        let d = db.create_short_id(&mut staged, IdKind::Event, "$d");
        assert!(d > c);
        assert_eq!(db.long_id(d).unwrap(), None, "stored only with its batch");
        db.commit(staged).unwrap();
        assert_eq!(db.short_id(IdKind::Event, "$d").unwrap(), Some(d));
        assert_eq!(db.long_id(d).unwrap().as_deref(), Some("$d"));
        assert_eq!(db.get_or_create_short_id(IdKind::Event, "$d").unwrap(), d);
    }

    /// A prepared log is the current log, the next file is prepared too, commits
    /// overwrite the current one without growing it, and what they wrote there (and
    /// before) is read back after a reopen, with the filler past the last write never
    /// replayed.
    #[test]
    fn a_prepared_log_is_overwritten_in_place_and_replayed() {
        const MIB: usize = 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), 8).unwrap();
            db.put_durable("meta", b"before", b"1").unwrap();
            let fresh = db.current_log_size().unwrap();
            assert!(fresh < MIB as u64, "a new log starts small: {fresh}");
            assert!(db.prepare_log(2 * MIB).unwrap());
            let prepared = db.current_log_size().unwrap();
            assert!(prepared >= 2 * MIB as u64, "{prepared}");
            let full = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .filter(|e| e.metadata().unwrap().len() >= 2 * MIB as u64)
                .count();
            assert_eq!(full, 2, "the current file and the next one are prepared");
            for i in 0u32..200 {
                db.put_durable("meta", format!("after{i}").as_bytes(), &[7; 1000])
                    .unwrap();
            }
            assert_eq!(
                db.current_log_size().unwrap(),
                prepared,
                "overwritten in place"
            );
            assert!(!db.prepare_log(0).unwrap());
        }
        let db = Db::open(dir.path(), 8).unwrap();
        assert_eq!(
            db.get("meta", b"before").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        for i in 0u32..200 {
            assert_eq!(
                db.get("meta", format!("after{i}").as_bytes())
                    .unwrap()
                    .as_deref(),
                Some(&[7u8; 1000][..])
            );
        }
        assert_eq!(db.get("meta", b"after200").unwrap(), None);
        // The last run's log files are deleted by RocksDB's deletion thread, not left
        // behind in the trash.
        let leftovers = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".trash") || n.ends_with(".log"))
                .count()
        };
        let start = std::time::Instant::now();
        while leftovers() > 1 && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(leftovers(), 1, "only the new run's log is left");
    }

    /// Async and blocking writers share the log syncs; each returns only once its own
    /// write is covered, and the leadership is given back at the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_covers_every_writer() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let mut tasks = Vec::new();
        for i in 0u32..64 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let mut b = Batch::default();
                b.put(&db, "meta", format!("k{i}").as_bytes(), b"v");
                let seq = db.write(b).unwrap();
                if i % 4 == 0 {
                    let db2 = db.clone();
                    tokio::task::spawn_blocking(move || db2.sync_to(seq))
                        .await
                        .unwrap()
                        .unwrap();
                } else {
                    db.sync_to_async(seq).await.unwrap();
                }
                assert!(
                    db.wal.state.lock().synced >= seq,
                    "returned before its sync"
                );
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let state = db.wal.state.lock();
        assert!(!state.syncing);
        assert!(state.synced >= state.wanted);
        assert!(*db.wal.rounds.borrow() >= 1);
        drop(state);
        // An empty batch writes nothing and is covered at once.
        let seq = db.write(Batch::default()).unwrap();
        assert_eq!(seq, db.db.latest_sequence_number());
        db.sync_to_async(seq).await.unwrap();
    }

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }

    /// Visits stay inside the prefix both ways, start at `from` (or the nearest key on
    /// the way), and stop when told.
    #[test]
    fn visits_walk_one_prefix_from_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let mut b = Batch::default();
        for (p, n) in [(1u64, 1u64), (1, 2), (1, 4), (2, 1), (2, 3), (0, 9)] {
            b.put(&db, "timeline", &u64_key(&[p, n]), &n.to_be_bytes());
        }
        db.commit(b).unwrap();
        let prefix = 1u64.to_be_bytes();
        let walk = |from: u64, forward: bool, stop: usize| {
            let mut seen = Vec::new();
            db.visit_from(
                "timeline",
                &prefix,
                &u64_key(&[1, from]),
                forward,
                |k, v| {
                    assert_eq!(&k[8..], v);
                    seen.push(decode_u64(v));
                    seen.len() < stop
                },
            )
            .unwrap();
            seen
        };
        assert_eq!(walk(2, true, 10), vec![2, 4]);
        assert_eq!(walk(3, true, 10), vec![4]);
        assert_eq!(walk(3, false, 10), vec![2, 1]);
        assert_eq!(walk(9, false, 10), vec![4, 2, 1]);
        assert_eq!(walk(0, true, 2), vec![1, 2]);
        assert_eq!(walk(0, false, 10), Vec::<u64>::new());
    }

    #[test]
    fn batched_reads_answer_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let mut b = Batch::default();
        for n in [3u64, 1, 7] {
            b.put(&db, "pdus", &n.to_be_bytes(), format!("v{n}").as_bytes());
        }
        db.commit(b).unwrap();
        db.flush().unwrap();
        let mut b = Batch::default();
        b.put(&db, "pdus", &9u64.to_be_bytes(), b"v9");
        db.commit(b).unwrap();
        let keys: Vec<[u8; 8]> = [7u64, 2, 9, 1, 3].iter().map(|n| n.to_be_bytes()).collect();
        // Decoding in place is told which key each value belongs to.
        let decoded = db
            .get_many_map("pdus", &keys, |i, v| Ok((i, v.to_vec())))
            .unwrap();
        for (i, d) in decoded.iter().enumerate() {
            if let Some((at, v)) = d {
                assert_eq!(*at, i);
                assert_eq!(
                    v[1..],
                    *format!("{}", u64::from_be_bytes(keys[i])).as_bytes()
                );
            }
        }
        assert_eq!(decoded.iter().filter(|d| d.is_some()).count(), 4);
        let got = db.get_many("pdus", &keys).unwrap();
        let got: Vec<Option<&[u8]>> = got.iter().map(|v| v.as_deref()).collect();
        assert_eq!(
            got,
            [
                Some(&b"v7"[..]),
                None,
                Some(b"v9"),
                Some(b"v1"),
                Some(b"v3")
            ]
        );
    }

    #[test]
    fn prefix_scans_stay_inside_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let mut b = Batch::default();
        for (k, v) in [
            (&b"a\xffone"[..], &b"1"[..]),
            (b"a\xfftwo", b"2"),
            (b"b\xffone", b"3"),
        ] {
            b.put(&db, "filters", k, v);
        }
        db.commit(b).unwrap();
        let got: Vec<_> = db
            .scan_prefix("filters", b"a\xff")
            .map(|r| r.unwrap().1.to_vec())
            .collect();
        assert_eq!(got, vec![b"1".to_vec(), b"2".to_vec()]);
    }

    #[test]
    fn timelines_of_schema_1_are_rewritten_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), 8).unwrap();
            let mut b = Batch::default();
            // Two rooms in the old layout: room short id, then the plain position.
            for (room, pos, event) in [(5u64, 10u64, 100u64), (5, 12, 101), (6, 11, 102)] {
                b.put(
                    &db,
                    "timeline",
                    &u64_key(&[room, pos]),
                    &event.to_be_bytes(),
                );
            }
            b.put(&db, "meta", b"schema_version", &1u64.to_be_bytes());
            db.commit(b).unwrap();
        }
        let db = Db::open(dir.path(), 8).unwrap();
        let version = db.get("meta", b"schema_version").unwrap().unwrap();
        assert_eq!(decode_u64(&version), SCHEMA_VERSION);
        let room5: Vec<(u64, u64)> = db
            .scan_prefix("timeline", &5u64.to_be_bytes())
            .map(|r| {
                let (k, v) = r.unwrap();
                (timeline_key_pos(&k), decode_u64(&v))
            })
            .collect();
        assert_eq!(room5, vec![(12, 101), (10, 100)], "newest first");
        let all = db.scan_prefix("timeline", &[]).count();
        assert_eq!(all, 3, "old keys are gone, none was lost");
        // Running the migration again (a crash before the version was saved) changes
        // nothing.
        timeline_newest_first(&db).unwrap();
        let again: Vec<_> = db
            .scan_prefix("timeline", &[])
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(again.len(), 3);
        assert!(again.iter().all(|k| u64_at(k, 1) >= 1 << 63));
    }

    #[test]
    fn key_spaces_have_distinct_names_and_tags() {
        let mut names = std::collections::HashSet::new();
        let mut tags = std::collections::HashSet::new();
        for space in KEY_SPACES {
            assert!(names.insert(space.name), "{} twice", space.name);
            if let Some(t) = space.tag {
                assert!(tags.insert(t), "tag {t} twice");
                assert!(t < u8::MAX, "a tag needs a next byte to end its scans");
            }
        }
    }

    #[test]
    fn spaces_sharing_a_family_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        // "filters" and "account_data" share the default family under neighbouring tags.
        let mut b = Batch::default();
        for k in [&b"a"[..], b"b", b"\xff\xff"] {
            b.put(&db, "filters", k, b"f");
            b.put(&db, "account_data", k, b"d");
            b.put(&db, "users", k, b"u");
        }
        db.commit(b).unwrap();
        let keys = |cf, forward: bool, from: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
            db.scan_from(cf, &[], from, forward)
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.to_vec(), v.to_vec())
                })
                .collect()
        };
        let filters = vec![
            (b"a".to_vec(), b"f".to_vec()),
            (b"b".to_vec(), b"f".to_vec()),
            (b"\xff\xff".to_vec(), b"f".to_vec()),
        ];
        assert_eq!(keys("filters", true, &[]), filters);
        let mut backwards = filters.clone();
        backwards.reverse();
        assert_eq!(keys("filters", false, &[0xff; 4]), backwards);
        let mut visited = Vec::new();
        db.visit_from("account_data", &[], &[0xff; 4], false, |k, v| {
            visited.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        assert_eq!(visited.len(), 3);
        assert!(visited.iter().all(|(_, v)| v == b"d"));
        assert_eq!(db.get("users", b"b").unwrap().as_deref(), Some(&b"u"[..]));
        assert!(!db.exists("users", b"c").unwrap());
        let mut b = Batch::default();
        b.delete(&db, "filters", b"b");
        db.commit(b).unwrap();
        assert_eq!(db.get("filters", b"b").unwrap(), None);
        assert_eq!(
            db.get("account_data", b"b").unwrap().as_deref(),
            Some(&b"d"[..])
        );
    }

    #[test]
    fn spaces_that_had_families_of_their_own_are_moved_into_the_shared_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout before the small spaces shared a family: one family per space.
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let old = DB::open_cf(&opts, dir.path(), KEY_SPACES.iter().map(|s| s.name)).unwrap();
            let put = |cf: &str, k: &[u8], v: &[u8]| {
                old.put_cf(old.cf_handle(cf).unwrap(), k, v).unwrap();
            };
            put("meta", b"schema_version", &SCHEMA_VERSION.to_be_bytes());
            put("meta", b"stream_position", &41u64.to_be_bytes());
            put("users", b"@a:x", b"alice");
            put("users", b"@b:x", b"bob");
            put("stream", &40u64.to_be_bytes(), &7u64.to_be_bytes());
            put("longids", &9u64.to_be_bytes(), b"\x01$e");
            // A move cut short: one entry already in the shared family.
            let shared = old.cf_handle(SHARED_FAMILY).unwrap();
            old.put_cf(shared, tagged(KEY_SPACES[4].tag, b"@c:x\xffD"), b"dev")
                .unwrap();
            assert_eq!(KEY_SPACES[4].name, "devices");
            old.flush_cf(old.cf_handle("users").unwrap()).unwrap();
        }
        let db = Db::open(dir.path(), 8).unwrap();
        let users: Vec<_> = db
            .scan_prefix("users", &[])
            .map(|r| r.unwrap())
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            users,
            vec![
                (b"@a:x".to_vec(), b"alice".to_vec()),
                (b"@b:x".to_vec(), b"bob".to_vec())
            ]
        );
        assert_eq!(
            db.get("devices", b"@c:x\xffD").unwrap().as_deref(),
            Some(&b"dev"[..])
        );
        // Spaces with a family of their own are where they were.
        assert_eq!(db.stream.visible(), 41, "read from the moved meta space");
        assert_eq!(db.next_sequence(), 10);
        drop(db);
        let left = DB::list_cf(&Options::default(), dir.path()).unwrap();
        let mut expected: Vec<String> = families().map(str::to_owned).collect();
        let mut left_sorted = left.clone();
        left_sorted.sort();
        expected.sort();
        assert_eq!(left_sorted, expected, "the old families are dropped");
        // And the next start finds everything again.
        let db = Db::open(dir.path(), 8).unwrap();
        assert_eq!(
            db.get("users", b"@a:x").unwrap().as_deref(),
            Some(&b"alice"[..])
        );
        assert_eq!(
            db.get("meta", b"schema_version")
                .map(|v| v.map(|v| decode_u64(&v)))
                .unwrap(),
            Some(SCHEMA_VERSION)
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), 8).unwrap();
            db.put_durable(
                "meta",
                b"schema_version",
                &(SCHEMA_VERSION + 1).to_be_bytes(),
            )
            .unwrap();
        }
        let err = Db::open(dir.path(), 8).err().expect("refused").to_string();
        assert!(err.contains("newer"), "{err}");
    }
}
