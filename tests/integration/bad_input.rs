//! Malformed input from an authenticated peer: refused with a clear reason, the peer cut off,
//! the node keeps serving its clients and its mesh.

use socketioxide_mesh::TransportKind;

use crate::{common::*, raw::*, security::*};

/// A small frame limit, so an oversize frame is cheap to send over either transport.
const MAX_FRAME: usize = 64 * 1024;

async fn cluster(kind: TransportKind) -> anyhow::Result<Cluster> {
    Cluster::start_with(kind, 2, |cfg| cfg.with_max_frame_size(MAX_FRAME)).await
}

/// The node still does its job: a client on it gets a broadcast from the other node, and a
/// well-formed command from a fresh raw peer is applied.
async fn still_serving(c: &Cluster) -> anyhow::Result<()> {
    let mut client = c.nodes[0].client(&["/"]).await?;
    c.nodes[1].io.emit("from-peer", &()).await.sio()?;
    client.event("/", "from-peer").await?;
    let peer = c.raw_peer("fresh")?;
    let conn = peer.join(c.seed(), "test-cluster").await?;
    conn.uni(&[commands_header()?, broadcast_all("from-raw")?])
        .await?;
    client.event("/", "from-raw").await?;
    Ok(())
}

/// Join as a raw peer, misbehave, and return how the node closed the connection.
async fn misbehave<F, Fut>(kind: TransportKind, act: F) -> anyhow::Result<(u64, String)>
where
    F: FnOnce(RawConn) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<RawConn>>,
{
    let c = cluster(kind).await?;
    let peer = c.raw_peer("raw")?;
    let conn = peer.join(c.seed(), "test-cluster").await?;
    let errors_before = c.nodes[0].mesh.stats().protocol_errors;
    let conn = act(conn).await?;
    let (code, reason) = conn.closed().await;
    assert_eq!(
        c.nodes[0].mesh.stats().protocol_errors,
        errors_before + 1,
        "{reason}"
    );
    still_serving(&c).await?;
    Ok((code, reason))
}

fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

async fn random_bytes_on_a_stream_cut_the_peer_off(kind: TransportKind) -> anyhow::Result<()> {
    // A well-formed header, then a frame of noise where a command should be.
    let (code, reason) = misbehave(kind, async |conn| {
        conn.uni(&[commands_header()?, noise(300, 42)]).await?;
        Ok(conn)
    })
    .await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    assert!(reason.contains("malformed"), "{reason}");
    Ok(())
}

async fn garbage_header_cuts_the_peer_off(kind: TransportKind) -> anyhow::Result<()> {
    let (code, reason) = misbehave(kind, async |conn| {
        conn.uni(&[noise(64, 7)]).await?;
        Ok(conn)
    })
    .await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    Ok(())
}

async fn truncated_frame_cuts_the_peer_off(kind: TransportKind) -> anyhow::Result<()> {
    let (code, reason) = misbehave(kind, async |conn| {
        conn.abuse(&commands_header()?, Abuse::Truncated).await?;
        Ok(conn)
    })
    .await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    let expected = match kind {
        TransportKind::Quic => "inside a frame",
        _ => "mux message of 3 bytes",
    };
    assert!(reason.contains(expected), "{reason}");
    Ok(())
}

async fn oversize_frame_cuts_the_peer_off(kind: TransportKind) -> anyhow::Result<()> {
    let (code, reason) = misbehave(kind, async |conn| {
        conn.abuse(&commands_header()?, Abuse::Oversize(MAX_FRAME + 1))
            .await?;
        Ok(conn)
    })
    .await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    assert!(reason.contains("exceeds the limit"), "{reason}");
    Ok(())
}

async fn garbage_query_cuts_the_peer_off(kind: TransportKind) -> anyhow::Result<()> {
    let (code, reason) = misbehave(kind, async |conn| {
        conn.bi_no_reply(&[rmp_serde::to_vec(&(0u64,))?, noise(200, 3)])
            .await?;
        Ok(conn)
    })
    .await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    Ok(())
}

async fn unknown_protocol_version_is_refused_with_a_reason(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = cluster(kind).await?;
    let peer = c.raw_peer("future")?;
    let hello = hello_payload(
        99,
        &Hello {
            cluster_id: "test-cluster".into(),
            node_id: socketioxide_core::Uid::new(),
            advertise_addr: peer.addr,
            transport: kind.as_str().into(),
        },
    );
    let (conn, reply) = peer.handshake(c.seed(), &hello).await?;
    match reply {
        HelloReply::Refused(r) => assert!(r.contains("unsupported protocol version 99"), "{r}"),
        HelloReply::Welcome(_) => panic!("version 99 welcomed"),
    }
    assert_eq!(conn.closed().await.0, CLOSE_REFUSED);

    // Not even our protocol: an HTTP request where the hello should be.
    let (conn, reply) = peer
        .handshake(c.seed(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    match reply {
        HelloReply::Refused(r) => assert!(r.contains("not a socketioxide-mesh node"), "{r}"),
        HelloReply::Welcome(_) => panic!("garbage welcomed"),
    }
    assert_eq!(conn.closed().await.0, CLOSE_REFUSED);
    still_serving(&c).await
}

both_transports!(
    random_bytes_on_a_stream_cut_the_peer_off,
    garbage_header_cuts_the_peer_off,
    truncated_frame_cuts_the_peer_off,
    oversize_frame_cuts_the_peer_off,
    garbage_query_cuts_the_peer_off,
    unknown_protocol_version_is_refused_with_a_reason
);
