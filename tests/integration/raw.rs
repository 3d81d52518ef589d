//! A raw QUIC peer that speaks the documented wire format by hand (README "Peer protocol"),
//! to send what a well-behaved node never would.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, anyhow};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use socketioxide_core::Uid;

pub const MAGIC: &[u8; 4] = b"SIOM";
pub const VERSION: u16 = 1;
const ALPN: &[u8] = b"sio-mesh/1";
const SERVER_NAME: &str = "socketioxide-mesh.internal";

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

pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

pub fn hello_frame(version: u16, hello: &Hello) -> Vec<u8> {
    let mut payload = MAGIC.to_vec();
    payload.extend_from_slice(&version.to_be_bytes());
    payload.extend(rmp_serde::to_vec(hello).expect("encode hello"));
    frame(&payload)
}

pub struct RawPeer {
    endpoint: quinn::Endpoint,
    pub addr: SocketAddr,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl RawPeer {
    /// A client endpoint that trusts `ca_pem` and presents `cert` (or no certificate).
    pub fn new(ca_pem: &str, cert: Option<(&str, &str)>) -> anyhow::Result<RawPeer> {
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
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let addr = endpoint.local_addr()?;
        Ok(RawPeer { endpoint, addr })
    }

    pub async fn connect(&self, to: SocketAddr) -> anyhow::Result<quinn::Connection> {
        Ok(self.endpoint.connect(to, SERVER_NAME)?.await?)
    }

    /// Connect and send a hello frame; return the decoded reply.
    pub async fn handshake(
        &self,
        to: SocketAddr,
        hello: &[u8],
    ) -> anyhow::Result<(quinn::Connection, HelloReply)> {
        let conn = self.connect(to).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(hello).await?;
        send.finish()?;
        let reply = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv))
            .await
            .context("no reply to hello")??;
        anyhow::ensure!(
            reply.len() >= 6 && &reply[..4] == MAGIC,
            "reply without magic"
        );
        let reply: HelloReply = rmp_serde::from_slice(&reply[6..])?;
        Ok((conn, reply))
    }

    /// A hello that the node accepts (right cluster, version, transport).
    pub fn good_hello(&self, cluster: &str) -> Vec<u8> {
        hello_frame(
            VERSION,
            &Hello {
                cluster_id: cluster.into(),
                node_id: Uid::new(),
                advertise_addr: self.addr,
                transport: "quic".into(),
            },
        )
    }

    /// Connect and complete a good handshake.
    pub async fn join(&self, to: SocketAddr, cluster: &str) -> anyhow::Result<quinn::Connection> {
        let (conn, reply) = self.handshake(to, &self.good_hello(cluster)).await?;
        match reply {
            HelloReply::Welcome(node) => {
                anyhow::ensure!(
                    node.cluster_id == cluster && node.transport == "quic",
                    "odd welcome {node:?}"
                );
                Ok(conn)
            }
            HelloReply::Refused(r) => Err(anyhow!("refused: {r}")),
        }
    }
}

pub async fn read_frame(recv: &mut quinn::RecvStream) -> anyhow::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    recv.read_exact(&mut buf).await?;
    Ok(buf)
}

/// The application close code and reason of a connection the node closed.
pub async fn close_of(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        Ok(other) => (u64::MAX, other.to_string()),
        Err(_) => (u64::MAX, "connection still open".into()),
    }
}

/// Close code for protocol violations (README "Peer protocol").
pub const CLOSE_PROTOCOL: u64 = 1;
