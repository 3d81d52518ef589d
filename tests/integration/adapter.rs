//! Every adapter operation across 3 nodes, observed by real Socket.IO clients connected to
//! different nodes.
//!
//! Negative checks ("this client must NOT receive x") use a marker: the sender emits `x`, then
//! a marker that every client gets, through the same ordered path. When the marker arrives,
//! `x` would have arrived before it if it had been sent to that client.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

use socketioxide_mesh::TransportKind;

use crate::common::*;

async fn clients(c: &Cluster, ns: &[&str]) -> anyhow::Result<Vec<Client>> {
    let mut out = Vec::new();
    for node in &c.nodes {
        out.push(node.client(ns).await?);
    }
    Ok(out)
}

async fn join(client: &mut Client, ns: &str, room: &str) -> anyhow::Result<()> {
    let ack = client.emit_with_ack(ns, "join", vec![json!(room)]).await?;
    assert_eq!(ack, vec![json!("joined")]);
    Ok(())
}

/// The events a client gets up to (and excluding) the marker.
async fn events_before_marker(client: &mut Client, ns: &str) -> anyhow::Result<Vec<String>> {
    let mut seen = Vec::new();
    loop {
        let p = client.next_event(ns).await?;
        match p.event() {
            Some("marker") => return Ok(seen),
            Some(e) => seen.push(e.to_string()),
            None => {}
        }
    }
}

async fn marker(node: &Node, ns: &str) -> anyhow::Result<()> {
    node.io
        .of(ns)
        .expect("namespace")
        .emit("marker", &())
        .await
        .sio()?;
    Ok(())
}

async fn broadcast_to_rooms_except_local_and_volatile(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 3).await?;
    let mut cl = clients(&c, &["/"]).await?;
    join(&mut cl[0], "/", "red").await?;
    join(&mut cl[1], "/", "red").await?;
    join(&mut cl[2], "/", "blue").await?;

    // To a room whose members are all on other nodes.
    c.nodes[2]
        .io
        .to("red")
        .emit("to-red", &json!({"n": 1}))
        .await
        .sio()?;
    // Except a room.
    c.nodes[0]
        .io
        .except("red")
        .emit("not-red", &())
        .await
        .sio()?;
    // Several rooms: each socket once.
    c.nodes[1]
        .io
        .to(["red", "blue"])
        .emit("red-or-blue", &())
        .await
        .sio()?;
    // Local: never leaves node 0.
    c.nodes[0].io.local().emit("local", &()).await.sio()?;
    // From one socket to everyone else (broadcast flag excludes the sender).
    let s0 = c.nodes[0].io.sockets().pop().expect("client 0 socket");
    s0.broadcast().emit("from-socket", &()).await.sio()?;
    // The markers must come after everything above: from each node that emitted.
    for n in [2, 0, 1] {
        marker(&c.nodes[n], "/").await?;
    }

    let mut got = Vec::new();
    for client in &mut cl {
        let mut all = Vec::new();
        for _ in 0..3 {
            all.extend(events_before_marker(client, "/").await?);
        }
        all.sort();
        got.push(all);
    }
    let sorted = |v: &[&str]| {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(got[0], sorted(&["to-red", "red-or-blue", "local"]));
    assert_eq!(got[1], sorted(&["to-red", "red-or-blue", "from-socket"]));
    assert_eq!(got[2], sorted(&["not-red", "red-or-blue", "from-socket"]));

    // Volatile still reaches remote nodes when nobody is overloaded. socketioxide sends
    // volatile packets outside the socket's ordered buffer, so no marker here: just wait.
    c.nodes[1]
        .io
        .volatile()
        .to("blue")
        .emit("volatile", &())
        .await
        .sio()?;
    cl[2].event("/", "volatile").await?;
    Ok(())
}

async fn binary_payloads_cross_nodes_intact(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let mut client = c.nodes[1].client(&["/"]).await?;
    let payload: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    c.nodes[0]
        .io
        .emit("bin", &(json!("label"), Bytes::from(payload.clone())))
        .await
        .sio()?;
    let p = client.event("/", "bin").await?;
    assert_eq!(p.bins, vec![payload.clone()]);
    assert_eq!(p.args()[0], json!("label"));
    assert_eq!(p.args()[1], json!({ "bin": payload }));
    Ok(())
}

async fn broadcast_with_ack_collects_every_node_and_ends_by_count(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 3).await?;
    let cl = clients(&c, &["/"]).await?;
    let sids: Vec<String> = cl.iter().map(|c| c.sid("/")).collect();
    // Each client answers with its own sid.
    let mut answering = Vec::new();
    for mut client in cl {
        answering.push(tokio::spawn(async move {
            let p = client.event("/", "ask").await?;
            let sid = client.sid("/");
            client.ack(&p, vec![json!(sid)]);
            anyhow::Ok(client)
        }));
    }
    // The ack timeout is 30 s (see common::serve) and WAIT is 20 s: a stream that waited for
    // the timeout instead of counting acks would fail here.
    let stream = c.nodes[0]
        .io
        .emit_with_ack::<_, String>("ask", &"question")
        .await
        .sio()?;
    let acks: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>()).await?;
    let mut answers: Vec<String> = acks
        .into_iter()
        .map(|(sid, res)| {
            let v = res.expect("ack");
            assert_eq!(sid.to_string(), v, "ack attributed to the right socket");
            v
        })
        .collect();
    answers.sort();
    let mut expected = sids.clone();
    expected.sort();
    assert_eq!(answers, expected);
    for t in answering {
        t.await??;
    }
    Ok(())
}

async fn broadcast_with_ack_reports_remote_timeouts(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let mut silent = c.nodes[1].client(&["/"]).await?;
    let stream = c.nodes[0]
        .io
        .timeout(Duration::from_millis(300))
        .emit_with_ack::<_, Value>("ask", &())
        .await
        .sio()?;
    let acks: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>()).await?;
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].0.to_string(), silent.sid("/"));
    let err = acks[0]
        .1
        .as_ref()
        .expect_err("the remote socket never answered");
    assert!(err.to_string().to_lowercase().contains("timeout"), "{err}");
    silent.event("/", "ask").await?;
    Ok(())
}

async fn fetch_sockets_and_remote_socket_operations(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 3).await?;
    let mut cl = clients(&c, &["/"]).await?;
    join(&mut cl[1], "/", "red").await?;

    let sockets = c.nodes[0].io.fetch_sockets().await.sio()?;
    let mut ids: Vec<String> = sockets.iter().map(|s| s.data().id.to_string()).collect();
    ids.sort();
    let mut expected: Vec<String> = cl.iter().map(|c| c.sid("/")).collect();
    expected.sort();
    assert_eq!(ids, expected);
    let servers: std::collections::HashSet<String> = sockets
        .iter()
        .map(|s| s.data().server_id.to_string())
        .collect();
    assert_eq!(servers.len(), 3, "each socket reports its own server");

    // Filtered by room.
    let red = c.nodes[2].io.to("red").fetch_sockets().await.sio()?;
    assert_eq!(red.len(), 1);
    assert_eq!(red[0].data().id.to_string(), cl[1].sid("/"));

    // Operations on a socket of another node (client 2 lives on node 2).
    let remote = sockets
        .into_iter()
        .find(|s| s.data().id.to_string() == cl[2].sid("/"))
        .expect("client 2 listed");
    remote.emit("direct", &"hi").await.sio()?;
    assert_eq!(cl[2].event("/", "direct").await?.args(), vec![json!("hi")]);

    remote.join("green").await.sio()?;
    let rooms = remote.rooms().await.sio()?;
    assert!(rooms.iter().any(|r| r == "green"), "{rooms:?}");
    c.nodes[1]
        .io
        .to("green")
        .emit("to-green", &())
        .await
        .sio()?;
    cl[2].event("/", "to-green").await?;

    let mut answering = {
        let mut client = std::mem::replace(&mut cl[2], c.nodes[2].client(&["/"]).await?);
        tokio::spawn(async move {
            let p = client.event("/", "ask").await?;
            client.ack(&p, vec![json!("answer")]);
            anyhow::Ok(client)
        })
    };
    let acks: Vec<_> = remote
        .emit_with_ack::<_, String>("ask", &())
        .await
        .sio()?
        .collect()
        .await;
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].1.as_ref().ok().map(String::as_str), Some("answer"));
    let mut client2 = (&mut answering).await??;

    remote.leave("green").await.sio()?;
    assert!(!remote.rooms().await.sio()?.iter().any(|r| r == "green"));

    remote.disconnect().await.sio()?;
    client2.disconnected("/").await?;
    Ok(())
}

async fn rooms_join_leave_disconnect_and_server_count(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 3).await?;
    let mut cl = clients(&c, &["/"]).await?;
    join(&mut cl[0], "/", "red").await?;
    join(&mut cl[1], "/", "red").await?;
    join(&mut cl[2], "/", "blue").await?;

    let mut rooms = c.nodes[0].io.rooms().await.sio()?;
    rooms.sort();
    assert!(
        rooms.contains(&"red".into()) && rooms.contains(&"blue".into()),
        "{rooms:?}"
    );

    // Make every "red" socket, wherever it lives, join "team".
    c.nodes[2].io.to("red").join("team").await.sio()?;
    let mut team: Vec<String> = c.nodes[2]
        .io
        .to("team")
        .fetch_sockets()
        .await
        .sio()?
        .iter()
        .map(|s| s.data().id.to_string())
        .collect();
    team.sort();
    let mut expected = vec![cl[0].sid("/"), cl[1].sid("/")];
    expected.sort();
    assert_eq!(team, expected);

    c.nodes[1].io.to("team").leave("team").await.sio()?;
    // A request sees every command its node sent before it.
    assert!(
        c.nodes[1]
            .io
            .to("team")
            .fetch_sockets()
            .await
            .sio()?
            .is_empty()
    );

    for node in &c.nodes {
        assert_eq!(node.mesh.server_count("/"), 3);
    }

    c.nodes[0].io.to("blue").disconnect().await.sio()?;
    cl[2].disconnected("/").await?;
    Ok(())
}

async fn two_namespaces_share_one_mesh_and_stay_apart(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let mut main = c.nodes[1].client(&["/"]).await?;
    let mut admin = c.nodes[1].client(&["/admin"]).await?;

    c.nodes[0]
        .io
        .of("/admin")
        .expect("ns")
        .emit("admin-only", &1)
        .await
        .sio()?;
    c.nodes[0].io.emit("main-only", &2).await.sio()?;
    marker(&c.nodes[0], "/").await?;
    marker(&c.nodes[0], "/admin").await?;
    assert_eq!(
        events_before_marker(&mut main, "/").await?,
        vec!["main-only"]
    );
    assert_eq!(
        events_before_marker(&mut admin, "/admin").await?,
        vec!["admin-only"]
    );

    let admins = c.nodes[0]
        .io
        .of("/admin")
        .expect("ns")
        .fetch_sockets()
        .await
        .sio()?;
    assert_eq!(admins.len(), 1);
    assert_eq!(admins[0].data().id.to_string(), admin.sid("/admin"));
    assert_eq!(admins[0].data().ns, "/admin");
    Ok(())
}

async fn server_side_events_reach_every_other_node_with_acks(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 3).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, node) in c.nodes.iter().enumerate() {
        let tx = tx.clone();
        node.mesh.on_server_event(move |ev| {
            let data: String = ev.data().unwrap_or_default();
            let _ = tx.send((i, ev.event.clone(), data));
            if ev.wants_ack() {
                let _ = ev.ack(&format!("node-{i}"));
            }
        });
    }
    c.nodes[0]
        .mesh
        .server_side_emit("cache:flush", "users")
        .await?;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(tokio::time::timeout(WAIT, rx.recv()).await?.expect("event"));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (1, "cache:flush".into(), "users".into()),
            (2, "cache:flush".into(), "users".into())
        ]
    );

    let mut answers: Vec<String> = c.nodes[1]
        .mesh
        .server_side_emit_with_ack::<_, String>("whoami", "?")
        .await?
        .into_iter()
        .map(|(_, a)| a.expect("answer"))
        .collect();
    answers.sort();
    assert_eq!(answers, vec!["node-0", "node-2"]);
    Ok(())
}

/// A server event handler that blocks does not hold up the sender's broadcasts (they share
/// the sender's ordered stream), and server events from one sender keep their order.
async fn a_blocking_server_event_handler_does_not_stall_broadcasts(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    c.nodes[1].mesh.on_server_event(move |ev| {
        // The first event blocks until the test says so.
        if ev.event == "slow" {
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(30));
        }
        let _ = seen_tx.send(ev.event.clone());
    });
    let mut client = c.nodes[1].client(&["/"]).await?;
    c.nodes[0].mesh.server_side_emit("slow", "").await?;
    c.nodes[0].mesh.server_side_emit("after", "").await?;
    c.nodes[0].io.emit("news", &"on time").await.sio()?;
    // The broadcast arrives while the handler is still blocked on the first event.
    let p = client.event("/", "news").await?;
    assert_eq!(p.args(), vec![serde_json::json!("on time")]);
    assert!(
        seen_rx.try_recv().is_err(),
        "the handler cannot have finished"
    );
    release_tx.send(())?;
    for want in ["slow", "after"] {
        let got = tokio::time::timeout(WAIT, seen_rx.recv()).await?;
        assert_eq!(got.as_deref(), Some(want), "server events keep their order");
    }
    Ok(())
}

both_transports!(
    a_blocking_server_event_handler_does_not_stall_broadcasts,
    broadcast_to_rooms_except_local_and_volatile,
    binary_payloads_cross_nodes_intact,
    broadcast_with_ack_collects_every_node_and_ends_by_count,
    broadcast_with_ack_reports_remote_timeouts,
    fetch_sockets_and_remote_socket_operations,
    rooms_join_leave_disconnect_and_server_count,
    two_namespaces_share_one_mesh_and_stay_apart,
    server_side_events_reach_every_other_node_with_acks
);
