//! One peer connection: the handshake, then the tasks that read its streams (ordered
//! commands, gossip, queries) and write its gossip.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tracing::{debug, warn};

use super::Shared;
use crate::{
    error::PeerError,
    incidents::Incident,
    transport::{CloseCode, Conn, RecvStream, SendStream, TransportError},
    wire::{self, Hello, HelloReply, Query, QueryHeader, UniHeader},
};

/// Gossip frames queued per connection; dropped beyond, like UDP datagrams.
pub(super) const GOSSIP_QUEUE: usize = 64;
/// Commands applied before the reader publishes its progress and yields, at most.
const MAX_APPLY_BATCH: u64 = 1024;

/// Why a stream ended badly.
enum StreamError {
    /// The transport failed (connection gone...): nothing to blame the peer for.
    Transport(TransportError),
    /// The peer broke the protocol: cut it off.
    Protocol(PeerError),
}

impl From<TransportError> for StreamError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::FrameTooLarge { size, max } => {
                StreamError::Protocol(PeerError::FrameTooLarge { size, max })
            }
            TransportError::Truncated => {
                StreamError::Protocol(PeerError::Malformed("stream ended inside a frame".into()))
            }
            e => StreamError::Transport(e),
        }
    }
}

impl From<PeerError> for StreamError {
    fn from(e: PeerError) -> Self {
        StreamError::Protocol(e)
    }
}

fn transport_peer_error(e: TransportError) -> PeerError {
    match e {
        TransportError::FrameTooLarge { size, max } => PeerError::FrameTooLarge { size, max },
        TransportError::Closed {
            code: Some(CloseCode::Refused),
            reason,
        } => PeerError::Refused(reason),
        e => PeerError::Transport(e.to_string()),
    }
}

/// Dial `addr` and run the handshake. The peer counts as connected only once its Welcome is
/// read: with TLS 1.3 a refused client certificate shows only at the first read.
pub(super) async fn dial(shared: &Shared, addr: SocketAddr) -> Result<(Conn, Hello), PeerError> {
    let conn = shared
        .transport
        .connect(addr)
        .await
        .map_err(transport_peer_error)?;
    let timeout = shared.settings.connect_timeout;
    let res = tokio::time::timeout(timeout, async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(transport_peer_error)?;
        let hello =
            wire::encode_hello(&shared.hello).map_err(|e| PeerError::Malformed(e.to_string()))?;
        send.send(hello).await.map_err(transport_peer_error)?;
        send.finish();
        let frame = recv
            .recv()
            .await
            .map_err(transport_peer_error)?
            .ok_or_else(|| PeerError::Malformed("handshake stream ended without a reply".into()))?;
        match wire::decode_hello_reply(&frame)? {
            HelloReply::Welcome(peer) => {
                wire::check_hello(&shared.hello, &peer)?;
                Ok(peer)
            }
            HelloReply::Refused(reason) => Err(PeerError::Refused(reason)),
        }
    })
    .await
    .unwrap_or(Err(PeerError::HandshakeTimeout));
    match res {
        Ok(peer) => Ok((conn, peer)),
        Err(e) => {
            conn.close(CloseCode::Refused, &e.to_string());
            Err(e)
        }
    }
}

/// Run the acceptor's side of the handshake on a new connection.
pub(super) async fn accept(shared: &Shared, conn: &Conn) -> Result<Hello, PeerError> {
    let timeout = shared.settings.connect_timeout;
    let res = tokio::time::timeout(timeout, async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(transport_peer_error)?;
        let frame = recv
            .recv()
            .await
            .map_err(transport_peer_error)?
            .ok_or_else(|| PeerError::Malformed("handshake stream ended without a hello".into()))?;
        let checked = wire::decode_hello(&frame).and_then(|peer| {
            wire::check_hello(&shared.hello, &peer)?;
            Ok(peer)
        });
        let reply = match &checked {
            Ok(_) => HelloReply::Welcome(shared.hello.clone()),
            Err(e) => HelloReply::Refused(e.to_string()),
        };
        if let Ok(frame) = wire::encode_hello_reply(&reply) {
            // A refused peer may be gone already; the close reason carries the message too.
            let _ = send.send(frame).await;
        }
        send.finish();
        checked
    })
    .await
    .unwrap_or(Err(PeerError::HandshakeTimeout));
    if let Err(e) = &res {
        match incident_of(e, false) {
            Some(incident) => {
                shared
                    .transport
                    .incidents()
                    .report_inbound(incident, conn.remote_addr(), e)
            }
            None => debug!(remote = %conn.remote_addr(), error = %e, "refused peer handshake"),
        }
        // Give the reply a moment to leave before the close discards it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        conn.close(CloseCode::Refused, &e.to_string());
    }
    res
}

/// Serve an established connection until it closes. Returns why it closed.
pub(super) async fn serve(
    shared: Arc<Shared>,
    conn: Conn,
    peer: Hello,
    gossip_rx: mpsc::Receiver<Bytes>,
) -> TransportError {
    let mut streams = JoinSet::new();
    streams.spawn(write_gossip(conn.clone(), gossip_rx));
    let query_slots = Arc::new(Semaphore::new(
        shared.settings.max_concurrent_streams as usize,
    ));
    let cancel = shared.cancel.clone();
    let err = loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    streams.spawn(read_uni(shared.clone(), conn.clone(), peer.clone(), recv));
                }
                Err(e) => break e,
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => match query_slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (shared, conn, peer) = (shared.clone(), conn.clone(), peer.clone());
                        streams.spawn(async move {
                            let _permit = permit;
                            answer_query(shared, conn, peer, send, recv).await;
                        });
                    }
                    Err(_) => {
                        // Dropping the halves resets the stream: the requester sees a failure
                        // for this peer and goes on.
                        shared.stats.queries_refused.fetch_add(1, Ordering::Relaxed);
                        warn!(peer = %peer.node_id, "too many queries in flight from peer, one refused");
                    }
                },
                Err(e) => break e,
            },
            Some(res) = streams.join_next(), if !streams.is_empty() => {
                if let Err(e) = res && e.is_panic() {
                    warn!(peer = %peer.node_id, "a stream task panicked: {e}");
                }
            }
            _ = cancel.cancelled() => break TransportError::Closed {
                code: Some(CloseCode::Leaving),
                reason: "node shutting down".into(),
            },
        }
    };
    streams.shutdown().await;
    err
}

/// What kind of incident a failed handshake is; `None` for the harmless ones (this node's own
/// address among its seeds).
pub(super) fn incident_of(e: &PeerError, dialing: bool) -> Option<Incident> {
    Some(match e {
        PeerError::SelfConnect => return None,
        PeerError::BadMagic
        | PeerError::Malformed(_)
        | PeerError::FrameTooLarge { .. }
        | PeerError::TransportKind { .. } => Incident::NotAPeer,
        PeerError::Version { .. } | PeerError::Cluster { .. } => Incident::RefusedHello,
        PeerError::Refused(_) => Incident::HelloRejected,
        PeerError::HandshakeTimeout => Incident::HandshakeTimeout,
        PeerError::Transport(text) => return crate::transport::classify(text, dialing),
    })
}

/// Report a protocol violation: log, count, cut the peer off.
fn protocol_violation(shared: &Shared, conn: &Conn, peer: &Hello, err: &PeerError) {
    shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    warn!(peer = %peer.node_id, remote = %conn.remote_addr(), error = %err,
        "peer broke the protocol: closing its connection");
    conn.close(CloseCode::Protocol, &err.to_string());
}

async fn read_uni(shared: Arc<Shared>, conn: Conn, peer: Hello, mut recv: RecvStream) {
    let res = read_uni_inner(&shared, &peer, &mut recv).await;
    match res {
        Ok(()) => {}
        Err(StreamError::Protocol(e)) => protocol_violation(&shared, &conn, &peer, &e),
        Err(StreamError::Transport(e)) => debug!(peer = %peer.node_id, error = %e, "stream ended"),
    }
}

async fn read_uni_inner(
    shared: &Arc<Shared>,
    peer: &Hello,
    recv: &mut RecvStream,
) -> Result<(), StreamError> {
    let Some(header) = recv.recv().await? else {
        return Ok(());
    };
    match wire::decode::<UniHeader>(&header)? {
        UniHeader::Commands { start_seq } => {
            // Commands before `start_seq` not applied yet were lost with a previous
            // connection: counted, and queries that wait for them stop waiting.
            let applied = shared.command_stream_starts(peer, start_seq);
            // The peer's room announcements count from this stream on (until it ends).
            let stream = shared.interest_stream_starts(*peer.node_id);
            let res = apply_commands(shared, peer, recv, &applied, stream).await;
            shared.interest_stream_ends(*peer.node_id, stream);
            res
        }
        UniHeader::Gossip => {
            while let Some(frame) = recv.recv().await? {
                shared
                    .stats
                    .gossip_bytes_received
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                let msg = crate::membership::GossipMessage::decode(&frame)
                    .map_err(|e| PeerError::Malformed(format!("gossip message: {e}")))?;
                if shared
                    .gossip_in
                    .try_send((peer.advertise_addr, msg))
                    .is_err()
                {
                    debug!("gossip inbox full, message dropped");
                }
            }
            Ok(())
        }
    }
}

/// Apply the commands of `peer`'s command stream `stream`, in order. Everything that arrived
/// together is applied, then the progress published once: one wake-up of waiting queries per
/// batch, not per command.
async fn apply_commands(
    shared: &Arc<Shared>,
    peer: &Hello,
    recv: &mut RecvStream,
    applied: &tokio::sync::watch::Sender<u64>,
    stream: u64,
) -> Result<(), StreamError> {
    while let Some(frame) = recv.recv().await? {
        let mut bytes = frame.len() as u64;
        shared.apply_from(peer.node_id, stream, wire::decode_shared(&frame)?);
        let mut n = 1u64;
        while n < MAX_APPLY_BATCH
            && let Some(frame) = recv.try_recv()?
        {
            bytes += frame.len() as u64;
            shared.apply_from(peer.node_id, stream, wire::decode_shared(&frame)?);
            n += 1;
        }
        shared
            .stats
            .commands_received
            .fetch_add(n, Ordering::Relaxed);
        shared
            .stats
            .command_bytes_received
            .fetch_add(bytes, Ordering::Relaxed);
        applied.send_modify(|c| *c += n);
    }
    Ok(())
}

async fn answer_query(
    shared: Arc<Shared>,
    conn: Conn,
    peer: Hello,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let res = answer_query_inner(&shared, &peer, &mut send, &mut recv).await;
    match res {
        Ok(()) => {
            shared
                .stats
                .queries_answered
                .fetch_add(1, Ordering::Relaxed);
        }
        Err(StreamError::Protocol(e)) => protocol_violation(&shared, &conn, &peer, &e),
        Err(StreamError::Transport(e)) => {
            debug!(peer = %peer.node_id, error = %e, "query stream ended")
        }
    }
}

async fn answer_query_inner(
    shared: &Arc<Shared>,
    peer: &Hello,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), StreamError> {
    let missing = || PeerError::Malformed("query stream ended early".into());
    let header: QueryHeader = wire::decode(&recv.recv().await?.ok_or_else(missing)?)?;
    let query: Query = wire::decode_shared(&recv.recv().await?.ok_or_else(missing)?)?;
    // See the commands the peer sent before this query.
    let mut applied = shared.inbound(*peer.node_id).subscribe();
    let wait = applied.wait_for(|n| *n >= header.after_seq);
    if tokio::time::timeout(shared.settings.request_timeout, wait)
        .await
        .is_err()
    {
        debug!(peer = %peer.node_id, after = header.after_seq, "answering before the preceding commands arrived");
    }
    drop(applied);
    let mut replies = shared.answer(peer.node_id, query);
    while let Some(reply) = replies.next().await {
        let frame = wire::encode(&reply)
            .map_err(|e| StreamError::Transport(TransportError::Io(e.to_string())))?;
        send.send(frame).await?;
    }
    send.finish();
    Ok(())
}

/// Writes gossip frames on one unidirectional stream, opened at the first message.
async fn write_gossip(conn: Conn, mut rx: mpsc::Receiver<Bytes>) {
    let mut stream: Option<SendStream> = None;
    while let Some(frame) = rx.recv().await {
        if stream.is_none() {
            let opened = async {
                let mut s = conn.open_uni().await?;
                let header = wire::encode(&UniHeader::Gossip)
                    .map_err(|e| TransportError::Io(e.to_string()))?;
                s.send(header).await?;
                Ok::<_, TransportError>(s)
            }
            .await;
            match opened {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    debug!(error = %e, "cannot open gossip stream");
                    return;
                }
            }
        }
        if let Some(s) = stream.as_mut()
            && let Err(e) = s.send(frame).await
        {
            debug!(error = %e, "gossip stream closed");
            return;
        }
    }
}
