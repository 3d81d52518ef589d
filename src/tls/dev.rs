//! A development certificate authority ([`DevCa`], feature `dev-ca`, on by default): a CA and
//! node certificates generated in memory with rcgen, for tests and local demos. Production
//! loads PEM files issued by its own PKI ([`TlsConfig::from_pem_files`]).

use std::{
    fs,
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;

use super::{DEFAULT_SERVER_NAME, TlsConfig, certs_from_pem, key_from_pem};
use crate::error::TlsError;

/// What [`DevCa::issue_spec`] puts in a certificate. [`DevCa::node_spec`] gives a node's; change
/// fields to make the certificates a node must refuse (tests of the refusal paths).
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Subject common name.
    pub common_name: String,
    /// Subject alternative names: DNS names, or IP addresses when they parse as such.
    pub names: Vec<String>,
    /// The serverAuth extended key usage.
    pub server_auth: bool,
    /// The clientAuth extended key usage.
    pub client_auth: bool,
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
}

impl CertSpec {
    fn new(common_name: &str, names: Vec<String>, server_auth: bool, client_auth: bool) -> Self {
        let now = SystemTime::now();
        Self {
            common_name: common_name.into(),
            names,
            server_auth,
            client_auth,
            // An hour of slack for clocks that disagree a little.
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(DEV_VALIDITY_DAYS * 86_400),
        }
    }
}

/// How long [`DevCa`]'s certificates are valid.
const DEV_VALIDITY_DAYS: u64 = 365;

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

    /// Issue a node certificate for `node_name`: the cluster DNS name and
    /// `<node_name>.<cluster name>`, serverAuth and clientAuth (see the [`tls`](crate::tls) module docs).
    pub fn issue(&self, node_name: &str) -> Result<NodeCert, TlsError> {
        self.issue_spec(&self.node_spec(node_name))
    }

    /// What [`issue`](Self::issue) would put in a node certificate for `node_name`.
    pub fn node_spec(&self, node_name: &str) -> CertSpec {
        let names = vec![
            self.server_name.clone(),
            format!("{node_name}.{}", self.server_name),
        ];
        CertSpec::new(node_name, names, true, true)
    }

    /// Issue a server certificate (the discovery service's, say) for the given DNS names and IP
    /// addresses: serverAuth only, so no node accepts it as a peer.
    pub fn issue_server(&self, names: &[&str]) -> Result<NodeCert, TlsError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cn = names.first().cloned().unwrap_or_else(|| "service".into());
        self.issue_spec(&CertSpec::new(&cn, names, true, false))
    }

    /// Issue a client certificate named `name` (clientAuth only, a DNS name `name`): for a
    /// tool that calls the discovery service; no node accepts it as a peer.
    pub fn issue_client(&self, name: &str) -> Result<NodeCert, TlsError> {
        self.issue_spec(&CertSpec::new(name, vec![name.into()], false, true))
    }

    /// Issue a certificate as `spec` says.
    pub fn issue_spec(&self, spec: &CertSpec) -> Result<NodeCert, TlsError> {
        let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let mut params = CertificateParams::new(spec.names.clone()).map_err(gen_err)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        params.extended_key_usages = [
            (spec.server_auth, ExtendedKeyUsagePurpose::ServerAuth),
            (spec.client_auth, ExtendedKeyUsagePurpose::ClientAuth),
        ]
        .into_iter()
        .filter_map(|(on, usage)| on.then_some(usage))
        .collect();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = spec.not_before.into();
        params.not_after = spec.not_after.into();
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
        // The private key: readable by its owner only, from its creation.
        let key_path = dir.join("node.key");
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(
            &mut options.open(&key_path).map_err(|e| TlsError::Read {
                path: key_path.display().to_string(),
                reason: e.to_string(),
            })?,
            node.key_pem.as_bytes(),
        )
        .map_err(|e| TlsError::Read {
            path: key_path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(())
    }
}
