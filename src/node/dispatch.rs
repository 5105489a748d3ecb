//! Dispatch: what the node does with each envelope that arrives (on its ROUTER, its
//! DEALERs and its SUB), the inline handlers it gives those sockets, and the node's
//! loops (declined messages, connection events, deadlines). No public items.

use super::*;
use tokio::sync::OwnedSemaphorePermit;
impl Inner {
    pub(super) fn hello(&self) -> Hello {
        Hello {
            node_id: self.id,
            name: self.name.clone(),
            cluster: self.cluster.clone(),
            host: self.host.to_string(),
            router_port: self.router_port,
            pub_port: self.pub_port,
            catalog: self.registry.read().catalog(),
            peers: self
                .peers
                .lock()
                .by_id
                .values()
                .filter(|p| p.info.connected)
                .map(|p| p.info.router_endpoint.clone())
                .collect(),
        }
    }

    pub(super) fn hello_envelope(&self, kind: Kind, correlation: Id) -> Envelope {
        let mut h = Header::new(kind, self.id, "");
        h.correlation_id = correlation;
        Envelope {
            header: h,
            payload: codec::encode_payload(&self.hello()).expect("a HELLO always encodes"),
        }
    }

    /// How long a reply may wait for room: the caller's deadline, but never longer than
    /// our default, since the deadline is the peer's number.
    fn reply_window(&self, request: &Header) -> Duration {
        request
            .deadline()
            .unwrap_or(self.default_timeout)
            .min(self.default_timeout)
    }

    /// One declined message has been dispatched by a loop.
    pub(super) fn undecline(&self) {
        // Saturating: messages declined before the node was ready were not counted.
        let _ = self
            .declined
            .fetch_update(AcqRel, Acquire, |n| Some(n.saturating_sub(1)));
    }

    /// Registers a pending call's deadline with the sweeper.
    pub(super) fn watch_deadline(&self, at: tokio::time::Instant, id: Id) {
        let mut heap = self.deadlines.lock();
        let earliest = heap.peek().is_none_or(|Reverse((t, _))| at < *t);
        heap.push(Reverse((at, id)));
        // Answered calls leave their entry behind until it comes up: compact when those
        // outnumber the live ones, so the heap stays proportional to calls in flight.
        if heap.len() > 4096 && heap.len() > 4 * self.pending.lock().len() {
            let pending = self.pending.lock();
            heap.retain(|Reverse((_, id))| pending.contains_key(id));
        }
        drop(heap);
        if earliest {
            self.earlier_deadline.notify_one();
        }
    }

    /// Sends a fresh HELLO to every peer (the catalog changed).
    pub(super) fn announce(&self) {
        let env = self.hello_envelope(Kind::Hello, Id::NIL);
        for d in self.peers.lock().dealers.values() {
            let _ = d.try_send(env.to_message());
        }
    }

    pub(super) fn pick(
        &self,
        target: &str,
        wanted: Option<Version>,
    ) -> Result<(Id, Arc<Dealer>), CallError> {
        self.peers
            .lock()
            .pick(target, wanted)
            .map_err(|incompatible| match (incompatible, wanted) {
                (Some(available), Some(wanted)) => CallError::IncompatibleVersion {
                    target: target.to_string(),
                    wanted,
                    available,
                },
                _ => CallError::NoResponder(target.to_string()),
            })
    }

    /// The DEALER for a peer ROUTER endpoint, created (with its loop) if new.
    pub(super) fn ensure_dealer(
        self: &Arc<Self>,
        endpoint: &str,
    ) -> Result<Arc<Dealer>, TransportError> {
        let mut peers = self.peers.lock();
        if self.self_endpoints.lock().contains(endpoint) {
            return Err(TransportError::InvalidEndpoint(format!(
                "{endpoint} is this node itself"
            )));
        }
        if let Some(d) = peers.dealers.get(endpoint) {
            return Ok(d.clone());
        }
        // Replies are dispatched inline by the DEALER's connection task: a reply wakes its
        // caller directly, with no task in between.
        let weak = Arc::downgrade(self);
        let ep = endpoint.to_string();
        let on_message: MessageHandler = Arc::new(move |_: &Bytes, msg: Message| {
            let Some(inner) = weak.upgrade() else {
                return Ok(());
            };
            match Envelope::from_frames(msg.frames()) {
                Ok(env) => inner.on_dealer(&ep, env),
                Err(e) => {
                    inner.counters.malformed.fetch_add(1, Relaxed);
                    warn!(error = %e, endpoint = %ep, "malformed envelope on a DEALER, dropped");
                }
            }
            Ok(())
        });
        let (dealer, events) =
            Dealer::connect_with_handler(endpoint, self.socket.clone(), on_message)?;
        let dealer = Arc::new(dealer);
        // Its loop ends with the node, or when this endpoint is forgotten: a loop that
        // outlived its dealer would act on whatever dealer the endpoint has later.
        let stop = self.cancel.child_token();
        peers.dealers.insert(endpoint.to_string(), dealer.clone());
        peers
            .dealer_stops
            .insert(endpoint.to_string(), stop.clone());
        drop(peers);
        self.tasks.spawn(dealer_loop(
            Arc::downgrade(self),
            endpoint.to_string(),
            dealer.clone(),
            events,
            stop,
        ));
        Ok(dealer)
    }

    /// Records a peer from its HELLO (received on our ROUTER, or as a HELLO-ACK on a
    /// DEALER), connecting to it if it is new.
    pub(super) fn learn(self: &Arc<Self>, mut hello: Hello, source_ip: Option<IpAddr>) {
        if hello.cluster != self.cluster {
            self.counters.other_cluster.fetch_add(1, Relaxed);
            debug!(peer = %hello.name, cluster = %hello.cluster, "ignoring a node of another cluster");
            return;
        }
        if hello.node_id == self.id {
            return;
        }
        // Whoever speaks is alive: an id retired by mistake is dialled again.
        self.retired.lock().remove(&hello.node_id);
        // An unspecified listen address (0.0.0.0) means "wherever you reached me from".
        let host: IpAddr = match hello.host.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => source_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let router_ep = format!(
            "tcp://{}",
            std::net::SocketAddr::new(host, hello.router_port)
        );
        let pub_ep = format!("tcp://{}", std::net::SocketAddr::new(host, hello.pub_port));
        if self
            .peers
            .lock()
            .claimed_elsewhere(&hello.node_id, &router_ep)
        {
            warn!(id = %hello.node_id, endpoint = %router_ep, "HELLO claims the id of a peer connected elsewhere; ignored");
            return;
        }
        let dealer = match self.ensure_dealer(&router_ep) {
            Ok(d) => d,
            Err(e) => {
                warn!(endpoint = %router_ep, error = %e, "cannot connect to a peer");
                return;
            }
        };
        if self.sub_endpoints.lock().insert(pub_ep.clone()) {
            if let Err(e) = self.subscriber.connect(&pub_ep) {
                warn!(endpoint = %pub_ep, error = %e, "cannot subscribe to a peer");
            }
        }
        let gossip = std::mem::take(&mut hello.peers);
        let (new_peer, stale_pubs, superseded) = {
            let mut peers = self.peers.lock();
            let before = peers.by_id.get(&hello.node_id).map(|p| p.info.clone());
            let was_up = before.as_ref().is_some_and(|p| p.connected);
            let (new, stale, replaced) = peers.upsert(
                hello.node_id,
                hello.name,
                router_ep,
                pub_ep,
                hello.catalog,
                dealer,
            );
            for peer in replaced {
                let _ = self.presence.send(PresenceEvent::Left {
                    peer,
                    reason: "replaced by another node at its endpoint".into(),
                });
            }
            let info = peers.by_id[&hello.node_id].info.clone();
            if new {
                debug!(node = %self.name, peer = %info.name, id = %info.id, "peer joined");
            }
            // A peer of the same name on the same host, under another id, whose endpoint
            // now refuses connections, is this one before a restart (on another port,
            // say): stop dialling it now rather than after `forget_after`. (Not merely
            // unreachable: replicas of one name that both lost their connections in a
            // network blip are not restarts of each other.)
            let superseded = peers.restarts();
            // Sent under the table's lock, so that `Node::presence` can take a snapshot
            // and subscribe without missing or repeating an event.
            if info.connected && !was_up {
                let _ = self.presence.send(PresenceEvent::Joined(info.clone()));
            } else if was_up && before.as_ref() != Some(&info) {
                let _ = self.presence.send(PresenceEvent::Updated(info.clone()));
            }
            // Announce when a peer becomes reachable, not only when it is first heard of:
            // that is when the others can be told of it.
            let announce = new || (!was_up && info.connected);
            (announce, stale, superseded)
        };
        for p in stale_pubs {
            // The peer restarted (new PUB port) or was replaced: stop dialling the old one.
            self.subscriber.disconnect(&p);
            self.sub_endpoints.lock().remove(&p);
        }
        self.supersede(superseded);
        let is_new = new_peer;
        self.changed.notify_waiters();
        // Gossip: connect to the peers it knows, and tell ours about the newcomer.
        let own = format!("tcp://{}", self.router.local_addr());
        // Bounded: a HELLO cannot make us open more than MAX_GOSSIP connections, nor
        // grow the table past MAX_PEERS.
        for ep in gossip.into_iter().take(MAX_GOSSIP) {
            if self.peers.lock().dealers.len() >= MAX_PEERS {
                warn!(node = %self.name, "peer limit reached; gossip not followed");
                break;
            }
            if ep != own && !self.peers.lock().dealers.contains_key(&ep) {
                if let Err(e) = self.ensure_dealer(&ep) {
                    debug!(endpoint = %ep, error = %e, "not following gossip");
                }
            }
        }
        if is_new {
            self.announce();
        }
    }

    /// Forgets the endpoints of earlier lives of restarted nodes, and retires their ids:
    /// their mDNS records linger in caches for minutes and must not be dialled again.
    pub(super) fn supersede(self: &Arc<Self>, old: Vec<(String, Id)>) {
        for (ep, old_id) in old {
            if self.static_endpoints.contains(&ep) {
                continue;
            }
            self.retired.lock().add(old_id);
            debug!(node = %self.name, endpoint = %ep, "a restarted peer replaces its old endpoint");
            let inner = self.clone();
            self.tasks
                .spawn(async move { inner.forget(&ep, "restarted elsewhere", None).await });
        }
    }

    /// Drops everything known about a peer endpoint that has stayed unreachable.
    /// Known gap: a HELLO learned while this runs (between its two lock sections) can
    /// leave that peer in the table without its SUB connection; its next HELLO (on
    /// reconnect) repairs it.
    /// With `only`, nothing happens unless that dealer is still the endpoint's: a decision
    /// about one connection must not remove a newer one.
    pub(super) async fn forget(
        self: &Arc<Self>,
        endpoint: &str,
        why: &str,
        only: Option<&Arc<Dealer>>,
    ) {
        let (dealer, pubs) = {
            let mut peers = self.peers.lock();
            if let Some(expected) = only {
                if !peers
                    .dealers
                    .get(endpoint)
                    .is_some_and(|d| Arc::ptr_eq(d, expected))
                {
                    return;
                }
            }
            let dealer = peers.dealers.remove(endpoint);
            if let Some(stop) = peers.dealer_stops.remove(endpoint) {
                stop.cancel();
            }
            self.unannounced.lock().remove(endpoint);
            let (pubs, left) = peers.remove_at(endpoint, None);
            for peer in left {
                let _ = self.presence.send(PresenceEvent::Left {
                    peer,
                    reason: why.to_string(),
                });
            }
            (dealer, pubs)
        };
        for p in pubs {
            self.subscriber.disconnect(&p);
            self.sub_endpoints.lock().remove(&p);
        }
        self.changed.notify_waiters();
        if let Some(d) = dealer {
            d.shutdown().await;
        }
        debug!(node = %self.name, %endpoint, why, "forgot a peer");
    }

    pub(super) fn reply_error(&self, identity: &Bytes, to: &Header, code: &str, message: String) {
        let body = ErrorBody {
            code: code.to_string(),
            message,
        };
        let env = error_envelope(self.id, to, &body);
        if let Err(e) = self.router.try_send(identity, env.to_message()) {
            debug!(error = %e, "could not send an error reply");
        }
    }

    /// Starts a handler by polling it once: a handler that does not await (most do not)
    /// finishes here and is answered without a task hop (`Ok`). Otherwise (`Err`) the
    /// returned future finishes it under the caller's deadline, yielding `None` if the
    /// deadline passed: the caller has already given up (its timer started before ours),
    /// so no reply is sent at all rather than one that can only arrive too late.
    #[allow(clippy::type_complexity)]
    pub(super) fn start_handler(
        &self,
        handler: handlers::ErasedHandler,
        env: Envelope,
    ) -> Result<
        Result<Bytes, ErrorBody>,
        Pin<Box<dyn Future<Output = Option<Result<Bytes, ErrorBody>>> + Send>>,
    > {
        let h = env.header;
        let deadline = h.deadline();
        let ctx = Context {
            message_id: h.id,
            sender: h.sender,
            target: h.target,
            deadline,
            headers: h.headers,
            shard_key: h.shard_key,
        };
        let message_id = ctx.message_id;
        let mut fut = handler(env.payload, ctx);
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Ok(out);
        }
        // The task polls it again with a real waker.
        Err(Box::pin(async move {
            match deadline {
                Some(d) => match tokio::time::timeout(d, fut).await {
                    Ok(r) => Some(r),
                    Err(_) => {
                        warn!(id = %message_id, deadline = ?d, "handler cut off at the caller's deadline; no reply sent");
                        None
                    }
                },
                None => Some(fut.await),
            }
        }))
    }

    pub(super) fn on_router(
        self: &Arc<Self>,
        identity: Bytes,
        env: Envelope,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let h = &env.header;
        if h.version != codec::VERSION_MAJOR {
            let msg = format!(
                "envelope version {} is not supported (this node speaks {})",
                h.version,
                codec::VERSION_MAJOR
            );
            warn!(node = %self.name, version = h.version, "unsupported envelope version");
            self.reply_error(&identity, h, codes::UNSUPPORTED_VERSION, msg);
            return;
        }
        match h.kind {
            Kind::Request | Kind::Notification => {
                let is_request = h.kind == Kind::Request;
                if self.shutting_down.load(Relaxed) {
                    if is_request {
                        self.reply_error(
                            &identity,
                            h,
                            codes::SHUTTING_DOWN,
                            "node is shutting down".into(),
                        );
                    }
                    return;
                }
                let handler = lookup(&self.registry.read().methods, &h.target, h.method_version);
                let handler = match handler {
                    Ok(hd) => hd,
                    Err(body) => {
                        if is_request {
                            self.reply_error(&identity, h, &body.code, body.message);
                        } else {
                            warn!(target = %h.target, reason = %body.message, "notification not handled");
                        }
                        return;
                    }
                };
                let request = ReplyTo::of(&env.header);
                let reply_within = self.reply_window(&env.header);
                match self.start_handler(handler, env) {
                    Ok(out) => {
                        let Some(reply) = self.reply_for(&request, is_request, Some(out)) else {
                            return;
                        };
                        match self.router.try_send(&identity, reply.clone()) {
                            Ok(()) => {}
                            Err(SendError::QueueFull { .. }) => {
                                // The caller's queue is full: wait for room in a task that
                                // keeps the handler slot, so a caller that never reads its
                                // replies runs out of slots (and is read no more) instead
                                // of growing tasks.
                                let weak = Arc::downgrade(self);
                                self.handler_tasks.spawn(async move {
                                    let _slot = slot;
                                    let Some(inner) = weak.upgrade() else { return };
                                    inner.send_reply(&identity, reply, reply_within).await;
                                });
                            }
                            Err(e) => debug!(error = %e, "reply not sent: caller gone"),
                        }
                    }
                    Err(run) => {
                        let weak = Arc::downgrade(self);
                        self.handler_tasks.spawn(async move {
                            let _slot = slot;
                            let out = run.await;
                            let Some(inner) = weak.upgrade() else { return };
                            if let Some(reply) = inner.reply_for(&request, is_request, out) {
                                inner.send_reply(&identity, reply, reply_within).await;
                            }
                        });
                    }
                }
            }
            Kind::Hello => {
                let hello: Hello = match codec::decode_payload(&env.payload) {
                    Ok(x) => x,
                    Err(e) => {
                        self.counters.malformed.fetch_add(1, Relaxed);
                        warn!(error = %e, "malformed HELLO");
                        return;
                    }
                };
                let source = self.router.peer_addr(&identity).map(|a| a.ip());
                {
                    let mut ids = self.router_ids.lock();
                    if ids.len() >= 4 * MAX_PEERS {
                        ids.clear(); // bounded; live peers re-introduce themselves
                    }
                    ids.insert(identity.clone(), hello.node_id);
                }
                let ack = self.hello_envelope(Kind::HelloAck, h.id);
                let _ = self.router.try_send(&identity, ack.to_message());
                self.learn(hello, source);
            }
            Kind::GatherReply | Kind::ErrorReply => {
                // Only the node that introduced itself on this connection may answer as
                // itself: a forged sender id could otherwise end a gather early.
                if self.router_ids.lock().get(&identity) != Some(&h.sender) {
                    self.counters.unexpected.fetch_add(1, Relaxed);
                    debug!(sender = %h.sender, "gather reply from a connection that is not its sender's, dropped");
                    return;
                }
                let tx = self.gathers.lock().get(&h.correlation_id).cloned();
                match tx {
                    Some(tx) => {
                        let _ = tx.try_send(env);
                    }
                    None => debug!("late or unknown gather reply dropped"),
                }
            }
            Kind::Unknown(k) => {
                self.reply_error(
                    &identity,
                    h,
                    codes::UNSUPPORTED_KIND,
                    format!("envelope kind {k} is not supported"),
                );
            }
            _ => {
                self.counters.unexpected.fetch_add(1, Relaxed);
                warn!(kind = ?h.kind, "unexpected envelope kind on the ROUTER, dropped");
            }
        }
    }

    /// The reply message for a handler's outcome, or `None` when there is nothing to send
    /// (a notification, or the caller's deadline passed).
    pub(super) fn reply_for(
        &self,
        request: &ReplyTo,
        is_request: bool,
        out: Option<Result<Bytes, ErrorBody>>,
    ) -> Option<Message> {
        let out = out?;
        if !is_request {
            if let Err(e) = out {
                warn!(target = request.target.as_deref().unwrap_or(""), code = %e.code, message = %e.message, "notification handler failed");
            }
            return None;
        }
        Some(request.answer(self.id, out).to_message())
    }

    /// Sends a reply, waiting at most `within` for room (a caller that stops reading its
    /// replies must not pin a task).
    pub(super) async fn send_reply(&self, identity: &Bytes, reply: Message, within: Duration) {
        match tokio::time::timeout(within, self.router.send(identity, reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "reply not sent: caller gone"),
            Err(_) => warn!("reply not sent: the caller's queue stayed full"),
        }
    }

    pub(super) fn on_dealer(self: &Arc<Self>, endpoint: &str, env: Envelope) {
        match env.header.kind {
            Kind::Reply | Kind::ErrorReply => {
                if let Some(p) = self.pending.lock().remove(&env.header.correlation_id) {
                    let _ = p.tx.send(Ok(env));
                }
            }
            Kind::HelloAck => match codec::decode_payload::<Hello>(&env.payload) {
                Ok(hello) if hello.node_id == self.id => {
                    // Gossip led us to ourselves: never dial this endpoint again.
                    self.self_endpoints.lock().insert(endpoint.to_string());
                    let (me, ep) = (self.clone(), endpoint.to_string());
                    self.tasks
                        .spawn(async move { me.forget(&ep, "is this node", None).await });
                }
                Ok(hello) if hello.cluster != self.cluster => {
                    // Gossip led us to another cluster's node: stop dialling it (a static
                    // peer stays, the operator named it).
                    self.counters.other_cluster.fetch_add(1, Relaxed);
                    if !self.static_endpoints.contains(endpoint) {
                        let (me, ep) = (self.clone(), endpoint.to_string());
                        self.tasks
                            .spawn(async move { me.forget(&ep, "another cluster", None).await });
                    }
                }
                Ok(hello) => {
                    // Where our connection actually went (a host name resolved), for a
                    // peer that listens on an unspecified address.
                    let ip = self
                        .peers
                        .lock()
                        .dealers
                        .get(endpoint)
                        .and_then(|d| d.peer_addr())
                        .map(|a| a.ip())
                        .or_else(|| endpoint_ip(endpoint));
                    self.learn(hello, ip);
                }
                Err(e) => {
                    self.counters.malformed.fetch_add(1, Relaxed);
                    warn!(error = %e, "malformed HELLO-ACK");
                }
            },
            other => {
                self.counters.unexpected.fetch_add(1, Relaxed);
                warn!(kind = ?other, %endpoint, "unexpected envelope kind on a DEALER, dropped");
            }
        }
    }

    pub(super) fn on_published(
        self: &Arc<Self>,
        env: Envelope,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        match env.header.kind {
            Kind::Event => {
                for s in self.subs.read().iter() {
                    if env.header.target.starts_with(&s.prefix)
                        && s.tx.try_send(env.clone()).is_err()
                    {
                        self.counters.events_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
            Kind::GatherRequest => {
                let h = &env.header;
                if h.sender == self.id || self.shutting_down.load(Relaxed) {
                    return;
                }
                // No handler here (we only subscribed to the prefix for events): stay
                // silent. The gatherer does not expect us, and an error reply would count.
                let Ok(handler) =
                    lookup(&self.registry.read().gathers, &h.target, h.method_version)
                else {
                    return;
                };
                let dealer = self
                    .peers
                    .lock()
                    .by_id
                    .get(&h.sender)
                    .map(|p| p.dealer.clone());
                let Some(dealer) = dealer else {
                    debug!(sender = %h.sender, "gather request from an unknown node ignored");
                    return;
                };
                let request = ReplyTo::of(&env.header);
                let reply_within = self.reply_window(&env.header);
                let (kind_ok, kind_err) = (Kind::GatherReply, Kind::ErrorReply);
                let answer = move |id: Id, out: Result<Bytes, ErrorBody>| {
                    let mut env = request.answer(id, out);
                    env.header.kind = if env.header.kind == Kind::Reply {
                        kind_ok
                    } else {
                        kind_err
                    };
                    env.to_message()
                };
                match self.start_handler(handler, env) {
                    Ok(out) => {
                        let reply = answer(self.id, out);
                        if let Err(SendError::QueueFull { .. }) = dealer.try_send(reply.clone()) {
                            self.handler_tasks.spawn(async move {
                                let _slot = slot;
                                let _ =
                                    tokio::time::timeout(reply_within, dealer.send(reply)).await;
                            });
                        }
                    }
                    Err(run) => {
                        let id = self.id;
                        self.handler_tasks.spawn(async move {
                            let _slot = slot;
                            let Some(out) = run.await else { return };
                            let _ =
                                tokio::time::timeout(reply_within, dealer.send(answer(id, out)))
                                    .await;
                        });
                    }
                }
            }
            other => {
                self.counters.unexpected.fetch_add(1, Relaxed);
                warn!(kind = ?other, "unexpected envelope kind on the SUB, dropped");
            }
        }
    }

    pub(super) fn on_dealer_event(
        self: &Arc<Self>,
        endpoint: &str,
        dealer: &Dealer,
        e: SocketEvent,
    ) {
        match e {
            SocketEvent::Connected { .. } => {
                // (Re)introduce ourselves: the peer may be new, or restarted.
                // The peer counts as connected again only once its HELLO-ACK says who it
                // is now: the endpoint may have been taken by a restarted or other node.
                let env = self.hello_envelope(Kind::Hello, Id::NIL);
                let _ = dealer.try_send(env.to_message());
            }
            SocketEvent::Disconnected { reason, .. } => {
                {
                    let mut peers = self.peers.lock();
                    for peer in peers.set_down(endpoint) {
                        let _ = self.presence.send(PresenceEvent::Left {
                            peer,
                            reason: reason.to_string(),
                        });
                    }
                }
                self.changed.notify_waiters();
                let failed: Vec<Pending> = {
                    let mut pending = self.pending.lock();
                    let ids: Vec<Id> = pending
                        .iter()
                        .filter(|(_, p)| std::ptr::eq(Arc::as_ptr(&p.dealer), dealer))
                        .map(|(id, _)| *id)
                        .collect();
                    ids.iter().filter_map(|id| pending.remove(id)).collect()
                };
                if !failed.is_empty() {
                    debug!(%endpoint, %reason, calls = failed.len(), "failing calls to a lost peer");
                }
                for p in failed {
                    let _ =
                        p.tx.send(Err(CallError::Disconnected(endpoint.to_string())));
                }
            }
            SocketEvent::ConnectFailed { refused: true, .. } => {
                // The process behind it has ended. If the same node already came back
                // elsewhere on that host, this endpoint is its earlier life.
                let old = {
                    let mut peers = self.peers.lock();
                    peers.set_refused(endpoint);
                    peers.restarts()
                };
                self.supersede(old);
            }
            _ => {}
        }
    }
}

/// Hashes our own message ids by their random low half. Only ids this node generated
/// are ever inserted, so a peer cannot choose colliding keys; SipHash would only cost time.
#[derive(Default, Clone, Copy)]
pub(super) struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Default)]
pub(super) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // A UUIDv7's last 8 bytes are random.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

/// What a reply needs of the request it answers.
pub(super) struct ReplyTo {
    id: Id,
    /// Kept for notifications only, whose failures are logged with it.
    target: Option<String>,
}

impl ReplyTo {
    pub(super) fn of(h: &Header) -> ReplyTo {
        ReplyTo {
            id: h.id,
            target: (h.kind == Kind::Notification).then(|| h.target.clone()),
        }
    }

    /// The reply (or error reply) envelope. Replies carry no target: the correlation id
    /// says what they answer.
    pub(super) fn answer(&self, sender: Id, out: Result<Bytes, ErrorBody>) -> Envelope {
        let (kind, payload) = match out {
            Ok(p) => (Kind::Reply, p),
            Err(body) => (
                Kind::ErrorReply,
                codec::encode_payload(&body).expect("an error body always encodes"),
            ),
        };
        let mut h = Header::new(kind, sender, String::new());
        h.correlation_id = self.id;
        Envelope { header: h, payload }
    }
}

/// `now + d`, or a year from now if that overflows (a `Duration::MAX` timeout).
pub(super) fn far_instant_after(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

pub(super) fn error_envelope(sender: Id, to: &Header, body: &ErrorBody) -> Envelope {
    // Like every reply, it names what it answers by correlation id alone.
    let mut h = Header::new(Kind::ErrorReply, sender, String::new());
    h.correlation_id = to.id;
    Envelope {
        header: h,
        payload: codec::encode_payload(body).expect("an error body always encodes"),
    }
}

/// The IP of an endpoint given as an IP literal (a host name gives `None`; the DEALER's
/// connected address is preferred anyway).
pub(super) fn endpoint_ip(endpoint: &str) -> Option<IpAddr> {
    let rest = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
    rest.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// Which socket a message came in on.
pub(super) enum Via {
    /// The ROUTER, from the connection with this identity.
    Router(Bytes),
    /// The SUB.
    Sub,
}

impl Inner {
    /// A handler slot for a message offered to an inline dispatcher, or `None` to
    /// decline it (counted, so the loops can keep each connection's order): when the
    /// node is stopping, while earlier declined messages wait, or when no slot is free
    /// (backpressure).
    fn inline_slot(&self) -> Option<OwnedSemaphorePermit> {
        let slot = if self.cancel.is_cancelled() || self.declined.load(Acquire) > 0 {
            None
        } else {
            self.handler_slots.clone().try_acquire_owned().ok()
        };
        if slot.is_none() {
            self.declined.fetch_add(1, AcqRel);
        }
        slot
    }

    /// Decodes a message and dispatches it by the socket it came on.
    fn dispatch(self: &Arc<Self>, via: Via, msg: &Message, slot: OwnedSemaphorePermit) {
        let (decoded, socket) = match via {
            Via::Router(_) => (Envelope::from_frames(msg.frames()), "ROUTER"),
            Via::Sub => (Envelope::from_pub_frames(msg.frames()), "SUB"),
        };
        match (decoded, via) {
            (Ok(env), Via::Router(identity)) => self.on_router(identity, env, slot),
            (Ok(env), Via::Sub) => self.on_published(env, slot),
            (Err(e), _) => {
                self.counters.malformed.fetch_add(1, Relaxed);
                warn!(error = %e, socket, "malformed envelope, dropped");
            }
        }
    }
}

/// An inline dispatcher for the ROUTER (`router`) or the SUB: runs on the connection
/// task that received the message, and declines (the message then waits for its loop)
/// when the node is not ready or [`Inner::inline_slot`] says so.
fn inline_handler(cell: Arc<std::sync::OnceLock<Weak<Inner>>>, router: bool) -> MessageHandler {
    Arc::new(move |identity: &Bytes, msg: Message| {
        let Some(inner) = cell.get().and_then(Weak::upgrade) else {
            return Err(msg);
        };
        let Some(slot) = inner.inline_slot() else {
            return Err(msg);
        };
        let via = if router {
            Via::Router(identity.clone())
        } else {
            Via::Sub
        };
        inner.dispatch(via, &msg, slot);
        Ok(())
    })
}

/// The ROUTER's inline dispatcher: requests, notifications, HELLOs, gather replies.
pub(super) fn router_handler(cell: Arc<std::sync::OnceLock<Weak<Inner>>>) -> MessageHandler {
    inline_handler(cell, true)
}

/// The SUB's inline dispatcher: events and gather requests.
pub(super) fn subscriber_handler(cell: Arc<std::sync::OnceLock<Weak<Inner>>>) -> MessageHandler {
    inline_handler(cell, false)
}

/// Fails calls whose deadline passed, with `Timeout`. One timer for the whole node.
pub(super) async fn deadline_loop(inner: Weak<Inner>, cancel: CancellationToken) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = strong.deadlines.lock().peek().map(|Reverse((t, _))| *t);
        let earlier = strong.earlier_deadline.notified();
        let wake = next.unwrap_or_else(|| far_instant_after(Duration::MAX));
        // Holding `strong` while waiting is fine: Node's drop cancels the token.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
            _ = earlier => {}
        }
        let now = tokio::time::Instant::now();
        let mut expired = Vec::new();
        {
            let mut heap = strong.deadlines.lock();
            while let Some(Reverse((t, id))) = heap.peek() {
                if *t > now {
                    break;
                }
                expired.push(*id);
                heap.pop();
            }
        }
        for id in expired {
            let p = strong.pending.lock().remove(&id);
            if let Some(p) = p {
                let _ = p.tx.send(Err(CallError::Timeout {
                    target: p.target.to_string(),
                    timeout: p.timeout,
                }));
            }
        }
    }
}

/// Dispatches what the ROUTER's inline dispatcher declined, waiting for handler slots.
pub(super) async fn router_loop(inner: Weak<Inner>, cancel: CancellationToken) {
    declined_loop(inner, cancel, true).await
}

/// Dispatches what the SUB's inline dispatcher declined, waiting for handler slots.
pub(super) async fn subscriber_loop(inner: Weak<Inner>, cancel: CancellationToken) {
    declined_loop(inner, cancel, false).await
}

async fn declined_loop(inner: Weak<Inner>, cancel: CancellationToken, router: bool) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = async {
            if router {
                strong
                    .router
                    .recv()
                    .await
                    .map(|(id, m)| (Via::Router(id), m))
            } else {
                strong.subscriber.recv().await.map(|m| (Via::Sub, m))
            }
        };
        let got = tokio::select! {
            _ = cancel.cancelled() => return,
            r = next => r,
        };
        let Ok((via, msg)) = got else { return };
        let slots = strong.handler_slots.clone();
        let slot = tokio::select! {
            _ = cancel.cancelled() => return,
            s = slots.acquire_owned() => match s { Ok(s) => s, Err(_) => return },
        };
        strong.dispatch(via, &msg, slot);
        strong.undecline();
    }
}

pub(super) async fn dealer_loop(
    inner: Weak<Inner>,
    endpoint: String,
    dealer: Arc<Dealer>,
    mut events: broadcast::Receiver<SocketEvent>,
    cancel: CancellationToken,
) {
    // A peer learned by gossip (not a static one) that stays unreachable is forgotten.
    let forgettable = inner
        .upgrade()
        .map(|i| (!i.static_endpoints.contains(&endpoint)).then_some(i.forget_after))
        .unwrap_or(None);
    let far = far_instant_after(Duration::MAX);
    let mut forget_at = forgettable.map(far_instant_after).unwrap_or(far);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(forget_at) => {
                let Some(strong) = inner.upgrade() else { return };
                strong.forget(&endpoint, "unreachable", Some(&dealer)).await;
                return;
            }
            e = events.recv() => match e {
                Ok(e) => {
                    let Some(strong) = inner.upgrade() else { return };
                    let down = matches!(e, SocketEvent::Disconnected { .. });
                    if matches!(e, SocketEvent::Connected { .. }) {
                        forget_at = far;
                    }
                    // The table first (marks the peer down), then the decision, which
                    // reads what discovery said meanwhile.
                    strong.on_dealer_event(&endpoint, &dealer, e);
                    if down {
                        if let Some(t) = forgettable {
                            // Gone from mDNS already: nothing vouches for it any more.
                            let unannounced = strong.unannounced.lock().contains(&endpoint);
                            forget_at = if unannounced {
                                tokio::time::Instant::now()
                            } else {
                                far_instant_after(t)
                            };
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(%endpoint, missed = n, "connection events lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
