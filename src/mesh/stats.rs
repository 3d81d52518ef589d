//! Counters: [`Stats`] (atomics bumped on the hot path) and [`MeshStats`] (their snapshot,
//! [`Mesh::stats`](super::Mesh::stats)).

use std::sync::atomic::AtomicU64;

use super::shared::COMMAND_KINDS;

/// Counters of what happened on this node since it started. Cheap to read.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub commands_sent: AtomicU64,
    pub commands_received: AtomicU64,
    pub commands_lost: AtomicU64,
    pub commands_missed: AtomicU64,
    pub command_bytes_sent: AtomicU64,
    pub command_bytes_received: AtomicU64,
    pub gossip_bytes_sent: AtomicU64,
    pub gossip_bytes_received: AtomicU64,
    /// Members declared dead lately (a gauge, set by the driver).
    pub dead_members_now: AtomicU64,
    /// Commands queued to peers and applied from peers, by kind ([`COMMAND_KINDS`]).
    pub queued_by_kind: [AtomicU64; COMMAND_KINDS.len()],
    pub applied_by_kind: [AtomicU64; COMMAND_KINDS.len()],
    pub batches_sent: AtomicU64,
    pub volatile_dropped: AtomicU64,
    pub slow_peer_cutoffs: AtomicU64,
    pub socket_buffer_drops: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub dials_failed: AtomicU64,
    pub requests: AtomicU64,
    /// Per-peer asks of requests in progress (a gauge).
    pub asks_in_flight: AtomicU64,
    pub server_events_dropped: AtomicU64,
    pub request_peer_failures: AtomicU64,
    pub queries_answered: AtomicU64,
    pub queries_refused: AtomicU64,
    /// Peer deliveries of room broadcasts not sent: the peer had no member in their rooms.
    pub broadcasts_routed_away: AtomicU64,
    pub probes_unanswered: AtomicU64,
    pub peers_declared_dead: AtomicU64,
}

/// A snapshot of a node's counters ([`Mesh::stats`](super::Mesh::stats)).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MeshStats {
    /// Commands (broadcasts, joins, leaves, disconnects, server events) written to peers.
    pub commands_sent: u64,
    /// Commands received from peers and applied.
    pub commands_received: u64,
    /// Commands this node queued to a peer and dropped: the peer was cut off (slow), is gone
    /// (declared dead, left), or the write failed (then some of the batch may have arrived:
    /// an upper bound; the receiver's `commands_missed` is exact).
    pub commands_lost: u64,
    /// Commands peers sent to this node that never arrived: a connection broke with them in
    /// flight or queued (this node froze, was cut off as slow, or was declared dead and came
    /// back). Counted exactly, from the gap in the peer's sequence numbers when its next
    /// command stream starts.
    pub commands_missed: u64,
    /// Commands queued to peers, by kind (`broadcast`, `join`, `leave`, `disconnect`,
    /// `server_event`): one per peer it goes to.
    pub commands_queued_by_kind: std::collections::BTreeMap<String, u64>,
    /// Commands received from peers and applied, by kind.
    pub commands_applied_by_kind: std::collections::BTreeMap<String, u64>,
    /// Bytes of the commands sent to peers (frames, before transport overhead).
    pub command_bytes_sent: u64,
    /// Bytes of the commands received from peers.
    pub command_bytes_received: u64,
    /// Bytes of gossip (membership) messages sent to peers.
    pub gossip_bytes_sent: u64,
    /// Bytes of gossip messages received from peers.
    pub gossip_bytes_received: u64,
    /// Stream writes that carried the commands sent: `commands_sent / batches_sent` is the
    /// average number of commands per write.
    pub batches_sent: u64,
    /// Volatile broadcasts dropped because a peer had fallen behind (its queue held a quarter
    /// of `peer_queue_bytes`).
    pub volatile_dropped: u64,
    /// Times a peer was cut off: its queue went over `peer_queue_bytes`, or it accepted
    /// nothing for `slow_peer_timeout`.
    pub slow_peer_cutoffs: u64,
    /// Packets of peers' broadcasts that a local socket could not take because its buffer
    /// was full (see socketioxide's `max_buffer_size`).
    pub socket_buffer_drops: u64,
    /// Commands waiting in the peers' queues now.
    pub queued_commands: u64,
    /// Bytes waiting in the peers' queues now.
    pub queued_bytes: u64,
    /// System calls that wrote to peer sockets (`sendmsg`/`sendmmsg` for QUIC, `write`/
    /// `writev` for WebSocket): the cost of the data path, in calls.
    pub peer_send_calls: u64,
    /// System calls that read from peer sockets.
    pub peer_recv_calls: u64,
    /// Connections closed because the peer broke the protocol (malformed or oversize frame...).
    pub protocol_errors: u64,
    /// Incoming connections refused: by TLS (certificate missing or not from the cluster CA)
    /// or by the mesh handshake (wrong cluster, version, magic...).
    pub handshakes_refused: u64,
    /// Outgoing connections that failed (unreachable, refused by TLS or by the handshake).
    pub dials_failed: u64,
    /// Refused connections and failed dials by cause (each logged once per cause and
    /// address at WARN, then summarised).
    pub incidents: crate::IncidentCounts,
    /// Requests sent (fetch_sockets, rooms, broadcast with ack, server events with ack).
    pub requests: u64,
    /// Questions to peers in progress now (one per peer and request): a dropped request stops
    /// its questions at once.
    pub requests_in_flight: u64,
    /// Server events from peers dropped because the handler did not keep up (more than 1024
    /// queued from one peer).
    pub server_events_dropped: u64,
    /// Peers that failed to answer a request (died, disconnected, timed out).
    pub request_peer_failures: u64,
    /// Requests from peers answered.
    pub queries_answered: u64,
    /// Requests from peers refused because too many were in flight.
    pub queries_refused: u64,
    /// Room broadcasts not sent to a peer because it announced no member in their rooms
    /// (interest-based routing): one per broadcast and peer skipped.
    pub broadcasts_routed_away: u64,
    /// Liveness probes a peer left unanswered for the probe timeout (it was then suspected,
    /// and the other members asked to check).
    pub probes_unanswered: u64,
    /// Peers this node declared dead itself: probes unanswered twice, or a redial failed after
    /// their connection closed.
    pub peers_declared_dead: u64,
}
