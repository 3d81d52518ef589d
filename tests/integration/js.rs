//! The official Socket.IO JS client (npm `socket.io-client`) against a cluster of node
//! processes found through static seeds, with both the JSON and the MessagePack parsers.

use std::path::PathBuf;

use anyhow::Context;

use socketioxide_mesh::TransportKind;

use crate::{common::*, process::*};

async fn run_interop(kind: TransportKind, parser: &str) -> anyhow::Result<()> {
    logs();
    let js = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    anyhow::ensure!(
        js.join("node_modules/socket.io-client").exists(),
        "the JS client is not installed: run `npm ci --prefix tests/js` (.ci/run does)"
    );
    let ca = socketioxide_mesh::DevCa::generate("js CA")?;
    let certs = TempDir::new("js");
    let env = [("MESH_CLUSTER_ID", "js"), ("SIO_PARSER", parser)];
    let nodes = spawn_cluster(kind, &ca, &certs.0, 3, &env).await?;
    let mut cmd = tokio::process::Command::new("node");
    cmd.current_dir(&js).arg("interop.mjs");
    if parser == "msgpack" {
        cmd.arg("--msgpack");
    }
    for node in &nodes {
        cmd.arg(format!("http://{}", node.http));
    }
    let out = tokio::time::timeout(WAIT * 3, cmd.output())
        .await
        .context("the JS client did not finish")?
        .context("run node (is Node.js installed?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(
        out.status.success(),
        "JS interop failed with the {parser} parser:\n{stdout}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        7,
        "{stdout}"
    );
    Ok(())
}

/// The demo page's own client (`examples/common/client.js`, served at `/client.js` and built
/// into the binary, so the page works offline), driven from Node.js against two node
/// processes: it connects, chats across the mesh, gets an ack, and answers a server's question.
async fn page_client_works_across_the_mesh(kind: TransportKind) -> anyhow::Result<()> {
    logs();
    let js = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    anyhow::ensure!(
        js.join("node_modules/ws").exists(),
        "the JS test packages are not installed: run `npm ci --prefix tests/js` (.ci/run does)"
    );
    let ca = socketioxide_mesh::DevCa::generate("page CA")?;
    let certs = TempDir::new("page");
    let nodes = spawn_cluster(kind, &ca, &certs.0, 2, &[("MESH_CLUSTER_ID", "page")]).await?;
    let out = tokio::time::timeout(
        WAIT * 3,
        tokio::process::Command::new("node")
            .current_dir(&js)
            .arg("page-client.mjs")
            .args(nodes.iter().map(|n| format!("http://{}", n.http)))
            .output(),
    )
    .await
    .context("the page client did not finish")?
    .context("run node (is Node.js installed?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the page client failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in ["ok connected", "ok chat", "ok fetch", "ok question"] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
    Ok(())
}

/// The demo pages in headless Chromium (Debian's `chromium`, driven by npm's
/// `puppeteer-core`), against three node processes: typed on one node's chat page, a message
/// appears on another's; the live members line and the topology page show every node.
/// `MESH_SCREENSHOT=path.png` saves the topology page (the README's picture).
async fn demo_pages_work_in_a_browser(kind: TransportKind) -> anyhow::Result<()> {
    logs();
    let js = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    anyhow::ensure!(
        std::path::Path::new(&chromium).exists() && js.join("node_modules/puppeteer-core").exists(),
        "needs Chromium at {chromium} (Debian package `chromium`) and `npm ci --prefix tests/js`: .ci/run installs both"
    );
    let ca = socketioxide_mesh::DevCa::generate("browser CA")?;
    let certs = TempDir::new("browser");
    let nodes = spawn_cluster(kind, &ca, &certs.0, 3, &[("MESH_CLUSTER_ID", "browser")]).await?;
    let mut cmd = tokio::process::Command::new("node");
    cmd.current_dir(&js)
        .arg("browser.mjs")
        .arg(format!("http://{}", nodes[0].http))
        .arg(format!("http://{}", nodes[1].http));
    if let Ok(path) = std::env::var("MESH_SCREENSHOT")
        && kind == TransportKind::Quic
    {
        cmd.arg(path);
    }
    let out = tokio::time::timeout(WAIT * 6, cmd.output())
        .await
        .context("the browser test did not finish")?
        .context("run node")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the browser test failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "ok pages connected",
        "ok chat across nodes",
        "ok members line",
        "ok topology",
    ] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
    Ok(())
}

/// A minimal HTTP/1.1 GET (no client library needed for one JSON endpoint).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(body.to_string())
}

async fn official_js_client_json_parser(kind: TransportKind) -> anyhow::Result<()> {
    run_interop(kind, "json").await
}

async fn official_js_client_msgpack_parser(kind: TransportKind) -> anyhow::Result<()> {
    run_interop(kind, "msgpack").await
}

both_transports!(
    official_js_client_json_parser,
    official_js_client_msgpack_parser,
    page_client_works_across_the_mesh,
    demo_pages_work_in_a_browser
);
