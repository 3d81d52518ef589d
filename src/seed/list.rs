//! A static list of `host:port` seeds, names re-resolved at every call.

use std::net::SocketAddr;

use super::{SeedContext, SeedError, SeedSource};

/// A fixed list of `host:port` entries. Host names are resolved again at every call, so a
/// Kubernetes headless Service name (`mesh.default.svc.cluster.local:7800`) yields every ready
/// pod as the set of pods changes.
///
/// ```
/// use socketioxide_mesh::StaticSeeds;
/// let seeds = StaticSeeds::new(["10.0.0.5:7800", "mesh-headless.default.svc:7800"]);
/// # let _ = seeds;
/// ```
#[derive(Debug, Clone)]
pub struct StaticSeeds {
    entries: Vec<String>,
}

impl StaticSeeds {
    /// A list of `host:port` strings.
    pub fn new<S: Into<String>>(entries: impl IntoIterator<Item = S>) -> Self {
        Self {
            entries: entries.into_iter().map(Into::into).collect(),
        }
    }

    /// The entries, as given.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }
}

/// Check that `s` looks like `host:port` (a socket address, or a name and a port).
pub(crate) fn parse_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has an empty host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{s:?} has an invalid port"))?;
    Ok(())
}

#[async_trait::async_trait]
impl SeedSource for StaticSeeds {
    fn name(&self) -> &str {
        "static"
    }

    async fn seeds(&self, _ctx: &SeedContext) -> Result<Vec<SocketAddr>, SeedError> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for entry in &self.entries {
            if let Ok(addr) = entry.parse::<SocketAddr>() {
                out.push(addr);
                continue;
            }
            match tokio::net::lookup_host(entry.as_str()).await {
                Ok(addrs) => out.extend(addrs),
                Err(e) => errors.push(format!("{entry}: {e}")),
            }
        }
        if out.is_empty() && !errors.is_empty() {
            return Err(SeedError::new(errors.join("; ")));
        }
        if !errors.is_empty() {
            tracing::debug!(errors = %errors.join("; "), "some static seeds did not resolve");
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socketioxide_core::Uid;

    fn ctx() -> SeedContext {
        SeedContext {
            cluster_id: "c".into(),
            node_id: Uid::new(),
            advertise_addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn host_port_validation() {
        assert!(parse_host_port("127.0.0.1:80").is_ok());
        assert!(parse_host_port("[::1]:80").is_ok());
        assert!(parse_host_port("svc.ns.svc.cluster.local:7800").is_ok());
        assert!(parse_host_port("svc").is_err());
        assert!(parse_host_port(":80").is_err());
        assert!(parse_host_port("svc:http").is_err());
    }

    #[tokio::test]
    async fn resolves_names_and_keeps_addresses() {
        let seeds = StaticSeeds::new(["127.0.0.1:5", "localhost:6", "10.0.0.1:5"]);
        let got = seeds.seeds(&ctx()).await.unwrap();
        assert!(got.contains(&"127.0.0.1:5".parse().unwrap()));
        assert!(got.contains(&"10.0.0.1:5".parse().unwrap()));
        assert!(
            got.iter().any(|a| a.port() == 6 && a.ip().is_loopback()),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn unresolvable_only_is_an_error() {
        let seeds = StaticSeeds::new(["does-not-exist.invalid:5"]);
        assert!(seeds.seeds(&ctx()).await.is_err());
    }
}
