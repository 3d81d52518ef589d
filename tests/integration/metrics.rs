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

async fn metrics_follow_the_cluster(kind: TransportKind) -> anyhow::Result<()> {
    let ca = DevCa::generate("metrics CA")?;
    let certs = TempDir::new("metrics");
    let nodes = spawn_cluster(kind, &ca, &certs.0, 3, &[("MESH_CLUSTER_ID", "metrics")]).await?;
    let before = metrics_of(&nodes[1]).await?;
    let t = kind.as_str();
    assert_eq!(
        sample(&before, "socketioxide_mesh_members"),
        Some(2.0),
        "{before}"
    );
    assert_eq!(
        sample(
            &before,
            &format!("socketioxide_mesh_peer_links{{transport=\"{t}\",state=\"connected\"}}")
        ),
        Some(2.0),
        "{before}"
    );
    for help in [
        "# TYPE socketioxide_mesh_commands_sent_total counter",
        "# TYPE socketioxide_mesh_messages_dropped_total counter",
        "# TYPE socketioxide_mesh_connections_refused_total counter",
    ] {
        assert!(before.contains(help), "{help} missing:\n{before}");
    }
    let received =
        |text: &str| sample(text, "socketioxide_mesh_commands_received_total").unwrap_or(0.0);
    let gossip = |text: &str| {
        sample(
            text,
            "socketioxide_mesh_received_bytes_total{kind=\"gossip\"}",
        )
        .unwrap_or(0.0)
    };

    // A chat message from node 0 (a broadcast: a command to each peer) and a fetch (a request).
    chat_reaches_everyone(&nodes.iter().collect::<Vec<_>>(), "metrics").await?;
    let after0 = metrics_of(&nodes[0]).await?;
    let after1 = metrics_of(&nodes[1]).await?;
    assert!(
        sample(&after0, "socketioxide_mesh_commands_sent_total").unwrap_or(0.0) >= 2.0,
        "{after0}"
    );
    assert!(received(&after1) > received(&before), "{after1}");
    // Gossip flowed to form the cluster.
    assert!(gossip(&before) > 0.0, "{before}");
    assert!(
        after0.contains("# TYPE socketioxide_mesh_request_duration_seconds histogram"),
        "{after0}"
    );
    assert!(
        sample(
            &after0,
            "socketioxide_mesh_request_duration_seconds_count{kind=\"fetch_sockets\",outcome=\"answered\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{after0}"
    );
    Ok(())
}

both_transports!(metrics_follow_the_cluster);
