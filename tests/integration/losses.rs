//! Every message the mesh cannot deliver is counted with its cause. Here: a socket whose
//! socketioxide buffer (default 128 packets) is full when a burst of peers' broadcasts is
//! applied: nothing was counted before.

use std::time::Duration;

use socketioxide_mesh::{DevCa, Mesh, TransportKind};

use crate::common::*;

async fn a_full_socket_buffer_is_counted_exactly(kind: TransportKind) -> anyhow::Result<()> {
    const BURST: u64 = 2000;
    logs();
    let ca = DevCa::generate("losses CA")?;
    let a = start_node(config(kind, &ca, "a", &[])).await?;
    // Node b keeps socketioxide's default buffer.
    let b = serve_with_buffer(
        Mesh::start(config(kind, &ca, "b", &[a.mesh.advertise_addr()])).await?,
        128,
    )
    .await?;
    converge(&[&a, &b]).await?;
    let mut client = b.client(&["/"]).await?;
    // A burst from node a: node b applies it as fast as it arrives (no round trip paces it
    // the way a broker's does).
    for i in 0..BURST {
        a.io.emit("burst", &i).await.sio()?;
    }
    // Every broadcast is either received or counted as dropped: read until they add up.
    let mut received = 0u64;
    let deadline = tokio::time::Instant::now() + WAIT;
    let dropped = loop {
        let dropped = b.mesh.stats().socket_buffer_drops;
        if received + dropped == BURST {
            break dropped;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "received {received} + counted {dropped} != {BURST}"
        );
        if let Ok(p) =
            tokio::time::timeout(Duration::from_millis(200), client.event("/", "burst")).await
        {
            p?;
            received += 1;
        }
    };
    assert!(
        dropped > 0,
        "a burst of {BURST} never filled a 128-packet buffer: nothing to count"
    );
    Ok(())
}

both_transports!(a_full_socket_buffer_is_counted_exactly);
