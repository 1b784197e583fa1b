//! Accounts, sessions, devices, profiles, account data and filters, over real HTTP.

mod common;

use common::{TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_endpoints_describe_the_server() {
    let server = TestServer::start().await;
    let c = server.client();
    let (status, versions) = c.get("/_matrix/client/versions").await;
    assert_eq!(status, StatusCode::OK);
    let list: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(list.contains(&"v1.12"), "{versions}");
    let (_, wk) = c.get("/.well-known/matrix/client").await;
    assert_eq!(
        wk["m.homeserver"]["base_url"],
        json!(format!("http://127.0.0.1:8008"))
    );
    let alice = server.user("alice").await;
    let caps = alice
        .ok(Method::GET, "/_matrix/client/v3/capabilities", None)
        .await;
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "12");
    assert_eq!(
        caps["capabilities"]["m.room_versions"]["available"]["10"],
        "stable"
    );
    assert_ne!(
        caps["capabilities"]["m.change_password"]["enabled"], false,
        "password changes are allowed (absent means true)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_uses_interactive_auth_and_checks_names() {
    let server = TestServer::start().await;
    let c = server.client();
    // Without auth: 401 with the flows and a session.
    let (status, body) = c
        .post(
            "/_matrix/client/v3/register",
            json!({ "username": "bob", "password": "long enough pw" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let flows = body["flows"].as_array().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["stages"] == json!(["m.login.dummy"])),
        "{body}"
    );
    let session = body["session"].as_str().unwrap().to_owned();
    // Completing the dummy stage in that session registers.
    let (status, body) = c
        .post("/_matrix/client/v3/register", json!({ "username": "Bob", "password": "long enough pw", "auth": { "type": "m.login.dummy", "session": session } }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["user_id"], "@bob:localhost",
        "usernames are lower-cased"
    );
    assert!(body["access_token"].as_str().unwrap().len() >= 32);

    let (status, body) = c
        .get("/_matrix/client/v3/register/available?username=bob")
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_USER_IN_USE")
    );
    let (status, body) = c
        .get("/_matrix/client/v3/register/available?username=carol")
        .await;
    assert_eq!(
        (status, body["available"].clone()),
        (StatusCode::OK, json!(true))
    );

    let (_, body) = c.post("/_matrix/client/v3/register", json!({ "username": "bob", "password": "long enough pw", "auth": { "type": "m.login.dummy" } })).await;
    assert_eq!(errcode(&body), "M_USER_IN_USE");
    let (_, body) = c.post("/_matrix/client/v3/register", json!({ "username": "no spaces", "password": "long enough pw", "auth": { "type": "m.login.dummy" } })).await;
    assert_eq!(errcode(&body), "M_INVALID_USERNAME");
    let (_, body) = c.post("/_matrix/client/v3/register", json!({ "username": "_email_x", "password": "long enough pw", "auth": { "type": "m.login.dummy" } })).await;
    assert_eq!(errcode(&body), "M_EXCLUSIVE");
    let (_, body) = c
        .post(
            "/_matrix/client/v3/register",
            json!({ "username": "dave", "password": "short", "auth": { "type": "m.login.dummy" } }),
        )
        .await;
    assert_eq!(errcode(&body), "M_WEAK_PASSWORD");
    let (status, body) = c
        .post("/_matrix/client/v3/register?kind=guest", json!({}))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_tokens_gate_registration() {
    let server = TestServer::start_with(&[("SALON_REGISTRATION__MODE", "token")]).await;
    let c = server.client();
    let (status, body) = c.post("/_matrix/client/v3/register", json!({ "username": "eve", "password": "long enough pw", "auth": { "type": "m.login.dummy" } })).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "dummy is not enough in token mode: {body}"
    );
    assert_eq!(
        body["flows"],
        json!([{ "stages": ["m.login.registration_token"] }])
    );

    // An admin creates a one-use token.
    let services_dir = server.dir.path().to_owned();
    let dir = server.stop().await;
    {
        let config = common::test_config(&services_dir, &[("SALON_REGISTRATION__MODE", "token")]);
        let services = salon::services(config).unwrap();
        services
            .users
            .create_registration_token(Some("let-me-in".into()), Some(1), None)
            .unwrap();
        services
            .users
            .create_registration_token(Some("two-uses".into()), Some(2), None)
            .unwrap();
    }
    let server = TestServer::start_in(dir, &[("SALON_REGISTRATION__MODE", "token")]).await;
    let c = server.client();
    let (_, body) = c
        .get("/_matrix/client/v1/register/m.login.registration_token/validity?token=let-me-in")
        .await;
    assert_eq!(body["valid"], true);
    let (_, body) = c
        .get("/_matrix/client/v1/register/m.login.registration_token/validity?token=nope")
        .await;
    assert_eq!(body["valid"], false);

    let (status, body) = c
        .post("/_matrix/client/v3/register", json!({ "username": "eve", "password": "long enough pw", "auth": { "type": "m.login.registration_token", "token": "nope" } }))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        errcode(&body),
        "M_FORBIDDEN",
        "a wrong token is reported in the UIA response: {body}"
    );
    // Four at once with the one-use token: one account.
    let attempts = (0..4).map(|i| {
        let c = c.clone();
        tokio::spawn(async move {
            c.post("/_matrix/client/v3/register", json!({ "username": format!("eve{i}"), "password": "long enough pw", "auth": { "type": "m.login.registration_token", "token": "let-me-in" } }))
                .await
        })
    });
    let mut registered = 0;
    for attempt in futures::future::join_all(attempts).await {
        let (status, body) = attempt.unwrap();
        if status == StatusCode::OK {
            registered += 1;
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        }
    }
    assert_eq!(registered, 1, "the token allowed one use");
    let (_, body) = c
        .get("/_matrix/client/v1/register/m.login.registration_token/validity?token=let-me-in")
        .await;
    assert_eq!(body["valid"], false, "the token allowed one use");

    // Two registrations of one name at once with a two-use token: the one that loses
    // the name gives its use back.
    let attempts = (0..2).map(|_| {
        let c = c.clone();
        tokio::spawn(async move {
            c.post("/_matrix/client/v3/register", json!({ "username": "frank", "password": "long enough pw", "auth": { "type": "m.login.registration_token", "token": "two-uses" } }))
                .await
        })
    });
    let statuses: Vec<StatusCode> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|a| a.unwrap().0)
        .collect();
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
    let (_, body) = c
        .get("/_matrix/client/v1/register/m.login.registration_token/validity?token=two-uses")
        .await;
    assert_eq!(body["valid"], true, "one use is left: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_logout_and_tokens() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let c = server.client();
    let types = c.ok(Method::GET, "/_matrix/client/v3/login", None).await;
    let kinds: Vec<&str> = types["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["type"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"m.login.password") && kinds.contains(&"m.login.token"),
        "{types}"
    );

    for user in ["alice", "@alice:localhost", "ALICE"] {
        let (status, body) = c
            .post("/_matrix/client/v3/login", json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": "correct horse battery" }))
            .await;
        assert_eq!(status, StatusCode::OK, "{user}: {body}");
        assert_eq!(body["user_id"], "@alice:localhost");
        assert_eq!(body["home_server"], "localhost");
    }
    let (status, body) = c
        .post("/_matrix/client/v3/login", json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "wrong" }))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
    let (status, body) = c
        .post("/_matrix/client/v3/login", json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "nobody" }, "password": "whatever" }))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );

    // A login token, obtained with the password, logs in once.
    let (status, body) = alice
        .post("/_matrix/client/v1/login/get_token", json!({}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let session = body["session"].as_str().unwrap();
    let body = alice
        .ok(Method::POST, "/_matrix/client/v1/login/get_token", Some(json!({ "auth": {
            "type": "m.login.password", "session": session,
            "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" } })))
        .await;
    let login_token = body["login_token"].as_str().unwrap().to_owned();
    assert!(body["expires_in_ms"].as_u64().unwrap() > 0);
    let (status, body) = c
        .post(
            "/_matrix/client/v3/login",
            json!({ "type": "m.login.token", "token": login_token }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@alice:localhost");
    let (status, _) = c
        .post(
            "/_matrix/client/v3/login",
            json!({ "type": "m.login.token", "token": login_token }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "login tokens are single-use");

    // whoami, then logout invalidates exactly that token.
    let who = alice
        .ok(Method::GET, "/_matrix/client/v3/account/whoami", None)
        .await;
    assert_eq!(who["user_id"], "@alice:localhost");
    assert_eq!(who["device_id"], alice.device_id.as_str());
    alice
        .ok(Method::POST, "/_matrix/client/v3/logout", Some(json!({})))
        .await;
    let (status, body) = alice.get("/_matrix/client/v3/account/whoami").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN")
    );
    assert_ne!(
        body["soft_logout"], true,
        "a logged-out token is not a soft logout"
    );
    let (status, body) = c.get("/_matrix/client/v3/account/whoami").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN")
    );

    // logout/all ends every session.
    let a1 = server.user("bob").await;
    let mut a2 = server.client();
    let body = a2
        .ok(Method::POST, "/_matrix/client/v3/login", Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": "correct horse battery" })))
        .await;
    a2.token = Some(body["access_token"].as_str().unwrap().into());
    a1.ok(
        Method::POST,
        "/_matrix/client/v3/logout/all",
        Some(json!({})),
    )
    .await;
    assert_eq!(
        a2.get("/_matrix/client/v3/account/whoami").await.0,
        StatusCode::UNAUTHORIZED
    );
    // The token may also come as a query parameter.
    let (status, _) = c
        .get(&format!(
            "/_matrix/client/v3/account/whoami?access_token={}",
            enc(a1.token.as_deref().unwrap())
        ))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_and_deactivation() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let mut other = server.client();
    let body = other
        .ok(Method::POST, "/_matrix/client/v3/login", Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" })))
        .await;
    other.token = Some(body["access_token"].as_str().unwrap().into());

    let (status, body) = alice
        .post(
            "/_matrix/client/v3/account/password",
            json!({ "new_password": "a brand new secret" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let session = body["session"].as_str().unwrap();
    let (status, body) = alice
        .post("/_matrix/client/v3/account/password", json!({ "new_password": "a brand new secret", "auth": {
            "type": "m.login.password", "session": session, "identifier": { "type": "m.id.user", "user": "alice" }, "password": "wrong" } }))
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "wrong password keeps the flow open: {body}"
    );
    assert_eq!(errcode(&body), "M_FORBIDDEN");
    alice
        .ok(Method::POST, "/_matrix/client/v3/account/password", Some(json!({ "new_password": "a brand new secret", "auth": {
            "type": "m.login.password", "session": session, "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" } })))
        .await;
    assert_eq!(
        other.get("/_matrix/client/v3/account/whoami").await.0,
        StatusCode::UNAUTHORIZED,
        "other devices are logged out"
    );
    assert_eq!(
        alice.get("/_matrix/client/v3/account/whoami").await.0,
        StatusCode::OK,
        "this device stays"
    );
    let c = server.client();
    let login = |pw: &'static str| {
        let c = c.clone();
        async move {
            c.post("/_matrix/client/v3/login", json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": pw })).await.0
        }
    };
    assert_eq!(login("correct horse battery").await, StatusCode::FORBIDDEN);
    assert_eq!(login("a brand new secret").await, StatusCode::OK);

    // Deactivation: the account leaves its rooms and can no longer log in.
    let room = alice.create_room(json!({ "name": "Soon empty" })).await;
    alice
        .ok(Method::POST, "/_matrix/client/v3/account/deactivate", Some(json!({ "auth": {
            "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "a brand new secret" } })))
        .await;
    assert_eq!(login("a brand new secret").await, StatusCode::FORBIDDEN);
    assert_eq!(
        alice.get("/_matrix/client/v3/account/whoami").await.0,
        StatusCode::UNAUTHORIZED
    );
    let bob = server.user("bob").await;
    let (status, body) = bob
        .get(&format!(
            "/_matrix/client/v3/profile/{}",
            enc("@alice:localhost")
        ))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );
    let _ = room;
    let (_, body) = server
        .client()
        .get("/_matrix/client/v3/register/available?username=alice")
        .await;
    assert_eq!(
        errcode(&body),
        "M_USER_IN_USE",
        "deactivated names are never reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_rename_delete() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let mut phone = server.client();
    let body = phone
        .ok(Method::POST, "/_matrix/client/v3/login", Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" },
            "password": "correct horse battery", "device_id": "PHONE", "initial_device_display_name": "Alice's phone" })))
        .await;
    assert_eq!(body["device_id"], "PHONE");
    phone.token = Some(body["access_token"].as_str().unwrap().into());

    let list = alice
        .ok(Method::GET, "/_matrix/client/v3/devices", None)
        .await;
    let ids: Vec<&str> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"PHONE"));
    let d = alice
        .ok(Method::GET, "/_matrix/client/v3/devices/PHONE", None)
        .await;
    assert_eq!(d["display_name"], "Alice's phone");
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/devices/PHONE",
            Some(json!({ "display_name": "Work phone" })),
        )
        .await;
    let d = alice
        .ok(Method::GET, "/_matrix/client/v3/devices/PHONE", None)
        .await;
    assert_eq!(d["display_name"], "Work phone");
    let (status, body) = alice.get("/_matrix/client/v3/devices/NOPE").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );

    let (status, body) = alice.delete("/_matrix/client/v3/devices/PHONE").await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "deleting a device needs the password: {body}"
    );
    alice
        .ok(Method::DELETE, "/_matrix/client/v3/devices/PHONE", Some(json!({ "auth": {
            "type": "m.login.password", "session": body["session"], "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" } })))
        .await;
    assert_eq!(
        phone.get("/_matrix/client/v3/account/whoami").await.0,
        StatusCode::UNAUTHORIZED
    );

    alice
        .ok(Method::POST, "/_matrix/client/v3/delete_devices", Some(json!({ "devices": [alice.device_id], "auth": {
            "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" } })))
        .await;
    assert_eq!(
        alice.get("/_matrix/client/v3/account/whoami").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_changes_reach_member_events() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let (_, member) = alice
        .state(&room, "m.room.member", "@alice:localhost")
        .await;
    assert_eq!(
        member["displayname"], "alice",
        "the localpart is the first display name"
    );

    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                enc(&alice.user_id)
            ),
            Some(json!({ "displayname": "Alice Martin" })),
        )
        .await;
    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/profile/{}/avatar_url",
                enc(&alice.user_id)
            ),
            Some(json!({ "avatar_url": "mxc://localhost/abc" })),
        )
        .await;
    let p = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
            None,
        )
        .await;
    assert_eq!(
        p,
        json!({ "displayname": "Alice Martin", "avatar_url": "mxc://localhost/abc" })
    );
    let (_, member) = alice
        .state(&room, "m.room.member", "@alice:localhost")
        .await;
    assert_eq!(member["displayname"], "Alice Martin");
    assert_eq!(member["avatar_url"], "mxc://localhost/abc");
    assert_eq!(member["membership"], "join");

    let bob = server.user("bob").await;
    let (status, body) = bob
        .put(
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                enc(&alice.user_id)
            ),
            json!({ "displayname": "Mallory" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
    let (status, body) = alice
        .put(
            &format!(
                "/_matrix/client/v3/profile/{}/avatar_url",
                enc(&alice.user_id)
            ),
            json!({ "avatar_url": "https://example.org/a.png" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_data_tags_and_filters() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let u = enc(&alice.user_id);
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/user/{u}/account_data/org.example.settings"),
            Some(json!({ "theme": "dark" })),
        )
        .await;
    let v = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/user/{u}/account_data/org.example.settings"),
            None,
        )
        .await;
    assert_eq!(v, json!({ "theme": "dark" }));
    let (status, body) = bob
        .get(&format!(
            "/_matrix/client/v3/user/{u}/account_data/org.example.settings"
        ))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
    let (status, body) = alice
        .get(&format!(
            "/_matrix/client/v3/user/{u}/account_data/org.example.missing"
        ))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );

    let room = alice.create_room(json!({})).await;
    let r = enc(&room);
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/account_data/org.example.room"),
            Some(json!({ "pinned": true })),
        )
        .await;
    let v = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/account_data/org.example.room"),
            None,
        )
        .await;
    assert_eq!(v, json!({ "pinned": true }));

    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags/m.favourite"),
            Some(json!({ "order": 0.25 })),
        )
        .await;
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags/u.work"),
            Some(json!({})),
        )
        .await;
    let tags = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags"),
            None,
        )
        .await;
    assert_eq!(tags["tags"]["m.favourite"]["order"], 0.25);
    assert!(tags["tags"]["u.work"].is_object());
    alice
        .ok(
            Method::DELETE,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags/u.work"),
            None,
        )
        .await;
    let tags = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags"),
            None,
        )
        .await;
    assert!(tags["tags"].get("u.work").is_none(), "{tags}");

    let filter = json!({ "room": { "timeline": { "limit": 7, "types": ["m.room.message"] } }, "event_fields": ["content.body"] });
    let created = alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/user/{u}/filter"),
            Some(filter.clone()),
        )
        .await;
    let id = created["filter_id"].as_str().unwrap();
    let back = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/user/{u}/filter/{id}"),
            None,
        )
        .await;
    assert_eq!(back["room"]["timeline"]["limit"], 7);
    assert_eq!(back["room"]["timeline"]["types"], json!(["m.room.message"]));
    let (status, _) = bob
        .get(&format!(
            "/_matrix/client/v3/user/{}/filter/{id}",
            enc(&bob.user_id)
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_secret_registration_is_synapse_compatible() {
    let server = TestServer::start().await;
    let c = server.client();
    let nonce = c.ok(Method::GET, "/_synapse/admin/v1/register", None).await["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    let mac = salon::api::client::admin::registration_mac(
        &server.shared_secret,
        &nonce,
        "ops",
        "an admin password",
        true,
    );
    let body = c
        .ok(Method::POST, "/_synapse/admin/v1/register", Some(json!({ "nonce": nonce, "username": "ops", "password": "an admin password", "admin": true, "mac": mac })))
        .await;
    assert_eq!(body["user_id"], "@ops:localhost");
    let mut ops = server.client();
    ops.token = Some(body["access_token"].as_str().unwrap().into());
    assert_eq!(
        ops.get("/_matrix/client/v3/account/whoami").await.0,
        StatusCode::OK
    );
    // A nonce is single-use and the MAC must match.
    let (status, _) = c.post("/_synapse/admin/v1/register", json!({ "nonce": nonce, "username": "ops2", "password": "x", "admin": false, "mac": mac })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let nonce = c.ok(Method::GET, "/_synapse/admin/v1/register", None).await["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = c.post("/_synapse/admin/v1/register", json!({ "nonce": nonce, "username": "ops3", "password": "x", "admin": false, "mac": "00" })).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_rate_limited_per_address() {
    let server = TestServer::start_with(&[("SALON_RATE_LIMITS__ENABLED", "true")]).await;
    let c = server.client();
    let mut limited = None;
    for i in 0..10 {
        let (status, body) = c
            .post("/_matrix/client/v3/login", json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "x" }, "password": format!("guess{i}") }))
            .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some((i, body));
            break;
        }
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let (attempt, body) = limited.expect("brute force is stopped");
    assert_eq!(attempt, 5, "the default burst is five attempts");
    assert_eq!(errcode(&body), "M_LIMIT_EXCEEDED");
    assert!(body["retry_after_ms"].as_u64().unwrap() > 1000, "{body}");
}

/// Tags set at once on one room (two devices, a bot) are all kept, and a tag can be set
/// over an `m.tag` that a client wrote through the generic endpoint without a `tags`
/// object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_set_at_once_are_all_kept() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let u = enc(&alice.user_id);
    let room = alice.create_room(json!({})).await;
    let r = enc(&room);
    let puts = (0..16).map(|i| {
        let (alice, path) = (
            alice.clone(),
            format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags/u.tag{i}"),
        );
        tokio::spawn(async move {
            let (status, body) = alice.put(&path, json!({ "order": 0.5 })).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        })
    });
    for put in futures::future::join_all(puts).await {
        put.unwrap();
    }
    let tags = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags"),
            None,
        )
        .await;
    for i in 0..16 {
        assert!(
            tags["tags"][format!("u.tag{i}")].is_object(),
            "u.tag{i} lost: {tags}"
        );
    }

    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/account_data/m.tag"),
            Some(json!({ "tags": 5 })),
        )
        .await;
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags/m.favourite"),
            Some(json!({ "order": 0.25 })),
        )
        .await;
    let tags = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/user/{u}/rooms/{r}/tags"),
            None,
        )
        .await;
    assert_eq!(tags["tags"], json!({ "m.favourite": { "order": 0.25 } }));
}

/// Registrations of one name at once: one gets the account, the others
/// `M_USER_IN_USE`; none is told it registered an account another then took over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_name_registered_at_once_goes_to_one_client() {
    let server = TestServer::start().await;
    let attempts = (0..4).map(|i| {
        let c = server.client();
        async move {
            c.post(
                "/_matrix/client/v3/register",
                json!({ "username": "contested", "password": format!("password number {i}"), "auth": { "type": "m.login.dummy" } }),
            )
            .await
        }
    });
    let winners: Vec<usize> = common::race(attempts, "M_USER_IN_USE")
        .await
        .iter()
        .enumerate()
        .filter_map(|(i, answer)| answer.is_some().then_some(i))
        .collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    // The winner's password is the account's.
    let (status, body) = server
        .client()
        .post(
            "/_matrix/client/v3/login",
            json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "contested" }, "password": format!("password number {}", winners[0]) }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A deactivation that comes while the password is being changed (hashing a password
/// takes a while) stays: the change does not write the account back as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deactivation_during_a_password_change_stays() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let login = |password: &'static str| {
        let c = server.client();
        async move {
            c.post(
                "/_matrix/client/v3/login",
                json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": password }),
            )
            .await
        }
    };
    let (status, body) = login("correct horse battery").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut other = alice.clone();
    other.token = Some(body["access_token"].as_str().unwrap().to_owned());
    let auth = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" });
    let (changed, deactivated) = tokio::join!(
        alice.post(
            "/_matrix/client/v3/account/password",
            json!({ "new_password": "a brand new secret", "auth": auth.clone() }),
        ),
        other.post(
            "/_matrix/client/v3/account/deactivate",
            json!({ "auth": auth }),
        ),
    );
    assert_eq!(deactivated.0, StatusCode::OK, "{}", deactivated.1);
    // The change either came first or found the account gone.
    assert!(
        changed.0 == StatusCode::OK || errcode(&changed.1) == "M_NOT_FOUND",
        "{changed:?}"
    );
    for password in ["a brand new secret", "correct horse battery"] {
        let (status, body) = login(password).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{password}: {body}");
    }
}

/// A password change that logs out the other devices also stops logins with the old
/// password that were under way (checking a password takes a while): none of their
/// tokens works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_under_way_do_not_survive_a_password_change() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let change = {
        let alice = alice.clone();
        tokio::spawn(async move {
            alice
                .post(
                    "/_matrix/client/v3/account/password",
                    json!({ "new_password": "a brand new secret", "logout_devices": true, "auth": {
                        "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" } }),
                )
                .await
        })
    };
    // Logins start all through the change, some while it hashes the new password.
    let mut logins = Vec::new();
    for _ in 0..40 {
        let c = server.client();
        logins.push(tokio::spawn(async move {
            c.post(
                "/_matrix/client/v3/login",
                json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" }),
            )
            .await
        }));
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let (status, body) = change.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    for login in futures::future::join_all(logins).await {
        let (status, body) = login.unwrap();
        if status != StatusCode::OK {
            assert_eq!(errcode(&body), "M_FORBIDDEN", "{body}");
            continue;
        }
        let mut c = server.client();
        c.token = Some(body["access_token"].as_str().unwrap().to_owned());
        assert_eq!(
            c.get("/_matrix/client/v3/account/whoami").await.0,
            StatusCode::UNAUTHORIZED,
            "a login with the old password outlived the change: {body}"
        );
    }
    assert_eq!(
        alice.get("/_matrix/client/v3/account/whoami").await.0,
        StatusCode::OK
    );
}
