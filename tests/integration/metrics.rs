//! `/metrics` of node processes (the example app: `metrics-exporter-prometheus` rendering what
//! the mesh records through the `metrics` facade): members, links, and counters that move when
//! the cluster works.

use socketioxide_mesh::{DevCa, TransportKind};

use crate::{js::http_get, process::*};

/// The value of the sample `name{labels}` (labels in the exporter's order, or none).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

async fn metrics_of(node: &ProcNode) -> anyhow::Result<String> {
    http_get(node.http, "/metrics").await
}

/// The node's `/metrics` once `ok` holds for it. The mesh copies its counters and gauges to the
/// recorder every second, so a scrape right after an event may still show the previous copy.
async fn metrics_once(
    node: &ProcNode,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + crate::common::WAIT;
    loop {
        let text = metrics_of(node).await?;
        if ok(&text) {
            return Ok(text);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} never showed {what}:\n{text}",
            node.http
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn metrics_follow_the_cluster(kind: TransportKind) -> anyhow::Result<()> {
    let ca = DevCa::generate("metrics CA")?;
    let certs = TempDir::new("metrics");
    let nodes = spawn_cluster(kind, &ca, &certs.0, 3, &[("MESH_CLUSTER_ID", "metrics")]).await?;
    let t = kind.as_str();
    let links = format!("socketioxide_mesh_peer_links{{transport=\"{t}\",state=\"connected\"}}");
    let before = metrics_once(&nodes[1], "2 live members, 2 links", |m| {
        sample(m, "socketioxide_mesh_members{state=\"live\"}") == Some(2.0)
            && sample(m, &links) == Some(2.0)
    })
    .await?;
    for help in [
        "# TYPE socketioxide_mesh_commands_sent_total counter",
        "# TYPE socketioxide_mesh_messages_dropped_total counter",
        "# TYPE socketioxide_mesh_connections_refused_total counter",
    ] {
        assert!(before.contains(help), "{help} missing:\n{before}");
    }
    let received =
        |text: &str| sample(text, "socketioxide_mesh_commands_received_total").unwrap_or(0.0);
    let broadcasts_applied = |text: &str| {
        sample(
            text,
            "socketioxide_mesh_commands_applied_total{kind=\"broadcast\"}",
        )
        .unwrap_or(0.0)
    };
    // Gossip flowed to form the cluster.
    let gossip = sample(
        &before,
        "socketioxide_mesh_received_bytes_total{kind=\"gossip\"}",
    );
    assert!(gossip.unwrap_or(0.0) > 0.0, "{before}");

    // A chat message from node 0 (a broadcast: a command to each peer) and a fetch (a request).
    chat_reaches_everyone(&nodes.iter().collect::<Vec<_>>(), "metrics").await?;
    let after0 = metrics_once(&nodes[0], "2 commands sent and an answered fetch", |m| {
        sample(m, "socketioxide_mesh_commands_sent_total").unwrap_or(0.0) >= 2.0
            && sample(
                m,
                "socketioxide_mesh_request_duration_seconds_count{kind=\"fetch_sockets\",outcome=\"answered\"}",
            )
            .unwrap_or(0.0)
                >= 1.0
    })
    .await?;
    assert!(
        after0.contains("# TYPE socketioxide_mesh_request_duration_seconds histogram"),
        "{after0}"
    );
    metrics_once(&nodes[1], "the broadcast received and applied", |m| {
        received(m) > received(&before) && broadcasts_applied(m) >= 1.0
    })
    .await?;
    Ok(())
}

/// `/topology.json` (the crate's `Mesh::topology()`) and the page's live feed
/// (`/topology/events`, server-sent events) from node processes.
async fn topology_shows_nodes_links_and_rooms(kind: TransportKind) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let ca = DevCa::generate("topology CA")?;
    let certs = TempDir::new("topology");
    let nodes = spawn_cluster(kind, &ca, &certs.0, 3, &[("MESH_CLUSTER_ID", "topology")]).await?;
    let mut client = crate::client::Client::connect(nodes[0].http, &["/"]).await?;
    client
        .emit_with_ack("/", "join", vec![serde_json::json!("lobby")])
        .await?;
    let t: serde_json::Value =
        serde_json::from_str(&http_get(nodes[0].http, "/topology.json").await?)?;
    assert_eq!(t["transport"], kind.as_str(), "{t}");
    assert_eq!(t["ready"], true, "{t}");
    let peers = t["peers"].as_array().cloned().unwrap_or_default();
    assert_eq!(peers.len(), 2, "{t}");
    for p in &peers {
        assert_eq!(p["link"], "connected", "{t}");
        assert_eq!(p["rtt_ms"].is_number(), kind == TransportKind::Quic, "{t}");
    }
    let root = t["namespaces"]
        .as_array()
        .and_then(|a| a.iter().find(|ns| ns["name"] == "/"))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no / namespace: {t}"))?;
    assert_eq!(root["sockets"], 1, "{t}");
    assert!(
        root["rooms"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["name"] == "lobby" && r["sockets"] == 1)),
        "{t}"
    );
    // The live feed: an event carrying the same picture.
    let mut s = tokio::net::TcpStream::connect(nodes[1].http).await?;
    s.write_all(b"GET /topology/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await?;
    let mut lines = tokio::io::BufReader::new(s).lines();
    let data = tokio::time::timeout(crate::common::WAIT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(json) = line.strip_prefix("data: ") {
                return anyhow::Ok(json.to_string());
            }
        }
        anyhow::bail!("the event stream ended")
    })
    .await??;
    let pushed: serde_json::Value = serde_json::from_str(&data)?;
    assert_eq!(
        pushed["peers"].as_array().map(Vec::len),
        Some(2),
        "{pushed}"
    );
    let page = http_get(nodes[1].http, "/topology").await?;
    assert!(page.contains("EventSource(\"/topology/events\")"), "{page}");
    Ok(())
}

both_transports!(
    metrics_follow_the_cluster,
    topology_shows_nodes_links_and_rooms
);
