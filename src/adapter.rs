//! [`MeshAdapter`]: socketioxide's `CoreAdapter` over the mesh. One per namespace, created by
//! socketioxide; they all share the process's [`Mesh`].
//!
//! Every operation first goes to the peers serving the namespace, then applies locally:
//!
//! ```text
//!   commands (broadcast, join, leave, disconnect): queued in order on each peer's command
//!   stream, applied by each peer in that order. One hop, no answer.
//!
//!   A ──Broadcast──► B   (B emits to its matching sockets)
//!   A ──Broadcast──► C
//!   A emits to its own matching sockets
//!
//!   requests (fetch_sockets, rooms, broadcast with acks): one stream per peer, answers
//!   gathered until every live peer answered or died.
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::Duration,
};

use futures_core::{FusedStream, Stream};
use futures_util::StreamExt;
use serde_bytes::ByteBuf;
use socketioxide_core::{
    Uid,
    adapter::{
        AckStreamItem, BroadcastFlags, BroadcastOptions, CoreAdapter, CoreLocalAdapter,
        DefinedAdapter, RemoteSocketData, Room, RoomParam, SocketEmitter, Spawnable,
        errors::{AdapterError, BroadcastError, SocketError},
    },
    packet::Packet,
};
use tracing::{debug, warn};

use crate::{
    Error, Mesh,
    incidents::Incident,
    mesh::{Mode, NsHandler, Outgoing},
    wire::{Command, CommandRef, PacketRef, Query, QueryRef, Reply, WireValue},
};

/// The mesh adapter for one namespace. Use it as socketioxide's adapter with the [`Mesh`] as
/// its state:
///
/// ```no_run
/// use socketioxide::SocketIo;
/// use socketioxide_mesh::{DevCa, Mesh, MeshAdapter, MeshConfig};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mesh = Mesh::start(MeshConfig::local(DevCa::generate("dev")?.node_tls("a")?)).await?;
/// let (_layer, io) = SocketIo::builder()
///     .with_adapter::<MeshAdapter<_>>(mesh)
///     .build_layer();
/// io.ns("/", async || {}).await?;
/// # Ok(()) }
/// ```
pub struct MeshAdapter<E> {
    local: CoreLocalAdapter<E>,
    mesh: Mesh,
    /// The socketioxide server id.
    uid: Uid,
}

impl<E> DefinedAdapter for MeshAdapter<E> {}

impl<E: SocketEmitter> MeshAdapter<E> {
    fn ns(&self) -> &str {
        self.local.path().as_str()
    }

    fn send(&self, cmd: &CommandRef<'_>, opts: &BroadcastOptions) -> Result<(), Error> {
        let shared = &self.mesh.shared;
        let routes = shared.routes.load();
        let links = routes.targets(opts.server_id);
        // Interest-based routing: a broadcast to rooms goes only to the peers with members
        // in one of them (or whose rooms are not known).
        let filter = (shared.settings.routing
            && matches!(cmd, CommandRef::Broadcast { .. })
            && !opts.rooms.is_empty())
        .then_some(&opts.rooms[..]);
        let ns = self.ns();
        let kind = crate::mesh::kind_of_ref(cmd);
        let volatile = opts.has_flag(BroadcastFlags::Volatile);
        let sent = match filter {
            None if links.is_empty() => 0,
            None => shared.send_command(kind, links, shared.encode_frame(cmd)?, volatile),
            Some(rooms) => {
                // Each peer's interest is looked up once; the frame is encoded only if some
                // peer wants it (with routing, often none does).
                let wanted: Vec<&Arc<crate::mesh::Link>> =
                    links.iter().filter(|l| l.wants(ns, rooms)).collect();
                if wanted.is_empty() {
                    0
                } else {
                    shared.send_command(kind, wanted, shared.encode_frame(cmd)?, volatile)
                }
            }
        };
        shared.count_routed_away(links.len() - sent);
        if let CommandRef::AddSockets { rooms, .. } = cmd
            && shared.settings.routing
        {
            // The peers may gain members in `rooms` once they apply the join: count them
            // interested until their announcements say they did.
            for link in links {
                let seq = link.next_seq();
                link.interest
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .pin(ns, rooms, seq);
            }
        }
        Ok(())
    }

    async fn ask(
        &self,
        query: &QueryRef<'_>,
        opts: &BroadcastOptions,
        mode: Mode,
        timeout: Duration,
    ) -> Result<Outgoing, Error> {
        let shared = &self.mesh.shared;
        let links = shared.routes.load().targets(opts.server_id).to_vec();
        let kind = match query {
            QueryRef::FetchSockets { .. } => "fetch_sockets",
            QueryRef::Rooms { .. } => "rooms",
            QueryRef::BroadcastWithAck { .. } => "broadcast_with_ack",
            QueryRef::ServerEventWithAck { .. } => "server_event",
        };
        shared.request(kind, &links, query, mode, timeout).await
    }
}

impl<E: SocketEmitter> CoreAdapter<E> for MeshAdapter<E> {
    type Error = Error;
    type State = Mesh;
    type AckStream = AckStream<E>;
    type InitRes = InitRes;

    fn new(state: &Self::State, local: CoreLocalAdapter<E>) -> Self {
        let uid = local.server_id();
        Self {
            local,
            mesh: state.clone(),
            uid,
        }
    }

    fn init(self: Arc<Self>, on_success: impl FnOnce() + Send + 'static) -> Self::InitRes {
        InitRes(Box::pin(async move {
            let handler: Weak<dyn NsHandler> =
                Arc::downgrade(&(self.clone() as Arc<dyn NsHandler>));
            self.mesh
                .shared
                .register_ns(self.local.path(), self.uid, handler)
                .await?;
            on_success();
            Ok(())
        }))
    }

    async fn close(&self) -> Result<(), Self::Error> {
        self.mesh.shared.unregister_ns(self.local.path()).await;
        self.local.close();
        Ok(())
    }

    /// This node plus the live nodes serving this namespace.
    async fn server_count(&self) -> Result<u16, Self::Error> {
        Ok(self.mesh.server_count(self.ns()))
    }

    async fn broadcast(
        &self,
        packet: Packet,
        opts: BroadcastOptions,
    ) -> Result<(), BroadcastError> {
        if !opts.is_local(self.uid) {
            let cmd = CommandRef::Broadcast {
                ns: self.ns(),
                opts: &opts,
                packet: PacketRef(&packet),
            };
            self.send(&cmd, &opts).map_err(AdapterError::from)?;
        }
        self.local.broadcast(packet, opts)?;
        Ok(())
    }

    /// Emit to every matching socket of every node and stream their acks.
    ///
    /// ```text
    ///   A                         B                         C
    ///   │──BroadcastWithAck──────►│                         │
    ///   │──BroadcastWithAck────────────────────────────────►│
    ///   │◄──AckCount(2)───────────│                         │
    ///   │◄──AckCount(1)─────────────────────────────────────│
    ///   │◄──Ack───────────────────│                         │
    ///   │◄──Ack─────────────────────────────────────────────│
    ///   │◄──Ack───────────────────│ (B done: 2 of 2)        │ (C done: 1 of 1)
    /// ```
    /// The stream ends when every node delivered its announced acks (or died), not at a
    /// timeout; it is bounded by the ack timeout plus the request timeout.
    async fn broadcast_with_ack(
        &self,
        packet: Packet,
        opts: BroadcastOptions,
        timeout: Option<Duration>,
    ) -> Result<Self::AckStream, Self::Error> {
        let remote = if opts.is_local(self.uid) {
            None
        } else {
            let query = QueryRef::BroadcastWithAck {
                ns: self.ns(),
                opts: &opts,
                packet: PacketRef(&packet),
                timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            };
            let bound = self
                .mesh
                .shared
                .settings
                .request_timeout
                .saturating_add(timeout.unwrap_or(self.local.ack_timeout()));
            Some(self.ask(&query, &opts, Mode::Acks, bound).await?)
        };
        let (local, _) = self.local.broadcast_with_ack(packet, opts, timeout);
        Ok(AckStream { local, remote })
    }

    async fn add_sockets(
        &self,
        opts: BroadcastOptions,
        rooms: impl RoomParam,
    ) -> Result<(), Self::Error> {
        let rooms: Vec<Room> = rooms.into_room_iter().collect();
        if !opts.is_local(self.uid) {
            self.send(
                &CommandRef::AddSockets {
                    ns: self.ns(),
                    opts: &opts,
                    rooms: &rooms,
                },
                &opts,
            )?;
        }
        self.local.add_sockets(opts, rooms);
        Ok(())
    }

    async fn del_sockets(
        &self,
        opts: BroadcastOptions,
        rooms: impl RoomParam,
    ) -> Result<(), Self::Error> {
        let rooms: Vec<Room> = rooms.into_room_iter().collect();
        if !opts.is_local(self.uid) {
            self.send(
                &CommandRef::DelSockets {
                    ns: self.ns(),
                    opts: &opts,
                    rooms: &rooms,
                },
                &opts,
            )?;
        }
        self.local.del_sockets(opts, rooms);
        Ok(())
    }

    async fn disconnect_socket(&self, opts: BroadcastOptions) -> Result<(), BroadcastError> {
        if !opts.is_local(self.uid) {
            self.send(
                &CommandRef::DisconnectSockets {
                    ns: self.ns(),
                    opts: &opts,
                },
                &opts,
            )
            .map_err(AdapterError::from)?;
        }
        self.local
            .disconnect_socket(opts)
            .map_err(BroadcastError::Socket)
    }

    async fn rooms(&self, opts: BroadcastOptions) -> Result<Vec<Room>, Self::Error> {
        let mut rooms = if opts.is_local(self.uid) {
            return Ok(self.local.rooms(opts).into_iter().collect());
        } else {
            let timeout = self.mesh.shared.settings.request_timeout;
            let query = QueryRef::Rooms {
                ns: self.ns(),
                opts: &opts,
            };
            let mut out = self.ask(&query, &opts, Mode::Single, timeout).await?;
            let mut rooms = self.local.rooms(opts.clone());
            while let Some((_, reply)) = out.next().await {
                if let Reply::Rooms(r) = reply {
                    rooms.extend(r);
                }
            }
            rooms
        };
        Ok(rooms.drain().collect())
    }

    async fn fetch_sockets(
        &self,
        opts: BroadcastOptions,
    ) -> Result<Vec<RemoteSocketData>, Self::Error> {
        if opts.is_local(self.uid) {
            return Ok(self.local.fetch_sockets(opts));
        }
        let timeout = self.mesh.shared.settings.request_timeout;
        let query = QueryRef::FetchSockets {
            ns: self.ns(),
            opts: &opts,
        };
        let mut out = self.ask(&query, &opts, Mode::Single, timeout).await?;
        let mut sockets = self.local.fetch_sockets(opts.clone());
        while let Some((_, reply)) = out.next().await {
            if let Reply::Sockets { server_id, ids } = reply {
                let ns = self.local.path();
                sockets.extend(ids.into_iter().map(|id| RemoteSocketData {
                    id,
                    server_id,
                    ns: ns.clone(),
                }));
            }
        }
        Ok(sockets)
    }

    fn get_local(&self) -> &CoreLocalAdapter<E> {
        &self.local
    }
}

impl<E: SocketEmitter> NsHandler for MeshAdapter<E> {
    fn apply(&self, cmd: Command) {
        match cmd {
            Command::Broadcast { opts, packet, .. } => {
                if let Err(e) = self.local.broadcast(packet.0, opts) {
                    let full = e
                        .iter()
                        .filter(|e| matches!(e, SocketError::InternalChannelFull))
                        .count();
                    let shared = &self.mesh.shared;
                    shared
                        .stats
                        .socket_buffer_drops
                        .fetch_add(full as u64, std::sync::atomic::Ordering::Relaxed);
                    if full > 0 {
                        shared.transport.incidents().note_loss(
                            Incident::SocketBufferFull,
                            None,
                            full as u64,
                            &format_args!("namespace {}", self.ns()),
                        );
                    }
                    debug!(ns = self.ns(), errors = ?e, "some sockets missed a broadcast from a peer");
                }
            }
            Command::AddSockets { opts, rooms, .. } => self.local.add_sockets(opts, rooms),
            Command::DelSockets { opts, rooms, .. } => self.local.del_sockets(opts, rooms),
            Command::DisconnectSockets { opts, .. } => {
                if let Err(e) = self.local.disconnect_socket(opts) {
                    debug!(ns = self.ns(), errors = ?e, "some sockets failed to disconnect");
                }
            }
            // Handled by the mesh before a namespace is involved.
            Command::ServerEvent { .. } | Command::Interest { .. } | Command::Probe(_) => {}
        }
    }

    fn answer(&self, query: Query) -> Pin<Box<dyn Stream<Item = Reply> + Send>> {
        match query {
            Query::FetchSockets { opts, .. } => {
                let ids = self
                    .local
                    .fetch_sockets(opts)
                    .into_iter()
                    .map(|s| s.id)
                    .collect();
                let server_id = self.uid;
                futures_util::stream::once(async move { Reply::Sockets { server_id, ids } }).boxed()
            }
            Query::Rooms { opts, .. } => {
                let rooms = self.local.rooms(opts).into_iter().collect();
                futures_util::stream::once(async move { Reply::Rooms(rooms) }).boxed()
            }
            Query::BroadcastWithAck {
                opts,
                packet,
                timeout_ms,
                ..
            } => {
                let timeout = timeout_ms.map(Duration::from_millis);
                let (acks, count) = self.local.broadcast_with_ack(packet.0, opts, timeout);
                let acks = acks.filter_map(|(sid, res)| async move {
                    let result = match res {
                        Ok(v) => Ok(WireValue(v)),
                        Err(e) => match rmp_serde::to_vec(&e) {
                            Ok(bytes) => Err(ByteBuf::from(bytes)),
                            Err(err) => {
                                warn!(error = %err, "cannot encode an ack error, skipped");
                                return None;
                            }
                        },
                    };
                    Some(Reply::Ack { sid, result })
                });
                futures_util::stream::once(async move { Reply::AckCount(count) })
                    .chain(acks)
                    .boxed()
            }
            Query::ServerEventWithAck { .. } => {
                futures_util::stream::once(async { Reply::Error("not a namespace query".into()) })
                    .boxed()
            }
        }
    }

    fn num_sockets(&self) -> usize {
        let mut opts = BroadcastOptions::default();
        opts.add_flag(BroadcastFlags::Broadcast);
        self.local.sockets(opts).len()
    }

    fn room_names(&self) -> std::collections::HashSet<Room> {
        let mut all = BroadcastOptions::default();
        all.add_flag(BroadcastFlags::Broadcast);
        self.local.rooms(all)
    }

    fn local_rooms(&self) -> Vec<(String, usize)> {
        let mut all = BroadcastOptions::default();
        all.add_flag(BroadcastFlags::Broadcast);
        self.local
            .rooms(all)
            .into_iter()
            .map(|room| {
                let mut opts = BroadcastOptions::default();
                opts.add_flag(BroadcastFlags::Broadcast);
                opts.rooms.push(room.clone());
                (room.to_string(), self.local.sockets(opts).len())
            })
            .collect()
    }
}

pin_project_lite::pin_project! {
    /// The acks of a broadcast: the local sockets' and every peer's, merged as they arrive.
    pub struct AckStream<E: SocketEmitter> {
        #[pin]
        local: E::AckStream,
        remote: Option<Outgoing>,
    }
}

impl<E: SocketEmitter> Stream for AckStream<E> {
    type Item = AckStreamItem<E::AckError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if !this.local.is_terminated()
            && let Poll::Ready(Some(item)) = this.local.as_mut().poll_next(cx)
        {
            return Poll::Ready(Some(item));
        }
        while let Some(remote) = this.remote.as_mut() {
            match remote.poll_reply(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => *this.remote = None,
                Poll::Ready(Some((node, Reply::Ack { sid, result }))) => {
                    let result = match result {
                        Ok(v) => Ok(v.0),
                        Err(bytes) => match rmp_serde::from_slice::<E::AckError>(&bytes) {
                            Ok(e) => Err(e),
                            Err(err) => {
                                warn!(peer = %remote.uid_of(node), error = %err, "undecodable ack error from peer, skipped");
                                continue;
                            }
                        },
                    };
                    return Poll::Ready(Some((sid, result)));
                }
                Poll::Ready(Some(_)) => {}
            }
        }
        if this.local.is_terminated() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

impl<E: SocketEmitter> FusedStream for AckStream<E> {
    fn is_terminated(&self) -> bool {
        self.local.is_terminated() && self.remote.as_ref().is_none_or(Outgoing::is_complete)
    }
}

/// The future returned by `io.ns(..)` with this adapter: resolves once the namespace is
/// registered with the mesh (and published to peers).
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct InitRes(Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>);

impl Future for InitRes {
    type Output = Result<(), Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl Spawnable for InitRes {
    fn spawn(self) {
        tokio::spawn(async move {
            if let Err(e) = self.0.await {
                tracing::error!(error = %e, "mesh adapter failed to initialize a namespace");
            }
        });
    }
}
