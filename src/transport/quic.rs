//! QUIC transport (quinn): one UDP endpoint per node, mutual TLS 1.3, frames as
//! `u32 BE length | payload` on QUIC streams.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use quinn::{
    ConnectionError, ReadError, ReadExactError, VarInt, WriteError,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use tokio::sync::{Mutex, mpsc};

use super::{
    CloseCode, Connection, FrameRecv, FrameSend, Handshakes, MAX_PENDING_HANDSHAKES, Transport,
    TransportError, TransportSettings,
};
use crate::{error::Error, tls::TlsConfig};

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
    refused: Arc<AtomicU64>,
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
    Ok(t)
}

/// The quinn server and client configurations for this TLS material.
fn quinn_configs(
    tls: &TlsConfig,
    settings: &TransportSettings,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), Error> {
    let tconf = Arc::new(transport_config(settings)?);
    let tls_err = |e: String| Error::Config(crate::ConfigError::Tls(crate::TlsError::Rustls(e)));
    let (server_tls, client_tls) = tls.transport_configs(ALPN)?;
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
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|e| Error::Bind {
            kind: "quic",
            addr,
            reason: e.to_string(),
        })?;
        let local_addr = endpoint.local_addr().map_err(|e| Error::Bind {
            kind: "quic",
            addr,
            reason: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel(MAX_PENDING_HANDSHAKES);
        let refused = Arc::new(AtomicU64::new(0));
        let accept_task = tokio::spawn(accept_loop(
            endpoint.clone(),
            tx,
            settings.connect_timeout,
            settings.max_frame_size,
            refused.clone(),
        ));
        Ok(Self {
            endpoint,
            client: std::sync::RwLock::new(client),
            local_addr,
            server_name: tls.server_name().to_owned(),
            settings,
            accepted_rx: Mutex::new(rx),
            refused,
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
    refused: Arc<AtomicU64>,
) {
    let mut handshakes = Handshakes::new(tx, refused, timeout);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = handshakes.reap() => continue,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        if !handshakes.has_room() {
            tracing::warn!(%remote, "too many pending handshakes, refusing connection");
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

#[async_trait]
impl Transport for QuicTransport {
    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Box<dyn Connection>, TransportError> {
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
        Ok(Box::new(QuicConn::new(conn, self.settings.max_frame_size)))
    }

    async fn accept(&self) -> Result<Box<dyn Connection>, TransportError> {
        match self.accepted_rx.lock().await.recv().await {
            Some(conn) => Ok(Box::new(conn)),
            None => Err(TransportError::EndpointClosed),
        }
    }

    fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(CloseCode::Leaving as u32), b"node leaving");
    }

    fn handshake_failures(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn reload_tls(&self, tls: &TlsConfig) -> Result<(), Error> {
        let (server, client) = quinn_configs(tls, &self.settings)?;
        self.endpoint.set_server_config(Some(server));
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
        Ok(())
    }
}

#[derive(Clone)]
struct QuicConn {
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
    fn send_half(&self, s: quinn::SendStream) -> Box<dyn FrameSend> {
        Box::new(QuicSend {
            stream: s,
            max_frame: self.max_frame,
        })
    }
    fn recv_half(&self, r: quinn::RecvStream) -> Box<dyn FrameRecv> {
        Box::new(QuicRecv {
            stream: r,
            max_frame: self.max_frame,
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

#[async_trait]
impl Connection for QuicConn {
    fn id(&self) -> u64 {
        self.id
    }

    fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    async fn open_bi(&self) -> Result<(Box<dyn FrameSend>, Box<dyn FrameRecv>), TransportError> {
        let (s, r) = self.conn.open_bi().await.map_err(|e| conn_error(&e))?;
        Ok((self.send_half(s), self.recv_half(r)))
    }

    async fn accept_bi(&self) -> Result<(Box<dyn FrameSend>, Box<dyn FrameRecv>), TransportError> {
        let (s, r) = self.conn.accept_bi().await.map_err(|e| conn_error(&e))?;
        Ok((self.send_half(s), self.recv_half(r)))
    }

    async fn open_uni(&self) -> Result<Box<dyn FrameSend>, TransportError> {
        let s = self.conn.open_uni().await.map_err(|e| conn_error(&e))?;
        Ok(self.send_half(s))
    }

    async fn accept_uni(&self) -> Result<Box<dyn FrameRecv>, TransportError> {
        let r = self.conn.accept_uni().await.map_err(|e| conn_error(&e))?;
        Ok(self.recv_half(r))
    }

    fn close(&self, code: CloseCode, reason: &str) {
        self.conn
            .close(VarInt::from_u32(code as u32), reason.as_bytes());
    }
}

struct QuicSend {
    stream: quinn::SendStream,
    max_frame: usize,
}

#[async_trait]
impl FrameSend for QuicSend {
    async fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        if frame.len() > self.max_frame {
            return Err(TransportError::FrameTooLarge {
                size: frame.len() as u64,
                max: self.max_frame,
            });
        }
        let header = Bytes::copy_from_slice(&(frame.len() as u32).to_be_bytes());
        self.stream
            .write_all_chunks(&mut [header, frame])
            .await
            .map_err(write_error)
    }

    fn finish(&mut self) {
        // Only fails if the stream is already finished or reset: nothing left to do then.
        let _ = self.stream.finish();
    }
}

struct QuicRecv {
    stream: quinn::RecvStream,
    max_frame: usize,
}

/// Error code sent when we stop reading a stream because of a bad frame.
const STOP_BAD_FRAME: u32 = 1;

#[async_trait]
impl FrameRecv for QuicRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(ReadExactError::FinishedEarly(_)) => return Err(TransportError::Truncated),
            Err(ReadExactError::ReadError(e)) => return Err(read_error(e)),
        }
        let len = u32::from_be_bytes(header) as usize;
        if len > self.max_frame {
            let _ = self.stream.stop(VarInt::from_u32(STOP_BAD_FRAME));
            return Err(TransportError::FrameTooLarge {
                size: len as u64,
                max: self.max_frame,
            });
        }
        // Grow with the data actually received, never with the announced length alone.
        let mut buf = BytesMut::with_capacity(len.min(64 * 1024));
        while buf.len() < len {
            match self.stream.read_chunk(len - buf.len(), true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err(TransportError::Truncated),
                Err(e) => return Err(read_error(e)),
            }
        }
        Ok(Some(buf.freeze()))
    }
}
