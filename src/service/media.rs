//! The media repository: uploads stored on disk by their sha256 (so a file uploaded
//! twice is kept once), metadata in RocksDB, thumbnails made once per size and cached.
//!
//! A file is written to a temporary name, synced, renamed into place and its directory
//! synced before the metadata that points at it commits: an upload that was answered
//! survives a crash, and a crash never leaves metadata pointing at half a file.

use std::{
    io::{Cursor, Write},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use image::{DynamicImage, ImageFormat, ImageReader, Limits, imageops::FilterType};
use ruma::{
    OwnedMxcUri, ServerName, UserId, api::client::media::get_content_thumbnail::v3::Method,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{globals::random_string, users::now_ms};
use crate::{
    config::MediaConfig,
    error::{Error, Result},
    storage::{Db, str_key},
};

/// How long an id from `/media/v1/create` waits for its upload.
const PENDING_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Longest a download waits for a pending upload.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// At most this many created-but-not-uploaded ids per user.
const MAX_PENDING_PER_USER: usize = 50;

/// Thumbnail sizes Salon makes; a request gets the smallest at least as large, so that
/// nobody can fill the disk by asking for every size.
const CROP_SIZES: &[(u32, u32)] = &[(32, 32), (96, 96), (320, 320)];
const SCALE_SIZES: &[(u32, u32)] = &[(320, 240), (640, 480), (800, 600), (1600, 1200)];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MediaRecord {
    /// The file's sha256 (hex); `None` while an id from `/create` awaits its upload.
    pub sha256: Option<String>,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub size: u64,
    pub uploader: String,
    pub created_ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_expires_at: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct ThumbnailRecord {
    sha256: String,
    content_type: String,
}

/// A file to send back.
pub struct MediaFile {
    pub bytes: Vec<u8>,
    pub content_type: Option<String>,
    pub filename: Option<String>,
}

pub struct Media {
    db: Arc<Db>,
    dir: PathBuf,
    config: MediaConfig,
    uploaded: tokio::sync::Notify,
    /// Ids from `/create` whose upload is being stored: a second upload for one of
    /// them is refused as an overwrite.
    uploading: super::locks::Holding<String>,
    /// Held by a user's `/create` from counting their pending ids to writing the new
    /// one, so that calls at once cannot pass the limit together.
    creating: super::locks::UserLocks,
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Media ids are ours, so only characters we generate are accepted.
fn valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Media {
    pub fn new(db: Arc<Db>, data_dir: &std::path::Path, config: MediaConfig) -> Result<Self> {
        let dir = data_dir.join("media");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self {
            db,
            dir,
            config,
            uploaded: tokio::sync::Notify::new(),
            uploading: Default::default(),
            creating: Default::default(),
        })
    }

    pub fn max_upload_bytes(&self) -> usize {
        self.config.max_upload_bytes
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(&sha256[..2]).join(sha256)
    }

    /// Write the bytes under their hash (once) and sync them to disk.
    async fn store_file(&self, bytes: Vec<u8>) -> Result<(String, Vec<u8>)> {
        let sha256 = hex_sha256(&bytes);
        let path = self.path_of(&sha256);
        let hash = sha256.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
                return Ok(bytes);
            }
            let dir = path.parent().expect("media paths have a parent");
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".{hash}.{}", random_string(8)));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(bytes)
        })
        .await
        .map_err(|e| Error::internal(format!("media write task failed: {e}")))?
        .map(|bytes| (sha256, bytes))
        .map_err(|e| Error::internal(format!("cannot store media: {e}")))
    }

    fn record(&self, media_id: &str) -> Result<Option<MediaRecord>> {
        match self.db.get("media", media_id.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn check_size(&self, len: usize) -> Result<()> {
        if len > self.config.max_upload_bytes {
            return Err(Error::too_large(format!(
                "uploads may be at most {} bytes",
                self.config.max_upload_bytes
            )));
        }
        Ok(())
    }

    /// `POST /upload`: store a file and give it a new id.
    pub async fn upload(
        &self,
        server: &ServerName,
        user: &UserId,
        bytes: Vec<u8>,
        content_type: Option<String>,
        filename: Option<String>,
    ) -> Result<OwnedMxcUri> {
        self.check_size(bytes.len())?;
        let media_id = random_string(24);
        let size = bytes.len() as u64;
        let (sha256, _) = self.store_file(bytes).await?;
        let record = MediaRecord {
            sha256: Some(sha256),
            content_type,
            filename,
            size,
            uploader: user.to_string(),
            created_ts: now_ms(),
            unused_expires_at: None,
        };
        self.db
            .put_durable("media", media_id.as_bytes(), &serde_json::to_vec(&record)?)?;
        Ok(OwnedMxcUri::from(format!("mxc://{server}/{media_id}")))
    }

    /// `POST /media/v1/create`: reserve an id for an upload that follows.
    pub fn create_pending(&self, server: &ServerName, user: &UserId) -> Result<(OwnedMxcUri, u64)> {
        let _one_at_a_time = self.creating.lock(user);
        let now = now_ms();
        let pending = self
            .db
            .scan_prefix("media", b"")
            .filter_map(|r| r.ok())
            .filter_map(|(_, v)| serde_json::from_slice::<MediaRecord>(&v).ok())
            .filter(|r| {
                r.sha256.is_none()
                    && r.uploader == user.as_str()
                    && r.unused_expires_at.is_some_and(|t| t > now)
            })
            .count();
        if pending >= MAX_PENDING_PER_USER {
            return Err(Error::limit_exceeded(Duration::from_secs(60)));
        }
        let media_id = random_string(24);
        let expires = now + PENDING_TTL_MS;
        let record = MediaRecord {
            sha256: None,
            content_type: None,
            filename: None,
            size: 0,
            uploader: user.to_string(),
            created_ts: now,
            unused_expires_at: Some(expires),
        };
        self.db
            .put_durable("media", media_id.as_bytes(), &serde_json::to_vec(&record)?)?;
        Ok((
            OwnedMxcUri::from(format!("mxc://{server}/{media_id}")),
            expires,
        ))
    }

    /// `PUT /upload/{server}/{id}`: the upload for a reserved id, by whoever reserved it.
    pub async fn upload_pending(
        &self,
        local: &ServerName,
        user: &UserId,
        server: &ServerName,
        media_id: &str,
        bytes: Vec<u8>,
        content_type: Option<String>,
        filename: Option<String>,
    ) -> Result<()> {
        self.check_size(bytes.len())?;
        if server != local || !valid_media_id(media_id) {
            return Err(Error::not_found("Unknown media id"));
        }
        let mut record = self
            .record(media_id)?
            .ok_or_else(|| Error::not_found("Unknown media id"))?;
        if record.uploader != user.as_str() {
            return Err(Error::forbidden(
                "This media id was created by someone else",
            ));
        }
        if record.sha256.is_some() {
            return Err(Error::cannot_overwrite_media());
        }
        if record.unused_expires_at.is_some_and(|t| t <= now_ms()) {
            return Err(Error::not_found("This media id expired before its upload"));
        }
        // Of two uploads for the id at once, the second is an overwrite. The record is
        // read again under the lock: an upload that finished meanwhile wrote it before
        // letting go of the id.
        let Some(_uploading) = self.uploading.hold_if(media_id.to_owned(), || {
            Ok(self.record(media_id)?.is_some_and(|r| r.sha256.is_none()))
        })?
        else {
            return Err(Error::cannot_overwrite_media());
        };
        let size = bytes.len() as u64;
        let (sha256, _) = self.store_file(bytes).await?;
        record.sha256 = Some(sha256);
        record.size = size;
        record.content_type = content_type;
        record.filename = filename;
        record.unused_expires_at = None;
        self.db
            .put_durable("media", media_id.as_bytes(), &serde_json::to_vec(&record)?)?;
        self.uploaded.notify_waiters();
        Ok(())
    }

    /// The record of uploaded media, waiting up to `timeout` for a pending upload.
    async fn uploaded_record(
        &self,
        local: &ServerName,
        server: &ServerName,
        media_id: &str,
        timeout: Duration,
    ) -> Result<MediaRecord> {
        if server != local || !valid_media_id(media_id) {
            // No federation: only our own media exists here.
            return Err(Error::not_found("Unknown media"));
        }
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        loop {
            let notified = self.uploaded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let record = self
                .record(media_id)?
                .ok_or_else(|| Error::not_found("Unknown media"))?;
            if record.sha256.is_some() {
                return Ok(record);
            }
            if record.unused_expires_at.is_some_and(|t| t <= now_ms()) {
                return Err(Error::not_found("Unknown media"));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::not_yet_uploaded());
            }
        }
    }

    async fn read(&self, sha256: &str) -> Result<Vec<u8>> {
        tokio::fs::read(self.path_of(sha256))
            .await
            .map_err(|e| Error::internal(format!("media file {sha256} unreadable: {e}")))
    }

    pub async fn download(
        &self,
        local: &ServerName,
        server: &ServerName,
        media_id: &str,
        timeout: Duration,
    ) -> Result<MediaFile> {
        let record = self
            .uploaded_record(local, server, media_id, timeout)
            .await?;
        let sha256 = record.sha256.as_deref().unwrap_or_default();
        Ok(MediaFile {
            bytes: self.read(sha256).await?,
            content_type: record.content_type,
            filename: record.filename,
        })
    }

    /// A thumbnail at one of the standard sizes, made on first request and kept.
    pub async fn thumbnail(
        &self,
        local: &ServerName,
        server: &ServerName,
        media_id: &str,
        width: u32,
        height: u32,
        method: Option<&Method>,
        timeout: Duration,
    ) -> Result<MediaFile> {
        let record = self
            .uploaded_record(local, server, media_id, timeout)
            .await?;
        let crop = matches!(method, Some(Method::Crop));
        let (w, h) = standard_size(if crop { CROP_SIZES } else { SCALE_SIZES }, width, height);
        let key = str_key(&[
            media_id,
            &format!("{w}x{h}"),
            if crop { "crop" } else { "scale" },
        ]);
        if let Some(v) = self.db.get("media_thumbnails", &key)? {
            let t: ThumbnailRecord = serde_json::from_slice(&v)?;
            return Ok(MediaFile {
                bytes: self.read(&t.sha256).await?,
                content_type: Some(t.content_type),
                filename: None,
            });
        }
        let original = self
            .read(record.sha256.as_deref().unwrap_or_default())
            .await?;
        let max_pixels = self.config.max_thumbnail_pixels;
        let made =
            tokio::task::spawn_blocking(move || make_thumbnail(&original, w, h, crop, max_pixels))
                .await
                .map_err(|e| Error::internal(format!("thumbnail task failed: {e}")))??;
        let Some((bytes, content_type)) = made else {
            // Small enough already: the original is its own thumbnail.
            return Ok(MediaFile {
                bytes: self
                    .read(record.sha256.as_deref().unwrap_or_default())
                    .await?,
                content_type: record.content_type,
                filename: None,
            });
        };
        let (sha256, bytes) = self.store_file(bytes).await?;
        let t = ThumbnailRecord {
            sha256,
            content_type: content_type.to_owned(),
        };
        self.db
            .put_durable("media_thumbnails", &key, &serde_json::to_vec(&t)?)?;
        Ok(MediaFile {
            bytes,
            content_type: Some(content_type.to_owned()),
            filename: None,
        })
    }
}

/// The smallest standard size that covers the request, or the largest there is.
fn standard_size(sizes: &[(u32, u32)], width: u32, height: u32) -> (u32, u32) {
    sizes
        .iter()
        .copied()
        .find(|(w, h)| *w >= width && *h >= height)
        .unwrap_or(*sizes.last().expect("sizes are not empty"))
}

/// Decode (within limits) and resize. `Ok(None)` when a scaled thumbnail would not be
/// smaller than the image; an error when the file is no image Salon thumbnails.
fn make_thumbnail(
    bytes: &[u8],
    width: u32,
    height: u32,
    crop: bool,
    max_pixels: u64,
) -> Result<Option<(Vec<u8>, &'static str)>> {
    let not_image = || Error::unknown("This media is not an image that can be thumbnailed");
    let format = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| not_image())?
        .format()
        .ok_or_else(not_image)?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP
    ) {
        return Err(not_image());
    }
    // Look at the header first: an image bomb is refused before anything is allocated.
    let (iw, ih) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|_| not_image())?;
    if u64::from(iw) * u64::from(ih) > max_pixels {
        return Err(Error::too_large(format!(
            "this image has {iw}x{ih} pixels, more than Salon decodes for thumbnails"
        )));
    }
    if !crop && iw <= width && ih <= height {
        return Ok(None);
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(iw);
    limits.max_image_height = Some(ih);
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    reader.limits(limits);
    // GIF and WebP decode to their first frame.
    let image = reader.decode().map_err(|_| not_image())?;
    let thumb = if crop {
        image.resize_to_fill(width, height, FilterType::Triangle)
    } else {
        image.resize(width, height, FilterType::Triangle)
    };
    let mut out = Vec::new();
    if thumb.color().has_alpha() {
        thumb
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .map_err(|e| Error::internal(format!("cannot encode a thumbnail: {e}")))?;
        Ok(Some((out, "image/png")))
    } else {
        let rgb = DynamicImage::ImageRgb8(thumb.to_rgb8());
        let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
        encoder
            .encode_image(&rgb)
            .map_err(|e| Error::internal(format!("cannot encode a thumbnail: {e}")))?;
        Ok(Some((out, "image/jpeg")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_snap_up_to_a_standard_size() {
        assert_eq!(standard_size(CROP_SIZES, 30, 30), (32, 32));
        assert_eq!(standard_size(CROP_SIZES, 64, 40), (96, 96));
        assert_eq!(standard_size(SCALE_SIZES, 320, 240), (320, 240));
        assert_eq!(standard_size(SCALE_SIZES, 5000, 5000), (1600, 1200));
    }

    #[test]
    fn media_ids_are_plain() {
        assert!(valid_media_id("abcXYZ09_-"));
        assert!(!valid_media_id("../../etc/passwd"));
        assert!(!valid_media_id(""));
    }
}
