//! The load generator: raw Engine.IO v4 / Socket.IO v5 WebSocket clients (no client library
//! in the way), each in a room, each publishing at its share of the offered rate and timing
//! every message it receives against the send timestamp inside it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the load generator started (one clock for senders and receivers).
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What clients publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// To the publisher's room (itself included).
    Rooms,
    /// To every socket.
    All,
    /// No publishing: `fetch_sockets` from node 0, `rate` requests in flight at a time.
    Fetch,
}

/// Counters shared by every client.
#[derive(Default)]
pub struct Totals {
    pub published: AtomicU64,
    /// Deliveries the publishes should cause.
    pub expected: AtomicU64,
    pub received: AtomicU64,
}

/// Phases the orchestrator moves the clients through.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Idle,
    Publish,
    /// Stop publishing; keep receiving.
    Drain,
    /// Return what you measured.
    Finish,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    ws: Ws,
    room_size: u64,
}

const PAYLOAD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

impl Client {
    pub async fn connect(addr: SocketAddr, room: &str, room_size: u64) -> anyhow::Result<Self> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .context("websocket connect")?;
        ws.send(Message::Text(format!("40{{\"room\":\"{room}\"}}").into()))
            .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.starts_with("40") => {
                    return Ok(Self { ws, room_size });
                }
                Some(Ok(Message::Text(t))) if t.starts_with("44") => {
                    anyhow::bail!("connect refused: {t}")
                }
                Some(Ok(_)) => {}
                other => anyhow::bail!("connect failed: {other:?}"),
            }
        }
    }

    /// Publish every `period` (first at `phase`) while the phase says so; record the latency
    /// (µs) of every message received until `Finish`.
    pub async fn run(
        mut self,
        kind: Kind,
        period: Duration,
        offset: Duration,
        clients: u64,
        mut phase_rx: watch::Receiver<Phase>,
        totals: Arc<Totals>,
    ) -> anyhow::Result<Vec<u32>> {
        let mut lats = Vec::new();
        let (event, fanout) = match kind {
            Kind::Rooms => ("pub", self.room_size),
            Kind::All => ("all", clients),
            Kind::Fetch => ("", 0),
        };
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut phase = *phase_rx.borrow_and_update();
        loop {
            tokio::select! {
                msg = self.ws.next() => {
                    let Some(msg) = msg else { anyhow::bail!("server closed the connection") };
                    let Message::Text(t) = msg? else { continue };
                    if t.as_str() == "2" {
                        self.ws.send(Message::Text("3".into())).await?;
                    } else if let Some(sent) = timestamp(t.as_str()) {
                        lats.push((now_ns().saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
                        totals.received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ = ticker.tick(), if phase == Phase::Publish && kind != Kind::Fetch => {
                    let frame = format!("42[\"{event}\",{{\"t\":{},\"p\":\"{PAYLOAD}\"}}]", now_ns());
                    // Count before sending: a delivery must never be seen before its publish
                    // is counted (the drain would stop early and miscount what follows).
                    totals.published.fetch_add(1, Ordering::Relaxed);
                    totals.expected.fetch_add(fanout, Ordering::Relaxed);
                    self.ws.send(Message::Text(frame.into())).await?;
                }
                changed = phase_rx.changed() => {
                    if changed.is_err() { break; }
                    phase = *phase_rx.borrow_and_update();
                    if phase == Phase::Publish {
                        ticker.reset_at(tokio::time::Instant::now() + offset);
                    }
                    if phase == Phase::Finish { break; }
                }
            }
        }
        Ok(lats)
    }
}

/// The send timestamp of a `42["m",{"t":123,...}]` message.
fn timestamp(text: &str) -> Option<u64> {
    let rest = text.strip_prefix("42[\"m\",{\"t\":")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp() {
        assert_eq!(
            super::timestamp("42[\"m\",{\"t\":1234,\"p\":\"x\"}]"),
            Some(1234)
        );
        assert_eq!(super::timestamp("42[\"x\",{\"t\":1}]"), None);
    }
}
