//! Errors, one type per layer. Messages are lowercase and say what went wrong and where.

use std::net::SocketAddr;

use socketioxide_core::adapter::errors::AdapterError;

/// A configuration value that cannot work. Returned by [`MeshConfig::validate`] and
/// [`Mesh::start`], never a panic.
///
/// [`MeshConfig::validate`]: crate::MeshConfig::validate
/// [`Mesh::start`]: crate::Mesh::start
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The cluster id is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid cluster id {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    ClusterId(String),
    /// The node listens on an unspecified address (`0.0.0.0` / `::`), no advertised address
    /// was given, and no interface routes outwards to take the address of.
    #[error(
        "listen address {0} is unspecified: set an advertised address (MESH_ADVERTISE_ADDR) peers can reach"
    )]
    AdvertiseAddrMissing(SocketAddr),
    /// The advertised address cannot be dialed (unspecified IP or port 0 once bound).
    #[error("advertised address {0} cannot be dialed by peers")]
    AdvertiseAddrInvalid(SocketAddr),
    /// A duration or size setting is out of its allowed range.
    #[error("invalid value for {name}: {reason}")]
    Value {
        /// The name of the setting, as in [`MeshConfig`](crate::MeshConfig).
        name: &'static str,
        /// Why the value was refused.
        reason: String,
    },
    /// An environment variable could not be parsed.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Env {
        /// The variable name.
        var: &'static str,
        /// The value found.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// TLS material is missing or unusable.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
}

/// TLS material that could not be loaded or used.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file path.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The PEM input holds no certificate or no private key.
    #[error("no {what} found in {source_name}")]
    Missing {
        /// `"certificate"` or `"private key"`.
        what: &'static str,
        /// Where it was looked for.
        source_name: String,
    },
    /// The PEM input is malformed.
    #[error("malformed PEM in {source_name}: {reason}")]
    Pem {
        /// Where the PEM came from.
        source_name: String,
        /// The parser's message.
        reason: String,
    },
    /// rustls refused the material (for example a key that does not match the certificate).
    #[error("rustls refused the configuration: {0}")]
    Rustls(String),
    /// Generating a development certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// This node's own certificate is not one its peers accept (see [`crate::tls`]).
    #[error("this node's certificate is not a valid node certificate: {0}")]
    NotANodeCertificate(String),
}

/// Why a peer connection was refused or dropped. Carried in logs.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// The peer speaks something else than this protocol (bad magic bytes).
    #[error("peer is not a socketioxide-mesh node (bad magic)")]
    BadMagic,
    /// The peer speaks another version of the protocol.
    #[error("unsupported protocol version {theirs} (this node speaks {ours})")]
    Version {
        /// The version the peer announced.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The peer belongs to another cluster.
    #[error("peer belongs to cluster {theirs:?}, this node to {ours:?}")]
    Cluster {
        /// The cluster id the peer announced.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// The peer uses another transport kind (quic vs ws).
    #[error("peer uses transport {theirs}, this node {ours}")]
    TransportKind {
        /// The peer's transport.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// The peer announced our own node id.
    #[error("peer announced this node's own id")]
    SelfConnect,
    /// The peer refused us, with its reason.
    #[error("refused by peer: {0}")]
    Refused(String),
    /// A frame could not be decoded.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A frame is larger than the configured limit.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced size.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// The handshake did not complete in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The transport failed (TLS refusal, reset, timeout...).
    #[error("transport: {0}")]
    Transport(String),
}

/// The error of mesh operations, bridged into socketioxide's [`AdapterError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was refused.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The transport endpoint could not be opened.
    #[error("cannot open the {kind} endpoint on {addr}: {reason}")]
    Bind {
        /// `quic` or `ws`.
        kind: &'static str,
        /// The listen address.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
    /// Membership (gossip) could not be started.
    #[error("membership: {0}")]
    Membership(String),
    /// The mesh was shut down.
    #[error("the mesh is shut down")]
    Closed,
    /// A value could not be encoded for the wire.
    #[error("encode: {0}")]
    Encode(String),
    /// A value received from a peer could not be decoded into the type asked for.
    #[error("decode: {0}")]
    Decode(String),
    /// Too many requests are in flight (`max_in_flight_requests`) and none finished within
    /// the request timeout: back-pressure, try again later.
    #[error("busy: {0}")]
    Busy(String),
    /// The mesh serves another socketioxide server already (one `SocketIo` per `Mesh`).
    #[error("this mesh is bound to another SocketIo instance (server id {0})")]
    OtherServer(String),
}

impl From<Error> for AdapterError {
    fn from(err: Error) -> Self {
        AdapterError::from(Box::new(err) as Box<dyn std::error::Error + Send>)
    }
}
