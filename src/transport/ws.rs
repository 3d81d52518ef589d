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
//! window ([`WINDOW`]): a sender waits for credit instead of filling the receiver's memory, so a
//! slow reader of one stream never blocks the connection for the others (no head-of-line
//! blocking beyond TCP's own). An empty frame counts as one byte of the window (it is queued
//! like any other). A peer that sends beyond its credit, or an unknown kind, breaks the
//! protocol: the connection is closed with code 1, and nothing it sent after is acted upon.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
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

/// ALPN of the peer protocol over WebSocket, version 1: one frame per `DATA` message.
pub(crate) const ALPN_V1: &[u8] = b"sio-mesh-ws/1";
/// Version 2 adds `DATA_FRAMES`. Both are offered and accepted, 2 preferred: a node talks
/// version 1 to a peer of the previous release.
pub(crate) const ALPN_V2: &[u8] = b"sio-mesh-ws/2";
const ALPNS: [&[u8]; 2] = [ALPN_V2, ALPN_V1];
/// The WebSocket request path.
const PATH: &str = "/sio-mesh";
/// Credit of each stream direction, in bytes.
pub(crate) const WINDOW: u32 = 512 * 1024;
/// Mux messages queued for the socket writer; senders wait beyond (TCP backpressure).
const OUT_QUEUE: usize = 256;
/// Control messages (credit, reset, close) waiting for the writer, at most. They are small and
/// go first; a full queue means the peer keeps sending (opening streams, say) while reading
/// nothing of ours: it is cut off rather than queued for without bound.
const CTRL_QUEUE: usize = 4096;
/// Close codes travel as WebSocket close codes in the private range 4000-4999.
const WS_CODE_BASE: u16 = 4000;

const OPEN_BI: u8 = 0;
const OPEN_UNI: u8 = 1;
const DATA: u8 = 2;
const FIN: u8 = 3;
const RESET: u8 = 4;
const CREDIT: u8 = 5;
const DATA_FRAMES: u8 = 6;
/// A `DATA_FRAMES` message is at most this long (the smallest `max_frame_size` allowed).
const MAX_FRAMES_MESSAGE: usize = 64 * 1024;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1 << 40);

type TlsStream = tokio_rustls::TlsStream<Counted<TcpStream>>;
type Ws = WebSocketStream<TlsStream>;

fn mux(kind: u8, id: u32, payload: &[u8]) -> Message {
    let mut buf = BytesMut::with_capacity(5 + payload.len());
    buf.put_u8(kind);
    buf.put_u32(id);
    buf.put_slice(payload);
    Message::Binary(buf.freeze())
}

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

/// A stream's send credit.
struct Credit {
    avail: Mutex<i64>,
    notify: Notify,
    /// The receiver abandoned the stream.
    reset: AtomicBool,
}

enum Item {
    Frame(Bytes),
    Fin,
}

/// What stream halves hand to the connection's writer, in order.
enum Out {
    /// A mux message as it is.
    Msg(Message),
    /// Frames of stream `id`: one `DATA` message each, written together.
    Data { id: u32, frames: Vec<Bytes> },
}

/// The connection's view of one stream.
struct Entry {
    /// Where the reader delivers the stream's frames (`None` once our receive half is gone).
    deliver: Option<mpsc::UnboundedSender<Item>>,
    /// The [`window_cost`] of the frames delivered and not yet credited back: bounded by
    /// `WINDOW + max_frame`.
    outstanding: usize,
    credit: Arc<Credit>,
    send_alive: bool,
}

struct Inner {
    id: u64,
    remote: SocketAddr,
    max_frame: usize,
    dialer: bool,
    /// The peer understands `DATA_FRAMES` (negotiated `sio-mesh-ws/2`).
    data_frames: bool,
    next_id: AtomicU32,
    out: mpsc::Sender<Out>,
    ctrl: mpsc::Sender<Message>,
    streams: Mutex<HashMap<u32, Entry>>,
    accept_bi: AsyncMutex<mpsc::Receiver<(WsSend, WsRecv)>>,
    accept_uni: AsyncMutex<mpsc::Receiver<WsRecv>>,
    open_permits: Arc<Semaphore>,
    closed: watch::Sender<Option<TransportError>>,
    counters: Arc<Counters>,
}

impl Inner {
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
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            for entry in streams.values_mut() {
                entry.deliver = None;
                entry.credit.notify.notify_waiters();
            }
            streams.clear();
        }
    }

    async fn wait_closed(&self) -> TransportError {
        let mut rx = self.closed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(TransportError::EndpointClosed),
            Err(_) => TransportError::EndpointClosed,
        }
    }

    fn control(&self, kind: u8, id: u32, payload: &[u8]) {
        match self.ctrl.try_send(mux(kind, id, payload)) {
            // The writer may be gone (connection closed): nothing to tell then.
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.protocol.fetch_add(1, Ordering::Relaxed);
                warn!(remote = %self.remote, "peer reads nothing of ours while it keeps sending: closing");
                self.set_closed(TransportError::Closed {
                    code: Some(CloseCode::Protocol),
                    reason: "control queue full: the peer does not read".into(),
                });
            }
        }
    }

    /// Close on a protocol violation by the peer.
    fn violation(&self, reason: String) {
        self.counters.protocol.fetch_add(1, Ordering::Relaxed);
        warn!(remote = %self.remote, %reason, "peer broke the websocket mux protocol: closing");
        self.close_with(CloseCode::Protocol, &reason);
    }

    fn close_with(&self, code: CloseCode, reason: &str) {
        // A WebSocket close reason holds at most 123 bytes.
        let mut end = reason.len().min(120);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code: WsCloseCode::from(WS_CODE_BASE + code as u16),
            reason: reason[..end].into(),
        };
        // A full queue: the writer stops on the closed state without the frame.
        let _ = self.ctrl.try_send(Message::Close(Some(frame)));
        self.set_closed(TransportError::Closed {
            code: None,
            reason: "closed locally".into(),
        });
    }

    fn release(&self, id: u32, recv_half: bool) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = streams.get_mut(&id) {
            if recv_half {
                e.deliver = None;
            } else {
                e.send_alive = false;
            }
            if e.deliver.is_none() && !e.send_alive {
                streams.remove(&id);
            }
        }
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
        let data_frames = alpn == Some(ALPN_V2);
        Self::start_over(
            ws,
            data_frames,
            remote,
            dialer,
            settings,
            counters,
            endpoint_closed,
        )
    }

    /// The multiplexer over any WebSocket: TLS in production, an in-memory pipe in tests.
    fn start_over<S>(
        ws: WebSocketStream<S>,
        data_frames: bool,
        remote: SocketAddr,
        dialer: bool,
        settings: &TransportSettings,
        counters: Arc<Counters>,
        mut endpoint_closed: watch::Receiver<bool>,
    ) -> WsConn
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (ctrl_tx, ctrl_rx) = mpsc::channel(CTRL_QUEUE);
        let (bi_tx, bi_rx) = mpsc::channel(settings.max_concurrent_streams as usize);
        let (uni_tx, uni_rx) = mpsc::channel(16);
        let (closed, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            remote,
            max_frame: settings.max_frame_size,
            dialer,
            data_frames,
            next_id: AtomicU32::new(if dialer { 1 } else { 2 }),
            out: out_tx,
            ctrl: ctrl_tx,
            streams: Mutex::new(HashMap::new()),
            accept_bi: AsyncMutex::new(bi_rx),
            accept_uni: AsyncMutex::new(uni_rx),
            open_permits: Arc::new(Semaphore::new(settings.max_concurrent_streams as usize)),
            closed,
            counters,
        });
        let (sink, stream) = ws.split();
        tokio::spawn(write_loop(
            inner.clone(),
            sink,
            out_rx,
            ctrl_rx,
            settings.keep_alive_interval,
        ));
        tokio::spawn(read_loop(
            inner.clone(),
            stream,
            bi_tx,
            uni_tx,
            settings.idle_timeout,
            settings.max_concurrent_streams as usize,
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

    fn halves(
        &self,
        id: u32,
        permit: Option<Arc<OwnedSemaphorePermit>>,
        bi: bool,
    ) -> (WsSend, Option<WsRecv>) {
        let credit = Arc::new(Credit {
            avail: Mutex::new(i64::from(WINDOW)),
            notify: Notify::new(),
            reset: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let mut streams = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.insert(
            id,
            Entry {
                deliver: bi.then_some(tx),
                outstanding: 0,
                credit: credit.clone(),
                send_alive: true,
            },
        );
        let send = WsSend {
            id,
            inner: self.inner.clone(),
            credit,
            finished: false,
            _permit: permit.clone(),
        };
        let recv = bi.then(|| WsRecv {
            id,
            inner: self.inner.clone(),
            rx,
            consumed: 0,
            consumed_cost: 0,
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
        let id = self.inner.next_id.fetch_add(2, Ordering::Relaxed);
        let (send, recv) = self.halves(id, Some(Arc::new(permit)), bi);
        let kind = if bi { OPEN_BI } else { OPEN_UNI };
        self.inner
            .out
            .send(Out::Msg(mux(kind, id, &[])))
            .await
            .map_err(|_| {
                self.inner
                    .closed_error()
                    .unwrap_or(TransportError::EndpointClosed)
            })?;
        Ok((send, recv))
    }
}

/// The messages carrying `frames` of stream `id`: runs of small frames packed into
/// `DATA_FRAMES` messages when the peer understands them, a `DATA` message per frame
/// otherwise (and for a frame too large to share a message).
fn data_messages(id: u32, frames: &[Bytes], packed: bool) -> Vec<Message> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < frames.len() {
        // How many frames from `i` fit one DATA_FRAMES message.
        let mut end = i;
        let mut size = 5;
        while packed && end < frames.len() && size + 4 + frames[end].len() <= MAX_FRAMES_MESSAGE {
            size += 4 + frames[end].len();
            end += 1;
        }
        if end - i >= 2 {
            let mut buf = BytesMut::with_capacity(size);
            buf.put_u8(DATA_FRAMES);
            buf.put_u32(id);
            for f in &frames[i..end] {
                buf.put_u32(f.len() as u32);
                buf.put_slice(f);
            }
            out.push(Message::Binary(buf.freeze()));
            i = end;
        } else {
            out.push(mux(DATA, id, &frames[i]));
            i += 1;
        }
    }
    out
}

/// What a received frame counts against its stream's window: its length, and at least one.
/// An empty frame takes no credit from its sender, but it is queued all the same: counted as
/// nothing, a peer could queue empty frames without bound (16383 per `DATA_FRAMES` message)
/// behind a reader that does not read. Honest nodes never send empty frames.
fn window_cost(frame: &[u8]) -> usize {
    frame.len().max(1)
}

/// Messages written between two flushes at most (a bound on the writer's buffer).
const MAX_FEED: usize = 1024;

/// Writes what the streams queued: everything already queued is handed to the WebSocket
/// before one flush, so a burst of frames leaves in one TLS write (one `writev`), not one
/// each. Control messages (credit, reset, close) go first.
async fn write_loop<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    mut out: mpsc::Receiver<Out>,
    mut ctrl: mpsc::Receiver<Message>,
    keep_alive: Duration,
) {
    let mut ping = tokio::time::interval(keep_alive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed = inner.closed.subscribe();
    let fail = |e: tungstenite::Error| {
        inner.set_closed(TransportError::Closed {
            code: None,
            reason: format!("write failed: {e}"),
        });
    };
    'run: loop {
        let mut next = Some(tokio::select! {
            biased;
            Some(m) = ctrl.recv() => Out::Msg(m),
            Some(o) = out.recv() => o,
            _ = ping.tick() => Out::Msg(Message::Ping(Bytes::new())),
            // Closed here (queued close frames were taken above first): stop writing.
            _ = closed.wait_for(Option::is_some) => break,
            else => break,
        });
        let (mut fed, mut closing) = (0, false);
        while let Some(item) = next.take() {
            let res = match item {
                Out::Msg(m) => {
                    closing = matches!(m, Message::Close(_));
                    fed += 1;
                    sink.feed(m).await
                }
                Out::Data { id, frames } => {
                    let mut res = Ok(());
                    for m in data_messages(id, &frames, inner.data_frames) {
                        fed += 1;
                        res = sink.feed(m).await;
                        if res.is_err() {
                            break;
                        }
                    }
                    res
                }
            };
            if let Err(e) = res {
                fail(e);
                break 'run;
            }
            if closing || fed >= MAX_FEED {
                break;
            }
            next = match ctrl.try_recv() {
                Ok(m) => Some(Out::Msg(m)),
                Err(_) => out.try_recv().ok(),
            };
        }
        if let Err(e) = sink.flush().await {
            fail(e);
            break;
        }
        if closing {
            break;
        }
    }
    let _ = sink.close().await;
}

/// The frames of a `DATA_FRAMES` payload, as slices of it.
fn split_frames(payload: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let Some(header) = payload.get(at..at + 4) else {
            return Err("truncated frame header in DATA_FRAMES".into());
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = at + 4;
        if payload.len() - start < len {
            return Err("truncated frame in DATA_FRAMES".into());
        }
        frames.push(payload.slice(start..start + len));
        at = start + len;
    }
    Ok(frames)
}

async fn read_loop<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    bi_tx: mpsc::Sender<(WsSend, WsRecv)>,
    uni_tx: mpsc::Sender<WsRecv>,
    idle: Duration,
    max_streams: usize,
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
                // Refused from its header, before reading it. Every stream learns why; the
                // stream readers above report the violation.
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
                inner.set_closed(err.clone());
                inner.close_with(CloseCode::Protocol, &reason);
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
        if data.len() < 5 {
            inner.violation(format!("mux message of {} bytes", data.len()));
            continue;
        }
        let kind = data[0];
        let id = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
        let payload = data.slice(5..);
        match kind {
            OPEN_BI | OPEN_UNI => {
                // Streams the peer opens have the peer's parity.
                let theirs = if inner.dialer {
                    id % 2 == 0
                } else {
                    id % 2 == 1
                };
                let exists = inner
                    .streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&id);
                if !theirs || exists {
                    inner.violation(format!("bad stream id {id}"));
                    continue;
                }
                let open = inner
                    .streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .len();
                if open >= max_streams * 2 {
                    inner.control(RESET, id, &[]);
                    continue;
                }
                let credit = Arc::new(Credit {
                    avail: Mutex::new(i64::from(WINDOW)),
                    notify: Notify::new(),
                    reset: AtomicBool::new(false),
                });
                let (tx, rx) = mpsc::unbounded_channel();
                inner
                    .streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        id,
                        Entry {
                            deliver: Some(tx),
                            outstanding: 0,
                            credit: credit.clone(),
                            send_alive: kind == OPEN_BI,
                        },
                    );
                let recv = WsRecv {
                    id,
                    inner: inner.clone(),
                    rx,
                    consumed: 0,
                    consumed_cost: 0,
                    done: false,
                    _permit: None,
                };
                let refused = if kind == OPEN_BI {
                    let send = WsSend {
                        id,
                        inner: inner.clone(),
                        credit,
                        finished: false,
                        _permit: None,
                    };
                    bi_tx.try_send((send, recv)).is_err()
                } else {
                    uni_tx.try_send(recv).is_err()
                };
                if refused {
                    // Too many streams waiting to be accepted: the halves dropped just now
                    // reset the stream for the peer.
                    debug!(remote = %inner.remote, "stream refused: accept queue full");
                }
            }
            DATA | DATA_FRAMES => {
                let frames = if kind == DATA {
                    Ok(vec![payload])
                } else {
                    split_frames(&payload)
                };
                let frames = match frames {
                    Ok(f) => f,
                    Err(reason) => {
                        inner.violation(format!("stream {id}: {reason}"));
                        continue;
                    }
                };
                let mut streams = inner.streams.lock().unwrap_or_else(|e| e.into_inner());
                let Some(entry) = streams.get_mut(&id) else {
                    continue; // a stream we abandoned: its late frames are dropped
                };
                let mut exceeded = false;
                for frame in frames {
                    entry.outstanding += window_cost(&frame);
                    if entry.outstanding > WINDOW as usize + inner.max_frame {
                        exceeded = true;
                        break;
                    }
                    if let Some(deliver) = &entry.deliver {
                        let _ = deliver.send(Item::Frame(frame));
                    }
                }
                if exceeded {
                    drop(streams);
                    inner.violation(format!("stream {id} exceeded its credit"));
                    continue;
                }
            }
            FIN => {
                let streams = inner.streams.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(deliver) = streams.get(&id).and_then(|e| e.deliver.as_ref()) {
                    let _ = deliver.send(Item::Fin);
                }
            }
            RESET => {
                // The peer's receive half is gone: our send half must stop.
                let streams = inner.streams.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = streams.get(&id) {
                    entry.credit.reset.store(true, Ordering::Release);
                    entry.credit.notify.notify_waiters();
                }
            }
            CREDIT => {
                let Ok(n) = <[u8; 4]>::try_from(&payload[..]).map(u32::from_be_bytes) else {
                    inner.violation("malformed credit".into());
                    continue;
                };
                let streams = inner.streams.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = streams.get(&id) {
                    let mut avail = entry.credit.avail.lock().unwrap_or_else(|e| e.into_inner());
                    // Saturating: a peer crediting more than it was ever sent (2^31 credits of
                    // u32::MAX) must not overflow the counter (a panic in a debug build, a
                    // stream stalled on negative credit in release).
                    *avail = avail.saturating_add(i64::from(n));
                    drop(avail);
                    entry.credit.notify.notify_waiters();
                }
            }
            other => inner.violation(format!("unknown mux kind {other}")),
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
    credit: Arc<Credit>,
    finished: bool,
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl WsSend {
    /// Wait until the stream has credit, then take `len` of it.
    async fn take_credit(&self, len: usize) -> Result<(), TransportError> {
        loop {
            let notified = self.credit.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self.inner.closed_error() {
                return Err(e);
            }
            if self.credit.reset.load(Ordering::Acquire) {
                return Err(TransportError::Io("stream reset by peer".into()));
            }
            {
                let mut avail = self.credit.avail.lock().unwrap_or_else(|e| e.into_inner());
                // A send may overdraw the window once: the receiver allows WINDOW + one
                // frame, and a batch is taken frame by frame.
                if *avail > 0 {
                    *avail -= len as i64;
                    return Ok(());
                }
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
                let mut avail = self.credit.avail.lock().unwrap_or_else(|e| e.into_inner());
                while end < frames.len() && *avail >= frames[end].len() as i64 {
                    *avail -= frames[end].len() as i64;
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
            let fin = move || Out::Msg(mux(FIN, id, &[]));
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
        self.inner.release(self.id, false);
    }
}

pub(crate) struct WsRecv {
    id: u32,
    inner: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Item>,
    /// Bytes read and not yet credited back to the sender.
    consumed: usize,
    /// Their [`window_cost`], taken off the stream's `outstanding` with the credit.
    consumed_cost: usize,
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
                self.consumed += f.len();
                self.consumed_cost += window_cost(&f);
                if self.consumed_cost >= WINDOW as usize / 2 {
                    let (n, cost) = (self.consumed, self.consumed_cost);
                    (self.consumed, self.consumed_cost) = (0, 0);
                    if let Some(entry) = self
                        .inner
                        .streams
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(&self.id)
                    {
                        entry.outstanding = entry.outstanding.saturating_sub(cost);
                    }
                    // The sender is credited what it was charged: bytes.
                    if n > 0 {
                        self.inner
                            .control(CREDIT, self.id, &(n as u32).to_be_bytes());
                    }
                }
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
        if !self.done && self.inner.closed_error().is_none() {
            // Tell the sender to stop: nobody reads this stream anymore.
            self.inner.control(RESET, self.id, &[]);
        }
        self.inner.release(self.id, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(m: &Message) -> Bytes {
        match m {
            Message::Binary(b) => b.clone(),
            other => panic!("not binary: {other:?}"),
        }
    }

    /// Decode messages back into frames, as the reader does.
    fn frames_of(messages: &[Message]) -> Vec<Bytes> {
        let mut out = Vec::new();
        for m in messages {
            let b = payload(m);
            assert_eq!(u32::from_be_bytes([b[1], b[2], b[3], b[4]]), 7, "stream id");
            match b[0] {
                DATA => out.push(b.slice(5..)),
                DATA_FRAMES => out.extend(split_frames(&b.slice(5..)).unwrap()),
                k => panic!("kind {k}"),
            }
        }
        out
    }

    #[test]
    fn small_frames_share_a_message_when_the_peer_understands_it() {
        let frames: Vec<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 100])).collect();
        let packed = data_messages(7, &frames, true);
        assert_eq!(packed.len(), 1);
        assert_eq!(payload(&packed[0])[0], DATA_FRAMES);
        assert_eq!(frames_of(&packed), frames);
        // A version 1 peer gets one DATA message per frame.
        let plain = data_messages(7, &frames, false);
        assert_eq!(plain.len(), frames.len());
        assert!(plain.iter().all(|m| payload(m)[0] == DATA));
        assert_eq!(frames_of(&plain), frames);
    }

    #[test]
    fn packed_messages_stay_under_the_smallest_frame_limit() {
        let frames: Vec<Bytes> = (0..50u8).map(|i| Bytes::from(vec![i; 5000])).collect();
        let big = Bytes::from(vec![9u8; MAX_FRAMES_MESSAGE]);
        let mut all = frames.clone();
        all.insert(20, big);
        let messages = data_messages(7, &all, true);
        assert!(messages.len() > 3);
        for m in &messages {
            let b = payload(m);
            if b[0] == DATA_FRAMES {
                assert!(b.len() <= MAX_FRAMES_MESSAGE, "{} bytes", b.len());
            }
        }
        assert_eq!(
            frames_of(&messages),
            all,
            "order kept around the large frame"
        );
    }

    #[test]
    fn truncated_packed_frames_are_refused() {
        let frames = [Bytes::from_static(b"abc"), Bytes::from_static(b"de")];
        let b = payload(&data_messages(7, &frames, true)[0]).slice(5..);
        assert!(split_frames(&b).is_ok());
        for cut in 1..b.len() {
            let res = split_frames(&b.slice(..cut));
            // A cut that falls between frames is a shorter, valid payload.
            if cut != 7 {
                assert!(res.is_err(), "cut at {cut} accepted");
            }
        }
        assert_eq!(split_frames(&Bytes::new()).unwrap(), Vec::<Bytes>::new());
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

    use super::*;
    use crate::fuzz;

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
            let total = self.sent.entry(id).or_default();
            *total += frames.iter().map(|f| window_cost(f)).sum::<usize>();
            if *total <= WINDOW as usize {
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
                    (messages[0].clone(), kind)
                }
                6 => (mux(FIN, id, &[]), Kind::Valid),
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
            let expected = if reason.starts_with("frame of") { 0 } else { 1 };
            assert_eq!(h.violations(), expected, "{reason}");
            assert!(h.conn.inner.closed_error().is_some());
            h.shut_down().await;
        }
    }

    #[tokio::test]
    async fn credit_beyond_the_counter_saturates_instead_of_overflowing() {
        let mut h = acceptor().await;
        let credit = h.conn.inner.streams.lock().unwrap()[&2].credit.clone();
        *credit.avail.lock().unwrap() = i64::MAX - 1;
        for _ in 0..2 {
            assert!(h.send(mux(CREDIT, 2, &u32::MAX.to_be_bytes())).await);
        }
        // Before the fix: the reader panicked on the overflow, and the ping went unanswered.
        assert!(matches!(h.probe().await, Probe::Alive));
        assert_eq!(*credit.avail.lock().unwrap(), i64::MAX);
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
        let mut seen = match h.probe().await {
            Probe::Closed(f) => Some(f),
            Probe::Ended => None,
            Probe::Alive => panic!("{sent} messages of empty frames queued without limit"),
            Probe::Stuck => panic!("stuck"),
        };
        let told = h.told(&mut seen).await.expect("the peer is told why");
        assert_eq!(told.reason.as_str(), "stream 1 exceeded its credit");
        assert_eq!(h.violations(), 1);
        h.shut_down().await;
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
}
