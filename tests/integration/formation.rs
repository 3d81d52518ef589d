//! Nodes started together form a cluster at once, even when a seed starts listening a moment
//! after the node that dials it.

use std::time::{Duration, Instant};

use socketioxide_mesh::{DevCa, TransportKind};

use crate::common::*;

/// A free port on 127.0.0.1 for `kind` (UDP for QUIC, TCP for WebSocket), released at once.
fn free_addr(kind: TransportKind) -> anyhow::Result<std::net::SocketAddr> {
    Ok(match kind {
        TransportKind::Quic => std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?,
        TransportKind::Ws => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?,
    })
}

/// Node A starts first and dials B's address, where nothing listens yet; B starts 300 ms
/// later without seeds. With the production seed interval (5 s), A must not wait for its next
/// seed round: on `ws` the refused TCP connection used to cost exactly that.
async fn a_seed_that_starts_late_is_joined_without_waiting_for_the_next_seed_round(
    kind: TransportKind,
) -> anyhow::Result<()> {
    logs();
    let ca = DevCa::generate("formation CA")?;
    let b_addr = free_addr(kind)?;
    let seed_round = Duration::from_secs(5);
    let a = start_node(config(kind, &ca, "a", &[b_addr]).with_seed_interval(seed_round)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let b = start_node(
        config(kind, &ca, "b", &[])
            .with_listen_addr(b_addr)
            .with_seed_interval(seed_round),
    )
    .await?;
    converge(&[&a, &b]).await?;
    let took = started.elapsed();
    assert!(
        took < seed_round / 2,
        "formed in {took:?}: it waited for a seed round ({seed_round:?})"
    );
    Ok(())
}

/// `ready()` is false until the node has joined and connected to every member; a node whose
/// seeds cannot be reached is alone, and ready.
async fn ready_once_joined_and_connected_to_every_member(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let joiner = start_node(config(kind, &c.ca, "joiner", &[c.seed()])).await?;
    assert!(
        !joiner.mesh.ready(),
        "ready before the first seed was even dialed"
    );
    let mut ready = joiner.mesh.watch_ready();
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r)).await??;
    let all = [&c.nodes[0], &c.nodes[1], &joiner];
    converge(&all).await?;
    assert!(joiner.mesh.ready());
    // Ready means its clients' messages reach every node.
    let mut far = c.nodes[1].client(&["/"]).await?;
    joiner.io.emit("hello", &()).await.sio()?;
    far.event("/", "hello").await?;

    // Alone: the only seed is a closed port.
    let alone = start_node(config(kind, &c.ca, "alone", &[free_addr(kind)?])).await?;
    let mut ready = alone.mesh.watch_ready();
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r)).await??;
    assert!(alone.mesh.members().is_empty());
    Ok(())
}

/// Listening on every interface without an advertised address (outside Kubernetes, no
/// `POD_IP`): the node advertises the address of its outward interface, and peers reach it.
async fn a_node_listening_everywhere_advertises_a_dialable_address(
    kind: TransportKind,
) -> anyhow::Result<()> {
    logs();
    let ca = DevCa::generate("everywhere CA")?;
    let everywhere =
        start_node(config(kind, &ca, "everywhere", &[]).with_listen_addr("0.0.0.0:0".parse()?))
            .await?;
    let adv = everywhere.mesh.advertise_addr();
    assert!(!adv.ip().is_unspecified() && adv.port() != 0, "{adv}");
    let peer = start_node(config(kind, &ca, "peer", &[adv])).await?;
    converge(&[&everywhere, &peer]).await
}

both_transports!(
    a_seed_that_starts_late_is_joined_without_waiting_for_the_next_seed_round,
    ready_once_joined_and_connected_to_every_member,
    a_node_listening_everywhere_advertises_a_dialable_address
);
