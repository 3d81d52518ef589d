//! Nodes as real processes: the `node` example program, started with its CLI and environment,
//! as a user would run it. `cargo test` builds examples before running tests.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, anyhow};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use serde_json::{Value, json};

use crate::{
    common::{Client, WAIT},
    js::http_get,
};

/// The path of an example binary built by cargo next to this test binary.
pub fn example_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/integration-<hash> → target/<profile>/examples/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary location {}", exe.display()))?;
    let bin = dir.join("examples").join(name);
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test`, which builds examples \
         (`cargo test --test integration` alone does not: `cargo build --examples` first)",
        bin.display()
    );
    Ok(bin)
}

pub struct ProcNode {
    pub child: Child,
    pub http: SocketAddr,
    pub mesh: SocketAddr,
    pub node_id: String,
}

impl ProcNode {
    /// Start `examples/node` with the given certificate folder, seeds and extra environment.
    pub async fn spawn(
        kind: socketioxide_mesh::TransportKind,
        certs: &Path,
        seeds: &[SocketAddr],
        env: &[(&str, &str)],
    ) -> anyhow::Result<ProcNode> {
        Self::spawn_at(kind, certs, seeds, env, "127.0.0.1:0", "127.0.0.1:0").await
    }

    /// [`spawn`](Self::spawn) on given HTTP and mesh addresses (to restart a node in place).
    pub async fn spawn_at(
        kind: socketioxide_mesh::TransportKind,
        certs: &Path,
        seeds: &[SocketAddr],
        env: &[(&str, &str)],
        http: &str,
        mesh: &str,
    ) -> anyhow::Result<ProcNode> {
        let mut cmd = Command::new(example_bin("node")?);
        cmd.env("MESH_TRANSPORT", kind.as_str());
        cmd.arg("--http")
            .arg(http)
            .arg("--mesh")
            .arg(mesh)
            .arg("--certs")
            .arg(certs)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if !seeds.is_empty() {
            let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
            cmd.arg("--seeds").arg(seeds.join(","));
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawn the node example")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .context("node did not print its ready line")??
            .ok_or_else(|| anyhow!("node exited before it was ready"))?;
        let ready: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("ready line {line:?}"))?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let field = |k: &str| {
            ready[k]
                .as_str()
                .map(String::from)
                .ok_or_else(|| anyhow!("no {k} in {line}"))
        };
        Ok(ProcNode {
            http: field("http")?.parse()?,
            mesh: field("mesh")?.parse()?,
            node_id: field("node_id")?,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Send a signal by name (`STOP`, `CONT`, `TERM`, `KILL`).
    pub async fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -{sig} failed");
        Ok(())
    }
}

/// A fresh temporary folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "sio-mesh-{tag}-{}-{}",
            std::process::id(),
            fastrand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

fn fastrand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node process's `mesh.stats()` (its `/mesh` endpoint); `Null` when it does not answer.
pub async fn proc_stats(node: &ProcNode) -> Value {
    let body = http_get(node.http, "/mesh").await.unwrap_or_default();
    serde_json::from_str::<Value>(&body)
        .map(|v| v["stats"].clone())
        .unwrap_or(Value::Null)
}

/// Wait until a node process lists `n` members (its `/mesh` endpoint).
pub async fn members(node: &ProcNode, n: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = http_get(node.http, "/mesh").await.unwrap_or_default();
        let seen = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["members"].as_array().map(Vec::len))
            .unwrap_or(0);
        if seen == n {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} sees {seen} members, not {n}",
            node.http
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every client gets a chat message sent by the first one (the node example broadcasts "chat"
/// to everyone but the sender).
pub async fn chat_reaches_everyone(nodes: &[&ProcNode], tag: &str) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for n in nodes {
        clients.push(Client::connect(n.http, &["/"]).await?);
    }
    clients[0].emit("/", "chat", vec![json!(tag)]);
    for c in &mut clients[1..] {
        let p = c.event("/", "chat").await?;
        assert_eq!(p.args(), vec![json!(tag)]);
    }
    // A request across the mesh, too: every client is listed (earlier tests' clients may
    // still be on their way out, so check ours are there).
    let ack = clients[0]
        .emit_with_ack("/", "fetch", vec![Value::Null])
        .await?;
    let listed: Vec<&str> = ack[0]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["id"].as_str()).collect())
        .unwrap_or_default();
    for c in &clients {
        assert!(
            listed.contains(&c.sid("/").as_str()),
            "{} missing from {listed:?}",
            c.sid("/")
        );
    }
    Ok(())
}

/// `n` node processes, each with its own certificate from `ca` (folders under `certs`), seeded
/// from the first one; returns once every one lists all the others.
pub async fn spawn_cluster(
    kind: socketioxide_mesh::TransportKind,
    ca: &socketioxide_mesh::DevCa,
    certs: &Path,
    n: usize,
    env: &[(&str, &str)],
) -> anyhow::Result<Vec<ProcNode>> {
    let mut nodes: Vec<ProcNode> = Vec::new();
    for i in 0..n {
        let dir = certs.join(format!("node-{i}"));
        ca.write_dir(&dir, &format!("node-{i}"))?;
        let seeds: Vec<SocketAddr> = nodes
            .first()
            .map(|first| vec![first.mesh])
            .unwrap_or_default();
        nodes.push(ProcNode::spawn(kind, &dir, &seeds, env).await?);
    }
    for node in &nodes {
        members(node, n - 1).await?;
    }
    Ok(nodes)
}

impl crate::common::Cluster {
    /// A node process joining this cluster (its certificate from the cluster's CA, seeded from
    /// node 0); returns once every in-process node lists it, serving "/", at its address.
    pub async fn join_process(
        &self,
        certs: &TempDir,
        env: &[(&str, &str)],
    ) -> anyhow::Result<ProcNode> {
        self.ca.write_dir(&certs.0, "process")?;
        let mut env = env.to_vec();
        env.push(("MESH_CLUSTER_ID", "test-cluster"));
        let node = ProcNode::spawn(self.kind, &certs.0, &[self.seed()], &env).await?;
        let want = self.nodes.len();
        for peer in &self.nodes {
            let mut members = peer.mesh.watch_members();
            tokio::time::timeout(
                WAIT,
                members.wait_for(|m| {
                    m.len() == want
                        && m.iter().all(|m| m.serves("/"))
                        && m.iter()
                            .any(|m| m.node_id.to_string() == node.node_id && m.addr == node.mesh)
                }),
            )
            .await
            .context("the process never became a member")??;
        }
        Ok(node)
    }
}
