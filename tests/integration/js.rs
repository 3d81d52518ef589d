//! The official Socket.IO JS client (npm `socket.io-client`) against a cluster of node
//! processes found through static seeds, with both the JSON and the MessagePack parsers.

use std::path::PathBuf;

use anyhow::Context;

use socketioxide_mesh::TransportKind;

use crate::{common::*, process::*};

/// The JS test folder, once `npm ci --prefix tests/js` installed `package` there.
fn js_dir(package: &str) -> anyhow::Result<PathBuf> {
    let js = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    anyhow::ensure!(
        js.join("node_modules").join(package).exists(),
        "{package} is not installed: run `npm ci --prefix tests/js` (.ci/run does)"
    );
    Ok(js)
}

/// `n` node processes of cluster `tag` (with `env`), their certificates in a temporary folder.
async fn node_processes(
    kind: TransportKind,
    tag: &str,
    n: usize,
    env: &[(&str, &str)],
) -> anyhow::Result<(TempDir, Vec<ProcNode>)> {
    logs();
    let ca = socketioxide_mesh::DevCa::generate(&format!("{tag} CA"))?;
    let certs = TempDir::new(tag);
    let mut env = env.to_vec();
    env.push(("MESH_CLUSTER_ID", tag));
    let nodes = spawn_cluster(kind, &ca, &certs.0, n, &env).await?;
    Ok((certs, nodes))
}

/// Run `node <script> <args>` in the JS folder; its standard output, once it succeeded and
/// printed every line of `steps`.
async fn run_node_script(
    js: &PathBuf,
    script: &str,
    args: Vec<String>,
    steps: &[&str],
) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        WAIT * 6,
        tokio::process::Command::new("node")
            .current_dir(js)
            .arg(script)
            .args(args)
            .output(),
    )
    .await
    .with_context(|| format!("{script} did not finish"))?
    .context("run node (is Node.js installed?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "{script} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in steps {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
    Ok(stdout)
}

fn urls(nodes: &[ProcNode]) -> Vec<String> {
    nodes.iter().map(|n| format!("http://{}", n.http)).collect()
}

async fn run_interop(kind: TransportKind, parser: &str) -> anyhow::Result<()> {
    let js = js_dir("socket.io-client")?;
    let (_certs, nodes) = node_processes(kind, "js", 3, &[("SIO_PARSER", parser)]).await?;
    let mut args = Vec::new();
    if parser == "msgpack" {
        args.push("--msgpack".to_string());
    }
    args.extend(urls(&nodes));
    let stdout = run_node_script(&js, "interop.mjs", args, &[]).await?;
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        7,
        "{stdout}"
    );
    Ok(())
}

/// The demo page's own client (`examples/common/client.js`, served at `/client.js` and built
/// into the binary, so the page works offline), driven from Node.js against two node
/// processes: it connects, answers an event emitted before the connect, chats across the mesh, gets an ack, and answers a server's question.
async fn page_client_works_across_the_mesh(kind: TransportKind) -> anyhow::Result<()> {
    let js = js_dir("ws")?;
    let (_certs, nodes) = node_processes(kind, "page", 2, &[]).await?;
    let steps = [
        "ok connected",
        "ok early emit",
        "ok chat",
        "ok fetch",
        "ok question",
    ];
    run_node_script(&js, "page-client.mjs", urls(&nodes), &steps).await?;
    Ok(())
}

/// The demo pages in headless Chromium (Debian's `chromium`, driven by npm's
/// `puppeteer-core`), against three node processes: typed on one node's chat page, a message
/// appears on another's; the live members line and the topology page show every node.
/// `MESH_SCREENSHOT=path.png` saves the topology page (the README's picture).
async fn demo_pages_work_in_a_browser(kind: TransportKind) -> anyhow::Result<()> {
    let js = js_dir("puppeteer-core")?;
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    anyhow::ensure!(
        std::path::Path::new(&chromium).exists(),
        "needs Chromium at {chromium} (Debian package `chromium`): .ci/run installs it"
    );
    let (_certs, nodes) = node_processes(kind, "browser", 3, &[]).await?;
    let mut args = urls(&nodes[..2]);
    if let Ok(path) = std::env::var("MESH_SCREENSHOT")
        && kind == TransportKind::Quic
    {
        args.push(path);
    }
    let steps = [
        "ok pages connected",
        "ok chat across nodes",
        "ok members line",
        "ok topology",
    ];
    run_node_script(&js, "browser.mjs", args, &steps).await?;
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
