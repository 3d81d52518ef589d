//! The binary's command line: bad configuration is a clear error at startup, never a panic;
//! good configuration serves and stops on SIGTERM.

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_socketioxide-mesh-discovery");

fn fails_with(args: &[&str], needle: &str) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run the binary");
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_configuration_is_refused_clearly() {
    fails_with(
        &["--ttl-ms", "5", "--listen", "127.0.0.1:0"],
        "--ttl-ms must be at least 100",
    );
    fails_with(&["--ttl-ms", "soon"], "invalid value 'soon'");
    fails_with(
        &["--max-body", "1", "--listen", "127.0.0.1:0"],
        "--max-body",
    );
    fails_with(&["--tls-cert", "/nonexistent.pem"], "--tls-key");
    fails_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/x",
            "--tls-client-ca",
            "/y",
        ],
        "cannot read",
    );
    fails_with(
        &["--log-level", "[[[", "--listen", "127.0.0.1:0"],
        "--log-level",
    );
    fails_with(
        &["--header-timeout-ms", "0", "--listen", "127.0.0.1:0"],
        "--header-timeout-ms must be within 10..=3600000",
    );
    fails_with(
        &["--idle-timeout-ms", "99999999", "--listen", "127.0.0.1:0"],
        "--idle-timeout-ms must be within",
    );
    fails_with(
        &["--request-timeout-ms", "5", "--listen", "127.0.0.1:0"],
        "--request-timeout-ms must be within",
    );
    fails_with(
        &["--tls-handshake-timeout-ms", "1", "--listen", "127.0.0.1:0"],
        "--tls-handshake-timeout-ms must be within",
    );
    fails_with(
        &["--max-connections", "0", "--listen", "127.0.0.1:0"],
        "--max-connections must be within",
    );
    fails_with(&["--max-connections", "many"], "invalid value 'many'");
}

/// The binary, started through `sh` (to set limits first), until dropped.
struct Service {
    child: Child,
    ready: serde_json::Value,
    addr: SocketAddr,
}

impl Service {
    fn start(shell_prefix: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(r#"{shell_prefix} exec "$0" "$@""#))
            .arg(BIN)
            .args(["--listen", "127.0.0.1:0", "--log-level", "warn"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let ready: serde_json::Value = serde_json::from_str(&line).expect("JSON ready line");
        let addr = ready["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("an address");
        Service { child, ready, addr }
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns what it logged.
    fn stop(mut self) -> String {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        let exit = loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                break exit;
            }
            assert!(Instant::now() < deadline, "still running after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");
        let mut logs = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            err.read_to_string(&mut logs).expect("stderr");
        }
        logs
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request with `Connection: close`; the status code and the body. Bounded by a read
/// timeout.
fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n");
    if let Some(body) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or_default());
    s.write_all(req.as_bytes()).expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("an answer within 5 s");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The measurement of the hardening issue: with `ulimit -n 256`, 306 idle connections made
/// `/healthz` and registration time out (`accept error: Too many open files`). The connection
/// limit now follows the open files limit, and idle connections make room for new ones.
#[test]
fn idle_connections_under_a_low_open_files_limit_do_not_starve_the_service() {
    let service = Service::start("ulimit -n 256 &&", &[], &[]);
    assert_eq!(
        service.ready["max_connections"],
        256 - 64,
        "{}",
        service.ready
    );
    let idle: Vec<TcpStream> = (0..306)
        .map(|_| TcpStream::connect(service.addr).expect("connect"))
        .collect();
    let started = Instant::now();
    assert_eq!(
        request(service.addr, "GET", "/healthz", None),
        (200, "ok".to_string())
    );
    let (status, body) = request(
        service.addr,
        "POST",
        "/v1/clusters/chat/nodes",
        Some(r#"{"node_id":"n1","addr":"10.0.0.1:7800"}"#),
    );
    assert_eq!(status, 200, "{body}");
    // Well within the default timeouts (5 s): room was made at once, not by timeouts.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let (_, stats) = request(service.addr, "GET", "/v1/stats", None);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("JSON stats");
    assert_eq!(stats["events"]["accept_error"], 0, "{stats}");
    assert!(
        stats["connections"]["open"].as_u64() <= Some(192),
        "{stats}"
    );
    drop(idle);
    let logs = service.stop();
    assert!(logs.contains("--max-connections lowered"), "{logs}");
    // Hundreds of evictions, logged once with the reason (the summary comes every 10 s).
    assert_eq!(
        logs.matches("connection limit reached").count(),
        1,
        "{logs}"
    );
    assert!(!logs.contains("Too many open files"), "{logs}");
}

#[test]
fn loopback_addresses_are_refused_when_configured() {
    let body = r#"{"node_id":"n1","addr":"127.0.0.1:7800"}"#;
    let service = Service::start("", &[], &[]);
    let (status, answer) = request(service.addr, "POST", "/v1/clusters/c/nodes", Some(body));
    assert_eq!(status, 200, "loopback is accepted by default: {answer}");
    service.stop();
    for (args, env) in [
        (&["--refuse-loopback"][..], &[][..]),
        (&[][..], &[("DISCOVERY_REFUSE_LOOPBACK", "true")][..]),
    ] {
        let service = Service::start("", args, env);
        let (status, answer) = request(service.addr, "POST", "/v1/clusters/c/nodes", Some(body));
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("loopback"), "{answer}");
        service.stop();
    }
}

#[test]
fn serves_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log-level", "warn"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).expect("JSON ready line");
    assert_eq!(ready["event"], "ready");
    assert!(
        ready["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");
}

/// When `accept` fails for lack of file descriptors, the service backs off, logs the cause
/// once, and serves again as soon as its idle connections are closed. The open files limit is
/// lowered under the running service (`prlimit`, from util-linux), below its connection
/// limit, which the check at startup would otherwise prevent.
#[test]
fn accept_errors_back_off_and_are_logged_once() {
    let service = Service::start(
        "",
        &["--idle-timeout-ms", "300", "--header-timeout-ms", "300"],
        &[],
    );
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(service.child.id().to_string())
        .arg("--nofile=40:40")
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let idle: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(service.addr).expect("connect"))
        .collect();
    // Behind the idle connections in the backlog: served once they are closed.
    let started = Instant::now();
    assert_eq!(
        request(service.addr, "GET", "/healthz", None),
        (200, "ok".to_string())
    );
    let (_, stats) = request(service.addr, "GET", "/v1/stats", None);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("JSON stats");
    let errors = stats["events"]["accept_error"].as_u64().unwrap_or(0);
    // Retrying at once would fail thousands of times; backing off from 10 ms (doubling,
    // reset after each success) a few times per 300 ms round.
    let rounds = started.elapsed().as_millis() / 300 + 1;
    assert!(
        errors >= 1 && u128::from(errors) <= 8 * rounds,
        "{errors} accept errors in {:?}: {stats}",
        started.elapsed()
    );
    drop(idle);
    let logs = service.stop();
    assert_eq!(logs.matches("accept error").count(), 1, "{logs}");
    assert!(logs.contains("Too many open files"), "{logs}");
}
