//! Interest-based routing, without I/O: which rooms each peer has members in, so a broadcast
//! to rooms crosses only the links whose other side can deliver it (as NATS routes announce
//! subject interest with `RS+`/`RS-`).
//!
//! ```text
//!   node B (announcer)                                   node A (router)
//!   every interest_interval: local rooms per namespace
//!   ── diff against what B last announced ──►  Interest{snapshot | changes, applied}
//!      on B's ordered command stream to A       ──► PeerInterest for B: rooms per namespace
//!                                                   A's broadcast to rooms R goes to B only
//!                                                   if B's rooms ∩ R ≠ ∅ (or B is unknown,
//!                                                   or announced "everything")
//! ```
//!
//! Rules that keep deliveries identical to sending everywhere:
//! - A peer is **unknown** (sent everything) until its snapshot arrives on its current command
//!   stream, and again as soon as that stream ends; changes received while unknown are
//!   ignored (the next snapshot carries them).
//! - A namespace over [`MAX_ROOMS`](crate::MeshConfig::max_interest_rooms) rooms, or whose
//!   snapshot would not fit a frame, is announced as **everything**.
//! - Broadcasts with no room (to all, `except` only, to a socket) are not filtered.
//! - **Pins**: when A sends a peer a join (`AddSockets`), that peer may gain members in the
//!   joined rooms; A counts it interested in them until the peer's announcement says it has
//!   applied that join (`applied`: how many of A's commands it applied). So
//!   `io.in(x).join(r)` or `remote_socket.join(r)` followed by `io.to(r).emit(..)` from the
//!   same node reaches the joined sockets, as without routing.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use socketioxide_core::{Str, adapter::Room};

use crate::wire::NsInterest;

/// Pins held for one peer at most: beyond, the peer counts as unknown (it gets everything)
/// until its next snapshot, rather than the pins growing without bound.
pub(crate) const MAX_PINS: usize = 10_000;

/// What a peer has members in, as the router sees it.
#[derive(Debug, Default)]
pub(crate) struct PeerInterest {
    /// `None` while unknown: everything is sent.
    known: Option<HashMap<Str, Rooms>>,
    /// Namespace → room → the sequence number the peer must have applied for the pin to go.
    pins: HashMap<Str, HashMap<Room, u64>>,
}

/// The rooms of one namespace a peer has members in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rooms {
    Everything,
    These(HashSet<Room>),
}

impl PeerInterest {
    /// Whether a broadcast to `rooms` of `ns` must go to this peer.
    pub(crate) fn wants(&self, ns: &str, rooms: &[Room]) -> bool {
        if rooms.is_empty() {
            return true;
        }
        let Some(known) = &self.known else {
            return true;
        };
        let has = match known.get(ns) {
            Some(Rooms::Everything) => return true,
            Some(Rooms::These(set)) => rooms.iter().any(|r| set.contains(r)),
            None => false,
        };
        has || self
            .pins
            .get(ns)
            .is_some_and(|pinned| rooms.iter().any(|r| pinned.contains_key(r)))
    }

    /// Whether the peer's interest is known (a snapshot arrived on its current stream).
    pub(crate) fn is_known(&self) -> bool {
        self.known.is_some()
    }

    /// The peer's command stream ended or restarted: unknown until its next snapshot.
    pub(crate) fn reset(&mut self) {
        self.known = None;
        self.pins.clear();
    }

    /// Apply the peer's announcement. `applied`: how many of our commands the peer had
    /// applied when it made it.
    pub(crate) fn apply(&mut self, applied: u64, snapshot: bool, namespaces: Vec<NsInterest>) {
        if snapshot {
            self.known = Some(HashMap::new());
        }
        let Some(known) = &mut self.known else {
            return; // changes to a state we do not have: the next snapshot brings them
        };
        for entry in namespaces {
            let rooms = if entry.everything {
                Rooms::Everything
            } else if entry.replace || snapshot {
                Rooms::These(entry.add.into_iter().collect())
            } else {
                let mut rooms = match known.remove(&entry.ns) {
                    Some(Rooms::These(set)) => set,
                    // Changes to "everything" cannot be applied: keep it (over-approximation).
                    Some(Rooms::Everything) => {
                        known.insert(entry.ns, Rooms::Everything);
                        continue;
                    }
                    None => HashSet::new(),
                };
                for r in entry.del {
                    rooms.remove(&r);
                }
                rooms.extend(entry.add);
                Rooms::These(rooms)
            };
            match rooms {
                Rooms::These(set) if set.is_empty() => {
                    known.remove(&entry.ns);
                }
                rooms => {
                    known.insert(entry.ns, rooms);
                }
            }
        }
        for pinned in self.pins.values_mut() {
            pinned.retain(|_, seq| *seq > applied);
        }
        self.pins.retain(|_, pinned| !pinned.is_empty());
    }

    /// We sent the peer a join of `rooms` in `ns`; it is applied once the peer has applied
    /// `seq` of our commands.
    pub(crate) fn pin(&mut self, ns: &str, rooms: &[Room], seq: u64) {
        if self.known.is_none() {
            return; // everything goes to it anyway; its snapshot will be newer
        }
        let pinned = self.pins.entry(Str::from(ns.to_string())).or_default();
        for r in rooms {
            let at = pinned.entry(r.clone()).or_default();
            *at = (*at).max(seq);
        }
        if self.pins.values().map(HashMap::len).sum::<usize>() > MAX_PINS {
            self.reset();
        }
    }

    /// Rooms of `ns` the peer announced (for observability and tests): `None` for everything
    /// or unknown.
    pub(crate) fn rooms(&self, ns: &str) -> Option<Vec<String>> {
        match self.known.as_ref()?.get(ns) {
            Some(Rooms::Everything) => None,
            Some(Rooms::These(set)) => {
                let mut v: Vec<String> = set.iter().map(|r| r.to_string()).collect();
                v.sort();
                Some(v)
            }
            None => Some(Vec::new()),
        }
    }
}

/// What this node last announced, per namespace.
#[derive(Debug, Default)]
pub(crate) struct Announcer {
    last: HashMap<Str, Rooms>,
}

/// This node's rooms now: per namespace, its rooms with at least one local member.
pub(crate) type LocalRooms = HashMap<Str, HashSet<Room>>;

impl Announcer {
    /// What `now` is, namespace by namespace, capped at `max_rooms` rooms each.
    fn capped(now: LocalRooms, max_rooms: usize) -> HashMap<Str, Rooms> {
        now.into_iter()
            .map(|(ns, rooms)| {
                let rooms = if rooms.len() > max_rooms {
                    Rooms::Everything
                } else {
                    Rooms::These(rooms)
                };
                (ns, rooms)
            })
            .collect()
    }

    /// Record `now` and return the changes since the last call (empty: nothing changed).
    pub(crate) fn changes(&mut self, now: LocalRooms, max_rooms: usize) -> Vec<NsInterest> {
        let now = Self::capped(now, max_rooms);
        let mut out = Vec::new();
        for (ns, rooms) in &now {
            let before = self.last.get(ns);
            match (before, rooms) {
                (Some(b), r) if b == r => {}
                (_, Rooms::Everything) => out.push(entry(ns, true, true, Vec::new(), Vec::new())),
                (Some(Rooms::These(b)), Rooms::These(r)) => {
                    let add: Vec<Room> = r.difference(b).cloned().collect();
                    let del: Vec<Room> = b.difference(r).cloned().collect();
                    out.push(entry(ns, false, false, add, del));
                }
                (_, Rooms::These(r)) => out.push(entry(
                    ns,
                    false,
                    true,
                    r.iter().cloned().collect(),
                    Vec::new(),
                )),
            }
        }
        for ns in self.last.keys() {
            if !now.contains_key(ns) {
                // The namespace lost its last room (or is gone): nothing of it any more.
                out.push(entry(ns, false, true, Vec::new(), Vec::new()));
            }
        }
        self.last = now;
        out
    }

    /// Everything this node announced last, as a snapshot.
    pub(crate) fn snapshot(&self) -> Vec<NsInterest> {
        self.last
            .iter()
            .map(|(ns, rooms)| match rooms {
                Rooms::Everything => entry(ns, true, true, Vec::new(), Vec::new()),
                Rooms::These(set) => {
                    entry(ns, false, true, set.iter().cloned().collect(), Vec::new())
                }
            })
            .collect()
    }

    /// The same snapshot, every namespace as "everything": small whatever the rooms (for a
    /// snapshot too large for a frame).
    pub(crate) fn snapshot_everything(&self) -> Vec<NsInterest> {
        self.last
            .keys()
            .map(|ns| entry(ns, true, true, Vec::new(), Vec::new()))
            .collect()
    }
}

fn entry(ns: &Str, everything: bool, replace: bool, add: Vec<Room>, del: Vec<Room>) -> NsInterest {
    NsInterest {
        ns: ns.clone(),
        everything,
        replace,
        add,
        del,
    }
}

/// The room scan takes at most one part in this many of a core.
const SCAN_SHARE: u32 = 100;
/// How many recent scan times the cost estimate takes its minimum over.
const SCAN_MEMORY: usize = 8;

/// How long a node waits between scans of its rooms. socketioxide does not tell adapters about
/// `socket.join`, so a node finds its rooms by scanning them, one pass over its memberships;
/// a node with very many scans less often, so that scanning stays under 1 % of a core: a scan
/// that cost `d` waits at least `d` × 100. `d` is the shortest of the last few scans: a scan
/// preempted on a busy machine takes longer by the wall clock without costing more, and must
/// not hold the next announcement back (a join would stay unknown to the other nodes that much
/// longer; on a loaded benchmark host this once delayed announcements past 300 ms).
#[derive(Debug)]
pub(crate) struct ScanPacer {
    interval: Duration,
    recent: [Duration; SCAN_MEMORY],
    next: usize,
}

impl ScanPacer {
    /// Scans `interval` apart at most often.
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            recent: [Duration::MAX; SCAN_MEMORY],
            next: 0,
        }
    }

    /// A scan took `took` (wall clock): the wait before the next one.
    pub(crate) fn after_scan(&mut self, took: Duration) -> Duration {
        self.recent[self.next % SCAN_MEMORY] = took;
        self.next = self.next.wrapping_add(1);
        let cost = self.recent.iter().min().copied().unwrap_or_default();
        self.interval.max(cost.saturating_mul(SCAN_SHARE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(names: &[&'static str]) -> HashSet<Room> {
        names.iter().map(|n| Room::Borrowed(n)).collect()
    }

    fn local(ns: &'static str, names: &[&'static str]) -> LocalRooms {
        HashMap::from([(Str::from(ns), rooms(names))])
    }

    fn r(name: &'static str) -> Vec<Room> {
        vec![Room::Borrowed(name)]
    }

    /// A router's view of a peer fed by that peer's announcer.
    fn known(announcer: &Announcer) -> PeerInterest {
        let mut p = PeerInterest::default();
        p.apply(0, true, announcer.snapshot());
        p
    }

    /// A peer with a member in room "a" of "/", known to the router.
    fn in_room_a() -> (Announcer, PeerInterest) {
        let mut a = Announcer::default();
        a.changes(local("/", &["a"]), 100);
        let p = known(&a);
        (a, p)
    }

    #[test]
    fn an_unknown_peer_gets_everything() {
        let p = PeerInterest::default();
        assert!(p.wants("/", &r("a")));
        assert!(!p.is_known());
    }

    #[test]
    fn a_snapshot_then_changes_route_only_to_rooms_with_members() {
        let mut a = Announcer::default();
        a.changes(local("/", &["a", "b"]), 100);
        let mut p = known(&a);
        assert!(p.wants("/", &r("a")));
        assert!(!p.wants("/", &r("c")));
        assert!(p.wants("/", &[Room::Borrowed("c"), Room::Borrowed("b")]));
        assert!(p.wants("/", &[]), "a broadcast to all goes everywhere");
        assert!(!p.wants("/other", &r("a")), "a namespace it has nothing in");
        let changes = a.changes(local("/", &["b", "c"]), 100);
        p.apply(0, false, changes);
        assert!(!p.wants("/", &r("a")));
        assert!(p.wants("/", &r("c")));
        // The namespace empties: nothing of it.
        let changes = a.changes(LocalRooms::new(), 100);
        p.apply(0, false, changes);
        assert!(!p.wants("/", &r("b")));
        assert_eq!(
            a.changes(LocalRooms::new(), 100),
            vec![],
            "no change, no message"
        );
    }

    #[test]
    fn changes_while_unknown_are_ignored_until_the_next_snapshot() {
        let (mut a, mut p) = in_room_a();
        p.reset();
        let changes = a.changes(local("/", &["b"]), 100);
        p.apply(0, false, changes);
        assert!(!p.is_known());
        assert!(p.wants("/", &r("zzz")), "unknown: everything");
        p.apply(0, true, a.snapshot());
        assert!(p.wants("/", &r("b")));
        assert!(!p.wants("/", &r("a")));
    }

    #[test]
    fn a_namespace_over_the_cap_is_announced_as_everything_and_back() {
        let mut a = Announcer::default();
        a.changes(local("/", &["a", "b", "c"]), 2);
        let mut p = known(&a);
        assert!(p.wants("/", &r("anything")));
        assert_eq!(p.rooms("/"), None);
        let changes = a.changes(local("/", &["a"]), 2);
        assert!(changes[0].replace, "leaving everything replaces the set");
        p.apply(0, false, changes);
        assert!(!p.wants("/", &r("anything")));
        assert_eq!(p.rooms("/"), Some(vec!["a".to_string()]));
        // The small fallback snapshot is everything, whatever the rooms.
        let mut q = PeerInterest::default();
        q.apply(0, true, a.snapshot_everything());
        assert!(q.wants("/", &r("anything")));
    }

    #[test]
    fn a_join_sent_to_a_peer_pins_the_room_until_the_peer_applied_it() {
        let (mut a, mut p) = in_room_a();
        // We sent the peer a join of "r" as our command 7 (it is applied once 8 are).
        p.pin("/", &r("r"), 8);
        assert!(p.wants("/", &r("r")));
        // An announcement made before the peer applied it (a stale "nothing changed") keeps
        // the pin: the join is still on its way.
        p.apply(7, false, Vec::new());
        assert!(p.wants("/", &r("r")));
        // Applied, and the joined socket was not there after all: the pin goes.
        p.apply(8, false, Vec::new());
        assert!(!p.wants("/", &r("r")));
        // Applied, with a member now: the announcement itself has it.
        p.pin("/", &r("s"), 9);
        let changes = a.changes(local("/", &["a", "s"]), 100);
        p.apply(9, false, changes);
        assert!(p.wants("/", &r("s")));
    }

    #[test]
    fn too_many_pins_make_the_peer_unknown_not_a_bigger_table() {
        let (_, mut p) = in_room_a();
        let rooms: Vec<Room> = (0..=MAX_PINS)
            .map(|i| Room::Owned(format!("r{i}")))
            .collect();
        p.pin("/", &rooms, 1);
        assert!(!p.is_known());
        assert!(p.pins.is_empty());
        assert!(p.wants("/", &r("zzz")));
    }

    #[test]
    fn a_stream_that_ends_forgets_pins_and_rooms() {
        let (a, mut p) = in_room_a();
        p.pin("/", &r("r"), 3);
        p.reset();
        assert!(p.wants("/", &r("nothing")), "unknown again");
        p.apply(0, true, a.snapshot());
        assert!(!p.wants("/", &r("r")));
    }

    #[test]
    fn a_scan_slowed_once_does_not_delay_the_next_but_a_costly_one_does() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        let mut p = ScanPacer::new(ms(20));
        assert_eq!(p.after_scan(us(100)), ms(20));
        // Preempted once (5 ms by the wall clock): the next scan is still on time.
        assert_eq!(p.after_scan(ms(5)), ms(20));
        // Every scan costs 1 ms (a node with very many memberships): 100 ms apart, so
        // scanning stays at 1 % of a core.
        for _ in 0..SCAN_MEMORY - 1 {
            p.after_scan(ms(1));
        }
        assert_eq!(p.after_scan(ms(1)), ms(100));
    }
}
