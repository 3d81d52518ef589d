//! Requests to peers: one bidirectional stream per peer, answers gathered as they come, and
//! the request over as soon as every peer answered or failed.
//!
//! ```text
//!   A (requester)                          B (peer)
//!     │ open stream                           │
//!     │── QueryHeader{after_seq} ────────────►│ waits until it applied A's first
//!     │── Query ─────────────────────────────►│ `after_seq` commands, then answers
//!     │◄─────────────────────────── Reply(s) ─│
//!     │◄─────────────────────────── finish ───│
//! ```
//! If B dies, the driver closes its connection when membership says so (or the transport
//! notices), the stream fails at once and the request goes on without B.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use socketioxide_core::Uid;
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc},
    time::Instant,
};
use tracing::debug;

use super::{Link, Shared};
use crate::{
    Error,
    answers::{AckStep, AckTally, Gather},
    error::PeerError,
    peers::NodeId,
    transport::{CloseCode, TransportError},
    wire::{self, QueryHeader, Reply},
};

/// The failure of a peer that did not answer within the request timeout.
const TIMED_OUT: &str = "request timed out";

/// How a peer answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// One reply frame.
    Single,
    /// `AckCount(n)` then `n` acks.
    Acks,
}

enum PeerEvent {
    Reply(NodeId, Reply),
    Done(NodeId),
    Failed(NodeId, PeerError),
}

/// An outgoing request: yields replies until every peer answered or failed.
pub(crate) struct Outgoing {
    /// What is asked, for the latency histogram (`fetch_sockets`, `rooms`...).
    kind: &'static str,
    started: Instant,
    /// Whether a peer failed by the timeout (the failures themselves: `gather`).
    timed_out: bool,
    rx: mpsc::Receiver<PeerEvent>,
    gather: Gather,
    uids: HashMap<NodeId, Uid>,
    shared: Arc<Shared>,
    /// The per-peer asks: aborted when the request is dropped, so a request nobody waits for
    /// stops at once (its streams close) instead of running to its deadline, and
    /// `max_in_flight_requests` bounds the work actually in progress.
    asks: Vec<tokio::task::AbortHandle>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Shared {
    /// Send `query` to every link and gather the answers. Waits for an in-flight slot (within
    /// `timeout`); the whole request is bounded by `timeout`.
    pub(crate) async fn request(
        self: &Arc<Self>,
        kind: &'static str,
        targets: &[Arc<Link>],
        query: &impl serde::Serialize,
        mode: Mode,
        timeout: Duration,
    ) -> Result<Outgoing, Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let (tx, rx) = mpsc::channel(targets.len().clamp(1, 64));
        let mut out = Outgoing {
            kind,
            started,
            timed_out: false,
            rx,
            gather: Gather::new(targets.iter().map(|l| l.node)),
            uids: targets.iter().map(|l| (l.node, l.node_uid)).collect(),
            shared: self.clone(),
            asks: Vec::with_capacity(targets.len()),
            _permit: None,
        };
        if targets.is_empty() {
            return Ok(out);
        }
        let permit =
            tokio::time::timeout_at(deadline, self.request_permits.clone().acquire_owned())
                .await
                .map_err(|_| {
                    Error::Busy("too many requests in flight (max_in_flight_requests)".into())
                })?
                .map_err(|_| Error::Closed)?;
        out._permit = Some(permit);
        let frame = self.encode_frame(query)?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        for link in targets {
            let (link, frame, tx) = (link.clone(), frame.clone(), tx.clone());
            let node = link.node;
            let stats = self.stats.clone();
            let handle = self.tasks.spawn(async move {
                stats.asks_in_flight.fetch_add(1, Ordering::Relaxed);
                let _done = InFlight(&stats.asks_in_flight);
                let res = tokio::time::timeout_at(deadline, ask(&link, frame, mode, &tx)).await;
                let ev = match res {
                    Ok(Ok(())) => PeerEvent::Done(node),
                    Ok(Err(e)) => PeerEvent::Failed(node, e),
                    Err(_) => PeerEvent::Failed(node, PeerError::Transport(TIMED_OUT.into())),
                };
                // The requester may have stopped listening; nothing to do then.
                let _ = tx.send(ev).await;
            });
            out.asks.push(handle.abort_handle());
        }
        Ok(out)
    }
}

/// Ask one peer, forwarding its replies.
async fn ask(
    link: &Link,
    query: Bytes,
    mode: Mode,
    tx: &mpsc::Sender<PeerEvent>,
) -> Result<(), PeerError> {
    let conn = link
        .connection()
        .await
        .ok_or_else(|| PeerError::Transport("peer left".into()))?;
    let transport = |e: TransportError| match e {
        TransportError::FrameTooLarge { size, max } => PeerError::FrameTooLarge { size, max },
        e => PeerError::Transport(e.to_string()),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(transport)?;
    let header = wire::encode(&QueryHeader {
        after_seq: link.next_seq(),
    })
    .map_err(|e| PeerError::Malformed(e.to_string()))?;
    send.send(header).await.map_err(transport)?;
    send.send(query).await.map_err(transport)?;
    send.finish();
    let mut tally = AckTally::default();
    let res = async {
        loop {
            let Some(frame) = recv.recv().await.map_err(transport)? else {
                if mode == Mode::Acks && tally.expected() > 0 {
                    // The peer's sockets went away before acking: fewer acks, not an error.
                    return Ok(());
                }
                return Err(PeerError::Transport(
                    "answer stream ended without an answer".into(),
                ));
            };
            let reply: Reply = wire::decode(&frame)?;
            match mode {
                Mode::Single => {
                    if let Reply::Error(e) = &reply {
                        return Err(PeerError::Refused(e.clone()));
                    }
                    let _ = tx.send(PeerEvent::Reply(link.node, reply)).await;
                    return Ok(());
                }
                Mode::Acks => {
                    let step = tally.on_reply(&reply)?;
                    let done = match step {
                        AckStep::Counted { done } => done,
                        AckStep::Ack { done } => {
                            let _ = tx.send(PeerEvent::Reply(link.node, reply)).await;
                            done
                        }
                    };
                    if done {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    if let Err(e @ (PeerError::Malformed(_) | PeerError::FrameTooLarge { .. })) = &res {
        // The peer broke the protocol: cut it off like any other violation.
        conn.close(CloseCode::Protocol, &e.to_string());
    }
    res
}

impl Outgoing {
    /// The next reply, `None` once every peer answered or failed.
    pub(crate) fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<(NodeId, Reply)>> {
        loop {
            if self.gather.is_complete() {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(PeerEvent::Reply(node, reply))) => {
                    return Poll::Ready(Some((node, reply)));
                }
                Poll::Ready(Some(PeerEvent::Done(node))) => self.gather.done(node),
                Poll::Ready(Some(PeerEvent::Failed(node, e))) => {
                    self.shared
                        .stats
                        .request_peer_failures
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %self.uid_of(node), error = %e, "peer failed to answer a request");
                    self.timed_out |= matches!(&e, PeerError::Transport(t) if t == TIMED_OUT);
                    self.gather.failed(node);
                }
            }
        }
    }

    /// The next reply, `None` once every peer answered or failed.
    pub(crate) async fn next(&mut self) -> Option<(NodeId, Reply)> {
        std::future::poll_fn(|cx| self.poll_reply(cx)).await
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.gather.is_complete()
    }

    pub(crate) fn uid_of(&self, node: NodeId) -> Uid {
        self.uids.get(&node).copied().unwrap_or_default()
    }
}

/// Counts an ask in flight until it ends, however it ends (aborted included).
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        for ask in &self.asks {
            ask.abort();
        }
        let outcome = if !self.gather.is_complete() {
            "abandoned"
        } else if self.timed_out {
            "timeout"
        } else if self.gather.failures() > 0 {
            "peer_failed"
        } else {
            "answered"
        };
        crate::telemetry::request_ended(self.kind, outcome, self.started.elapsed());
    }
}
