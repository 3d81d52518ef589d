//! A link to one peer node: its bounded command queue, the task that writes the queue on the
//! peer's command stream in order, and the connection requests use.
//!
//! ```text
//!   adapters ──enqueue──► queue (bounded: commands and bytes) ──► writer task
//!                                                                  │ takes every queued command
//!                                                                  │ (a batch), one stream write
//!                                                                  ▼
//!                                                   command stream of the current connection
//! ```
//!
//! Commands are never waited on by the emitter: `enqueue` returns at once. A command that
//! finds the queue over its byte bound cuts the peer off (it reconnects; the queue is
//! dropped and counted), volatile commands are shed earlier, at a quarter of the bound. A
//! peer that accepts nothing for `slow_peer_timeout` while commands wait is cut off too: a
//! busy machine slows a peer down, a stalled peer stops it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use socketioxide_core::Uid;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Stats;
use crate::{
    incidents::{Incident, Incidents},
    interest::PeerInterest,
    peers::NodeId,
    transport::{CloseCode, Conn, SendStream, TransportError},
    wire::{self, UniHeader},
};

/// Commands taken off the queue into one write, at most.
const MAX_BATCH: usize = 1024;
/// Bytes gathered into one write, at most (a single larger command still goes alone).
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// The connection state of a link.
#[derive(Clone, Default)]
pub(crate) struct LinkState {
    pub conn: Option<Conn>,
    /// The peer died or left: nothing will ever be sent to it again.
    pub gone: bool,
}

/// Bounds of a link's queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkLimits {
    /// Commands queued at most.
    pub queue_len: usize,
    /// Bytes queued at most; volatile commands are shed from a quarter of it.
    pub queue_bytes: usize,
    /// A peer that accepts nothing for this long while commands wait is cut off.
    pub stall_timeout: Duration,
    /// On a busy link (the last write left less than this ago), the longest a command waits
    /// for others to share its write. Zero: write as soon as the writer runs.
    pub batch_delay: Duration,
}

/// See the module docs.
pub(crate) struct Link {
    pub node: NodeId,
    pub node_uid: Uid,
    queue_tx: mpsc::Sender<Bytes>,
    /// Commands and bytes queued and not yet taken by the writer.
    queued: AtomicUsize,
    queued_bytes: AtomicUsize,
    limits: LinkLimits,
    /// Commands enqueued so far: the sequence number of the next one.
    next_seq: AtomicU64,
    /// Set when the peer is cut off: the writer then drops the queue.
    cut_off: AtomicBool,
    pub state: watch::Sender<LinkState>,
    stats: Arc<Stats>,
    incidents: Arc<Incidents>,
    /// The sequence number of the first command: where an earlier link to the same node
    /// stopped, so the peer can count what it missed in between.
    first_seq: u64,
    /// Lock: the rooms the peer has members in, from its announcements (interest-based
    /// routing). Read by every room broadcast; written when an announcement arrives, a join
    /// is sent, or the peer's command stream starts or ends.
    pub interest: std::sync::RwLock<PeerInterest>,
    /// The peer's command stream whose announcements count (see [`Link::interest`]): bumped
    /// when one starts.
    pub interest_stream: AtomicU64,
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
    /// Create a link whose first command has sequence number `first_seq` and spawn its writer
    /// on `tasks`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn spawn(
        node: NodeId,
        node_uid: Uid,
        limits: LinkLimits,
        first_seq: u64,
        stats: Arc<Stats>,
        incidents: Arc<Incidents>,
        tasks: &tokio_util::task::TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Link> {
        let (queue_tx, queue_rx) = mpsc::channel(limits.queue_len.max(1));
        let (state, state_rx) = watch::channel(LinkState::default());
        let link = Arc::new(Link {
            node,
            node_uid,
            queue_tx,
            queued: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            limits,
            next_seq: AtomicU64::new(first_seq),
            cut_off: AtomicBool::new(false),
            state,
            stats,
            incidents,
            first_seq,
            interest: Default::default(),
            interest_stream: AtomicU64::new(0),
        });
        let writer = Writer {
            link: link.clone(),
            queue_rx,
            state_rx,
            batch: Vec::with_capacity(64),
            last_write: None,
        };
        tasks.spawn(writer.run(cancel));
        link
    }

    /// Queue a command. Never waits: a full queue is the caller's decision (drop a volatile
    /// message, or cut the peer off). Volatile commands are refused once a quarter of the
    /// byte bound is queued, so they go first when a peer falls behind.
    pub(crate) fn enqueue(&self, frame: Bytes, volatile: bool) -> Result<(), EnqueueError> {
        let len = frame.len();
        let bound = if volatile {
            self.limits.queue_bytes / 4
        } else {
            self.limits.queue_bytes
        };
        if self.queued_bytes.load(Ordering::Acquire) + len > bound {
            return Err(EnqueueError::Full);
        }
        // Count first: the writer may take the frame before `try_send` returns.
        self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        self.queued.fetch_add(1, Ordering::AcqRel);
        match self.queue_tx.try_send(frame) {
            Ok(()) => {
                self.next_seq.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                self.queued.fetch_sub(1, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(EnqueueError::Full),
                    mpsc::error::TrySendError::Closed(_) => Err(EnqueueError::Gone),
                }
            }
        }
    }

    /// Whether a broadcast to `rooms` of namespace `ns` must go to this peer (interest-based
    /// routing; see [`PeerInterest`]).
    pub(crate) fn wants(&self, ns: &str, rooms: &[socketioxide_core::adapter::Room]) -> bool {
        self.interest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .wants(ns, rooms)
    }

    /// The number of commands queued so far: a request sent now is answered after the peer
    /// applied them all.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire)
    }

    /// Commands and bytes waiting in the queue now.
    pub(crate) fn depth(&self) -> (usize, usize) {
        (
            self.queued.load(Ordering::Relaxed),
            self.queued_bytes.load(Ordering::Relaxed),
        )
    }

    /// Cut the peer off: close its connection and drop its queue. It reconnects.
    pub(crate) fn cut_off(&self, why: &str) {
        // Without a connection there is nothing to cut: the queue waits for the next one, and
        // what overflows meanwhile is counted as lost by the caller.
        let Some(conn) = self.state.borrow().conn.clone() else {
            return;
        };
        if self.cut_off.swap(true, Ordering::AcqRel) {
            return; // already being cut off
        }
        self.stats.slow_peer_cutoffs.fetch_add(1, Ordering::Relaxed);
        let (queued, queued_bytes) = self.depth();
        warn!(peer = %self.node_uid, queued, queued_bytes, reason = why,
            "peer does not keep up with its commands: cutting it off");
        conn.close(CloseCode::SlowPeer, why);
    }

    /// Wait for a connection to the peer; `None` if it is gone.
    pub(crate) async fn connection(&self) -> Option<Conn> {
        let mut rx = self.state.subscribe();
        let state = rx.wait_for(|s| s.conn.is_some() || s.gone).await.ok()?;
        state.conn.clone()
    }

    pub(crate) fn set_conn(&self, conn: Option<Conn>) {
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
    link: Arc<Link>,
    queue_rx: mpsc::Receiver<Bytes>,
    state_rx: watch::Receiver<LinkState>,
    /// The commands of the write in progress (reused).
    batch: Vec<Bytes>,
    /// When the last write was handed to the transport.
    last_write: Option<tokio::time::Instant>,
}

impl Writer {
    async fn run(mut self, cancel: CancellationToken) {
        // Sequence number of the next command taken off the queue.
        let mut seq: u64 = self.link.first_seq;
        let mut failed: Option<u64> = None;
        loop {
            let conn = tokio::select! {
                conn = self.next_conn(failed) => match conn {
                    Some(c) => c,
                    None => {
                        self.drop_queue("gone: declared dead or left");
                        return;
                    }
                },
                _ = cancel.cancelled() => return,
            };
            tokio::select! {
                res = self.write_all(&conn, &mut seq) => {
                    if let Err(e) = res {
                        debug!(peer = %self.link.node_uid, error = %e, "command stream interrupted");
                        // If the connection is still up, the stream broke on its own: the peer
                        // misbehaves. Close so both sides start over on a fresh connection.
                        conn.close(CloseCode::Protocol, "command stream failed");
                        failed = Some(conn.id());
                    }
                }
                _ = cancel.cancelled() => return,
            }
            if self.link.cut_off.swap(false, Ordering::AcqRel) {
                seq += self.drop_queue("cut off: it did not keep up");
            }
        }
    }

    /// Drop what is queued, counted as lost; returns how many.
    fn drop_queue(&mut self, why: &str) -> u64 {
        let mut dropped = 0u64;
        while let Ok(frame) = self.queue_rx.try_recv() {
            self.link
                .queued_bytes
                .fetch_sub(frame.len(), Ordering::AcqRel);
            self.link.queued.fetch_sub(1, Ordering::AcqRel);
            dropped += 1;
        }
        if dropped > 0 {
            self.link
                .stats
                .commands_lost
                .fetch_add(dropped, Ordering::Relaxed);
            self.link.incidents.note_loss(
                Incident::CommandsDropped,
                None,
                dropped,
                &format_args!("peer {} {why}", self.link.node_uid),
            );
        }
        dropped
    }

    /// The next connection to use, never the one that just failed.
    async fn next_conn(&mut self, failed: Option<u64>) -> Option<Conn> {
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

    async fn write_all(&mut self, conn: &Conn, seq: &mut u64) -> Result<(), TransportError> {
        let mut stream = conn.open_uni().await?;
        let header = wire::encode(&UniHeader::Commands { start_seq: *seq })
            .map_err(|e| TransportError::Io(e.to_string()))?;
        stream.send(header).await?;
        loop {
            tokio::select! {
                n = self.queue_rx.recv_many(&mut self.batch, MAX_BATCH) => {
                    if n == 0 {
                        return Ok(());
                    }
                }
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
            }
            // A busy link writes at most once per `batch_delay`: what is queued meanwhile
            // shares the next write. After a quiet spell, a command leaves at once.
            if let Some(last) = self.last_write {
                let due = last + self.link.limits.batch_delay;
                if tokio::time::Instant::now() < due {
                    tokio::time::sleep_until(due).await;
                }
            }
            self.last_write = Some(tokio::time::Instant::now());
            self.write_batch(&mut stream, seq).await?;
        }
    }

    /// Write the batch taken off the queue (and whatever else is queued by now, up to the
    /// bounds) in one stream write.
    async fn write_batch(
        &mut self,
        stream: &mut SendStream,
        seq: &mut u64,
    ) -> Result<(), TransportError> {
        let link = &self.link;
        let mut bytes: usize = self.batch.iter().map(Bytes::len).sum();
        while self.batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match self.queue_rx.try_recv() {
                Ok(frame) => {
                    bytes += frame.len();
                    self.batch.push(frame);
                }
                Err(_) => break,
            }
        }
        let n = self.batch.len();
        link.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        link.queued.fetch_sub(n, Ordering::AcqRel);
        *seq += n as u64;
        let written =
            tokio::time::timeout(link.limits.stall_timeout, stream.send_batch(&self.batch)).await;
        self.batch.clear();
        match written {
            Ok(Ok(())) => {
                link.stats
                    .commands_sent
                    .fetch_add(n as u64, Ordering::Relaxed);
                link.stats
                    .command_bytes_sent
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                link.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => {
                link.stats
                    .commands_lost
                    .fetch_add(n as u64, Ordering::Relaxed);
                link.incidents.note_loss(
                    Incident::CommandsDropped,
                    None,
                    n as u64,
                    &format_args!("peer {}: write failed: {e}", link.node_uid),
                );
                Err(e)
            }
            Err(_) => {
                link.stats
                    .commands_lost
                    .fetch_add(n as u64, Ordering::Relaxed);
                link.cut_off("no progress writing commands");
                Err(TransportError::Io("peer stalled".into()))
            }
        }
    }
}
