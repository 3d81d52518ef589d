//! Malformed input from an authenticated peer: refused with a clear reason, the peer cut off,
//! the node keeps serving its clients and its mesh.

use crate::{common::*, raw::*, security::*};

/// The node still does its job: a client on it gets a broadcast from the other node, and a
/// well-formed command from a fresh raw peer is applied.
async fn still_serving(c: &Cluster, creds: &socketioxide_mesh::NodeCert) -> anyhow::Result<()> {
    let mut client = c.nodes[0].client(&["/"]).await?;
    c.nodes[1].io.emit("from-peer", &()).await.sio()?;
    client.event("/", "from-peer").await?;
    // A well-behaved raw peer is served after the misbehaving one was cut off.
    let peer = RawPeer::new(c.ca.cert_pem(), Some((&creds.cert_pem, &creds.key_pem)))?;
    let conn = peer.join(c.seed(), "test-cluster").await?;
    let mut uni = conn.open_uni().await?;
    uni.write_all(&frame(&rmp_serde::to_vec(&commands_header())?))
        .await?;
    uni.write_all(&frame(&broadcast_all("from-raw")?)).await?;
    uni.finish()?;
    client.event("/", "from-raw").await?;
    Ok(())
}

async fn misbehave(bytes_on_stream: &[u8], bidi: bool) -> anyhow::Result<(u64, String)> {
    let c = Cluster::start(2).await?;
    let creds = c.ca.issue("raw")?;
    let peer = RawPeer::new(c.ca.cert_pem(), Some((&creds.cert_pem, &creds.key_pem)))?;
    let conn = peer.join(c.seed(), "test-cluster").await?;
    let errors_before = c.nodes[0].mesh.stats().protocol_errors;
    if bidi {
        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(bytes_on_stream).await?;
        send.finish()?;
        let (code, reason) = close_of(&conn).await;
        assert_eq!(c.nodes[0].mesh.stats().protocol_errors, errors_before + 1);
        still_serving(&c, &creds).await?;
        return Ok((code, reason));
    }
    let mut uni = conn.open_uni().await?;
    uni.write_all(bytes_on_stream).await?;
    uni.finish()?;
    let (code, reason) = close_of(&conn).await;
    assert_eq!(c.nodes[0].mesh.stats().protocol_errors, errors_before + 1);
    still_serving(&c, &creds).await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_a_stream_cut_the_peer_off() -> anyhow::Result<()> {
    // A well-framed header, then a frame of noise where a command should be.
    let mut bytes = frame(&rmp_serde::to_vec(&commands_header())?);
    bytes.extend(frame(&noise(300, 42)));
    let (code, reason) = misbehave(&bytes, false).await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    assert!(reason.contains("malformed"), "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_header_cuts_the_peer_off() -> anyhow::Result<()> {
    let (code, reason) = misbehave(&frame(&noise(64, 7)), false).await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frame_cuts_the_peer_off() -> anyhow::Result<()> {
    let mut bytes = frame(&rmp_serde::to_vec(&commands_header())?);
    bytes.extend_from_slice(&100u32.to_be_bytes());
    bytes.extend_from_slice(&[0x92; 10]); // 10 of the 100 announced bytes, then the end
    let (code, reason) = misbehave(&bytes, false).await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    assert!(reason.contains("inside a frame"), "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_cuts_the_peer_off() -> anyhow::Result<()> {
    let mut bytes = frame(&rmp_serde::to_vec(&commands_header())?);
    // Announce one byte more than the default 16 MiB limit: refused before reading it.
    bytes.extend_from_slice(&(16 * 1024 * 1024 + 1u32).to_be_bytes());
    bytes.extend_from_slice(&[0; 1024]);
    let (code, reason) = misbehave(&bytes, false).await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    assert!(reason.contains("exceeds the limit"), "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_query_cuts_the_peer_off() -> anyhow::Result<()> {
    let mut bytes = frame(&rmp_serde::to_vec(&(0u64,))?);
    bytes.extend(frame(&noise(200, 3)));
    let (code, reason) = misbehave(&bytes, true).await?;
    assert_eq!(code, CLOSE_PROTOCOL, "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_version_is_refused_with_a_reason() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let creds = c.ca.issue("future")?;
    let peer = RawPeer::new(c.ca.cert_pem(), Some((&creds.cert_pem, &creds.key_pem)))?;
    let hello = hello_frame(
        99,
        &Hello {
            cluster_id: "test-cluster".into(),
            node_id: socketioxide_core::Uid::new(),
            advertise_addr: peer.addr,
            transport: "quic".into(),
        },
    );
    let (conn, reply) = peer.handshake(c.seed(), &hello).await?;
    match reply {
        HelloReply::Refused(r) => assert!(r.contains("unsupported protocol version 99"), "{r}"),
        HelloReply::Welcome(_) => panic!("version 99 welcomed"),
    }
    assert_eq!(close_of(&conn).await.0, 2);

    // Not even our protocol: an HTTP request where the hello should be.
    let (conn, reply) = peer
        .handshake(c.seed(), &frame(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        .await?;
    match reply {
        HelloReply::Refused(r) => assert!(r.contains("not a socketioxide-mesh node"), "{r}"),
        HelloReply::Welcome(_) => panic!("garbage welcomed"),
    }
    assert_eq!(close_of(&conn).await.0, 2);
    still_serving(&c, &creds).await
}
