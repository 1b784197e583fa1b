//! The `salon` command: configuration checks and administration.

use std::process::Command;

fn salon(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_salon"));
    cmd.args(args)
        .env("SALON_DATA_DIR", dir)
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

#[test]
fn check_config_explains_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = salon(dir.path(), &["check-config"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("server_name = localhost") && out.contains("127.0.0.1:8008"),
        "{out}"
    );

    let file = dir.path().join("salon.toml");
    std::fs::write(
        &file,
        "server_name = \"example.org\"\n[registration]\nmode = \"maybe\"\n",
    )
    .unwrap();
    let (code, _, err) = salon(
        dir.path(),
        &["check-config", "--config", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("salon.toml") && err.contains("maybe"), "{err}");

    let (code, _, err) = salon(
        dir.path(),
        &["check-config"],
        &[("SALON_LISTEN", "not an address")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("SALON_LISTEN"), "{err}");

    let (code, _, err) = salon(
        dir.path(),
        &["check-config", "--config", "/nonexistent/salon.toml"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/salon.toml"), "{err}");
}

#[test]
fn admin_creates_users_and_registration_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = salon(
        dir.path(),
        &["admin", "create-user", "Alice", "--admin"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("@alice:localhost") && out.contains("server admin"),
        "{out}"
    );
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("a generated password is printed");
    assert!(password.len() >= 16);
    let (code, _, err) = salon(dir.path(), &["admin", "create-user", "alice"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = salon(dir.path(), &["admin", "create-user", "bad name"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid"), "{err}");

    let (code, out, _) = salon(
        dir.path(),
        &[
            "admin",
            "registration-token",
            "create",
            "--token",
            "welcome-2026",
            "--uses",
            "3",
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "welcome-2026");
    let (_, out, _) = salon(dir.path(), &["admin", "registration-token", "create"], &[]);
    let random = out.trim().to_owned();
    assert_eq!(random.len(), 16);
    let (_, out, _) = salon(dir.path(), &["admin", "registration-token", "list"], &[]);
    assert!(out.contains("welcome-2026\tused 0/3\tvalid"), "{out}");
    assert!(out.contains(&random));
    let (code, _, _) = salon(
        dir.path(),
        &["admin", "registration-token", "delete", "welcome-2026"],
        &[],
    );
    assert_eq!(code, 0);
    let (code, _, err) = salon(
        dir.path(),
        &["admin", "registration-token", "delete", "welcome-2026"],
        &[],
    );
    assert_eq!(code, 1, "{err}");

    // The account works: the server starts on that data and the password logs in.
    let services = salon::services(
        salon::config::Config::load(
            None,
            vec![(
                "SALON_DATA_DIR".to_owned(),
                dir.path().display().to_string(),
            )],
        )
        .unwrap(),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let user = ruma::UserId::parse("@alice:localhost").unwrap();
    assert!(
        rt.block_on(services.users.check_password(&user, password))
            .unwrap()
    );
    assert!(services.users.get(&user).unwrap().unwrap().admin);
}

#[test]
fn appservice_registrations_are_managed_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.yaml");
    std::fs::write(
        &file,
        "id: clibridge\nurl: \"http://127.0.0.1:9999\"\nas_token: \"cli-as-token-long-enough\"\nhs_token: \"cli-hs-token-long-enough\"\nsender_localpart: clibot\nnamespaces:\n  users:\n    - exclusive: true\n      regex: \"@_cli_.*:localhost\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = salon(dir.path(), &["admin", "appservice", "register", path], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("registered appservice clibridge"), "{out}");
    let (code, out, _) = salon(dir.path(), &["admin", "appservice", "list"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("clibridge\t@clibot:localhost\thttp://127.0.0.1:9999")),
        "{out}"
    );
    // A broken file is refused with its name and the field.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "id: x\nurl: null\nas_token: short\n").unwrap();
    let (code, _, err) = salon(
        dir.path(),
        &["admin", "appservice", "register", broken.to_str().unwrap()],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("broken.yaml"), "{err}");
    let (code, out, _) = salon(
        dir.path(),
        &["admin", "appservice", "unregister", "clibridge"],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = salon(dir.path(), &["admin", "appservice", "list"], &[]);
    assert!(!out.contains("clibridge"), "{out}");
    let (code, _, _) = salon(
        dir.path(),
        &["admin", "appservice", "unregister", "clibridge"],
        &[],
    );
    assert_ne!(code, 0);
}
