//! Answer tracking (sans-IO; the I/O side is `mesh/request.rs`): which peers a request still
//! waits for, and the accounting of one peer's answer stream.
//!
//! A request to N peers opens one stream per peer. It completes when every peer has answered
//! **or failed** (its connection dropped, membership declared it dead, it broke the protocol),
//! never later than its deadline. There is no per-request timer per peer: a dead peer ends its
//! streams at once.

use std::collections::HashSet;

use crate::{error::PeerError, peers::NodeId, wire::Reply};

/// The peers a request still waits for.
#[derive(Debug, Default)]
pub(crate) struct Gather {
    pending: HashSet<NodeId>,
    /// How many peers failed (why is logged by the caller).
    failed: usize,
}

impl Gather {
    pub(crate) fn new(nodes: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            pending: nodes.into_iter().collect(),
            failed: 0,
        }
    }

    /// The peer answered completely.
    pub(crate) fn done(&mut self, node: NodeId) {
        self.pending.remove(&node);
    }

    /// The peer failed; the request goes on without it.
    pub(crate) fn failed(&mut self, node: NodeId) {
        if self.pending.remove(&node) {
            self.failed += 1;
        }
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.pending.is_empty()
    }

    #[cfg(test)]
    /// Peers still awaited (when the deadline passes, these are reported as timed out).
    pub(crate) fn pending(&self) -> impl Iterator<Item = &NodeId> {
        self.pending.iter()
    }

    /// How many peers failed.
    pub(crate) fn failures(&self) -> usize {
        self.failed
    }
}

/// What one reply frame means for an ack stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AckStep {
    /// The count arrived; acks follow (or, if zero, the peer is done).
    Counted { done: bool },
    /// An ack to hand to the caller; `done` once it was the last expected.
    Ack { done: bool },
}

/// The accounting of one peer's `broadcast_with_ack` answer: first `AckCount(n)`, then exactly
/// `n` acks. Anything else is a protocol violation.
#[derive(Debug, Default)]
pub(crate) struct AckTally {
    expected: Option<u32>,
    received: u32,
}

impl AckTally {
    pub(crate) fn on_reply(&mut self, reply: &Reply) -> Result<AckStep, PeerError> {
        match (reply, self.expected) {
            (Reply::AckCount(n), None) => {
                self.expected = Some(*n);
                Ok(AckStep::Counted { done: *n == 0 })
            }
            (Reply::AckCount(_), Some(_)) => {
                Err(PeerError::Malformed("ack count sent twice".into()))
            }
            (Reply::Ack { .. }, None) => Err(PeerError::Malformed("ack before its count".into())),
            (Reply::Ack { .. }, Some(n)) if self.received >= n => Err(PeerError::Malformed(
                format!("more than the {n} announced acks"),
            )),
            (Reply::Ack { .. }, Some(n)) => {
                self.received += 1;
                Ok(AckStep::Ack {
                    done: self.received == n,
                })
            }
            (Reply::Error(e), _) => Err(PeerError::Refused(e.clone())),
            (other, _) => Err(PeerError::Malformed(format!(
                "unexpected reply in an ack stream: {other:?}"
            ))),
        }
    }

    /// The number of acks announced so far.
    pub(crate) fn expected(&self) -> u32 {
        self.expected.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireValue;
    use socketioxide_core::{Sid, Value};

    fn ack() -> Reply {
        Reply::Ack {
            sid: Sid::new(),
            result: Ok(WireValue(Value::Str("1".into(), None))),
        }
    }

    #[test]
    fn gather_completes_on_answers_and_failures() {
        let (a, b, c) = (Sid::new(), Sid::new(), Sid::new());
        let mut g = Gather::new([a, b, c]);
        assert!(!g.is_complete());
        g.done(a);
        g.failed(b);
        assert!(!g.is_complete());
        assert_eq!(g.pending().collect::<Vec<_>>(), vec![&c]);
        g.failed(c);
        assert!(g.is_complete());
        assert_eq!(g.failures(), 2);
        // A late event for a peer already settled changes nothing.
        g.failed(a);
        assert_eq!(g.failures(), 2);
        assert!(Gather::new([]).is_complete());
    }

    #[test]
    fn ack_tally_counts_then_acks() {
        let mut t = AckTally::default();
        assert_eq!(
            t.on_reply(&Reply::AckCount(2)),
            Ok(AckStep::Counted { done: false })
        );
        assert_eq!(t.on_reply(&ack()), Ok(AckStep::Ack { done: false }));
        assert_eq!(t.on_reply(&ack()), Ok(AckStep::Ack { done: true }));
        assert!(t.on_reply(&ack()).is_err());
        assert_eq!(t.expected(), 2);
    }

    #[test]
    fn ack_tally_zero_count_is_done() {
        let mut t = AckTally::default();
        assert_eq!(
            t.on_reply(&Reply::AckCount(0)),
            Ok(AckStep::Counted { done: true })
        );
    }

    #[test]
    fn ack_tally_refuses_protocol_violations() {
        assert!(AckTally::default().on_reply(&ack()).is_err());
        let mut t = AckTally::default();
        t.on_reply(&Reply::AckCount(1)).unwrap();
        assert!(t.on_reply(&Reply::AckCount(1)).is_err());
        assert!(AckTally::default().on_reply(&Reply::Rooms(vec![])).is_err());
        assert_eq!(
            AckTally::default().on_reply(&Reply::Error("no".into())),
            Err(PeerError::Refused("no".into()))
        );
    }
}
