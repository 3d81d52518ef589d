//! Mutual TLS material: every node presents a certificate signed by the cluster CA and verifies
//! its peers' certificates against the same CA.
//!
//! **A node certificate** is one that chains to the cluster CA, is valid now, names the
//! cluster's node DNS name ([`TlsConfig::server_name`], default [`DEFAULT_SERVER_NAME`]) and
//! carries *both* the serverAuth and clientAuth extended key usages (every node dials and is
//! dialed). Both ends of every peer connection check exactly this, with the same code
//! ([`NodeVerifier`]): a certificate from the right CA issued for something else (the discovery
//! service, a client, another cluster's name) is refused during the TLS handshake, before a
//! byte of the peer protocol or of gossip is read.
//!
//! Production loads PEM files ([`TlsConfig::from_pem_files`]); development and tests generate a
//! throw-away CA in memory with [`DevCa`].

use std::{fs, path::Path, sync::Arc};

use rustls::{
    DigitallySignedStruct, DistinguishedName as RootHint, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    version::TLS13,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};

use crate::error::TlsError;

#[cfg(feature = "dev-ca")]
mod dev;
#[cfg(feature = "dev-ca")]
pub use dev::{CertSpec, DevCa, NodeCert};

/// The DNS name every node certificate carries and every node verifies when it dials a peer.
///
/// Nodes are dialed by socket address, so certificates do not need per-node IP SANs: the
/// cluster shares this name. Override it with [`TlsConfig::with_server_name`].
pub const DEFAULT_SERVER_NAME: &str = "socketioxide-mesh.internal";

/// The ring crypto provider. Every rustls config is built with it explicitly: with two
/// providers compiled in, rustls' implicit default would panic.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates and key a node uses for mutual TLS with its peers.
///
/// ```
/// use socketioxide_mesh::{DevCa, TlsConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let ca = DevCa::generate("my-cluster CA")?;
/// let node = ca.issue("node-a")?;
/// let tls = TlsConfig::from_pem(ca.cert_pem().as_bytes(), node.cert_pem.as_bytes(), node.key_pem.as_bytes())?;
/// assert_eq!(tls.server_name(), socketioxide_mesh::tls::DEFAULT_SERVER_NAME);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TlsConfig {
    ca: Vec<CertificateDer<'static>>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server_name: String,
    /// The files it was read from, to reload them when they change.
    files: Option<[std::path::PathBuf; 3]>,
}

impl Clone for TlsConfig {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            server_name: self.server_name.clone(),
            files: self.files.clone(),
        }
    }
}

impl TlsConfig {
    /// Build from DER: the CA certificate(s) to trust, this node's chain (leaf first) and key.
    pub fn from_der(
        ca: Vec<CertificateDer<'static>>,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        if ca.is_empty() {
            return Err(TlsError::Missing {
                what: "certificate",
                source_name: "CA list".into(),
            });
        }
        if cert_chain.is_empty() {
            return Err(TlsError::Missing {
                what: "certificate",
                source_name: "node chain".into(),
            });
        }
        let cfg = Self {
            ca,
            cert_chain,
            key,
            server_name: DEFAULT_SERVER_NAME.into(),
            files: None,
        };
        // Fail now, at configuration time, rather than at the first handshake.
        cfg.server_config(Vec::new())?;
        cfg.client_config(Vec::new())?;
        Ok(cfg)
    }

    /// Build from PEM text: CA certificate(s), this node's certificate chain, its private key.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let ca = certs_from_pem(ca_pem, "CA PEM")?;
        let chain = certs_from_pem(cert_pem, "certificate PEM")?;
        let key = key_from_pem(key_pem, "key PEM")?;
        Self::from_der(ca, chain, key)
    }

    /// Load PEM files, as mounted from a Kubernetes secret or written by cert-manager.
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            fs::read(p).map_err(|e| TlsError::Read {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let (ca, cert, key_path) = (ca.as_ref(), cert.as_ref(), key.as_ref());
        let ca_certs = certs_from_pem(&read(ca)?, &ca.display().to_string())?;
        let chain = certs_from_pem(&read(cert)?, &cert.display().to_string())?;
        let key = key_from_pem(&read(key_path)?, &key_path.display().to_string())?;
        let mut cfg = Self::from_der(ca_certs, chain, key)?;
        cfg.files = Some([ca.to_path_buf(), cert.to_path_buf(), key_path.to_path_buf()]);
        Ok(cfg)
    }

    /// Load `ca.pem`, `node.pem` and `node.key` from a folder, the layout written by
    /// [`DevCa::write_dir`] and by the `gen-certs` example.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        let dir = dir.as_ref();
        Self::from_pem_files(
            dir.join("ca.pem"),
            dir.join("node.pem"),
            dir.join("node.key"),
        )
    }

    /// When read from files: the newest modification time among them.
    pub(crate) fn files_modified(&self) -> Option<std::time::SystemTime> {
        self.files
            .as_ref()?
            .iter()
            .filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
            .max()
    }

    /// Read the files again (same server name). `None` when not read from files.
    pub(crate) fn reload(&self) -> Option<Result<TlsConfig, TlsError>> {
        let [ca, cert, key] = self.files.as_ref()?;
        Some(
            Self::from_pem_files(ca, cert, key)
                .map(|t| t.with_server_name(self.server_name.clone())),
        )
    }

    /// Set the DNS name checked in peers' certificates. Default: [`DEFAULT_SERVER_NAME`].
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// The DNS name checked in peers' certificates.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca {
            roots
                .add(ca.clone())
                .map_err(|e| TlsError::Rustls(format!("bad CA certificate: {e}")))?;
        }
        Ok(Arc::new(roots))
    }

    /// A rustls server configuration (TLS 1.3, ring) that presents this certificate and
    /// requires a client certificate from the cluster CA: for your own endpoints that only
    /// cluster members may call (the discovery service uses it).
    pub fn rustls_server_config(
        &self,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        self.server_config(alpn)
    }

    /// A rustls client configuration (TLS 1.3, ring) that trusts the cluster CA and presents
    /// this certificate.
    pub fn rustls_client_config(
        &self,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        self.client_config(alpn)
    }

    /// The server and client configs of a transport speaking `alpn`: both ends accept only
    /// node certificates (see the [module docs](self)).
    pub(crate) fn transport_configs(
        &self,
        alpn: &[&[u8]],
    ) -> Result<(rustls::ServerConfig, rustls::ClientConfig), crate::ConfigError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let verifier = Arc::new(self.node_verifier()?);
        let tls_err = |e: rustls::Error| TlsError::Rustls(e.to_string());
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        server.alpn_protocols = alpn.clone();
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        client.alpn_protocols = alpn;
        Ok((server, client))
    }

    /// The verifier both ends of a peer connection use.
    pub fn node_verifier(&self) -> Result<NodeVerifier, TlsError> {
        NodeVerifier::new(self.roots()?, &self.server_name)
    }

    /// Whether this node's own certificate is a node certificate its peers will accept now
    /// (checked at start and on reload, to say so in the log rather than be refused in
    /// silence).
    pub fn check_own_certificate(&self) -> Result<(), TlsError> {
        let verifier = self.node_verifier()?;
        let (leaf, rest) = self
            .cert_chain
            .split_first()
            .ok_or_else(|| TlsError::Rustls("no certificate".into()))?;
        verifier
            .verify_node(leaf, rest, UnixTime::now())
            .map_err(|e| TlsError::NotANodeCertificate(describe_refusal(&e, verifier.name())))
    }

    /// A TLS 1.3 server config that requires a client certificate from the cluster CA.
    pub(crate) fn server_config(
        &self,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        cfg.alpn_protocols = alpn;
        Ok(cfg)
    }

    /// A TLS 1.3 client config that trusts the cluster CA and presents this node's certificate.
    pub(crate) fn client_config(
        &self,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        cfg.alpn_protocols = alpn;
        Ok(cfg)
    }
}

pub(crate) fn certs_from_pem(
    pem: &[u8],
    source: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            source_name: source.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            what: "certificate",
            source_name: source.into(),
        });
    }
    Ok(certs)
}

pub(crate) fn key_from_pem(pem: &[u8], source: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            what: "private key",
            source_name: source.into(),
        },
        e => TlsError::Pem {
            source_name: source.into(),
            reason: e.to_string(),
        },
    })
}

/// Checks that a peer's certificate is a node certificate of this cluster (see the
/// [module docs](self)); used by both ends of every peer connection, so an accepted connection
/// and a dialed one check the same thing.
///
/// ```
/// use socketioxide_mesh::{DevCa, tls::CertSpec};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let ca = DevCa::generate("cluster CA")?;
/// let verifier = ca.node_tls("a")?.node_verifier()?;
/// let node = ca.issue("b")?;
/// assert!(verifier.verify_pem(&node.cert_pem).is_ok());
/// // Same CA, but the discovery service's profile: refused by a node.
/// let discovery = ca.issue_server(&["mesh-discovery"])?;
/// assert!(verifier.verify_pem(&discovery.cert_pem).is_err());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NodeVerifier {
    /// Chain, validity, serverAuth usage and the node name.
    server: Arc<WebPkiServerVerifier>,
    /// Chain, validity and clientAuth usage.
    client: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl NodeVerifier {
    fn new(roots: Arc<RootCertStore>, name: &str) -> Result<Self, TlsError> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| TlsError::Rustls(format!("bad cluster DNS name {name:?}: {e}")))?;
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let client = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        Ok(Self {
            server,
            client,
            name,
        })
    }

    /// The node checks, on the certificate chain a peer presented.
    pub fn verify_node(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        self.client
            .verify_client_cert(end_entity, intermediates, now)?;
        self.server
            .verify_server_cert(end_entity, intermediates, &self.name, &[], now)?;
        Ok(())
    }

    /// [`verify_node`](Self::verify_node) on a PEM chain (leaf first), now; the error says why
    /// it is not a node certificate.
    pub fn verify_pem(&self, chain_pem: &str) -> Result<(), TlsError> {
        let chain = certs_from_pem(chain_pem.as_bytes(), "certificate PEM")?;
        let (leaf, rest) = chain.split_first().ok_or(TlsError::Missing {
            what: "certificate",
            source_name: "certificate PEM".into(),
        })?;
        self.verify_node(leaf, rest, UnixTime::now())
            .map_err(|e| TlsError::NotANodeCertificate(describe_refusal(&e, self.name())))
    }

    /// The node DNS name it checks.
    pub fn name(&self) -> &str {
        match &self.name {
            ServerName::DnsName(n) => n.as_ref(),
            _ => "",
        }
    }
}

/// A refusal in words, for logs and errors.
fn describe_refusal(e: &rustls::Error, name: &str) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(cert) = e else {
        return e.to_string();
    };
    match cert {
        C::Expired | C::ExpiredContext { .. } => "certificate expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "certificate not valid yet".into(),
        C::NotValidForName => {
            format!("certificate does not name {name}: not a node certificate of this cluster")
        }
        C::NotValidForNameContext { presented, .. } => format!(
            "certificate does not name {name} (it names {}): not a node certificate of this cluster",
            presented.join(", ")
        ),
        C::InvalidPurpose => {
            "certificate lacks the serverAuth + clientAuth usages of a node certificate".into()
        }
        C::InvalidPurposeContext { required, .. } => {
            format!("certificate lacks the {required:?} usage a node certificate needs")
        }
        C::UnknownIssuer => "certificate not signed by the cluster CA (UnknownIssuer)".into(),
        other => format!("{other:?}"),
    }
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Peers are dialed by address; the name checked is always the cluster's.
        self.verify_node(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.server.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.server.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.server.supported_verify_schemes()
    }
}

impl ClientCertVerifier for NodeVerifier {
    fn root_hint_subjects(&self) -> &[RootHint] {
        self.client.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_node(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.client.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.client.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.client.supported_verify_schemes()
    }
}

#[cfg(all(test, feature = "dev-ca"))]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn generated_material_builds_both_configs() {
        let ca = DevCa::generate("test CA").unwrap();
        let tls = ca.node_tls("n1").unwrap();
        assert!(tls.server_config(vec![b"x".to_vec()]).is_ok());
        assert!(tls.client_config(vec![b"x".to_vec()]).is_ok());
    }

    #[test]
    fn only_node_certificates_pass_the_node_check() {
        let ca = DevCa::generate("test CA").unwrap();
        let verifier = ca.node_tls("a").unwrap().node_verifier().unwrap();
        let check = |spec: &CertSpec| verifier.verify_pem(&ca.issue_spec(spec).unwrap().cert_pem);
        let node = ca.node_spec("b");
        check(&node).unwrap();

        let refused = |f: &dyn Fn(&mut CertSpec), why: &str| {
            let mut spec = node.clone();
            f(&mut spec);
            let err = check(&spec).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        };
        refused(
            &|s| s.names = vec!["mesh-discovery".into()],
            "does not name",
        );
        refused(&|s| s.server_auth = false, "usage");
        refused(&|s| s.client_auth = false, "usage");
        let day = Duration::from_secs(86_400);
        refused(&|s| s.not_after = SystemTime::now() - day, "expired");
        refused(&|s| s.not_before = SystemTime::now() + day, "not valid yet");
        // The other profiles DevCa issues are not node certificates either.
        for other in [
            ca.issue_server(&["mesh-discovery"]).unwrap(),
            ca.issue_client("admin").unwrap(),
        ] {
            verifier.verify_pem(&other.cert_pem).unwrap_err();
        }
        // Nor is a node certificate from another CA.
        let rogue = DevCa::generate("rogue CA").unwrap();
        let err = verifier
            .verify_pem(&rogue.issue("b").unwrap().cert_pem)
            .unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }

    #[test]
    fn own_certificate_check_says_why() {
        let ca = DevCa::generate("test CA").unwrap();
        ca.node_tls("a").unwrap().check_own_certificate().unwrap();
        let mut spec = ca.node_spec("a");
        spec.client_auth = false;
        let cert = ca.issue_spec(&spec).unwrap();
        let tls = TlsConfig::from_pem(
            ca.cert_pem().as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        )
        .unwrap();
        let err = tls.check_own_certificate().unwrap_err();
        assert!(matches!(err, TlsError::NotANodeCertificate(_)), "{err}");
    }

    #[test]
    fn pem_without_key_is_a_clear_error() {
        let ca = DevCa::generate("test CA").unwrap();
        let node = ca.issue("n1").unwrap();
        let err = TlsConfig::from_pem(ca.cert_pem().as_bytes(), node.cert_pem.as_bytes(), b"")
            .unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Missing {
                    what: "private key",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let ca = DevCa::generate("test CA").unwrap();
        let a = ca.issue("a").unwrap();
        let b = ca.issue("b").unwrap();
        let err = TlsConfig::from_pem(
            ca.cert_pem().as_bytes(),
            a.cert_pem.as_bytes(),
            b.key_pem.as_bytes(),
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::Rustls(_)), "{err}");
    }

    #[test]
    fn garbage_pem_is_refused() {
        let err = TlsConfig::from_pem(b"not pem", b"", b"").unwrap_err();
        assert!(
            matches!(err, TlsError::Missing { .. } | TlsError::Pem { .. }),
            "{err}"
        );
    }

    #[test]
    fn files_round_trip() {
        let dir = std::env::temp_dir().join(format!("sio-mesh-tls-{}", std::process::id()));
        let ca = DevCa::generate("test CA").unwrap();
        ca.write_dir(&dir, "n1").unwrap();
        TlsConfig::from_dir(&dir).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("node.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "the key is private: {mode:o}");
        }
        let err = TlsConfig::from_dir(dir.join("missing")).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
