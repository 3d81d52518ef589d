//! Only nodes with a certificate from the cluster CA *and* the right cluster id become members;
//! anything else cannot deliver a single frame or gossip message.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde_json::json;
use socketioxide_mesh::{DevCa, TlsConfig, TransportKind, tls::CertSpec};

use crate::{common::*, raw::*};

/// Wait (polling a counter, as there is no event for it) until `node` has refused at least
/// `n` incoming connections.
pub async fn refused_at_least(node: &Node, n: u64) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, async {
        while node.mesh.stats().handshakes_refused < n {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("only {} refusals", node.mesh.stats().handshakes_refused))
}

/// The cluster is intact: unchanged membership, a client still gets what its cluster sends,
/// and nothing from the intruder.
async fn cluster_intact(c: &Cluster, intruder: Option<&Node>) -> anyhow::Result<()> {
    for node in &c.nodes {
        assert_eq!(
            node.mesh.members().len(),
            c.nodes.len() - 1,
            "membership changed"
        );
    }
    let mut client = c.nodes[0].client(&["/"]).await?;
    if let Some(intruder) = intruder {
        assert!(
            intruder.mesh.members().is_empty(),
            "the intruder sees members"
        );
        intruder.io.emit("evil", &()).await.sio()?;
    }
    c.nodes[1].io.emit("marker", &()).await.sio()?;
    let first = client.next_event("/").await?;
    assert_eq!(first.event(), Some("marker"));
    Ok(())
}

async fn node_from_another_ca_never_joins(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let rogue_ca = DevCa::generate("rogue CA")?;
    // Trusts the cluster CA (it has read ca.pem), but its own certificate comes from another CA.
    let node = rogue_ca.issue("rogue")?;
    let tls = socketioxide_mesh::TlsConfig::from_pem(
        [c.ca.cert_pem(), rogue_ca.cert_pem()].concat().as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    )?;
    let before = c.nodes[0].mesh.stats().handshakes_refused;
    let rogue = start_node(c.outsider(tls)).await?;
    // It tries again and again (seeds, backoff): let it.
    refused_at_least(&c.nodes[0], before + 3).await?;
    cluster_intact(&c, Some(&rogue)).await
}

async fn node_without_certificate_is_refused(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let before = c.nodes[0].mesh.stats().handshakes_refused;
    let peer = RawPeer::new(kind, c.ca.cert_pem(), None)?;
    let res = peer
        .handshake(c.seed(), &peer.good_hello("test-cluster"))
        .await;
    assert!(res.is_err(), "a peer without a certificate got a reply");
    refused_at_least(&c.nodes[0], before + 1).await?;
    cluster_intact(&c, None).await
}

async fn node_of_another_cluster_is_refused_with_a_reason(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    // A raw peer with a valid certificate but another cluster id: refused, with the reason.
    let peer = c.raw_peer("stranger")?;
    let (conn, reply) = peer
        .handshake(c.seed(), &peer.good_hello("other-cluster"))
        .await?;
    match reply {
        HelloReply::Refused(reason) => assert!(reason.contains("other-cluster"), "{reason}"),
        HelloReply::Welcome(_) => panic!("a node of another cluster was welcomed"),
    }
    assert_eq!(conn.closed().await.0, CLOSE_REFUSED);

    // A real node of another cluster (same CA) seeded to us: never a member.
    let before = c.nodes[0].mesh.stats().handshakes_refused;
    let other = start_node(
        c.outsider(c.ca.node_tls("other")?)
            .with_cluster_id("other-cluster"),
    )
    .await?;
    refused_at_least(&c.nodes[0], before + 2).await?;
    cluster_intact(&c, Some(&other)).await
}

async fn nothing_is_read_before_a_welcome(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let peer = c.raw_peer("stranger")?;
    let conn = peer.connect(c.seed()).await?;
    // A command stream carrying a broadcast to every socket of "/", sent before any hello...
    conn.uni(&[commands_header()?, broadcast_all("evil")?])
        .await?;
    // ...then a hello for another cluster: refused.
    let reply = conn.bi(&[peer.good_hello("other-cluster")]).await?;
    assert!(reply.len() > 6);
    assert_eq!(conn.closed().await.0, CLOSE_REFUSED);
    assert_eq!(c.nodes[0].mesh.stats().commands_received, 0);
    cluster_intact(&c, None).await
}

async fn rotated_certificates_are_picked_up_without_restart(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let dir = crate::process::TempDir::new("rotate");
    // The node starts with a certificate from a CA the cluster does not trust: refused.
    let old_ca = DevCa::generate("retired CA")?;
    let old = old_ca.issue("rotating")?;
    std::fs::write(dir.0.join("ca.pem"), c.ca.cert_pem())?;
    std::fs::write(dir.0.join("node.pem"), &old.cert_pem)?;
    std::fs::write(dir.0.join("node.key"), &old.key_pem)?;
    let before = c.nodes[0].mesh.stats().handshakes_refused;
    let node = start_node(
        c.outsider(socketioxide_mesh::TlsConfig::from_dir(&dir.0)?)
            .with_tls_reload(Some(std::time::Duration::from_millis(100))),
    )
    .await?;
    refused_at_least(&c.nodes[0], before + 1).await?;
    assert!(node.mesh.members().is_empty());

    // The files are replaced (as cert-manager or a secret update would): it joins, same process.
    let new = c.ca.issue("rotating")?;
    std::fs::write(dir.0.join("node.key"), &new.key_pem)?;
    std::fs::write(dir.0.join("node.pem"), &new.cert_pem)?;
    let mut members = node.mesh.watch_members();
    tokio::time::timeout(WAIT, members.wait_for(|m| m.len() == 2)).await??;
    Ok(())
}

/// Certificates from the cluster CA that are not node certificates.
fn not_node_certificates(ca: &DevCa) -> Vec<(&'static str, CertSpec)> {
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let node = ca.node_spec("intruder");
    let with = |f: &dyn Fn(&mut CertSpec)| {
        let mut spec = node.clone();
        f(&mut spec);
        spec
    };
    vec![
        // The profile the README gives the discovery service, with both usages.
        (
            "another DNS name",
            with(&|s| s.names = vec!["mesh-discovery".into()]),
        ),
        ("serverAuth only", with(&|s| s.client_auth = false)),
        ("clientAuth only", with(&|s| s.server_auth = false)),
        (
            "another cluster's name",
            with(&|s| s.names = vec!["other-cluster.internal".into()]),
        ),
        (
            "expired",
            with(&|s| {
                s.not_before = now - 2 * day;
                s.not_after = now - day;
            }),
        ),
        (
            "not yet valid",
            with(&|s| {
                s.not_before = now + day;
                s.not_after = now + 2 * day;
            }),
        ),
    ]
}

/// A certificate from the right CA that is not a node certificate is refused by the node it
/// dials (inbound check) and by a node that dials it (outbound check): never a member on
/// either side, and the cluster answers `fetch_sockets` without waiting for it.
async fn certificates_that_are_not_node_certificates_are_refused_both_ways(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    // One client per node, both in room "probe".
    let mut clients = [
        c.nodes[0].client(&["/"]).await?,
        c.nodes[1].client(&["/"]).await?,
    ];
    for client in &mut clients {
        client
            .emit_with_ack("/", "join", vec![json!("probe")])
            .await?;
    }
    for (what, spec) in not_node_certificates(&c.ca) {
        let cert = c.ca.issue_spec(&spec)?;
        let tls = TlsConfig::from_pem(
            c.ca.cert_pem().as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        )?;
        // Inbound: it dials node 0.
        let before = c.nodes[0].mesh.stats().handshakes_refused;
        let intruder = start_node(c.outsider(tls)).await?;
        refused_at_least(&c.nodes[0], before + 1)
            .await
            .map_err(|e| e.context(what))?;

        // Outbound: a good node whose only seed is the intruder dials it and refuses it.
        let newcomer = start_node(config(
            kind,
            &c.ca,
            "newcomer",
            &[intruder.mesh.advertise_addr()],
        ))
        .await?;
        tokio::time::timeout(WAIT, async {
            while newcomer.mesh.stats().dials_failed == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("{what}: the newcomer never refused the intruder"))?;
        assert!(
            newcomer.mesh.members().is_empty(),
            "{what}: the newcomer took the intruder as a member"
        );
        cluster_intact(&c, Some(&intruder))
            .await
            .map_err(|e| e.context(what))?;

        // No member to wait for: fetch_sockets answers at once (the request timeout is 5 s).
        let started = Instant::now();
        let sockets = c.nodes[0].io.to("probe").fetch_sockets().await.sio()?;
        assert_eq!(sockets.len(), 2, "{what}: one local and one remote socket");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: fetch_sockets took {:?}",
            started.elapsed()
        );
        newcomer.shutdown().await;
        intruder.shutdown().await;
    }
    Ok(())
}

/// The WARN lines the mesh logs on this thread. The flood tests run on a current-thread
/// runtime, so every task of the node under test logs here, and nothing of other tests does.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Text<'a>(&'a mut String);
        impl tracing::field::Visit for Text<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                let _ = write!(self.0, "{}={value:?} ", field.name());
            }
        }
        let meta = event.metadata();
        if *meta.level() == tracing::Level::WARN && meta.target().starts_with("socketioxide_mesh") {
            let mut line = String::new();
            event.record(&mut Text(&mut line));
            self.0.lock().unwrap().push(line);
        }
    }
}

/// Hundreds of bad connections from one address: every one counted by cause, a few log lines.
async fn a_flood_of_bad_connections_makes_a_few_log_lines(
    kind: TransportKind,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tracing_subscriber::layer::SubscriberExt;
    const N: u64 = 200;
    let warnings = Warnings::default();
    let _logs =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let ca = DevCa::generate("test CA")?;
    let node = start_node(config(kind, &ca, "target", &[])).await?;
    let addr = node.mesh.advertise_addr();
    let first_reason = match kind {
        // Not TLS at all.
        TransportKind::Ws => {
            for _ in 0..N {
                let mut tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
                let mut rest = Vec::new();
                let _ = tcp.read_to_end(&mut rest).await;
            }
            "not a mesh peer"
        }
        // TLS without a client certificate.
        TransportKind::Quic => {
            let peer = RawPeer::new(kind, ca.cert_pem(), None)?;
            for _ in 0..N {
                let res = peer.handshake(addr, &peer.good_hello("test-cluster")).await;
                assert!(res.is_err(), "a peer without a certificate got a reply");
            }
            "certificate is not accepted"
        }
    };
    refused_at_least(&node, N).await?;
    let counts = node.mesh.stats().incidents;
    assert_eq!(
        counts.not_a_peer + counts.refused_certificate,
        N,
        "{counts:?}"
    );
    let lines = warnings.lines();
    // One line with the reason; a summary if the 10 s tick passed meanwhile.
    assert!(
        !lines.is_empty() && lines.len() <= 2,
        "{} lines: {lines:#?}",
        lines.len()
    );
    assert!(lines[0].contains(first_reason), "{lines:#?}");
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn quic_a_flood_of_bad_connections_makes_a_few_log_lines() -> anyhow::Result<()> {
    a_flood_of_bad_connections_makes_a_few_log_lines(TransportKind::Quic).await
}

#[tokio::test(flavor = "current_thread")]
async fn ws_a_flood_of_bad_connections_makes_a_few_log_lines() -> anyhow::Result<()> {
    a_flood_of_bad_connections_makes_a_few_log_lines(TransportKind::Ws).await
}

/// The header frame of a command stream starting at sequence 0.
pub fn commands_header() -> anyhow::Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    enum UniHeader {
        #[serde(rename = "0")]
        Commands { start_seq: u64 },
    }
    Ok(rmp_serde::to_vec(&UniHeader::Commands { start_seq: 0 })?)
}

/// A `Broadcast` command to every socket of "/", encoded by hand from the documented format.
pub fn broadcast_all(event: &str) -> anyhow::Result<Vec<u8>> {
    use socketioxide_core::adapter::{BroadcastFlags, BroadcastOptions};
    let mut opts = BroadcastOptions::default();
    opts.add_flag(BroadcastFlags::Broadcast);
    let text = json!([event]).to_string();
    // packet = (ns, type 2 = event, value = (0 = text, utf-8 bytes, no binaries), ack, error)
    let packet = (
        "/",
        2u8,
        Some((0u8, serde_bytes::Bytes::new(text.as_bytes()), None::<()>)),
        None::<i64>,
        None::<String>,
    );
    #[derive(serde::Serialize)]
    enum Command<P> {
        #[serde(rename = "0")]
        Broadcast {
            ns: &'static str,
            opts: BroadcastOptions,
            packet: P,
        },
    }
    Ok(rmp_serde::to_vec(&Command::Broadcast {
        ns: "/",
        opts,
        packet,
    })?)
}

both_transports!(
    certificates_that_are_not_node_certificates_are_refused_both_ways,
    node_from_another_ca_never_joins,
    node_without_certificate_is_refused,
    node_of_another_cluster_is_refused_with_a_reason,
    nothing_is_read_before_a_welcome,
    rotated_certificates_are_picked_up_without_restart
);
