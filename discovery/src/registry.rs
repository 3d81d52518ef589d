//! The registry (sans-IO): which nodes of which cluster registered, when they last renewed,
//! and which seeds to hand out. It takes `now` as an argument and never reads the clock.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// Bounds on what the registry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Clusters at most.
    pub max_clusters: usize,
    /// Nodes at most in one cluster.
    pub max_nodes_per_cluster: usize,
    /// Seeds handed out per registration.
    pub seeds_per_reply: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_clusters: 1024,
            max_nodes_per_cluster: 1024,
            seeds_per_reply: 3,
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The cluster id is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid cluster id: use 1-64 characters from [A-Za-z0-9._-]")]
    ClusterId,
    /// The node id is empty, too long or has characters outside `[A-Za-z0-9._:-]`.
    #[error("invalid node id: use 1-128 characters from [A-Za-z0-9._:-]")]
    NodeId,
    /// The address cannot be dialed by other nodes; the second field says why.
    #[error("invalid address {0}: {1}")]
    Addr(SocketAddr, &'static str),
    /// The registry holds as many clusters as allowed.
    #[error("too many clusters (limit {0})")]
    TooManyClusters(usize),
    /// The cluster holds as many nodes as allowed.
    #[error("too many nodes in this cluster (limit {0})")]
    TooManyNodes(usize),
}

/// A registered node, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node id.
    pub node_id: String,
    /// Its mesh address.
    pub addr: SocketAddr,
    /// Time since its last registration or renewal.
    pub age: Duration,
}

#[derive(Debug, Clone)]
struct Entry {
    addr: SocketAddr,
    renewed: Instant,
}

/// See the module docs.
#[derive(Debug)]
pub struct Registry {
    ttl: Duration,
    limits: Limits,
    refuse_loopback: bool,
    clusters: HashMap<String, HashMap<String, Entry>>,
    /// Entries dropped for not being renewed in time, since the start.
    expired_total: u64,
}

/// Why other nodes could not dial `addr`, if they could not: port 0, or an unspecified,
/// broadcast or multicast IP (IPv4-mapped IPv6 addresses are judged as IPv4), and a loopback
/// IP when `refuse_loopback` is set.
pub fn addr_problem(addr: SocketAddr, refuse_loopback: bool) -> Option<&'static str> {
    let ip = addr.ip().to_canonical();
    if addr.port() == 0 {
        Some("port 0 cannot be dialed")
    } else if ip.is_unspecified() {
        Some("an unspecified address (0.0.0.0, ::) cannot be dialed")
    } else if ip == std::net::Ipv4Addr::BROADCAST {
        Some("a broadcast address cannot be dialed")
    } else if ip.is_multicast() {
        Some("a multicast address cannot be dialed")
    } else if refuse_loopback && ip.is_loopback() {
        Some("loopback addresses are refused by this service (--refuse-loopback)")
    } else {
        None
    }
}

pub(crate) use socketioxide_mesh::seed::discovery_api::{valid_cluster_id, valid_node_id};

impl Registry {
    /// A registry whose entries live `ttl` after their last renewal.
    pub fn new(ttl: Duration, limits: Limits) -> Self {
        Self {
            ttl,
            limits,
            refuse_loopback: false,
            clusters: HashMap::new(),
            expired_total: 0,
        }
    }

    /// Refuse (or accept, the default) registrations at loopback addresses (`127.0.0.0/8`,
    /// `::1`): other nodes can dial those only when every node runs on one host.
    pub fn refusing_loopback(mut self, refuse: bool) -> Self {
        self.refuse_loopback = refuse;
        self
    }

    /// The time to live of an entry.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Register or renew `node` of `cluster` at `addr`; returns a few live seeds of that
    /// cluster (not the node itself), picked at random with `rng`.
    pub fn register(
        &mut self,
        now: Instant,
        cluster: &str,
        node: &str,
        addr: SocketAddr,
        rng: &mut fastrand::Rng,
    ) -> Result<Vec<SocketAddr>, RegistryError> {
        if !valid_cluster_id(cluster) {
            return Err(RegistryError::ClusterId);
        }
        if !valid_node_id(node) {
            return Err(RegistryError::NodeId);
        }
        if let Some(why) = addr_problem(addr, self.refuse_loopback) {
            return Err(RegistryError::Addr(addr, why));
        }
        self.expire(now);
        if !self.clusters.contains_key(cluster) && self.clusters.len() >= self.limits.max_clusters {
            return Err(RegistryError::TooManyClusters(self.limits.max_clusters));
        }
        let nodes = self.clusters.entry(cluster.to_string()).or_default();
        if !nodes.contains_key(node) && nodes.len() >= self.limits.max_nodes_per_cluster {
            if nodes.is_empty() {
                self.clusters.remove(cluster);
            }
            return Err(RegistryError::TooManyNodes(
                self.limits.max_nodes_per_cluster,
            ));
        }
        // A node restarted at the same address under a new id replaces the old entry.
        nodes.retain(|id, e| id == node || e.addr != addr);
        nodes.insert(node.to_string(), Entry { addr, renewed: now });
        let mut others: Vec<SocketAddr> = nodes
            .iter()
            .filter(|(id, _)| id.as_str() != node)
            .map(|(_, e)| e.addr)
            .collect();
        rng.shuffle(&mut others);
        others.truncate(self.limits.seeds_per_reply);
        Ok(others)
    }

    /// Remove a node; returns whether it was registered.
    pub fn deregister(&mut self, cluster: &str, node: &str) -> bool {
        let Some(nodes) = self.clusters.get_mut(cluster) else {
            return false;
        };
        let removed = nodes.remove(node).is_some();
        if nodes.is_empty() {
            self.clusters.remove(cluster);
        }
        removed
    }

    /// The live nodes of a cluster (empty for an unknown cluster), most recent first.
    pub fn nodes(&self, now: Instant, cluster: &str) -> Vec<NodeView> {
        let mut out: Vec<NodeView> = self
            .clusters
            .get(cluster)
            .into_iter()
            .flat_map(|nodes| nodes.iter())
            .map(|(id, e)| NodeView {
                node_id: id.clone(),
                addr: e.addr,
                age: now.saturating_duration_since(e.renewed),
            })
            .filter(|n| n.age < self.ttl)
            .collect();
        out.sort_by(|a, b| a.age.cmp(&b.age).then_with(|| a.node_id.cmp(&b.node_id)));
        out
    }

    /// Cluster ids with their number of live nodes, sorted by id.
    pub fn clusters(&self, now: Instant) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .clusters
            .keys()
            .map(|c| (c.clone(), self.nodes(now, c).len()))
            .filter(|(_, n)| *n > 0)
            .collect();
        out.sort();
        out
    }

    /// Drop entries not renewed within the TTL; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let ttl = self.ttl;
        let mut removed = 0;
        self.clusters.retain(|_, nodes| {
            let before = nodes.len();
            nodes.retain(|_, e| now.saturating_duration_since(e.renewed) < ttl);
            removed += before - nodes.len();
            !nodes.is_empty()
        });
        self.expired_total += removed as u64;
        removed
    }

    /// Entries expired since the start (by [`expire`](Self::expire), on its own or inside a
    /// registration).
    pub fn expired_total(&self) -> u64 {
        self.expired_total
    }

    /// Whether `node` of `cluster` is registered (live or not yet swept).
    pub fn contains(&self, cluster: &str, node: &str) -> bool {
        self.clusters
            .get(cluster)
            .is_some_and(|nodes| nodes.contains_key(node))
    }

    /// Clusters with at least one entry.
    pub fn num_clusters(&self) -> usize {
        self.clusters.len()
    }

    /// Total live entries (for metrics and the status page).
    pub fn num_nodes(&self) -> usize {
        self.clusters.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], p))
    }

    fn reg(limits: Limits) -> (Registry, fastrand::Rng) {
        (Registry::new(10 * SEC, limits), fastrand::Rng::with_seed(7))
    }

    #[test]
    fn seeds_exclude_the_caller_and_are_bounded() {
        let (mut r, mut rng) = reg(Limits::default());
        let t = Instant::now();
        assert_eq!(r.register(t, "c", "a", addr(1), &mut rng), Ok(vec![]));
        assert_eq!(
            r.register(t, "c", "b", addr(2), &mut rng),
            Ok(vec![addr(1)])
        );
        for (i, n) in ["c1", "c2", "c3", "c4"].iter().enumerate() {
            r.register(t, "c", n, addr(10 + i as u16), &mut rng)
                .unwrap();
        }
        let seeds = r.register(t, "c", "a", addr(1), &mut rng).unwrap();
        assert_eq!(seeds.len(), 3);
        assert!(!seeds.contains(&addr(1)));
        // Other clusters are separate.
        assert_eq!(r.register(t, "other", "x", addr(99), &mut rng), Ok(vec![]));
    }

    #[test]
    fn entries_expire_unless_renewed() {
        let (mut r, mut rng) = reg(Limits::default());
        let t0 = Instant::now();
        r.register(t0, "c", "a", addr(1), &mut rng).unwrap();
        r.register(t0, "c", "b", addr(2), &mut rng).unwrap();
        // b renews at 6 s, a does not.
        r.register(t0 + 6 * SEC, "c", "b", addr(2), &mut rng)
            .unwrap();
        let at = t0 + 11 * SEC;
        let nodes = r.nodes(at, "c");
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].node_id, "b");
        assert_eq!(nodes[0].age, 5 * SEC);
        assert_eq!(r.expire(at), 1);
        assert_eq!(r.expire(t0 + 17 * SEC), 1);
        assert!(r.clusters(t0 + 17 * SEC).is_empty());
        assert_eq!(r.num_nodes(), 0);
    }

    #[test]
    fn limits_are_enforced() {
        let (mut r, mut rng) = reg(Limits {
            max_clusters: 2,
            max_nodes_per_cluster: 2,
            seeds_per_reply: 3,
        });
        let t = Instant::now();
        r.register(t, "c1", "a", addr(1), &mut rng).unwrap();
        r.register(t, "c1", "b", addr(2), &mut rng).unwrap();
        assert_eq!(
            r.register(t, "c1", "c", addr(3), &mut rng),
            Err(RegistryError::TooManyNodes(2))
        );
        // Renewing an existing node is always possible.
        assert!(r.register(t, "c1", "a", addr(1), &mut rng).is_ok());
        r.register(t, "c2", "a", addr(1), &mut rng).unwrap();
        assert_eq!(
            r.register(t, "c3", "a", addr(1), &mut rng),
            Err(RegistryError::TooManyClusters(2))
        );
        // Expired entries free their place.
        assert!(
            r.register(t + 11 * SEC, "c3", "a", addr(1), &mut rng)
                .is_ok()
        );
    }

    #[test]
    fn input_is_validated() {
        let (mut r, mut rng) = reg(Limits::default());
        let t = Instant::now();
        assert_eq!(
            r.register(t, "", "a", addr(1), &mut rng),
            Err(RegistryError::ClusterId)
        );
        assert_eq!(
            r.register(t, "c c", "a", addr(1), &mut rng),
            Err(RegistryError::ClusterId)
        );
        assert_eq!(
            r.register(t, &"c".repeat(65), "a", addr(1), &mut rng),
            Err(RegistryError::ClusterId)
        );
        assert_eq!(
            r.register(t, "c", "<b>", addr(1), &mut rng),
            Err(RegistryError::NodeId)
        );
        assert_eq!(
            r.register(t, "c", "", addr(1), &mut rng),
            Err(RegistryError::NodeId)
        );
        for bad in [
            "0.0.0.0:7800",
            "[::]:7800",
            "10.0.0.1:0",
            "255.255.255.255:1",
            "224.0.0.1:1",
            "239.255.255.250:1900",
            "[ff02::1]:1",
            "[::ffff:224.0.0.1]:1",
            "[::ffff:0.0.0.0]:1",
        ] {
            let a: SocketAddr = bad.parse().unwrap();
            assert!(
                matches!(r.register(t, "c", "a", a, &mut rng), Err(RegistryError::Addr(x, _)) if x == a),
                "{bad} accepted"
            );
        }
        assert_eq!(r.num_nodes(), 0);
    }

    #[test]
    fn loopback_is_accepted_unless_refused() {
        let (mut r, mut rng) = reg(Limits::default());
        let t = Instant::now();
        for (i, ok) in [
            "127.0.0.1:7800",
            "[::1]:7800",
            "10.1.2.3:1",
            "[2001:db8::1]:7800",
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("n{i}");
            let res = r.register(t, "c", &id, ok.parse().unwrap(), &mut rng);
            assert!(res.is_ok(), "{ok}: {res:?}");
        }
        let mut strict = Registry::new(10 * SEC, Limits::default()).refusing_loopback(true);
        for bad in [
            "127.0.0.1:7800",
            "127.8.9.10:1",
            "[::1]:7800",
            "[::ffff:127.0.0.1]:1",
        ] {
            let a: SocketAddr = bad.parse().unwrap();
            let err = strict.register(t, "c", "a", a, &mut rng).unwrap_err();
            assert!(err.to_string().contains("loopback"), "{bad}: {err}");
        }
        assert!(strict.register(t, "c", "a", addr(1), &mut rng).is_ok());
    }

    #[test]
    fn deregister_and_restart_at_the_same_address() {
        let (mut r, mut rng) = reg(Limits::default());
        let t = Instant::now();
        r.register(t, "c", "old", addr(1), &mut rng).unwrap();
        // Restarted pod: same address, new id. The stale entry goes.
        r.register(t, "c", "new", addr(1), &mut rng).unwrap();
        assert_eq!(r.nodes(t, "c").len(), 1);
        assert!(r.deregister("c", "new"));
        assert!(!r.deregister("c", "new"));
        assert!(!r.deregister("nope", "x"));
        assert!(r.nodes(t, "c").is_empty());
    }
}
