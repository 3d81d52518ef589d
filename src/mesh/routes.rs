//! The routing snapshot: the links a command or a request goes to. The driver builds a new
//! one whenever membership or a link changes and publishes it atomically; every broadcast
//! reads the current one without a lock or an allocation.

use std::sync::Arc;

use socketioxide_core::Uid;

use super::Link;

/// See the module docs.
#[derive(Default)]
pub(crate) struct Routes {
    /// The link of every live member, ordered by node id.
    links: Vec<Arc<Link>>,
    /// The socketioxide server id each link serves, if known (same order as `links`; a
    /// cluster is small enough for a scan).
    servers: Vec<Option<Uid>>,
    /// Whether each member announces its rooms and understands announcements (same order).
    interest: Vec<bool>,
}

impl Routes {
    /// `links` with the socketioxide server id each serves, if known, and whether it takes
    /// part in interest-based routing.
    pub(crate) fn new(mut links: Vec<(Arc<Link>, Option<Uid>, bool)>) -> Self {
        links.sort_by_key(|(link, _, _)| link.node);
        let mut routes = Self::default();
        for (link, server, interest) in links {
            routes.links.push(link);
            routes.servers.push(server);
            routes.interest.push(interest);
        }
        routes
    }

    /// The links of the members that take part in interest-based routing.
    pub(crate) fn interest_links(&self) -> impl Iterator<Item = &Arc<Link>> {
        self.links
            .iter()
            .zip(&self.interest)
            .filter_map(|(l, i)| i.then_some(l))
    }

    /// Every live member's link.
    pub(crate) fn links(&self) -> &[Arc<Link>] {
        &self.links
    }

    /// Where an operation goes: the node serving `server_id` when one is given and known
    /// (an operation on a remote socket), every live member otherwise. A member that does not
    /// serve the operation's namespace ignores it (or answers empty): sending to every member
    /// means a namespace registered a moment ago, and not yet gossiped, misses nothing.
    pub(crate) fn targets(&self, server_id: Option<Uid>) -> &[Arc<Link>] {
        let target = server_id.and_then(|sid| self.servers.iter().position(|s| *s == Some(sid)));
        match target {
            Some(i) => std::slice::from_ref(&self.links[i]),
            None => &self.links,
        }
    }
}
