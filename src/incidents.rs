//! Incidents that outsiders or failing peers cause: refused connections, failed dials, lost
//! commands. Each is **counted exactly** (in [`MeshStats::incidents`](crate::MeshStats)) and
//! **logged without flooding**: the first of each (cause, remote address) at WARN with its
//! reason, later ones only in one summary line per cause and [`SUMMARY_EVERY`], with counts.
//!
//! ```text
//!   report(cause, addr, reason) ──► counts[cause] += 1 (always)
//!            │
//!            ├─ (cause, ip) not seen lately, fewer than FIRSTS_PER_WINDOW lines ─► WARN reason
//!            └─ else ─► pending[cause] += 1 ──(every SUMMARY_EVERY)──► WARN "N more …"
//! ```
//!
//! An attacker opening 10⁴ garbage connections from one address makes one line with its reason
//! and one summary line per interval, however fast it goes.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How often suppressed incidents are summarised.
pub(crate) const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// How long a (cause, address) stays "seen" before its next occurrence is logged in full again.
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// Full lines per cause within one `FORGET_AFTER` window, whatever the number of addresses.
const FIRSTS_PER_WINDOW: usize = 16;
/// Distinct addresses remembered per cause in a summary (beyond, "many").
const ADDRS_PER_SUMMARY: usize = 1024;

/// What happened. The order is the order of [`IncidentCounts`]' fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Incident {
    /// We refused a peer's certificate (on a connection it opened or one we dialed).
    RefusedCertificate,
    /// The peer refused our certificate.
    CertificateRejected,
    /// Not a mesh peer: not TLS, wrong ALPN, bad magic, malformed hello.
    NotAPeer,
    /// We refused the peer's hello (other cluster, protocol version, ...).
    RefusedHello,
    /// The peer refused our hello.
    HelloRejected,
    /// A handshake did not finish in time.
    HandshakeTimeout,
    /// Too many handshakes were in progress: a connection was turned away.
    Busy,
    /// A dial failed before any TLS: nothing listening, no route, timed out.
    Unreachable,
    /// Dials to a member declared dead were stopped.
    DeadMember,
    /// Packets of peers' broadcasts that local sockets could not take (buffer full).
    SocketBufferFull,
    /// Commands a peer sent that never arrived (a connection broke with them in flight).
    CommandsMissed,
    /// Commands queued to a peer and dropped: it was cut off or is gone.
    CommandsDropped,
    /// Volatile broadcasts not queued to a peer that fell behind.
    VolatileShed,
    /// Server events dropped: the handler did not keep up with a peer.
    ServerEventsDropped,
}

impl Incident {
    const ALL: [Incident; 14] = [
        Incident::RefusedCertificate,
        Incident::CertificateRejected,
        Incident::NotAPeer,
        Incident::RefusedHello,
        Incident::HelloRejected,
        Incident::HandshakeTimeout,
        Incident::Busy,
        Incident::Unreachable,
        Incident::DeadMember,
        Incident::SocketBufferFull,
        Incident::CommandsMissed,
        Incident::CommandsDropped,
        Incident::VolatileShed,
        Incident::ServerEventsDropped,
    ];

    /// The log message: says which side refused.
    fn message(self) -> &'static str {
        match self {
            Incident::RefusedCertificate => "refused peer: its certificate is not accepted",
            Incident::CertificateRejected => "peer rejected our certificate",
            Incident::NotAPeer => "refused connection: not a mesh peer",
            Incident::RefusedHello => "refused peer: its handshake is not accepted",
            Incident::HelloRejected => "peer refused our handshake",
            Incident::HandshakeTimeout => "peer handshake timed out",
            Incident::Busy => "too many handshakes in progress: connection turned away",
            Incident::Unreachable => "peer unreachable",
            Incident::DeadMember => "member declared dead: no more dials to it",
            Incident::SocketBufferFull => {
                "local sockets' buffers were full: packets of peers' broadcasts dropped \
                 (raise socketioxide's max_buffer_size)"
            }
            Incident::CommandsMissed => {
                "commands from a peer never arrived: a connection broke with them in flight"
            }
            Incident::CommandsDropped => "commands to a peer dropped: it was cut off or is gone",
            Incident::VolatileShed => "volatile broadcasts dropped: a peer fell behind",
            Incident::ServerEventsDropped => {
                "server events dropped: the server event handler does not keep up"
            }
        }
    }
}

/// Exact counts of incidents since the node started ([`MeshStats::incidents`](crate::MeshStats)).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct IncidentCounts {
    /// Peers whose certificate this node refused (not from the cluster CA, not a node
    /// certificate, expired...), on connections they opened or this node dialed.
    pub refused_certificate: u64,
    /// Connections on which the peer refused this node's certificate.
    pub certificate_rejected: u64,
    /// Connections that were not a mesh peer (not TLS, wrong protocol, malformed hello).
    pub not_a_peer: u64,
    /// Peers whose hello this node refused (another cluster, unsupported version).
    pub refused_hello: u64,
    /// Connections on which the peer refused this node's hello.
    pub hello_rejected: u64,
    /// Handshakes (TLS or hello) that did not finish within `connect_timeout`.
    pub handshake_timeouts: u64,
    /// Connections turned away because too many handshakes were in progress.
    pub busy: u64,
    /// Dials that reached nobody (nothing listening, no route, timed out).
    pub unreachable: u64,
    /// Members declared dead, whose address this node stopped dialing.
    pub dead_members: u64,
}

/// The incident counters and the log limiter of one node.
#[derive(Debug)]
pub(crate) struct Incidents {
    counts: [AtomicU64; Incident::ALL.len()],
    /// Incoming connections refused, whatever the cause.
    inbound: AtomicU64,
    log: Mutex<Limiter>,
}

impl Default for Incidents {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Incidents {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            counts: Default::default(),
            inbound: AtomicU64::new(0),
            log: Mutex::new(Limiter::new(now)),
        }
    }

    /// Count an incident and log it unless one like it was logged lately.
    pub(crate) fn report(&self, incident: Incident, remote: SocketAddr, reason: &dyn fmt::Display) {
        self.counts[incident as usize].fetch_add(1, Ordering::Relaxed);
        let first = self.log.lock().unwrap_or_else(|e| e.into_inner()).admit(
            Instant::now(),
            incident,
            remote.ip(),
        );
        if first {
            tracing::warn!(%remote, reason = %reason, "{}", incident.message());
        }
    }

    /// Log a loss of `n` messages (counted by the caller in [`MeshStats`](crate::MeshStats)),
    /// rate-limited like the incidents; `peer` is `None` for a local cause.
    pub(crate) fn note_loss(
        &self,
        incident: Incident,
        peer: Option<SocketAddr>,
        n: u64,
        reason: &dyn fmt::Display,
    ) {
        let ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        let first = self.log.lock().unwrap_or_else(|e| e.into_inner()).admit_n(
            Instant::now(),
            incident,
            ip,
            n,
        );
        if first {
            match peer {
                Some(peer) => tracing::warn!(%peer, lost = n, %reason, "{}", incident.message()),
                None => tracing::warn!(lost = n, %reason, "{}", incident.message()),
            }
        }
    }

    /// [`report`](Self::report) an incident that refused an incoming connection.
    pub(crate) fn report_inbound(
        &self,
        incident: Incident,
        remote: SocketAddr,
        reason: &dyn fmt::Display,
    ) {
        self.inbound.fetch_add(1, Ordering::Relaxed);
        self.report(incident, remote, reason);
    }

    /// Incoming connections refused since the start.
    pub(crate) fn inbound_refused(&self) -> u64 {
        self.inbound.load(Ordering::Relaxed)
    }

    /// Log one summary line per cause with suppressed incidents; call every [`SUMMARY_EVERY`].
    pub(crate) fn summarize(&self) {
        let lines = self.log.lock().unwrap_or_else(|e| e.into_inner()).drain();
        for s in lines {
            tracing::warn!(
                count = s.count,
                addresses = %s.addresses,
                "{} ({} more in the last {:?}, not logged one by one)",
                s.incident.message(),
                s.count,
                SUMMARY_EVERY
            );
        }
    }

    /// The exact counts.
    pub(crate) fn counts(&self) -> IncidentCounts {
        let c = |i: Incident| self.counts[i as usize].load(Ordering::Relaxed);
        IncidentCounts {
            refused_certificate: c(Incident::RefusedCertificate),
            certificate_rejected: c(Incident::CertificateRejected),
            not_a_peer: c(Incident::NotAPeer),
            refused_hello: c(Incident::RefusedHello),
            hello_rejected: c(Incident::HelloRejected),
            handshake_timeouts: c(Incident::HandshakeTimeout),
            busy: c(Incident::Busy),
            unreachable: c(Incident::Unreachable),
            dead_members: c(Incident::DeadMember),
        }
    }
}

/// Which incidents get a line of their own (sans-IO: the clock is passed in).
#[derive(Debug)]
struct Limiter {
    seen: HashSet<(Incident, IpAddr)>,
    firsts: [usize; Incident::ALL.len()],
    window_start: Instant,
    pending: [u64; Incident::ALL.len()],
    pending_addrs: [HashSet<IpAddr>; Incident::ALL.len()],
}

/// One summary line.
#[derive(Debug, PartialEq)]
struct Summary {
    incident: Incident,
    count: u64,
    addresses: String,
}

impl Limiter {
    fn new(now: Instant) -> Self {
        Self {
            seen: HashSet::new(),
            firsts: [0; Incident::ALL.len()],
            window_start: now,
            pending: [0; Incident::ALL.len()],
            pending_addrs: Default::default(),
        }
    }

    /// Whether this occurrence gets a full line; if not, it is kept for the summary.
    fn admit(&mut self, now: Instant, incident: Incident, ip: IpAddr) -> bool {
        self.admit_n(now, incident, ip, 1)
    }

    /// [`admit`](Self::admit) for an occurrence that stands for `n` events.
    fn admit_n(&mut self, now: Instant, incident: Incident, ip: IpAddr, n: u64) -> bool {
        if now.duration_since(self.window_start) >= FORGET_AFTER {
            self.seen.clear();
            self.firsts = [0; Incident::ALL.len()];
            self.window_start = now;
        }
        let i = incident as usize;
        if self.firsts[i] < FIRSTS_PER_WINDOW && self.seen.insert((incident, ip)) {
            self.firsts[i] += 1;
            return true;
        }
        self.pending[i] += n;
        if self.pending_addrs[i].len() < ADDRS_PER_SUMMARY {
            self.pending_addrs[i].insert(ip);
        }
        false
    }

    /// The summaries of what was held back since the last call.
    fn drain(&mut self) -> Vec<Summary> {
        let mut out = Vec::new();
        for incident in Incident::ALL {
            let i = incident as usize;
            if self.pending[i] == 0 {
                continue;
            }
            let addrs = std::mem::take(&mut self.pending_addrs[i]);
            let addresses = if addrs.len() >= ADDRS_PER_SUMMARY {
                format!("{ADDRS_PER_SUMMARY}+ addresses")
            } else if addrs.len() <= 3 {
                addrs
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                format!("{} addresses", addrs.len())
            };
            out.push(Summary {
                incident,
                count: std::mem::take(&mut self.pending[i]),
                addresses,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_line_per_cause_and_address_then_a_summary() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        let logged = (0..10_000)
            .filter(|_| l.admit(t0, Incident::NotAPeer, ip(1)))
            .count();
        assert_eq!(logged, 1);
        // Another cause from the same address, and the same cause from another address.
        assert!(l.admit(t0, Incident::Busy, ip(1)));
        assert!(l.admit(t0, Incident::NotAPeer, ip(2)));
        assert_eq!(
            l.drain(),
            vec![Summary {
                incident: Incident::NotAPeer,
                count: 9_999,
                addresses: "10.0.0.1".into(),
            }]
        );
        assert!(l.drain().is_empty(), "a summary is said once");
    }

    #[test]
    fn many_addresses_get_a_bounded_number_of_lines() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        let logged = (0..=255u8)
            .filter(|i| l.admit(t0, Incident::RefusedCertificate, ip(*i)))
            .count();
        assert_eq!(logged, FIRSTS_PER_WINDOW);
        let s = l.drain();
        assert_eq!(s[0].count, 256 - FIRSTS_PER_WINDOW as u64);
        assert_eq!(
            s[0].addresses,
            format!("{} addresses", 256 - FIRSTS_PER_WINDOW)
        );
    }

    #[test]
    fn a_cause_is_told_in_full_again_after_a_while() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        assert!(l.admit(t0, Incident::Unreachable, ip(1)));
        assert!(!l.admit(t0 + FORGET_AFTER / 2, Incident::Unreachable, ip(1)));
        assert!(l.admit(t0 + FORGET_AFTER, Incident::Unreachable, ip(1)));
    }

    #[test]
    fn counts_are_exact_whatever_is_logged() {
        let incidents = Incidents::default();
        let addr = SocketAddr::from(([10, 0, 0, 1], 1));
        for _ in 0..500 {
            incidents.report(Incident::NotAPeer, addr, &"garbage");
        }
        incidents.report_inbound(Incident::Busy, addr, &"full");
        let c = incidents.counts();
        assert_eq!((c.not_a_peer, c.busy, c.refused_certificate), (500, 1, 0));
        assert_eq!(incidents.inbound_refused(), 1);
    }
}
