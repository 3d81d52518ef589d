//! A link to one peer node: its bounded command queue, the task that writes the queue on the
//! peer's command stream in order, and the connection requests use.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

use bytes::Bytes;
use socketioxide_core::Uid;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Stats;
use crate::{
    membership::Member,
    peers::NodeId,
    transport::{CloseCode, Connection},
    wire::{self, UniHeader},
};

/// The connection state of a link.
#[derive(Clone, Default)]
pub(crate) struct LinkState {
    pub conn: Option<Arc<dyn Connection>>,
    /// The peer died or left: nothing will ever be sent to it again.
    pub gone: bool,
}

/// See the module docs.
pub(crate) struct Link {
    pub node: NodeId,
    pub node_uid: Uid,
    /// What gossip says of the peer; `None` while it is connected but not yet a listed member.
    pub member: RwLock<Option<Member>>,
    queue_tx: mpsc::Sender<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Commands enqueued so far: the sequence number of the next one.
    next_seq: AtomicU64,
    /// Set when the peer is cut off for being slow: the writer then drops the queue.
    cut_off: Arc<AtomicBool>,
    pub state: watch::Sender<LinkState>,
    stats: Arc<Stats>,
}

/// Why a command was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum EnqueueError {
    /// The queue is full (in commands or bytes).
    Full,
    /// The link is gone.
    Gone,
}

impl Link {
    /// Create a link and spawn its writer on `tasks`.
    pub(crate) fn spawn(
        node: NodeId,
        node_uid: Uid,
        queue_len: usize,
        max_bytes: usize,
        stats: Arc<Stats>,
        tasks: &tokio_util::task::TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Link> {
        let (queue_tx, queue_rx) = mpsc::channel(queue_len);
        let (state, state_rx) = watch::channel(LinkState::default());
        let link = Arc::new(Link {
            node,
            node_uid,
            member: RwLock::new(None),
            queue_tx,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            max_bytes,
            next_seq: AtomicU64::new(0),
            cut_off: Arc::new(AtomicBool::new(false)),
            state,
            stats,
        });
        let writer = Writer {
            node_uid,
            queue_rx,
            queued_bytes: link.queued_bytes.clone(),
            cut_off: link.cut_off.clone(),
            state_rx,
            stats: link.stats.clone(),
        };
        tasks.spawn(writer.run(cancel));
        link
    }

    /// Whether requests and commands for `ns` go to this peer: a live member serving it.
    pub(crate) fn serves(&self, ns: &str) -> bool {
        let member = self.member.read().unwrap_or_else(|e| e.into_inner());
        member.as_ref().is_some_and(|m| m.serves(ns)) && !self.state.borrow().gone
    }

    /// Whether the peer is a live member (any namespace).
    pub(crate) fn is_member(&self) -> bool {
        self.member
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
            && !self.state.borrow().gone
    }

    /// The socketioxide server id the peer serves.
    pub(crate) fn server_id(&self) -> Option<Uid> {
        self.member
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|m| m.server_id)
    }

    /// Queue a command. Never waits: a full queue is the caller's decision (drop a volatile
    /// message, or cut the peer off).
    pub(crate) fn enqueue(&self, frame: Bytes) -> Result<(), EnqueueError> {
        let len = frame.len();
        if self.queued_bytes.load(Ordering::Acquire) + len > self.max_bytes {
            return Err(EnqueueError::Full);
        }
        // Count the bytes first: the writer may dequeue the frame before `try_send` returns.
        self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        match self.queue_tx.try_send(frame) {
            Ok(()) => {
                self.next_seq.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(EnqueueError::Full),
                    mpsc::error::TrySendError::Closed(_) => Err(EnqueueError::Gone),
                }
            }
        }
    }

    /// The number of commands queued so far: a request sent now is answered after the peer
    /// applied them all.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire)
    }

    /// Cut a slow peer off: close its connection and drop its queue. It reconnects.
    pub(crate) fn cut_off(&self) {
        // Without a connection there is nothing to cut: the queue waits for the next one, and
        // what overflows meanwhile is counted as lost by the caller.
        let Some(conn) = self.state.borrow().conn.clone() else {
            return;
        };
        if self.cut_off.swap(true, Ordering::AcqRel) {
            return; // already being cut off
        }
        self.stats.slow_peer_cutoffs.fetch_add(1, Ordering::Relaxed);
        warn!(peer = %self.node_uid, queued_bytes = self.queued_bytes.load(Ordering::Relaxed),
            "peer does not keep up with its command queue: cutting it off");
        conn.close(CloseCode::SlowPeer, "command queue overflow");
    }

    /// Wait for a connection to the peer; `None` if it is gone.
    pub(crate) async fn connection(&self) -> Option<Arc<dyn Connection>> {
        let mut rx = self.state.subscribe();
        let state = rx.wait_for(|s| s.conn.is_some() || s.gone).await.ok()?;
        state.conn.clone()
    }

    pub(crate) fn set_conn(&self, conn: Option<Arc<dyn Connection>>) {
        self.state.send_modify(|s| s.conn = conn);
    }

    pub(crate) fn set_gone(&self) {
        self.state.send_modify(|s| {
            s.gone = true;
            s.conn = None;
        });
    }
}

/// Writes the queue on the peer's command stream, reopening it on each new connection.
struct Writer {
    node_uid: Uid,
    queue_rx: mpsc::Receiver<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    cut_off: Arc<AtomicBool>,
    state_rx: watch::Receiver<LinkState>,
    stats: Arc<Stats>,
}

impl Writer {
    async fn run(mut self, cancel: CancellationToken) {
        // Sequence number of the next command taken off the queue.
        let mut seq: u64 = 0;
        let mut failed: Option<u64> = None;
        loop {
            let conn = tokio::select! {
                conn = self.next_conn(failed) => match conn {
                    Some(c) => c,
                    None => return,
                },
                _ = cancel.cancelled() => return,
            };
            tokio::select! {
                res = self.write_all(&conn, &mut seq) => {
                    if let Err(e) = res {
                        debug!(peer = %self.node_uid, error = %e, "command stream interrupted");
                        // If the connection is still up, the stream broke on its own: the peer
                        // misbehaves. Close so both sides start over on a fresh connection.
                        conn.close(CloseCode::Protocol, "command stream failed");
                        failed = Some(conn.id());
                    }
                }
                _ = cancel.cancelled() => return,
            }
            if self.cut_off.swap(false, Ordering::AcqRel) {
                let mut dropped = 0u64;
                while let Ok(frame) = self.queue_rx.try_recv() {
                    self.queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
                    seq += 1;
                    dropped += 1;
                }
                self.stats
                    .commands_lost
                    .fetch_add(dropped, Ordering::Relaxed);
                warn!(peer = %self.node_uid, dropped, "dropped the queue of a cut-off peer");
            }
        }
    }

    /// The next connection to use, never the one that just failed.
    async fn next_conn(&mut self, failed: Option<u64>) -> Option<Arc<dyn Connection>> {
        loop {
            {
                let state = self.state_rx.borrow_and_update();
                if state.gone {
                    return None;
                }
                if let Some(conn) = &state.conn
                    && Some(conn.id()) != failed
                {
                    return Some(conn.clone());
                }
            }
            self.state_rx.changed().await.ok()?;
        }
    }

    async fn write_all(
        &mut self,
        conn: &Arc<dyn Connection>,
        seq: &mut u64,
    ) -> Result<(), crate::transport::TransportError> {
        let mut stream = conn.open_uni().await?;
        let header = wire::encode(&UniHeader::Commands { start_seq: *seq })
            .map_err(|e| crate::transport::TransportError::Io(e.to_string()))?;
        stream.send(header).await?;
        loop {
            let frame = tokio::select! {
                frame = self.queue_rx.recv() => match frame {
                    Some(f) => f,
                    None => return Ok(()),
                },
                // A new connection replaced this one: move over.
                changed = self.state_rx.changed() => {
                    let moved = changed.is_err() || {
                        let s = self.state_rx.borrow();
                        s.gone || s.conn.as_ref().is_none_or(|c| c.id() != conn.id())
                    };
                    if moved {
                        stream.finish();
                        return Ok(());
                    }
                    continue;
                }
            };
            self.queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
            *seq += 1;
            if let Err(e) = stream.send(frame).await {
                self.stats.commands_lost.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            self.stats.commands_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}
