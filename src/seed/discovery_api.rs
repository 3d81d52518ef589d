//! The discovery service's HTTP API, defined once: the client ([`DiscoverySeeds`](super::DiscoverySeeds))
//! and the service (`socketioxide-mesh-discovery`) both use these types and rules.
//!
//! `POST /v1/clusters/{cluster}/nodes` with a [`Register`] body answers a [`Registered`].

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A registration (or renewal): this node's id and the address its peers dial.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// The node's id.
    pub node_id: String,
    /// The node's mesh address.
    pub addr: SocketAddr,
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Registered {
    /// A few live nodes of the cluster to contact (never the node itself).
    pub seeds: Vec<SocketAddr>,
    /// Renew before this many milliseconds.
    pub ttl_ms: u64,
}

/// Whether `id` is a valid cluster id: 1-64 characters from `[A-Za-z0-9._-]` (the same rule
/// for [`MeshConfig::with_cluster_id`](crate::MeshConfig::with_cluster_id) and the service).
///
/// ```
/// use socketioxide_mesh::seed::discovery_api::valid_cluster_id;
/// assert!(valid_cluster_id("chat-prod.eu"));
/// assert!(!valid_cluster_id("") && !valid_cluster_id("a/b"));
/// ```
pub fn valid_cluster_id(id: &str) -> bool {
    valid_id(id, 64, b"._-")
}

/// Whether `id` is a valid node id: 1-128 characters from `[A-Za-z0-9._:-]`.
pub fn valid_node_id(id: &str) -> bool {
    valid_id(id, 128, b"._:-")
}

/// 1 to `max` characters, each ASCII alphanumeric or one of `extra`.
fn valid_id(id: &str, max: usize, extra: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= max
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}
