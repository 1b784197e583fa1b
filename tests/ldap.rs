//! Directory logins and the directory sync against a real OpenLDAP `slapd`, started
//! here on a loopback port with its own private configuration and database.

mod common;

use std::{
    collections::HashSet,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;

const SUFFIX: &str = "dc=salon,dc=test";
const PEOPLE: &str = "ou=people,dc=salon,dc=test";
const ADMIN_DN: &str = "cn=admin,dc=salon,dc=test";
const ADMIN_PW: &str = "admin-password";

struct Slapd {
    child: Child,
    uri: String,
    /// `ldaps://…` when started with TLS.
    ldaps: Option<String>,
    /// The CA that signed the TLS certificate.
    ca: Option<std::path::PathBuf>,
    _dir: TempDir,
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn person(uid: &str, cn: &str, password: &str) -> String {
    format!(
        "dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {cn}\nsn: {cn}\nmail: {uid}@salon.test\nuserPassword: {password}\n\n"
    )
}

/// Start slapd with the people given; `scripts/test` installs it (Debian's slapd).
fn slapd(people: &[(&str, &str, &str)]) -> Slapd {
    slapd_with(people, "")
}

/// `groupOfNames` entries under `ou=groups`: `(cn, member uids)`.
fn groups_ldif(groups: &[(&str, &[&str])]) -> String {
    let mut out =
        format!("dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n\n");
    for (cn, members) in groups {
        out.push_str(&format!(
            "dn: cn={cn},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: {cn}\n"
        ));
        for m in *members {
            out.push_str(&format!("member: uid={m},{PEOPLE}\n"));
        }
        out.push('\n');
    }
    out
}

fn slapd_with(people: &[(&str, &str, &str)], extra_ldif: &str) -> Slapd {
    slapd_full(people, extra_ldif, false)
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the openssl tool.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Salon Test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

fn slapd_full(people: &[(&str, &str, &str)], extra_ldif: &str, tls: bool) -> Slapd {
    assert!(
        std::path::Path::new("/usr/sbin/slapd").exists(),
        "OpenLDAP's slapd is not installed: scripts/test installs it (Debian package slapd)"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::create_dir(dir.path().join("db")).unwrap();
    let conf = dir.path().join("slapd.conf");
    let tls_conf = if tls {
        certificates(dir.path());
        format!(
            "TLSCACertificateFile {d}/ca.pem\nTLSCertificateFile {d}/server.pem\nTLSCertificateKeyFile {d}/server.key\n"
        )
    } else {
        String::new()
    };
    std::fs::write(
        &conf,
        format!(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/nis.schema\ninclude /etc/ldap/schema/inetorgperson.schema\n\
             modulepath /usr/lib/ldap\nmoduleload back_mdb\npidfile {d}/slapd.pid\nargsfile {d}/slapd.args\n\
             database mdb\nmaxsize 104857600\nsuffix \"{SUFFIX}\"\nrootdn \"{ADMIN_DN}\"\nrootpw {ADMIN_PW}\n\
             directory {d}/db\n\
             access to attrs=userPassword by self write by anonymous auth by * none\n\
             access to * by * read\n{tls_conf}"
        ),
    )
    .unwrap();
    let mut ldif = format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Salon\ndc: salon\n\n\
         dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
    );
    for (uid, cn, pw) in people {
        ldif.push_str(&person(uid, cn, pw));
    }
    ldif.push_str(extra_ldif);
    let data = dir.path().join("data.ldif");
    std::fs::write(&data, ldif).unwrap();
    let out = Command::new("slapadd")
        .args(["-f", conf.to_str().unwrap(), "-l", data.to_str().unwrap()])
        .output()
        .expect("slapadd runs");
    assert!(
        out.status.success(),
        "slapadd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("ldap://127.0.0.1:{port}/");
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listeners = if tls {
        format!("{uri} ldaps://127.0.0.1:{tls_port}/")
    } else {
        uri.clone()
    };
    let child = Command::new("/usr/sbin/slapd")
        .args(["-f", conf.to_str().unwrap(), "-h", &listeners, "-d", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("slapd starts");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if tls {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Slapd {
        child,
        uri: format!("ldap://127.0.0.1:{port}"),
        ldaps: tls.then(|| format!("ldaps://127.0.0.1:{tls_port}")),
        ca: tls.then(|| dir.path().join("ca.pem")),
        _dir: dir,
    }
}

fn ldap_env(uri: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SALON_LDAP__ENABLED", "true".into()),
        ("SALON_LDAP__URI", uri.to_owned()),
        ("SALON_LDAP__BASE_DN", PEOPLE.into()),
        ("SALON_LDAP__BIND_DN", ADMIN_DN.into()),
        ("SALON_LDAP__BIND_PASSWORD", ADMIN_PW.into()),
        ("SALON_LDAP__SYNC_INTERVAL_MINUTES", "0".into()),
        ("SALON_LDAP__TIMEOUT_SECS", "2".into()),
    ]
}

async fn start(env: &[(&'static str, String)]) -> TestServer {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestServer::start_with(&pairs).await
}

async fn restart(dir: TempDir, env: &[(&'static str, String)]) -> TestServer {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestServer::start_in(dir, &pairs).await
}

async fn login(server: &TestServer, user: &str, password: &str) -> (StatusCode, Value) {
    server
        .client()
        .post(
            "/_matrix/client/v3/login",
            json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": password }),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_logins_provision_accounts_and_refuse_tricks() {
    let dir = slapd(&[
        ("alice", "Alice Martin", "alice-secret"),
        ("bob", "Bob Durand", "bob-secret"),
    ]);
    let server = start(&ldap_env(&dir.uri)).await;

    // First login creates the account with the directory's name.
    let (status, v) = login(&server, "alice", "alice-secret").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], "@alice:localhost");
    let profile = server
        .client()
        .get(&format!(
            "/_matrix/client/v3/profile/{}",
            enc("@alice:localhost")
        ))
        .await
        .1;
    assert_eq!(profile["displayname"], "Alice Martin");
    // Logging in with the full user id works too.
    let (status, _) = login(&server, "@alice:localhost", "alice-secret").await;
    assert_eq!(status, StatusCode::OK);

    // Wrong and empty passwords, and filter injection, log nobody in.
    for (user, password) in [
        ("alice", "wrong"),
        ("alice", ""),
        ("alice)(uid=*", "alice-secret"),
        ("*", "alice-secret"),
        ("alice)(|(uid=*", "bob-secret"),
        ("nobody", "alice-secret"),
    ] {
        let (status, v) = login(&server, user, password).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{user:?}/{password:?}: {v}");
        assert_eq!(errcode(&v), "M_FORBIDDEN");
    }

    // Local accounts keep their local passwords; a directory account has none.
    let local = server.user("localadmin").await;
    let (status, _) = login(&server, "localadmin", "correct horse battery").await;
    assert_eq!(status, StatusCode::OK);
    let _ = local;
    // Directory passwords are not changed through Matrix.
    let (_, v) = login(&server, "alice", "alice-secret").await;
    let mut alice = server.client();
    alice.token = Some(v["access_token"].as_str().unwrap().to_owned());
    let (status, v) = alice
        .post(
            "/_matrix/client/v3/account/password",
            json!({ "new_password": "a new password here", "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "alice-secret" } }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(v["error"].as_str().unwrap().contains("directory"), "{v}");
    // User-interactive auth of a directory account checks the directory password.
    let (_, other) = login(&server, "alice", "alice-secret").await;
    let device = other["device_id"].as_str().unwrap();
    let (status, v) = alice
        .post(
            "/_matrix/client/v3/delete_devices",
            json!({ "devices": [device], "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "wrong" } }),
        )
        .await;
    // A failed stage answers 401 with the flows again, and the reason.
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::UNAUTHORIZED, "M_FORBIDDEN"),
        "{v}"
    );
    let (status, v) = alice
        .post(
            "/_matrix/client/v3/delete_devices",
            json!({ "devices": [device], "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "alice-secret" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_bind_with_a_dn_template() {
    let dir = slapd(&[("carol", "Carol Petit", "carol-secret")]);
    let mut env = ldap_env(&dir.uri);
    env.retain(|(k, _)| !k.contains("BIND_DN") && !k.contains("BIND_PASSWORD"));
    env.push((
        "SALON_LDAP__BIND_DN_TEMPLATE",
        format!("uid={{username}},{PEOPLE}"),
    ));
    let server = start(&env).await;
    let (status, v) = login(&server, "carol", "carol-secret").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = login(&server, "carol", "nope").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A DN-breaking name is escaped, not interpreted.
    let (status, _) = login(&server, "carol,ou=people", "carol-secret").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_directory_still_lets_local_accounts_in() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = start(&ldap_env(&format!("ldap://127.0.0.1:{closed}"))).await;
    server.user("localuser").await;
    let (status, v) = login(&server, "localuser", "correct horse battery").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = login(&server, "alice", "alice-secret").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(errcode(&v), "M_UNKNOWN");
    assert!(v["error"].as_str().unwrap().contains("directory"), "{v}");
    server.stop().await;
}

fn salon_admin(
    data: &std::path::Path,
    env: &[(&'static str, String)],
    args: &[&str],
) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_salon"));
    cmd.arg("admin")
        .args(args)
        .env("SALON_DATA_DIR", data)
        .env("SALON_SERVER_NAME", "localhost")
        .env_remove("SALON_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("salon runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn modify(uri: &str, f: impl AsyncFnOnce(&mut ldap3::Ldap)) {
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(uri).await.unwrap();
    ldap3::drive!(conn);
    ldap.simple_bind(ADMIN_DN, ADMIN_PW)
        .await
        .unwrap()
        .success()
        .unwrap();
    f(&mut ldap).await;
    ldap.unbind().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_sync_imports_renames_and_removes() {
    let dir = slapd(&[
        ("alice", "Alice Martin", "alice-secret"),
        ("bob", "Bob Durand", "bob-secret"),
        ("carol", "Carol Petit", "carol-secret"),
    ]);
    let env = ldap_env(&dir.uri);
    let server = start(&env).await;
    let searcher = server.user("localsearcher").await;
    let data = server.stop().await;

    // A dry run says what would happen and changes nothing.
    let (code, out, err) = salon_admin(data.path(), &env, &["ldap", "sync", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("dry run") && out.contains("3 in the directory: 3 created"),
        "{out}"
    );
    assert!(err.contains("3/3"), "progress is shown: {err}");
    let (code, out, _) = salon_admin(data.path(), &env, &["ldap", "sync", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(out.contains("3 created"), "still nothing changed: {out}");
    let (code, out, err) = salon_admin(data.path(), &env, &["ldap", "sync"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("  created: @carol:localhost"), "{out}");

    // Colleagues can be found before they ever log in.
    let server = restart(data, &env).await;
    let mut searcher2 = server.client();
    searcher2.token = searcher.token.clone();
    let found = searcher2
        .ok(
            Method::POST,
            "/_matrix/client/v3/user_directory/search",
            Some(json!({ "search_term": "petit" })),
        )
        .await;
    assert_eq!(
        found["results"][0]["user_id"], "@carol:localhost",
        "{found}"
    );
    assert_eq!(found["results"][0]["display_name"], "Carol Petit");
    // Bob logs in once (he has a device), then leaves the organisation; Carol marries.
    let (status, _) = login(&server, "bob", "bob-secret").await;
    assert_eq!(status, StatusCode::OK);
    let data = server.stop().await;
    modify(&dir.uri, async |ldap| {
        ldap.delete(&format!("uid=bob,{PEOPLE}"))
            .await
            .unwrap()
            .success()
            .unwrap();
        ldap.modify(
            &format!("uid=carol,{PEOPLE}"),
            vec![ldap3::Mod::Replace("cn", HashSet::from(["Carol Lambert"]))],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    })
    .await;
    let (code, out, err) = salon_admin(data.path(), &env, &["ldap", "sync"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed: @bob:localhost"), "{out}");
    assert!(out.contains("renamed: @carol:localhost"), "{out}");

    let server = restart(data, &env).await;
    let profile = server
        .client()
        .get(&format!(
            "/_matrix/client/v3/profile/{}",
            enc("@carol:localhost")
        ))
        .await
        .1;
    assert_eq!(profile["displayname"], "Carol Lambert");
    // Bob's account is deactivated: no login (not even if the directory had him back).
    let (status, v) = login(&server, "bob", "bob-secret").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_accounts_come_back_when_the_directory_lists_them_again() {
    let dir = slapd(&[("dave", "Dave Roux", "dave-secret")]);
    let mut env = ldap_env(&dir.uri);
    env.push(("SALON_LDAP__ON_REMOVED", "lock".into()));
    let server = start(&env).await;
    let (status, _) = login(&server, "dave", "dave-secret").await;
    assert_eq!(status, StatusCode::OK);
    let data = server.stop().await;
    modify(&dir.uri, async |ldap| {
        ldap.delete(&format!("uid=dave,{PEOPLE}"))
            .await
            .unwrap()
            .success()
            .unwrap();
    })
    .await;
    let (code, out, _) = salon_admin(data.path(), &env, &["ldap", "sync"]);
    assert_eq!(code, 0);
    assert!(out.contains("removed: @dave:localhost"), "{out}");
    // Back in the directory: the next sync unlocks the account.
    modify(&dir.uri, async |ldap| {
        ldap.add(
            &format!("uid=dave,{PEOPLE}"),
            vec![
                ("objectClass", HashSet::from(["inetOrgPerson"])),
                ("uid", HashSet::from(["dave"])),
                ("cn", HashSet::from(["Dave Roux"])),
                ("sn", HashSet::from(["Roux"])),
                ("userPassword", HashSet::from(["dave-secret"])),
            ],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    })
    .await;
    let (_, out, _) = salon_admin(data.path(), &env, &["ldap", "sync"]);
    assert!(out.contains("unlocked: @dave:localhost"), "{out}");
    let server = restart(data, &env).await;
    let (status, v) = login(&server, "dave", "dave-secret").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_groups_become_spaces_with_their_rooms_members_and_managers() {
    let dir = slapd_with(
        &[
            ("alice", "Alice Martin", "alice-secret"),
            ("bob", "Bob Durand", "bob-secret"),
            ("carol", "Carol Petit", "carol-secret"),
        ],
        &groups_ldif(&[
            ("finance", &["alice", "bob"]),
            ("finance-managers", &["alice"]),
        ]),
    );
    let mut env = ldap_env(&dir.uri);
    env.push((
        "SALON_LDAP__GROUPS",
        format!(
            r#"[{{ group = "cn=finance,ou=groups,{SUFFIX}", space = "finance", name = "Finance", rooms = ["finance-general"], managers = "cn=finance-managers,ou=groups,{SUFFIX}" }}]"#
        ),
    ));
    // At her first login, alice lands in her group's space and rooms at once.
    let server = start(&env).await;
    let (status, v) = login(&server, "alice", "alice-secret").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut early = server.client();
    early.token = Some(v["access_token"].as_str().unwrap().to_owned());
    let first_sync = early.ok(Method::GET, "/_matrix/client/v3/sync", None).await;
    assert_eq!(
        first_sync["rooms"]["join"].as_object().map(|j| j.len()),
        Some(2),
        "the space and its room: {}",
        first_sync["rooms"]
    );
    let data = server.stop().await;
    let (code, out, err) = salon_admin(data.path(), &env, &["ldap", "sync"]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "group finance: joined @bob:localhost",
        "group finance-general: joined @bob:localhost",
        "group finance: @alice:localhost is a manager",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    assert!(
        !out.lines()
            .any(|l| l.contains("group") && l.contains("carol")),
        "carol is in no group: {out}"
    );

    let server = restart(data, &env).await;
    let (_, v) = login(&server, "alice", "alice-secret").await;
    let mut alice = server.client();
    alice.token = Some(v["access_token"].as_str().unwrap().to_owned());
    let space = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#finance:localhost")
            ),
            None,
        )
        .await["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let general = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#finance-general:localhost")
            ),
            None,
        )
        .await["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sync = alice.ok(Method::GET, "/_matrix/client/v3/sync", None).await;
    let joined = &sync["rooms"]["join"];
    assert!(
        joined.get(&space).is_some() && joined.get(&general).is_some(),
        "{joined}"
    );
    let create = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.create/",
                enc(&space)
            ),
            None,
        )
        .await;
    assert_eq!(create["type"], "m.space");
    let child = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.space.child/{}",
                enc(&space),
                enc(&general)
            ),
            None,
        )
        .await;
    assert!(child["via"].is_array());
    let levels = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.power_levels/",
                enc(&space)
            ),
            None,
        )
        .await;
    assert_eq!(levels["users"]["@alice:localhost"], 50, "{levels}");
    let members = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&general)),
            None,
        )
        .await;
    assert!(
        members["joined"].get("@bob:localhost").is_some(),
        "{members}"
    );
    assert!(
        members["joined"].get("@carol:localhost").is_none(),
        "{members}"
    );

    // Bob leaves the group: the next sync takes him out of the space and its rooms.
    let data = server.stop().await;
    modify(&dir.uri, async |ldap| {
        ldap.modify(
            &format!("cn=finance,ou=groups,{SUFFIX}"),
            vec![ldap3::Mod::Delete(
                "member",
                HashSet::from([format!("uid=bob,{PEOPLE}").as_str()]),
            )],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    })
    .await;
    let (code, out, _) = salon_admin(data.path(), &env, &["ldap", "sync"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("group finance: removed @bob:localhost"),
        "{out}"
    );
    assert!(
        out.contains("group finance-general: removed @bob:localhost"),
        "{out}"
    );
    let server = restart(data, &env).await;
    let (_, v) = login(&server, "alice", "alice-secret").await;
    let mut alice = server.client();
    alice.token = Some(v["access_token"].as_str().unwrap().to_owned());
    let members = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&general)),
            None,
        )
        .await;
    assert!(
        members["joined"].get("@bob:localhost").is_none(),
        "{members}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldaps_and_starttls_verify_the_directory_certificate() {
    let dir = slapd_full(&[("erin", "Erin Morel", "erin-secret")], "", true);
    let ca = dir.ca.clone().unwrap().display().to_string();
    let ldaps = dir.ldaps.clone().unwrap();

    // LDAPS with the directory's CA.
    let mut env = ldap_env(&ldaps);
    env.push(("SALON_LDAP__CA_FILE", ca.clone()));
    let server = start(&env).await;
    let (status, v) = login(&server, "erin", "erin-secret").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    server.stop().await;

    // StartTLS on the plain port, with the CA.
    let mut env = ldap_env(&dir.uri);
    env.push(("SALON_LDAP__STARTTLS", "true".into()));
    env.push(("SALON_LDAP__CA_FILE", ca));
    let server = start(&env).await;
    let (status, v) = login(&server, "erin", "erin-secret").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    server.stop().await;

    // Without the CA the certificate is not trusted: no login through the directory.
    let server = start(&ldap_env(&ldaps)).await;
    let (status, v) = login(&server, "erin", "erin-secret").await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
        "{v}"
    );
    server.stop().await;
}
