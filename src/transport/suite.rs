//! One test suite, run over every transport: frames, streams, limits, closing, authentication.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;

use super::{
    CloseCode, Conn, Endpoint, TransportError, TransportSettings,
    mem::{MemIdentity, MemNetwork},
    quic::QuicTransport,
    ws::WsTransport,
};
use crate::tls::DevCa;

/// Two trusted endpoints (the second with a small frame limit) and a rogue one.
struct Trio {
    a: Arc<Endpoint>,
    b_small: Arc<Endpoint>,
    rogue: Arc<Endpoint>,
}

const SMALL: usize = 64 * 1024;
const BIG: usize = 4 * 1024 * 1024;

fn settings(max_frame: usize) -> TransportSettings {
    TransportSettings {
        incidents: Default::default(),
        max_frame_size: max_frame,
        max_concurrent_streams: 1024,
        keep_alive_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
    }
}

async fn mem() -> Trio {
    let net = MemNetwork::new();
    let trusted = || MemIdentity {
        issued_by: "cluster".into(),
        trusts: "cluster".into(),
    };
    Trio {
        a: Arc::new(Endpoint::Mem(net.bind(trusted(), BIG))),
        b_small: Arc::new(Endpoint::Mem(net.bind(trusted(), SMALL))),
        rogue: Arc::new(Endpoint::Mem(net.bind(
            MemIdentity {
                issued_by: "rogue".into(),
                trusts: "cluster".into(),
            },
            BIG,
        ))),
    }
}

/// TLS material: two nodes of the cluster CA, and a rogue that trusts the cluster CA but
/// whose own certificate comes from another CA.
fn identities() -> [crate::TlsConfig; 3] {
    let ca = DevCa::generate("suite CA").unwrap();
    let rogue_ca = DevCa::generate("rogue CA").unwrap();
    let rogue_node = rogue_ca.issue("rogue").unwrap();
    let rogue = crate::TlsConfig::from_pem(
        ca.cert_pem().as_bytes(),
        rogue_node.cert_pem.as_bytes(),
        rogue_node.key_pem.as_bytes(),
    )
    .unwrap();
    [ca.node_tls("a").unwrap(), ca.node_tls("b").unwrap(), rogue]
}

async fn quic() -> Trio {
    let local = "127.0.0.1:0".parse().unwrap();
    let [a, b, rogue] = identities();
    Trio {
        a: Arc::new(Endpoint::Quic(
            QuicTransport::bind(local, &a, settings(BIG)).unwrap(),
        )),
        b_small: Arc::new(Endpoint::Quic(
            QuicTransport::bind(local, &b, settings(SMALL)).unwrap(),
        )),
        rogue: Arc::new(Endpoint::Quic(
            QuicTransport::bind(local, &rogue, settings(BIG)).unwrap(),
        )),
    }
}

async fn ws() -> Trio {
    let local = "127.0.0.1:0".parse().unwrap();
    let [a, b, rogue] = identities();
    Trio {
        a: Arc::new(Endpoint::Ws(
            WsTransport::bind(local, &a, settings(BIG)).await.unwrap(),
        )),
        b_small: Arc::new(Endpoint::Ws(
            WsTransport::bind(local, &b, settings(SMALL)).await.unwrap(),
        )),
        rogue: Arc::new(Endpoint::Ws(
            WsTransport::bind(local, &rogue, settings(BIG))
                .await
                .unwrap(),
        )),
    }
}

async fn connect(from: &Arc<Endpoint>, to: &Arc<Endpoint>) -> (Conn, Conn) {
    let (c, s) = tokio::join!(from.connect(to.local_addr()), async {
        tokio::time::timeout(Duration::from_secs(5), to.accept()).await
    });
    (c.unwrap(), s.unwrap().unwrap())
}

async fn frames_round_trip(t: Trio) {
    let (client, server) = connect(&t.a, &t.b_small).await;
    let echo = tokio::spawn(async move {
        let (mut send, mut recv) = server.accept_bi().await.unwrap();
        while let Some(frame) = recv.recv().await.unwrap() {
            send.send(frame).await.unwrap();
        }
        send.finish();
        server
    });
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    let frames = [
        Bytes::new(),
        Bytes::from_static(b"hello"),
        Bytes::from(vec![7u8; SMALL]), // exactly the limit
    ];
    for f in &frames {
        send.send(f.clone()).await.unwrap();
    }
    send.finish();
    for f in &frames {
        assert_eq!(recv.recv().await.unwrap().as_ref(), Some(f));
    }
    assert_eq!(
        recv.recv().await.unwrap(),
        None,
        "finish reads as end of stream"
    );
    let _server = echo.await.unwrap();
}

async fn many_streams_in_flight(t: Trio) {
    let (client, server) = connect(&t.a, &t.b_small).await;
    let server_task = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..1000 {
            let (mut send, mut recv) = server.accept_bi().await.unwrap();
            tasks.spawn(async move {
                let f = recv.recv().await.unwrap().unwrap();
                // Answer out of order: later streams must not wait for earlier ones.
                let n = u32::from_be_bytes(f[..4].try_into().unwrap());
                tokio::time::sleep(Duration::from_micros(u64::from(1000 - n))).await;
                send.send(f).await.unwrap();
                send.finish();
            });
        }
        while tasks.join_next().await.is_some() {}
        server
    });
    let mut asks = tokio::task::JoinSet::new();
    for n in 0u32..1000 {
        let client = client.clone();
        asks.spawn(async move {
            let (mut send, mut recv) = client.open_bi().await.unwrap();
            send.send(Bytes::copy_from_slice(&n.to_be_bytes()))
                .await
                .unwrap();
            send.finish();
            let back = recv.recv().await.unwrap().unwrap();
            assert_eq!(u32::from_be_bytes(back[..4].try_into().unwrap()), n);
        });
    }
    while let Some(res) = asks.join_next().await {
        res.unwrap();
    }
    let _server = server_task.await.unwrap();
}

async fn uni_stream_keeps_order(t: Trio) {
    let (client, server) = connect(&t.a, &t.b_small).await;
    let reader = tokio::spawn(async move {
        let mut recv = server.accept_uni().await.unwrap();
        let mut next = 0u32;
        while let Some(f) = recv.recv().await.unwrap() {
            assert_eq!(u32::from_be_bytes(f[..4].try_into().unwrap()), next);
            next += 1;
        }
        (next, server)
    });
    let mut send = client.open_uni().await.unwrap();
    for n in 0u32..10_000 {
        send.send(Bytes::copy_from_slice(&n.to_be_bytes()))
            .await
            .unwrap();
    }
    send.finish();
    assert_eq!(reader.await.unwrap().0, 10_000);
}

async fn batches_arrive_whole_in_order_with_few_writes(t: Trio) {
    let (client, server) = connect(&t.a, &t.b_small).await;
    // Sizes around the encoder's copy limit and the receive chunking; ids in the first bytes.
    let frame = |n: u32| {
        let mut f = vec![(n % 251) as u8; 4 + (n as usize * 37) % 5000];
        f[..4].copy_from_slice(&n.to_be_bytes());
        Bytes::from(f)
    };
    let reader = tokio::spawn(async move {
        let mut recv = server.accept_uni().await.unwrap();
        let mut got = Vec::new();
        while let Some(f) = recv.recv().await.unwrap() {
            got.push(f);
            // What arrived with it, without waiting.
            while let Some(f) = recv.try_recv().unwrap() {
                got.push(f);
            }
        }
        (got, server)
    });
    let sends_before = t.a.io().send_calls.load(Ordering::Relaxed);
    let mut send = client.open_uni().await.unwrap();
    let frames: Vec<Bytes> = (0..1000).map(frame).collect();
    for batch in frames.chunks(250) {
        send.send_batch(batch).await.unwrap();
    }
    // A batch with one frame over the limit is refused whole, before anything is written.
    let bad = [frame(1000), Bytes::from(vec![0u8; BIG + 1])];
    assert!(matches!(
        send.send_batch(&bad).await,
        Err(TransportError::FrameTooLarge { .. })
    ));
    send.finish();
    let (got, _server) = reader.await.unwrap();
    assert_eq!(got.len(), frames.len());
    assert!(got == frames, "frames differ or are out of order");
    let sends = t.a.io().send_calls.load(Ordering::Relaxed) - sends_before;
    if !matches!(*t.a, Endpoint::Mem(_)) {
        // ~2.5 MB in 4 batches: fewer calls than frames (QUIC needs ~2000 packets for it, so
        // this also shows segmentation offload at work).
        assert!(sends > 0, "system calls are counted");
        assert!(
            sends < 1000,
            "{sends} send calls for 1000 frames in 4 batches"
        );
    }
}

async fn oversize_frames_are_refused(t: Trio) {
    // The sender refuses what exceeds its own limit...
    let (client, server) = connect(&t.b_small, &t.a).await;
    let (mut send, _recv) = client.open_bi().await.unwrap();
    let err = send
        .send(Bytes::from(vec![0u8; SMALL + 1]))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::FrameTooLarge { .. }), "{err}");
    drop((client, server));
    // ...and the receiver refuses what exceeds its limit, whatever the sender's.
    let (client, server) = connect(&t.a, &t.b_small).await;
    let reader = tokio::spawn(async move {
        let mut recv = server.accept_uni().await.unwrap();
        let first = recv.recv().await;
        (first, server)
    });
    let mut send = client.open_uni().await.unwrap();
    // The sender may notice the refusal or not; only the receiver's verdict matters.
    let _ = send.send(Bytes::from(vec![0u8; SMALL + 100])).await;
    let (first, _server) = reader.await.unwrap();
    assert!(
        matches!(first, Err(TransportError::FrameTooLarge { size, max }) if size == (SMALL + 100) as u64 && max == SMALL),
        "expected FrameTooLarge, got {:?}",
        first.map(|f| f.map(|b| b.len()))
    );
}

async fn close_reaches_peer_with_its_code(t: Trio) {
    let (client, server) = connect(&t.a, &t.b_small).await;
    let waiting = tokio::spawn(async move { server.accept_bi().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.close(CloseCode::SlowPeer, "queue overflow");
    let res = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    match res {
        Err(TransportError::Closed { code, reason }) => {
            assert_eq!(code, Some(CloseCode::SlowPeer));
            assert_eq!(reason, "queue overflow");
        }
        other => panic!("expected a close, got {other:?}"),
    }
    // Streams of a closed connection fail at once.
    assert!(client.open_bi().await.is_err());
}

async fn untrusted_peer_is_refused(t: Trio) {
    let accepted = tokio::time::timeout(Duration::from_millis(1500), t.a.accept());
    let attempt = async {
        let conn = t.rogue.connect(t.a.local_addr()).await?;
        // TLS 1.3: a refused client certificate shows at the first read, not at connect.
        let (mut send, mut recv) = conn.open_bi().await?;
        send.send(Bytes::from_static(b"hello?")).await?;
        send.finish();
        recv.recv().await
    };
    let (accepted, attempt) = tokio::join!(accepted, attempt);
    assert!(
        attempt.is_err(),
        "the rogue peer could exchange a frame: {attempt:?}"
    );
    assert!(
        accepted.is_err(),
        "the endpoint accepted a connection from the rogue peer"
    );
}

macro_rules! suite {
    ($($transport:ident),*) => {$(
        mod $transport {
            #[tokio::test]
            async fn frames_round_trip() {
                super::frames_round_trip(super::$transport().await).await
            }
            #[tokio::test]
            async fn many_streams_in_flight() {
                super::many_streams_in_flight(super::$transport().await).await
            }
            #[tokio::test]
            async fn uni_stream_keeps_order() {
                super::uni_stream_keeps_order(super::$transport().await).await
            }
            #[tokio::test]
            async fn batches_arrive_whole_in_order_with_few_writes() {
                super::batches_arrive_whole_in_order_with_few_writes(super::$transport().await).await
            }
            #[tokio::test]
            async fn oversize_frames_are_refused() {
                super::oversize_frames_are_refused(super::$transport().await).await
            }
            #[tokio::test]
            async fn close_reaches_peer_with_its_code() {
                super::close_reaches_peer_with_its_code(super::$transport().await).await
            }
            #[tokio::test]
            async fn untrusted_peer_is_refused() {
                super::untrusted_peer_is_refused(super::$transport().await).await
            }
        }
    )*};
}

suite!(mem, quic, ws);
