//! Mutual TLS material: every node presents a certificate signed by the cluster CA and verifies
//! its peers' certificates against the same CA.
//!
//! Production loads PEM files ([`TlsConfig::from_pem_files`]); development and tests generate a
//! throw-away CA in memory with [`DevCa`].

use std::{fs, path::Path, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{RootCertStore, crypto::CryptoProvider, server::WebPkiClientVerifier, version::TLS13};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::error::TlsError;

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

    /// The server and client configs of a transport speaking `alpn`.
    pub(crate) fn transport_configs(
        &self,
        alpn: &[&[u8]],
    ) -> Result<(rustls::ServerConfig, rustls::ClientConfig), crate::ConfigError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        Ok((self.server_config(alpn.clone())?, self.client_config(alpn)?))
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

fn certs_from_pem(pem: &[u8], source: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

fn key_from_pem(pem: &[u8], source: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
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

/// A development certificate authority, generated in memory with rcgen.
///
/// Use it for tests and local demos; in production, issue certificates with your own PKI
/// (cert-manager, Vault...) and load them with [`TlsConfig::from_pem_files`].
///
/// ```
/// use socketioxide_mesh::DevCa;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let ca = DevCa::generate("demo CA")?;
/// let tls_a = ca.node_tls("node-a")?;
/// let tls_b = ca.node_tls("node-b")?;
/// # let _ = (tls_a, tls_b);
/// # Ok(()) }
/// ```
pub struct DevCa {
    cert: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    server_name: String,
}

/// A node certificate and its key, in PEM.
#[derive(Clone)]
pub struct NodeCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// Generate a new CA whose certificate has the given common name.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Self {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            server_name: DEFAULT_SERVER_NAME.into(),
        })
    }

    /// Use another cluster DNS name in the certificates issued from now on.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issue a node certificate (server and client auth) for `node_name`, valid for the cluster
    /// DNS name and `<node_name>.<cluster name>`.
    pub fn issue(&self, node_name: &str) -> Result<NodeCert, TlsError> {
        let sans = [
            self.server_name.clone(),
            format!("{node_name}.{}", self.server_name),
        ];
        self.sign(node_name, &sans)
    }

    /// Issue a certificate for a service (the discovery service, say) valid for the given DNS
    /// names and IP addresses, with server and client authentication usages.
    pub fn issue_server(&self, names: &[&str]) -> Result<NodeCert, TlsError> {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        self.sign(names.first().copied().unwrap_or("service"), &sans)
    }

    /// A leaf certificate for `sans` (DNS names, or IP addresses when they parse as such).
    fn sign(&self, common_name: &str, sans: &[String]) -> Result<NodeCert, TlsError> {
        let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let mut params = CertificateParams::new(sans.to_vec()).map_err(gen_err)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issue a node certificate and build the [`TlsConfig`] that uses it.
    pub fn node_tls(&self, node_name: &str) -> Result<TlsConfig, TlsError> {
        let node = self.issue(node_name)?;
        let chain = certs_from_pem(node.cert_pem.as_bytes(), "generated certificate")?;
        let key = key_from_pem(node.key_pem.as_bytes(), "generated key")?;
        Ok(TlsConfig::from_der(vec![self.cert.clone()], chain, key)?
            .with_server_name(self.server_name.clone()))
    }

    /// Write `ca.pem` and a node certificate (`node.pem`, `node.key`) to `dir`, the layout
    /// [`TlsConfig::from_dir`] reads. The CA private key is not written: this CA can issue no
    /// more certificates once dropped.
    pub fn write_dir(&self, dir: impl AsRef<Path>, node_name: &str) -> Result<(), TlsError> {
        let dir = dir.as_ref();
        let write = |name: &str, data: &str| {
            let path = dir.join(name);
            fs::write(&path, data).map_err(|e| TlsError::Read {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        };
        fs::create_dir_all(dir).map_err(|e| TlsError::Read {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let node = self.issue(node_name)?;
        write("ca.pem", &self.cert_pem)?;
        write("node.pem", &node.cert_pem)?;
        write("node.key", &node.key_pem)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_builds_both_configs() {
        let ca = DevCa::generate("test CA").unwrap();
        let tls = ca.node_tls("n1").unwrap();
        assert!(tls.server_config(vec![b"x".to_vec()]).is_ok());
        assert!(tls.client_config(vec![b"x".to_vec()]).is_ok());
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
        let err = TlsConfig::from_dir(dir.join("missing")).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
