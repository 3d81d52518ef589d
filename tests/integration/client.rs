//! A small raw Socket.IO v5 client over Engine.IO v4 WebSocket, enough to drive a server the
//! way a browser would: namespaces, events, acks both ways, binary attachments.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// How long a test waits for something it expects before failing.
pub const WAIT: Duration = Duration::from_secs(20);

/// A decoded Socket.IO packet.
#[derive(Debug, Clone)]
pub struct Packet {
    pub kind: u8,
    pub ns: String,
    pub id: Option<u64>,
    pub data: Value,
    pub bins: Vec<Vec<u8>>,
}

impl Packet {
    pub fn event(&self) -> Option<&str> {
        match self.kind {
            2 | 5 => self.data.get(0).and_then(Value::as_str),
            _ => None,
        }
    }
    /// The event's arguments (without its name).
    pub fn args(&self) -> Vec<Value> {
        self.data
            .as_array()
            .map(|a| a.iter().skip(1).cloned().collect())
            .unwrap_or_default()
    }
}

enum Incoming {
    Packet(Packet),
    Closed,
}

pub struct Client {
    out: mpsc::UnboundedSender<Message>,
    rx: mpsc::UnboundedReceiver<Incoming>,
    stash: VecDeque<Packet>,
    sids: HashMap<String, String>,
    next_ack: u64,
    closed: bool,
}

fn ns_prefix(ns: &str) -> String {
    if ns == "/" {
        String::new()
    } else {
        format!("{ns},")
    }
}

fn parse_packet(text: &str) -> anyhow::Result<(Packet, usize)> {
    let mut rest = text;
    let kind = rest
        .get(..1)
        .and_then(|c| c.parse::<u8>().ok())
        .ok_or_else(|| anyhow!("bad packet {text:?}"))?;
    rest = &rest[1..];
    let mut attachments = 0;
    if kind == 5 || kind == 6 {
        let dash = rest
            .find('-')
            .ok_or_else(|| anyhow!("binary packet without count"))?;
        attachments = rest[..dash].parse()?;
        rest = &rest[dash + 1..];
    }
    let mut ns = "/".to_string();
    if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        ns = rest[..end].to_string();
        rest = rest.get(end + 1..).unwrap_or("");
    }
    let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
    let id = if digits > 0 {
        Some(rest[..digits].parse()?)
    } else {
        None
    };
    rest = &rest[digits..];
    let data = if rest.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(rest)?
    };
    Ok((
        Packet {
            kind,
            ns,
            id,
            data,
            bins: Vec::new(),
        },
        attachments,
    ))
}

/// Replace `{"_placeholder":true,"num":n}` with `{"bin": [bytes...]}` for easy assertions.
fn fill_placeholders(v: &mut Value, bins: &[Vec<u8>]) {
    match v {
        Value::Object(map) if map.get("_placeholder") == Some(&Value::Bool(true)) => {
            let n = map.get("num").and_then(Value::as_u64).unwrap_or(0) as usize;
            *v = json!({ "bin": bins.get(n).cloned().unwrap_or_default() });
        }
        Value::Object(map) => map.values_mut().for_each(|v| fill_placeholders(v, bins)),
        Value::Array(a) => a.iter_mut().for_each(|v| fill_placeholders(v, bins)),
        _ => {}
    }
}

impl Client {
    /// Connect over WebSocket and join the given namespaces.
    pub async fn connect(addr: SocketAddr, namespaces: &[&str]) -> anyhow::Result<Client> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .with_context(|| format!("connect {url}"))?;
        let (mut sink, mut stream) = ws.split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
        });
        let pong_tx = out_tx.clone();
        tokio::spawn(async move {
            let mut pending: Option<(Packet, usize)> = None;
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    Message::Text(t) => {
                        let t = t.as_str();
                        match t.as_bytes().first() {
                            Some(b'2') => {
                                let _ = pong_tx.send(Message::Text("3".into()));
                            }
                            Some(b'4') => match parse_packet(&t[1..]) {
                                Ok((p, 0)) => {
                                    let _ = in_tx.send(Incoming::Packet(p));
                                }
                                Ok((p, n)) => pending = Some((p, n)),
                                Err(e) => eprintln!("client: {e}"),
                            },
                            Some(b'1') => break,
                            _ => {}
                        }
                    }
                    Message::Binary(b) => {
                        if let Some((mut p, n)) = pending.take() {
                            p.bins.push(b.to_vec());
                            if p.bins.len() == n {
                                let bins = p.bins.clone();
                                fill_placeholders(&mut p.data, &bins);
                                let _ = in_tx.send(Incoming::Packet(p));
                            } else {
                                pending = Some((p, n));
                            }
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = in_tx.send(Incoming::Closed);
        });
        let mut client = Client {
            out: out_tx,
            rx: in_rx,
            stash: VecDeque::new(),
            sids: HashMap::new(),
            next_ack: 1,
            closed: false,
        };
        for ns in namespaces {
            client.join_ns(ns).await?;
        }
        Ok(client)
    }

    pub async fn join_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        self.send_raw(format!("40{}", ns_prefix(ns)));
        let p = self
            .wait_for(|p| p.kind == 0 && p.ns == ns)
            .await
            .with_context(|| format!("connect to namespace {ns}"))?;
        let sid = p.data["sid"]
            .as_str()
            .ok_or_else(|| anyhow!("no sid in {p:?}"))?;
        self.sids.insert(ns.to_string(), sid.to_string());
        Ok(())
    }

    pub fn sid(&self, ns: &str) -> String {
        self.sids.get(ns).cloned().unwrap_or_default()
    }

    fn send_raw(&self, text: String) {
        let _ = self.out.send(Message::Text(text.into()));
    }

    /// Emit an event (no ack).
    pub fn emit(&self, ns: &str, event: &str, args: Vec<Value>) {
        let mut data = vec![json!(event)];
        data.extend(args);
        self.send_raw(format!("42{}{}", ns_prefix(ns), Value::Array(data)));
    }

    /// Emit an event and wait for the server's ack.
    pub async fn emit_with_ack(
        &mut self,
        ns: &str,
        event: &str,
        args: Vec<Value>,
    ) -> anyhow::Result<Vec<Value>> {
        let id = self.next_ack;
        self.next_ack += 1;
        let mut data = vec![json!(event)];
        data.extend(args);
        self.send_raw(format!("42{}{id}{}", ns_prefix(ns), Value::Array(data)));
        let p = self
            .wait_for(|p| p.kind == 3 && p.ns == ns && p.id == Some(id))
            .await?;
        Ok(p.data.as_array().cloned().unwrap_or_default())
    }

    /// Answer a server's emit-with-ack.
    pub fn ack(&self, p: &Packet, args: Vec<Value>) {
        let id = p.id.expect("packet has no ack id");
        self.send_raw(format!("43{}{id}{}", ns_prefix(&p.ns), Value::Array(args)));
    }

    /// Wait for the next packet matching `pred`; others are kept for later calls.
    pub async fn wait_for(&mut self, pred: impl Fn(&Packet) -> bool) -> anyhow::Result<Packet> {
        if let Some(i) = self.stash.iter().position(&pred) {
            return Ok(self.stash.remove(i).expect("index is valid"));
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.closed {
                bail!("connection closed while waiting");
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => bail!("timed out; unmatched packets: {:?}", self.stash),
                Ok(None) | Ok(Some(Incoming::Closed)) => self.closed = true,
                Ok(Some(Incoming::Packet(p))) if pred(&p) => return Ok(p),
                Ok(Some(Incoming::Packet(p))) => self.stash.push_back(p),
            }
        }
    }

    /// The next event named `event` on `ns`.
    pub async fn event(&mut self, ns: &str, event: &str) -> anyhow::Result<Packet> {
        self.wait_for(|p| p.ns == ns && p.event() == Some(event))
            .await
            .with_context(|| format!("waiting for event {event:?} on {ns}"))
    }

    /// The next event on `ns` whatever its name, in arrival order.
    pub async fn next_event(&mut self, ns: &str) -> anyhow::Result<Packet> {
        self.wait_for(|p| p.ns == ns && p.event().is_some()).await
    }

    /// Wait until the server disconnects this client from `ns` (or closes the connection).
    pub async fn disconnected(&mut self, ns: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        if self.stash.iter().any(|p| p.kind == 1 && p.ns == ns) || self.closed {
            return Ok(());
        }
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => bail!("not disconnected from {ns}"),
                Ok(None) | Ok(Some(Incoming::Closed)) => {
                    self.closed = true;
                    return Ok(());
                }
                Ok(Some(Incoming::Packet(p))) if p.kind == 1 && p.ns == ns => return Ok(()),
                Ok(Some(Incoming::Packet(p))) => self.stash.push_back(p),
            }
        }
    }
}
