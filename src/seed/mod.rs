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

mod list;

use std::net::SocketAddr;

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
