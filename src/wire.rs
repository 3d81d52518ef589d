//! The peer protocol: message types and their MessagePack encoding (sans-IO).
//!
//! Transports carry *frames* (length-delimited byte strings, see [`crate::transport`]) on
//! *streams*. This module gives those frames a meaning:
//!
//! ```text
//! connection start   dialer opens a bidirectional stream:
//!                      dialer  → Hello frame      = "SIOM" | u16 BE version | msgpack(Hello)
//!                      dialer  ← HelloReply frame = "SIOM" | u16 BE version | msgpack(HelloReply)
//!                    the peer is connected only once the Welcome reply is read.
//! unidirectional     first frame UniHeader, then:
//!   Commands{start}    ordered Command frames; the n-th frame after the header has sequence
//!                      number start + n. Applied in order by the receiver.
//!   Gossip             chitchat messages, one a frame (chitchat's own binary encoding).
//! bidirectional      one request each: QueryHeader frame, Query frame →
//!                    ← Reply frames, then the responder finishes the stream.
//! ```
//!
//! Tags are explicit and **append-only**: never renumber or reuse one; add a new tag and bump
//! [`PROTOCOL_VERSION`] only when old nodes could misread the new message.

use std::{collections::VecDeque, net::SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};
use serde_bytes::ByteBuf;
use socketioxide_core::{
    Sid, Str, Uid, Value,
    adapter::{BroadcastOptions, Room},
    packet::{Packet, PacketData},
};

use crate::error::PeerError;

/// The first bytes of every handshake frame.
pub(crate) const MAGIC: [u8; 4] = *b"SIOM";
/// The version of this protocol. Nodes refuse peers with another version.
pub const PROTOCOL_VERSION: u16 = 1;
/// A handshake frame is small: anything bigger is refused before decoding.
pub(crate) const MAX_HELLO_SIZE: usize = 4096;

/// Who a node is: sent by both sides when a connection starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub cluster_id: String,
    pub node_id: Uid,
    pub advertise_addr: SocketAddr,
    pub transport: String,
}

/// The acceptor's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum HelloReply {
    #[serde(rename = "0")]
    Welcome(Hello),
    #[serde(rename = "1")]
    Refused(String),
}

/// First frame of a unidirectional stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum UniHeader {
    #[serde(rename = "0")]
    Commands { start_seq: u64 },
    #[serde(rename = "1")]
    Gossip,
}

/// First frame of a query stream: the query is answered only once the responder has applied
/// `after_seq` commands from the requester, so a query sees the effect of every command the
/// requester sent before it (`join` then `fetch_sockets` in that room works across nodes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QueryHeader {
    pub after_seq: u64,
}

/// An operation with no answer, applied in order on the command stream (decoding side; see
/// [`CommandRef`] for encoding).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) enum Command {
    #[serde(rename = "0")]
    Broadcast {
        ns: Str,
        opts: BroadcastOptions,
        packet: WirePacket,
    },
    #[serde(rename = "1")]
    AddSockets {
        ns: Str,
        opts: BroadcastOptions,
        rooms: Vec<Room>,
    },
    #[serde(rename = "2")]
    DelSockets {
        ns: Str,
        opts: BroadcastOptions,
        rooms: Vec<Room>,
    },
    #[serde(rename = "3")]
    DisconnectSockets { ns: Str, opts: BroadcastOptions },
    /// A server-side event for the handlers registered with [`crate::Mesh::on_server_event`].
    #[serde(rename = "4")]
    ServerEvent { event: String, data: WireBytes },
    /// The rooms the sender has members in (see [`crate::interest`]). Sent only to peers
    /// that announce the `interest` capability in gossip: a node of the previous release never
    /// receives it.
    #[serde(rename = "5")]
    Interest {
        /// How many of the receiver's commands the sender had applied.
        applied: u64,
        /// A full snapshot (replaces what the receiver knew) or changes.
        snapshot: bool,
        namespaces: Vec<NsInterest>,
    },
    /// Failure detection (see [`crate::probe`]). Sent only to peers that announce the
    /// `probe` capability in gossip.
    #[serde(rename = "6")]
    Probe(Probe),
}

/// A failure-detection message: a probe, its answer, or a suspicion to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Probe {
    /// Are you there? Answer with [`Probe::Pong`] of the same number.
    #[serde(rename = "0")]
    Ping(u64),
    /// The answer to [`Probe::Ping`].
    #[serde(rename = "1")]
    Pong(u64),
    /// The sender's probes of this node (its id) went unanswered: probe it too.
    #[serde(rename = "2")]
    Suspect(Str),
}

/// The sender's rooms in one namespace: every room (`everything`), or `add`/`del` applied to
/// what the receiver knew (`replace`: to nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NsInterest {
    pub ns: Str,
    pub everything: bool,
    pub replace: bool,
    pub add: Vec<Room>,
    pub del: Vec<Room>,
}

impl Command {
    pub(crate) fn ns(&self) -> Option<&Str> {
        match self {
            Command::Broadcast { ns, .. }
            | Command::AddSockets { ns, .. }
            | Command::DelSockets { ns, .. }
            | Command::DisconnectSockets { ns, .. } => Some(ns),
            Command::ServerEvent { .. } | Command::Interest { .. } | Command::Probe(_) => None,
        }
    }
}

/// The encoding side of [`Command`]: borrows, so a broadcast encodes its packet without a copy.
/// Same tags, same layout.
#[derive(Serialize)]
pub(crate) enum CommandRef<'a> {
    #[serde(rename = "0")]
    Broadcast {
        ns: &'a str,
        opts: &'a BroadcastOptions,
        packet: PacketRef<'a>,
    },
    #[serde(rename = "1")]
    AddSockets {
        ns: &'a str,
        opts: &'a BroadcastOptions,
        rooms: &'a [Room],
    },
    #[serde(rename = "2")]
    DelSockets {
        ns: &'a str,
        opts: &'a BroadcastOptions,
        rooms: &'a [Room],
    },
    #[serde(rename = "3")]
    DisconnectSockets {
        ns: &'a str,
        opts: &'a BroadcastOptions,
    },
    #[serde(rename = "4")]
    ServerEvent {
        event: &'a str,
        data: &'a serde_bytes::Bytes,
    },
    #[serde(rename = "5")]
    Interest {
        applied: u64,
        snapshot: bool,
        namespaces: &'a [NsInterest],
    },
    #[serde(rename = "6")]
    Probe(&'a Probe),
}

/// The encoding side of [`Query`].
#[derive(Serialize)]
pub(crate) enum QueryRef<'a> {
    #[serde(rename = "0")]
    FetchSockets {
        ns: &'a str,
        opts: &'a BroadcastOptions,
    },
    #[serde(rename = "1")]
    Rooms {
        ns: &'a str,
        opts: &'a BroadcastOptions,
    },
    #[serde(rename = "2")]
    BroadcastWithAck {
        ns: &'a str,
        opts: &'a BroadcastOptions,
        packet: PacketRef<'a>,
        timeout_ms: Option<u64>,
    },
    #[serde(rename = "3")]
    ServerEventWithAck {
        event: &'a str,
        data: &'a serde_bytes::Bytes,
    },
}

/// An operation that gets answers, on its own bidirectional stream (decoding side; see
/// [`QueryRef`] for encoding).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) enum Query {
    #[serde(rename = "0")]
    FetchSockets { ns: Str, opts: BroadcastOptions },
    #[serde(rename = "1")]
    Rooms { ns: Str, opts: BroadcastOptions },
    #[serde(rename = "2")]
    BroadcastWithAck {
        ns: Str,
        opts: BroadcastOptions,
        packet: WirePacket,
        timeout_ms: Option<u64>,
    },
    #[serde(rename = "3")]
    ServerEventWithAck { event: String, data: WireBytes },
}

impl Query {
    pub(crate) fn ns(&self) -> Option<&Str> {
        match self {
            Query::FetchSockets { ns, .. }
            | Query::Rooms { ns, .. }
            | Query::BroadcastWithAck { ns, .. } => Some(ns),
            Query::ServerEventWithAck { .. } => None,
        }
    }
}

/// An answer frame on a query stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Reply {
    #[serde(rename = "0")]
    /// The ids of the responder's matching sockets (they all share its server id and the
    /// query's namespace, sent once).
    Sockets { server_id: Uid, ids: Vec<Sid> },
    #[serde(rename = "1")]
    Rooms(Vec<Room>),
    /// How many acks follow on this stream.
    #[serde(rename = "2")]
    AckCount(u32),
    /// One socket's ack: its value, or the socket's ack error encoded in MessagePack.
    #[serde(rename = "3")]
    Ack {
        sid: Sid,
        result: Result<WireValue, ByteBuf>,
    },
    /// The responder could not answer (e.g. it does not serve the namespace).
    #[serde(rename = "4")]
    Error(String),
    /// The answer of a server-side event handler (MessagePack), or `None` if it gave none.
    #[serde(rename = "5")]
    ServerAck(Option<ByteBuf>),
}

/// A socket.io [`Packet`] encoded compactly: binary data travel as MessagePack `bin`, not as
/// arrays of integers as socketioxide-core's own serde encoding does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WirePacket(pub Packet);

/// A [`Value`] with the same compact encoding as [`WirePacket`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WireValue(pub Value);

/// Serializes a borrowed [`Value`] like [`WireValue`].
pub(crate) struct WireValueRef<'a>(pub &'a Value);

impl Serialize for WireValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireValueRef(&self.0).serialize(s)
    }
}

impl Serialize for WireValueRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Str(text, bins) => {
                let bins: Option<Vec<&serde_bytes::Bytes>> = bins
                    .as_ref()
                    .map(|b| b.iter().map(|b| serde_bytes::Bytes::new(b)).collect());
                (0u8, serde_bytes::Bytes::new(text.as_bytes()), bins).serialize(s)
            }
            Value::Bytes(data) => (1u8, serde_bytes::Bytes::new(data), None::<()>).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for WireValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (tag, data, bins): (u8, WireBytes, Option<Vec<WireBytes>>) =
            Deserialize::deserialize(d)?;
        let value = match tag {
            0 => {
                std::str::from_utf8(&data.0).map_err(serde::de::Error::custom)?;
                // SAFETY: `data` was just checked to be UTF-8, which is all `Str` requires.
                let text = unsafe { Str::from_bytes_unchecked(data.0) };
                let bins = bins.map(|b| b.into_iter().map(|b| b.0).collect::<VecDeque<_>>());
                Value::Str(text, bins)
            }
            1 => Value::Bytes(data.0),
            t => return Err(serde::de::Error::custom(format!("unknown value tag {t}"))),
        };
        Ok(WireValue(value))
    }
}

thread_local! {
    /// The frame being decoded by [`decode_shared`], so that [`WireBytes`] can be slices of it.
    static FRAME: std::cell::RefCell<Option<Bytes>> = const { std::cell::RefCell::new(None) };
}

/// Bytes that travel as MessagePack `bin`. Decoded by [`decode_shared`], they are a slice of
/// the received frame (no copy, no allocation); otherwise a copy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct WireBytes(pub Bytes);

impl Serialize for WireBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for WireBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = WireBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<WireBytes, E> {
                let shared = FRAME.with(|frame| {
                    let frame = frame.borrow();
                    let frame = frame.as_ref()?;
                    let inside = frame.as_ptr_range();
                    let sub = v.as_ptr_range();
                    (inside.start <= sub.start && sub.end <= inside.end).then(|| frame.slice_ref(v))
                });
                Ok(WireBytes(
                    shared.unwrap_or_else(|| Bytes::copy_from_slice(v)),
                ))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<WireBytes, E> {
                Ok(WireBytes(Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<WireBytes, E> {
                Ok(WireBytes(Bytes::from(v)))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

/// Serializes a borrowed [`Packet`] like [`WirePacket`] (no copy of the payload).
#[derive(Clone, Copy)]
pub(crate) struct PacketRef<'a>(pub &'a Packet);

impl Serialize for WirePacket {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PacketRef(&self.0).serialize(s)
    }
}

impl Serialize for PacketRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let wv = WireValueRef;
        let (ty, data, ack, error): (u8, Option<WireValueRef<'_>>, Option<i64>, Option<&str>) =
            match &p.inner {
                PacketData::Connect(v) => (0, v.as_ref().map(wv), None, None),
                PacketData::Disconnect => (1, None, None, None),
                PacketData::Event(v, ack) => (2, Some(wv(v)), *ack, None),
                PacketData::EventAck(v, ack) => (3, Some(wv(v)), Some(*ack), None),
                PacketData::ConnectError(e) => (4, None, None, Some(e.as_str())),
                PacketData::BinaryEvent(v, ack) => (5, Some(wv(v)), *ack, None),
                PacketData::BinaryAck(v, ack) => (6, Some(wv(v)), Some(*ack), None),
            };
        (p.ns.as_str(), ty, data, ack, error).serialize(s)
    }
}

impl<'de> Deserialize<'de> for WirePacket {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        type Raw = (String, u8, Option<WireValue>, Option<i64>, Option<String>);
        let (ns, ty, data, ack, error): Raw = Deserialize::deserialize(d)?;
        let missing = |f: &str| serde::de::Error::custom(format!("packet type {ty} without {f}"));
        let value = data.map(|v| v.0);
        let need = |v: Option<Value>| v.ok_or_else(|| missing("data"));
        let inner = match ty {
            0 => PacketData::Connect(value),
            1 => PacketData::Disconnect,
            2 => PacketData::Event(need(value)?, ack),
            3 => PacketData::EventAck(need(value)?, ack.ok_or_else(|| missing("ack"))?),
            4 => PacketData::ConnectError(error.ok_or_else(|| missing("error"))?),
            5 => PacketData::BinaryEvent(need(value)?, ack),
            6 => PacketData::BinaryAck(need(value)?, ack.ok_or_else(|| missing("ack"))?),
            t => return Err(serde::de::Error::custom(format!("unknown packet type {t}"))),
        };
        Ok(WirePacket(Packet {
            inner,
            ns: Str::from(ns),
        }))
    }
}

/// A value serde cannot represent in MessagePack (never one of the protocol's own types; a
/// user's payload, say). The wire's own error, converted into the crate's `Error` where it
/// reaches the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct EncodeError(pub String);

impl From<EncodeError> for crate::Error {
    fn from(e: EncodeError) -> Self {
        crate::Error::Encode(e.0)
    }
}

/// Encode a message. Fails only on values serde cannot represent (never for our types).
pub(crate) fn encode<T: Serialize>(msg: &T) -> Result<Bytes, EncodeError> {
    rmp_serde::to_vec(msg)
        .map(Bytes::from)
        .map_err(|e| EncodeError(e.to_string()))
}

/// Arrays and maps nest at most this deep in a message (a broadcast's binary attachments are
/// 5 levels down). A deeper frame is refused: skipping an unknown field nested 1000 deep
/// (rmp-serde's own limit) overflows a 2 MiB stack in a debug build.
const MAX_DEPTH: usize = 16;

/// Decode a message from an untrusted frame.
pub(crate) fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, PeerError> {
    check_lengths(frame).map_err(PeerError::Malformed)?;
    let mut de = rmp_serde::Deserializer::from_read_ref(frame);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de).map_err(|e| PeerError::Malformed(e.to_string()))
}

/// Refuse a frame whose MessagePack headers announce more than it holds, before any
/// `Deserialize` impl sees them: some reserve what a header announces (smallvec's, in
/// `BroadcastOptions`, asked the allocator for 96 GiB on the 5 bytes `dd ff ff ff ff`; serde's
/// `Vec` for up to 1 MiB). Every value takes at least one byte, so an array of `n` (a map of
/// `n` entries) needs `n` (`2n`) bytes after its header, and a string or binary its length.
/// One pass over the first value, no allocation, no recursion; a frame the decoder would
/// accept always passes.
fn check_lengths(frame: &[u8]) -> Result<(), String> {
    fn take<'a>(rest: &mut &'a [u8], n: u64, what: &str) -> Result<&'a [u8], String> {
        match usize::try_from(n).ok().filter(|&n| n <= rest.len()) {
            Some(n) => {
                let (head, tail) = rest.split_at(n);
                *rest = tail;
                Ok(head)
            }
            None => Err(format!(
                "{what} of {n} bytes with {} bytes left",
                rest.len()
            )),
        }
    }
    fn length(rest: &mut &[u8], width: u64) -> Result<u64, String> {
        let bytes = take(rest, width, "length")?;
        Ok(bytes.iter().fold(0, |n, &b| n << 8 | u64::from(b)))
    }
    let mut rest = frame;
    // Values announced and not read yet.
    let mut pending: u64 = 1;
    while pending > 0 {
        if pending > rest.len() as u64 {
            return Err(format!(
                "{pending} values announced with {} bytes left",
                rest.len()
            ));
        }
        let marker = rest[0];
        rest = &rest[1..];
        pending -= 1;
        match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => {}
            0x80..=0x8f => pending += 2 * u64::from(marker & 0x0f),
            0x90..=0x9f => pending += u64::from(marker & 0x0f),
            0xa0..=0xbf => _ = take(&mut rest, u64::from(marker & 0x1f), "string")?,
            0xc1 => return Err("reserved MessagePack marker 0xc1".into()),
            0xc4..=0xc6 => {
                let len = length(&mut rest, 1 << (marker - 0xc4))?;
                take(&mut rest, len, "binary")?;
            }
            0xc7..=0xc9 => {
                let len = length(&mut rest, 1 << (marker - 0xc7))?;
                take(&mut rest, 1 + len, "extension")?;
            }
            0xca | 0xce | 0xd2 => _ = take(&mut rest, 4, "number")?,
            0xcb | 0xcf | 0xd3 => _ = take(&mut rest, 8, "number")?,
            0xcc | 0xd0 => _ = take(&mut rest, 1, "number")?,
            0xcd | 0xd1 => _ = take(&mut rest, 2, "number")?,
            0xd4..=0xd8 => _ = take(&mut rest, 1 + (1 << (marker - 0xd4)), "extension")?,
            0xd9..=0xdb => {
                let len = length(&mut rest, 1 << (marker - 0xd9))?;
                take(&mut rest, len, "string")?;
            }
            0xdc | 0xdd => pending += length(&mut rest, 2 << (marker - 0xdc))?,
            0xde | 0xdf => pending += 2 * length(&mut rest, 2 << (marker - 0xde))?,
        }
    }
    Ok(())
}

/// Decode a message from an untrusted frame; its payloads ([`WireBytes`], packet data) are
/// slices of `frame`, not copies.
pub(crate) fn decode_shared<T: DeserializeOwned>(frame: &Bytes) -> Result<T, PeerError> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            FRAME.with(|f| f.borrow_mut().take());
        }
    }
    FRAME.with(|f| *f.borrow_mut() = Some(frame.clone()));
    let _reset = Reset;
    decode(frame)
}

fn hello_frame<T: Serialize>(msg: &T) -> Result<Bytes, EncodeError> {
    let body = rmp_serde::to_vec(msg).map_err(|e| EncodeError(e.to_string()))?;
    let mut out = BytesMut::with_capacity(6 + body.len());
    out.put_slice(&MAGIC);
    out.put_u16(PROTOCOL_VERSION);
    out.put_slice(&body);
    Ok(out.freeze())
}

/// Check magic and version, return the msgpack body.
fn hello_body(frame: &[u8]) -> Result<&[u8], PeerError> {
    if frame.len() > MAX_HELLO_SIZE {
        return Err(PeerError::FrameTooLarge {
            size: frame.len() as u64,
            max: MAX_HELLO_SIZE,
        });
    }
    if frame.len() < 6 || frame[..4] != MAGIC {
        return Err(PeerError::BadMagic);
    }
    let version = u16::from_be_bytes([frame[4], frame[5]]);
    if version != PROTOCOL_VERSION {
        return Err(PeerError::Version {
            theirs: version,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(&frame[6..])
}

pub(crate) fn encode_hello(hello: &Hello) -> Result<Bytes, EncodeError> {
    hello_frame(hello)
}

pub(crate) fn decode_hello(frame: &[u8]) -> Result<Hello, PeerError> {
    decode(hello_body(frame)?)
}

pub(crate) fn encode_hello_reply(reply: &HelloReply) -> Result<Bytes, EncodeError> {
    hello_frame(reply)
}

pub(crate) fn decode_hello_reply(frame: &[u8]) -> Result<HelloReply, PeerError> {
    decode(hello_body(frame)?)
}

/// Validate a peer's hello against ours: same cluster, same transport, not ourselves.
pub(crate) fn check_hello(ours: &Hello, theirs: &Hello) -> Result<(), PeerError> {
    if theirs.cluster_id != ours.cluster_id {
        return Err(PeerError::Cluster {
            theirs: theirs.cluster_id.clone(),
            ours: ours.cluster_id.clone(),
        });
    }
    if theirs.transport != ours.transport {
        return Err(PeerError::TransportKind {
            theirs: theirs.transport.clone(),
            ours: ours.transport.clone(),
        });
    }
    if theirs.node_id == ours.node_id {
        return Err(PeerError::SelfConnect);
    }
    Ok(())
}

/// Application close codes, sent with a connection close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum CloseCode {
    /// The node shuts down gracefully.
    Leaving = 0,
    /// The peer broke the protocol (malformed or oversize frame...).
    Protocol = 1,
    /// The handshake was refused.
    Refused = 2,
    /// The peer did not keep up with its command queue.
    SlowPeer = 3,
    /// A newer connection to the same peer replaced this one.
    Replaced = 4,
    /// Membership declared the peer dead.
    PeerDead = 5,
}

impl CloseCode {
    pub(crate) fn from_u32(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Leaving,
            1 => Self::Protocol,
            2 => Self::Refused,
            3 => Self::SlowPeer,
            4 => Self::Replaced,
            5 => Self::PeerDead,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socketioxide_core::adapter::BroadcastFlags;

    fn opts() -> BroadcastOptions {
        let mut opts = BroadcastOptions::new(Sid::new());
        opts.rooms.push("r1".into());
        opts.except.push("r2".into());
        opts.server_id = Some(Uid::new());
        opts.add_flag(BroadcastFlags::Broadcast);
        opts.add_flag(BroadcastFlags::Volatile);
        opts
    }

    fn values() -> Vec<Value> {
        vec![
            Value::Str("[\"ev\",{\"a\":1}]".into(), None),
            Value::Str(
                "[\"ev\",{\"_placeholder\":true,\"num\":0}]".into(),
                Some(vec![Bytes::from_static(&[0, 255, 128, 7])].into()),
            ),
            Value::Bytes(Bytes::from_static(&[
                0x93, 0xa2, 0x65, 0x76, 0xc4, 0x02, 0xff, 0x00,
            ])),
        ]
    }

    fn packets() -> Vec<Packet> {
        let mut out = vec![
            Packet::connect("/", None),
            Packet::connect("/admin", Some(Value::Str("{}".into(), None))),
            Packet::disconnect("/"),
            Packet::connect_error("/", "nope"),
        ];
        for v in values() {
            out.push(Packet::event("/", v.clone()));
            out.push(Packet::ack("/chat", v.clone(), 42));
            let mut p = Packet::event("/", v);
            p.inner.set_ack_id(7);
            out.push(p);
        }
        out
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let bytes = encode(&msg).unwrap();
        let back: T = decode(&bytes).unwrap();
        assert_eq!(back, msg);
    }

    /// Encode with the borrowing type, decode with the owned one: the production path.
    fn encodes_as<R: Serialize, T: DeserializeOwned + PartialEq + std::fmt::Debug>(
        r: R,
        expected: T,
    ) {
        let bytes = encode(&r).unwrap();
        let back: T = decode(&bytes).unwrap();
        assert_eq!(back, expected);
    }

    #[test]
    fn every_command_round_trips() {
        let o = opts();
        for p in packets() {
            encodes_as(
                CommandRef::Broadcast {
                    ns: "/",
                    opts: &o,
                    packet: PacketRef(&p),
                },
                Command::Broadcast {
                    ns: "/".into(),
                    opts: o.clone(),
                    packet: WirePacket(p.clone()),
                },
            );
        }
        let rooms: Vec<Room> = vec!["a".into(), "b".into()];
        encodes_as(
            CommandRef::AddSockets {
                ns: "/",
                opts: &o,
                rooms: &rooms,
            },
            Command::AddSockets {
                ns: "/".into(),
                opts: o.clone(),
                rooms: rooms.clone(),
            },
        );
        let none = BroadcastOptions::default();
        encodes_as(
            CommandRef::DelSockets {
                ns: "/x",
                opts: &none,
                rooms: &[],
            },
            Command::DelSockets {
                ns: "/x".into(),
                opts: none.clone(),
                rooms: vec![],
            },
        );
        encodes_as(
            CommandRef::DisconnectSockets { ns: "/", opts: &o },
            Command::DisconnectSockets {
                ns: "/".into(),
                opts: o.clone(),
            },
        );
        encodes_as(
            CommandRef::ServerEvent {
                event: "cache:invalidate",
                data: serde_bytes::Bytes::new(&[1, 2, 3]),
            },
            Command::ServerEvent {
                event: "cache:invalidate".into(),
                data: WireBytes(Bytes::from_static(&[1, 2, 3])),
            },
        );
        let namespaces = vec![NsInterest {
            ns: "/chat".into(),
            everything: false,
            replace: true,
            add: vec!["a".into(), "b".into()],
            del: vec!["c".into()],
        }];
        encodes_as(
            CommandRef::Interest {
                applied: 42,
                snapshot: true,
                namespaces: &namespaces,
            },
            Command::Interest {
                applied: 42,
                snapshot: true,
                namespaces: namespaces.clone(),
            },
        );
        for p in [
            Probe::Ping(7),
            Probe::Pong(u64::MAX),
            Probe::Suspect("n1".into()),
        ] {
            encodes_as(CommandRef::Probe(&p), Command::Probe(p.clone()));
        }
    }

    #[test]
    fn every_query_and_reply_round_trips() {
        let o = opts();
        encodes_as(
            QueryRef::FetchSockets { ns: "/", opts: &o },
            Query::FetchSockets {
                ns: "/".into(),
                opts: o.clone(),
            },
        );
        encodes_as(
            QueryRef::Rooms { ns: "/", opts: &o },
            Query::Rooms {
                ns: "/".into(),
                opts: o.clone(),
            },
        );
        for p in packets() {
            encodes_as(
                QueryRef::BroadcastWithAck {
                    ns: "/",
                    opts: &o,
                    packet: PacketRef(&p),
                    timeout_ms: Some(1500),
                },
                Query::BroadcastWithAck {
                    ns: "/".into(),
                    opts: o.clone(),
                    packet: WirePacket(p.clone()),
                    timeout_ms: Some(1500),
                },
            );
        }
        encodes_as(
            QueryRef::ServerEventWithAck {
                event: "e",
                data: serde_bytes::Bytes::new(&[0xc0]),
            },
            Query::ServerEventWithAck {
                event: "e".into(),
                data: WireBytes(Bytes::from_static(&[0xc0])),
            },
        );
        round_trip(Reply::Sockets {
            server_id: Uid::new(),
            ids: vec![Sid::new(), Sid::new()],
        });
        round_trip(Reply::Rooms(vec!["a".into(), "b".into()]));
        round_trip(Reply::AckCount(3));
        for v in values() {
            round_trip(Reply::Ack {
                sid: Sid::new(),
                result: Ok(WireValue(v)),
            });
        }
        round_trip(Reply::Ack {
            sid: Sid::new(),
            result: Err(ByteBuf::from(vec![0xa7])),
        });
        round_trip(Reply::Error("not served".into()));
        round_trip(Reply::ServerAck(Some(ByteBuf::from(vec![1]))));
        round_trip(Reply::ServerAck(None));
        round_trip(UniHeader::Commands { start_seq: 99 });
        round_trip(UniHeader::Gossip);
        round_trip(QueryHeader {
            after_seq: u64::MAX,
        });
    }

    fn hello() -> Hello {
        Hello {
            cluster_id: "c".into(),
            node_id: Uid::new(),
            advertise_addr: "127.0.0.1:7800".parse().unwrap(),
            transport: "quic".into(),
        }
    }

    #[test]
    fn hello_round_trip_and_checks() {
        let h = hello();
        assert_eq!(decode_hello(&encode_hello(&h).unwrap()).unwrap(), h);
        let reply = HelloReply::Welcome(h.clone());
        assert_eq!(
            decode_hello_reply(&encode_hello_reply(&reply).unwrap()).unwrap(),
            reply
        );
        let refused = HelloReply::Refused("why".into());
        assert_eq!(
            decode_hello_reply(&encode_hello_reply(&refused).unwrap()).unwrap(),
            refused
        );

        let mut other = hello();
        assert!(check_hello(&h, &other).is_ok());
        other.cluster_id = "d".into();
        assert!(matches!(
            check_hello(&h, &other),
            Err(PeerError::Cluster { .. })
        ));
        let mut other = hello();
        other.transport = "ws".into();
        assert!(matches!(
            check_hello(&h, &other),
            Err(PeerError::TransportKind { .. })
        ));
        assert_eq!(check_hello(&h, &h), Err(PeerError::SelfConnect));
    }

    #[test]
    fn hello_refuses_foreign_or_future_frames() {
        let mut frame = encode_hello(&hello()).unwrap().to_vec();
        frame[5] = 9; // version 9
        assert_eq!(
            decode_hello(&frame),
            Err(PeerError::Version {
                theirs: 9,
                ours: PROTOCOL_VERSION
            })
        );
        assert_eq!(
            decode_hello(b"GET / HTTP/1.1\r\n"),
            Err(PeerError::BadMagic)
        );
        assert_eq!(decode_hello(b"SIO"), Err(PeerError::BadMagic));
        let big = [MAGIC.as_slice(), &[0; MAX_HELLO_SIZE]].concat();
        assert!(matches!(
            decode_hello(&big),
            Err(PeerError::FrameTooLarge { .. })
        ));
        let mut truncated = encode_hello(&hello()).unwrap().to_vec();
        truncated.truncate(truncated.len() - 3);
        assert!(matches!(
            decode_hello(&truncated),
            Err(PeerError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random inputs and every truncation of real frames.
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_shared::<Command>(&Bytes::from(bytes.clone()));
            let _ = decode_shared::<Query>(&Bytes::from(bytes.clone()));
            let _ = decode::<Command>(&bytes);
            let _ = decode::<Query>(&bytes);
            let _ = decode::<Reply>(&bytes);
            let _ = decode_hello(&bytes);
        }
        let (o, p) = (opts(), packets().pop().unwrap());
        let frame = encode(&CommandRef::Broadcast {
            ns: "/",
            opts: &o,
            packet: PacketRef(&p),
        })
        .unwrap();
        for cut in 0..frame.len() {
            assert!(decode::<Command>(&frame[..cut]).is_err());
        }
    }

    #[test]
    fn shared_decoding_slices_payloads_out_of_the_frame() {
        let bin = Bytes::from(vec![0xabu8; 300]);
        let text = "[\"ev\",{\"_placeholder\":true,\"num\":0}]";
        let packet = Packet::event("/", Value::Str(text.into(), Some(vec![bin.clone()].into())));
        let o = opts();
        let frame = encode(&CommandRef::Broadcast {
            ns: "/",
            opts: &o,
            packet: PacketRef(&packet),
        })
        .unwrap();
        let inside = |b: &[u8]| {
            let (f, b) = (frame.as_ptr_range(), b.as_ptr_range());
            f.start <= b.start && b.end <= f.end
        };
        let Command::Broadcast { packet: got, .. } = decode_shared::<Command>(&frame).unwrap()
        else {
            panic!("not a broadcast");
        };
        assert_eq!(got.0, packet);
        let (PacketData::Event(Value::Str(t, Some(bins)), _)
        | PacketData::BinaryEvent(Value::Str(t, Some(bins)), _)) = &got.0.inner
        else {
            panic!("not a binary event");
        };
        assert!(inside(t.as_bytes()), "text copied");
        assert!(inside(&bins[0]), "binary copied");
        // Plain decoding copies, and gives the same value.
        let Command::Broadcast { packet: copied, .. } = decode::<Command>(&frame).unwrap() else {
            panic!("not a broadcast");
        };
        assert_eq!(copied.0, packet);
        // Invalid UTF-8 in a text payload is refused, not turned into a `Str`.
        let bad = Packet::event("/", Value::Str("ok".into(), None));
        let mut raw = encode(&CommandRef::Broadcast {
            ns: "/",
            opts: &o,
            packet: PacketRef(&bad),
        })
        .unwrap()
        .to_vec();
        let at = raw.windows(2).position(|w| w == b"ok").unwrap();
        raw[at] = 0xff;
        assert!(decode_shared::<Command>(&Bytes::from(raw)).is_err());
    }

    #[test]
    fn binary_payloads_are_not_inflated() {
        let payload = Bytes::from(vec![0xffu8; 10_000]);
        let frame = encode(&WireValue(Value::Bytes(payload))).unwrap();
        assert!(frame.len() < 10_016, "{} bytes", frame.len());
    }
}

/// Fuzz tests of the decoders (see [`crate::fuzz`]): random frames, and valid frames of every
/// message mutated. A decoder never panics, never allocates more than the input justifies,
/// answers garbage with an error that says something, and gives back exactly what was encoded.
#[cfg(test)]
mod fuzz_tests {
    use std::{fmt::Debug, str::FromStr};

    use fastrand::Rng;
    use socketioxide_core::adapter::BroadcastFlags;

    use super::*;
    use crate::fuzz;

    /// Strings with one-, two-, three- and four-byte characters.
    fn text(rng: &mut Rng) -> String {
        const PIECES: &[&str] = &[
            "a", "/", "Z", "0", " ", "\"", "é", "字", "🦀", "\u{7f}", "\0",
        ];
        (0..rng.usize(..12))
            .map(|_| PIECES[rng.usize(..PIECES.len())])
            .collect()
    }

    fn blob(rng: &mut Rng) -> Bytes {
        Bytes::from(fuzz::bytes(rng, 300))
    }

    fn sid(rng: &mut Rng) -> Sid {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let s: String = (0..16)
            .map(|_| ALPHABET[rng.usize(..ALPHABET.len())] as char)
            .collect();
        Sid::from_str(&s).expect("16 base64url characters")
    }

    fn uid(rng: &mut Rng) -> Uid {
        Uid::from_str(sid(rng).as_str()).expect("a sid is a uid")
    }

    fn rooms(rng: &mut Rng, max: usize) -> Vec<Room> {
        (0..rng.usize(..=max)).map(|_| text(rng).into()).collect()
    }

    fn opts(rng: &mut Rng) -> BroadcastOptions {
        let mut o = BroadcastOptions::default();
        for flag in [
            BroadcastFlags::Local,
            BroadcastFlags::Broadcast,
            BroadcastFlags::Volatile,
        ] {
            if rng.bool() {
                o.add_flag(flag);
            }
        }
        o.rooms.extend(rooms(rng, 5));
        o.except.extend(rooms(rng, 3));
        o.sid = rng.bool().then(|| sid(rng));
        o.server_id = rng.bool().then(|| uid(rng));
        o
    }

    fn value(rng: &mut Rng) -> Value {
        if rng.bool() {
            let bins = rng
                .bool()
                .then(|| (0..rng.usize(..3)).map(|_| blob(rng)).collect());
            Value::Str(text(rng).into(), bins)
        } else {
            Value::Bytes(blob(rng))
        }
    }

    fn ack(rng: &mut Rng) -> i64 {
        match rng.u8(..3) {
            0 => i64::MIN,
            1 => i64::MAX,
            _ => rng.i64(-5..1000),
        }
    }

    fn packet(rng: &mut Rng) -> Packet {
        let inner = match rng.u8(..7) {
            0 => PacketData::Connect(rng.bool().then(|| value(rng))),
            1 => PacketData::Disconnect,
            2 => PacketData::Event(value(rng), rng.bool().then(|| ack(rng))),
            3 => PacketData::EventAck(value(rng), ack(rng)),
            4 => PacketData::ConnectError(text(rng)),
            5 => PacketData::BinaryEvent(value(rng), rng.bool().then(|| ack(rng))),
            _ => PacketData::BinaryAck(value(rng), ack(rng)),
        };
        Packet {
            inner,
            ns: text(rng).into(),
        }
    }

    fn command(rng: &mut Rng) -> Command {
        let ns = Str::from(text(rng));
        match rng.u8(..7) {
            0 => Command::Broadcast {
                ns,
                opts: opts(rng),
                packet: WirePacket(packet(rng)),
            },
            1 => Command::AddSockets {
                ns,
                opts: opts(rng),
                rooms: rooms(rng, 6),
            },
            2 => Command::DelSockets {
                ns,
                opts: opts(rng),
                rooms: rooms(rng, 6),
            },
            3 => Command::DisconnectSockets {
                ns,
                opts: opts(rng),
            },
            4 => Command::ServerEvent {
                event: text(rng),
                data: WireBytes(blob(rng)),
            },
            5 => Command::Probe(match rng.u8(..3) {
                0 => Probe::Ping(rng.u64(..)),
                1 => Probe::Pong(rng.u64(..)),
                _ => Probe::Suspect(Str::from(text(rng))),
            }),
            _ => Command::Interest {
                applied: rng.u64(..),
                snapshot: rng.bool(),
                namespaces: (0..rng.usize(..3))
                    .map(|_| NsInterest {
                        ns: Str::from(text(rng)),
                        everything: rng.bool(),
                        replace: rng.bool(),
                        add: rooms(rng, 4),
                        del: rooms(rng, 4),
                    })
                    .collect(),
            },
        }
    }

    /// Encoded as production encodes it: through [`CommandRef`].
    fn encode_command(c: &Command) -> Bytes {
        let r = match c {
            Command::Broadcast { ns, opts, packet } => CommandRef::Broadcast {
                ns,
                opts,
                packet: PacketRef(&packet.0),
            },
            Command::AddSockets { ns, opts, rooms } => CommandRef::AddSockets { ns, opts, rooms },
            Command::DelSockets { ns, opts, rooms } => CommandRef::DelSockets { ns, opts, rooms },
            Command::DisconnectSockets { ns, opts } => CommandRef::DisconnectSockets { ns, opts },
            Command::ServerEvent { event, data } => CommandRef::ServerEvent {
                event,
                data: serde_bytes::Bytes::new(&data.0),
            },
            Command::Interest {
                applied,
                snapshot,
                namespaces,
            } => CommandRef::Interest {
                applied: *applied,
                snapshot: *snapshot,
                namespaces,
            },
            Command::Probe(p) => CommandRef::Probe(p),
        };
        encode(&r).expect("commands encode")
    }

    fn query(rng: &mut Rng) -> Query {
        let ns = Str::from(text(rng));
        match rng.u8(..4) {
            0 => Query::FetchSockets {
                ns,
                opts: opts(rng),
            },
            1 => Query::Rooms {
                ns,
                opts: opts(rng),
            },
            2 => Query::BroadcastWithAck {
                ns,
                opts: opts(rng),
                packet: WirePacket(packet(rng)),
                timeout_ms: rng.bool().then(|| rng.u64(..)),
            },
            _ => Query::ServerEventWithAck {
                event: text(rng),
                data: WireBytes(blob(rng)),
            },
        }
    }

    /// Encoded as production encodes it: through [`QueryRef`].
    fn encode_query(q: &Query) -> Bytes {
        let r = match q {
            Query::FetchSockets { ns, opts } => QueryRef::FetchSockets { ns, opts },
            Query::Rooms { ns, opts } => QueryRef::Rooms { ns, opts },
            Query::BroadcastWithAck {
                ns,
                opts,
                packet,
                timeout_ms,
            } => QueryRef::BroadcastWithAck {
                ns,
                opts,
                packet: PacketRef(&packet.0),
                timeout_ms: *timeout_ms,
            },
            Query::ServerEventWithAck { event, data } => QueryRef::ServerEventWithAck {
                event,
                data: serde_bytes::Bytes::new(&data.0),
            },
        };
        encode(&r).expect("queries encode")
    }

    fn reply(rng: &mut Rng) -> Reply {
        match rng.u8(..6) {
            0 => Reply::Sockets {
                server_id: uid(rng),
                ids: (0..rng.usize(..5)).map(|_| sid(rng)).collect(),
            },
            1 => Reply::Rooms(rooms(rng, 6)),
            2 => Reply::AckCount(rng.u32(..)),
            3 => Reply::Ack {
                sid: sid(rng),
                result: if rng.bool() {
                    Ok(WireValue(value(rng)))
                } else {
                    Err(ByteBuf::from(blob(rng).to_vec()))
                },
            },
            4 => Reply::Error(text(rng)),
            _ => Reply::ServerAck(rng.bool().then(|| ByteBuf::from(blob(rng).to_vec()))),
        }
    }

    fn hello(rng: &mut Rng) -> Hello {
        let ip: std::net::IpAddr = if rng.bool() {
            std::net::Ipv4Addr::from(rng.u32(..)).into()
        } else {
            std::net::Ipv6Addr::from(rng.u128(..)).into()
        };
        Hello {
            cluster_id: text(rng),
            node_id: uid(rng),
            advertise_addr: SocketAddr::new(ip, rng.u16(..)),
            transport: text(rng),
        }
    }

    fn hello_reply(rng: &mut Rng) -> HelloReply {
        if rng.bool() {
            HelloReply::Welcome(hello(rng))
        } else {
            HelloReply::Refused(text(rng))
        }
    }

    /// Every string a decoded message holds, to check that each is valid UTF-8: a `Str` made
    /// with `from_bytes_unchecked` from bytes that are not would be undefined behaviour.
    trait Strings {
        fn strings(&self) -> Vec<&str>;
    }

    fn value_strings(v: &Value) -> Vec<&str> {
        match v {
            Value::Str(s, _) => vec![s.as_str()],
            Value::Bytes(_) => vec![],
        }
    }

    fn packet_strings(p: &Packet) -> Vec<&str> {
        let mut out = vec![p.ns.as_str()];
        match &p.inner {
            PacketData::Connect(v) => out.extend(v.iter().flat_map(value_strings)),
            PacketData::Disconnect => {}
            PacketData::ConnectError(e) => out.push(e),
            PacketData::Event(v, _)
            | PacketData::EventAck(v, _)
            | PacketData::BinaryEvent(v, _)
            | PacketData::BinaryAck(v, _) => out.extend(value_strings(v)),
        }
        out
    }

    fn opts_strings(o: &BroadcastOptions) -> Vec<&str> {
        o.rooms.iter().chain(&o.except).map(|r| &**r).collect()
    }

    impl Strings for Command {
        fn strings(&self) -> Vec<&str> {
            match self {
                Command::Broadcast { ns, opts, packet } => [
                    vec![ns.as_str()],
                    opts_strings(opts),
                    packet_strings(&packet.0),
                ]
                .concat(),
                Command::AddSockets { ns, opts, rooms }
                | Command::DelSockets { ns, opts, rooms } => [
                    vec![ns.as_str()],
                    opts_strings(opts),
                    rooms.iter().map(|r| &**r).collect(),
                ]
                .concat(),
                Command::DisconnectSockets { ns, opts } => {
                    [vec![ns.as_str()], opts_strings(opts)].concat()
                }
                Command::ServerEvent { event, .. } => vec![event],
                Command::Interest { namespaces, .. } => namespaces
                    .iter()
                    .flat_map(|n| {
                        std::iter::once(n.ns.as_str())
                            .chain(n.add.iter().chain(&n.del).map(|r| &**r))
                    })
                    .collect(),
                Command::Probe(Probe::Suspect(node)) => vec![node.as_str()],
                Command::Probe(_) => Vec::new(),
            }
        }
    }

    impl Strings for Query {
        fn strings(&self) -> Vec<&str> {
            match self {
                Query::FetchSockets { ns, opts } | Query::Rooms { ns, opts } => {
                    [vec![ns.as_str()], opts_strings(opts)].concat()
                }
                Query::BroadcastWithAck {
                    ns, opts, packet, ..
                } => [
                    vec![ns.as_str()],
                    opts_strings(opts),
                    packet_strings(&packet.0),
                ]
                .concat(),
                Query::ServerEventWithAck { event, .. } => vec![event],
            }
        }
    }

    impl Strings for Reply {
        fn strings(&self) -> Vec<&str> {
            match self {
                Reply::Rooms(rooms) => rooms.iter().map(|r| &**r).collect(),
                Reply::Ack { result: Ok(v), .. } => value_strings(&v.0),
                Reply::Error(e) => vec![e],
                _ => vec![],
            }
        }
    }

    impl Strings for UniHeader {
        fn strings(&self) -> Vec<&str> {
            vec![]
        }
    }

    impl Strings for QueryHeader {
        fn strings(&self) -> Vec<&str> {
            vec![]
        }
    }

    impl Strings for Hello {
        fn strings(&self) -> Vec<&str> {
            vec![&self.cluster_id, &self.transport]
        }
    }

    impl Strings for HelloReply {
        fn strings(&self) -> Vec<&str> {
            match self {
                HelloReply::Welcome(h) => h.strings(),
                HelloReply::Refused(r) => vec![r],
            }
        }
    }

    /// What a decoder may allocate for an input of `len` bytes: a few times the input (a
    /// collection of `n` elements needs `n` bytes of input; each takes at most 32 bytes in
    /// memory) plus small fixed costs (error messages).
    fn allocation_bound(len: usize) -> usize {
        32 * len + 16 * 1024
    }

    fn check_result<T: Strings + Debug>(input: &[u8], result: &Result<T, PeerError>) {
        match result {
            Ok(msg) => {
                for s in msg.strings() {
                    assert!(
                        std::str::from_utf8(s.as_bytes()).is_ok(),
                        "invalid UTF-8 decoded from {input:02x?}"
                    );
                }
            }
            Err(e) => assert!(
                !e.to_string().trim().is_empty(),
                "empty error for {input:02x?}"
            ),
        }
    }

    /// Decode `input` as a `T` both ways (copying and slicing payloads out of the frame): the
    /// two agree, the result is sound, the allocation bounded. Returns the result.
    fn decode_untrusted<T>(input: &[u8]) -> Result<T, PeerError>
    where
        T: DeserializeOwned + PartialEq + Debug + Strings,
    {
        let frame = Bytes::copy_from_slice(input);
        let ((copied, shared), peak) =
            fuzz::largest_allocation(|| (decode::<T>(input), decode_shared::<T>(&frame)));
        assert!(
            peak <= allocation_bound(input.len()),
            "decoding {} bytes allocated {peak} bytes at once: {:02x?}",
            input.len(),
            &input[..input.len().min(64)]
        );
        assert_eq!(
            copied, shared,
            "copying and shared decoding disagree on {input:02x?}"
        );
        if let Err(e) = &copied {
            assert!(matches!(e, PeerError::Malformed(_)), "{e:?}");
        }
        if let Err(reason) = check_lengths(input) {
            // The length check refuses only what is not one whole MessagePack value anyway.
            let mut de = rmp_serde::Deserializer::from_read_ref(input);
            de.set_max_depth(MAX_DEPTH);
            assert!(
                serde::de::IgnoredAny::deserialize(&mut de).is_err(),
                "the length check ({reason}) refused a well-formed frame: {input:02x?}"
            );
        }
        check_result(input, &copied);
        copied
    }

    /// A handshake decoder on untrusted input: sound, bounded, a clear error.
    fn decode_handshake<T: Strings + Debug>(
        input: &[u8],
        decoder: fn(&[u8]) -> Result<T, PeerError>,
    ) -> Result<T, PeerError> {
        let (result, peak) = fuzz::largest_allocation(|| decoder(input));
        assert!(
            peak <= allocation_bound(input.len()),
            "{peak} bytes for {input:02x?}"
        );
        check_result(input, &result);
        result
    }

    /// Mutations of `frame` per case: each decodes without harm (the mutation may be valid).
    const MUTATIONS: usize = 8;

    fn round_trips_and_survives_mutations<T>(
        name: &'static str,
        iters: usize,
        make: fn(&mut Rng) -> T,
        encode: fn(&T) -> Bytes,
    ) where
        T: DeserializeOwned + PartialEq + Debug + Strings,
    {
        for mut case in fuzz::cases(name, iters) {
            let msg = make(&mut case.rng);
            let frame = encode(&msg);
            assert_eq!(decode_untrusted::<T>(&frame).as_ref(), Ok(&msg));
            for _ in 0..MUTATIONS {
                let bad = fuzz::mutate(&mut case.rng, &frame);
                let _ = decode_untrusted::<T>(&bad);
            }
        }
    }

    /// `frame` with the `nth` occurrence of `from` replaced by `to`.
    fn patched(frame: &[u8], nth: usize, from: u8, to: &[u8]) -> Vec<u8> {
        let at = frame
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == from)
            .nth(nth)
            .map(|(i, _)| i)
            .expect("byte to patch");
        [&frame[..at], to, &frame[at + 1..]].concat()
    }

    #[test]
    fn a_header_announcing_more_than_the_frame_holds_is_refused_before_allocating() {
        const ARRAY_MAX: &[u8] = &[0xdd, 0xff, 0xff, 0xff, 0xff];
        let add = encode_command(&Command::AddSockets {
            ns: "/".into(),
            opts: BroadcastOptions::default(),
            rooms: vec![],
        });
        // `0x90` (empty array) three times: opts.rooms, opts.except (smallvecs), rooms (Vec).
        let commands = [
            patched(&add, 0, 0x90, ARRAY_MAX),
            patched(&add, 1, 0x90, ARRAY_MAX),
            patched(&add, 2, 0x90, ARRAY_MAX),
            patched(&add, 0, 0xa1, &[0xdb, 0xff, 0xff, 0xff, 0xff]), // str 32: the variant
            patched(&add, 0, 0x81, &[0xdf, 0xff, 0xff, 0xff, 0xff]), // map 32: the message
            patched(&add, 0, 0xa1, &[0xc6, 0xff, 0xff, 0xff, 0xff]), // bin 32: the variant
        ];
        let sockets = encode(&Reply::Sockets {
            server_id: Uid::new(),
            ids: vec![],
        })
        .unwrap();
        let replies = [
            patched(&sockets, 0, 0x90, ARRAY_MAX),
            patched(&encode(&Reply::Rooms(vec![])).unwrap(), 0, 0x90, ARRAY_MAX),
        ];
        let started = std::time::Instant::now();
        for frame in &commands {
            let (res, peak) = fuzz::largest_allocation(|| decode::<Command>(frame));
            assert!(peak < 4096, "{peak} bytes allocated for {frame:02x?}");
            let Err(PeerError::Malformed(reason)) = res else {
                panic!("{frame:02x?} gave {res:?}");
            };
            assert!(reason.contains("bytes left"), "{reason}");
        }
        for frame in &replies {
            let (res, peak) = fuzz::largest_allocation(|| decode::<Reply>(frame));
            assert!(peak < 4096, "{peak} bytes allocated for {frame:02x?}");
            assert!(matches!(res, Err(PeerError::Malformed(_))), "{res:?}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn deep_nesting_is_refused_with_a_clear_error() {
        // An unknown field (skipped) nested 1000 arrays deep: within rmp-serde's default limit,
        // but deep enough to overflow a 2 MiB stack in a debug build.
        let mut frame = vec![0x81, 0xa1, b'x'];
        frame.extend(std::iter::repeat_n(0x91, 1000));
        frame.push(0xc0);
        let res = decode::<QueryHeader>(&frame);
        assert_eq!(
            res,
            Err(PeerError::Malformed("depth limit exceeded".into()))
        );
    }

    #[test]
    fn fuzz_commands_round_trip_and_mutated_commands_fail_cleanly() {
        round_trips_and_survives_mutations("commands", 5000, command, encode_command);
    }

    #[test]
    fn fuzz_queries_round_trip_and_mutated_queries_fail_cleanly() {
        round_trips_and_survives_mutations("queries", 4000, query, encode_query);
    }

    #[test]
    fn fuzz_replies_round_trip_and_mutated_replies_fail_cleanly() {
        round_trips_and_survives_mutations("replies", 4000, reply, |r| encode(r).unwrap());
    }

    #[test]
    fn fuzz_stream_headers_round_trip_and_mutated_headers_fail_cleanly() {
        round_trips_and_survives_mutations(
            "uni headers",
            2000,
            |rng| match rng.bool() {
                true => UniHeader::Commands {
                    start_seq: rng.u64(..),
                },
                false => UniHeader::Gossip,
            },
            |h| encode(h).unwrap(),
        );
        round_trips_and_survives_mutations(
            "query headers",
            2000,
            |rng| QueryHeader {
                after_seq: rng.u64(..),
            },
            |h| encode(h).unwrap(),
        );
    }

    #[test]
    fn fuzz_handshakes_round_trip_and_mutated_handshakes_fail_cleanly() {
        for mut case in fuzz::cases("handshakes", 4000) {
            let rng = &mut case.rng;
            let h = hello(rng);
            let frame = encode_hello(&h).unwrap();
            assert_eq!(decode_handshake(&frame, decode_hello), Ok(h));
            let r = hello_reply(rng);
            let reply = encode_hello_reply(&r).unwrap();
            assert_eq!(decode_handshake(&reply, decode_hello_reply), Ok(r));
            for _ in 0..MUTATIONS / 2 {
                let _ = decode_handshake(&fuzz::mutate(rng, &frame), decode_hello);
                let _ = decode_handshake(&fuzz::mutate(rng, &reply), decode_hello_reply);
                // Past the magic and version: the MessagePack body is what gets mutated.
                let mut body = fuzz::mutate(rng, &frame[6..]);
                body.splice(0..0, frame[..6].iter().copied());
                let _ = decode_handshake(&body, decode_hello);
            }
        }
    }

    #[test]
    fn fuzz_random_bytes_are_refused_by_every_decoder() {
        for mut case in fuzz::cases("random bytes", 20_000) {
            let input = fuzz::bytes(&mut case.rng, 4096);
            let _ = decode_untrusted::<Command>(&input);
            let _ = decode_untrusted::<Query>(&input);
            let _ = decode_untrusted::<Reply>(&input);
            let _ = decode_untrusted::<UniHeader>(&input);
            let _ = decode_untrusted::<QueryHeader>(&input);
            let mut framed = [MAGIC.as_slice(), &PROTOCOL_VERSION.to_be_bytes()].concat();
            framed.extend_from_slice(&input);
            let _ = decode_handshake(&framed, decode_hello);
            let _ = decode_handshake(&framed, decode_hello_reply);
            let _ = decode_handshake(&input, decode_hello);
        }
    }
}
