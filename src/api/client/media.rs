//! Content repository: upload, create-then-upload, authenticated download and
//! thumbnails, configuration, and the deprecated unauthenticated routes.
//!
//! Every file goes out with headers that keep a browser from running it: a sandboxing
//! `Content-Security-Policy`, `nosniff`, and `Content-Disposition: attachment` for
//! every type that is not plainly safe to show inline (HTML and SVG never are).

use std::{sync::Arc, time::Duration};

use axum::response::{IntoResponse, Response};
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::{
        OutgoingResponse,
        client::{
            authenticated_media as auth,
            media::{
                create_content, create_content_async, create_mxc_uri, get_content,
                get_content_as_filename, get_content_thumbnail, get_media_config,
            },
        },
    },
    http_headers::{ContentDisposition, ContentDispositionType},
};

use crate::{
    error::{Error, Result},
    http::{Ruma, RumaResponse},
    service::{Services, media::MediaFile},
};

const CSP: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
                   style-src 'unsafe-inline'; media-src 'self'; object-src 'self';";

/// Types a browser may show inline without risk (no scripts, no active content).
const INLINE_TYPES: &[&str] = &[
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

fn disposition(content_type: Option<&str>, filename: Option<String>) -> ContentDisposition {
    let essence = content_type
        .and_then(|t| t.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase());
    let inline = essence
        .as_deref()
        .is_some_and(|t| INLINE_TYPES.contains(&t));
    ContentDisposition::new(if inline {
        ContentDispositionType::Inline
    } else {
        ContentDispositionType::Attachment
    })
    .with_filename(filename)
}

fn serve<R: OutgoingResponse>(response: R) -> Response {
    let mut res = RumaResponse(response).into_response();
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(CSP),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::HeaderName::from_static("cross-origin-resource-policy"),
        http::HeaderValue::from_static("cross-origin"),
    );
    res
}

fn file_parts(file: MediaFile, filename: Option<String>) -> (Vec<u8>, String, ContentDisposition) {
    let content_type = file
        .content_type
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let disposition = disposition(Some(&content_type), filename.or(file.filename));
    (file.bytes, content_type, disposition)
}

pub async fn upload(
    s: Arc<Services>,
    req: Ruma<create_content::v3::Request>,
) -> Result<create_content::v3::Response> {
    let (user, r) = req.into_user_and_request();
    let uri = s
        .media
        .upload(
            s.globals.server_name(),
            &user,
            r.file,
            r.content_type,
            r.filename,
        )
        .await?;
    Ok(create_content::v3::Response::new(uri))
}

pub async fn create(
    s: Arc<Services>,
    req: Ruma<create_mxc_uri::v1::Request>,
) -> Result<create_mxc_uri::v1::Response> {
    let (uri, expires) = s
        .media
        .create_pending(s.globals.server_name(), req.user())?;
    let mut res = create_mxc_uri::v1::Response::new(uri);
    res.unused_expires_at = UInt::new(expires).map(MilliSecondsSinceUnixEpoch);
    Ok(res)
}

pub async fn upload_to(
    s: Arc<Services>,
    req: Ruma<create_content_async::v3::Request>,
) -> Result<axum::Json<serde_json::Value>> {
    let (user, r) = req.into_user_and_request();
    s.media
        .upload_pending(
            s.globals.server_name(),
            &user,
            &r.server_name,
            &r.media_id,
            r.file,
            r.content_type,
            r.filename,
        )
        .await?;
    // ruma's response type has no public constructor; its body is `{}`.
    Ok(axum::Json(serde_json::json!({})))
}

pub async fn config(
    s: Arc<Services>,
    _req: Ruma<auth::get_media_config::v1::Request>,
) -> Result<auth::get_media_config::v1::Response> {
    Ok(auth::get_media_config::v1::Response::new(
        UInt::new_saturating(s.media.max_upload_bytes() as u64),
    ))
}

#[allow(deprecated)] // served on purpose, for clients without authenticated media
pub async fn legacy_config(
    s: Arc<Services>,
    _req: Ruma<get_media_config::v3::Request>,
) -> Result<get_media_config::v3::Response> {
    Ok(get_media_config::v3::Response::new(UInt::new_saturating(
        s.media.max_upload_bytes() as u64,
    )))
}

/// A local file, ready to send: bytes, content type, disposition (`filename` from the
/// request path wins over the uploaded name).
async fn fetch(
    s: &Services,
    server: &ruma::ServerName,
    media_id: &str,
    timeout: Duration,
    filename: Option<String>,
) -> Result<(Vec<u8>, String, ContentDisposition)> {
    let file = s
        .media
        .download(s.globals.server_name(), server, media_id, timeout)
        .await?;
    Ok(file_parts(file, filename))
}

#[allow(clippy::too_many_arguments)]
async fn fetch_thumbnail(
    s: &Services,
    server: &ruma::ServerName,
    media_id: &str,
    width: UInt,
    height: UInt,
    method: Option<&ruma::media::Method>,
    timeout: Duration,
) -> Result<(Vec<u8>, String, ContentDisposition)> {
    let file = s
        .media
        .thumbnail(
            s.globals.server_name(),
            server,
            media_id,
            dimension(width)?,
            dimension(height)?,
            method,
            timeout,
        )
        .await?;
    Ok(file_parts(file, None))
}

pub async fn download(
    s: Arc<Services>,
    req: Ruma<auth::get_content::v1::Request>,
) -> Result<Response> {
    let (bytes, content_type, disposition) =
        fetch(&s, &req.server_name, &req.media_id, req.timeout_ms, None).await?;
    Ok(serve(auth::get_content::v1::Response::new(
        bytes,
        content_type,
        disposition,
    )))
}

pub async fn download_as(
    s: Arc<Services>,
    req: Ruma<auth::get_content_as_filename::v1::Request>,
) -> Result<Response> {
    let name = Some(req.filename.clone());
    let (bytes, content_type, disposition) =
        fetch(&s, &req.server_name, &req.media_id, req.timeout_ms, name).await?;
    Ok(serve(auth::get_content_as_filename::v1::Response::new(
        bytes,
        content_type,
        disposition,
    )))
}

pub async fn thumbnail(
    s: Arc<Services>,
    req: Ruma<auth::get_content_thumbnail::v1::Request>,
) -> Result<Response> {
    let (bytes, content_type, disposition) = fetch_thumbnail(
        &s,
        &req.server_name,
        &req.media_id,
        req.width,
        req.height,
        req.method.as_ref(),
        req.timeout_ms,
    )
    .await?;
    Ok(serve(auth::get_content_thumbnail::v1::Response::new(
        bytes,
        content_type,
        disposition,
    )))
}

fn dimension(v: UInt) -> Result<u32> {
    u32::try_from(u64::from(v))
        .ok()
        .filter(|d| *d > 0)
        .ok_or_else(|| Error::invalid_param("width and height must be positive"))
}

/// The deprecated unauthenticated routes serve media only when configured to; the
/// spec lets servers "freeze" them, and new clients use the authenticated ones.
fn legacy_allowed(s: &Services) -> Result<()> {
    if s.globals.config.media.legacy_unauthenticated {
        Ok(())
    } else {
        Err(Error::not_found(
            "Use the authenticated media endpoints (/_matrix/client/v1/media/…)",
        ))
    }
}

#[allow(deprecated)] // served on purpose, for clients without authenticated media
pub async fn legacy_download(
    s: Arc<Services>,
    req: Ruma<get_content::v3::Request>,
) -> Result<Response> {
    legacy_allowed(&s)?;
    let (bytes, content_type, disposition) =
        fetch(&s, &req.server_name, &req.media_id, req.timeout_ms, None).await?;
    let mut res = get_content::v3::Response::new(bytes, content_type, disposition);
    res.cross_origin_resource_policy = Some("cross-origin".to_owned());
    Ok(serve(res))
}

#[allow(deprecated)] // served on purpose, for clients without authenticated media
pub async fn legacy_download_as(
    s: Arc<Services>,
    req: Ruma<get_content_as_filename::v3::Request>,
) -> Result<Response> {
    legacy_allowed(&s)?;
    let name = Some(req.filename.clone());
    let (bytes, content_type, disposition) =
        fetch(&s, &req.server_name, &req.media_id, req.timeout_ms, name).await?;
    let mut res = get_content_as_filename::v3::Response::new(bytes, content_type, disposition);
    res.cross_origin_resource_policy = Some("cross-origin".to_owned());
    Ok(serve(res))
}

#[allow(deprecated)] // served on purpose, for clients without authenticated media
pub async fn legacy_thumbnail(
    s: Arc<Services>,
    req: Ruma<get_content_thumbnail::v3::Request>,
) -> Result<Response> {
    legacy_allowed(&s)?;
    let (bytes, content_type, disposition) = fetch_thumbnail(
        &s,
        &req.server_name,
        &req.media_id,
        req.width,
        req.height,
        req.method.as_ref(),
        req.timeout_ms,
    )
    .await?;
    let mut res = get_content_thumbnail::v3::Response::new(bytes, content_type, disposition);
    res.cross_origin_resource_policy = Some("cross-origin".to_owned());
    Ok(serve(res))
}
