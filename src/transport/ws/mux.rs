//! The WebSocket multiplexer's state, without I/O (in the style of quinn-proto): which streams
//! exist, how much each side may still send, what the peer broke. The connection's tasks
//! ([`super`]) feed it the peer's messages and what the stream readers consumed, and carry out
//! what it decides: deliver frames, wake senders, write the control messages it queues.
//!
//! ```text
//!  peer's message ─► Mux::receive ─► Input (open / frames / fin / credit / reset / nothing)
//!                        │  └──────► Violation: the connection is closed with the reason
//!                        └─ queues control messages (RESET, CREDIT) ─► Mux::poll_control
//!  reader consumed ─► Mux::consumed ─► CREDIT for the stream, CREDIT for the connection
//!  sender ─► Mux::take_credit ─► go / wait for credit / the peer reset the stream
//! ```
//!
//! Flow control has two levels, as in HTTP/2 and QUIC:
//! - every stream direction has [`WINDOW`] bytes of credit, returned by `CREDIT` messages as
//!   its reader consumes; a slow reader of one stream holds back only that stream;
//! - the connection has [`CONN_WINDOW`] bytes of credit over all its streams (version 2),
//!   returned by `CREDIT` messages on stream id 0. Without it, a peer could fill
//!   `max_streams` × [`WINDOW`] (hundreds of MiB) of a node's memory with streams nobody
//!   reads yet. Frames a reader drops unread, or that arrive for a stream nobody reads any
//!   more, are returned to the connection's credit at once.
//!
//! A sender may overdraw its credit by one frame (credit is taken while any remains), so a
//! frame larger than the window still goes; a receiver allows `window + max_frame` and
//! counts an empty frame as one byte (it is queued like any other). Anything beyond is a
//! violation: the connection is closed, and nothing the peer sent after is acted upon.

use std::collections::{HashMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

pub(crate) const OPEN_BI: u8 = 0;
pub(crate) const OPEN_UNI: u8 = 1;
pub(crate) const DATA: u8 = 2;
pub(crate) const FIN: u8 = 3;
pub(crate) const RESET: u8 = 4;
pub(crate) const CREDIT: u8 = 5;
pub(crate) const DATA_FRAMES: u8 = 6;

/// Credit of each stream direction, in bytes.
pub(crate) const WINDOW: u32 = 512 * 1024;
/// Credit of the connection over all its streams, in bytes (version 2).
pub(crate) const CONN_WINDOW: u32 = 8 * 1024 * 1024;
/// The stream id of connection-level `CREDIT` (no stream has it: the dialer opens odd ids, the
/// acceptor even ones from 2).
pub(crate) const CONNECTION: u32 = 0;
/// Control messages (credit, reset) waiting for the writer, at most. They are small and go
/// first; a full queue means the peer keeps sending (opening streams, say) while reading
/// nothing of ours: it is cut off rather than queued for without bound.
pub(crate) const CTRL_QUEUE: usize = 4096;
/// A `DATA_FRAMES` message is at most this long (the smallest `max_frame_size` allowed).
pub(crate) const MAX_FRAMES_MESSAGE: usize = 64 * 1024;

/// The peer broke the protocol: why, for the log and the close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation(pub(crate) String);

/// What a peer's message means for the connection's tasks.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Input {
    /// The peer opened stream `id` (bidirectional or not): hand it to an acceptor.
    Opened { id: u32, bi: bool },
    /// Frames for our receive half of stream `id`, in order.
    Frames { id: u32, frames: Vec<Bytes> },
    /// The peer finished stream `id`.
    Fin { id: u32 },
    /// Stream `id` got credit: wake its sender.
    Credit { id: u32 },
    /// The connection got credit: wake every sender.
    ConnectionCredit,
    /// The peer stopped reading stream `id`: its sender must stop.
    Reset { id: u32 },
    /// Nothing to do beyond what the mux did itself (a refused stream, late frames, ...).
    Nothing,
}

/// Why a sender cannot send.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// Not now: wait for credit.
    Credit,
    /// Never: the peer stopped reading the stream (or it is gone).
    Reset,
}

/// Receive-side accounting of one window: a stream's or the connection's.
#[derive(Debug, Default)]
struct RecvWindow {
    /// Cost delivered and not yet credited back: at most `window + max_frame`.
    outstanding: usize,
    /// Bytes and cost consumed and not yet credited back.
    pending_bytes: usize,
    pending_cost: usize,
}

impl RecvWindow {
    /// Count `cost` received; false if it is more than the sender was allowed.
    fn receive(&mut self, cost: usize, limit: usize) -> bool {
        self.outstanding += cost;
        self.outstanding <= limit
    }

    /// Count a consumed frame; the bytes to credit back once half the window is consumed.
    fn consume(&mut self, bytes: usize, cost: usize, window: u32) -> Option<u32> {
        self.pending_bytes += bytes;
        self.pending_cost += cost;
        if self.pending_cost < window as usize / 2 {
            return None;
        }
        self.outstanding = self.outstanding.saturating_sub(self.pending_cost);
        let bytes = std::mem::take(&mut self.pending_bytes);
        self.pending_cost = 0;
        // Empty frames cost the receiver but took no credit from the sender: nothing to
        // return for them.
        (bytes > 0).then(|| u32::try_from(bytes).unwrap_or(u32::MAX))
    }
}

/// One stream as the mux sees it.
#[derive(Debug)]
struct Stream {
    /// Our receive half exists: frames are delivered to it.
    recv: Option<RecvState>,
    /// Our send half exists.
    send: Option<SendState>,
}

#[derive(Debug, Default)]
struct RecvState {
    window: RecvWindow,
    /// Bytes and cost delivered and not yet read: returned to the connection's credit if the
    /// reader goes away without them.
    unread_bytes: usize,
    unread_cost: usize,
    /// The peer finished the stream.
    finished: bool,
}

#[derive(Debug)]
struct SendState {
    credit: i64,
    /// The peer stopped reading.
    reset: bool,
}

/// The multiplexer of one connection.
#[derive(Debug)]
pub(crate) struct Mux {
    dialer: bool,
    max_frame: usize,
    /// Streams open at once (both directions, both openers) beyond which a peer's new stream
    /// is refused with a `RESET`.
    max_open: usize,
    /// The peer speaks version 2: `DATA_FRAMES` and the connection window.
    v2: bool,
    next_id: u32,
    streams: HashMap<u32, Stream>,
    /// The connection's receive window (version 2).
    recv: RecvWindow,
    /// The connection's send credit (version 2).
    send_credit: i64,
    ctrl: VecDeque<Bytes>,
    /// The control queue overflowed: the peer is cut off.
    overflowed: bool,
}

/// What a received frame counts against its windows: its length, and at least one. An empty
/// frame takes no credit from its sender, but it is queued all the same: counted as nothing, a
/// peer could queue empty frames without bound (16383 per `DATA_FRAMES` message) behind a
/// reader that does not read. Honest nodes never send empty frames.
pub(crate) fn window_cost(frame: &[u8]) -> usize {
    frame.len().max(1)
}

/// A mux message: `kind | id (u32 BE) | payload`.
pub(crate) fn encode(kind: u8, id: u32, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + payload.len());
    buf.put_u8(kind);
    buf.put_u32(id);
    buf.put_slice(payload);
    buf.freeze()
}

/// The messages carrying `frames` of stream `id`: runs of small frames packed into
/// `DATA_FRAMES` messages when the peer understands them, a `DATA` message per frame
/// otherwise (and for a frame too large to share a message).
pub(crate) fn data_messages(id: u32, frames: &[Bytes], packed: bool) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < frames.len() {
        // How many frames from `i` fit one DATA_FRAMES message.
        let mut end = i;
        let mut size = 5;
        while packed && end < frames.len() && size + 4 + frames[end].len() <= MAX_FRAMES_MESSAGE {
            size += 4 + frames[end].len();
            end += 1;
        }
        if end - i >= 2 {
            let mut buf = BytesMut::with_capacity(size);
            buf.put_u8(DATA_FRAMES);
            buf.put_u32(id);
            for f in &frames[i..end] {
                buf.put_u32(f.len() as u32);
                buf.put_slice(f);
            }
            out.push(buf.freeze());
            i = end;
        } else {
            out.push(encode(DATA, id, &frames[i]));
            i += 1;
        }
    }
    out
}

/// The frames of a `DATA_FRAMES` payload, as slices of it.
fn split_frames(payload: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let Some(header) = payload.get(at..at + 4) else {
            return Err("truncated frame header in DATA_FRAMES".into());
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = at + 4;
        if payload.len() - start < len {
            return Err("truncated frame in DATA_FRAMES".into());
        }
        frames.push(payload.slice(start..start + len));
        at = start + len;
    }
    Ok(frames)
}

impl Mux {
    /// The mux of a connection we dialed (`dialer`) or accepted, with a peer of version 2
    /// (`v2`) or 1, refusing the peer's streams beyond `max_streams` of each direction.
    pub(crate) fn new(dialer: bool, v2: bool, max_frame: usize, max_streams: usize) -> Mux {
        Mux {
            dialer,
            max_frame,
            max_open: max_streams * 2,
            v2,
            next_id: if dialer { 1 } else { 2 },
            streams: HashMap::new(),
            recv: RecvWindow::default(),
            send_credit: i64::from(CONN_WINDOW),
            ctrl: VecDeque::new(),
            overflowed: false,
        }
    }

    /// Whether the peer speaks version 2 (`DATA_FRAMES`).
    pub(crate) fn packs_frames(&self) -> bool {
        self.v2
    }

    /// Whether stream `id` is open (either half of ours still there).
    pub(crate) fn has_stream(&self, id: u32) -> bool {
        self.streams.contains_key(&id)
    }

    /// The connection's send credit left.
    #[cfg(test)]
    pub(crate) fn connection_credit(&self) -> i64 {
        self.send_credit
    }

    /// Streams open (in either direction).
    #[cfg(test)]
    pub(crate) fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The next control message to write.
    pub(crate) fn poll_control(&mut self) -> Option<Bytes> {
        self.ctrl.pop_front()
    }

    fn control(&mut self, kind: u8, id: u32, payload: &[u8]) -> Result<(), Violation> {
        if self.ctrl.len() >= CTRL_QUEUE {
            self.overflowed = true;
        }
        if self.overflowed {
            return Err(Violation(
                "control queue full: the peer does not read".into(),
            ));
        }
        self.ctrl.push_back(encode(kind, id, payload));
        Ok(())
    }

    /// Open a stream of ours: its id. Ids wrap after 2^31 streams, skipping those still open
    /// (a connection's first streams live as long as it does).
    pub(crate) fn open(&mut self, bi: bool) -> u32 {
        let mut id = self.next_id;
        while id == CONNECTION || self.streams.contains_key(&id) {
            id = id.wrapping_add(2);
        }
        self.next_id = id.wrapping_add(2);
        self.streams.insert(
            id,
            Stream {
                recv: bi.then(RecvState::default),
                send: Some(SendState {
                    credit: i64::from(WINDOW),
                    reset: false,
                }),
            },
        );
        id
    }

    /// Handle one mux message of the peer.
    pub(crate) fn receive(&mut self, data: &Bytes) -> Result<Input, Violation> {
        if self.overflowed {
            return Err(Violation(
                "control queue full: the peer does not read".into(),
            ));
        }
        if data.len() < 5 {
            return Err(Violation(format!("mux message of {} bytes", data.len())));
        }
        let kind = data[0];
        let id = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
        let payload = data.slice(5..);
        match kind {
            OPEN_BI | OPEN_UNI => self.opened(id, kind == OPEN_BI),
            DATA => self.frames(id, vec![payload]),
            DATA_FRAMES => {
                let frames =
                    split_frames(&payload).map_err(|r| Violation(format!("stream {id}: {r}")))?;
                self.frames(id, frames)
            }
            FIN => Ok(
                match self.streams.get_mut(&id).and_then(|s| s.recv.as_mut()) {
                    Some(recv) if !recv.finished => {
                        recv.finished = true;
                        Input::Fin { id }
                    }
                    _ => Input::Nothing,
                },
            ),
            RESET => Ok(
                match self.streams.get_mut(&id).and_then(|s| s.send.as_mut()) {
                    Some(send) => {
                        send.reset = true;
                        Input::Reset { id }
                    }
                    None => Input::Nothing,
                },
            ),
            CREDIT => {
                let n = <[u8; 4]>::try_from(&payload[..])
                    .map(u32::from_be_bytes)
                    .map_err(|_| Violation("malformed credit".into()))?;
                // Saturating: a peer crediting more than it was ever sent (2^31 credits of
                // u32::MAX) must not overflow a counter.
                if id == CONNECTION && self.v2 {
                    self.send_credit = self.send_credit.saturating_add(i64::from(n));
                    return Ok(Input::ConnectionCredit);
                }
                Ok(
                    match self.streams.get_mut(&id).and_then(|s| s.send.as_mut()) {
                        Some(send) => {
                            send.credit = send.credit.saturating_add(i64::from(n));
                            Input::Credit { id }
                        }
                        None => Input::Nothing,
                    },
                )
            }
            other => Err(Violation(format!("unknown mux kind {other}"))),
        }
    }

    fn opened(&mut self, id: u32, bi: bool) -> Result<Input, Violation> {
        // Streams the peer opens have the peer's parity; id 0 is the connection's.
        let theirs = id != CONNECTION && (id % 2 == 1) != self.dialer;
        if !theirs || self.streams.contains_key(&id) {
            return Err(Violation(format!("bad stream id {id}")));
        }
        if self.streams.len() >= self.max_open {
            self.control(RESET, id, &[])?;
            return Ok(Input::Nothing);
        }
        self.streams.insert(
            id,
            Stream {
                recv: Some(RecvState::default()),
                send: bi.then_some(SendState {
                    credit: i64::from(WINDOW),
                    reset: false,
                }),
            },
        );
        Ok(Input::Opened { id, bi })
    }

    fn frames(&mut self, id: u32, frames: Vec<Bytes>) -> Result<Input, Violation> {
        let (bytes, cost) = frames
            .iter()
            .fold((0, 0), |(b, c), f| (b + f.len(), c + window_cost(f)));
        if self.v2
            && !self
                .recv
                .receive(cost, CONN_WINDOW as usize + self.max_frame)
        {
            return Err(Violation("the connection exceeded its credit".into()));
        }
        let max_frame = self.max_frame;
        let Some(recv) = self.streams.get_mut(&id).and_then(|s| s.recv.as_mut()) else {
            // A stream nobody reads (any more): dropped, and its credit returned at once.
            self.discarded(bytes, cost)?;
            return Ok(Input::Nothing);
        };
        if recv.finished {
            return Err(Violation(format!("stream {id}: data after its end")));
        }
        for f in &frames {
            if !recv
                .window
                .receive(window_cost(f), WINDOW as usize + max_frame)
            {
                return Err(Violation(format!("stream {id} exceeded its credit")));
            }
        }
        recv.unread_bytes += bytes;
        recv.unread_cost += cost;
        Ok(Input::Frames { id, frames })
    }

    /// Frames nobody will read: the connection's credit back.
    fn discarded(&mut self, bytes: usize, cost: usize) -> Result<(), Violation> {
        if self.v2
            && let Some(n) = self.recv.consume(bytes, cost, CONN_WINDOW)
        {
            self.control(CREDIT, CONNECTION, &n.to_be_bytes())?;
        }
        Ok(())
    }

    /// The reader of stream `id` consumed `frame`: credit back what is due.
    pub(crate) fn consumed(&mut self, id: u32, frame: &[u8]) -> Result<(), Violation> {
        let (bytes, cost) = (frame.len(), window_cost(frame));
        if let Some(recv) = self.streams.get_mut(&id).and_then(|s| s.recv.as_mut()) {
            recv.unread_bytes = recv.unread_bytes.saturating_sub(bytes);
            recv.unread_cost = recv.unread_cost.saturating_sub(cost);
            if let Some(n) = recv.window.consume(bytes, cost, WINDOW) {
                self.control(CREDIT, id, &n.to_be_bytes())?;
            }
        }
        self.discarded(bytes, cost)
    }

    /// Our receive half of stream `id` is gone: the peer is told to stop sending unless it
    /// finished, and what was left unread is returned to the connection's credit.
    pub(crate) fn recv_dropped(&mut self, id: u32) -> Result<(), Violation> {
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        let Some(recv) = stream.recv.take() else {
            return Ok(());
        };
        if stream.send.is_none() {
            self.streams.remove(&id);
        }
        if !recv.finished {
            self.control(RESET, id, &[])?;
        }
        self.discarded(recv.unread_bytes, recv.unread_cost)
    }

    /// Our send half of stream `id` is gone (its `FIN` is the caller's: it goes after the
    /// stream's data).
    pub(crate) fn send_dropped(&mut self, id: u32) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.send = None;
            if stream.recv.is_none() {
                self.streams.remove(&id);
            }
        }
    }

    /// Take `len` bytes of credit to send on stream `id`. With `overdraw`, any credit left
    /// will do (a frame larger than the window goes that way); without, the whole of `len`
    /// must be there (the rest of a batch).
    pub(crate) fn take_credit(
        &mut self,
        id: u32,
        len: usize,
        overdraw: bool,
    ) -> Result<(), Blocked> {
        let Some(send) = self.streams.get_mut(&id).and_then(|s| s.send.as_mut()) else {
            return Err(Blocked::Reset);
        };
        if send.reset {
            return Err(Blocked::Reset);
        }
        let len = len as i64;
        let enough = |credit: i64| if overdraw { credit > 0 } else { credit >= len };
        if !enough(send.credit) || (self.v2 && !enough(self.send_credit)) {
            return Err(Blocked::Credit);
        }
        send.credit -= len;
        if self.v2 {
            self.send_credit -= len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_FRAME: usize = 64 * 1024;

    fn msg(kind: u8, id: u32, payload: &[u8]) -> Bytes {
        encode(kind, id, payload)
    }

    fn credit(id: u32, n: u32) -> Bytes {
        msg(CREDIT, id, &n.to_be_bytes())
    }

    fn controls(mux: &mut Mux) -> Vec<(u8, u32, Vec<u8>)> {
        std::iter::from_fn(|| mux.poll_control())
            .map(|m| {
                (
                    m[0],
                    u32::from_be_bytes([m[1], m[2], m[3], m[4]]),
                    m[5..].to_vec(),
                )
            })
            .collect()
    }

    fn credits(mux: &mut Mux) -> Vec<(u32, u32)> {
        controls(mux)
            .into_iter()
            .filter(|c| c.0 == CREDIT)
            .map(|(_, id, p)| (id, u32::from_be_bytes(p.try_into().expect("4 bytes"))))
            .collect()
    }

    /// An acceptor's mux, with stream 1 opened by the peer.
    fn acceptor_with_stream() -> Mux {
        let mut mux = Mux::new(false, true, MAX_FRAME, 16);
        assert_eq!(
            mux.receive(&msg(OPEN_BI, 1, &[])),
            Ok(Input::Opened { id: 1, bi: true })
        );
        mux
    }

    #[test]
    fn a_sender_waits_for_credit_and_goes_on_when_it_comes() {
        let mut mux = Mux::new(true, true, MAX_FRAME, 16);
        let id = mux.open(true);
        let frame = 32 * 1024;
        for _ in 0..WINDOW as usize / frame {
            assert_eq!(mux.take_credit(id, frame, true), Ok(()));
        }
        assert_eq!(mux.take_credit(id, 1, true), Err(Blocked::Credit));
        assert_eq!(
            mux.receive(&credit(id, frame as u32)),
            Ok(Input::Credit { id })
        );
        assert_eq!(mux.take_credit(id, frame, false), Ok(()));
        assert_eq!(mux.take_credit(id, 1, true), Err(Blocked::Credit));
    }

    #[test]
    fn one_frame_may_overdraw_the_window_the_rest_of_a_batch_may_not() {
        let mut mux = Mux::new(true, true, MAX_FRAME, 16);
        let id = mux.open(false);
        assert_eq!(mux.take_credit(id, WINDOW as usize - 10, true), Ok(()));
        assert_eq!(mux.take_credit(id, 100, false), Err(Blocked::Credit));
        assert_eq!(mux.take_credit(id, 100, true), Ok(()));
        assert_eq!(mux.take_credit(id, 1, true), Err(Blocked::Credit));
    }

    #[test]
    fn the_connection_window_holds_back_every_stream() {
        let mut mux = Mux::new(true, true, MAX_FRAME, 64);
        let ids: Vec<u32> = (0..17).map(|_| mux.open(false)).collect();
        // 16 streams fill the connection's window, each within its own.
        for &id in &ids[..16] {
            assert_eq!(mux.take_credit(id, WINDOW as usize, true), Ok(()));
        }
        assert_eq!(mux.take_credit(ids[16], 1, true), Err(Blocked::Credit));
        // Stream credit alone does not help...
        mux.receive(&credit(ids[0], WINDOW)).expect("credit");
        assert_eq!(mux.take_credit(ids[16], 1, true), Err(Blocked::Credit));
        // ...connection credit does, for any stream.
        assert_eq!(
            mux.receive(&credit(CONNECTION, 1000)),
            Ok(Input::ConnectionCredit)
        );
        assert_eq!(mux.take_credit(ids[16], 1000, false), Ok(()));
    }

    #[test]
    fn a_version_1_peer_has_no_connection_window() {
        let mut mux = Mux::new(true, false, MAX_FRAME, 64);
        let ids: Vec<u32> = (0..17).map(|_| mux.open(false)).collect();
        for &id in &ids {
            assert_eq!(mux.take_credit(id, WINDOW as usize, true), Ok(()));
        }
        // Connection credit from it means nothing (it never sends any).
        assert_eq!(mux.receive(&credit(CONNECTION, 5)), Ok(Input::Nothing));
        // And its streams are not counted against one.
        let mut mux = Mux::new(false, false, MAX_FRAME, 64);
        let big = Bytes::from(vec![0u8; 32 * 1024]);
        for id in (1..40).step_by(2) {
            mux.receive(&msg(OPEN_UNI, id, &[])).expect("open");
            for _ in 0..16 {
                mux.receive(&msg(DATA, id, &big))
                    .expect("within the stream's window");
            }
        }
    }

    #[test]
    fn credit_is_returned_once_half_a_window_is_consumed() {
        let mut mux = acceptor_with_stream();
        let frame = vec![7u8; 64 * 1024];
        for _ in 0..4 {
            let got = mux.receive(&msg(DATA, 1, &frame)).expect("within credit");
            assert!(matches!(got, Input::Frames { id: 1, ref frames } if frames.len() == 1));
        }
        for _ in 0..3 {
            mux.consumed(1, &frame).expect("consume");
        }
        assert_eq!(credits(&mut mux), vec![]);
        mux.consumed(1, &frame).expect("consume");
        assert_eq!(credits(&mut mux), vec![(1, WINDOW / 2)]);
    }

    #[test]
    fn the_connection_is_credited_for_what_all_its_streams_consumed() {
        let mut mux = Mux::new(false, true, MAX_FRAME, 64);
        let frame = vec![1u8; 64 * 1024];
        // 16 streams of 4 frames each: 4 MiB, half the connection window.
        for id in (1..33).step_by(2) {
            mux.receive(&msg(OPEN_UNI, id, &[])).expect("open");
            for _ in 0..4 {
                mux.receive(&msg(DATA, id, &frame)).expect("within credit");
            }
        }
        for id in (1..33).step_by(2) {
            for _ in 0..4 {
                mux.consumed(id, &frame).expect("consume");
            }
        }
        let got = credits(&mut mux);
        assert_eq!(got.iter().filter(|c| c.0 != CONNECTION).count(), 16);
        assert_eq!(
            got.iter().filter(|c| c.0 == CONNECTION).collect::<Vec<_>>(),
            vec![&(CONNECTION, CONN_WINDOW / 2)]
        );
    }

    #[test]
    fn a_peer_beyond_a_streams_credit_is_a_violation() {
        let mut mux = acceptor_with_stream();
        let frame = vec![0u8; MAX_FRAME];
        for _ in 0..(WINDOW as usize / MAX_FRAME + 1) {
            mux.receive(&msg(DATA, 1, &frame))
                .expect("within window + one frame");
        }
        assert_eq!(
            mux.receive(&msg(DATA, 1, &[0])),
            Err(Violation("stream 1 exceeded its credit".into()))
        );
    }

    #[test]
    fn a_peer_beyond_the_connections_credit_is_a_violation() {
        let mut mux = Mux::new(false, true, MAX_FRAME, 1024);
        let frame = vec![0u8; MAX_FRAME];
        let per_stream = WINDOW as usize / MAX_FRAME;
        let mut sent = 0;
        let mut id = 1;
        let err = loop {
            mux.receive(&msg(OPEN_UNI, id, &[])).expect("open");
            let mut failed = None;
            for _ in 0..per_stream {
                match mux.receive(&msg(DATA, id, &frame)) {
                    Ok(_) => sent += MAX_FRAME,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                break e;
            }
            id += 2;
        };
        assert_eq!(err, Violation("the connection exceeded its credit".into()));
        assert_eq!(sent, CONN_WINDOW as usize + MAX_FRAME);
    }

    #[test]
    fn a_reader_that_goes_away_resets_the_stream_and_frees_the_connections_credit() {
        let mut mux = acceptor_with_stream();
        let frame = vec![0u8; 64 * 1024];
        for _ in 0..8 {
            mux.receive(&msg(DATA, 1, &frame)).expect("within credit");
        }
        mux.consumed(1, &frame).expect("consume");
        mux.recv_dropped(1).expect("drop");
        let got = controls(&mut mux);
        assert_eq!(got[0], (RESET, 1, vec![]));
        // Everything the stream received is back, read or not: the connection credit is
        // returned in full once half its window is free, so count what is pending.
        assert_eq!(mux.recv.pending_bytes, 8 * 64 * 1024);
        // Late frames for it are dropped, and their credit returned as well.
        assert_eq!(mux.receive(&msg(DATA, 1, &frame)), Ok(Input::Nothing));
        assert_eq!(mux.recv.pending_bytes, 9 * 64 * 1024);
        // The send half still works, until the peer resets it.
        assert_eq!(mux.take_credit(1, 10, true), Ok(()));
        assert_eq!(mux.receive(&msg(RESET, 1, &[])), Ok(Input::Reset { id: 1 }));
        assert_eq!(mux.take_credit(1, 10, true), Err(Blocked::Reset));
        mux.send_dropped(1);
        assert_eq!(mux.open_streams(), 0);
    }

    #[test]
    fn a_finished_stream_is_not_reset_when_its_reader_goes() {
        let mut mux = acceptor_with_stream();
        assert_eq!(mux.receive(&msg(FIN, 1, &[])), Ok(Input::Fin { id: 1 }));
        assert_eq!(mux.receive(&msg(FIN, 1, &[])), Ok(Input::Nothing));
        assert_eq!(
            mux.receive(&msg(DATA, 1, b"late")),
            Err(Violation("stream 1: data after its end".into()))
        );
        let mut mux = acceptor_with_stream();
        mux.receive(&msg(FIN, 1, &[])).expect("fin");
        mux.recv_dropped(1).expect("drop");
        assert_eq!(controls(&mut mux), vec![]);
    }

    #[test]
    fn streams_over_the_limit_are_refused_with_a_reset() {
        let mut mux = Mux::new(false, true, MAX_FRAME, 2);
        for id in [1, 3, 5, 7] {
            assert!(matches!(
                mux.receive(&msg(OPEN_UNI, id, &[])),
                Ok(Input::Opened { .. })
            ));
        }
        assert_eq!(mux.receive(&msg(OPEN_UNI, 9, &[])), Ok(Input::Nothing));
        assert_eq!(controls(&mut mux), vec![(RESET, 9, vec![])]);
        // Its frames are dropped (credit returned), not a violation: the reset crosses them.
        assert_eq!(mux.receive(&msg(DATA, 9, b"x")), Ok(Input::Nothing));
    }

    #[test]
    fn a_peer_that_reads_nothing_of_ours_is_cut_off() {
        let mut mux = Mux::new(false, true, MAX_FRAME, 1);
        mux.receive(&msg(OPEN_UNI, 1, &[])).expect("open");
        mux.receive(&msg(OPEN_UNI, 3, &[])).expect("open");
        let mut id = 5;
        let err = loop {
            match mux.receive(&msg(OPEN_UNI, id, &[])) {
                Ok(Input::Nothing) => id += 2,
                Ok(other) => panic!("stream over the limit accepted: {other:?}"),
                Err(e) => break e,
            }
        };
        assert_eq!((id - 5) / 2, CTRL_QUEUE as u32);
        assert!(err.0.contains("does not read"), "{err:?}");
        // And stays cut off.
        assert!(mux.receive(&credit(1, 1)).is_err());
    }

    #[test]
    fn malformed_messages_are_violations() {
        let cases: [(Bytes, &str); 8] = [
            (Bytes::from_static(&[2, 0, 0]), "mux message of 3 bytes"),
            (msg(9, 1, &[]), "unknown mux kind 9"),
            (msg(CREDIT, 1, &[0, 0, 1]), "malformed credit"),
            (msg(OPEN_BI, 2, &[]), "bad stream id 2"), // the acceptor's parity
            (msg(OPEN_BI, 0, &[]), "bad stream id 0"),
            (msg(OPEN_BI, 1, &[]), "bad stream id 1"), // already open
            (
                msg(DATA_FRAMES, 1, &[0, 0, 0]),
                "stream 1: truncated frame header in DATA_FRAMES",
            ),
            (
                msg(DATA_FRAMES, 1, &[0, 0, 0, 9, 1]),
                "stream 1: truncated frame in DATA_FRAMES",
            ),
        ];
        for (m, reason) in cases {
            let mut mux = acceptor_with_stream();
            assert_eq!(mux.receive(&m), Err(Violation(reason.into())), "{m:?}");
        }
    }

    #[test]
    fn credit_beyond_the_counter_saturates() {
        let mut mux = Mux::new(true, true, MAX_FRAME, 4);
        let id = mux.open(false);
        mux.send_credit = i64::MAX - 1;
        mux.streams
            .get_mut(&id)
            .and_then(|s| s.send.as_mut())
            .expect("send half")
            .credit = i64::MAX - 1;
        mux.receive(&credit(id, u32::MAX)).expect("credit");
        mux.receive(&credit(CONNECTION, u32::MAX)).expect("credit");
        assert_eq!(mux.send_credit, i64::MAX);
        assert_eq!(mux.take_credit(id, MAX_FRAME, false), Ok(()));
    }

    #[test]
    fn stream_ids_wrap_around_the_streams_still_open() {
        let mut mux = Mux::new(false, true, MAX_FRAME, 4);
        let first = mux.open(true);
        assert_eq!(first, 2);
        mux.next_id = u32::MAX - 1;
        assert_eq!(mux.open(true), u32::MAX - 1);
        // Wrapped: 0 is the connection's, 2 is still open.
        assert_eq!(mux.open(true), 4);
        let mut dialer = Mux::new(true, true, MAX_FRAME, 4);
        assert_eq!(dialer.open(false), 1);
        dialer.next_id = u32::MAX;
        assert_eq!(dialer.open(false), u32::MAX);
        assert_eq!(dialer.open(false), 3);
    }

    #[test]
    fn frames_pack_into_one_message_for_a_version_2_peer() {
        let frames: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![i; 100])).collect();
        let packed = data_messages(3, &frames, true);
        assert_eq!(packed.len(), 1);
        let mut mux = Mux::new(true, true, MAX_FRAME, 4);
        mux.streams.insert(
            3,
            Stream {
                recv: Some(RecvState::default()),
                send: None,
            },
        );
        assert_eq!(
            mux.receive(&packed[0]),
            Ok(Input::Frames {
                id: 3,
                frames: frames.clone()
            })
        );
        assert_eq!(data_messages(3, &frames, false).len(), 5);
    }

    fn payload(m: &Bytes) -> Bytes {
        m.clone()
    }

    /// Decode messages back into frames, as the reader does.
    fn frames_of(messages: &[Bytes]) -> Vec<Bytes> {
        let mut out = Vec::new();
        for m in messages {
            let b = payload(m);
            assert_eq!(u32::from_be_bytes([b[1], b[2], b[3], b[4]]), 7, "stream id");
            match b[0] {
                DATA => out.push(b.slice(5..)),
                DATA_FRAMES => out.extend(split_frames(&b.slice(5..)).unwrap()),
                k => panic!("kind {k}"),
            }
        }
        out
    }

    #[test]
    fn small_frames_share_a_message_when_the_peer_understands_it() {
        let frames: Vec<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 100])).collect();
        let packed = data_messages(7, &frames, true);
        assert_eq!(packed.len(), 1);
        assert_eq!(payload(&packed[0])[0], DATA_FRAMES);
        assert_eq!(frames_of(&packed), frames);
        // A version 1 peer gets one DATA message per frame.
        let plain = data_messages(7, &frames, false);
        assert_eq!(plain.len(), frames.len());
        assert!(plain.iter().all(|m| payload(m)[0] == DATA));
        assert_eq!(frames_of(&plain), frames);
    }

    #[test]
    fn packed_messages_stay_under_the_smallest_frame_limit() {
        let frames: Vec<Bytes> = (0..50u8).map(|i| Bytes::from(vec![i; 5000])).collect();
        let big = Bytes::from(vec![9u8; MAX_FRAMES_MESSAGE]);
        let mut all = frames.clone();
        all.insert(20, big);
        let messages = data_messages(7, &all, true);
        assert!(messages.len() > 3);
        for m in &messages {
            let b = payload(m);
            if b[0] == DATA_FRAMES {
                assert!(b.len() <= MAX_FRAMES_MESSAGE, "{} bytes", b.len());
            }
        }
        assert_eq!(
            frames_of(&messages),
            all,
            "order kept around the large frame"
        );
    }

    #[test]
    fn truncated_packed_frames_are_refused() {
        let frames = [Bytes::from_static(b"abc"), Bytes::from_static(b"de")];
        let b = payload(&data_messages(7, &frames, true)[0]).slice(5..);
        assert!(split_frames(&b).is_ok());
        for cut in 1..b.len() {
            let res = split_frames(&b.slice(..cut));
            // A cut that falls between frames is a shorter, valid payload.
            if cut != 7 {
                assert!(res.is_err(), "cut at {cut} accepted");
            }
        }
        assert_eq!(split_frames(&Bytes::new()).unwrap(), Vec::<Bytes>::new());
    }
}
