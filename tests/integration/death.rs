//! A node killed without a goodbye must not stall anyone: requests in flight finish as soon as
//! the failure detector (or the transport) notices, far before the request timeout.

use std::time::{Duration, Instant};

use socketioxide_mesh::{MeshConfig, TransportKind};

use crate::process::members as members_of;
use crate::{common::*, process::*};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The README: a killed node is declared dead by all in about 1.5 s (probes every 200 ms,
/// 600 ms timeout, two misses). The bound leaves room for a loaded 2-core CI machine and stays
/// far under QUIC's idle timeout (30 s), so only the probes (or a closed TCP connection) can
/// meet it.
const DEATH_NOTICED: Duration = Duration::from_millis(2500);
/// Probes that never declare anyone during a test (for tests that need a frozen peer to stay).
const PATIENT_PROBES: Duration = Duration::from_secs(3600);
/// A node that says goodbye is dropped at once: no detector, no timeout.
const GOODBYE_NOTICED: Duration = Duration::from_secs(1);

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
        elapsed < DEATH_NOTICED,
        "the request waited {elapsed:?}: the failure detector did not answer it (request timeout {REQUEST_TIMEOUT:?})"
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
    assert!(
        started.elapsed() < GOODBYE_NOTICED,
        "took {:?}",
        started.elapsed()
    );
    let mut members = c.nodes[0].mesh.watch_members();
    tokio::time::timeout(WAIT, members.wait_for(|m| m.len() == 1)).await??;
    Ok(())
}

/// A 2-node cluster (tuned by `tune`, with a failure detector too patient to notice a frozen
/// node during the test), a third node in its own process frozen with SIGSTOP, and a client of
/// node 1: what node 0's broadcasts must keep reaching.
async fn with_frozen_peer(
    kind: TransportKind,
    certs: &TempDir,
    tune: impl Fn(MeshConfig) -> MeshConfig,
) -> anyhow::Result<(Cluster, ProcNode, Client)> {
    let c = Cluster::start_with(kind, 2, |cfg| {
        tune(
            cfg.with_phi_threshold(40.0)
                .with_probe(Duration::from_secs(60), PATIENT_PROBES),
        )
    })
    .await?;
    let frozen = c.join_process(certs, &[]).await?;
    let healthy = c.nodes[1].client(&["/"]).await?;
    frozen.signal("STOP").await?;
    Ok((c, frozen, healthy))
}

/// Broadcast number `i` (64 KiB) from node 0; it must reach the healthy client. Closed loop:
/// emitting never waits for the frozen peer.
async fn big_broadcast_reaches(c: &Cluster, healthy: &mut Client, i: u32) -> anyhow::Result<()> {
    let payload = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    c.nodes[0].io.emit("big", &(i, payload)).await.sio()?;
    let p = healthy.event("/", "big").await?;
    assert_eq!(p.args()[0], serde_json::json!(i));
    assert_eq!(p.bins[0].len(), 64 * 1024);
    Ok(())
}

async fn slow_peer_is_cut_off_without_stalling_the_others(
    kind: TransportKind,
) -> anyhow::Result<()> {
    // A small queue: the frozen peer reads nothing, its transport window then its queue fill
    // up, and it is cut off long before it is declared dead.
    let certs = TempDir::new("slow");
    let (c, mut slow, mut healthy) =
        with_frozen_peer(kind, &certs, |cfg| cfg.with_peer_queue(8, 64 * 1024 * 1024)).await?;
    for i in 0..200u32 {
        big_broadcast_reaches(&c, &mut healthy, i).await?;
    }
    let stats = c.nodes[0].mesh.stats();
    assert!(stats.slow_peer_cutoffs >= 1, "{stats:?}");
    slow.child.kill().await?;
    Ok(())
}

async fn stalled_peer_is_cut_off_by_the_write_deadline(kind: TransportKind) -> anyhow::Result<()> {
    // The default queue (64 MiB: a burst never fills it) and a short write deadline: only the
    // deadline can cut the frozen peer off, once its transport window is full and no command
    // is accepted.
    let certs = TempDir::new("stalled");
    let (c, mut stalled, mut healthy) = with_frozen_peer(kind, &certs, |cfg| {
        cfg.with_slow_peer_timeout(Duration::from_millis(500))
    })
    .await?;
    let started = Instant::now();
    let mut i = 0u32;
    while c.nodes[0].mesh.stats().slow_peer_cutoffs == 0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "not cut off: {:?}",
            c.nodes[0].mesh.stats()
        );
        big_broadcast_reaches(&c, &mut healthy, i).await?;
        i += 1;
    }
    let stats = c.nodes[0].mesh.stats();
    assert!(
        stats.commands_lost >= 1,
        "the stalled batch is counted: {stats:?}"
    );
    // The healthy peer goes on receiving.
    big_broadcast_reaches(&c, &mut healthy, i).await?;

    // The stalled node resumes: when node 0's next command stream reaches it, it counts the
    // commands it missed.
    stalled.signal("CONT").await?;
    let lost = c.nodes[0].mesh.stats().commands_lost;
    let deadline = Instant::now() + WAIT;
    loop {
        let missed = proc_stats(&stalled).await["commands_missed"]
            .as_u64()
            .unwrap_or(0);
        if missed >= 1 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the resumed node counts {missed} missed commands, node 0 dropped {lost}: {}",
            proc_stats(&stalled).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// Once a killed node is declared dead, nobody dials its address again because gossip still
/// lists it (chitchat keeps dead members for their grace period and gossips to them).
async fn a_dead_member_is_not_dialed_again(kind: TransportKind) -> anyhow::Result<()> {
    // A short connect timeout, so a dial to the dead UDP port fails (and counts) within the
    // observation window on QUIC too.
    let c = Cluster::start_with(kind, 2, |cfg| {
        cfg.with_connect_timeout(Duration::from_millis(300))
    })
    .await?;
    let certs = TempDir::new("dead-dials");
    let mut victim = c
        .join_process(&certs, &[("MESH_GOSSIP_INTERVAL_MS", "50")])
        .await?;
    victim.child.kill().await?;
    for node in &c.nodes {
        let mut members = node.mesh.watch_members();
        tokio::time::timeout(WAIT, members.wait_for(|m| m.len() == 1)).await??;
    }
    let before: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.mesh.stats().dials_failed)
        .collect();
    // Absence takes time to show: 40 gossip rounds (50 ms), in which chitchat picks the dead
    // member many times; before the fix each pick was a dial (backoff capped at 1 s here).
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (node, before) in c.nodes.iter().zip(before) {
        let stats = node.mesh.stats();
        assert!(
            stats.dials_failed <= before + 1,
            "dials to a dead member went on: {before} -> {} ({:?})",
            stats.dials_failed,
            stats.incidents
        );
        assert_eq!(stats.incidents.dead_members, 1, "{:?}", stats.incidents);
    }
    Ok(())
}

/// A node frozen long enough to be declared dead, then resumed: the commands queued for it
/// were dropped (counted by the sender), and when it is back it counts everything it missed
/// from the gap in the sender's numbering, which continues across the death.
async fn a_node_declared_dead_then_back_counts_what_it_missed(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let certs = TempDir::new("frozen-dead");
    let frozen = c
        .join_process(&certs, &[("MESH_GOSSIP_INTERVAL_MS", "50")])
        .await?;
    let _client = Client::connect(frozen.http, &["/"]).await?;
    frozen.signal("STOP").await?;
    // More than the transport's window holds: some of it waits in node 0's queue.
    let payload = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    for i in 0..300u32 {
        c.nodes[0].io.emit("big", &(i, &payload)).await.sio()?;
    }
    let mut members = c.nodes[0].mesh.watch_members();
    tokio::time::timeout(WAIT, members.wait_for(|m| m.len() == 1)).await??;
    // Its link's writer drops the queue as it stops (counted by then).
    let deadline = Instant::now() + WAIT;
    while c.nodes[0].mesh.stats().commands_lost == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing counted lost: {:?}",
            c.nodes[0].mesh.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lost = c.nodes[0].mesh.stats().commands_lost;

    frozen.signal("CONT").await?;
    members_of(&frozen, 2).await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = proc_stats(&frozen).await;
        let missed = stats["commands_missed"].as_u64().unwrap_or(0);
        // Node 0's count is an upper bound (a failed write may have delivered part of its
        // batch); the receiver's is exact: some, and no more than node 0 ever sent it.
        if missed >= 1 {
            assert!(missed <= 300 + 10, "{stats}");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "back, it counts {missed} missed commands; node 0 dropped {lost}: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut frozen = frozen;
    frozen.child.kill().await?;
    Ok(())
}

/// Requests nobody waits for any more stop at once: 1000 `fetch_sockets` stuck on a frozen
/// peer (which the failure detector is too patient to declare dead), dropped, free their
/// questions to it immediately instead of at the request timeout.
async fn dropped_requests_stop_at_once(kind: TransportKind) -> anyhow::Result<()> {
    let certs = TempDir::new("dropped");
    // Never declared dead during the test: only dropping the requests can end their questions.
    let (c, mut frozen, _healthy) = with_frozen_peer(kind, &certs, |cfg| {
        cfg.with_request_timeout(REQUEST_TIMEOUT)
            .with_phi_threshold(1e6)
            .with_probe(Duration::from_secs(60), PATIENT_PROBES)
            .with_keep_alive(Duration::from_secs(1), REQUEST_TIMEOUT)
    })
    .await?;
    let stuck: Vec<_> = (0..1000)
        .map(|_| {
            let io = c.nodes[0].io.clone();
            tokio::spawn(async move { io.fetch_sockets().await.map(|s| s.len()).ok() })
        })
        .collect();
    // Every request is sent and waits for the frozen peer (node 1 answers at once).
    let deadline = Instant::now() + WAIT;
    while {
        let s = c.nodes[0].mesh.stats();
        s.requests < 1000 || s.requests_in_flight < 1000
    } {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} questions in flight",
            c.nodes[0].mesh.stats().requests_in_flight
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for task in &stuck {
        task.abort();
    }
    let dropped = Instant::now();
    while c.nodes[0].mesh.stats().requests_in_flight > 0 {
        anyhow::ensure!(
            dropped.elapsed() < Duration::from_secs(2),
            "{} questions still in flight {:?} after their requests were dropped",
            c.nodes[0].mesh.stats().requests_in_flight,
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    frozen.child.kill().await?;
    Ok(())
}

/// A frozen node (SIGSTOP: its connections stay open, TCP included) is declared dead by the
/// probes alone: gossip's failure detector is switched off here, and the transport's idle
/// timeout (30 s) is longer than the wait. Every survivor declares it and counts it.
async fn probes_declare_a_silent_node_without_gossips_detector(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start_with(kind, 2, |cfg| cfg.with_phi_threshold(1e6)).await?;
    let certs = TempDir::new("probes");
    let frozen = c.join_process(&certs, &[]).await?;
    // Gossip lists a member before anyone has connected to it; probes go over connections, so
    // freeze it only once both survivors hold one (a node frozen before that is declared by the
    // failed dials instead: `peers::tests` cover that).
    for node in &c.nodes {
        let deadline = Instant::now() + WAIT;
        while !node
            .mesh
            .topology()
            .peers
            .iter()
            .any(|p| p.node_id == frozen.node_id && p.link == "connected")
        {
            anyhow::ensure!(Instant::now() < deadline, "never connected to the process");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    frozen.signal("STOP").await?;
    let started = Instant::now();
    for node in &c.nodes {
        let mut members = node.mesh.watch_members();
        tokio::time::timeout(WAIT, members.wait_for(|m| m.len() == 1)).await??;
    }
    eprintln!(
        "a frozen node was dropped by both survivors in {:?}",
        started.elapsed()
    );
    // Someone's ping went unanswered first; then each survivor declared it itself.
    let stats: Vec<_> = c.nodes.iter().map(|n| n.mesh.stats()).collect();
    assert!(stats.iter().any(|s| s.probes_unanswered >= 1), "{stats:?}");
    for s in &stats {
        assert_eq!(s.peers_declared_dead, 1, "{s:?}");
    }
    // Gossip still lists it (its detector is off here; with it on, for a minute or more). A
    // declaration runs out after 10 s and the member is tried again: it must not come back as
    // a member meanwhile, only once a connection proves it alive. Watched until a node joins
    // after the declarations ran out (the survivors publish their membership again then).
    let mut watches: Vec<_> = c.nodes.iter().map(|n| n.mesh.watch_members()).collect();
    let back = async {
        loop {
            for w in &mut watches {
                if w.borrow_and_update()
                    .iter()
                    .any(|m| m.node_id.to_string() == frozen.node_id)
                {
                    return;
                }
            }
            let changes = watches.iter_mut().map(|w| Box::pin(w.changed()));
            let _ = futures_util::future::select_all(changes).await;
        }
    };
    let late_join = async {
        // Waiting out a protocol timer (a declaration lasts 10 s), not an event.
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        let late = start_node(config(kind, &c.ca, "late", &[c.seed()])).await?;
        let id = late.mesh.node_id();
        for node in &c.nodes {
            let mut members = node.mesh.watch_members();
            tokio::time::timeout(
                WAIT,
                members.wait_for(|m| m.iter().any(|m| m.node_id == id)),
            )
            .await??;
        }
        anyhow::Ok(late)
    };
    tokio::select! {
        () = back => anyhow::bail!("the frozen node was listed again while frozen"),
        late = late_join => drop(late?),
    }
    for s in c.nodes.iter().map(|n| n.mesh.stats()) {
        assert_eq!(
            s.peers_declared_dead, 1,
            "the same death counted once: {s:?}"
        );
    }
    let mut frozen = frozen;
    frozen.child.kill().await?;
    Ok(())
}

both_transports!(
    probes_declare_a_silent_node_without_gossips_detector,
    dropped_requests_stop_at_once,
    a_node_declared_dead_then_back_counts_what_it_missed,
    a_dead_member_is_not_dialed_again,
    killed_node_ends_inflight_requests_early,
    graceful_shutdown_is_noticed_at_once,
    killed_node_restarted_in_place_rejoins,
    slow_peer_is_cut_off_without_stalling_the_others,
    stalled_peer_is_cut_off_by_the_write_deadline
);
