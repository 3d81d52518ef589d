//! WebSocket transport: TCP, mutual TLS 1.3 (tokio-rustls), WebSocket (tokio-tungstenite),
//! for networks that block or mangle UDP.
//!
//! QUIC streams are emulated by a small multiplexer: every WebSocket binary message is one mux
//! message `kind: u8 | stream id: u32 BE | payload`:
//!
//! | kind | payload | meaning |
//! |---|---|---|
//! | 0 `OPEN_BI` | — | the sender opened bidirectional stream `id` |
//! | 1 `OPEN_UNI` | — | the sender opened unidirectional stream `id` |
//! | 2 `DATA` | one frame | a frame on stream `id` |
//! | 3 `FIN` | — | the sender finished stream `id` |
//! | 4 `RESET` | — | the sender stopped reading stream `id`: stop sending on it |
//! | 5 `CREDIT` | `u32 BE` bytes | the sender consumed that much of stream `id`: send more |
//! | 6 `DATA_FRAMES` | `(u32 BE length, frame)*` | several frames on stream `id` (version 2) |
//!
//! `DATA_FRAMES` carries a batch in one WebSocket message (one header, one mask, one
//! allocation) instead of one message per frame. It is sent only on connections that
//! negotiated ALPN `sio-mesh-ws/2`, so nodes of the previous release (`/1`) keep working
//! beside new ones; a `DATA_FRAMES` message stays under 64 KiB, the smallest frame limit a
//! node may be configured with.
//!
//! The dialer opens odd ids, the acceptor even ones. Each stream direction has a credit
//! window, and (version 2) the connection one over all its streams: a sender waits for
//! credit instead of filling the receiver's memory, so a slow reader of one stream never
//! blocks the connection for the others (no head-of-line blocking beyond TCP's own), and a
//! peer cannot make a node buffer more than the connection window. `CREDIT` on stream id 0
//! returns connection credit. The rules live in [`mux`], a state machine without I/O; this
//! module runs it over the socket: a reader task feeds it the peer's messages, a writer task
//! writes what the streams and the mux queued. A peer that breaks the protocol (beyond its
//! credit, an unknown kind, a bad stream id...) is cut off: the connection is closed with code
//! 1 and the reason, and nothing it sent after is acted upon.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Mutex as AsyncMutex, Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode as WsCloseCode},
    },
};
use tracing::{debug, warn};

use super::{
    CloseCode, Conn, Handshakes, IoCounters, MAX_PENDING_HANDSHAKES, RecvStream, SendStream,
    TransportError, TransportSettings, frame,
};
use crate::{error::Error, incidents::Incidents, tls::TlsConfig};

mod mux;

use mux::{Blocked, FIN, Input, Mux, OPEN_BI, OPEN_UNI, Violation};

/// ALPN of the peer protocol over WebSocket, version 1: one frame per `DATA` message.
pub(crate) const ALPN_V1: &[u8] = b"sio-mesh-ws/1";
/// Version 2 adds `DATA_FRAMES`. Both are offered and accepted, 2 preferred: a node talks
/// version 1 to a peer of the previous release.
pub(crate) const ALPN_V2: &[u8] = b"sio-mesh-ws/2";
const ALPNS: [&[u8]; 2] = [ALPN_V2, ALPN_V1];
/// The WebSocket request path.
const PATH: &str = "/sio-mesh";
/// Mux messages queued for the socket writer; senders wait beyond (TCP backpressure).
const OUT_QUEUE: usize = 256;
/// Close codes travel as WebSocket close codes in the private range 4000-4999.
const WS_CODE_BASE: u16 = 4000;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1 << 40);

type TlsStream = tokio_rustls::TlsStream<Counted<TcpStream>>;
type Ws = WebSocketStream<TlsStream>;

fn ws_config(max_frame: usize) -> WebSocketConfig {
    // One mux message holds one frame plus a 5-byte header.
    // tungstenite zeroes `read_buffer_size` bytes ahead of every read: keep it modest, most
    // mux messages are small (measured: 128 KiB, the default, made memset the top cost).
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(max_frame + 16))
        .max_frame_size(Some(max_frame + 16))
}

pub(crate) struct WsTransport {
    local_addr: SocketAddr,
    server_name: ServerName<'static>,
    /// Both replaced when the TLS material is reloaded.
    connector: std::sync::RwLock<TlsConnector>,
    acceptor: Arc<std::sync::RwLock<TlsAcceptor>>,
    settings: TransportSettings,
    accepted_rx: AsyncMutex<mpsc::Receiver<WsConn>>,
    counters: Arc<Counters>,
    accept_task: tokio::task::JoinHandle<()>,
    closed: watch::Sender<bool>,
}

#[derive(Default)]
struct Counters {
    protocol: AtomicU64,
    io: Arc<IoCounters>,
}

/// A socket that counts the system calls made on it.
struct Counted<S> {
    inner: S,
    io: Arc<IoCounters>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if res.is_ready() {
            self.io.recv_calls.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if res.is_ready() {
            self.io.send_calls.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if res.is_ready() {
            self.io.send_calls.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl WsTransport {
    pub(crate) async fn bind(
        addr: SocketAddr,
        tls: &TlsConfig,
        settings: TransportSettings,
    ) -> Result<Self, Error> {
        let bind_err = |e: std::io::Error| Error::Bind {
            kind: "ws",
            addr,
            reason: e.to_string(),
        };
        let (server_tls, client_tls) = tls.transport_configs(&ALPNS)?;
        let server_name = ServerName::try_from(tls.server_name().to_owned()).map_err(|e| {
            Error::Config(crate::ConfigError::Tls(crate::TlsError::Rustls(format!(
                "invalid server name {:?}: {e}",
                tls.server_name()
            ))))
        })?;
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let (tx, rx) = mpsc::channel(MAX_PENDING_HANDSHAKES);
        let counters = Arc::new(Counters::default());
        let (closed, closed_rx) = watch::channel(false);
        let acceptor = Arc::new(std::sync::RwLock::new(TlsAcceptor::from(Arc::new(
            server_tls,
        ))));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            acceptor.clone(),
            tx,
            settings.clone(),
            counters.clone(),
            closed_rx,
        ));
        Ok(Self {
            local_addr,
            server_name,
            connector: std::sync::RwLock::new(TlsConnector::from(Arc::new(client_tls))),
            acceptor,
            settings,
            accepted_rx: AsyncMutex::new(rx),
            counters,
            accept_task,
            closed,
        })
    }
}

impl Drop for WsTransport {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.closed.send_replace(true);
    }
}

/// The first pause after a failed `accept`, doubled on each failure in a row up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: TcpListener,
    acceptor: Arc<std::sync::RwLock<TlsAcceptor>>,
    tx: mpsc::Sender<WsConn>,
    settings: TransportSettings,
    counters: Arc<Counters>,
    mut closed: watch::Receiver<bool>,
) {
    let mut handshakes = Handshakes::new(tx, settings.incidents.clone(), settings.connect_timeout);
    // Accept errors (out of file descriptors...) back off instead of spinning.
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = handshakes.reap() => continue,
            _ = closed.wait_for(|c| *c) => return,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => {
                backoff = ACCEPT_BACKOFF_MIN;
                a
            }
            Err(e) => {
                if backoff == ACCEPT_BACKOFF_MIN {
                    tracing::warn!(error = %e, "tcp accept failed: backing off");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closed.wait_for(|c| *c) => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        if !handshakes.has_room(remote) {
            continue;
        }
        let acceptor = acceptor.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (settings, counters, closed) = (settings.clone(), counters.clone(), closed.clone());
        // Refused when full: dropping the TCP stream closes it.
        handshakes.start(remote, async move {
            let _ = tcp.set_nodelay(true);
            let tcp = Counted {
                inner: tcp,
                io: counters.io.clone(),
            };
            let tls = acceptor
                .accept(tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            let tls = tokio_rustls::TlsStream::Server(tls);
            let ws = tokio_tungstenite::accept_async_with_config(
                tls,
                Some(ws_config(settings.max_frame_size)),
            )
            .await
            .map_err(|e| format!("websocket: {e}"))?;
            Ok(WsConn::start(
                ws, remote, false, &settings, counters, closed,
            ))
        });
    }
}

impl WsTransport {
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<Conn, TransportError> {
        let connect = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let tcp = Counted {
                inner: tcp,
                io: self.counters.io.clone(),
            };
            let connector = self
                .connector
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let tls = connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsStream::Client(tls);
            let url = format!("wss://{}{PATH}", self.server_name.to_str());
            let (ws, _) = tokio_tungstenite::client_async_with_config(
                url,
                tls,
                Some(ws_config(self.settings.max_frame_size)),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(ws)
        };
        let ws = tokio::time::timeout(self.settings.connect_timeout, connect)
            .await
            .map_err(|_| TransportError::Connect(format!("timed out dialing {addr}")))?
            .map_err(TransportError::Connect)?;
        Ok(Conn::Ws(WsConn::start(
            ws,
            addr,
            true,
            &self.settings,
            self.counters.clone(),
            self.closed.subscribe(),
        )))
    }

    pub(crate) async fn accept(&self) -> Result<Conn, TransportError> {
        match self.accepted_rx.lock().await.recv().await {
            Some(conn) => Ok(Conn::Ws(conn)),
            None => Err(TransportError::EndpointClosed),
        }
    }

    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
    }

    pub(crate) fn incidents(&self) -> &Arc<Incidents> {
        &self.settings.incidents
    }

    pub(crate) fn io(&self) -> &IoCounters {
        &self.counters.io
    }

    pub(crate) fn reload_tls(&self, tls: &TlsConfig) -> Result<(), Error> {
        let (server, client) = tls.transport_configs(&ALPNS)?;
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) =
            TlsAcceptor::from(Arc::new(server));
        *self.connector.write().unwrap_or_else(|e| e.into_inner()) =
            TlsConnector::from(Arc::new(client));
        Ok(())
    }

    pub(crate) fn protocol_errors(&self) -> u64 {
        self.counters.protocol.load(Ordering::Relaxed)
    }
}

/// What a stream's receive half gets, in order.
enum Item {
    Frame(Bytes),
    Fin,
}

/// What stream halves hand to the connection's writer, in order.
enum Out {
    /// A mux message as it is.
    Msg(Message),
    /// Frames of stream `id`: written together (packed when the peer understands it).
    Data { id: u32, frames: Vec<Bytes> },
}

/// The I/O side of one stream: where its frames go and who waits for its credit.
struct StreamIo {
    /// Where the reader delivers the stream's frames (`None` once our receive half is gone).
    deliver: Option<mpsc::UnboundedSender<Item>>,
    /// Wakes the sender: credit came, the stream was reset, or the connection closed.
    credit: Arc<Notify>,
}

/// The mux state and the streams' I/O, behind one lock (never held across an await).
struct State {
    mux: Mux,
    /// The I/O side of the streams the mux has (an entry goes when the mux's does).
    streams: HashMap<u32, StreamIo>,
}

impl State {
    fn forget_if_gone(&mut self, id: u32) {
        if !self.mux.has_stream(id) {
            self.streams.remove(&id);
        }
    }
}

struct Inner {
    id: u64,
    remote: SocketAddr,
    max_frame: usize,
    out: mpsc::Sender<Out>,
    /// Wakes the writer: control messages wait in the mux.
    ctrl: Notify,
    state: Mutex<State>,
    /// The close frame to send before closing, when we close.
    close_frame: Mutex<Option<CloseFrame>>,
    accept_bi: AsyncMutex<mpsc::Receiver<(WsSend, WsRecv)>>,
    accept_uni: AsyncMutex<mpsc::Receiver<WsRecv>>,
    open_permits: Arc<Semaphore>,
    closed: watch::Sender<Option<TransportError>>,
    counters: Arc<Counters>,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closed_error(&self) -> Option<TransportError> {
        self.closed.borrow().clone()
    }

    fn set_closed(&self, err: TransportError) {
        let first = self.closed.send_if_modified(|c| {
            if c.is_some() {
                return false;
            }
            *c = Some(err);
            true
        });
        if first {
            // Wake every stream: pending reads and credit waits fail now.
            let mut state = self.state();
            for io in state.streams.values_mut() {
                io.deliver = None;
                io.credit.notify_waiters();
            }
            state.streams.clear();
        }
    }

    async fn wait_closed(&self) -> TransportError {
        let mut rx = self.closed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(TransportError::EndpointClosed),
            Err(_) => TransportError::EndpointClosed,
        }
    }

    /// After a mux call that may have queued control messages: wake the writer, or close on
    /// the peer's violation.
    fn then(&self, res: Result<(), Violation>) {
        match res {
            Ok(()) => self.ctrl.notify_one(),
            Err(Violation(reason)) => self.violation(reason),
        }
    }

    /// Close on a protocol violation by the peer.
    fn violation(&self, reason: String) {
        if self.closed_error().is_some() {
            return;
        }
        self.counters.protocol.fetch_add(1, Ordering::Relaxed);
        warn!(remote = %self.remote, %reason, "peer broke the websocket mux protocol: closing");
        let err = TransportError::Closed {
            code: None,
            reason: format!("the peer broke the mux protocol: {reason}"),
        };
        self.shut(CloseCode::Protocol, &reason, err);
    }

    fn close_with(&self, code: CloseCode, reason: &str) {
        self.shut(
            code,
            reason,
            TransportError::Closed {
                code: None,
                reason: "closed locally".into(),
            },
        );
    }

    /// Close: the peer is told `code` and `reason` (the writer sends the close frame), the
    /// streams fail with `err`.
    fn shut(&self, code: CloseCode, reason: &str, err: TransportError) {
        // A WebSocket close reason holds at most 123 bytes.
        let mut end = reason.len().min(120);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code: WsCloseCode::from(WS_CODE_BASE + code as u16),
            reason: reason[..end].into(),
        };
        if self.closed_error().is_none() {
            let mut slot = self.close_frame.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(frame);
        }
        self.set_closed(err);
    }

    /// Our receive half of stream `id` is gone (on a closed connection nothing is told: the
    /// writer is gone, and a violation there is no news).
    fn recv_dropped(&self, id: u32) {
        let res = {
            let mut state = self.state();
            if let Some(io) = state.streams.get_mut(&id) {
                io.deliver = None;
            }
            let res = state.mux.recv_dropped(id);
            state.forget_if_gone(id);
            res
        };
        self.then(res);
    }

    /// Our send half of stream `id` is gone.
    fn send_dropped(&self, id: u32) {
        let mut state = self.state();
        state.mux.send_dropped(id);
        state.forget_if_gone(id);
    }
}

#[derive(Clone)]
pub(crate) struct WsConn {
    inner: Arc<Inner>,
    _owner: Arc<ConnOwner>,
}

/// Closes the connection when the last handle is dropped, like quinn's implicit close.
struct ConnOwner(Arc<Inner>);

impl Drop for ConnOwner {
    fn drop(&mut self) {
        if self.0.closed_error().is_none() {
            self.0.close_with(CloseCode::Leaving, "connection dropped");
        }
    }
}

impl WsConn {
    fn start(
        ws: Ws,
        remote: SocketAddr,
        dialer: bool,
        settings: &TransportSettings,
        counters: Arc<Counters>,
        endpoint_closed: watch::Receiver<bool>,
    ) -> WsConn {
        let alpn = match ws.get_ref() {
            tokio_rustls::TlsStream::Client(s) => s.get_ref().1.alpn_protocol(),
            tokio_rustls::TlsStream::Server(s) => s.get_ref().1.alpn_protocol(),
        };
        let v2 = alpn == Some(ALPN_V2);
        Self::start_over(ws, v2, remote, dialer, settings, counters, endpoint_closed)
    }

    /// The multiplexer over any WebSocket: TLS in production, an in-memory pipe in tests.
    fn start_over<S>(
        ws: WebSocketStream<S>,
        v2: bool,
        remote: SocketAddr,
        dialer: bool,
        settings: &TransportSettings,
        counters: Arc<Counters>,
        mut endpoint_closed: watch::Receiver<bool>,
    ) -> WsConn
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let max_streams = settings.max_concurrent_streams as usize;
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (bi_tx, bi_rx) = mpsc::channel(max_streams);
        let (uni_tx, uni_rx) = mpsc::channel(16);
        let (closed, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            remote,
            max_frame: settings.max_frame_size,
            out: out_tx,
            ctrl: Notify::new(),
            state: Mutex::new(State {
                mux: Mux::new(dialer, v2, settings.max_frame_size, max_streams),
                streams: HashMap::new(),
            }),
            close_frame: Mutex::new(None),
            accept_bi: AsyncMutex::new(bi_rx),
            accept_uni: AsyncMutex::new(uni_rx),
            open_permits: Arc::new(Semaphore::new(max_streams)),
            closed,
            counters,
        });
        let (sink, stream) = ws.split();
        tokio::spawn(write_loop(
            inner.clone(),
            sink,
            out_rx,
            settings.keep_alive_interval,
        ));
        tokio::spawn(read_loop(
            inner.clone(),
            stream,
            bi_tx,
            uni_tx,
            settings.idle_timeout,
        ));
        // The endpoint closing closes its connections.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let _ = endpoint_closed.wait_for(|c| *c).await;
            if let Some(inner) = weak.upgrade() {
                inner.close_with(CloseCode::Leaving, "node leaving");
            }
        });
        WsConn {
            _owner: Arc::new(ConnOwner(inner.clone())),
            inner,
        }
    }

    /// The halves of stream `id`, registered (the caller holds the state's lock).
    fn halves(
        inner: &Arc<Inner>,
        state: &mut State,
        id: u32,
        permit: Option<Arc<OwnedSemaphorePermit>>,
        send: bool,
        recv: bool,
    ) -> (Option<WsSend>, Option<WsRecv>) {
        let credit = Arc::new(Notify::new());
        let (tx, rx) = mpsc::unbounded_channel();
        state.streams.insert(
            id,
            StreamIo {
                deliver: recv.then_some(tx),
                credit: credit.clone(),
            },
        );
        let send = send.then(|| WsSend {
            id,
            inner: inner.clone(),
            credit,
            finished: false,
            _permit: permit.clone(),
        });
        let recv = recv.then(|| WsRecv {
            id,
            inner: inner.clone(),
            rx,
            done: false,
            _permit: permit,
        });
        (send, recv)
    }

    async fn open(&self, bi: bool) -> Result<(WsSend, Option<WsRecv>), TransportError> {
        if let Some(e) = self.inner.closed_error() {
            return Err(e);
        }
        let permit = tokio::select! {
            p = self.inner.open_permits.clone().acquire_owned() => p.map_err(|_| TransportError::EndpointClosed)?,
            e = self.inner.wait_closed() => return Err(e),
        };
        let (id, send, recv) = {
            let mut state = self.inner.state();
            let id = state.mux.open(bi);
            let (send, recv) = Self::halves(
                &self.inner,
                &mut state,
                id,
                Some(Arc::new(permit)),
                true,
                bi,
            );
            (id, send, recv)
        };
        let send = send.ok_or(TransportError::EndpointClosed)?;
        let kind = if bi { OPEN_BI } else { OPEN_UNI };
        self.inner
            .out
            .send(Out::Msg(Message::Binary(mux::encode(kind, id, &[]))))
            .await
            .map_err(|_| {
                self.inner
                    .closed_error()
                    .unwrap_or(TransportError::EndpointClosed)
            })?;
        Ok((send, recv))
    }
}

/// Messages written between two flushes at most (a bound on the writer's buffer).
const MAX_FEED: usize = 1024;
/// How long the writer tries to deliver the close frame to a peer that reads slowly.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Writes what the streams queued: everything already queued is handed to the WebSocket
/// before one flush, so a burst of frames leaves in one TLS write (one `writev`), not one
/// each. Control messages (credit, reset) go first. Once the connection is closed, the close
/// frame (ours, or the reply to the peer's) gets [`CLOSE_LINGER`] to leave.
async fn write_loop<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    mut out: mpsc::Receiver<Out>,
    keep_alive: Duration,
) {
    let mut ping = tokio::time::interval(keep_alive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed = inner.closed.subscribe();
    let packed = inner.state().mux.packs_frames();
    loop {
        let first = tokio::select! {
            biased;
            _ = inner.ctrl.notified() => None,
            Some(o) = out.recv() => Some(o),
            _ = ping.tick() => Some(Out::Msg(Message::Ping(Bytes::new()))),
            _ = closed.wait_for(Option::is_some) => break,
            else => break,
        };
        // A stalled peer must not keep the writer (and the socket) forever: closing the
        // connection stops it mid-write.
        let written = tokio::select! {
            res = write_batch(&inner, &mut sink, first, &mut out, packed) => res,
            _ = closed.wait_for(Option::is_some) => break,
        };
        if let Err(e) = written {
            inner.set_closed(TransportError::Closed {
                code: None,
                reason: format!("write failed: {e}"),
            });
            break;
        }
    }
    let frame = inner
        .close_frame
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        if let Some(frame) = frame {
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        let _ = sink.close().await;
    })
    .await;
}

/// Write the control messages waiting, `first`, and what else is queued (up to [`MAX_FEED`]
/// messages), then flush once.
async fn write_batch<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    inner: &Inner,
    sink: &mut futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    first: Option<Out>,
    out: &mut mpsc::Receiver<Out>,
    packed: bool,
) -> Result<(), tungstenite::Error> {
    let mut fed = 0;
    let controls: Vec<Bytes> = {
        let mut state = inner.state();
        std::iter::from_fn(|| state.mux.poll_control())
            .take(MAX_FEED)
            .collect()
    };
    if controls.len() == MAX_FEED {
        inner.ctrl.notify_one(); // more next round
    }
    for c in controls {
        fed += 1;
        sink.feed(Message::Binary(c)).await?;
    }
    let mut next = first;
    if next.is_none() && fed < MAX_FEED {
        next = out.try_recv().ok();
    }
    while let Some(item) = next.take() {
        match item {
            Out::Msg(m) => {
                fed += 1;
                sink.feed(m).await?;
            }
            Out::Data { id, frames } => {
                for m in mux::data_messages(id, &frames, packed) {
                    fed += 1;
                    sink.feed(Message::Binary(m)).await?;
                }
            }
        }
        if fed >= MAX_FEED {
            break;
        }
        next = out.try_recv().ok();
    }
    sink.flush().await
}

async fn read_loop<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    bi_tx: mpsc::Sender<(WsSend, WsRecv)>,
    uni_tx: mpsc::Sender<WsRecv>,
    idle: Duration,
) {
    let mut closed_rx = inner.closed.subscribe();
    let err = loop {
        let next = tokio::select! {
            // Closed first: nothing a peer sends after breaking the protocol is acted upon.
            biased;
            _ = closed_rx.wait_for(Option::is_some) => break TransportError::EndpointClosed,
            n = tokio::time::timeout(idle, stream.next()) => n,
        };
        let msg = match next {
            Err(_) => {
                break TransportError::Closed {
                    code: None,
                    reason: "idle timeout".into(),
                };
            }
            Ok(None) => {
                break TransportError::Closed {
                    code: None,
                    reason: "connection reset".into(),
                };
            }
            Ok(Some(Err(tungstenite::Error::Capacity(e)))) => {
                // Refused from its header, before reading it: a violation like any other
                // (counted, logged, told to the peer), and every stream learns why.
                let size = match e {
                    tungstenite::error::CapacityError::MessageTooLong { size, .. } => {
                        size.saturating_sub(5) as u64
                    }
                    _ => 0,
                };
                let err = TransportError::FrameTooLarge {
                    size,
                    max: inner.max_frame,
                };
                let reason = err.to_string();
                inner.counters.protocol.fetch_add(1, Ordering::Relaxed);
                warn!(remote = %inner.remote, %reason, "peer broke the websocket mux protocol: closing");
                inner.shut(CloseCode::Protocol, &reason, err.clone());
                break err;
            }
            Ok(Some(Err(e))) => {
                break TransportError::Closed {
                    code: None,
                    reason: e.to_string(),
                };
            }
            Ok(Some(Ok(m))) => m,
        };
        let data = match msg {
            Message::Binary(b) => b,
            Message::Close(frame) => {
                let (code, reason) = match frame {
                    Some(f) => {
                        let raw: u16 = f.code.into();
                        (
                            raw.checked_sub(WS_CODE_BASE)
                                .and_then(|c| CloseCode::from_u32(u32::from(c))),
                            f.reason.to_string(),
                        )
                    }
                    None => (None, "closed by peer".into()),
                };
                break TransportError::Closed { code, reason };
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Text(_) | Message::Frame(_) => {
                inner.violation("text message on the peer connection".into());
                continue;
            }
        };
        // Apply the message under the lock; hand new streams out after it (a refused one is
        // dropped, and dropping takes the lock).
        let opened = {
            let mut state = inner.state();
            let input = match state.mux.receive(&data) {
                Ok(input) => input,
                Err(Violation(reason)) => {
                    drop(state);
                    inner.violation(reason);
                    continue;
                }
            };
            let mut opened = None;
            match input {
                Input::Opened { id, bi } => {
                    opened = Some(WsConn::halves(&inner, &mut state, id, None, bi, true));
                }
                Input::Frames { id, frames } => {
                    if let Some(deliver) = state.streams.get(&id).and_then(|s| s.deliver.as_ref()) {
                        for f in frames {
                            let _ = deliver.send(Item::Frame(f));
                        }
                    }
                }
                Input::Fin { id } => {
                    if let Some(deliver) = state.streams.get(&id).and_then(|s| s.deliver.as_ref()) {
                        let _ = deliver.send(Item::Fin);
                    }
                }
                Input::Credit { id } | Input::Reset { id } => {
                    if let Some(io) = state.streams.get(&id) {
                        io.credit.notify_waiters();
                    }
                }
                Input::ConnectionCredit => {
                    for io in state.streams.values() {
                        io.credit.notify_waiters();
                    }
                }
                Input::Nothing => {}
            }
            opened
        };
        inner.ctrl.notify_one();
        let refused = match opened {
            Some((Some(send), Some(recv))) => bi_tx.try_send((send, recv)).is_err(),
            Some((None, Some(recv))) => uni_tx.try_send(recv).is_err(),
            _ => false,
        };
        if refused {
            // Too many streams waiting to be accepted: the halves dropped just now reset the
            // stream for the peer.
            debug!(remote = %inner.remote, "stream refused: accept queue full");
        }
    };
    inner.set_closed(err);
}

impl WsConn {
    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    pub(crate) fn remote_addr(&self) -> SocketAddr {
        self.inner.remote
    }

    pub(crate) async fn open_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (send, recv) = self.open(true).await?;
        let recv = recv.ok_or(TransportError::EndpointClosed)?;
        Ok((SendStream::Ws(send), RecvStream::Ws(recv)))
    }

    pub(crate) async fn accept_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let mut rx = self.inner.accept_bi.lock().await;
        tokio::select! {
            biased; // streams already opened are delivered before the close
            got = rx.recv() => match got {
                Some((s, r)) => Ok((SendStream::Ws(s), RecvStream::Ws(r))),
                None => Err(self.inner.closed_error().unwrap_or(TransportError::EndpointClosed)),
            },
            e = self.inner.wait_closed() => Err(e),
        }
    }

    pub(crate) async fn open_uni(&self) -> Result<SendStream, TransportError> {
        let (send, _) = self.open(false).await?;
        Ok(SendStream::Ws(send))
    }

    pub(crate) async fn accept_uni(&self) -> Result<RecvStream, TransportError> {
        let mut rx = self.inner.accept_uni.lock().await;
        tokio::select! {
            biased; // streams already opened are delivered before the close
            got = rx.recv() => match got {
                Some(r) => Ok(RecvStream::Ws(r)),
                None => Err(self.inner.closed_error().unwrap_or(TransportError::EndpointClosed)),
            },
            e = self.inner.wait_closed() => Err(e),
        }
    }

    pub(crate) fn close(&self, code: CloseCode, reason: &str) {
        if self.inner.closed_error().is_none() {
            self.inner.close_with(code, reason);
        }
    }
}

pub(crate) struct WsSend {
    id: u32,
    inner: Arc<Inner>,
    credit: Arc<Notify>,
    finished: bool,
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl WsSend {
    /// Wait until the stream and the connection have credit, then take `len` of it.
    async fn take_credit(&self, len: usize) -> Result<(), TransportError> {
        loop {
            let notified = self.credit.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self.inner.closed_error() {
                return Err(e);
            }
            match self.inner.state().mux.take_credit(self.id, len, true) {
                Ok(()) => return Ok(()),
                Err(Blocked::Reset) => {
                    return Err(TransportError::Io("stream reset by peer".into()));
                }
                Err(Blocked::Credit) => {}
            }
            tokio::select! {
                _ = notified => {}
                e = self.inner.wait_closed() => return Err(e),
            }
        }
    }

    /// Hand the frames to the connection's writer as one item: it writes them with whatever
    /// else is queued, then flushes once.
    pub(crate) async fn send_batch(&mut self, frames: &[Bytes]) -> Result<(), TransportError> {
        frame::check(frames, self.inner.max_frame)?;
        if self.finished {
            return Err(TransportError::Io("stream already finished".into()));
        }
        // Credit per frame: the receiver tolerates one frame beyond its window, not a batch.
        let mut start = 0;
        while start < frames.len() {
            self.take_credit(frames[start].len()).await?;
            let mut end = start + 1;
            {
                let mut state = self.inner.state();
                while end < frames.len()
                    && state
                        .mux
                        .take_credit(self.id, frames[end].len(), false)
                        .is_ok()
                {
                    end += 1;
                }
            }
            let item = Out::Data {
                id: self.id,
                frames: frames[start..end].to_vec(),
            };
            tokio::select! {
                res = self.inner.out.send(item) => {
                    res.map_err(|_| self.inner.closed_error().unwrap_or(TransportError::EndpointClosed))?;
                }
                e = self.inner.wait_closed() => return Err(e),
            }
            start = end;
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            // FIN goes on the data path (control messages overtake data): it must follow the
            // frames already queued for this stream.
            let id = self.id;
            let fin = move || Out::Msg(Message::Binary(mux::encode(FIN, id, &[])));
            if self.inner.out.try_send(fin()).is_err()
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                let inner = self.inner.clone();
                rt.spawn(async move {
                    let _ = inner.out.send(fin()).await;
                });
            }
        }
    }
}

impl Drop for WsSend {
    fn drop(&mut self) {
        // Like QUIC: dropping the send half finishes the stream.
        self.finish();
        self.inner.send_dropped(self.id);
    }
}

pub(crate) struct WsRecv {
    id: u32,
    inner: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Item>,
    done: bool,
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl WsRecv {
    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        if self.done {
            return Ok(None);
        }
        let item = tokio::select! {
            biased;
            item = self.rx.recv() => item,
            e = self.inner.wait_closed() => return Err(e),
        };
        self.take(item)
    }

    pub(crate) fn try_recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.try_recv() {
            // Only frames: the end and failures show on the next `recv`.
            Ok(Item::Frame(f)) => self.take(Some(Item::Frame(f))),
            Ok(Item::Fin) => {
                self.done = true;
                Ok(None)
            }
            Err(_) => Ok(None),
        }
    }

    fn take(&mut self, item: Option<Item>) -> Result<Option<Bytes>, TransportError> {
        match item {
            Some(Item::Frame(f)) => {
                if f.len() > self.inner.max_frame {
                    return Err(TransportError::FrameTooLarge {
                        size: f.len() as u64,
                        max: self.inner.max_frame,
                    });
                }
                // The stream's and the connection's credit, returned as they come due.
                let res = self.inner.state().mux.consumed(self.id, &f);
                self.inner.then(res);
                Ok(Some(f))
            }
            Some(Item::Fin) => {
                self.done = true;
                Ok(None)
            }
            None => Err(self
                .inner
                .closed_error()
                .unwrap_or(TransportError::Io("stream abandoned".into()))),
        }
    }
}

impl Drop for WsRecv {
    fn drop(&mut self) {
        // Unless it was finished, the sender is told to stop: nobody reads this stream any
        // more. What it sent and nobody read is returned to the connection's credit.
        self.inner.recv_dropped(self.id);
    }
}

/// Fuzz tests of the multiplexer (see [`crate::fuzz`]): a connection over an in-memory pipe,
/// whose peer is the test, sending random, valid and mutated mux messages. The connection
/// never panics, cuts the peer at the first protocol violation with a reason the peer
/// receives, and never cuts a peer that follows the protocol.
#[cfg(test)]
mod fuzz_tests {
    use fastrand::Rng;
    use tokio::{
        io::{DuplexStream, Empty, Join},
        task::JoinSet,
    };

    use super::{
        mux::{CREDIT, CTRL_QUEUE, DATA, DATA_FRAMES, RESET, WINDOW, data_messages, window_cost},
        *,
    };
    use crate::fuzz;

    /// A mux message, as the peer sends it.
    fn mux(kind: u8, id: u32, payload: &[u8]) -> Message {
        Message::Binary(mux::encode(kind, id, payload))
    }

    /// The peer's sending side.
    type PeerWs = WebSocketStream<Join<Empty, DuplexStream>>;

    /// The smallest frame limit a node may have: the fuzz cases stay cheap.
    const MAX_FRAME: usize = 64 * 1024;

    /// What the peer receives that matters here.
    #[derive(Debug)]
    enum Seen {
        Pong(Bytes),
        Close(Option<CloseFrame>),
        Ended,
    }

    /// How the connection answered a ping sent after everything else.
    #[derive(Debug)]
    enum Probe {
        /// It answered: every message before the ping was read.
        Alive,
        Closed(Option<CloseFrame>),
        Ended,
        /// Neither an answer nor a close: its reader is gone (a panic shows on stderr).
        Stuck,
    }

    /// A connection (dialer or acceptor) and the raw WebSocket of its peer.
    struct Harness {
        conn: WsConn,
        counters: Arc<Counters>,
        peer: PeerWs,
        seen: mpsc::UnboundedReceiver<Seen>,
        tasks: JoinSet<()>,
        /// The connection's own streams: a bidirectional one, then a unidirectional one.
        ours: [u32; 2],
        held: Vec<(WsSend, Option<WsRecv>)>,
        _endpoint: watch::Sender<bool>,
        nonce: u64,
    }

    /// A connection over in-memory pipes of `pipe` bytes, and the peer's sending WebSocket.
    /// Returns the pipe carrying what the connection writes, for the caller to read (or not).
    async fn conn_over_pipes(
        pipe: usize,
        dialer: bool,
        max_streams: u32,
    ) -> (
        WsConn,
        Arc<Counters>,
        watch::Sender<bool>,
        PeerWs,
        DuplexStream,
    ) {
        // One pipe each way (duplex pipes: writes fail once the reading end is dropped), and
        // the peer's two directions on two WebSocket objects: the peer's writes failing once
        // the connection is gone must not keep it from reading the close frame sent before.
        let (to_conn_tx, to_conn_rx) = tokio::io::duplex(pipe);
        let (to_peer_tx, to_peer_rx) = tokio::io::duplex(pipe);
        let ws = WebSocketStream::from_raw_socket(
            tokio::io::join(to_conn_rx, to_peer_tx),
            tungstenite::protocol::Role::Server,
            Some(ws_config(MAX_FRAME)),
        )
        .await;
        let peer = WebSocketStream::from_raw_socket(
            tokio::io::join(tokio::io::empty(), to_conn_tx),
            tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let settings = TransportSettings {
            incidents: Default::default(),
            max_frame_size: MAX_FRAME,
            max_concurrent_streams: max_streams,
            keep_alive_interval: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
        };
        let counters = Arc::new(Counters::default());
        let (endpoint, endpoint_rx) = watch::channel(false);
        let remote = SocketAddr::from(([127, 0, 0, 1], 9));
        let conn = WsConn::start_over(
            ws,
            true,
            remote,
            dialer,
            &settings,
            counters.clone(),
            endpoint_rx,
        );
        (conn, counters, endpoint, peer, to_peer_rx)
    }

    async fn harness(dialer: bool, max_streams: u32) -> Harness {
        let (conn, counters, endpoint, peer, to_peer_rx) =
            conn_over_pipes(64 * 1024, dialer, max_streams).await;
        let mut from_conn = WebSocketStream::from_raw_socket(
            tokio::io::join(to_peer_rx, tokio::io::sink()),
            tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            while let Some(Ok(msg)) = from_conn.next().await {
                let _ = match msg {
                    Message::Pong(p) => seen_tx.send(Seen::Pong(p)),
                    Message::Close(f) => seen_tx.send(Seen::Close(f)),
                    _ => Ok(()),
                };
            }
            let _ = seen_tx.send(Seen::Ended);
        });
        let (bi_send, bi_recv) = conn.open(true).await.expect("open a stream");
        let (uni_send, _) = conn.open(false).await.expect("open a stream");
        Harness {
            ours: [bi_send.id, uni_send.id],
            held: vec![(bi_send, bi_recv), (uni_send, None)],
            conn,
            counters,
            peer,
            seen,
            tasks,
            _endpoint: endpoint,
            nonce: 0,
        }
    }

    /// A peer that opens streams without end and reads nothing of ours: the connection's
    /// answers (resets of the streams over the limit) cannot leave, and instead of queueing
    /// them without bound the connection cuts the peer off, with a reason.
    #[tokio::test]
    async fn a_peer_that_sends_without_reading_is_cut_off_not_queued_for() {
        // Small pipes, and nobody reads what the connection writes: its writes block once
        // 4 KiB wait unread.
        let (conn, counters, _endpoint, mut peer, _never_read) =
            conn_over_pipes(4 * 1024, false, 4).await;
        // Stream ids of the dialer's parity; every one over 2 × 4 open is refused with a reset.
        let mut sent = 0u32;
        while conn.inner.closed_error().is_none() {
            assert!(
                sent < 4 * CTRL_QUEUE as u32,
                "{sent} opens and still not cut off"
            );
            let id = 2 * sent + 1;
            if peer.send(mux(OPEN_UNI, id, &[])).await.is_err() {
                break;
            }
            sent += 1;
            if sent.is_multiple_of(256) {
                tokio::task::yield_now().await;
            }
        }
        let err = conn.inner.wait_closed().await;
        assert!(
            err.to_string().contains("does not read"),
            "closed for another reason: {err}"
        );
        assert_eq!(counters.protocol.load(Ordering::Relaxed), 1);
    }

    impl Harness {
        /// Whether the message left (it fails once the connection is gone).
        async fn send(&mut self, msg: Message) -> bool {
            self.peer.send(msg).await.is_ok()
        }

        async fn probe(&mut self) -> Probe {
            self.nonce += 1;
            let nonce = Bytes::copy_from_slice(&self.nonce.to_be_bytes());
            if !self.send(Message::Ping(nonce.clone())).await {
                return Probe::Ended;
            }
            let wait = async {
                loop {
                    match self.seen.recv().await {
                        Some(Seen::Pong(p)) if p == nonce => return Probe::Alive,
                        Some(Seen::Pong(_)) => {}
                        Some(Seen::Close(f)) => return Probe::Closed(f),
                        Some(Seen::Ended) | None => return Probe::Ended,
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(5), wait)
                .await
                .unwrap_or(Probe::Stuck)
        }

        /// The close frame the peer received: `seen` by the probe, or waited for.
        async fn told(&mut self, seen: &mut Option<Option<CloseFrame>>) -> Option<CloseFrame> {
            if let Some(frame) = seen.take() {
                return frame;
            }
            let wait = async {
                loop {
                    match self.seen.recv().await {
                        Some(Seen::Close(f)) => return f,
                        Some(Seen::Pong(_)) => {}
                        Some(Seen::Ended) | None => return None,
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(5), wait)
                .await
                .ok()
                .flatten()
        }

        /// The connection cut the peer off (once), telling it `reason`; `flood` says what went
        /// unnoticed if it did not.
        async fn assert_cut_off(mut self, reason: &str, flood: &str) {
            let mut seen = match self.probe().await {
                Probe::Closed(f) => Some(f),
                Probe::Ended => None,
                Probe::Alive => panic!("{flood}"),
                Probe::Stuck => panic!("stuck"),
            };
            let told = self.told(&mut seen).await.expect("the peer is told why");
            assert_eq!(told.reason.as_str(), reason);
            assert_eq!(self.violations(), 1);
            self.shut_down().await;
        }

        fn violations(&self) -> u64 {
            self.counters.protocol.load(Ordering::Relaxed)
        }

        async fn shut_down(mut self) {
            self.conn.close(CloseCode::Leaving, "test over");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }

    /// Accept the peer's streams and treat them at random: read to the end, read a little
    /// and drop, hold unread, drop at once; answer on some bidirectional ones.
    async fn consume(conn: WsConn, mut rng: Rng) {
        let mut held = Vec::new();
        let mut readers = JoinSet::new();
        loop {
            let (send, mut recv) = tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok((SendStream::Ws(send), RecvStream::Ws(recv))) => (Some(send), recv),
                    Ok(_) => unreachable!("a websocket connection"),
                    Err(_) => break,
                },
                r = conn.accept_uni() => match r {
                    Ok(RecvStream::Ws(recv)) => (None, recv),
                    Ok(_) => unreachable!("a websocket connection"),
                    Err(_) => break,
                },
            };
            match rng.u8(..4) {
                0 => held.push((send, recv)),
                1 => drop((send, recv)),
                n => {
                    let limit = if n == 2 { usize::MAX } else { rng.usize(..4) };
                    readers.spawn(async move {
                        let mut read = 0;
                        while read < limit {
                            match recv.recv().await {
                                Ok(Some(_)) => read += 1,
                                Ok(None) | Err(_) => break,
                            }
                        }
                        if let Some(mut send) = send {
                            let _ = send.send_batch(&[Bytes::from_static(b"answer")]).await;
                            send.finish();
                        }
                    });
                }
            }
        }
        readers.abort_all();
    }

    /// What a message is to the protocol.
    #[derive(Debug, Clone, PartialEq)]
    enum Kind {
        /// Follows the protocol: never a reason to cut the peer.
        Valid,
        /// Breaks it wherever it comes: the connection must close, saying this.
        Violation(String),
        /// A message over the size limit: refused from its header.
        Oversize,
        /// The peer closes.
        Close,
        /// A mutation, or valid traffic beyond what the window allows: anything may follow,
        /// except a panic.
        Unknown,
    }

    /// The fuzzing peer: which stream ids it opened, how much it sent on each.
    struct Peer {
        /// Its next stream id: even if the connection dials, odd otherwise.
        next_id: u32,
        opened: Vec<u32>,
        ours: [u32; 2],
        sent: HashMap<u32, usize>,
        /// What it sent on all streams (the connection's window).
        total: usize,
        /// The streams it finished.
        finished: std::collections::HashSet<u32>,
    }

    impl Peer {
        fn some_id(&self, rng: &mut Rng) -> u32 {
            match rng.u8(..8) {
                0 => rng.u32(..),
                1..=2 => self.ours[rng.usize(..2)],
                _ if !self.opened.is_empty() => self.opened[rng.usize(..self.opened.len())],
                _ => self.next_id,
            }
        }

        fn frame(rng: &mut Rng) -> Bytes {
            let len = match rng.u8(..8) {
                0 => 0,
                1 => rng.usize(..=MAX_FRAME - 40),
                _ => rng.usize(..200),
            };
            Bytes::from(vec![rng.u8(..); len])
        }

        /// Data on `id`: valid while what was sent on it stays within the window. Beyond the
        /// window and the one frame of slack, on the connection's own bidirectional stream
        /// (never read here), a violation.
        fn data(&mut self, id: u32, frames: &[Bytes]) -> Kind {
            let cost = frames.iter().map(|f| window_cost(f)).sum::<usize>();
            self.total += cost;
            let total = self.sent.entry(id).or_default();
            *total += cost;
            if self.finished.contains(&id) || self.total > mux::CONN_WINDOW as usize {
                // After its end (a violation while the stream is known), or beyond the
                // connection's window (which credit the peer got depends on the readers).
                Kind::Unknown
            } else if *total <= WINDOW as usize {
                Kind::Valid
            } else if id == self.ours[0] && *total > WINDOW as usize + MAX_FRAME {
                Kind::Violation(format!("stream {id} exceeded its credit"))
            } else {
                Kind::Unknown
            }
        }

        /// A large frame on the connection's own bidirectional stream, which nobody reads.
        fn flood(&mut self) -> (Message, Kind) {
            let id = self.ours[0];
            let frame = Bytes::from(vec![1; MAX_FRAME - 40]);
            let kind = self.data(id, std::slice::from_ref(&frame));
            (mux(DATA, id, &frame), kind)
        }

        /// A valid message.
        fn valid(&mut self, rng: &mut Rng) -> (Message, Kind) {
            let id = self.some_id(rng);
            match rng.u8(..10) {
                0 | 1 => {
                    let id = self.next_id;
                    self.next_id += 2;
                    self.opened.push(id);
                    let kind = if rng.bool() { OPEN_BI } else { OPEN_UNI };
                    (mux(kind, id, &[]), Kind::Valid)
                }
                2..=4 => {
                    let frame = Self::frame(rng);
                    let kind = self.data(id, std::slice::from_ref(&frame));
                    (mux(DATA, id, &frame), kind)
                }
                5 => {
                    let frames: Vec<Bytes> = (0..rng.usize(2..20))
                        .map(|_| Bytes::from(vec![7; rng.usize(..100)]))
                        .collect();
                    let kind = self.data(id, &frames);
                    let messages = data_messages(id, &frames, true);
                    (Message::Binary(messages[0].clone()), kind)
                }
                6 => {
                    self.finished.insert(id);
                    (mux(FIN, id, &[]), Kind::Valid)
                }
                7 => (mux(RESET, id, &[]), Kind::Valid),
                8 => {
                    let n = if rng.bool() { u32::MAX } else { rng.u32(..) };
                    (mux(CREDIT, id, &n.to_be_bytes()), Kind::Valid)
                }
                _ => (
                    Message::Ping(Bytes::from(fuzz::bytes(rng, 100))),
                    Kind::Valid,
                ),
            }
        }

        /// A message that breaks the protocol whatever came before.
        fn violation(&mut self, rng: &mut Rng) -> (Message, Kind) {
            let id = self.some_id(rng);
            let binary = |b: Vec<u8>| Message::Binary(Bytes::from(b));
            match rng.u8(..6) {
                0 => {
                    let short: Vec<u8> = (0..rng.usize(..5)).map(|_| fuzz::byte(rng)).collect();
                    let reason = format!("mux message of {} bytes", short.len());
                    (binary(short), Kind::Violation(reason))
                }
                1 => {
                    let kind = rng.u8(DATA_FRAMES + 1..);
                    let payload = fuzz::bytes(rng, 64);
                    let reason = format!("unknown mux kind {kind}");
                    (mux(kind, id, &payload), Kind::Violation(reason))
                }
                2 => (
                    Message::text("{\"hello\": 1}"),
                    Kind::Violation("text message on the peer connection".into()),
                ),
                3 => {
                    // An id of the connection's own parity.
                    let id = self.ours[0] + 2 * rng.u32(..1000);
                    let kind = if rng.bool() { OPEN_BI } else { OPEN_UNI };
                    let reason = format!("bad stream id {id}");
                    (mux(kind, id, &[]), Kind::Violation(reason))
                }
                4 => {
                    let mut len = rng.usize(..9);
                    if len == 4 {
                        len = 0;
                    }
                    let payload: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                    let reason = "malformed credit".to_string();
                    (mux(CREDIT, id, &payload), Kind::Violation(reason))
                }
                _ => {
                    // Inner lengths that do not add up: cut inside a frame or a header, or
                    // one length past the end.
                    let frames: Vec<Bytes> = (0..rng.usize(2..6))
                        .map(|_| Bytes::from(vec![3; rng.usize(..200)]))
                        .collect();
                    let mut payload = Vec::new();
                    let mut boundaries = vec![0];
                    for f in &frames {
                        payload.extend_from_slice(&(f.len() as u32).to_be_bytes());
                        payload.extend_from_slice(f);
                        boundaries.push(payload.len());
                    }
                    if rng.bool() {
                        let cut = loop {
                            let cut = rng.usize(1..payload.len());
                            if !boundaries.contains(&cut) {
                                break cut;
                            }
                        };
                        payload.truncate(cut);
                    } else {
                        let at = boundaries[rng.usize(..boundaries.len() - 1)];
                        let len = u32::from_be_bytes(payload[at..at + 4].try_into().unwrap());
                        let past = payload.len() - at - 4;
                        let wrong = rng.u32(past as u32 + 1..).max(len + 1);
                        payload[at..at + 4].copy_from_slice(&wrong.to_be_bytes());
                    }
                    let reason = format!("stream {id}: truncated frame");
                    (mux(DATA_FRAMES, id, &payload), Kind::Violation(reason))
                }
            }
        }

        /// A message: valid, or with probability `trouble` % anything else.
        fn message(&mut self, rng: &mut Rng, trouble: u8) -> (Message, Kind) {
            if rng.u8(..100) >= trouble {
                return self.valid(rng);
            }
            match rng.u8(..20) {
                0..=7 => {
                    let (msg, _) = self.valid(rng);
                    let bytes = match msg {
                        Message::Binary(b) => b.to_vec(),
                        other => other.into_data().to_vec(),
                    };
                    (binary_of(fuzz::mutate(rng, &bytes)), Kind::Unknown)
                }
                8..=15 => self.violation(rng),
                16..=17 => {
                    let code = [1000, 1001, 1011, 3000, 4000, 4001, 4003, 4999][rng.usize(..8)];
                    let frame = CloseFrame {
                        code: WsCloseCode::from(code),
                        reason: "peer going".into(),
                    };
                    (Message::Close(Some(frame)), Kind::Close)
                }
                _ => {
                    let id = self.some_id(rng);
                    let payload = vec![0u8; MAX_FRAME + 12 + rng.usize(..100)];
                    (mux(DATA, id, &payload), Kind::Oversize)
                }
            }
        }
    }

    fn binary_of(bytes: Vec<u8>) -> Message {
        Message::Binary(Bytes::from(bytes))
    }

    /// Whether `reason` is one of the reasons the multiplexer gives for cutting a peer.
    fn known_reason(reason: &str) -> bool {
        [
            "mux message of ",
            "unknown mux kind ",
            "text message on the peer connection",
            "bad stream id ",
            "malformed credit",
            "exceeded its credit",
            "truncated frame",
            "exceeds the limit",
            "data after its end",
        ]
        .iter()
        .any(|r| reason.contains(r))
    }

    /// Run one fuzz case: a connection, a random exchange, then the verdict.
    async fn run_case(rng: &mut Rng) {
        let dialer = rng.bool();
        // At least 2: the connection opens two streams of its own.
        let mut h = harness(dialer, rng.u32(2..6)).await;
        h.tasks
            .spawn(consume(h.conn.clone(), Rng::with_seed(rng.u64(..))));
        // The connection sends too: its streams then hold credit the peer can play with.
        let mut send = h.held.pop().map(|(s, _)| s).expect("our uni stream");
        let frames: Vec<Bytes> = (0..rng.usize(..5)).map(|_| Peer::frame(rng)).collect();
        h.tasks.spawn(async move {
            let _ = send.send_batch(&frames).await;
            send.finish();
        });
        let mut peer = Peer {
            next_id: if dialer { 2 } else { 1 },
            opened: Vec::new(),
            ours: h.ours,
            sent: HashMap::new(),
            total: 0,
            finished: Default::default(),
        };
        // Valid traffic only, long; a little trouble; a lot of it; or floods.
        let (count, trouble, flood) = match rng.u8(..8) {
            0 | 1 => (rng.usize(1..150), 0, false),
            2..=4 => (rng.usize(1..60), 3, false),
            5 | 6 => (rng.usize(1..30), 25, false),
            _ => (rng.usize(1..30), 3, true),
        };
        let mut log = Vec::new();
        for _ in 0..count {
            let (msg, kind) = match flood && rng.bool() {
                true => peer.flood(),
                false => peer.message(rng, trouble),
            };
            log.push(kind.clone());
            if !h.send(msg).await {
                break;
            }
            if kind != Kind::Valid && rng.bool() {
                break; // sometimes stop at the first trouble, sometimes carry on
            }
        }
        let probe = h.probe().await;
        if !matches!(probe, Probe::Alive) {
            // The peer may have stopped (closed) before the connection read everything.
            let wait = h.conn.inner.wait_closed();
            let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        }
        let closed = h.conn.inner.closed_error();
        assert!(
            !matches!(probe, Probe::Stuck),
            "the connection neither answered nor closed (did its reader panic?): {log:?}"
        );
        // The close frame the probe saw, if any: what the peer was told.
        let mut seen_close = match probe {
            Probe::Closed(f) => Some(f),
            _ => None,
        };
        let protocol_code = WS_CODE_BASE + CloseCode::Protocol as u16;
        match log.iter().find(|k| **k != Kind::Valid) {
            None => {
                assert!(
                    closed.is_none(),
                    "a peer following the protocol was cut: {closed:?}, {log:?}"
                );
                assert_eq!(h.violations(), 0);
            }
            Some(Kind::Violation(expected)) => {
                assert!(closed.is_some(), "violation unnoticed: {log:?}");
                assert_eq!(h.violations(), 1, "{log:?}");
                let told = h.told(&mut seen_close).await.expect("the peer is told why");
                assert_eq!(u16::from(told.code), protocol_code);
                assert!(
                    told.reason.contains(expected.as_str()),
                    "closed for {:?}, expected {expected:?}: {log:?}",
                    told.reason
                );
            }
            Some(Kind::Oversize) => {
                assert!(
                    matches!(
                        closed,
                        Some(TransportError::FrameTooLarge { max: MAX_FRAME, .. })
                    ),
                    "{closed:?}"
                );
                let told = h.told(&mut seen_close).await.expect("the peer is told why");
                assert_eq!(u16::from(told.code), protocol_code);
                assert!(told.reason.contains("exceeds the limit"), "{told:?}");
            }
            Some(Kind::Close) => {
                assert!(
                    matches!(closed, Some(TransportError::Closed { .. })),
                    "{closed:?}"
                );
                assert_eq!(h.violations(), 0);
            }
            Some(Kind::Unknown | Kind::Valid) => {
                // Anything but a panic; a cut peer is told why, in words.
                if h.violations() > 0 {
                    assert!(closed.is_some());
                    let told = h.told(&mut seen_close).await.expect("the peer is told why");
                    assert_eq!(u16::from(told.code), protocol_code);
                    assert!(known_reason(&told.reason), "unclear reason {told:?}");
                }
            }
        }
        h.shut_down().await;
    }

    #[tokio::test]
    async fn fuzz_mux_messages_cut_violations_with_a_reason_and_never_valid_traffic() {
        for mut case in fuzz::cases("mux", 2000) {
            run_case(&mut case.rng).await;
        }
    }

    /// The acceptor side: the peer opens odd ids, the connection's own are 2 and 4.
    async fn acceptor() -> Harness {
        let h = harness(false, 8).await;
        assert_eq!(h.ours, [2, 4]);
        h
    }

    #[tokio::test]
    async fn every_malformed_mux_message_closes_the_connection_with_its_reason() {
        let oversize = mux(DATA, 1, &vec![0; MAX_FRAME + 17]);
        let cases: Vec<(Vec<Message>, &str)> = vec![
            (vec![binary_of(vec![])], "mux message of 0 bytes"),
            (
                vec![binary_of(vec![DATA, 0, 0, 0])],
                "mux message of 4 bytes",
            ),
            (vec![mux(7, 1, &[])], "unknown mux kind 7"),
            (vec![mux(255, 1, b"x")], "unknown mux kind 255"),
            (
                vec![Message::text("hi")],
                "text message on the peer connection",
            ),
            (vec![mux(OPEN_BI, 2, &[])], "bad stream id 2"),
            (
                vec![mux(OPEN_UNI, 1, &[]), mux(OPEN_BI, 1, &[])],
                "bad stream id 1",
            ),
            (vec![mux(CREDIT, 2, &[0, 0, 1])], "malformed credit"),
            (vec![mux(CREDIT, 2, &[0, 0, 0, 1, 0])], "malformed credit"),
            (
                vec![mux(DATA_FRAMES, 2, &[0, 0, 0, 5, 1, 2])],
                "stream 2: truncated frame in DATA_FRAMES",
            ),
            (
                vec![mux(DATA_FRAMES, 2, &[0, 0, 0, 0, 0, 0])],
                "stream 2: truncated frame header in DATA_FRAMES",
            ),
            (
                vec![mux(DATA_FRAMES, 4, &[0xff, 0xff, 0xff, 0xff, 1])],
                "stream 4: truncated frame in DATA_FRAMES",
            ),
            (
                vec![oversize],
                "frame of 65553 bytes exceeds the limit of 65536 bytes",
            ),
        ];
        for (messages, reason) in cases {
            let mut h = acceptor().await;
            for m in messages {
                // (An oversize message is refused from its header: the rest may not leave.)
                let _ = h.send(m).await;
            }
            let probe = h.probe().await;
            let mut seen = match probe {
                Probe::Closed(f) => Some(f),
                Probe::Ended => None,
                other => panic!("{reason}: the connection stayed open ({other:?})"),
            };
            let told = h.told(&mut seen).await.expect("the peer is told why");
            assert_eq!(
                u16::from(told.code),
                WS_CODE_BASE + CloseCode::Protocol as u16
            );
            assert_eq!(told.reason.as_str(), reason);
            // Oversize messages included: refused from their header, counted all the same.
            assert_eq!(h.violations(), 1, "{reason}");
            assert!(h.conn.inner.closed_error().is_some());
            h.shut_down().await;
        }
    }

    #[tokio::test]
    async fn credit_beyond_the_counter_is_no_trouble() {
        let mut h = acceptor().await;
        for _ in 0..3 {
            assert!(h.send(mux(CREDIT, 2, &u32::MAX.to_be_bytes())).await);
            assert!(h.send(mux(CREDIT, 0, &u32::MAX.to_be_bytes())).await);
        }
        // Before the fix: the reader panicked on an overflow, and the ping went unanswered.
        // (The counters saturate: the mux's own tests.)
        assert!(matches!(h.probe().await, Probe::Alive));
        assert_eq!(h.violations(), 0);
        h.shut_down().await;
    }

    /// A `DATA_FRAMES` message of 16383 empty frames: 65537 bytes, just within the limit.
    fn empty_frames() -> Message {
        mux(DATA_FRAMES, 1, &[0; 4 * 16383])
    }

    #[tokio::test]
    async fn empty_frames_count_against_the_window_of_a_stream_nobody_reads() {
        let mut h = acceptor().await;
        assert!(h.send(mux(OPEN_UNI, 1, &[])).await);
        // Nobody accepts the stream. Each empty frame counts as one byte: the window and the
        // one frame of slack are used up by the 37th message (606 171 frames).
        let limit = (WINDOW as usize + MAX_FRAME) / 16383 + 1;
        let mut sent = 0;
        while sent < limit && h.send(empty_frames()).await {
            sent += 1;
        }
        let flood = format!("{sent} messages of empty frames queued without limit");
        h.assert_cut_off("stream 1 exceeded its credit", &flood)
            .await;
    }

    #[tokio::test]
    async fn empty_frames_read_as_they_come_free_the_window() {
        let mut h = acceptor().await;
        assert!(h.send(mux(OPEN_UNI, 1, &[])).await);
        let mut recv = match h.conn.accept_uni().await {
            Ok(RecvStream::Ws(recv)) => recv,
            _ => panic!("no stream"),
        };
        // Twice the window, in empty frames, each message read before the next is sent.
        let messages = 2 * (WINDOW as usize + MAX_FRAME) / 16383;
        for _ in 0..messages {
            assert!(h.send(empty_frames()).await);
            for _ in 0..16383 {
                let frame = recv.recv().await.expect("a frame").expect("not the end");
                assert!(frame.is_empty());
            }
        }
        assert!(matches!(h.probe().await, Probe::Alive));
        assert_eq!(h.violations(), 0);
        h.shut_down().await;
    }

    /// A peer closing first gets our close frame back, as RFC 6455 asks.
    #[tokio::test]
    async fn a_peer_closing_first_gets_a_close_back() {
        let mut h = acceptor().await;
        let frame = CloseFrame {
            code: WsCloseCode::from(WS_CODE_BASE + CloseCode::Leaving as u16),
            reason: "bye".into(),
        };
        assert!(h.send(Message::Close(Some(frame))).await);
        let err = h.conn.inner.wait_closed().await;
        assert!(
            matches!(&err, TransportError::Closed { code: Some(CloseCode::Leaving), reason } if reason == "bye"),
            "{err:?}"
        );
        assert!(h.told(&mut None).await.is_some(), "no close frame back");
        assert_eq!(h.violations(), 0);
        h.shut_down().await;
    }

    /// A peer that opens stream after stream and fills each within its window, with nobody
    /// accepting them, is cut off at the connection's window: a node never buffers more than
    /// that for one peer (without it: `max_streams` × 2 × the stream window).
    #[tokio::test]
    async fn a_peer_beyond_the_connection_window_is_cut_off() {
        let mut h = harness(false, 64).await;
        let frame = vec![5u8; MAX_FRAME - 40];
        let mut sent = 0usize;
        let mut id = 1;
        'streams: loop {
            assert!(h.send(mux(OPEN_UNI, id, &[])).await);
            for _ in 0..WINDOW as usize / frame.len() {
                if !h.send(mux(DATA, id, &frame)).await {
                    break 'streams;
                }
                sent += frame.len();
                if sent > mux::CONN_WINDOW as usize + MAX_FRAME {
                    break 'streams;
                }
            }
            id += 2;
        }
        let flood = format!("{sent} bytes buffered for streams nobody accepted");
        h.assert_cut_off("the connection exceeded its credit", &flood)
            .await;
    }
}

/// Flow control between two connections of this module, over an in-memory pipe.
#[cfg(test)]
mod flow_tests {
    use super::*;

    const MAX_FRAME: usize = 64 * 1024;

    /// A dialer and an acceptor joined by a pipe (version 2), and what keeps them open.
    async fn pair() -> (WsConn, WsConn, watch::Sender<bool>) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let config = Some(ws_config(MAX_FRAME));
        let wa =
            WebSocketStream::from_raw_socket(a, tungstenite::protocol::Role::Client, config).await;
        let wb =
            WebSocketStream::from_raw_socket(b, tungstenite::protocol::Role::Server, config).await;
        let settings = TransportSettings {
            incidents: Default::default(),
            max_frame_size: MAX_FRAME,
            max_concurrent_streams: 64,
            keep_alive_interval: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
        };
        let (endpoint, rx) = watch::channel(false);
        let remote = SocketAddr::from(([127, 0, 0, 1], 9));
        let counters = || Arc::new(Counters::default());
        let dialer = WsConn::start_over(wa, true, remote, true, &settings, counters(), rx.clone());
        let acceptor = WsConn::start_over(wb, true, remote, false, &settings, counters(), rx);
        (dialer, acceptor, endpoint)
    }

    async fn accept_uni(conn: &WsConn) -> WsRecv {
        match conn.accept_uni().await {
            Ok(RecvStream::Ws(r)) => r,
            Ok(_) => unreachable!("a websocket connection"),
            Err(e) => panic!("accept: {e}"),
        }
    }

    /// A stream window's worth of frames.
    fn window_of_frames() -> Vec<Bytes> {
        let frame = Bytes::from(vec![1u8; MAX_FRAME]);
        vec![frame; mux::WINDOW as usize / MAX_FRAME]
    }

    /// Streams the receiver holds unread take the connection's window; once they are dropped,
    /// unread, it is back and the sender goes on.
    #[tokio::test]
    async fn dropping_unread_streams_gives_the_connection_window_back() {
        let (dialer, acceptor, _endpoint) = pair().await;
        let per_stream = mux::CONN_WINDOW / mux::WINDOW;
        let mut held = Vec::new();
        for _ in 0..per_stream {
            let (mut send, _) = dialer.open(false).await.expect("open");
            send.send_batch(&window_of_frames())
                .await
                .expect("within credit");
            held.push((send, accept_uni(&acceptor).await));
        }
        assert!(dialer.inner.state().mux.connection_credit() <= 0);
        // One more stream: its first frame waits for connection credit.
        let (mut last, _) = dialer.open(false).await.expect("open");
        let blocked =
            tokio::spawn(async move { last.send_batch(&window_of_frames()).await.map(|()| last) });
        let mut recv = accept_uni(&acceptor).await;
        drop(held); // unread: every byte of it returned to the connection's window
        let mut last = tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("the sender got the connection's credit back")
            .expect("task")
            .expect("sent");
        last.finish();
        let mut got = 0;
        while let Some(f) = recv.recv().await.expect("read") {
            got += f.len();
        }
        assert_eq!(got, mux::WINDOW as usize);
    }

    /// Far more than both windows crosses one stream read as it comes, and many streams at
    /// once, each read to its end: credit flows back at both levels, nothing stalls.
    #[tokio::test]
    async fn credit_flows_back_at_both_levels() {
        let (dialer, acceptor, _endpoint) = pair().await;
        let streams = 24;
        let rounds = 3;
        let readers = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..streams {
                // Bidirectional: up to 64 wait to be accepted (16 unidirectional).
                let mut recv = match acceptor.accept_bi().await {
                    Ok((_, RecvStream::Ws(r))) => r,
                    Ok(_) => unreachable!("a websocket connection"),
                    Err(e) => panic!("accept: {e}"),
                };
                tasks.spawn(async move {
                    let mut got = 0;
                    while let Some(f) = recv.recv().await.expect("read") {
                        got += f.len();
                    }
                    got
                });
            }
            let mut total = 0;
            while let Some(got) = tasks.join_next().await {
                total += got.expect("reader");
            }
            (total, acceptor)
        });
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let (mut send, _recv) = dialer.open(true).await.expect("open");
            senders.spawn(async move {
                let _recv = _recv;
                for _ in 0..rounds {
                    send.send_batch(&window_of_frames()).await.expect("send");
                }
                send.finish();
            });
        }
        while let Some(res) = senders.join_next().await {
            res.expect("sender");
        }
        let (total, _acceptor) = tokio::time::timeout(Duration::from_secs(30), readers)
            .await
            .expect("every stream read to its end")
            .expect("readers");
        // 24 × 3 × 512 KiB = 36 MiB through an 8 MiB connection window.
        assert_eq!(total, streams * rounds * mux::WINDOW as usize);
    }
}
