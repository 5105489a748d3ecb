"""A peerwire node in Python, written from PROTOCOL.md with pyzmq and msgpack alone.

It joins a cluster through one seed, learns the others by gossip, serves requests,
notifications and a gather topic, publishes events, subscribes to others' events,
calls services and gathers, exactly as a Rust node does. One thread, one poll loop:
every wait (a call, a gather) keeps serving everything else while it waits.

    pip install pyzmq msgpack
    python3 peerwire_node.py --seed tcp://127.0.0.1:5555 --name py
    python3 peerwire_node.py --seed tcp://127.0.0.1:5555#KEY --secure   # CURVE (10a)

It runs `demo()`: serves `py.greet`, `py.log` and the gather topic `py.ping`, publishes
`py.events.tick` every 200 ms, prints the events it gets on `rust.events.`, and calls
`--call`, notifies `--notify` and gathers `--gather` (by default `rust.echo`,
`rust.note`, `rust.ping`) if some peer serves them. It prints one JSON line per thing
that happened, and stops on a `py.stop` notification (or Ctrl-C).
"""

import argparse
import hashlib
import ipaddress
import json
import os
import sys
import time

import msgpack
import zmq
import zmq.auth
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

# Envelope kinds (PROTOCOL.md section 9).
REQUEST, REPLY, ERROR_REPLY, NOTIFICATION, EVENT = 1, 2, 3, 4, 5
GATHER_REQUEST, GATHER_REPLY, HELLO, HELLO_ACK = 6, 7, 8, 9
# How a SUB says which node it is (section 10): a subscription to this plus our id.
LABEL_PREFIX = b"\x00peerwire.node:"
# Bounds on what peers can make us do: endpoints followed per HELLO, peers dialled.
MAX_GOSSIP, MAX_PEERS = 64, 256


def tcp_endpoint(entry):
    """(`tcp://ip:port`, key or None) from a `peers` entry, or None: only IP literals and
    40-character keys are taken (never `ipc://` or a name: a peer must not make us
    connect to a local socket or resolve names for it)."""
    if not isinstance(entry, str) or not entry.startswith("tcp://"):
        return None
    endpoint, _, key = entry.partition("#")
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        if not 0 < int(port) < 65536:
            return None
    except ValueError:
        return None
    if key and len(key) != 40:
        return None
    return endpoint, (key.encode() if key else None)


def new_id():
    """A UUIDv7: 48 bits of Unix milliseconds, version 7, variant 10, random bits."""
    b = bytearray(int(time.time() * 1000).to_bytes(6, "big") + os.urandom(10))
    b[6] = 0x70 | (b[6] & 0x0F)
    b[8] = 0x80 | (b[8] & 0x3F)
    return bytes(b)


def id_of_key(public):
    """A secured node's id (section 10a): SHA-256 over a tag and its Z85 key's 32 bytes,
    the first 16 as a UUIDv8."""
    b = bytearray(hashlib.sha256(b"peerwire node id v1\x00" + z85.decode(public)).digest()[:16])
    b[6] = 0x80 | (b[6] & 0x0F)
    b[8] = 0x80 | (b[8] & 0x3F)
    return bytes(b)


def pack(value):
    return msgpack.packb(value, use_bin_type=True)


def unpack(data):
    # Strict: exactly one value (msgpack raises ExtraData on trailing bytes).
    return msgpack.unpackb(data, raw=False)


def v1():
    return {"major": 1, "minor": 0}


class Node:
    def __init__(self, name, cluster="default", host="127.0.0.1", keys=None):
        self.ctx = zmq.Context.instance()
        # Secured (section 10a): `keys` is (public, secret) in Z85, the id is the key's.
        self.keys = keys
        self.id = id_of_key(keys[0]) if keys else new_id()
        self.key_at = {}  # endpoint -> the Z85 key expected there (secured; never replaced)
        self.dial_key = {}  # endpoint -> the key its DEALER was made with
        if keys:
            # libzmq tells a server which key each connection proved only through ZAP:
            # this authenticator lets any key in and labels messages with it (User-Id).
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        self.name = name
        self.cluster = cluster
        self.host = host
        self.router = self.curve_server(self.ctx.socket(zmq.ROUTER))
        self.router_port = self.router.bind_to_random_port(f"tcp://{host}")
        # An XPUB is a PUB that also shows us the subscriptions it receives: that is
        # how a gatherer knows who listens (a peer's label, then its topics).
        self.pub = self.curve_server(self.ctx.socket(zmq.XPUB))
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub_port = self.pub.bind_to_random_port(f"tcp://{host}")
        self.subs = {}  # prefix subscribed on our PUB -> how many times
        # One SUB per publisher: what arrives on it is that publisher's (section 10a).
        self.sub_of = {}  # SUB socket -> the node id of the publisher it is connected to
        self.poller = zmq.Poller()
        for s in (self.router, self.pub):
            self.poller.register(s, zmq.POLLIN)
        self.methods, self.gathers = {}, {}  # target -> handler(value, header)
        self.revision = 1
        self.prefixes = []  # our SUB's subscriptions (besides the label)
        self.on_event = lambda topic, value, header: None
        self.peers = {}  # node id -> {"name", "endpoint", "catalog", "dealer"}
        self.dealers = {}  # ROUTER endpoint -> DEALER socket
        self.pub_endpoints = set()  # PUB endpoints our SUB is connected to
        self.pending = {}  # our request or gather id -> replies received
        self.monitors = {}  # monitor socket -> the endpoint of the DEALER it watches
        self.acked = set()  # endpoints whose current connection answered our HELLO
        self.retry = {}  # endpoint -> (when to send the HELLO again, the next gap)
        self.introduced = {}  # ROUTER identity -> the node id its HELLO gave
        self.seq = {}  # our topic -> last sequence number published
        self.stopped = False

    def curve_server(self, s):
        if self.keys:
            s.curve_publickey, s.curve_secretkey = self.keys
            s.curve_server = True
        return s

    def curve_client(self, s, endpoint):
        """CURVE options for a socket about to dial `endpoint`; False if no key is
        known there (a secured node dials only endpoints whose key it knows)."""
        if self.keys:
            if endpoint not in self.key_at:
                return False
            s.curve_publickey, s.curve_secretkey = self.keys
            s.curve_serverkey = self.key_at[endpoint]
        return True

    # --- envelopes -------------------------------------------------------------------
    def header(self, kind, target=None, cid=None, dl=None, seq=None):
        h = {"v": 1, "k": kind, "id": new_id(), "src": self.id}
        if target:
            h["tgt"] = target
        if cid:
            h["cid"] = cid
        if dl is not None:
            h["dl"] = dl
        if seq is not None:
            h["seq"] = seq
        return h

    def hello(self):
        return {
            "node_id": self.id, "name": self.name, "cluster": self.cluster,
            "host": self.host, "router_port": self.router_port, "pub_port": self.pub_port,
            "catalog": {"methods": {t: v1() for t in self.methods},
                        "gathers": {t: v1() for t in self.gathers},
                        "revision": self.revision},
            "peers": [p["endpoint"] + ("#" + self.key_at[p["endpoint"]].decode()
                                       if p["endpoint"] in self.key_at else "")
                      for p in self.peers.values()],
        }

    # --- membership ------------------------------------------------------------------
    def dial(self, entry):
        """A DEALER to a peer's ROUTER (`tcp://ip:port`, or with `#KEY` from a secured
        node); a HELLO goes first on each of its connections."""
        parsed = tcp_endpoint(entry)
        if parsed is None:
            return
        endpoint, key = parsed
        if key and endpoint not in self.key_at:  # named by others: never replaces one
            self.key_at[endpoint] = key
        if endpoint in self.dealers or endpoint == f"tcp://{self.host}:{self.router_port}":
            return
        if len(self.dealers) >= MAX_PEERS:
            return
        d = self.ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        try:
            ok = self.curve_client(d, endpoint)
        except zmq.ZMQError:  # a key that is not Z85
            ok = False
        if not ok:
            d.close()
            return
        self.dial_key[endpoint] = self.key_at.get(endpoint)
        # A HELLO is the first message on every connection, reconnections included: the
        # monitor says when one comes up (section 12).
        monitor = d.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.monitors[monitor] = endpoint
        self.poller.register(monitor, zmq.POLLIN)
        d.connect(endpoint)
        self.dealers[endpoint] = d
        self.poller.register(d, zmq.POLLIN)

    def learn(self, hello, source_host, key=None):
        """Records a peer from its HELLO (or HELLO-ACK): dial it, subscribe to its PUB,
        and follow its gossip. `source_host`: where the HELLO came from, for a peer that
        listens on an unspecified address; `key`: the key its connection proved."""
        if not isinstance(hello, dict):
            return
        if hello.get("cluster") != self.cluster or hello["node_id"] == self.id:
            return
        host = hello["host"] if hello["host"] not in ("0.0.0.0", "::") else source_host
        endpoint = f"tcp://{host}:{int(hello['router_port'])}"
        pub = f"tcp://{host}:{int(hello['pub_port'])}"
        if key and host == source_host:  # its own endpoints, at the address it speaks from
            # (Never replacing a key known there: the operator's, or one a connection
            # proved; a member on the same address must not take another's ports.)
            self.key_at.setdefault(endpoint, key)
            self.key_at.setdefault(pub, key)
            if self.key_at[endpoint] != key:
                return
        self.peers[hello["node_id"]] = {
            "name": hello["name"], "endpoint": endpoint, "catalog": hello["catalog"]}
        self.dial(endpoint)
        # Events on a SUB are the publisher's whose key it dialled (section 10a).
        publisher = id_of_key(self.key_at[pub]) if self.keys and pub in self.key_at else None
        if pub not in self.pub_endpoints and publisher in (None, hello["node_id"]):
            sub = self.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            if self.curve_client(sub, pub):
                for prefix in [LABEL_PREFIX + self.id] + [p.encode() for p in self.prefixes]:
                    sub.setsockopt(zmq.SUBSCRIBE, prefix)
                sub.connect(pub)
                self.pub_endpoints.add(pub)
                self.sub_of[sub] = hello["node_id"]
                self.poller.register(sub, zmq.POLLIN)
            else:
                sub.close()
        peers = hello.get("peers", [])
        for other in peers[:MAX_GOSSIP] if isinstance(peers, list) else []:
            self.dial(other)

    def settled(self):
        """Every endpoint dialled has answered our HELLO (gossip may name more)."""
        return set(self.dealers) <= self.acked

    def on_monitor(self, monitor):
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        endpoint = self.monitors[monitor]
        if event["event"] == zmq.EVENT_CONNECTED:
            self.acked.discard(endpoint)
            self.send_hello(endpoint)
            self.retry[endpoint] = (time.monotonic() + 1.0, 2.0)
        else:
            self.acked.discard(endpoint)
            self.retry.pop(endpoint, None)

    def send_hello(self, endpoint):
        self.dealers[endpoint].send_multipart([pack(self.header(HELLO)), pack(self.hello())])

    def retry_hellos(self):
        """No HELLO-ACK yet on a connection: the HELLO again after 1, 2, 4, 8, 16 s."""
        now = time.monotonic()
        for endpoint, (at, gap) in list(self.retry.items()):
            if endpoint in self.acked or gap > 16:
                self.retry.pop(endpoint)
            elif now >= at:
                self.send_hello(endpoint)
                self.retry[endpoint] = (now + gap, gap * 2)

    def dealer_of(self, node_id):
        peer = self.peers.get(node_id)
        return self.dealers.get(peer["endpoint"]) if peer else None

    def serving(self, target, kind="methods"):
        """Peers whose catalog lists `target` and that we have a DEALER to."""
        return [i for i, p in self.peers.items()
                if target in p["catalog"].get(kind, {}) and p["endpoint"] in self.dealers]

    # --- what we serve and publish ----------------------------------------------------
    def handle(self, target, fn):
        self.methods[target] = fn
        self.revision += 1

    def handle_gather(self, topic, fn):
        # A responder subscribes to the gather topics it serves.
        self.gathers[topic] = fn
        self.revision += 1
        self.subscribe(topic)

    def subscribe(self, prefix):
        self.prefixes.append(prefix)
        for sub in self.sub_of:
            sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    def publish(self, topic, value):
        self.seq[topic] = self.seq.get(topic, 0) + 1
        h = self.header(EVENT, target=topic, seq=self.seq[topic])
        self.pub.send_multipart([topic.encode(), pack(h), pack(value)])

    # --- calls ----------------------------------------------------------------------
    def request_async(self, target, value, timeout=2.0, notify=False):
        """Sends a request (or a notification) to one peer serving `target`; returns its
        id, for `reply`. Replies are matched by `cid`, so any number can be in flight."""
        candidates = self.serving(target)
        if not candidates:
            raise RuntimeError(f"no responder known for {target}")
        # Round robin over the peers serving it.
        self.turn = getattr(self, "turn", -1) + 1
        d = self.dealer_of(candidates[self.turn % len(candidates)])
        kind = NOTIFICATION if notify else REQUEST
        h = self.header(kind, target=target, dl=int(timeout * 1000))
        d.send_multipart([pack(h), pack(value)])
        if not notify:
            self.pending[h["id"]] = []
        return h["id"]

    def reply(self, request_id, timeout=2.0):
        """Waits for the reply to a request sent with `request_async`."""
        replies = self.run_until(lambda: self.pending[request_id], timeout)
        self.pending.pop(request_id, None)
        if not replies:
            raise TimeoutError(f"no reply within {timeout}s")
        kind, value = replies[0]
        if kind == ERROR_REPLY:
            raise RuntimeError(f"remote error {value['code']}: {value['message']}")
        return value

    def request(self, target, value, timeout=2.0, notify=False):
        request_id = self.request_async(target, value, timeout, notify)
        return None if notify else self.reply(request_id, timeout)

    def listening(self, node_id):
        """Whether that node's SUB is subscribed to our PUB (we saw its label)."""
        return self.subs.get(LABEL_PREFIX + node_id, 0) > 0

    def gather(self, topic, value, within=1.0):
        """Publishes a gather request; collects replies until `within` passes or every
        expected responder (it lists the topic and its SUB listens to us) answered."""
        expected = {i for i in self.serving(topic, "gathers") if self.listening(i)}
        h = self.header(GATHER_REQUEST, target=topic, dl=int(within * 1000))
        self.pending[h["id"]] = []
        self.pub.send_multipart([topic.encode(), pack(h), pack(value)])
        self.run_until(lambda: {s for s, _, _ in self.pending[h["id"]]} >= expected, within)
        return self.pending.pop(h["id"])

    # --- the loop -------------------------------------------------------------------
    def run_until(self, done, timeout):
        end = time.monotonic() + timeout
        while not done() and not self.stopped:
            left = end - time.monotonic()
            if left <= 0:
                break
            self.poll(min(left, 0.05))
        return done()

    def poll(self, timeout):
        self.retry_hellos()
        for sock, _ in self.poller.poll(int(timeout * 1000)):
            if sock in self.monitors:
                self.on_monitor(sock)
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                source = frames[-1].get("Peer-Address")
                # The key the connection proved (secured; set by the authenticator).
                proven = frames[-1].get("User-Id") if self.keys and sock is self.router else None
                frames = [f.bytes for f in frames]
                try:
                    if sock is self.router:
                        self.on_router(frames[0], frames[1:], source, proven)
                    elif sock is self.pub:
                        self.on_subscription(frames[0])
                    elif sock in self.sub_of:
                        self.on_sub(frames, self.sub_of[sock])
                    else:
                        self.on_dealer(sock, frames, source)
                except Exception as e:  # a peer's bad input is dropped, never fatal
                    print(json.dumps({"dropped": repr(e)}), file=sys.stderr)

    def on_router(self, identity, frames, source, proven=None):
        if len(frames) != 2:
            return
        h, payload = unpack(frames[0]), frames[1]
        reply = lambda kind, value: self.router.send_multipart(
            [identity, pack(self.header(kind, cid=h["id"])), pack(value)])
        k = h.get("k")
        if h.get("v") != 1:
            if k == REQUEST:
                reply(ERROR_REPLY, {"code": "unsupported_version", "message": "v1 only"})
            return
        if self.keys:
            # Secured: a connection speaks only for the node its key names (section 10a).
            sender = id_of_key(proven.encode()) if proven else None
            claimed = unpack(payload).get("node_id") if k == HELLO else h.get("src")
            if sender is None or claimed != sender:
                print(json.dumps({"refused": f"kind {k} in another node's name"}),
                      file=sys.stderr)
                if k == REQUEST:
                    reply(ERROR_REPLY, {"code": "bad_request",
                                        "message": "src is not the connection's node"})
                return
        if k == HELLO:
            hello = unpack(payload)
            if hello.get("cluster") != self.cluster:
                # Who we are and our cluster, nothing more.
                reply(HELLO_ACK, {"node_id": self.id, "cluster": self.cluster})
                return
            self.introduced[identity] = hello["node_id"]
            reply(HELLO_ACK, self.hello())
            self.learn(hello, source, proven.encode() if proven else None)
        elif k in (REQUEST, NOTIFICATION):
            fn = self.methods.get(h.get("tgt", ""))
            fail = lambda code, message: k == REQUEST and reply(
                ERROR_REPLY, {"code": code, "message": message})
            if fn is None:
                return fail("no_handler", f"no handler for {h.get('tgt')}")
            if h.get("ct", "application/msgpack") != "application/msgpack":
                return fail("bad_request", f"content type {h['ct']} is not supported")
            try:
                value = unpack(payload)
            except (ValueError, msgpack.ExtraData) as e:
                return fail("bad_request", f"payload does not decode: {e}")
            try:
                out = fn(value, h)
                if k == REQUEST:
                    reply(REPLY, out)
            except Exception as e:  # a handler's failure is an error reply
                fail("handler_failed", str(e))
        elif k in (GATHER_REPLY, ERROR_REPLY):
            # Only from a connection that introduced itself as the sender.
            if h.get("cid") in self.pending and self.introduced.get(identity) == h.get("src"):
                self.pending[h["cid"]].append((h["src"], k, unpack(payload)))
        elif k not in (REPLY, HELLO_ACK, EVENT, GATHER_REQUEST, 10):  # 10: cancel
            reply(ERROR_REPLY, {"code": "unsupported_kind", "message": f"kind {k}"})

    def on_subscription(self, frame):
        # XPUB: 1 then the prefix for a subscription, 0 then the prefix for a cancel.
        if frame[:1] in (b"\x01", b"\x00"):
            prefix = frame[1:]
            n = self.subs.get(prefix, 0) + (1 if frame[0] else -1)
            if n > 0:
                self.subs[prefix] = n
            else:
                self.subs.pop(prefix, None)

    def on_dealer(self, sock, frames, source):
        if len(frames) != 2:
            return
        h, payload = unpack(frames[0]), frames[1]
        if h["k"] == HELLO_ACK:
            endpoint = next(e for e, d in self.dealers.items() if d is sock)
            hello, key = unpack(payload), self.dial_key.get(endpoint)
            if self.keys and (not isinstance(hello, dict) or key is None
                              or hello.get("node_id") != id_of_key(key)):
                return  # the ACK must carry the id of the key we dialled (section 10a)
            self.acked.add(endpoint)
            self.learn(hello, source, key)
        elif h["k"] in (REPLY, ERROR_REPLY) and h.get("cid") in self.pending:
            self.pending[h["cid"]].append((h["k"], unpack(payload)))

    def on_sub(self, frames, publisher):
        if len(frames) != 3:
            return
        topic, h, payload = frames[0].decode(), unpack(frames[1]), frames[2]
        if h.get("src") != publisher:
            return  # not in the name of the publisher this SUB is connected to
        if h["k"] == EVENT:
            self.on_event(topic, unpack(payload), h)
        elif h["k"] == GATHER_REQUEST and h["src"] != self.id:
            fn = self.gathers.get(topic)
            d = self.dealer_of(h["src"])
            if fn is None or d is None:
                return  # not ours to answer, or a gatherer we do not know
            d.send_multipart([pack(self.header(GATHER_REPLY, cid=h["id"])),
                              pack(fn(unpack(payload), h))])


def emit(**fields):
    print(json.dumps(fields), flush=True)


def demo(node, seed, call, notify, gather):
    node.handle("py.greet", lambda who, h: f"hello {who}, from {node.name}")
    node.handle("py.log", lambda v, h: emit(event="notified", value=v))
    node.handle("py.stop", lambda v, h: setattr(node, "stopped", True))
    node.handle_gather("py.ping", lambda v, h: {"node": node.name})
    node.subscribe("rust.events.")
    node.on_event = lambda topic, value, h: emit(
        event="event", topic=topic, value=value, seq=h.get("seq"))
    node.dial(seed)
    endpoint = f"tcp://{node.host}:{node.router_port}"
    if node.keys:
        endpoint += "#" + node.keys[0].decode()
    emit(event="started", id=node.id.hex(), endpoint=endpoint)
    node.run_until(lambda: node.settled() and node.serving(call), 10)
    emit(event="joined", peers=sorted(p["name"] for p in node.peers.values()))
    if node.serving(call):
        emit(event="call", reply=node.request(call, {"from": node.name, "n": 7}))
        # Asynchronous: three in flight at once, replies taken in any order.
        ids = [node.request_async(call, {"n": n}) for n in range(3)]
        emit(event="async", replies=[node.reply(i) for i in reversed(ids)])
    if node.serving(notify):
        node.request(notify, {"from": node.name}, notify=True)
        emit(event="notify", target=notify)
    if node.serving(gather, "gathers"):
        # Every node serving the topic listens to our PUB once it has our HELLO.
        node.run_until(lambda: all(node.listening(i) for i in node.serving(gather, "gathers")), 10)
        replies = node.gather(gather, {}, within=2.0)
        emit(event="gather", replies=sorted(
            v.get("node", "?") for _, k, v in replies if k == GATHER_REPLY and isinstance(v, dict)))
    next_tick = time.monotonic()
    while not node.stopped:
        if time.monotonic() >= next_tick:
            node.publish("py.events.tick", {"at": time.time()})
            next_tick += 0.2
        node.poll(0.05)
    emit(event="stopped")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", required=True, help="a peer's ROUTER endpoint, tcp://host:port")
    p.add_argument("--name", default="py")
    p.add_argument("--cluster", default="default")
    p.add_argument("--call", default="rust.echo", help="a method to call once known")
    p.add_argument("--notify", default="rust.note", help="a method to notify once known")
    p.add_argument("--gather", default="rust.ping", help="a gather topic to ask once known")
    p.add_argument("--secure", action="store_true", help="CURVE with a key pair for this run")
    p.add_argument("--key", help="CURVE with the key pair of this secret certificate")
    args = p.parse_args()
    keys = None
    if args.key:
        keys = zmq.auth.load_certificate(args.key)
        if keys[1] is None:
            raise SystemExit(f"--key {args.key}: a public certificate, not a secret one")
    elif args.secure:
        keys = zmq.curve_keypair()
    node = Node(args.name, args.cluster, keys=keys)
    try:
        demo(node, args.seed, args.call, args.notify, args.gather)
    except KeyboardInterrupt:
        pass
    finally:
        if node.keys:
            node.auth.stop()


if __name__ == "__main__":
    main()
