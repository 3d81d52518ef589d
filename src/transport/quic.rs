//! QUIC transport (quinn): one UDP endpoint per node, mutual TLS 1.3, frames as
//! `u32 BE length | payload` on QUIC streams.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures_util::FutureExt;
use quinn::{
    AsyncUdpSocket, ConnectionError, ReadError, Runtime, UdpPoller, VarInt, WriteError,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    udp::{RecvMeta, Transmit},
};
use tokio::sync::{Mutex, mpsc};

use super::{
    CloseCode, Conn, Handshakes, IoCounters, MAX_PENDING_HANDSHAKES, RecvStream, SendStream,
    TransportError, TransportSettings, frame,
};
use crate::{error::Error, incidents::Incidents, tls::TlsConfig};

/// ALPN of the peer protocol over QUIC.
pub(crate) const ALPN: &[u8] = b"sio-mesh/1";

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) struct QuicTransport {
    endpoint: quinn::Endpoint,
    /// Replaced when the TLS material is reloaded.
    client: std::sync::RwLock<quinn::ClientConfig>,
    local_addr: SocketAddr,
    server_name: String,
    settings: TransportSettings,
    accepted_rx: Mutex<mpsc::Receiver<QuicConn>>,
    io: Arc<IoCounters>,
    /// Owns the accept task; aborted when the transport is dropped.
    _accept_task: tokio::task::JoinHandle<()>,
}

fn transport_config(s: &TransportSettings) -> Result<quinn::TransportConfig, Error> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(s.idle_timeout).map_err(|e| {
        Error::Config(crate::ConfigError::Value {
            name: "idle_timeout",
            reason: e.to_string(),
        })
    })?;
    t.max_concurrent_bidi_streams(VarInt::from_u32(s.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(16))
        .keep_alive_interval(Some(s.keep_alive_interval))
        .max_idle_timeout(Some(idle));
    // Commands flow both ways on every link, so acknowledgements mostly ride on data; ask the
    // peer not to send acknowledgement-only packets for fewer than 10 packets or 5 ms
    // (measured: a quarter fewer `sendmsg` per command under load). Loss recovery on a LAN
    // barely notices.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(10))
        .max_ack_delay(Some(std::time::Duration::from_millis(5)));
    t.ack_frequency_config(Some(ack));
    Ok(t)
}

/// The quinn server and client configurations for this TLS material.
fn quinn_configs(
    tls: &TlsConfig,
    settings: &TransportSettings,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), Error> {
    let tconf = Arc::new(transport_config(settings)?);
    let tls_err = |e: String| Error::Config(crate::ConfigError::Tls(crate::TlsError::Rustls(e)));
    let (server_tls, client_tls) = tls.transport_configs(&[ALPN])?;
    let quic_server = QuicServerConfig::try_from(server_tls).map_err(|e| tls_err(e.to_string()))?;
    let quic_client = QuicClientConfig::try_from(client_tls).map_err(|e| tls_err(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
    server.transport_config(tconf.clone());
    server.migration(false);
    let mut client = quinn::ClientConfig::new(Arc::new(quic_client));
    client.transport_config(tconf);
    Ok((server, client))
}

impl QuicTransport {
    pub(crate) fn bind(
        addr: SocketAddr,
        tls: &TlsConfig,
        settings: TransportSettings,
    ) -> Result<Self, Error> {
        let (server, client) = quinn_configs(tls, &settings)?;
        let bind_err = |e: std::io::Error| Error::Bind {
            kind: "quic",
            addr,
            reason: e.to_string(),
        };
        let io = Arc::new(IoCounters::default());
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
        udp_buffers(&socket);
        let socket = Arc::new(CountingSocket {
            inner: runtime.wrap_udp_socket(socket).map_err(bind_err)?,
            io: io.clone(),
        });
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        let local_addr = endpoint.local_addr().map_err(bind_err)?;
        let (tx, rx) = mpsc::channel(MAX_PENDING_HANDSHAKES);
        let accept_task = tokio::spawn(accept_loop(
            endpoint.clone(),
            tx,
            settings.connect_timeout,
            settings.max_frame_size,
            settings.incidents.clone(),
        ));
        Ok(Self {
            endpoint,
            client: std::sync::RwLock::new(client),
            local_addr,
            server_name: tls.server_name().to_owned(),
            settings,
            accepted_rx: Mutex::new(rx),
            io,
            _accept_task: accept_task,
        })
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self._accept_task.abort();
        self.endpoint.close(
            VarInt::from_u32(CloseCode::Leaving as u32),
            b"endpoint dropped",
        );
    }
}

/// Accepts incoming connections and completes their handshakes concurrently (bounded), so a
/// slow or hostile client cannot hold up the others.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    tx: mpsc::Sender<QuicConn>,
    timeout: std::time::Duration,
    max_frame: usize,
    incidents: Arc<Incidents>,
) {
    let mut handshakes = Handshakes::new(tx, incidents, timeout);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = handshakes.reap() => continue,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        if !handshakes.has_room(remote) {
            incoming.refuse();
            continue;
        }
        handshakes.start(remote, async move {
            incoming
                .await
                .map(|conn| QuicConn::new(conn, max_frame))
                .map_err(|e| format!("tls: {e}"))
        });
    }
}

impl QuicTransport {
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<Conn, TransportError> {
        let client = self
            .client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let connecting = self
            .endpoint
            .connect_with(client, addr, &self.server_name)
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        let conn = tokio::time::timeout(self.settings.connect_timeout, connecting)
            .await
            .map_err(|_| TransportError::Connect(format!("timed out dialing {addr}")))?
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        Ok(Conn::Quic(QuicConn::new(
            conn,
            self.settings.max_frame_size,
        )))
    }

    pub(crate) async fn accept(&self) -> Result<Conn, TransportError> {
        match self.accepted_rx.lock().await.recv().await {
            Some(conn) => Ok(Conn::Quic(conn)),
            None => Err(TransportError::EndpointClosed),
        }
    }

    pub(crate) fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(CloseCode::Leaving as u32), b"node leaving");
    }

    pub(crate) fn incidents(&self) -> &Arc<Incidents> {
        &self.settings.incidents
    }

    pub(crate) fn reload_tls(&self, tls: &TlsConfig) -> Result<(), Error> {
        let (server, client) = quinn_configs(tls, &self.settings)?;
        self.endpoint.set_server_config(Some(server));
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
        Ok(())
    }

    pub(crate) fn protocol_errors(&self) -> u64 {
        0
    }

    pub(crate) fn io(&self) -> &IoCounters {
        &self.io
    }
}

/// Socket buffer size asked of the kernel for the endpoint's UDP socket. Every peer sends to
/// this one socket: the kernel's default (~200 KiB) overflows under bursts at high rates,
/// and each datagram dropped there costs a QUIC retransmission (a latency spike).
const UDP_BUFFER: usize = 4 * 1024 * 1024;

fn udp_buffers(socket: &std::net::UdpSocket) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "cannot inspect the UDP socket");
            return;
        }
    };
    let _ = state.set_recv_buffer_size(socket.into(), UDP_BUFFER);
    let _ = state.set_send_buffer_size(socket.into(), UDP_BUFFER);
    let recv = state.recv_buffer_size(socket.into()).unwrap_or(0);
    // Linux reports twice the size it grants; it caps the size at net.core.rmem_max.
    if recv < UDP_BUFFER {
        tracing::info!(
            granted = recv,
            wanted = UDP_BUFFER,
            "UDP receive buffer smaller than wanted: raise net.core.rmem_max for high message rates"
        );
    }
    tracing::debug!(
        gso_segments = state.max_gso_segments(),
        gro_segments = state.gro_segments(),
        recv_buffer = recv,
        "UDP socket ready"
    );
}

/// The endpoint's UDP socket, counting the system calls quinn makes on it.
#[derive(Debug)]
struct CountingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    io: Arc<IoCounters>,
}

impl AsyncUdpSocket for CountingSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        self.io.send_calls.fetch_add(1, Ordering::Relaxed);
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = self.inner.poll_recv(cx, bufs, meta);
        if res.is_ready() {
            self.io.recv_calls.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[derive(Clone)]
pub(crate) struct QuicConn {
    id: u64,
    conn: quinn::Connection,
    max_frame: usize,
}

impl QuicConn {
    fn new(conn: quinn::Connection, max_frame: usize) -> Self {
        Self {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            conn,
            max_frame,
        }
    }
    fn send_half(&self, s: quinn::SendStream) -> SendStream {
        SendStream::Quic(QuicSend {
            stream: s,
            max_frame: self.max_frame,
            chunks: Vec::new(),
        })
    }
    fn recv_half(&self, r: quinn::RecvStream) -> RecvStream {
        RecvStream::Quic(QuicRecv {
            stream: r,
            decoder: frame::Decoder::new(self.max_frame),
            ended: None,
        })
    }
}

fn conn_error(e: &ConnectionError) -> TransportError {
    match e {
        ConnectionError::ApplicationClosed(close) => TransportError::Closed {
            code: u32::try_from(close.error_code.into_inner())
                .ok()
                .and_then(CloseCode::from_u32),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        ConnectionError::LocallyClosed => TransportError::Closed {
            code: None,
            reason: "closed locally".into(),
        },
        ConnectionError::TimedOut => TransportError::Closed {
            code: None,
            reason: "idle timeout".into(),
        },
        e => TransportError::Closed {
            code: None,
            reason: e.to_string(),
        },
    }
}

fn read_error(e: ReadError) -> TransportError {
    match e {
        ReadError::ConnectionLost(e) => conn_error(&e),
        e => TransportError::Io(e.to_string()),
    }
}

fn write_error(e: WriteError) -> TransportError {
    match e {
        WriteError::ConnectionLost(e) => conn_error(&e),
        e => TransportError::Io(e.to_string()),
    }
}

impl QuicConn {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    pub(crate) fn rtt(&self) -> std::time::Duration {
        self.conn.rtt()
    }

    pub(crate) async fn open_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (s, r) = self.conn.open_bi().await.map_err(|e| conn_error(&e))?;
        Ok((self.send_half(s), self.recv_half(r)))
    }

    pub(crate) async fn accept_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (s, r) = self.conn.accept_bi().await.map_err(|e| conn_error(&e))?;
        Ok((self.send_half(s), self.recv_half(r)))
    }

    pub(crate) async fn open_uni(&self) -> Result<SendStream, TransportError> {
        let s = self.conn.open_uni().await.map_err(|e| conn_error(&e))?;
        Ok(self.send_half(s))
    }

    pub(crate) async fn accept_uni(&self) -> Result<RecvStream, TransportError> {
        let r = self.conn.accept_uni().await.map_err(|e| conn_error(&e))?;
        Ok(self.recv_half(r))
    }

    pub(crate) fn close(&self, code: CloseCode, reason: &str) {
        self.conn
            .close(VarInt::from_u32(code as u32), reason.as_bytes());
    }
}

pub(crate) struct QuicSend {
    stream: quinn::SendStream,
    max_frame: usize,
    /// Reused for the encoded chunks of each batch.
    chunks: Vec<Bytes>,
}

impl QuicSend {
    /// One `write_chunks` for the whole batch: quinn queues it at once, so its connection
    /// driver wakes once and packs the frames into as few packets as fit.
    pub(crate) async fn send_batch(&mut self, frames: &[Bytes]) -> Result<(), TransportError> {
        frame::check(frames, self.max_frame)?;
        self.chunks.clear();
        frame::encode(frames, &mut self.chunks);
        let res = self
            .stream
            .write_all_chunks(&mut self.chunks)
            .await
            .map_err(write_error);
        self.chunks.clear();
        res
    }

    pub(crate) fn finish(&mut self) {
        // Only fails if the stream is already finished or reset: nothing left to do then.
        let _ = self.stream.finish();
    }
}

pub(crate) struct QuicRecv {
    stream: quinn::RecvStream,
    decoder: frame::Decoder,
    /// How the stream ended, when `try_recv` saw it (quinn reports a reset only once).
    ended: Option<Result<(), TransportError>>,
}

/// Error code sent when we stop reading a stream because of a bad frame.
const STOP_BAD_FRAME: u32 = 1;

impl QuicRecv {
    /// The next frame from what was received, reading chunks as quinn delivers them (a chunk
    /// holds many small frames: one read, many frames).
    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            if let Some(frame) = self.decoded()? {
                return Ok(Some(frame));
            }
            let read = match self.ended.take() {
                Some(ended) => ended.map(|()| None),
                None => self
                    .stream
                    .read_chunk(usize::MAX, true)
                    .await
                    .map(|c| c.map(|c| c.bytes))
                    .map_err(read_error),
            };
            match read? {
                Some(chunk) => self.decoder.push(chunk),
                None if self.decoder.is_empty() => return Ok(None),
                None => return Err(TransportError::Truncated),
            }
        }
    }

    pub(crate) fn try_recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            if let Some(frame) = self.decoded()? {
                return Ok(Some(frame));
            }
            // Take what quinn already holds; errors and the end show on the next `recv`.
            if self.ended.is_some() {
                return Ok(None);
            }
            match self.stream.read_chunk(usize::MAX, true).now_or_never() {
                Some(Ok(Some(chunk))) => self.decoder.push(chunk.bytes),
                Some(Ok(None)) => self.ended = Some(Ok(())),
                Some(Err(e)) => self.ended = Some(Err(read_error(e))),
                None => return Ok(None),
            }
        }
    }

    fn decoded(&mut self) -> Result<Option<Bytes>, TransportError> {
        self.decoder.next().inspect_err(|_| {
            let _ = self.stream.stop(VarInt::from_u32(STOP_BAD_FRAME));
        })
    }
}
