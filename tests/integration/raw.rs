//! A raw peer that speaks the documented wire format by hand (README "Peer protocol"), over
//! QUIC or the WebSocket multiplexer, to send what a well-behaved node never would.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, anyhow};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde::{Deserialize, Serialize};
use socketioxide_core::Uid;
use socketioxide_mesh::TransportKind;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

pub const MAGIC: &[u8; 4] = b"SIOM";
pub const VERSION: u16 = 1;
const SERVER_NAME: &str = "socketioxide-mesh.internal";
/// Close code for protocol violations (README "Peer protocol").
pub const CLOSE_PROTOCOL: u64 = 1;
/// Close code of a refused handshake.
pub const CLOSE_REFUSED: u64 = 2;

/// The handshake body, as documented.
#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    pub cluster_id: String,
    pub node_id: Uid,
    pub advertise_addr: SocketAddr,
    pub transport: String,
}

#[derive(Deserialize, Debug)]
pub enum HelloReply {
    #[serde(rename = "0")]
    Welcome(Hello),
    #[serde(rename = "1")]
    Refused(String),
}

/// The payload of a handshake frame.
pub fn hello_payload(version: u16, hello: &Hello) -> Vec<u8> {
    let mut payload = MAGIC.to_vec();
    payload.extend_from_slice(&version.to_be_bytes());
    payload.extend(rmp_serde::to_vec(hello).expect("encode hello"));
    payload
}

/// Transport-specific malformations.
pub enum Abuse {
    /// A frame that ends before its announced length (QUIC), a mux message too short to hold
    /// its header (WebSocket).
    Truncated,
    /// A frame of this many bytes.
    Oversize(usize),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub struct RawPeer {
    kind: TransportKind,
    tls: Arc<rustls::ClientConfig>,
    quic: Option<quinn::Endpoint>,
    pub addr: SocketAddr,
}

impl RawPeer {
    /// A peer that trusts `ca_pem` and presents `cert` (or no certificate).
    pub fn new(
        kind: TransportKind,
        ca_pem: &str,
        cert: Option<(&str, &str)>,
    ) -> anyhow::Result<RawPeer> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let mut tls = match cert {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()?;
                builder
                    .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?
            }
            None => builder.with_no_client_auth(),
        };
        match kind {
            TransportKind::Quic => {
                tls.alpn_protocols = vec![b"sio-mesh/1".to_vec()];
                let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls.clone())?;
                let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
                endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
                let addr = endpoint.local_addr()?;
                Ok(RawPeer {
                    kind,
                    tls: Arc::new(tls),
                    quic: Some(endpoint),
                    addr,
                })
            }
            _ => {
                tls.alpn_protocols = vec![b"sio-mesh-ws/1".to_vec()];
                // Nobody listens there: a node dialing back simply fails.
                let addr = "127.0.0.1:9".parse()?;
                Ok(RawPeer {
                    kind,
                    tls: Arc::new(tls),
                    quic: None,
                    addr,
                })
            }
        }
    }

    pub async fn connect(&self, to: SocketAddr) -> anyhow::Result<RawConn> {
        match &self.quic {
            Some(endpoint) => Ok(RawConn::Quic(endpoint.connect(to, SERVER_NAME)?.await?)),
            None => Ok(RawConn::Ws(WsRaw::connect(self.tls.clone(), to).await?)),
        }
    }

    /// Connect and send a hello frame; return the decoded reply.
    pub async fn handshake(
        &self,
        to: SocketAddr,
        hello: &[u8],
    ) -> anyhow::Result<(RawConn, HelloReply)> {
        let conn = self.connect(to).await?;
        let reply = conn.bi(&[hello.to_vec()]).await?;
        anyhow::ensure!(
            reply.len() >= 6 && &reply[..4] == MAGIC,
            "reply without magic"
        );
        let reply: HelloReply = rmp_serde::from_slice(&reply[6..])?;
        Ok((conn, reply))
    }

    /// A hello that the node accepts (right cluster, version, transport).
    pub fn good_hello(&self, cluster: &str) -> Vec<u8> {
        hello_payload(
            VERSION,
            &Hello {
                cluster_id: cluster.into(),
                node_id: Uid::new(),
                advertise_addr: self.addr,
                transport: self.kind.as_str().into(),
            },
        )
    }

    /// Connect and complete a good handshake.
    pub async fn join(&self, to: SocketAddr, cluster: &str) -> anyhow::Result<RawConn> {
        let (conn, reply) = self.handshake(to, &self.good_hello(cluster)).await?;
        match reply {
            HelloReply::Welcome(node) => {
                anyhow::ensure!(
                    node.cluster_id == cluster && node.transport == self.kind.as_str(),
                    "odd welcome {node:?}"
                );
                Ok(conn)
            }
            HelloReply::Refused(r) => Err(anyhow!("refused: {r}")),
        }
    }
}

pub enum RawConn {
    Quic(quinn::Connection),
    Ws(WsRaw),
}

fn length_prefixed(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

impl RawConn {
    /// Well-formed frames on a new unidirectional stream, then finish it.
    pub async fn uni(&self, frames: &[Vec<u8>]) -> anyhow::Result<()> {
        match self {
            RawConn::Quic(c) => {
                let mut s = c.open_uni().await?;
                s.write_all(&length_prefixed(frames)).await?;
                s.finish()?;
            }
            RawConn::Ws(w) => {
                let id = w.open(1);
                for f in frames {
                    w.send(2, id, f);
                }
                w.send(3, id, &[]);
            }
        }
        Ok(())
    }

    /// Frames on a new bidirectional stream; returns the first frame of the answer.
    pub async fn bi(&self, frames: &[Vec<u8>]) -> anyhow::Result<Vec<u8>> {
        let answer = async {
            match self {
                RawConn::Quic(c) => {
                    let (mut send, mut recv) = c.open_bi().await?;
                    send.write_all(&length_prefixed(frames)).await?;
                    send.finish()?;
                    let mut len = [0u8; 4];
                    recv.read_exact(&mut len).await?;
                    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
                    recv.read_exact(&mut buf).await?;
                    Ok(buf)
                }
                RawConn::Ws(w) => {
                    let (id, mut rx) = w.open_bi();
                    for f in frames {
                        w.send(2, id, f);
                    }
                    w.send(3, id, &[]);
                    rx.recv()
                        .await
                        .ok_or_else(|| anyhow!("connection closed before an answer"))
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .context("no answer")?
    }

    /// Frames on a new bidirectional stream, without waiting for an answer.
    pub async fn bi_no_reply(&self, frames: &[Vec<u8>]) -> anyhow::Result<()> {
        match self {
            RawConn::Quic(c) => {
                let (mut send, _recv) = c.open_bi().await?;
                send.write_all(&length_prefixed(frames)).await?;
                send.finish()?;
                // Keep the receive half until the node reacts.
                let _ = tokio::time::timeout(Duration::from_secs(10), c.closed()).await;
            }
            RawConn::Ws(w) => {
                let (id, _rx) = w.open_bi();
                for f in frames {
                    w.send(2, id, f);
                }
                w.send(3, id, &[]);
            }
        }
        Ok(())
    }

    /// A well-formed header frame on a unidirectional stream, then a malformation.
    pub async fn abuse(&self, header: &[u8], abuse: Abuse) -> anyhow::Result<()> {
        match self {
            RawConn::Quic(c) => {
                let mut s = c.open_uni().await?;
                let mut bytes = length_prefixed(&[header.to_vec()]);
                match abuse {
                    Abuse::Truncated => {
                        bytes.extend_from_slice(&100u32.to_be_bytes());
                        bytes.extend_from_slice(&[0x92; 10]); // 10 of 100 bytes, then the end
                    }
                    // Only the announced length matters: it is refused before being read.
                    Abuse::Oversize(len) => {
                        bytes.extend_from_slice(&(len as u32).to_be_bytes());
                        bytes.extend_from_slice(&[0; 1024]);
                    }
                }
                s.write_all(&bytes).await?;
                s.finish()?;
            }
            RawConn::Ws(w) => {
                let id = w.open(1);
                w.send(2, id, header);
                match abuse {
                    Abuse::Truncated => w.raw(vec![2, 0, 0]),
                    Abuse::Oversize(len) => w.send(2, id, &vec![0u8; len]),
                }
            }
        }
        Ok(())
    }

    /// The application close code and reason when the node closes the connection.
    pub async fn closed(&self) -> (u64, String) {
        let closed = async {
            match self {
                RawConn::Quic(c) => match c.closed().await {
                    quinn::ConnectionError::ApplicationClosed(c) => (
                        c.error_code.into_inner(),
                        String::from_utf8_lossy(&c.reason).into_owned(),
                    ),
                    other => (u64::MAX, other.to_string()),
                },
                RawConn::Ws(w) => {
                    let mut rx = w.closed.clone();
                    match rx.wait_for(Option::is_some).await {
                        Ok(v) => v.clone().unwrap_or((u64::MAX, String::new())),
                        Err(_) => (u64::MAX, "reader gone".into()),
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .unwrap_or((u64::MAX, "connection still open".into()))
    }
}

/// A raw client of the WebSocket multiplexer (`kind | id | payload` messages).
pub struct WsRaw {
    out: mpsc::UnboundedSender<Message>,
    next_id: AtomicU32,
    answers: Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Vec<u8>>>>>,
    closed: watch::Receiver<Option<(u64, String)>>,
}

impl WsRaw {
    async fn connect(tls: Arc<rustls::ClientConfig>, to: SocketAddr) -> anyhow::Result<WsRaw> {
        let tcp = tokio::net::TcpStream::connect(to).await?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::try_from(SERVER_NAME)?, tcp)
            .await?;
        let (ws, _) =
            tokio_tungstenite::client_async(format!("wss://{SERVER_NAME}/sio-mesh"), tls).await?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let answers: Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Vec<u8>>>>> = Arc::default();
        let (closed_tx, closed) = watch::channel(None);
        let answers2 = answers.clone();
        tokio::spawn(async move {
            let end = loop {
                match stream.next().await {
                    Some(Ok(Message::Binary(b))) if b.len() >= 5 && b[0] == 2 => {
                        let id = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
                        if let Some(tx) = answers2.lock().unwrap().get(&id) {
                            let _ = tx.send(b[5..].to_vec());
                        }
                    }
                    Some(Ok(Message::Close(Some(f)))) => {
                        let code: u16 = f.code.into();
                        break (u64::from(code.saturating_sub(4000)), f.reason.to_string());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break (u64::MAX, e.to_string()),
                    None => break (u64::MAX, "connection closed without a close frame".into()),
                }
            };
            answers2.lock().unwrap().clear();
            let _ = closed_tx.send(Some(end));
        });
        Ok(WsRaw {
            out,
            next_id: AtomicU32::new(1),
            answers,
            closed,
        })
    }

    fn raw(&self, bytes: Vec<u8>) {
        let _ = self.out.send(Message::Binary(bytes.into()));
    }

    fn send(&self, kind: u8, id: u32, payload: &[u8]) {
        let mut m = vec![kind];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(payload);
        self.raw(m);
    }

    fn open(&self, kind: u8) -> u32 {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        self.send(kind, id, &[]);
        id
    }

    fn open_bi(&self) -> (u32, mpsc::UnboundedReceiver<Vec<u8>>) {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.answers.lock().unwrap().insert(id, tx);
        self.send(0, id, &[]);
        (id, rx)
    }
}

impl crate::common::Cluster {
    /// A raw peer of this cluster's transport with a valid certificate from its CA.
    pub fn raw_peer(&self, name: &str) -> anyhow::Result<RawPeer> {
        let creds = self.ca.issue(name)?;
        RawPeer::new(
            self.kind,
            self.ca.cert_pem(),
            Some((&creds.cert_pem, &creds.key_pem)),
        )
    }
}
