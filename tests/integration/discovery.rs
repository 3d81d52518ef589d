//! The seed discovery service, as processes: the discovery binary and node processes (the
//! `node` example) that find each other through it, and keep working without it.

use std::{net::SocketAddr, path::Path, process::Stdio, sync::Arc, time::Duration};

use anyhow::{Context, anyhow};
use serde_json::Value;
use socketioxide_mesh::{DevCa, TransportKind};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

use crate::{common::*, js::http_get, process::*};

const CLUSTER: &str = "disco";

struct Discovery {
    child: Child,
    addr: SocketAddr,
}

impl Discovery {
    async fn spawn(listen: &str, extra: &[&str]) -> anyhow::Result<Discovery> {
        let exe = std::env::current_exe()?;
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("socketioxide-mesh-discovery"))
            .ok_or_else(|| anyhow!("no target dir"))?;
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: run `cargo test` at the workspace root",
            bin.display()
        );
        let mut child = Command::new(bin)
            .arg("--listen")
            .arg(listen)
            .args(extra)
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .context("discovery did not start")??
            .ok_or_else(|| anyhow!("discovery exited"))?;
        let ready: Value = serde_json::from_str(&line)?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Discovery {
            addr: ready["addr"]
                .as_str()
                .ok_or_else(|| anyhow!("no addr"))?
                .parse()?,
            child,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The node ids registered in the test cluster.
    async fn registered(&self) -> anyhow::Result<Vec<String>> {
        let body = http_get(self.addr, &format!("/v1/clusters/{CLUSTER}/nodes")).await?;
        let v: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        Ok(v["nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n["node_id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }
}

async fn node(
    ca: &DevCa,
    certs: &TempDir,
    name: &str,
    discovery: &str,
    seeds: &[SocketAddr],
) -> anyhow::Result<ProcNode> {
    let dir = certs.0.join(name);
    ca.write_dir(&dir, name)?;
    ProcNode::spawn(
        TransportKind::Quic,
        &dir,
        seeds,
        &[
            ("MESH_CLUSTER_ID", CLUSTER),
            ("MESH_DISCOVERY_URL", discovery),
            ("MESH_SEED_INTERVAL_MS", "200"),
            ("MESH_GOSSIP_INTERVAL_MS", "50"),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_through_discovery() -> anyhow::Result<()> {
    logs();
    let disco = Discovery::spawn("127.0.0.1:0", &[]).await?;
    let ca = DevCa::generate("disco CA")?;
    let certs = TempDir::new("disco");
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(node(&ca, &certs, &format!("n{i}"), &disco.url(), &[]).await?);
    }
    for n in &nodes {
        members(n, 2).await?;
    }
    let mut ids = disco.registered().await?;
    ids.sort();
    let mut expected: Vec<String> = nodes.iter().map(|n| n.node_id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    chat_reaches_everyone(&nodes.iter().collect::<Vec<_>>(), "hello").await?;

    // A node leaving gracefully deregisters.
    let mut leaving = nodes.pop().expect("3 nodes");
    leaving.signal("TERM").await?;
    leaving.child.wait().await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while disco.registered().await?.contains(&leaving.node_id) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "still registered after leaving"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_outlives_the_discovery_service() -> anyhow::Result<()> {
    logs();
    const TTL_MS: u64 = 3000;
    let ttl = TTL_MS.to_string();
    let mut disco = Discovery::spawn("127.0.0.1:0", &["--ttl-ms", &ttl]).await?;
    let listen = disco.addr.to_string();
    let url = disco.url();
    let ca = DevCa::generate("disco CA")?;
    let certs = TempDir::new("outage");
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(node(&ca, &certs, &format!("n{i}"), &url, &[]).await?);
    }
    for n in &nodes {
        members(n, 2).await?;
    }

    // The service dies: broadcasts and requests go on.
    disco.child.kill().await?;
    chat_reaches_everyone(&nodes.iter().collect::<Vec<_>>(), "still here").await?;

    // A 4th node with a static seed (and the dead service) joins by gossip.
    let late = node(&ca, &certs, "late", &url, &[nodes[0].mesh]).await?;
    nodes.push(late);
    for n in &nodes {
        members(n, 3).await?;
    }
    chat_reaches_everyone(&nodes.iter().collect::<Vec<_>>(), "four").await?;

    // The service comes back at the same address: every node registers again within a TTL.
    let disco = Discovery::spawn(&listen, &["--ttl-ms", &ttl]).await?;
    let back = tokio::time::Instant::now();
    let mut expected: Vec<String> = nodes.iter().map(|n| n.node_id.clone()).collect();
    expected.sort();
    loop {
        let mut ids = disco.registered().await?;
        ids.sort();
        if ids == expected {
            break;
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_millis(TTL_MS),
            "after one TTL only {ids:?} of {expected:?} registered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_still_make_one_mesh() -> anyhow::Result<()> {
    logs();
    let r1 = Discovery::spawn("127.0.0.1:0", &[]).await?;
    let r2 = Discovery::spawn("127.0.0.1:0", &[]).await?;
    let ca = DevCa::generate("disco CA")?;
    let certs = TempDir::new("replicas");
    // a knows only replica 1, b only replica 2; c is configured with both, like every node of
    // a real deployment would be. The replicas share nothing: gossip joins the two sides.
    let a = node(&ca, &certs, "a", &r1.url(), &[]).await?;
    let b = node(&ca, &certs, "b", &r2.url(), &[]).await?;
    let c = node(&ca, &certs, "c", &format!("{},{}", r1.url(), r2.url()), &[]).await?;
    for n in [&a, &b, &c] {
        members(n, 2).await?;
    }
    assert!(
        !r1.registered().await?.contains(&b.node_id),
        "b never talked to replica 1"
    );
    assert!(
        !r2.registered().await?.contains(&a.node_id),
        "a never talked to replica 2"
    );
    chat_reaches_everyone(&[&a, &b, &c], "one mesh").await
}

/// An HTTPS GET with an optional client certificate; returns the body.
async fn https_get(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<(&str, &str)>,
    path: &str,
) -> anyhow::Result<String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(key.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(addr.ip().to_string())?, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_discovery_refuses_nodes_without_a_valid_certificate() -> anyhow::Result<()> {
    logs();
    let ca = DevCa::generate("disco CA")?;
    let certs = TempDir::new("disco-tls");
    let server = ca.issue_server(&["127.0.0.1"])?;
    let (cert_path, key_path, ca_path) = (
        certs.0.join("d.pem"),
        certs.0.join("d.key"),
        certs.0.join("ca.pem"),
    );
    std::fs::write(&cert_path, &server.cert_pem)?;
    std::fs::write(&key_path, &server.key_pem)?;
    std::fs::write(&ca_path, ca.cert_pem())?;
    let p = |p: &std::path::PathBuf| p.display().to_string();
    let disco = Discovery::spawn(
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &p(&cert_path),
            "--tls-key",
            &p(&key_path),
            "--tls-client-ca",
            &p(&ca_path),
        ],
    )
    .await?;
    let url = format!("https://{}", disco.addr);

    // Nodes with certificates from the cluster CA register over HTTPS and find each other.
    let a = node(&ca, &certs, "a", &url, &[]).await?;
    let b = node(&ca, &certs, "b", &url, &[]).await?;
    members(&a, 1).await?;
    members(&b, 1).await?;

    let member = ca.issue("member")?;
    let listed = https_get(
        disco.addr,
        ca.cert_pem(),
        Some((&member.cert_pem, &member.key_pem)),
        &format!("/v1/clusters/{CLUSTER}/nodes"),
    )
    .await?;
    assert!(
        listed.contains(&a.node_id) && listed.contains(&b.node_id),
        "{listed}"
    );

    // No client certificate: refused.
    let res = https_get(disco.addr, ca.cert_pem(), None, "/v1/clusters").await;
    assert!(
        res.is_err(),
        "served a client without a certificate: {res:?}"
    );
    // A certificate from another CA: refused.
    let rogue_ca = DevCa::generate("rogue")?;
    let rogue = rogue_ca.issue("rogue")?;
    let res = https_get(
        disco.addr,
        ca.cert_pem(),
        Some((&rogue.cert_pem, &rogue.key_pem)),
        "/v1/clusters",
    )
    .await;
    assert!(
        res.is_err(),
        "served a client with a foreign certificate: {res:?}"
    );
    // Plain HTTP on the HTTPS port: no answer either.
    let plain = http_get(disco.addr, "/v1/clusters")
        .await
        .unwrap_or_default();
    assert!(!plain.contains("clusters"), "{plain}");
    Ok(())
}
