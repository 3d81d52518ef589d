//! The server side of the benchmark: a child process hosting every Socket.IO node of one
//! backend on one tokio runtime (so the single node and the cluster get the same two worker
//! threads), driven over stdin/stdout by the orchestrator.
//!
//! With `--node-procs`, each node of a clustered backend runs in a process of its own instead
//! (as pods would), and the orchestrator sums their figures.
//!
//! Protocol: the child prints `{"mesh": addr}` once its mesh listens (the seed of the other
//! processes), then `{"addrs": [...]}` once every node serves and the cluster has formed; then
//! each `stats` or `fetch <in flight> <batches>` line on stdin is answered by one JSON line;
//! end of stdin stops it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use std::future::IntoFuture;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use socketioxide::{
    SocketIo,
    adapter::{Adapter, Emitter, LocalAdapter},
    extract::{Data, SocketRef},
    handler::ConnectHandler,
};
use socketioxide_mesh::{
    DevCa, Mesh, MeshAdapter, MeshConfig, StaticSeeds, TlsConfig, TransportKind,
};
use socketioxide_redis::{RedisAdapter, RedisAdapterCtr, drivers::redis::redis_client as redis};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Per-socket packet buffer of every backend (socketioxide's default is 128). The same for
/// all backends; large enough that a burst is not mistaken for loss.
pub const SOCKET_BUFFER: usize = 4096;

/// The message clients publish and receive: a send timestamp and a 64-byte-ish payload.
#[derive(Serialize, Deserialize)]
pub struct Msg {
    pub t: u64,
    pub p: String,
}

#[derive(Deserialize)]
struct Auth {
    room: String,
}

/// What the child reports on `stats`.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ServerStats {
    /// Broadcasts the nodes' handlers issued (publishes seen by the server).
    pub publishes: u64,
    /// Commands written to peers (mesh only), summed over nodes.
    pub commands_sent: u64,
    pub commands_received: u64,
    pub commands_lost: u64,
    pub volatile_dropped: u64,
    pub slow_peer_cutoffs: u64,
    /// Send / receive system calls on the peer sockets (mesh only).
    pub peer_send_calls: u64,
    pub peer_recv_calls: u64,
    /// Frames written to peers in one call, summed: `peer_batches` calls carried them.
    pub peer_batches: u64,
    /// Packets socketioxide dropped because a socket's buffer was full (mesh only: counted on
    /// remote broadcasts).
    pub socket_drops: u64,
    /// Deliveries a publishing node's own sockets refused (their buffer full): the error
    /// socketioxide returns to the handler's `emit`, any backend.
    #[serde(default)]
    pub local_drops: u64,
    /// Bytes of the commands written to peers (mesh only).
    #[serde(default)]
    pub command_bytes_sent: u64,
    /// Room broadcasts not sent to a peer with no member in their rooms (mesh routing).
    #[serde(default)]
    pub routed_away: u64,
}

impl std::ops::AddAssign for ServerStats {
    fn add_assign(&mut self, o: Self) {
        self.publishes += o.publishes;
        self.commands_sent += o.commands_sent;
        self.commands_received += o.commands_received;
        self.commands_lost += o.commands_lost;
        self.volatile_dropped += o.volatile_dropped;
        self.slow_peer_cutoffs += o.slow_peer_cutoffs;
        self.peer_send_calls += o.peer_send_calls;
        self.peer_recv_calls += o.peer_recv_calls;
        self.peer_batches += o.peer_batches;
        self.socket_drops += o.socket_drops;
        self.local_drops += o.local_drops;
        self.command_bytes_sent += o.command_bytes_sent;
        self.routed_away += o.routed_away;
    }
}

pub async fn serve(backend: &str, args: &crate::Args) -> anyhow::Result<()> {
    let (nodes, redis_url) = (args.nodes, args.redis_url.as_str());
    // The nodes this process hosts: all of them, or one (`--node-procs`).
    let hosted = match args.node_index {
        Some(i) => i..i + 1,
        None => 0..nodes,
    };
    let publishes = Arc::new(AtomicU64::new(0));
    let mut addrs = Vec::new();
    let mut fetchers: Vec<Fetch> = Vec::new();
    let mut meshes = Vec::new();
    let mut out = tokio::io::stdout();
    let mut say = async |line: serde_json::Value| -> anyhow::Result<()> {
        out.write_all(format!("{line}\n").as_bytes()).await?;
        Ok(out.flush().await?)
    };
    match backend {
        "local" => {
            say(serde_json::json!({ "mesh": null })).await?;
            let (addr, fetch) = start_node::<LocalAdapter>((), &publishes).await?;
            addrs.push(addr);
            fetchers.push(fetch);
        }
        "mesh-quic" | "mesh-ws" | "mesh-quic+routing" | "mesh-ws+routing" => {
            let routing = backend.ends_with("+routing");
            let kind = if backend.starts_with("mesh-quic") {
                TransportKind::Quic
            } else {
                TransportKind::Ws
            };
            let ca = DevCa::generate("bench")?;
            let mut seed = args.seed;
            for i in hosted {
                let tls = match &args.certs {
                    Some(dir) => TlsConfig::from_dir(dir.join(format!("n{i}")))?,
                    None => ca.node_tls(&format!("n{i}"))?,
                };
                let mut cfg = MeshConfig::local(tls)
                    .with_transport(kind)
                    .with_gossip_interval(Duration::from_millis(100))
                    .with_cluster_id("bench")
                    .with_routing(routing);
                if let Some(us) = args.batch_delay_us {
                    cfg = cfg.with_batch_delay(Duration::from_micros(us));
                }
                if let Some(ms) = args.interest_interval_ms {
                    cfg = cfg.with_interest_interval(Duration::from_millis(ms));
                }
                if let Some(seed) = seed {
                    cfg = cfg.with_seeds(StaticSeeds::new([format!("{seed}")]));
                }
                let mesh = Mesh::start(cfg).await?;
                seed.get_or_insert(mesh.advertise_addr());
                meshes.push(mesh);
            }
            // Where to find this process's first node: the seed of the others.
            say(serde_json::json!({ "mesh": meshes[0].advertise_addr() })).await?;
            for mesh in &meshes {
                let mut m = mesh.watch_members();
                tokio::time::timeout(
                    Duration::from_secs(30),
                    m.wait_for(|m| m.len() == nodes - 1),
                )
                .await
                .context("mesh did not form")??;
            }
            for mesh in &meshes {
                let (addr, fetch) =
                    start_node::<MeshAdapter<Emitter>>(mesh.clone(), &publishes).await?;
                addrs.push(addr);
                fetchers.push(fetch);
            }
        }
        "redis" => {
            say(serde_json::json!({ "mesh": null })).await?;
            let client = redis::Client::open(redis_url)?;
            for _ in hosted {
                let state = RedisAdapterCtr::new_with_redis(&client)
                    .await
                    .context("connect to redis")?;
                let (addr, fetch) = start_node::<RedisAdapter<Emitter>>(state, &publishes).await?;
                addrs.push(addr);
                fetchers.push(fetch);
            }
        }
        other => anyhow::bail!("unknown backend {other}"),
    }
    say(serde_json::json!({ "addrs": addrs })).await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["stats"] => serde_json::to_value(collect(&meshes, &publishes))?,
            ["fetch", inflight, batches] => {
                let f = fetchers.first().context("no node")?.clone();
                serde_json::to_value(fetch_batches(f, inflight.parse()?, batches.parse()?).await?)?
            }
            _ => continue,
        };
        say(reply).await?;
    }
    for mesh in meshes {
        mesh.shutdown().await;
    }
    Ok(())
}

fn collect(meshes: &[Mesh], publishes: &AtomicU64) -> ServerStats {
    let mut s = ServerStats {
        publishes: publishes.load(Ordering::Relaxed),
        local_drops: LOCAL_DROPS.load(Ordering::Relaxed),
        ..Default::default()
    };
    for m in meshes {
        let st = m.stats();
        s.commands_sent += st.commands_sent;
        s.commands_received += st.commands_received;
        s.commands_lost += st.commands_lost;
        s.volatile_dropped += st.volatile_dropped;
        s.slow_peer_cutoffs += st.slow_peer_cutoffs;
        s.peer_send_calls += st.peer_send_calls;
        s.peer_recv_calls += st.peer_recv_calls;
        s.peer_batches += st.batches_sent;
        s.socket_drops += st.socket_buffer_drops;
        s.command_bytes_sent += st.command_bytes_sent;
        s.routed_away += st.broadcasts_routed_away;
    }
    s
}

/// Deliveries refused by this process's sockets (see [`ServerStats::local_drops`]).
static LOCAL_DROPS: AtomicU64 = AtomicU64::new(0);

fn count_local_drops(res: Result<(), socketioxide::BroadcastError>) {
    if let Err(e) = res {
        let n = match e {
            socketioxide::BroadcastError::Socket(errors) => errors.len() as u64,
            _ => 1,
        };
        LOCAL_DROPS.fetch_add(n, Ordering::Relaxed);
    }
}

/// One Socket.IO node on an OS-chosen port: clients join the room named in their auth
/// payload; `pub` broadcasts to the publisher's room (itself included), `all` to everyone.
/// `fetch_sockets()` on a node: the number of sockets it found.
type Fetch = Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, usize> + Send + Sync>;

/// Latencies of `fetch_sockets`, `inflight` at a time, `batches` times.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct FetchResult {
    /// Latencies in microseconds, sorted.
    pub lat_us: Vec<u32>,
    /// The sockets each answer listed.
    pub found: Vec<usize>,
    pub secs: f64,
}

async fn fetch_batches(
    fetch: Fetch,
    inflight: usize,
    batches: usize,
) -> anyhow::Result<FetchResult> {
    let mut res = FetchResult::default();
    let t0 = std::time::Instant::now();
    for _ in 0..batches {
        let mut batch = Vec::with_capacity(inflight);
        for _ in 0..inflight {
            let f = fetch.clone();
            batch.push(tokio::spawn(async move {
                let t = std::time::Instant::now();
                let n = f().await;
                (t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32, n)
            }));
        }
        for t in batch {
            let (lat, n) = t.await?;
            res.lat_us.push(lat);
            res.found.push(n);
        }
    }
    res.secs = t0.elapsed().as_secs_f64();
    res.lat_us.sort_unstable();
    Ok(res)
}

async fn start_node<A>(
    state: A::State,
    publishes: &Arc<AtomicU64>,
) -> anyhow::Result<(SocketAddr, Fetch)>
where
    A: Adapter + socketioxide_core::adapter::DefinedAdapter,
    A::InitRes: NsInit,
{
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(SOCKET_BUFFER)
        .with_adapter::<A>(state)
        .build_layer();
    let publishes = publishes.clone();
    // Handlers are registered in a connect middleware: socketioxide 0.18 answers the connect
    // before an async connect handler runs, and a first event could be missed.
    let register = move |s: SocketRef<A>, Data(auth): Data<Auth>| {
        let publishes = publishes.clone();
        async move {
            s.join(auth.room.clone());
            let room = auth.room;
            let p1 = publishes.clone();
            s.on("pub", async move |s: SocketRef<A>, Data(m): Data<Msg>| {
                p1.fetch_add(1, Ordering::Relaxed);
                count_local_drops(s.within(room.clone()).emit("m", &m).await);
            });
            s.on("all", async move |io: SocketIo<A>, Data(m): Data<Msg>| {
                publishes.fetch_add(1, Ordering::Relaxed);
                count_local_drops(io.emit("m", &m).await);
            });
            Ok::<(), std::convert::Infallible>(())
        }
    };
    io.ns("/", (async || {}).with(register)).wait().await?;
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Without TCP_NODELAY, Nagle and delayed ACKs hold small messages for ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    let fetch: Fetch = Arc::new(move || {
        let io = io.clone();
        Box::pin(async move { io.fetch_sockets().await.map(|s| s.len()).unwrap_or(0) })
    });
    Ok((addr, fetch))
}

/// What `io.ns(..)` returns, per adapter: nothing for the local adapter, a future otherwise.
pub trait NsInit {
    fn wait(self) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>>;
}

impl NsInit for () {
    fn wait(self) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

impl NsInit for socketioxide_mesh::adapter::InitRes {
    fn wait(self) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move { self.await.map_err(|e| anyhow::anyhow!("namespace: {e}")) })
    }
}

impl<R: socketioxide_redis::drivers::Driver> NsInit for socketioxide_redis::InitRes<R> {
    fn wait(self) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move {
            self.into_future()
                .await
                .map_err(|e| anyhow::anyhow!("namespace: {e}"))
        })
    }
}
