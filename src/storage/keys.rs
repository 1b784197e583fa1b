//! Key codecs shared by the services: big-endian numbers and separated strings.

/// Separates string parts of a key; 0xff never occurs in UTF-8.
pub const SEP: u8 = 0xff;

/// What a short id stands for; the kind byte keeps equal strings of different kinds apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum IdKind {
    Event = b'e',
    Room = b'r',
    User = b'u',
    /// An `(event type, state key)` pair.
    StateKey = b's',
}

impl IdKind {
    pub fn key(self, long: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(long.len() + 1);
        k.push(self as u8);
        k.extend_from_slice(long.as_bytes());
        k
    }
}

pub fn decode_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(buf)
}

/// Join string parts with [`SEP`].
pub fn str_key(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(SEP);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// `parts` joined with [`SEP`] and a trailing [`SEP`]: a prefix for scans.
pub fn str_prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = str_key(parts);
    k.push(SEP);
    k
}

/// The key of a room's timeline entry: the room, then the position inverted, so that
/// a room's newest events come first. Reading the latest events of a room (every
/// sync, every backward page) is then a forward scan, which RocksDB's memtables
/// (where recent events live) answer far faster than a backward one.
pub fn timeline_key(room_short: u64, pos: u64) -> Vec<u8> {
    u64_key(&[room_short, !pos])
}

/// The stream position in a key made by [`timeline_key`].
pub fn timeline_key_pos(key: &[u8]) -> u64 {
    !decode_u64(key.get(8..).unwrap_or_default())
}

/// Concatenation of big-endian u64s.
pub fn u64_key(parts: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.len() * 8);
    for p in parts {
        k.extend_from_slice(&p.to_be_bytes());
    }
    k
}

/// The `i`th big-endian u64 of a key.
pub fn u64_at(key: &[u8], i: usize) -> u64 {
    decode_u64(&key[i * 8..(i + 1) * 8])
}
