//! Seed sources: where a node finds its first peers. Membership itself spreads by gossip, so
//! a seed source is only needed to join, and a node that knows any live member keeps working
//! when every seed source is down.
//!
//! Implement [`SeedSource`] to plug your own (Consul, etcd, a cloud API...):
//!
//! ```
//! use std::net::SocketAddr;
//! use socketioxide_mesh::seed::{SeedContext, SeedError, SeedSource};
//!
//! /// Seeds read from a file, one `ip:port` a line, re-read at every call.
//! struct FileSeeds(std::path::PathBuf);
//!
//! #[socketioxide_mesh::async_trait]
//! impl SeedSource for FileSeeds {
//!     fn name(&self) -> &str {
//!         "file"
//!     }
//!     async fn seeds(&self, _ctx: &SeedContext) -> Result<Vec<SocketAddr>, SeedError> {
//!         let text = tokio::fs::read_to_string(&self.0)
//!             .await
//!             .map_err(|e| SeedError::new(format!("{}: {e}", self.0.display())))?;
//!         Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
//!     }
//! }
//! ```

#[cfg(feature = "discovery-client")]
mod discovery;
pub mod discovery_api;
mod list;

use std::{net::SocketAddr, sync::Arc};

#[cfg(feature = "discovery-client")]
pub use discovery::DiscoverySeeds;
pub use list::StaticSeeds;
pub(crate) use list::parse_host_port;
use socketioxide_core::Uid;

/// What a seed source knows about the node asking (a registry needs it to register the node).
#[derive(Debug, Clone)]
pub struct SeedContext {
    /// The cluster id.
    pub cluster_id: String,
    /// This node's id.
    pub node_id: Uid,
    /// The address peers dial to reach this node.
    pub advertise_addr: SocketAddr,
}

/// A seed source failed this time; the mesh logs it, keeps the seeds it had and asks again at
/// the next interval.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SeedError(String);

impl SeedError {
    /// An error with a message.
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// A source of seed addresses. Called periodically by the mesh; every address returned is
/// handed to gossip, which contacts the ones that are not members yet.
#[async_trait::async_trait]
pub trait SeedSource: Send + Sync + 'static {
    /// A short name for logs, such as `static` or `discovery`.
    fn name(&self) -> &str;

    /// Addresses (transport addresses of other nodes) worth contacting. May include this
    /// node's own address; the mesh skips it.
    async fn seeds(&self, ctx: &SeedContext) -> Result<Vec<SocketAddr>, SeedError>;

    /// Called once when the mesh shuts down gracefully (a registry deregisters the node here).
    async fn leave(&self, ctx: &SeedContext) {
        let _ = ctx;
    }
}

/// Asks its sources in order and answers with the first non-empty list: e.g. the discovery
/// service first, a DNS name as fallback.
///
/// (Several sources given to [`MeshConfig::with_seeds`](crate::MeshConfig::with_seeds) are
/// all asked, and their addresses merged; use this when a source should only be a fallback.)
///
/// ```
/// # #[cfg(feature = "discovery-client")] {
/// use socketioxide_mesh::seed::{DiscoverySeeds, FirstOf, StaticSeeds};
/// # fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let seeds = FirstOf::new()
///     .or(DiscoverySeeds::new(["http://discovery:8000"])?)
///     .or(StaticSeeds::new(["mesh-headless.default.svc.cluster.local:7800"]));
/// # let _ = seeds; Ok(()) }
/// # }
/// ```
#[derive(Default)]
pub struct FirstOf {
    sources: Vec<Arc<dyn SeedSource>>,
}

impl FirstOf {
    /// No source yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add the next source to try.
    pub fn or(mut self, source: impl SeedSource) -> Self {
        self.sources.push(Arc::new(source));
        self
    }
}

#[async_trait::async_trait]
impl SeedSource for FirstOf {
    fn name(&self) -> &str {
        "first-of"
    }

    async fn seeds(&self, ctx: &SeedContext) -> Result<Vec<SocketAddr>, SeedError> {
        let mut errors = Vec::new();
        for source in &self.sources {
            match source.seeds(ctx).await {
                Ok(seeds) if !seeds.is_empty() => return Ok(seeds),
                Ok(_) => {}
                Err(e) => errors.push(format!("{}: {e}", source.name())),
            }
        }
        if errors.is_empty() {
            Ok(Vec::new())
        } else {
            Err(SeedError::new(errors.join("; ")))
        }
    }

    async fn leave(&self, ctx: &SeedContext) {
        for source in &self.sources {
            source.leave(ctx).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<SocketAddr>, bool);

    #[async_trait::async_trait]
    impl SeedSource for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        async fn seeds(&self, _: &SeedContext) -> Result<Vec<SocketAddr>, SeedError> {
            if self.1 {
                Err(SeedError::new("down"))
            } else {
                Ok(self.0.clone())
            }
        }
    }

    #[tokio::test]
    async fn first_of_falls_back_in_order() {
        let ctx = SeedContext {
            cluster_id: "c".into(),
            node_id: socketioxide_core::Uid::new(),
            advertise_addr: "10.0.0.1:1".parse().unwrap(),
        };
        let a: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.3:1".parse().unwrap();
        let s = FirstOf::new()
            .or(Fixed(vec![], true))
            .or(Fixed(vec![], false))
            .or(Fixed(vec![a], false))
            .or(Fixed(vec![b], false));
        assert_eq!(s.seeds(&ctx).await.unwrap(), vec![a]);
        let s = FirstOf::new().or(Fixed(vec![], true));
        assert!(s.seeds(&ctx).await.is_err());
        assert!(FirstOf::new().seeds(&ctx).await.unwrap().is_empty());
    }
}
