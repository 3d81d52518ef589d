//! A `quic` node and a `ws` node cannot form one cluster: they do not even reach each other
//! (UDP vs TCP), and a peer announcing the other transport is refused at the handshake.

use socketioxide_mesh::TransportKind;

use crate::{common::*, raw::*};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_node_cannot_join_a_quic_cluster() -> anyhow::Result<()> {
    let c = Cluster::start(TransportKind::Quic, 2).await?;
    let ws = start_node(
        c.outsider(c.ca.node_tls("ws")?)
            .with_transport(TransportKind::Ws),
    )
    .await?;
    // Let it try a few times (seed rounds and backoff): every attempt fails.
    tokio::time::timeout(WAIT, async {
        while ws.mesh.stats().dials_failed < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await?;
    assert!(ws.mesh.members().is_empty());
    for node in &c.nodes {
        assert_eq!(node.mesh.members().len(), 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_announcing_another_transport_is_refused() -> anyhow::Result<()> {
    let c = Cluster::start(TransportKind::Ws, 2).await?;
    let peer = c.raw_peer("quic-peer")?;
    let hello = hello_payload(
        VERSION,
        &Hello {
            cluster_id: "test-cluster".into(),
            node_id: socketioxide_core::Uid::new(),
            advertise_addr: peer.addr,
            transport: "quic".into(),
        },
    );
    let (conn, reply) = peer.handshake(c.seed(), &hello).await?;
    match reply {
        HelloReply::Refused(r) => {
            assert!(r.contains("peer uses transport quic, this node ws"), "{r}")
        }
        HelloReply::Welcome(_) => panic!("a quic peer was welcomed by a ws node"),
    }
    assert_eq!(conn.closed().await.0, CLOSE_REFUSED);
    Ok(())
}
