//! Admin HTTP API end to end (PROTOCOL.md §8).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn sorted(v: &Value) -> Vec<String> {
    let mut m: Vec<String> =
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    m.sort();
    m
}

#[test]
fn health_ready_and_metrics_need_no_token() {
    let s = Server::start();
    let r = http(s.admin, "GET", "/healthz", None, None);
    assert_eq!(r.status, 200, "{r:?}");
    let r = http(s.admin, "GET", "/readyz", None, None);
    assert_eq!(r.status, 200, "{r:?}");
    // Some traffic first, so that counters exist.
    let (mut a, _) = s.login("alice", "phone", None);
    a.send_ok("m1", "bob", "hi");
    let r = http(s.admin, "GET", "/metrics", None, None);
    assert_eq!(r.status, 200, "{r:?}");
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain"),
        "Prometheus text format is text/plain, got {ct:?}"
    );
    // Prometheus text exposition: comments (# HELP/# TYPE) and `name{labels} value` samples.
    let mut samples = 0;
    for line in r.body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]` or `name value [timestamp]`.
        let (name_labels, rest) = match line.rfind('}') {
            Some(i) => (&line[..=i], &line[i + 1..]),
            None => line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}")),
        };
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = name_labels.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        assert!(
            value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
            "bad sample value in {line:?}"
        );
        samples += 1;
    }
    assert!(samples > 0, "no samples in /metrics:\n{}", r.body);
    for sample in ["flare_dedup_entries 1", "flare_dedup_evicted_total 0"] {
        assert!(
            r.body.lines().any(|l| l == sample),
            "no {sample:?} in /metrics:\n{}",
            r.body
        );
    }
    assert!(
        r.body.contains("# TYPE"),
        "no # TYPE lines in /metrics:\n{}",
        r.body
    );
    // The flush-time histogram: cumulative buckets ending in +Inf, which is the count.
    let flush: Vec<(&str, f64)> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("flare_log_flush_seconds_"))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k, v.parse::<f64>().unwrap()))
        .collect();
    let buckets: Vec<f64> = flush
        .iter()
        .filter(|(k, _)| k.starts_with("bucket{"))
        .map(|&(_, v)| v)
        .collect();
    let count = flush.iter().find(|(k, _)| *k == "count").map(|&(_, v)| v);
    assert!(
        buckets.len() > 2 && buckets.windows(2).all(|w| w[0] <= w[1]),
        "flush buckets not cumulative:\n{}",
        r.body
    );
    assert!(
        flush.iter().any(|(k, _)| *k == "bucket{le=\"+Inf\"}"),
        "no +Inf bucket:\n{}",
        r.body
    );
    assert_eq!(
        buckets.last().copied(),
        count,
        "+Inf bucket is not the count"
    );
    // alice's send was made durable by at least one flush.
    assert!(count.unwrap() >= 1.0, "no flush counted:\n{}", r.body);
    assert!(
        flush.iter().any(|&(k, v)| k == "sum" && v > 0.0),
        "no flush time summed:\n{}",
        r.body
    );
}

#[test]
fn v1_needs_the_admin_token() {
    let s = Server::start();
    let calls: [(&str, &str, Option<&str>); 7] = [
        (
            "POST",
            "/v1/messages",
            Some(r#"{"from":"system","to":{"user":"bob"},"body":"x"}"#),
        ),
        ("PUT", "/v1/groups/g", Some(r#"{"members":["a"]}"#)),
        ("POST", "/v1/groups/g/members", Some(r#"{"add":["b"]}"#)),
        ("GET", "/v1/groups/g", None),
        ("PUT", "/v1/users/u/blocked", Some(r#"{"users":["x"]}"#)),
        ("GET", "/v1/users/u/presence", None),
        ("POST", "/v1/users/u/kick", Some("{}")),
    ];
    for (m, p, b) in calls {
        let r = http(s.admin, m, p, None, b);
        assert_eq!(r.status, 401, "{m} {p} without a token: {r:?}");
        let r = http(s.admin, m, p, Some("wrong-token"), b);
        assert_eq!(r.status, 401, "{m} {p} with a wrong token: {r:?}");
        let r = http(s.admin, m, p, Some(&format!("{ADMIN_TOKEN}x")), b);
        assert_eq!(
            r.status, 401,
            "{m} {p} with a token that only starts right: {r:?}"
        );
    }
    // Nothing of the refused calls happened.
    let r = s.admin("GET", "/v1/groups/g", None);
    assert_eq!(
        r.status, 404,
        "the unauthorised PUT created the group: {r:?}"
    );
    let (mut b, ok) = s.login("bob", "phone", Some(0));
    assert_eq!(
        ok["head_seq"], 0,
        "the unauthorised POST /v1/messages stored a message: {ok}"
    );
    b.ping_pong();
}

#[test]
fn bad_json_is_400_bad_request() {
    let s = Server::start();
    for (m, p) in [
        ("POST", "/v1/messages"),
        ("PUT", "/v1/groups/g"),
        ("POST", "/v1/groups/g/members"),
        ("PUT", "/v1/users/u/blocked"),
    ] {
        for body in ["{not json", "", "[1,"] {
            let r = http(s.admin, m, p, Some(ADMIN_TOKEN), Some(body));
            assert_eq!(r.status, 400, "{m} {p} with body {body:?}: {r:?}");
            let v = r.json();
            assert_eq!(v["error"]["code"], "bad_request", "{m} {p}: {v}");
            assert!(v["error"]["message"].is_string(), "{m} {p}: {v}");
        }
    }
    // Well-formed JSON that lacks what the call needs is not a success either.
    let r = s.admin(
        "POST",
        "/v1/messages",
        Some(json!({"from": "system", "to": {"user": "bob"}})),
    );
    assert!(
        (400..500).contains(&r.status),
        "POST /v1/messages without body: {r:?}"
    );
    let r = s.admin(
        "POST",
        "/v1/messages",
        Some(json!({"from": "sys tem", "to": {"user": "bob"}, "body": "x"})),
    );
    assert!(
        (400..500).contains(&r.status),
        "POST /v1/messages with a bad sender id: {r:?}"
    );
    // Unknown fields are ignored.
    let r = s.admin(
        "PUT",
        "/v1/groups/g",
        Some(json!({"members": ["a"], "colour": "blue"})),
    );
    assert_eq!(r.status, 204, "{r:?}");
}

#[test]
fn post_message_is_delivered_like_a_send() {
    let s = Server::start();
    let (mut b, _) = s.login("bob", "phone", None);
    let (mut a, _) = s.login("alice", "phone", None);
    b.ping_pong();
    a.ping_pong();

    // A system message.
    let r = s.admin(
        "POST",
        "/v1/messages",
        Some(json!({"from": "system", "to": {"user": "bob"}, "body": "welcome", "id": "adm-1"})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let id1 = msg_id(&v);
    assert_eq!(v["dup"], false, "{v}");
    assert!(v["ts"].is_u64(), "{v}");
    let m = b.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(m["seq"], 1, "{m}");
    assert_eq!(msg_id(&m), id1);
    assert_eq!(m["from"], "system");
    assert!(
        m["from_device"].is_string(),
        "msg.from_device must be present: {m}"
    );
    assert_eq!(m["to"], json!({"user": "bob"}));
    assert_eq!(m["body"], "welcome");
    assert_eq!(m["ts"], v["ts"]);

    // Same id again: dup, same msg_id, not stored twice.
    let r = s.admin(
        "POST",
        "/v1/messages",
        Some(json!({"from": "system", "to": {"user": "bob"}, "body": "welcome", "id": "adm-1"})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let v2 = r.json();
    assert_eq!(v2["dup"], true, "{v2}");
    assert_eq!(v2["msg_id"], v["msg_id"]);

    // On behalf of a real user: like that user's send, also in the sender's inbox.
    let r = s.admin(
        "POST",
        "/v1/messages",
        Some(json!({"from": "alice", "to": {"user": "bob"}, "body": "from alice", "id": "adm-2"})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let v3 = r.json();
    let m = b.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(m["seq"], 2, "the dup POST must not be stored: {m}");
    assert_eq!(m["msg_id"], v3["msg_id"]);
    assert_eq!(m["from"], "alice");
    let m = a.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(m["seq"], 1, "{m}");
    assert_eq!(m["msg_id"], v3["msg_id"]);

    // Without id: each POST is a new message.
    let x = s
        .admin(
            "POST",
            "/v1/messages",
            Some(json!({"from": "system", "to": {"user": "bob"}, "body": "n"})),
        )
        .json();
    let y = s
        .admin(
            "POST",
            "/v1/messages",
            Some(json!({"from": "system", "to": {"user": "bob"}, "body": "n"})),
        )
        .json();
    assert_ne!(x["msg_id"], y["msg_id"]);
    let ms = b.recv_msgs(2);
    assert_eq!(seqs(&ms), vec![3, 4]);

    // To a group, on behalf of a member: every member. (Whether a reserved sender such
    // as `system` may post to a group it is not a member of, PROTOCOL.md §8 does not say.)
    s.put_group("team", &["alice", "bob"]);
    let r = s.admin(
        "POST",
        "/v1/messages",
        Some(json!({"from": "alice", "to": {"group": "team"}, "body": "all hands"})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let g = r.json();
    let mb = b.recv_until("msg", |v| v["type"] == "msg");
    let ma = a.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!((mb["seq"].clone(), ma["seq"].clone()), (json!(5), json!(2)));
    for m in [&ma, &mb] {
        assert_eq!(m["msg_id"], g["msg_id"]);
        assert_eq!(m["to"], json!({"group": "team"}));
        assert_eq!(m["body"], "all hands");
    }
}

#[test]
fn groups_crud() {
    let s = Server::start();
    let r = s.admin("GET", "/v1/groups/nope", None);
    assert_eq!(r.status, 404, "{r:?}");
    s.put_group("g", &["a", "b", "c"]);
    let v = s.admin("GET", "/v1/groups/g", None).json();
    assert_eq!(v["group"], "g");
    assert_eq!(sorted(&v["members"]), ["a", "b", "c"]);
    let r = s.admin(
        "POST",
        "/v1/groups/g/members",
        Some(json!({"add": ["d", "e"], "remove": ["a"]})),
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(
        sorted(&s.admin("GET", "/v1/groups/g", None).json()["members"]),
        ["b", "c", "d", "e"]
    );
    // Only add, only remove.
    assert_eq!(
        s.admin("POST", "/v1/groups/g/members", Some(json!({"add": ["f"]})))
            .status,
        204
    );
    assert_eq!(
        s.admin(
            "POST",
            "/v1/groups/g/members",
            Some(json!({"remove": ["b", "c"]}))
        )
        .status,
        204
    );
    assert_eq!(
        sorted(&s.admin("GET", "/v1/groups/g", None).json()["members"]),
        ["d", "e", "f"]
    );
    // PUT replaces.
    s.put_group("g", &["z"]);
    assert_eq!(
        sorted(&s.admin("GET", "/v1/groups/g", None).json()["members"]),
        ["z"]
    );
    // Groups are independent.
    assert_eq!(s.admin("GET", "/v1/groups/g2", None).status, 404);
}

fn presence(s: &Server, user: &str) -> Value {
    let r = s.admin("GET", &format!("/v1/users/{user}/presence"), None);
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["user"], user, "{v}");
    v
}

/// Polls presence until `pred` holds (presence may lag a disconnect a little).
fn wait_presence(s: &Server, user: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = presence(s, user);
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "presence of {user}: never {what}; last {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn devices(v: &Value) -> Vec<String> {
    let mut d: Vec<String> = v["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("devices must be an array: {v}"))
        .iter()
        .map(|d| d["device"].as_str().unwrap().to_string())
        .collect();
    d.sort();
    d
}

#[test]
fn presence_online_offline_with_devices() {
    let s = Server::start();
    let v = presence(&s, "alice");
    assert_eq!(v["online"], false, "{v}");
    assert_eq!(devices(&v), Vec::<String>::new());
    let (mut p, _) = s.login_on_shard("alice", "phone", 0, None);
    let (mut l, _) = s.login_on_shard("alice", "laptop", 1, None);
    let v = wait_presence(&s, "alice", "online with phone and laptop", |v| {
        v["online"] == true && devices(v).len() == 2
    });
    assert_eq!(devices(&v), ["laptop", "phone"]);
    for d in v["devices"].as_array().unwrap() {
        assert_eq!(d["node"], NODE_ID, "{d}");
        // PROTOCOL.md §8 gives no unit for `since`; assumed like every other time of
        // the protocol (`ts`): a u64 of ms since the Unix epoch.
        let since = d["since"].as_u64().unwrap_or_else(|| {
            panic!("devices[].since: expected a u64 of ms since the epoch: {d}")
        });
        assert!(
            since + 600_000 > now_ms() && since <= now_ms() + 60_000,
            "devices[].since {since} is not ms since the epoch (now {})",
            now_ms()
        );
    }
    p.close();
    let v = wait_presence(&s, "alice", "laptop only", |v| devices(v) == ["laptop"]);
    assert_eq!(v["online"], true);
    l.close();
    let v = wait_presence(&s, "alice", "offline", |v| v["online"] == false);
    assert_eq!(devices(&v), Vec::<String>::new());
}

#[test]
fn kick_one_device_then_all() {
    let s = Server::start();
    let (mut p, _) = s.login("alice", "phone", None);
    let (mut l, _) = s.login("alice", "laptop", None);
    let (mut b, _) = s.login("bob", "phone", None);
    let r = s.admin(
        "POST",
        "/v1/users/alice/kick",
        Some(json!({"device": "phone"})),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let (code, frames) = p.expect_close();
    let g = frames
        .iter()
        .find(|f| f["type"] == "goaway")
        .unwrap_or_else(|| panic!("no goaway: {frames:?}"));
    assert_eq!(g["reason"], "kicked", "{g}");
    assert_eq!(code, Some(4003), "{frames:?}");
    l.ping_pong();
    b.ping_pong();
    // Without a device: every session of the user.
    let (mut p, _) = s.login("alice", "phone", None);
    let r = s.admin("POST", "/v1/users/alice/kick", Some(json!({})));
    assert_eq!(r.status, 204, "{r:?}");
    for c in [&mut p, &mut l] {
        let (code, frames) = c.expect_close();
        let g = frames
            .iter()
            .find(|f| f["type"] == "goaway")
            .unwrap_or_else(|| panic!("[{}] no goaway: {frames:?}", c.name));
        assert_eq!(g["reason"], "kicked", "{g}");
        assert_eq!(code, Some(4003), "[{}] {frames:?}", c.name);
    }
    b.ping_pong();
    // A kicked user can come back.
    let (mut p, _) = s.login("alice", "phone", None);
    p.ping_pong();
}

#[test]
fn unknown_v1_path_is_404() {
    let s = Server::start();
    let r = s.admin("GET", "/v1/nothing-here", None);
    assert_eq!(r.status, 404, "{r:?}");
}
