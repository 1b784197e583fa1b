//! Push rules: server defaults, edits, and their `m.push_rules` account data.

mod common;

use common::{TestServer, errcode};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rules_start_from_the_defaults_and_can_be_edited() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let all = alice
        .ok(Method::GET, "/_matrix/client/v3/pushrules/", None)
        .await;
    let overrides: Vec<&str> = all["global"]["override"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert!(
        overrides.contains(&".m.rule.master") && overrides.contains(&".m.rule.suppress_notices"),
        "{overrides:?}"
    );
    let underride: Vec<&str> = all["global"]["underride"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert!(underride.contains(&".m.rule.message"), "{underride:?}");

    // A keyword rule, before nothing in particular.
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/content/budget",
            Some(
                json!({ "pattern": "budget", "actions": ["notify", { "set_tweak": "highlight" }] }),
            ),
        )
        .await;
    let rule = alice
        .ok(
            Method::GET,
            "/_matrix/client/v3/pushrules/global/content/budget",
            None,
        )
        .await;
    assert_eq!(rule["pattern"], "budget");
    assert_eq!(rule["enabled"], true);
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/content/budget/enabled",
            Some(json!({ "enabled": false })),
        )
        .await;
    let enabled = alice
        .ok(
            Method::GET,
            "/_matrix/client/v3/pushrules/global/content/budget/enabled",
            None,
        )
        .await;
    assert_eq!(enabled["enabled"], false);
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/content/budget/actions",
            Some(json!({ "actions": [] })),
        )
        .await;
    let actions = alice
        .ok(
            Method::GET,
            "/_matrix/client/v3/pushrules/global/content/budget/actions",
            None,
        )
        .await;
    assert_eq!(actions["actions"], json!([]));

    // Server-default rules can be switched off but not deleted or replaced.
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled",
            Some(json!({ "enabled": true })),
        )
        .await;
    let (status, body) = alice
        .delete("/_matrix/client/v3/pushrules/global/override/.m.rule.master")
        .await;
    assert!(status.is_client_error(), "{body}");
    let (status, body) = alice
        .put(
            "/_matrix/client/v3/pushrules/global/override/.m.rule.custom",
            json!({ "actions": [] }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "{body}"
    );
    let (status, body) = alice
        .get("/_matrix/client/v3/pushrules/global/content/nope")
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );

    // The rules travel as account data through sync, edits included.
    let sync = alice
        .ok(Method::GET, "/_matrix/client/v3/sync?timeout=0", None)
        .await;
    let rules = sync["account_data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.push_rules")
        .cloned()
        .expect("m.push_rules in sync");
    let content: Vec<&str> = rules["content"]["global"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert!(content.contains(&"budget"));
    let master = rules["content"]["global"]["override"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule_id"] == ".m.rule.master")
        .unwrap()
        .clone();
    assert_eq!(master["enabled"], true);

    alice
        .ok(
            Method::DELETE,
            "/_matrix/client/v3/pushrules/global/content/budget",
            None,
        )
        .await;
    let (status, _) = alice
        .get("/_matrix/client/v3/pushrules/global/content/budget")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A new user gets the defaults in the initial sync without having stored anything.
    let bob = server.user("bob").await;
    let sync = bob
        .ok(Method::GET, "/_matrix/client/v3/sync?timeout=0", None)
        .await;
    assert!(
        sync["account_data"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.push_rules")
    );
}
