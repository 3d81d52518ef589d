//! Only nodes with a certificate from the cluster CA *and* the right cluster id become members;
//! anything else cannot deliver a single frame or gossip message.

use serde_json::json;
use socketioxide_mesh::{DevCa, TransportKind};

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
    node_from_another_ca_never_joins,
    node_without_certificate_is_refused,
    node_of_another_cluster_is_refused_with_a_reason,
    nothing_is_read_before_a_welcome,
    rotated_certificates_are_picked_up_without_restart
);
