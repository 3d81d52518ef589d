//! Benchmark: what scaling out costs, at the load users run. Every point compares, in the same
//! run, a **single node on socketioxide's local adapter** (the limit: no cluster at all), the
//! mesh over QUIC, the mesh over WebSocket and socketioxide-redis.
//!
//! ```text
//! cargo run --release --example bench                     # every scenario, local + mesh
//! cargo run --release --example bench -- --backends local,mesh-quic,mesh-ws,redis   # redis-server on PATH
//! cargo run --release --example bench -- --scenarios rooms@10000 --seconds 5          # one point
//! cargo run --release --example bench -- --node-procs        # one process per node, as pods
//! cargo run --release --example bench -- --from-csv docs/bench/results.csv --runs 3   # redraw
//! cargo run --release --example bench -- --nodes 8 --placement one \
//!     --backends mesh-quic,mesh-quic+routing --scenarios rooms@5000   # interest routing
//! ```
//!
//! `+routing` after a mesh backend turns interest-based routing on (`MeshConfig::with_routing`);
//! `--placement` puts the members of each room on one node (`one`), two (`two`) or round-robin
//! over all of them (`spread`, the default).
//!
//! Scenarios (`--scenarios`, comma-separated `kind@publishes-per-second`):
//! - `rooms@R`: 1000 clients in rooms of 10; clients publish R messages/s in total, each to
//!   its own room (itself included), so R × 10 deliveries/s.
//! - `all@R`: clients publish R messages/s in total to every socket (`io.emit`), so
//!   R × 1000 deliveries/s.
//! - `fetch@N`: no publishing; node 0 runs `io.fetch_sockets()` (every socket of the cluster)
//!   N at a time, in batches, and times each.
//!
//! Each point runs in fresh processes: a server child hosting every node of the backend on one
//! tokio runtime (the single node and the 3-node cluster get the same two worker threads),
//! and the load generator in this process (raw Engine.IO/Socket.IO WebSocket clients, spread
//! round-robin over the nodes, so every room has members on every node). After a warm-up, a
//! measurement window records the server process's CPU time and context switches (`/proc`),
//! its system calls (`perf stat`, when installed), and the mesh's own counters (commands,
//! send calls on peer sockets, cut-offs). Then publishing stops, every delivery in flight is
//! awaited, and loss and latency (publish → receipt, one clock) are computed.
//!
//! Results: a Markdown report on stdout and in `--out` (`results.md`, `results.csv`,
//! `bench.svg`).

mod load;
mod measure;
mod report;
mod server;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::watch,
};

use load::{Client, Kind, Phase, Totals};
use server::ServerStats;

#[derive(Parser, Clone, Debug)]
struct Args {
    /// Backends: local (one node, the baseline), mesh-quic, mesh-ws, redis.
    #[arg(long, default_value = "local,mesh-quic,mesh-ws", value_delimiter = ',')]
    backends: Vec<String>,
    /// Points to measure, `rooms@<publishes/s>` or `all@<publishes/s>`.
    #[arg(
        long,
        default_value = "all@200,all@500,rooms@10000,rooms@11000,rooms@12500,rooms@15000,rooms@17500,rooms@20000,rooms@30000,rooms@40000,fetch@1,fetch@100,fetch@1000",
        value_delimiter = ','
    )]
    scenarios: Vec<String>,
    /// Nodes of the clustered backends.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Where the members of a room connect: `spread` (round-robin over every node), `one`
    /// (all on one node), `two` (alternating between two nodes).
    #[arg(long, default_value = "spread")]
    placement: String,
    /// WebSocket clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Sockets per room.
    #[arg(long, default_value_t = 10)]
    room_size: usize,
    /// Publishing before the measurement window.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// The measurement window.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of every point, interleaved; the report gives the median of each figure.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Redis server for the redis backend: started on a free port from this binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Where to write results.md, results.csv and bench.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Mesh batch delay in microseconds (default: the library's).
    #[arg(long)]
    batch_delay_us: Option<u64>,
    /// How often a node with routing scans and announces its rooms, in milliseconds (default:
    /// the library's).
    #[arg(long)]
    interest_interval_ms: Option<u64>,
    /// Run each node of a clustered backend in a process of its own (as pods would), instead
    /// of all nodes on one runtime; figures are summed over the processes.
    #[arg(long)]
    node_procs: bool,
    /// Internal: the node a per-node server process hosts.
    #[arg(long, hide = true)]
    node_index: Option<usize>,
    /// Internal: certificates of per-node mesh processes (`<dir>/n<i>`).
    #[arg(long, hide = true)]
    certs: Option<PathBuf>,
    /// Internal: a mesh address to join.
    #[arg(long, hide = true)]
    seed: Option<SocketAddr>,
    /// Write the report again from a `results.csv` of an earlier run (no measuring).
    #[arg(long)]
    from_csv: Option<PathBuf>,
    /// Internal: serve one backend (the server child).
    #[arg(long, hide = true)]
    serve: Option<String>,
    /// Internal: redis URL for the server child.
    #[arg(long, hide = true, default_value = "")]
    redis_url: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub kind: Kind,
    pub rate: u32,
}

impl std::str::FromStr for Point {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (kind, rate) = s
            .split_once('@')
            .with_context(|| format!("scenario {s:?}: expected kind@rate"))?;
        let kind = match kind {
            "rooms" => Kind::Rooms,
            "all" => Kind::All,
            "fetch" => Kind::Fetch,
            k => anyhow::bail!("unknown scenario kind {k:?} (rooms, all, fetch)"),
        };
        Ok(Point {
            kind,
            rate: rate.parse().context("scenario rate")?,
        })
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.kind {
            Kind::Rooms => "rooms",
            Kind::All => "all",
            Kind::Fetch => "fetch",
        };
        write!(f, "{k}@{}", self.rate)
    }
}

/// One backend at one point.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Outcome {
    pub backend: String,
    pub point: String,
    pub rate: u32,
    /// Publishes per second the clients achieved.
    pub achieved: f64,
    pub expected: u64,
    pub received: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Server CPU seconds in the window (all nodes), and Redis's.
    pub cpu_s: f64,
    pub redis_cpu_s: f64,
    pub window_s: f64,
    pub ctx_switches: u64,
    /// Mesh counters over the window.
    pub commands: u64,
    pub peer_send_calls: u64,
    pub peer_recv_calls: u64,
    /// From perf over the window: send-type system calls of the server process by name.
    pub syscalls: Vec<(String, u64)>,
    /// Over the whole point.
    pub cutoffs: u64,
    pub commands_lost: u64,
    pub socket_drops: u64,
    /// Deliveries the publishing node's own sockets refused (buffer full).
    pub local_drops: u64,
    /// Peer deliveries interest-based routing skipped over the whole point (the window's
    /// figure is `routed_away`).
    pub routed_away_total: u64,
    /// Publishes the server's handlers saw (to tell a lost publish from a lost delivery).
    pub server_publishes: u64,
    pub client_publishes: u64,
    pub commands_received: u64,
    pub commands_sent_total: u64,
    /// Bytes of the commands written to peers over the window (mesh).
    #[serde(default)]
    pub command_bytes: u64,
    /// Peer deliveries of room broadcasts skipped by routing over the window.
    #[serde(default)]
    pub routed_away: u64,
}

impl Outcome {
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }
    pub fn loss_pct(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            100.0 * self.lost() as f64 / self.expected as f64
        }
    }
    /// Send system calls on peer sockets per command sent (mesh).
    pub fn sends_per_command(&self) -> f64 {
        if self.commands == 0 {
            f64::NAN
        } else {
            self.peer_send_calls as f64 / self.commands as f64
        }
    }
    /// Deliveries (a message reaching a client) over the measurement window.
    pub fn window_deliveries(&self, room_size: usize) -> f64 {
        let per_publish = match self.point.split_once('@').map(|(k, _)| k) {
            Some("rooms") => room_size as f64,
            _ => 1.0,
        };
        self.achieved * per_publish * self.window_s
    }
    pub fn syscall(&self, name: &str) -> Option<u64> {
        self.syscalls
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(backend) = args.serve.clone() {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_writer(std::io::stderr)
            .init();
        return rt.block_on(server::serve(&backend, &args));
    }
    if let Some(csv) = args.from_csv.clone() {
        let (backends, points, outcomes) = report::read_csv(&csv)?;
        let args = Args { backends, ..args };
        return report::write(&args, &points, &outcomes);
    }
    let points: Vec<Point> = args
        .scenarios
        .iter()
        .map(|s| s.parse())
        .collect::<anyhow::Result<_>>()?;
    let mut all: Vec<Vec<Outcome>> = Vec::new();
    for run in 0..args.runs {
        for point in &points {
            for backend in &args.backends {
                eprint!("run {}/{} {point} {backend}: ", run + 1, args.runs);
                let o = rt.block_on(run_point(backend, *point, &args))?;
                eprintln!(
                    "{:.0}/s, p99 {:.1} ms, lost {}, cpu {:.2} s, sends/cmd {:.3}, cut-offs {}",
                    o.achieved,
                    o.p99_ms,
                    o.lost(),
                    o.cpu_s,
                    o.sends_per_command(),
                    o.cutoffs
                );
                if o.lost() > 0 {
                    // Where it went: a publish the server never saw, a command that never
                    // arrived, a socket buffer that overflowed, or a client that missed it.
                    eprintln!(
                        "  lost {}: publishes sent {} / seen by the server {}; commands sent {} / received {} / lost {}; socket buffer drops {} (remote) + {} (local); peer deliveries routed away {}",
                        o.lost(),
                        o.client_publishes,
                        o.server_publishes,
                        o.commands_sent_total,
                        o.commands_received,
                        o.commands_lost,
                        o.socket_drops,
                        o.local_drops,
                        o.routed_away_total
                    );
                }
                match all
                    .iter_mut()
                    .find(|v| v[0].backend == o.backend && v[0].point == o.point)
                {
                    Some(v) => v.push(o),
                    None => all.push(vec![o]),
                }
            }
        }
    }
    let outcomes: Vec<Outcome> = all.iter().map(|runs| report::median(runs)).collect();
    report::write(&args, &points, &outcomes)
}

/// `fetch_sockets` from node 0, `point.rate` at a time, with the clients connected and idle.
async fn fetch_point(
    backend: &str,
    point: Point,
    args: &Args,
    server: &mut Servers,
    redis_pid: Option<u32>,
) -> anyhow::Result<Outcome> {
    let inflight = point.rate.max(1) as usize;
    let batches = (2000 / inflight).max(20);
    // Warm-up: connections, streams, caches.
    server.fetch(inflight, 2).await?;
    let ((cpu0, ctx0), rcpu0) = (
        server.usage(),
        redis_pid.map(measure::cpu_secs).unwrap_or(0.0),
    );
    let r = server.fetch(inflight, batches).await?;
    let ((cpu1, ctx1), rcpu1) = (
        server.usage(),
        redis_pid.map(measure::cpu_secs).unwrap_or(0.0),
    );
    let s_end = server.stats().await?;
    let pct = |p: f64| {
        if r.lat_us.is_empty() {
            f64::NAN
        } else {
            r.lat_us[((r.lat_us.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    let complete = r.found.iter().filter(|n| **n == args.clients).count() as u64;
    Ok(Outcome {
        backend: backend.to_string(),
        point: point.to_string(),
        rate: point.rate,
        achieved: r.lat_us.len() as f64 / r.secs,
        expected: r.lat_us.len() as u64,
        received: complete,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        cpu_s: cpu1 - cpu0,
        redis_cpu_s: rcpu1 - rcpu0,
        window_s: r.secs,
        ctx_switches: ctx1.saturating_sub(ctx0),
        cutoffs: s_end.slow_peer_cutoffs,
        commands_lost: s_end.commands_lost,
        ..Default::default()
    })
}

struct ServerChild {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    addrs: Vec<SocketAddr>,
}

/// Which node a per-node server process hosts (`--node-procs`).
struct NodeArgs<'a> {
    index: usize,
    certs: Option<&'a std::path::Path>,
    seed: Option<SocketAddr>,
}

impl ServerChild {
    fn spawn(
        backend: &str,
        args: &Args,
        redis_url: &str,
        node: Option<NodeArgs<'_>>,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["--serve", backend, "--nodes", &args.nodes.to_string()])
            .args(["--redis-url", redis_url]);
        if let Some(us) = args.batch_delay_us {
            cmd.args(["--batch-delay-us", &us.to_string()]);
        }
        if let Some(ms) = args.interest_interval_ms {
            cmd.args(["--interest-interval-ms", &ms.to_string()]);
        }
        if let Some(node) = node {
            cmd.args(["--node-index", &node.index.to_string()]);
            if let Some(dir) = node.certs {
                cmd.arg("--certs").arg(dir);
            }
            if let Some(seed) = node.seed {
                cmd.args(["--seed", &seed.to_string()]);
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Self {
            child,
            stdin,
            lines,
            addrs: Vec::new(),
        })
    }

    /// The next JSON line the child prints.
    async fn line<T: serde::de::DeserializeOwned>(&mut self) -> anyhow::Result<T> {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .context("server did not answer")??
            .context("server exited")?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Where its first mesh node listens, once it does.
    async fn mesh_addr(&mut self) -> anyhow::Result<Option<SocketAddr>> {
        #[derive(Deserialize)]
        struct MeshLine {
            mesh: Option<SocketAddr>,
        }
        Ok(self.line::<MeshLine>().await?.mesh)
    }

    /// Wait until its nodes serve (and their cluster has formed).
    async fn ready(&mut self) -> anyhow::Result<()> {
        #[derive(Deserialize)]
        struct Ready {
            addrs: Vec<SocketAddr>,
        }
        self.addrs = self.line::<Ready>().await?.addrs;
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn stats(&mut self) -> anyhow::Result<ServerStats> {
        self.stdin.write_all(b"stats\n").await?;
        self.line().await
    }

    async fn fetch(
        &mut self,
        inflight: usize,
        batches: usize,
    ) -> anyhow::Result<server::FetchResult> {
        self.stdin
            .write_all(format!("fetch {inflight} {batches}\n").as_bytes())
            .await?;
        self.line().await
    }

    async fn stop(mut self) {
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The server processes of one backend: one hosting every node, or one per node
/// (`--node-procs`).
struct Servers {
    children: Vec<ServerChild>,
    /// Certificates of per-node mesh processes, removed on drop.
    certs: Option<PathBuf>,
}

impl Servers {
    async fn start(backend: &str, args: &Args, redis_url: &str) -> anyhow::Result<Self> {
        if !args.node_procs || backend == "local" {
            let mut child = ServerChild::spawn(backend, args, redis_url, None)?;
            child.mesh_addr().await?;
            child.ready().await?;
            return Ok(Self {
                children: vec![child],
                certs: None,
            });
        }
        let certs = if backend.starts_with("mesh") {
            let dir = std::env::temp_dir().join(format!("bench-certs-{}", std::process::id()));
            let ca = socketioxide_mesh::DevCa::generate("bench")?;
            for i in 0..args.nodes {
                ca.write_dir(dir.join(format!("n{i}")), &format!("n{i}"))?;
            }
            Some(dir)
        } else {
            None
        };
        let mut servers = Self {
            children: Vec::new(),
            certs,
        };
        let mut seed = None;
        for index in 0..args.nodes {
            let node = NodeArgs {
                index,
                certs: servers.certs.as_deref(),
                seed,
            };
            let mut child = ServerChild::spawn(backend, args, redis_url, Some(node))?;
            let mesh = child.mesh_addr().await?;
            seed = seed.or(mesh);
            servers.children.push(child);
        }
        for child in &mut servers.children {
            child.ready().await?;
        }
        Ok(servers)
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(ServerChild::pid).collect()
    }

    /// Every node's Socket.IO address, node 0 first.
    fn addrs(&self) -> Vec<SocketAddr> {
        self.children.iter().flat_map(|c| c.addrs.clone()).collect()
    }

    async fn stats(&mut self) -> anyhow::Result<ServerStats> {
        let mut total = ServerStats::default();
        for child in &mut self.children {
            total += child.stats().await?;
        }
        Ok(total)
    }

    /// `fetch_sockets` from node 0.
    async fn fetch(
        &mut self,
        inflight: usize,
        batches: usize,
    ) -> anyhow::Result<server::FetchResult> {
        self.children[0].fetch(inflight, batches).await
    }

    async fn stop(self) {
        for child in self.children {
            child.stop().await;
        }
        if let Some(dir) = &self.certs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// CPU seconds and context switches of every server process so far.
    fn usage(&self) -> (f64, u64) {
        let pids = self.pids();
        (
            pids.iter().map(|p| measure::cpu_secs(*p)).sum(),
            pids.iter().map(|p| measure::context_switches(*p)).sum(),
        )
    }
}

/// A redis-server on a free port, for the redis backend.
struct Redis {
    child: Child,
    url: String,
}

impl Redis {
    async fn start(bin: &str) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {bin} (install redis-server for the redis backend)"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            url: format!("redis://127.0.0.1:{port}/?protocol=resp3"),
        })
    }
}

async fn run_point(backend: &str, point: Point, args: &Args) -> anyhow::Result<Outcome> {
    load::now_ns();
    let redis = if backend == "redis" {
        Some(Redis::start(&args.redis_server).await?)
    } else {
        None
    };
    let url = redis.as_ref().map(|r| r.url.clone()).unwrap_or_default();
    let mut server = Servers::start(backend, args, &url).await?;
    let addrs = server.addrs();
    let redis_pid = redis.as_ref().and_then(|r| r.child.id());

    // Clients: client i is in room i / room_size; by placement, round-robin over the nodes,
    // or a room's members on one node, or on two.
    let n = args.clients;
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut connecting = Vec::with_capacity(n);
    for i in 0..n {
        let room = i / args.room_size;
        let node = match args.placement.as_str() {
            "one" => room,
            "two" => room + i % 2,
            "spread" => i,
            other => anyhow::bail!("unknown placement {other:?} (spread, one, two)"),
        };
        let addr = addrs[node % addrs.len()];
        let size = (n - room * args.room_size).min(args.room_size) as u64;
        let sem = sem.clone();
        connecting.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            Client::connect(addr, &format!("r{room}"), size).await
        }));
    }
    let mut clients = Vec::with_capacity(n);
    for c in connecting {
        clients.push(c.await??);
    }

    if point.kind == Kind::Fetch {
        let out = fetch_point(backend, point, args, &mut server, redis_pid).await;
        drop(clients);
        server.stop().await;
        drop(redis);
        return out;
    }

    let totals = Arc::new(Totals::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Idle);
    let period = Duration::from_secs_f64(n as f64 / f64::from(point.rate.max(1)));
    let mut tasks = Vec::with_capacity(n);
    // Spread the publishers evenly over the period, in a shuffled order: members of a room
    // publish independently (publishing in room order would send a room's messages in bursts
    // that every backend then writes to its sockets together, unlike real traffic).
    let mut slots: Vec<usize> = (0..n).collect();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    rng.shuffle(&mut slots);
    for (c, slot) in clients.into_iter().zip(slots) {
        let offset = period.mul_f64(slot as f64 / n as f64);
        tasks.push(tokio::spawn(c.run(
            point.kind,
            period,
            offset,
            n as u64,
            phase_rx.clone(),
            totals.clone(),
        )));
    }

    if backend.ends_with("+routing") {
        // The last clients' rooms are announced within the interest interval (20 ms): let
        // every node hear of them before the first publish.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let started = Instant::now();
    phase_tx.send_replace(Phase::Publish);
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let ((cpu0, ctx0), rcpu0) = (
        server.usage(),
        redis_pid.map(measure::cpu_secs).unwrap_or(0.0),
    );
    let s0 = server.stats().await?;
    let perf = measure::Perf::start(&server.pids());
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let window_s = w0.elapsed().as_secs_f64();
    let ((cpu1, ctx1), rcpu1) = (
        server.usage(),
        redis_pid.map(measure::cpu_secs).unwrap_or(0.0),
    );
    let syscalls = perf.and_then(measure::Perf::stop).unwrap_or_default();
    let s1 = server.stats().await?;
    phase_tx.send_replace(Phase::Drain);
    let publish_secs = started.elapsed().as_secs_f64();

    // Wait for everything in flight: all expected deliveries, or no progress for 3 s. A client
    // may be in the middle of one last publish when the phase changes: give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut last = (0, Instant::now());
    loop {
        let got = totals.received.load(Ordering::Relaxed);
        if got >= totals.expected.load(Ordering::Relaxed) {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s_end = server.stats().await?;
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!(
            "server stats at the end: {s_end:?}; published {} expected {} received {}",
            totals.published.load(Ordering::Relaxed),
            totals.expected.load(Ordering::Relaxed),
            totals.received.load(Ordering::Relaxed)
        );
    }
    phase_tx.send_replace(Phase::Finish);
    let mut lats: Vec<u32> = Vec::new();
    for t in tasks {
        lats.extend(t.await??);
    }
    lats.sort_unstable();
    server.stop().await;
    drop(redis);

    let pct = |p: f64| {
        if lats.is_empty() {
            f64::NAN
        } else {
            lats[((lats.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    Ok(Outcome {
        backend: backend.to_string(),
        point: point.to_string(),
        rate: point.rate,
        achieved: totals.published.load(Ordering::Relaxed) as f64 / publish_secs,
        expected: totals.expected.load(Ordering::Relaxed),
        received: totals.received.load(Ordering::Relaxed),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        cpu_s: cpu1 - cpu0,
        redis_cpu_s: rcpu1 - rcpu0,
        window_s,
        ctx_switches: ctx1.saturating_sub(ctx0),
        commands: s1.commands_sent - s0.commands_sent,
        peer_send_calls: s1.peer_send_calls - s0.peer_send_calls,
        peer_recv_calls: s1.peer_recv_calls - s0.peer_recv_calls,
        syscalls,
        cutoffs: s_end.slow_peer_cutoffs,
        commands_lost: s_end.commands_lost,
        socket_drops: s_end.socket_drops,
        local_drops: s_end.local_drops,
        routed_away_total: s_end.routed_away,
        server_publishes: s_end.publishes,
        client_publishes: totals.published.load(Ordering::Relaxed),
        commands_received: s_end.commands_received,
        commands_sent_total: s_end.commands_sent,
        command_bytes: s1.command_bytes_sent - s0.command_bytes_sent,
        routed_away: s1.routed_away - s0.routed_away,
    })
}
