//! A node killed without a goodbye must not stall anyone: requests in flight finish as soon as
//! the failure detector (or the transport) notices, far before the request timeout.

use std::time::{Duration, Instant};

use socketioxide_mesh::TransportKind;

use crate::{common::*, process::*};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn killed_node_ends_inflight_requests_early(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start_with(kind, 2, |cfg| cfg.with_request_timeout(REQUEST_TIMEOUT)).await?;
    let certs = TempDir::new("death");
    let victim = c
        .join_process(
            &certs,
            &[
                ("MESH_GOSSIP_INTERVAL_MS", "50"),
                ("MESH_REQUEST_TIMEOUT_MS", "30000"),
            ],
        )
        .await?;
    let survivor = c.nodes[1].client(&["/"]).await?;
    let _doomed = Client::connect(victim.http, &["/"]).await?;
    assert_eq!(c.nodes[0].io.fetch_sockets().await.sio()?.len(), 2);
    assert_eq!(c.nodes[0].mesh.server_count("/"), 3);

    // Freeze the victim: it answers nothing, sends nothing (no FIN over UDP).
    victim.signal("STOP").await?;
    let requests_before = c.nodes[0].mesh.stats().requests;
    let io = c.nodes[0].io.clone();
    let started = Instant::now();
    let fetch = tokio::spawn(async move { io.fetch_sockets().await.sio() });
    // Wait until the request is really in flight, then kill the victim for good.
    tokio::time::timeout(WAIT, async {
        while c.nodes[0].mesh.stats().requests == requests_before {
            tokio::task::yield_now().await;
        }
    })
    .await?;
    assert!(!fetch.is_finished(), "the frozen node cannot have answered");
    let mut victim = victim;
    victim.child.kill().await?;

    let sockets = tokio::time::timeout(REQUEST_TIMEOUT * 2, fetch).await???;
    let elapsed = started.elapsed();
    eprintln!("fetch_sockets with a node killed in flight took {elapsed:?}");
    let ids: Vec<String> = sockets.iter().map(|s| s.data().id.to_string()).collect();
    assert_eq!(
        ids,
        vec![survivor.sid("/")],
        "the survivors answer with their sockets"
    );
    assert!(
        elapsed < REQUEST_TIMEOUT / 2,
        "the request waited {elapsed:?}: the dead node stalled it (timeout {REQUEST_TIMEOUT:?})"
    );
    assert!(c.nodes[0].mesh.stats().request_peer_failures >= 1);

    // Membership dropped it too.
    let mut members = c.nodes[0].mesh.watch_members();
    tokio::time::timeout(WAIT, members.wait_for(|m| m.len() == 1)).await??;
    assert_eq!(c.nodes[0].mesh.server_count("/"), 2);
    Ok(())
}

async fn graceful_shutdown_is_noticed_at_once(kind: TransportKind) -> anyhow::Result<()> {
    let mut c =
        Cluster::start_with(kind, 3, |cfg| cfg.with_request_timeout(REQUEST_TIMEOUT)).await?;
    let _client = c.nodes[2].client(&["/"]).await?;
    let leaving = c.nodes.pop().expect("node 2");
    leaving.shutdown().await;
    // No failure detector delay: the goodbye is immediate.
    let started = Instant::now();
    let sockets = c.nodes[0].io.fetch_sockets().await.sio()?;
    assert!(sockets.is_empty());
    assert!(started.elapsed() < REQUEST_TIMEOUT / 2);
    let mut members = c.nodes[0].mesh.watch_members();
    tokio::time::timeout(WAIT, members.wait_for(|m| m.len() == 1)).await??;
    Ok(())
}

async fn slow_peer_is_cut_off_without_stalling_the_others(
    kind: TransportKind,
) -> anyhow::Result<()> {
    // A small queue, and a patient failure detector, so the frozen peer overflows its queue
    // long before it is declared dead.
    let c = Cluster::start_with(kind, 2, |cfg| {
        cfg.with_peer_queue(8, 64 * 1024 * 1024)
            .with_phi_threshold(40.0)
    })
    .await?;
    let certs = TempDir::new("slow");
    let slow = c.join_process(&certs, &[]).await?;
    let mut healthy = c.nodes[1].client(&["/"]).await?;
    slow.signal("STOP").await?;

    // Closed loop: each broadcast must reach the healthy peer before the next one. The frozen
    // peer reads nothing: its transport window, then its queue fill up, and it is cut off.
    // Emitting never waits for it.
    let payload = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    for i in 0..200u32 {
        c.nodes[0]
            .io
            .emit("big", &(i, payload.clone()))
            .await
            .sio()?;
        let p = healthy.event("/", "big").await?;
        assert_eq!(p.args()[0], serde_json::json!(i));
        assert_eq!(p.bins[0].len(), payload.len());
    }
    let stats = c.nodes[0].mesh.stats();
    assert!(stats.slow_peer_cutoffs >= 1, "{stats:?}");
    let mut slow = slow;
    slow.child.kill().await?;
    Ok(())
}

async fn stalled_peer_is_cut_off_by_the_write_deadline(kind: TransportKind) -> anyhow::Result<()> {
    // The default queue (64 MiB: a burst never fills it), a short write deadline, and a
    // patient failure detector: only the deadline can cut the frozen peer off.
    let c = Cluster::start_with(kind, 2, |cfg| {
        cfg.with_slow_peer_timeout(Duration::from_millis(500))
            .with_phi_threshold(40.0)
    })
    .await?;
    let certs = TempDir::new("stalled");
    let stalled = c.join_process(&certs, &[]).await?;
    let mut healthy = c.nodes[1].client(&["/"]).await?;
    stalled.signal("STOP").await?;

    // Closed loop to the healthy peer, until the frozen one is cut off: once its transport
    // window is full, no command is accepted, and the deadline passes.
    let payload = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let started = Instant::now();
    let mut i = 0u32;
    while c.nodes[0].mesh.stats().slow_peer_cutoffs == 0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "not cut off: {:?}",
            c.nodes[0].mesh.stats()
        );
        c.nodes[0]
            .io
            .emit("big", &(i, payload.clone()))
            .await
            .sio()?;
        let p = healthy.event("/", "big").await?;
        assert_eq!(p.args()[0], serde_json::json!(i));
        i += 1;
    }
    let stats = c.nodes[0].mesh.stats();
    assert!(
        stats.commands_lost >= 1,
        "the stalled batch is counted: {stats:?}"
    );
    // The healthy peer goes on receiving.
    c.nodes[0]
        .io
        .emit("big", &(i, payload.clone()))
        .await
        .sio()?;
    assert_eq!(
        healthy.event("/", "big").await?.args()[0],
        serde_json::json!(i)
    );
    let mut stalled = stalled;
    stalled.child.kill().await?;
    Ok(())
}

async fn killed_node_restarted_in_place_rejoins(kind: TransportKind) -> anyhow::Result<()> {
    logs();
    let ca = socketioxide_mesh::DevCa::generate("restart CA")?;
    let certs = TempDir::new("restart");
    let env = [
        ("MESH_CLUSTER_ID", "restart"),
        ("MESH_GOSSIP_INTERVAL_MS", "50"),
    ];
    let mut nodes = spawn_cluster(kind, &ca, &certs.0, 3, &env).await?;
    // Kill n2 and restart it at once on the same addresses, before the others notice: the old
    // incarnation must go away, the new one must join, under the same address.
    let mut old = nodes.pop().expect("3 nodes");
    old.child.kill().await?;
    let (http, mesh) = (old.http.to_string(), old.mesh.to_string());
    let seeds = [nodes[0].mesh];
    let new = ProcNode::spawn_at(kind, &certs.0.join("node-2"), &seeds, &env, &http, &mesh).await?;
    assert_ne!(new.node_id, old.node_id, "a restarted node is a new member");
    nodes.push(new);
    for n in &nodes {
        members(n, 2).await?;
    }
    chat_reaches_everyone(&nodes.iter().collect::<Vec<_>>(), "back").await
}

both_transports!(
    killed_node_ends_inflight_requests_early,
    graceful_shutdown_is_noticed_at_once,
    killed_node_restarted_in_place_rejoins,
    slow_peer_is_cut_off_without_stalling_the_others,
    stalled_peer_is_cut_off_by_the_write_deadline
);
