//! The media repository: uploads round-trip byte for byte, thumbnails are real images
//! of the requested size, dangerous types are served as attachments, limits hold.

mod common;

use std::{io::Cursor, time::Duration};

use common::{Client, TestServer, errcode};
use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

struct Reply {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

async fn raw(
    c: &Client,
    method: reqwest::Method,
    path: &str,
    body: Option<(Vec<u8>, &str)>,
    auth: bool,
) -> Reply {
    let mut req = c.http.request(method, format!("{}{}", c.base, path));
    if auth && let Some(t) = &c.token {
        req = req.bearer_auth(t);
    }
    if let Some((bytes, content_type)) = body {
        req = req.header(header::CONTENT_TYPE, content_type).body(bytes);
    }
    let res = req.send().await.expect("sent");
    Reply {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.bytes().await.expect("body").to_vec(),
    }
}

async fn upload(c: &Client, bytes: Vec<u8>, content_type: &str, filename: &str) -> String {
    let r = raw(
        c,
        reqwest::Method::POST,
        &format!("/_matrix/media/v3/upload?filename={filename}"),
        Some((bytes, content_type)),
        true,
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()["content_uri"]
        .as_str()
        .expect("content_uri")
        .to_owned()
}

fn id_of(mxc: &str) -> &str {
    mxc.strip_prefix("mxc://").expect("an mxc uri")
}

async fn download(c: &Client, mxc: &str) -> Reply {
    raw(
        c,
        reqwest::Method::GET,
        &format!("/_matrix/client/v1/media/download/{}", id_of(mxc)),
        None,
        true,
    )
    .await
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

fn decoded_size(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(bytes).expect("the thumbnail is an image");
    (img.width(), img.height())
}

fn media_files(server: &TestServer) -> usize {
    let mut n = 0;
    for dir in std::fs::read_dir(server.dir.path().join("media")).unwrap() {
        let dir = dir.unwrap().path();
        if dir.is_dir() {
            n += std::fs::read_dir(dir).unwrap().count();
        }
    }
    n
}

#[tokio::test]
async fn uploads_round_trip_and_are_stored_once() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mxc = upload(
        &alice,
        bytes.clone(),
        "application/octet-stream",
        "data.bin",
    )
    .await;
    assert!(mxc.starts_with("mxc://localhost/"), "{mxc}");

    let r = download(&bob, &mxc).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, bytes, "the bytes come back unchanged");
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert!(r.header("content-disposition").starts_with("attachment"));
    assert!(r.header("content-disposition").contains("data.bin"));

    // With a file name in the path.
    let r = raw(
        &bob,
        reqwest::Method::GET,
        &format!(
            "/_matrix/client/v1/media/download/{}/other.bin",
            id_of(&mxc)
        ),
        None,
        true,
    )
    .await;
    assert_eq!(r.body, bytes);
    assert!(r.header("content-disposition").contains("other.bin"));

    // The same bytes again get a new id but no new file.
    let before = media_files(&server);
    let again = upload(&bob, bytes.clone(), "application/octet-stream", "copy.bin").await;
    assert_ne!(again, mxc);
    assert_eq!(media_files(&server), before);
    assert_eq!(download(&alice, &again).await.body, bytes);

    // Authenticated media needs a token; the frozen legacy route serves nothing.
    let r = raw(
        &bob,
        reqwest::Method::GET,
        &format!("/_matrix/client/v1/media/download/{}", id_of(&mxc)),
        None,
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(errcode(&r.json()), "M_MISSING_TOKEN");
    let r = raw(
        &bob,
        reqwest::Method::GET,
        &format!("/_matrix/media/v3/download/{}", id_of(&mxc)),
        None,
        false,
    )
    .await;
    assert_eq!(
        (r.status, errcode(&r.json())),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );

    // Unknown media and other servers' media are not found.
    for path in [
        "/_matrix/client/v1/media/download/localhost/nosuchmedia",
        "/_matrix/client/v1/media/download/elsewhere.example/abc",
    ] {
        let r = raw(&bob, reqwest::Method::GET, path, None, true).await;
        assert_eq!(
            (r.status, errcode(&r.json())),
            (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            "{path}"
        );
    }
    let cfg = bob
        .ok(
            reqwest::Method::GET,
            "/_matrix/client/v1/media/config",
            None,
        )
        .await;
    assert_eq!(cfg["m.upload.size"], 50 * 1024 * 1024);
    server.stop().await;
}

#[tokio::test]
async fn uploaded_files_survive_a_restart() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let mxc = upload(
        &alice,
        b"kept across restarts".to_vec(),
        "text/plain",
        "a.txt",
    )
    .await;
    let token = alice.token.clone();
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, &[]).await;
    let mut alice2 = server.client();
    alice2.token = token;
    let r = download(&alice2, &mxc).await;
    assert_eq!(r.body, b"kept across restarts");
    assert!(r.header("content-disposition").starts_with("inline"));
    server.stop().await;
}

#[tokio::test]
async fn thumbnails_have_the_requested_size() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let mxc = upload(&alice, png(1000, 500), "image/png", "photo.png").await;
    let thumb = |w: u32, h: u32, method: &str| {
        let alice = alice.clone();
        let path = format!(
            "/_matrix/client/v1/media/thumbnail/{}?width={w}&height={h}&method={method}",
            id_of(&mxc)
        );
        async move { raw(&alice, reqwest::Method::GET, &path, None, true).await }
    };
    let crop = thumb(96, 96, "crop").await;
    assert_eq!(crop.status, StatusCode::OK);
    assert_eq!(crop.header("content-type"), "image/jpeg");
    assert_eq!(decoded_size(&crop.body), (96, 96));
    let scale = thumb(320, 240, "scale").await;
    assert_eq!(decoded_size(&scale.body), (320, 160), "aspect ratio kept");
    // Made once: asking again gives the same bytes, and no new file appears.
    let files = media_files(&server);
    let again = thumb(96, 96, "crop").await;
    assert_eq!(again.body, crop.body);
    assert_eq!(media_files(&server), files);

    // Transparency survives as PNG; a GIF thumbnails from its first frame.
    let rgba = RgbaImage::from_fn(400, 400, |x, _| Rgba([200, 10, 10, (x % 256) as u8]));
    let mut bytes = Vec::new();
    rgba.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .unwrap();
    let mxc2 = upload(&alice, bytes, "image/png", "alpha.png").await;
    let r = raw(
        &alice,
        reqwest::Method::GET,
        &format!(
            "/_matrix/client/v1/media/thumbnail/{}?width=32&height=32&method=crop",
            id_of(&mxc2)
        ),
        None,
        true,
    )
    .await;
    assert_eq!(r.header("content-type"), "image/png");
    assert_eq!(decoded_size(&r.body), (32, 32));
    let mut gif = Vec::new();
    RgbImage::from_pixel(300, 200, Rgb([1, 2, 3]))
        .write_to(&mut Cursor::new(&mut gif), ImageFormat::Gif)
        .unwrap();
    let mxc3 = upload(&alice, gif, "image/gif", "a.gif").await;
    let r = raw(
        &alice,
        reqwest::Method::GET,
        &format!(
            "/_matrix/client/v1/media/thumbnail/{}?width=96&height=96&method=crop",
            id_of(&mxc3)
        ),
        None,
        true,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(decoded_size(&r.body), (96, 96));
    server.stop().await;
}

#[tokio::test]
async fn thumbnails_of_non_images_and_image_bombs_are_refused_without_harm() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let text = upload(&alice, b"just some text".to_vec(), "image/png", "liar.png").await;
    let r = raw(
        &alice,
        reqwest::Method::GET,
        &format!(
            "/_matrix/client/v1/media/thumbnail/{}?width=96&height=96&method=crop",
            id_of(&text)
        ),
        None,
        true,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(errcode(&r.json()), "M_UNKNOWN");

    // A PNG whose header claims 60000 x 60000 pixels (3.6 gigapixels) in a few bytes.
    let mut bomb = png(1, 1);
    bomb[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let mxc = upload(&alice, bomb, "image/png", "bomb.png").await;
    let r = raw(
        &alice,
        reqwest::Method::GET,
        &format!(
            "/_matrix/client/v1/media/thumbnail/{}?width=320&height=240",
            id_of(&mxc)
        ),
        None,
        true,
    )
    .await;
    assert!(r.status.is_client_error(), "{}", r.status);
    assert!(errcode(&r.json()).starts_with("M_"));
    // The server is fine.
    let ok = upload(&alice, png(10, 10), "image/png", "small.png").await;
    assert_eq!(download(&alice, &ok).await.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn html_and_svg_come_back_as_sandboxed_attachments() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    for (bytes, content_type, name) in [
        (
            &b"<html><script>alert(document.cookie)</script></html>"[..],
            "text/html",
            "x.html",
        ),
        (
            &b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"[..],
            "image/svg+xml",
            "x.svg",
        ),
    ] {
        let mxc = upload(&alice, bytes.to_vec(), content_type, name).await;
        let r = download(&alice, &mxc).await;
        assert_eq!(r.body, bytes);
        assert!(
            r.header("content-disposition").starts_with("attachment"),
            "{content_type}"
        );
        assert!(r.header("content-security-policy").contains("sandbox"));
        assert!(
            r.header("content-security-policy")
                .contains("script-src 'none'")
        );
        assert_eq!(r.header("x-content-type-options"), "nosniff");
    }
    server.stop().await;
}

#[tokio::test]
async fn uploads_over_the_limit_are_refused() {
    let server = TestServer::start_with(&[("SALON_MEDIA__MAX_UPLOAD_BYTES", "1000")]).await;
    let alice = server.user("alice").await;
    let r = raw(
        &alice,
        reqwest::Method::POST,
        "/_matrix/media/v3/upload",
        Some((vec![7u8; 2000], "application/octet-stream")),
        true,
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(errcode(&r.json()), "M_TOO_LARGE");
    upload(
        &alice,
        vec![7u8; 1000],
        "application/octet-stream",
        "fits.bin",
    )
    .await;
    let cfg = alice
        .ok(
            reqwest::Method::GET,
            "/_matrix/client/v1/media/config",
            None,
        )
        .await;
    assert_eq!(cfg["m.upload.size"], 1000);
    server.stop().await;
}

#[tokio::test]
async fn create_then_upload() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let created = alice
        .ok(
            reqwest::Method::POST,
            "/_matrix/media/v1/create",
            Some(json!({})),
        )
        .await;
    let mxc = created["content_uri"].as_str().unwrap().to_owned();
    assert!(created["unused_expires_at"].as_u64().unwrap() > 0);

    // Not there yet: a short wait times out with M_NOT_YET_UPLOADED.
    let r = raw(
        &bob,
        reqwest::Method::GET,
        &format!(
            "/_matrix/client/v1/media/download/{}?timeout_ms=100",
            id_of(&mxc)
        ),
        None,
        true,
    )
    .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(errcode(&r.json()), "M_NOT_YET_UPLOADED");

    // A longer wait is answered the moment the upload lands.
    let waiter = {
        let bob = bob.clone();
        let path = format!(
            "/_matrix/client/v1/media/download/{}?timeout_ms=10000",
            id_of(&mxc)
        );
        tokio::spawn(async move { raw(&bob, reqwest::Method::GET, &path, None, true).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let put = |c: &Client, bytes: &[u8]| {
        let c = c.clone();
        let path = format!("/_matrix/media/v3/upload/{}", id_of(&mxc));
        let bytes = bytes.to_vec();
        async move {
            raw(
                &c,
                reqwest::Method::PUT,
                &path,
                Some((bytes, "text/plain")),
                true,
            )
            .await
        }
    };
    let r = put(&bob, b"not bob's to fill").await;
    assert_eq!(
        (r.status, errcode(&r.json())),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
    let r = put(&alice, b"late content").await;
    assert_eq!(r.status, StatusCode::OK);
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiting download was answered")
        .unwrap();
    assert_eq!(got.body, b"late content");
    let r = put(&alice, b"again").await;
    assert_eq!(
        (r.status, errcode(&r.json())),
        (StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA")
    );
    server.stop().await;
}

/// Two uploads for one id from `/create` at once: one is stored, the other is refused
/// as an overwrite, and the content served is the one stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_uploads_for_one_created_id_store_one() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    for round in 0..5 {
        let created = alice
            .ok(
                reqwest::Method::POST,
                "/_matrix/media/v1/create",
                Some(json!({})),
            )
            .await;
        let mxc = created["content_uri"].as_str().unwrap().to_owned();
        let path = format!("/_matrix/media/v3/upload/{}", id_of(&mxc));
        let uploads = ["first", "second"].map(|which| {
            let (alice, path) = (alice.clone(), path.clone());
            let bytes = format!("{which} content of round {round}").into_bytes();
            tokio::spawn(async move {
                let r = raw(
                    &alice,
                    reqwest::Method::PUT,
                    &path,
                    Some((bytes.clone(), "text/plain")),
                    true,
                )
                .await;
                (r, bytes)
            })
        });
        let mut stored = Vec::new();
        for upload in futures::future::join_all(uploads).await {
            let (r, bytes) = upload.unwrap();
            if r.status == StatusCode::OK {
                stored.push(bytes);
            } else {
                assert_eq!(
                    (r.status, errcode(&r.json())),
                    (StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA")
                );
            }
        }
        assert_eq!(stored.len(), 1, "round {round}");
        let got = raw(
            &alice,
            reqwest::Method::GET,
            &format!("/_matrix/client/v1/media/download/{}", id_of(&mxc)),
            None,
            true,
        )
        .await;
        assert_eq!(got.body, stored[0]);
    }
    server.stop().await;
}

/// A user may hold 50 ids from `/create` awaiting their uploads; calls made at once
/// cannot pass that limit together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_ids_stay_within_their_limit_when_asked_for_at_once() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let calls = (0..60).map(|_| {
        let alice = alice.clone();
        async move { alice.post("/_matrix/media/v1/create", json!({})).await }
    });
    let created = common::race(calls, "M_LIMIT_EXCEEDED").await;
    assert_eq!(created.iter().flatten().count(), 50);
    server.stop().await;
}
