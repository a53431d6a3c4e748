//! Short real runs of every scenario against a real `flare serve`: they assert on
//! correctness (every session up, counts exact, nothing lost or duplicated), never on
//! speed. Counts are exact because schedules are open-loop: a run of D seconds at R
//! per second has exactly R x D ticks, however slow the machine.

mod common;

use common::room::RoomServer;
use common::{loadgen, serial, Server, ADMIN_TOKEN, SECRET};

#[test]
fn connect_holds_every_session_and_measures_server_memory() {
    let _g = serial();
    let server = Server::start();
    let pid = server.pid().to_string();
    let url = server.url();
    let run = loadgen(&[
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--threads",
        "2",
        "connect",
        "--conns",
        "200",
        "--ramp-rate",
        "400",
        "--duration",
        "2s",
        "--server-pid",
        &pid,
        "--settle",
        "300ms",
    ]);
    let r = run.report(Some(&server));
    assert_eq!(run.code, 0, "{}", run.describe());
    assert!(r.passed);
    let c = &r.connections;
    assert_eq!(
        (c.attempted, c.established, c.failed_total, c.dropped_total),
        (200, 200, 0, 0),
        "{}",
        run.describe()
    );
    assert_eq!(c.connect_latency.count, 200);
    assert_eq!(
        r.totals.conns.closed, 200,
        "every session closed cleanly at the end"
    );
    let m = r
        .server_memory
        .as_ref()
        .expect("--server-pid gives a memory report");
    assert_eq!(m.connections, 200);
    assert_eq!(m.server_pids, vec![server.pid()]);
    assert!(m.rss_before_bytes > 0 && m.rss_after_bytes > 0);
    assert!(run.stdout.contains("server memory"), "{}", run.stdout);
}

#[test]
fn chat_json_delivers_every_acked_message_exactly_once_in_order() {
    let _g = serial();
    let server = Server::start();
    let url = server.url();
    let run = loadgen(&[
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--threads",
        "2",
        "chat",
        "--pairs",
        "4",
        "--rate",
        "200",
        "--duration",
        "2s",
    ]);
    let r = run.report(Some(&server));
    assert_eq!(run.code, 0, "{}\nserver:\n{}", run.describe(), server.log());
    let m = r.messages.as_ref().expect("chat reports messages");
    assert_eq!(m.scheduled, 400, "200/s for 2 s");
    assert_eq!(
        (m.sent, m.acked, m.errors_total, m.unacked),
        (400, 400, 0, 0)
    );
    assert_eq!(m.deliveries_unique, 400);
    assert_eq!(m.e2e_latency.count, 400);
    assert_eq!(m.send_ok_latency.count, 400);
    let i = r.integrity.as_ref().expect("chat checks integrity");
    assert_eq!(i.violations, 0, "{i:?}");
    assert_eq!((i.delivery.acked, i.delivery.received), (400, 400));
    assert_eq!(
        (i.echo.acked, i.echo.received),
        (400, 400),
        "the sender's own copies"
    );
    assert_eq!(r.connections.established, 8);
}

#[test]
fn chat_rkyv_over_two_worker_processes_merges_exactly() {
    let _g = serial();
    let server = Server::start();
    let url = server.url();
    let run = loadgen(&[
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--encoding",
        "rkyv",
        "--processes",
        "2",
        "--threads",
        "1",
        "--interval",
        "500ms",
        "chat",
        "--pairs",
        "4",
        "--rate",
        "200",
        "--duration",
        "2s",
    ]);
    let r = run.report(Some(&server));
    assert_eq!(run.code, 0, "{}\nserver:\n{}", run.describe(), server.log());
    assert_eq!(
        (r.processes, r.threads_per_process, r.encoding.as_str()),
        (2, 1, "rkyv")
    );
    assert_eq!(r.totals.workers, 2, "one result per worker process, merged");
    let m = r.messages.as_ref().expect("messages");
    assert_eq!((m.scheduled, m.acked, m.deliveries_unique), (400, 400, 400));
    // The merged histogram holds every sample of both processes.
    assert_eq!(m.e2e_latency.count, 400);
    // So does the latency over time: each process schedules 50 messages in each half
    // second, and every message counts in the interval it was scheduled in.
    assert_eq!(m.interval_secs, 0.5);
    let counts: Vec<u64> = m.e2e_over_time.iter().map(|i| i.count).collect();
    assert_eq!(counts, [100, 100, 100, 100], "{:?}", m.e2e_over_time);
    assert!(m
        .e2e_over_time
        .iter()
        .all(|i| i.p50_us > 0.0 && i.p99_us <= i.max_us));
    assert!(
        run.stdout
            .contains("end-to-end p99 over time (0.5 s intervals, by scheduled send)"),
        "{}",
        run.stdout
    );
    assert_eq!(r.integrity.as_ref().unwrap().violations, 0);
    assert_eq!(r.connections.established, 8);
}

#[test]
fn fanout_delivers_every_message_to_every_member() {
    let _g = serial();
    let server = Server::start();
    let url = server.url();
    let admin = server.admin_url();
    let run = loadgen(&[
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--threads",
        "2",
        "fanout",
        "--admin",
        &admin,
        "--admin-token",
        ADMIN_TOKEN,
        "--members",
        "20",
        "--publishers",
        "2",
        "--rate",
        "20",
        "--duration",
        "2s",
    ]);
    let r = run.report(Some(&server));
    assert_eq!(run.code, 0, "{}\nserver:\n{}", run.describe(), server.log());
    let m = r.messages.as_ref().expect("messages");
    assert_eq!((m.scheduled, m.acked, m.errors_total), (40, 40, 0));
    assert_eq!(m.deliveries_expected, 800, "40 messages x 20 members");
    assert_eq!(m.deliveries_unique, 800);
    assert_eq!(m.e2e_latency.count, 800);
    // 20 messages scheduled each second, each delivered to 20 members.
    let counts: Vec<u64> = m.e2e_over_time.iter().map(|i| i.count).collect();
    assert_eq!(counts, [400, 400], "{:?}", m.e2e_over_time);
    let i = r.integrity.as_ref().unwrap();
    assert_eq!((i.missing_deliveries, i.violations), (0, 0), "{i:?}");
}

#[test]
fn fanout_without_admin_token_is_a_usage_error() {
    let _g = serial();
    let run = loadgen(&[
        "--url",
        "ws://127.0.0.1:9/ws",
        "--jwt-secret",
        SECRET,
        "fanout",
        "--members",
        "2",
    ]);
    assert_eq!(run.code, 2, "{}", run.describe());
    assert!(run.stderr.contains("--admin-token"), "{}", run.describe());
}

#[test]
fn churn_opens_and_closes_at_a_fixed_rate() {
    let _g = serial();
    let server = Server::start();
    let url = server.url();
    let run = loadgen(&[
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--threads",
        "2",
        "churn",
        "--rate",
        "50",
        "--lifetime",
        "200ms",
        "--duration",
        "2s",
    ]);
    let r = run.report(Some(&server));
    assert_eq!(run.code, 0, "{}\nserver:\n{}", run.describe(), server.log());
    let c = &r.connections;
    assert_eq!(
        (c.attempted, c.established, c.failed_total, c.dropped_total),
        (100, 100, 0, 0)
    );
    assert_eq!(
        r.totals.conns.closed, 100,
        "each closed itself after its lifetime"
    );
}

#[test]
fn bad_secret_fails_every_session_with_its_reason() {
    let _g = serial();
    let server = Server::start();
    let url = server.url();
    let run = loadgen(&[
        "--url",
        &url,
        "--jwt-secret",
        "not-the-secret",
        "connect",
        "--conns",
        "20",
        "--duration",
        "1s",
    ]);
    let r = run.report(Some(&server));
    assert_eq!(run.code, 1, "{}", run.describe());
    assert!(!r.passed);
    assert_eq!(r.connections.established, 0);
    assert_eq!(
        r.connections.failed.get("auth:auth_failed"),
        Some(&20),
        "{:?}",
        r.connections.failed
    );
}

#[test]
fn refused_connections_are_counted_and_tolerated_up_to_max_error_rate() {
    let _g = serial();
    // A port that was just free: nobody listens.
    let addr = common::free_port();
    let url = format!("ws://{addr}/ws");
    let run = loadgen(&[
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "connect",
        "--conns",
        "10",
        "--duration",
        "1s",
    ]);
    let r = run.report(None);
    assert_eq!(run.code, 1, "{}", run.describe());
    assert_eq!(
        r.connections.failed.get("refused"),
        Some(&10),
        "{:?}",
        r.connections.failed
    );
    assert_eq!(r.error_rate, 1.0);
    let run = loadgen(&[
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--max-error-rate",
        "1",
        "connect",
        "--conns",
        "10",
        "--duration",
        "1s",
    ]);
    assert_eq!(
        run.code,
        0,
        "an error rate at the threshold passes: {}",
        run.describe()
    );
}

#[test]
fn missing_secret_is_a_usage_error() {
    let run = loadgen(&["connect", "--conns", "1"]);
    assert_eq!(run.code, 2, "{}", run.describe());
    assert!(run.stderr.contains("--jwt-secret"), "{}", run.describe());
}

/// `--target raw-ws`: the scenarios against a room server that knows nothing of
/// Flare's protocol (the peers' contract): every message arrives at every member of
/// its room exactly once, in order.
#[test]
fn raw_ws_chat_and_fanout_deliver_every_message_through_rooms() {
    let _g = serial();
    let rooms = RoomServer::start();
    let url = rooms.url();
    let run = loadgen(&[
        "--target",
        "raw-ws",
        "--url",
        &url,
        "--threads",
        "2",
        "chat",
        "--pairs",
        "4",
        "--rate",
        "80",
        "--duration",
        "2s",
    ]);
    let r = run.report(None);
    assert_eq!(run.code, 0, "{}", run.describe());
    assert_eq!(r.encoding, "raw-ws");
    let m = r.messages.as_ref().expect("messages");
    assert_eq!(
        (m.scheduled, m.sent, m.acked),
        (160, 160, 160),
        "{}",
        run.describe()
    );
    assert_eq!(m.deliveries_unique, 160, "each message once at the peer");
    assert_eq!(m.deliveries, 320, "the peer's copy and the sender's own");
    assert_eq!(m.e2e_latency.count, 160);
    let i = r.integrity.as_ref().expect("integrity");
    assert_eq!((i.delivery.lost, i.violations), (0, 0), "{i:?}");

    let run = loadgen(&[
        "--target",
        "raw-ws",
        "--url",
        &url,
        "--threads",
        "2",
        "fanout",
        "--members",
        "10",
        "--publishers",
        "2",
        "--rate",
        "20",
        "--duration",
        "2s",
    ]);
    let r = run.report(None);
    assert_eq!(run.code, 0, "{}", run.describe());
    let m = r.messages.as_ref().expect("messages");
    assert_eq!((m.scheduled, m.acked), (40, 40));
    assert_eq!((m.deliveries_expected, m.deliveries_unique), (400, 400));
    let i = r.integrity.as_ref().expect("integrity");
    assert_eq!((i.missing_deliveries, i.violations), (0, 0), "{i:?}");
}

/// nchan's way: members listen on WebSockets, publishers POST over HTTP, and a 2xx
/// answer is the acknowledgement.
#[test]
fn raw_ws_fanout_publishes_over_http() {
    let _g = serial();
    let rooms = RoomServer::start();
    let url = rooms.url();
    let publish = rooms.publish_url();
    let fanout = |publish_url: &str| {
        loadgen(&[
            "--target",
            "raw-ws",
            "--url",
            &url,
            "--threads",
            "2",
            "fanout",
            "--members",
            "10",
            "--publishers",
            "2",
            "--rate",
            "40",
            "--duration",
            "1s",
            "--publish-url",
            publish_url,
        ])
    };
    let run = fanout(&publish);
    let r = run.report(None);
    assert_eq!(run.code, 0, "{}", run.describe());
    let m = r.messages.as_ref().expect("messages");
    assert_eq!(
        (m.scheduled, m.sent, m.acked),
        (40, 40, 40),
        "{}",
        run.describe()
    );
    assert_eq!(m.send_ok_latency.count, 40, "every answer timed");
    assert_eq!((m.deliveries_expected, m.deliveries_unique), (400, 400));
    let i = r.integrity.as_ref().expect("integrity");
    assert_eq!((i.missing_deliveries, i.violations), (0, 0), "{i:?}");

    // A path the server does not publish on: every answer is an error, by status.
    let run = fanout(&format!("http://{}/nope", rooms.http_addr));
    assert_eq!(run.code, 1, "{}", run.describe());
    let m = run.report(None).messages.as_ref().expect("messages");
    assert_eq!((m.acked, m.errors.get("http_404").copied()), (0, Some(40)));
}

#[test]
fn raw_ws_connect_sums_the_memory_of_every_server_pid() {
    let _g = serial();
    let rooms = RoomServer::start();
    let url = rooms.url();
    let me = std::process::id().to_string();
    let pids = format!("{me},{me}");
    let run = loadgen(&[
        "--target",
        "raw-ws",
        "--url",
        &url,
        "connect",
        "--conns",
        "50",
        "--duration",
        "500ms",
        "--server-pid",
        &pids,
        "--settle",
        "100ms",
    ]);
    let r = run.report(None);
    assert_eq!(run.code, 0, "{}", run.describe());
    assert_eq!((r.connections.established, r.totals.conns.closed), (50, 50));
    let m = r.server_memory.as_ref().expect("memory report");
    assert_eq!(m.server_pids.len(), 2);
    assert!(m.rss_before_bytes > 0, "{m:?}");

    // Nothing to encode in rkyv: the option is refused, not ignored.
    let bad = loadgen(&[
        "--target",
        "raw-ws",
        "--url",
        &url,
        "--encoding",
        "rkyv",
        "connect",
    ]);
    assert_eq!(bad.code, 2, "{}", bad.describe());
    assert!(
        bad.stderr.contains("--encoding applies to --target flare"),
        "{}",
        bad.stderr
    );
}
