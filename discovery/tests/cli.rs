//! The binary's command line: bad configuration is a clear error at startup, never a panic;
//! good configuration serves and stops on SIGTERM.

use std::process::{Command, Stdio};

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
