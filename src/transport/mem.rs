//! In-memory twin of the transports, for fast tests: same trait, frames copied through bounded
//! channels, the frame limit enforced, peers "authenticated" by the name of the CA that issued
//! their identity, and links that can be cut to simulate partitions.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::{Mutex as AsyncMutex, mpsc, watch};

use super::{CloseCode, Conn, IoCounters, RecvStream, SendStream, TransportError};

static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 48);
const STREAM_BUFFER: usize = 32;

/// Who a mem endpoint is: the CA that issued its identity and the CA it trusts.
#[derive(Debug, Clone)]
pub(crate) struct MemIdentity {
    pub issued_by: String,
    pub trusts: String,
}

/// A virtual network of mem endpoints.
#[derive(Clone, Default)]
pub(crate) struct MemNetwork {
    inner: Arc<Mutex<NetInner>>,
}

#[derive(Default)]
struct NetInner {
    next_port: u16,
    endpoints: HashMap<SocketAddr, Endpoint>,
    cut: HashSet<(SocketAddr, SocketAddr)>,
    conns: Vec<(SocketAddr, SocketAddr, MemConn)>,
}

#[derive(Clone)]
struct Endpoint {
    identity: MemIdentity,
    max_frame: usize,
    incoming: mpsc::Sender<MemConn>,
}

impl MemNetwork {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Bind an endpoint on `127.0.0.1:<next port>`.
    pub(crate) fn bind(&self, identity: MemIdentity, max_frame: usize) -> MemTransport {
        let mut net = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        net.next_port += 1;
        let addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + net.next_port));
        let (tx, rx) = mpsc::channel(64);
        net.endpoints.insert(
            addr,
            Endpoint {
                identity: identity.clone(),
                max_frame,
                incoming: tx,
            },
        );
        MemTransport {
            net: self.clone(),
            addr,
            identity,
            max_frame,
            incoming: AsyncMutex::new(rx),
            io: IoCounters::default(),
            incidents: Default::default(),
        }
    }

    /// Cut the link between two endpoints: open connections close, new ones fail.
    pub(crate) fn cut(&self, a: SocketAddr, b: SocketAddr) {
        let mut net = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        net.cut.insert((a, b));
        net.cut.insert((b, a));
        net.conns.retain(|(x, y, conn)| {
            let hit = (*x == a && *y == b) || (*x == b && *y == a);
            if hit {
                conn.shared.set_closed(TransportError::Closed {
                    code: None,
                    reason: "link cut".into(),
                });
            }
            !hit
        });
    }

    /// Restore a cut link.
    pub(crate) fn heal(&self, a: SocketAddr, b: SocketAddr) {
        let mut net = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        net.cut.remove(&(a, b));
        net.cut.remove(&(b, a));
    }
}

pub(crate) struct MemTransport {
    net: MemNetwork,
    addr: SocketAddr,
    identity: MemIdentity,
    max_frame: usize,
    incoming: AsyncMutex<mpsc::Receiver<MemConn>>,
    /// Always zero: no system call is made.
    io: IoCounters,
    incidents: std::sync::Arc<crate::incidents::Incidents>,
}

impl MemTransport {
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<Conn, TransportError> {
        let (local, remote) = {
            let mut net = self.net.inner.lock().unwrap_or_else(|e| e.into_inner());
            if net.cut.contains(&(self.addr, addr)) {
                return Err(TransportError::Connect(format!(
                    "{addr} unreachable (link cut)"
                )));
            }
            let peer = net
                .endpoints
                .get(&addr)
                .cloned()
                .ok_or_else(|| TransportError::Connect(format!("{addr} unreachable")))?;
            if peer.identity.trusts != self.identity.issued_by {
                // Like TLS 1.3: the client learns of its refusal when it uses the connection.
                let (local, _remote) =
                    MemConn::pair(self.addr, addr, self.max_frame, self.max_frame);
                local.shared.set_closed(TransportError::Closed {
                    code: None,
                    reason: "rejected by peer: bad certificate".into(),
                });
                return Ok(Conn::Mem(local));
            }
            if self.identity.trusts != peer.identity.issued_by {
                return Err(TransportError::Connect("invalid peer certificate".into()));
            }
            let (local, remote) = MemConn::pair(self.addr, addr, self.max_frame, peer.max_frame);
            net.conns.push((self.addr, addr, local.clone()));
            (local, (peer, remote))
        };
        let (peer, remote) = remote;
        peer.incoming
            .send(remote)
            .await
            .map_err(|_| TransportError::Connect(format!("{addr} closed")))?;
        Ok(Conn::Mem(local))
    }

    pub(crate) async fn accept(&self) -> Result<Conn, TransportError> {
        match self.incoming.lock().await.recv().await {
            Some(conn) => Ok(Conn::Mem(conn)),
            None => Err(TransportError::EndpointClosed),
        }
    }

    pub(crate) fn incidents(&self) -> &std::sync::Arc<crate::incidents::Incidents> {
        &self.incidents
    }

    pub(crate) fn reload_tls(&self, _tls: &crate::TlsConfig) -> Result<(), crate::Error> {
        Ok(())
    }

    pub(crate) fn protocol_errors(&self) -> u64 {
        0
    }

    pub(crate) fn io(&self) -> &IoCounters {
        &self.io
    }

    pub(crate) fn close(&self) {
        let mut net = self.net.inner.lock().unwrap_or_else(|e| e.into_inner());
        net.endpoints.remove(&self.addr);
        let me = self.addr;
        net.conns.retain(|(x, y, conn)| {
            let hit = *x == me || *y == me;
            if hit {
                conn.close(CloseCode::Leaving, "endpoint closed");
            }
            !hit
        });
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        self.close();
    }
}

/// State shared by both ends of a connection.
struct Shared {
    closed_tx: watch::Sender<Option<(TransportError, TransportError)>>,
}

impl Shared {
    fn set_closed(&self, err: TransportError) {
        self.closed_tx.send_if_modified(|v| {
            if v.is_some() {
                return false;
            }
            *v = Some((err.clone(), err));
            true
        });
    }
}

#[derive(Clone)]
pub(crate) struct MemConn {
    id: u64,
    side: usize,
    remote: SocketAddr,
    max_frame: usize,
    shared: Arc<Shared>,
    open_bi_tx: mpsc::Sender<(MemSend, MemRecv)>,
    open_uni_tx: mpsc::Sender<MemRecv>,
    accept_bi_rx: Arc<AsyncMutex<mpsc::Receiver<(MemSend, MemRecv)>>>,
    accept_uni_rx: Arc<AsyncMutex<mpsc::Receiver<MemRecv>>>,
}

impl MemConn {
    fn pair(a: SocketAddr, b: SocketAddr, max_a: usize, max_b: usize) -> (MemConn, MemConn) {
        let (closed_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared { closed_tx });
        let (bi_ab_tx, bi_ab_rx) = mpsc::channel(1024);
        let (bi_ba_tx, bi_ba_rx) = mpsc::channel(1024);
        let (uni_ab_tx, uni_ab_rx) = mpsc::channel(16);
        let (uni_ba_tx, uni_ba_rx) = mpsc::channel(16);
        let id = NEXT_ID.fetch_add(2, Ordering::Relaxed);
        let conn_a = MemConn {
            id,
            side: 0,
            remote: b,
            max_frame: max_a,
            shared: shared.clone(),
            open_bi_tx: bi_ab_tx,
            open_uni_tx: uni_ab_tx,
            accept_bi_rx: Arc::new(AsyncMutex::new(bi_ba_rx)),
            accept_uni_rx: Arc::new(AsyncMutex::new(uni_ba_rx)),
        };
        let conn_b = MemConn {
            id: id + 1,
            side: 1,
            remote: a,
            max_frame: max_b,
            shared,
            open_bi_tx: bi_ba_tx,
            open_uni_tx: uni_ba_tx,
            accept_bi_rx: Arc::new(AsyncMutex::new(bi_ab_rx)),
            accept_uni_rx: Arc::new(AsyncMutex::new(uni_ab_rx)),
        };
        (conn_a, conn_b)
    }

    fn closed_error(&self) -> Option<TransportError> {
        self.shared
            .closed_tx
            .borrow()
            .as_ref()
            .map(|(a, b)| if self.side == 0 { a.clone() } else { b.clone() })
    }

    async fn wait_closed(shared: &Shared, side: usize) -> TransportError {
        let mut rx = shared.closed_tx.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => match v.as_ref() {
                Some((a, b)) => {
                    if side == 0 {
                        a.clone()
                    } else {
                        b.clone()
                    }
                }
                None => TransportError::EndpointClosed,
            },
            Err(_) => TransportError::EndpointClosed,
        }
    }

    /// A stream whose send half is held by `send_side` and receive half by the other side.
    fn stream(&self, send_side: usize, send_max: usize, recv_max: usize) -> (MemSend, MemRecv) {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let fin = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (
            MemSend {
                tx: Some(tx),
                fin: fin.clone(),
                shared: self.shared.clone(),
                side: send_side,
                max_frame: send_max,
            },
            MemRecv {
                rx,
                fin,
                shared: self.shared.clone(),
                side: 1 - send_side,
                max_frame: recv_max,
            },
        )
    }
}

impl MemConn {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    pub(crate) async fn open_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let other = 1 - self.side;
        // Our frames out: checked against our limit; the acceptor sets its receive limit.
        let (send_out, recv_out) = self.stream(self.side, self.max_frame, usize::MAX);
        let (send_back, recv_back) = self.stream(other, usize::MAX, self.max_frame);
        self.open_bi_tx
            .send((send_back, recv_out))
            .await
            .map_err(|_| {
                self.closed_error()
                    .unwrap_or(TransportError::EndpointClosed)
            })?;
        Ok((SendStream::Mem(send_out), RecvStream::Mem(recv_back)))
    }

    pub(crate) async fn accept_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let mut rx = self.accept_bi_rx.lock().await;
        tokio::select! {
            biased; // streams already opened are delivered before the close
            got = rx.recv() => match got {
                Some((s, mut r)) => {
                    r.max_frame = self.max_frame;
                    Ok((SendStream::Mem(s), RecvStream::Mem(r)))
                }
                None => Err(self.closed_error().unwrap_or(TransportError::EndpointClosed)),
            },
            e = Self::wait_closed(&self.shared, self.side) => Err(e),
        }
    }

    pub(crate) async fn open_uni(&self) -> Result<SendStream, TransportError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let (send, recv) = self.stream(self.side, self.max_frame, usize::MAX);
        self.open_uni_tx.send(recv).await.map_err(|_| {
            self.closed_error()
                .unwrap_or(TransportError::EndpointClosed)
        })?;
        Ok(SendStream::Mem(send))
    }

    pub(crate) async fn accept_uni(&self) -> Result<RecvStream, TransportError> {
        let mut rx = self.accept_uni_rx.lock().await;
        tokio::select! {
            biased; // streams already opened are delivered before the close
            got = rx.recv() => match got {
                Some(mut r) => {
                    r.max_frame = self.max_frame;
                    Ok(RecvStream::Mem(r))
                }
                None => Err(self.closed_error().unwrap_or(TransportError::EndpointClosed)),
            },
            e = Self::wait_closed(&self.shared, self.side) => Err(e),
        }
    }

    pub(crate) fn close(&self, code: CloseCode, reason: &str) {
        let local = TransportError::Closed {
            code: None,
            reason: "closed locally".into(),
        };
        let remote = TransportError::Closed {
            code: Some(code),
            reason: reason.into(),
        };
        let pair = if self.side == 0 {
            (local, remote)
        } else {
            (remote, local)
        };
        self.shared.closed_tx.send_if_modified(|v| {
            if v.is_some() {
                return false;
            }
            *v = Some(pair);
            true
        });
    }
}

pub(crate) struct MemSend {
    tx: Option<mpsc::Sender<Bytes>>,
    fin: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<Shared>,
    side: usize,
    max_frame: usize,
}

impl MemSend {
    pub(crate) async fn send_batch(&mut self, frames: &[Bytes]) -> Result<(), TransportError> {
        super::frame::check(frames, self.max_frame)?;
        let Some(tx) = &self.tx else {
            return Err(TransportError::Io("stream already finished".into()));
        };
        for frame in frames {
            tokio::select! {
                res = tx.send(frame.clone()) => res.map_err(|_| TransportError::Io("stream stopped by peer".into()))?,
                e = MemConn::wait_closed(&self.shared, self.side) => return Err(e),
            }
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self) {
        self.fin.store(true, Ordering::Release);
        self.tx = None;
    }
}

pub(crate) struct MemRecv {
    rx: mpsc::Receiver<Bytes>,
    fin: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<Shared>,
    side: usize,
    max_frame: usize,
}

impl MemRecv {
    pub(crate) fn try_recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        match self.rx.try_recv() {
            Ok(f) if f.len() > self.max_frame => Err(TransportError::FrameTooLarge {
                size: f.len() as u64,
                max: self.max_frame,
            }),
            Ok(f) => Ok(Some(f)),
            Err(_) => Ok(None),
        }
    }

    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        tokio::select! {
            biased;
            item = self.rx.recv() => match item {
                Some(f) if f.len() > self.max_frame => Err(TransportError::FrameTooLarge {
                    size: f.len() as u64,
                    max: self.max_frame,
                }),
                Some(f) => Ok(Some(f)),
                None if self.fin.load(Ordering::Acquire) => Ok(None),
                None => Err(TransportError::Io("stream reset by peer".into())),
            },
            e = MemConn::wait_closed(&self.shared, self.side) => Err(e),
        }
    }
}
