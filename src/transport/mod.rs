//! Peer transports: authenticated connections that carry *frames* on multiplexed *streams*.
//!
//! A transport knows nothing of messages: it moves length-delimited byte strings, enforces the
//! frame size limit and authenticates peers (mutual TLS). The protocol on top lives in
//! [`crate::wire`]. Every transport passes one test suite (`suite.rs`): the in-memory twin
//! (`mem`), QUIC ([`quic`]) and WebSocket ([`ws`]).

pub(crate) mod frame;
#[cfg(test)]
pub(crate) mod mem;
pub(crate) mod quic;
#[cfg(test)]
mod suite;
pub(crate) mod ws;

use std::{
    fmt,
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use bytes::Bytes;

use crate::incidents::{Incident, Incidents};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};

/// The close codes are part of the peer protocol (`wire`); transports carry them.
pub(crate) use crate::wire::CloseCode;

/// A transport failure. The message is meant for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TransportError {
    /// The connection is closed; `code` is set when the peer or we closed it on purpose.
    #[error("connection closed{}: {reason}", code.map(|c| format!(" ({c:?})")).unwrap_or_default())]
    Closed {
        code: Option<CloseCode>,
        reason: String,
    },
    /// A frame is larger than the limit.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { size: u64, max: usize },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Connecting failed (unreachable, TLS refused, timeout...).
    #[error("connect: {0}")]
    Connect(String),
    /// The endpoint is closed.
    #[error("endpoint closed")]
    EndpointClosed,
    /// Any other I/O failure on a stream.
    #[error("{0}")]
    Io(String),
}

/// Dispatch a call to the transport behind one of this module's enums. Static dispatch: no
/// boxed future per call on the data path.
macro_rules! dispatch {
    ($value:expr, $inner:ident => $call:expr) => {
        match $value {
            Self::Quic($inner) => $call,
            Self::Ws($inner) => $call,
            #[cfg(test)]
            Self::Mem($inner) => $call,
        }
    };
}

/// System calls made on an endpoint's sockets, counted where they are made (the data path's
/// cost is counted in calls, not only in bytes).
#[derive(Debug, Default)]
pub(crate) struct IoCounters {
    /// Calls that write to a peer socket (`sendmsg`/`sendmmsg` for QUIC, `write`/`writev` for
    /// WebSocket).
    pub send_calls: AtomicU64,
    /// Calls that read from a peer socket (`recvmsg`/`recvmmsg`, `read`).
    pub recv_calls: AtomicU64,
}

/// Opens and accepts authenticated connections on one local address.
pub(crate) enum Endpoint {
    Quic(quic::QuicTransport),
    Ws(ws::WsTransport),
    #[cfg(test)]
    Mem(mem::MemTransport),
}

impl Endpoint {
    /// The bound address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        dispatch!(self, t => t.local_addr())
    }

    /// Dial a peer; returns once the (mutually authenticated) connection is up.
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<Conn, TransportError> {
        dispatch!(self, t => t.connect(addr).await)
    }

    /// The next incoming connection; `Err(EndpointClosed)` once closed. Failed handshakes
    /// (bad certificates) are logged inside and never returned.
    pub(crate) async fn accept(&self) -> Result<Conn, TransportError> {
        dispatch!(self, t => t.accept().await)
    }

    /// Close the endpoint and every connection.
    pub(crate) fn close(&self) {
        dispatch!(self, t => t.close())
    }

    /// Where the endpoint counts and logs refused connections (shared with the mesh).
    pub(crate) fn incidents(&self) -> &Arc<Incidents> {
        dispatch!(self, t => t.incidents())
    }

    /// Use new TLS material (rotated certificates) for connections from now on; open
    /// connections keep theirs.
    pub(crate) fn reload_tls(&self, tls: &crate::TlsConfig) -> Result<(), crate::Error> {
        dispatch!(self, t => t.reload_tls(tls))
    }

    /// Connections closed by the transport itself for a protocol violation (the WebSocket
    /// multiplexer's own framing); violations above the transport are counted by the mesh.
    pub(crate) fn protocol_errors(&self) -> u64 {
        dispatch!(self, t => t.protocol_errors())
    }

    /// System calls on this endpoint's sockets so far.
    pub(crate) fn io(&self) -> &IoCounters {
        dispatch!(self, t => t.io())
    }
}

/// One authenticated connection to a peer. Cheap to clone (a handle).
#[derive(Clone)]
pub(crate) enum Conn {
    Quic(quic::QuicConn),
    Ws(ws::WsConn),
    #[cfg(test)]
    Mem(mem::MemConn),
}

impl Conn {
    /// A process-unique id.
    pub(crate) fn id(&self) -> u64 {
        dispatch!(self, c => c.id())
    }

    /// The remote socket address (not necessarily its advertised address).
    pub(crate) fn remote_addr(&self) -> SocketAddr {
        dispatch!(self, c => c.remote_addr())
    }

    /// The transport's round-trip time estimate, where it keeps one (QUIC).
    pub(crate) fn rtt(&self) -> Option<std::time::Duration> {
        match self {
            Conn::Quic(c) => Some(c.rtt()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Open a bidirectional stream.
    pub(crate) async fn open_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        dispatch!(self, c => c.open_bi().await)
    }

    /// Accept the next bidirectional stream opened by the peer.
    pub(crate) async fn accept_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        dispatch!(self, c => c.accept_bi().await)
    }

    /// Open a unidirectional stream.
    pub(crate) async fn open_uni(&self) -> Result<SendStream, TransportError> {
        dispatch!(self, c => c.open_uni().await)
    }

    /// Accept the next unidirectional stream opened by the peer.
    pub(crate) async fn accept_uni(&self) -> Result<RecvStream, TransportError> {
        dispatch!(self, c => c.accept_uni().await)
    }

    /// Close the connection; pending streams fail at once on both sides.
    pub(crate) fn close(&self, code: CloseCode, reason: &str) {
        dispatch!(self, c => c.close(code, reason))
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Conn#{}({})", self.id(), self.remote_addr())
    }
}

/// The sending half of a stream.
pub(crate) enum SendStream {
    Quic(quic::QuicSend),
    Ws(ws::WsSend),
    #[cfg(test)]
    Mem(mem::MemSend),
}

impl SendStream {
    /// Send one frame (waits for flow control).
    pub(crate) async fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        self.send_batch(std::slice::from_ref(&frame)).await
    }

    /// Send frames in order with as few writes as the transport allows (one, usually). Either
    /// every frame is refused (one is over the limit) or they are all handed over in order.
    pub(crate) async fn send_batch(&mut self, frames: &[Bytes]) -> Result<(), TransportError> {
        dispatch!(self, s => s.send_batch(frames).await)
    }

    /// Signal the end of the stream; frames sent before are still delivered.
    pub(crate) fn finish(&mut self) {
        dispatch!(self, s => s.finish())
    }
}

/// The receiving half of a stream.
pub(crate) enum RecvStream {
    Quic(quic::QuicRecv),
    Ws(ws::WsRecv),
    #[cfg(test)]
    Mem(mem::MemRecv),
}

impl RecvStream {
    /// The next frame, or `None` when the peer finished the stream.
    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        dispatch!(self, r => r.recv().await)
    }

    /// A frame that already arrived, without waiting; `None` when none is ready yet (the end
    /// of the stream and errors show on the next [`recv`](Self::recv)). Lets a reader apply
    /// everything a batch brought before it publishes its progress.
    pub(crate) fn try_recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        dispatch!(self, r => r.try_recv())
    }
}

/// Settings every transport honours.
#[derive(Debug, Clone)]
pub(crate) struct TransportSettings {
    /// Where refused connections are counted and logged (rate-limited).
    pub incidents: Arc<Incidents>,
    pub max_frame_size: usize,
    pub max_concurrent_streams: u32,
    pub keep_alive_interval: std::time::Duration,
    pub idle_timeout: std::time::Duration,
    pub connect_timeout: std::time::Duration,
}

/// The cause of a failed connection, from the error's text (quinn's and rustls' messages,
/// which carry the TLS alert and who sent it). `dialing`: the failure is of a connection this
/// node opened, where "nothing answered" means unreachable rather than a stalled handshake.
/// `None`: not an incident (the connection lost a race to another one between the same nodes,
/// or a peer going away).
pub(crate) fn classify(error: &str, dialing: bool) -> Option<Incident> {
    let e = error.to_ascii_lowercase();
    let benign = [
        "(replaced)",
        "(peerdead)",
        "(leaving)",
        "the application or application protocol caused the connection to be closed",
    ];
    if benign.iter().any(|b| e.contains(b)) {
        return None;
    }
    let by_peer = e.contains("by peer") || e.contains("received fatal alert");
    let certificate = e.contains("certificate")
        || ["42", "43", "44", "45", "46", "48", "116"]
            .iter()
            .any(|alert| e.contains(&format!("error {alert}:")));
    Some(
        if e.contains("no application protocol")
            || e.contains("noapplicationprotocol")
            || e.contains("error 120")
        {
            Incident::NotAPeer
        } else if certificate && by_peer {
            Incident::CertificateRejected
        } else if certificate {
            Incident::RefusedCertificate
        } else if e.contains("timed out") {
            if dialing {
                Incident::Unreachable
            } else {
                Incident::HandshakeTimeout
            }
        } else if dialing
            && [
                "connection refused",
                "unreachable",
                "no route",
                "reset by peer",
                "os error",
            ]
            .iter()
            .any(|p| e.contains(p))
        {
            Incident::Unreachable
        } else {
            Incident::NotAPeer
        },
    )
}

/// Handshakes of incoming connections at once; more are refused.
pub(crate) const MAX_PENDING_HANDSHAKES: usize = 64;

/// Incoming handshakes in progress, bounded and timed, so a slow or hostile client can neither
/// hold up the others nor make the node start unbounded work. Owned by a transport's accept
/// loop: dropping it aborts the handshakes in progress.
pub(crate) struct Handshakes<C> {
    permits: Arc<Semaphore>,
    tasks: JoinSet<()>,
    accepted: mpsc::Sender<C>,
    incidents: Arc<Incidents>,
    timeout: Duration,
}

impl<C: Send + 'static> Handshakes<C> {
    pub(crate) fn new(
        accepted: mpsc::Sender<C>,
        incidents: Arc<Incidents>,
        timeout: Duration,
    ) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            tasks: JoinSet::new(),
            accepted,
            incidents,
            timeout,
        }
    }

    /// Whether another handshake may start now; if not, the connection from `remote` is
    /// counted and logged as turned away (the caller closes it).
    pub(crate) fn has_room(&self, remote: SocketAddr) -> bool {
        let room = self.permits.available_permits() > 0;
        if !room {
            self.incidents
                .report_inbound(Incident::Busy, remote, &"too many pending handshakes");
        }
        room
    }

    /// Run `handshake` (bounded by the timeout); a success is handed to `accept`, a failure
    /// is counted and logged (rate-limited) with its cause. Returns false, starting nothing,
    /// when too many are in progress.
    pub(crate) fn start<F>(&mut self, remote: SocketAddr, handshake: F) -> bool
    where
        F: Future<Output = Result<C, String>> + Send + 'static,
    {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.incidents
                .report_inbound(Incident::Busy, remote, &"too many pending handshakes");
            return false;
        };
        let (accepted, incidents, timeout) =
            (self.accepted.clone(), self.incidents.clone(), self.timeout);
        self.tasks.spawn(async move {
            let result = tokio::time::timeout(timeout, handshake).await;
            drop(permit);
            match result {
                Ok(Ok(conn)) => {
                    if accepted.send(conn).await.is_err() {
                        tracing::debug!("transport dropped, discarding accepted connection");
                    }
                }
                Ok(Err(e)) => match classify(&e, false) {
                    Some(incident) => incidents.report_inbound(incident, remote, &e),
                    None => tracing::debug!(%remote, error = %e, "inbound handshake ended"),
                },
                Err(_) => {
                    incidents.report_inbound(Incident::HandshakeTimeout, remote, &"TLS handshake")
                }
            }
        });
        true
    }

    /// Collect finished handshakes; never resolves while none is running.
    pub(crate) async fn reap(&mut self) {
        if self.tasks.join_next().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn failures_are_told_apart_by_who_refused_what() {
        let cases = [
            // Messages seen on this machine (quinn, rustls, tokio-rustls, tungstenite, std).
            (
                "tls: the cryptographic handshake failed: error 42: invalid peer certificate: certificate not valid for name \"x\"",
                false,
                Incident::RefusedCertificate,
            ),
            (
                "tls: aborted by peer: the cryptographic handshake failed: error 45: invalid peer certificate: certificate expired",
                false,
                Incident::CertificateRejected,
            ),
            (
                "transport: connection closed: aborted by peer: the cryptographic handshake failed: error 43: invalid peer certificate: certificate does not allow extended key usage",
                true,
                Incident::CertificateRejected,
            ),
            (
                "transport: connect: the cryptographic handshake failed: error 48: invalid peer certificate: UnknownIssuer",
                true,
                Incident::RefusedCertificate,
            ),
            (
                "tls: peer sent no certificates",
                false,
                Incident::RefusedCertificate,
            ),
            (
                "transport: connection closed: received fatal alert: BadCertificate",
                true,
                Incident::CertificateRejected,
            ),
            (
                "tls: received corrupt message of type InvalidContentType",
                false,
                Incident::NotAPeer,
            ),
            (
                "tls: aborted by peer: the cryptographic handshake failed: error 120: peer doesn't support any known protocol",
                false,
                Incident::NotAPeer,
            ),
            (
                "websocket: HTTP format error: invalid HTTP method parsed",
                false,
                Incident::NotAPeer,
            ),
            (
                "transport: connect: timed out dialing 10.0.0.1:4000",
                true,
                Incident::Unreachable,
            ),
            (
                "transport: connect: Connection refused (os error 111)",
                true,
                Incident::Unreachable,
            ),
            ("timed out", false, Incident::HandshakeTimeout),
        ];
        for (text, dialing, want) in cases {
            assert_eq!(classify(text, dialing), Some(want), "{text}");
        }
        // Races between two connections of the same nodes, peers going away: not incidents.
        for text in [
            "transport: connection closed (Replaced): replaced by another connection",
            "transport: connection closed (PeerDead): peer declared dead",
            "tls: aborted by peer: the application or application protocol caused the connection to be closed during the handshake",
        ] {
            assert_eq!(classify(text, true), None, "{text}");
        }
    }
}
