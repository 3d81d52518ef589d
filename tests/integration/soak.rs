//! An idle cluster keeps its memory flat: nothing grows per gossip round, ping, or stream.
//! (Measured before: on `ws`, 50 idle node processes grew 211 → 242 MiB in 3 minutes, which
//! turned out to be allocator warm-up that levels off; this test holds the line after it.)

use std::time::Duration;

use socketioxide_mesh::{DevCa, TransportKind};

use crate::{common::*, process::*};

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

async fn an_idle_cluster_keeps_its_memory_flat(kind: TransportKind) -> anyhow::Result<()> {
    /// Gossip 5× faster than the default: a minute of production rounds every 12 s.
    const GOSSIP_MS: &str = "20";
    /// Allowed growth per process over the window, after the warm-up.
    const SLACK_KIB: u64 = 1536;
    logs();
    let ca = DevCa::generate("soak CA")?;
    let certs = TempDir::new("soak");
    let nodes = spawn_cluster(
        kind,
        &ca,
        &certs.0,
        4,
        &[
            ("MESH_CLUSTER_ID", "soak"),
            ("MESH_GOSSIP_INTERVAL_MS", GOSSIP_MS),
        ],
    )
    .await?;
    // Time has to pass for growth to show: warm up, then watch 1500 gossip rounds.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| rss_kib(n.pid()))
        .collect::<Result<_, _>>()?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    for (node, before) in nodes.iter().zip(before) {
        let after = rss_kib(node.pid())?;
        assert!(
            after <= before + SLACK_KIB,
            "{kind:?} node {} grew {before} -> {after} KiB while idle",
            node.http
        );
    }
    // Still a cluster.
    for node in &nodes {
        members(node, 3).await?;
    }
    Ok(())
}

both_transports!(an_idle_cluster_keeps_its_memory_flat);
