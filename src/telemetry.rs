//! Metrics through the [`metrics`] facade: the library records, the application picks the
//! exporter (e.g. `metrics-exporter-prometheus`, as the examples do). Without a recorder
//! installed every call here is a no-op.
//!
//! Counters and gauges are copied from [`MeshStats`] (exact, cheap atomics on the hot path)
//! once a second and whenever [`Mesh::record_metrics`](crate::Mesh::record_metrics) is called
//! (call it from your `/metrics` handler for values of the moment). Request latencies are
//! recorded as they end. Names follow Prometheus conventions (`_total`, `_seconds`, `_bytes`);
//! the README lists them.

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::MeshStats;

/// How often the counters are copied to the recorder by the mesh itself.
pub(crate) const PUBLISH_EVERY: Duration = Duration::from_secs(1);

const MEMBERS: &str = "socketioxide_mesh_members";
const PEER_LINKS: &str = "socketioxide_mesh_peer_links";
const PEER_QUEUE_COMMANDS: &str = "socketioxide_mesh_peer_queue_commands";
const PEER_QUEUE_BYTES: &str = "socketioxide_mesh_peer_queue_bytes";
const COMMANDS_SENT: &str = "socketioxide_mesh_commands_sent_total";
const COMMANDS_RECEIVED: &str = "socketioxide_mesh_commands_received_total";
const COMMANDS_QUEUED: &str = "socketioxide_mesh_commands_queued_total";
const COMMANDS_APPLIED: &str = "socketioxide_mesh_commands_applied_total";
const BYTES_SENT: &str = "socketioxide_mesh_sent_bytes_total";
const BYTES_RECEIVED: &str = "socketioxide_mesh_received_bytes_total";
const BATCHES: &str = "socketioxide_mesh_batches_sent_total";
const DROPPED: &str = "socketioxide_mesh_messages_dropped_total";
const CUTOFFS: &str = "socketioxide_mesh_slow_peer_cutoffs_total";
const SYSCALLS: &str = "socketioxide_mesh_peer_syscalls_total";
const PROTOCOL_ERRORS: &str = "socketioxide_mesh_protocol_errors_total";
const REFUSED: &str = "socketioxide_mesh_connections_refused_total";
const DIALS_FAILED: &str = "socketioxide_mesh_dials_failed_total";
const QUERIES: &str = "socketioxide_mesh_queries_total";
const ROUTED_AWAY: &str = "socketioxide_mesh_broadcasts_routed_away_total";
const PROBES_UNANSWERED: &str = "socketioxide_mesh_probes_unanswered_total";
const DECLARED_DEAD: &str = "socketioxide_mesh_peers_declared_dead_total";
const REQUEST_DURATION: &str = "socketioxide_mesh_request_duration_seconds";

/// Describe every metric (units, help texts) to the recorder; idempotent.
pub(crate) fn describe() {
    describe_counter!(
        PROBES_UNANSWERED,
        "Liveness probes a peer left unanswered for the probe timeout (the peer was suspected)"
    );
    describe_counter!(
        DECLARED_DEAD,
        "Peers this node declared dead: probes unanswered twice, or a failed redial after \
         their connection closed"
    );
    describe_counter!(
        ROUTED_AWAY,
        "Room broadcasts not sent to a peer that announced no member in their rooms \
         (interest-based routing), one per broadcast and peer"
    );
    describe_gauge!(
        MEMBERS,
        "Members of the mesh, not counting this node, by state (live, dead: declared dead \
         lately, kept by gossip for their grace period)"
    );
    describe_gauge!(
        PEER_LINKS,
        "Links to peers by transport and state (connected, connecting)"
    );
    describe_gauge!(
        PEER_QUEUE_COMMANDS,
        "Commands waiting in a peer's queue, by peer node id"
    );
    describe_gauge!(
        PEER_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes waiting in a peer's queue, by peer node id"
    );
    describe_counter!(COMMANDS_SENT, "Commands written to peers");
    describe_counter!(
        COMMANDS_RECEIVED,
        "Commands received from peers and applied"
    );
    describe_counter!(
        BYTES_SENT,
        Unit::Bytes,
        "Bytes sent to peers, by kind (commands, gossip), before transport overhead"
    );
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "Bytes received from peers, by kind (commands, gossip)"
    );
    describe_counter!(BATCHES, "Stream writes that carried the commands sent");
    describe_counter!(
        DROPPED,
        "Messages dropped, by cause: socket_buffer_full, volatile_shed, peer_queue_dropped \
         (sender side), missed (receiver side)"
    );
    describe_counter!(CUTOFFS, "Peers cut off for not keeping up");
    describe_counter!(
        SYSCALLS,
        "System calls on peer sockets, by direction (send, recv)"
    );
    describe_counter!(
        PROTOCOL_ERRORS,
        "Connections closed because the peer broke the protocol"
    );
    describe_counter!(
        REFUSED,
        "Refused connections and failed dials, by reason (see MeshStats::incidents)"
    );
    describe_counter!(DIALS_FAILED, "Outgoing connections that failed");
    describe_counter!(
        QUERIES,
        "Requests from peers, by outcome (answered, refused)"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Requests to peers (fetch_sockets, rooms, broadcast_with_ack, server_event), by kind \
         and outcome (answered, peer_failed, timeout, abandoned)"
    );
}

/// One peer link, as the gauges see it.
pub(crate) struct LinkView {
    pub peer: String,
    pub connected: bool,
    pub queued: usize,
    pub queued_bytes: usize,
}

/// Copy the counters and gauges to the recorder.
pub(crate) fn publish(
    stats: &MeshStats,
    members: usize,
    dead: usize,
    transport: &'static str,
    links: &[LinkView],
) {
    gauge!(MEMBERS, "state" => "live").set(members as f64);
    gauge!(MEMBERS, "state" => "dead").set(dead as f64);
    let connected = links.iter().filter(|l| l.connected).count();
    gauge!(PEER_LINKS, "transport" => transport, "state" => "connected").set(connected as f64);
    gauge!(PEER_LINKS, "transport" => transport, "state" => "connecting")
        .set((links.len() - connected) as f64);
    for l in links {
        gauge!(PEER_QUEUE_COMMANDS, "peer" => l.peer.clone()).set(l.queued as f64);
        gauge!(PEER_QUEUE_BYTES, "peer" => l.peer.clone()).set(l.queued_bytes as f64);
    }
    counter!(COMMANDS_SENT).absolute(stats.commands_sent);
    counter!(COMMANDS_RECEIVED).absolute(stats.commands_received);
    for (kind, v) in &stats.commands_queued_by_kind {
        counter!(COMMANDS_QUEUED, "kind" => kind.clone()).absolute(*v);
    }
    for (kind, v) in &stats.commands_applied_by_kind {
        counter!(COMMANDS_APPLIED, "kind" => kind.clone()).absolute(*v);
    }
    counter!(BYTES_SENT, "kind" => "commands").absolute(stats.command_bytes_sent);
    counter!(BYTES_SENT, "kind" => "gossip").absolute(stats.gossip_bytes_sent);
    counter!(BYTES_RECEIVED, "kind" => "commands").absolute(stats.command_bytes_received);
    counter!(BYTES_RECEIVED, "kind" => "gossip").absolute(stats.gossip_bytes_received);
    counter!(BATCHES).absolute(stats.batches_sent);
    for (cause, v) in [
        ("socket_buffer_full", stats.socket_buffer_drops),
        ("volatile_shed", stats.volatile_dropped),
        ("peer_queue_dropped", stats.commands_lost),
        ("missed", stats.commands_missed),
    ] {
        counter!(DROPPED, "cause" => cause).absolute(v);
    }
    counter!(CUTOFFS).absolute(stats.slow_peer_cutoffs);
    counter!(SYSCALLS, "direction" => "send").absolute(stats.peer_send_calls);
    counter!(SYSCALLS, "direction" => "recv").absolute(stats.peer_recv_calls);
    counter!(PROTOCOL_ERRORS).absolute(stats.protocol_errors);
    let i = &stats.incidents;
    for (reason, v) in [
        ("refused_certificate", i.refused_certificate),
        ("certificate_rejected", i.certificate_rejected),
        ("not_a_peer", i.not_a_peer),
        ("refused_hello", i.refused_hello),
        ("hello_rejected", i.hello_rejected),
        ("handshake_timeout", i.handshake_timeouts),
        ("busy", i.busy),
        ("unreachable", i.unreachable),
    ] {
        counter!(REFUSED, "reason" => reason).absolute(v);
    }
    counter!(DIALS_FAILED).absolute(stats.dials_failed);
    counter!(QUERIES, "outcome" => "answered").absolute(stats.queries_answered);
    counter!(QUERIES, "outcome" => "refused").absolute(stats.queries_refused);
    counter!(ROUTED_AWAY).absolute(stats.broadcasts_routed_away);
    counter!(PROBES_UNANSWERED).absolute(stats.probes_unanswered);
    counter!(DECLARED_DEAD).absolute(stats.peers_declared_dead);
}

/// A request to peers ended.
pub(crate) fn request_ended(kind: &'static str, outcome: &'static str, took: Duration) {
    histogram!(REQUEST_DURATION, "kind" => kind, "outcome" => outcome).record(took.as_secs_f64());
}
