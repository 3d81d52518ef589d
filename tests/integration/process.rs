//! Nodes as real processes: the `node` example program, started with its CLI and environment,
//! as a user would run it. `cargo test` builds examples before running tests.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, anyhow};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::common::WAIT;

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
        let mut cmd = Command::new(example_bin("node")?);
        cmd.env("MESH_TRANSPORT", kind.as_str());
        cmd.arg("--http")
            .arg("127.0.0.1:0")
            .arg("--mesh")
            .arg("127.0.0.1:0")
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
