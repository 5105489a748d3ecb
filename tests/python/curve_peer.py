"""A libzmq peer using CURVE, for tests/curve.rs: each mode prints JSON lines.

  curve_peer.py echo-server            ROUTER, CURVE server: prints {"port", "public"},
                                       echoes every message until one is b"bye"
  curve_peer.py dealer PORT SERVERKEY  DEALER, CURVE client (heartbeats on): prints
                                       {"public"}, sends [a, bc] twice, 1 s apart, and
                                       prints each echo as {"echo": [...]}
  curve_peer.py sub PORT SERVERKEY TOPIC N
                                       SUB, CURVE client: prints {"public"}, then the first
                                       N events as {"event": [...]}
  curve_peer.py cluster-call PORT SECRETFILE TARGET
                                       DEALER, CURVE client of a cluster with a secret
                                       (PROTOCOL.md section 10a): derives the cluster key
                                       from the secret file, sends one peerwire request
                                       to TARGET (payload "hi") and prints {"reply": ...}
                                       or {"error": ...}
Keys are Z85 text, as zmq.curve_keypair() makes them.
"""
import hashlib
import json
import os
import sys
import time

import zmq
from zmq.utils import z85


def say(**kw):
    print(json.dumps(kw), flush=True)


def frames(msg):
    return [f.decode("utf-8", "replace") for f in msg]


def main():
    ctx = zmq.Context()
    mode = sys.argv[1]
    public, secret = zmq.curve_keypair()
    if mode == "echo-server":
        s = ctx.socket(zmq.ROUTER)
        s.curve_secretkey = secret
        s.curve_publickey = public
        s.curve_server = True
        port = s.bind_to_random_port("tcp://127.0.0.1")
        say(port=port, public=public.decode())
        while True:
            msg = s.recv_multipart()
            s.send_multipart(msg)
            if msg[1:] == [b"bye"]:
                break
    elif mode == "dealer":
        port, server = sys.argv[2], sys.argv[3]
        s = ctx.socket(zmq.DEALER)
        s.curve_serverkey = server.encode()
        s.curve_publickey = public
        s.curve_secretkey = secret
        # Heartbeats both ways: our PINGs and the node's go boxed.
        s.setsockopt(zmq.HEARTBEAT_IVL, 200)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
        s.rcvtimeo = 10000
        s.connect("tcp://127.0.0.1:%s" % port)
        say(public=public.decode())
        for _ in range(2):
            s.send_multipart([b"a", b"bc"])
            say(echo=frames(s.recv_multipart()))
            time.sleep(1)
    elif mode == "sub":
        port, server, topic, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        s = ctx.socket(zmq.SUB)
        s.curve_serverkey = server.encode()
        s.curve_publickey = public
        s.curve_secretkey = secret
        s.rcvtimeo = 10000
        s.setsockopt(zmq.SUBSCRIBE, topic.encode())
        s.connect("tcp://127.0.0.1:%s" % port)
        say(public=public.decode())
        for _ in range(n):
            say(event=frames(s.recv_multipart()))
    elif mode == "cluster-call":
        import msgpack
        port, secret_file, target = sys.argv[2], sys.argv[3], sys.argv[4]
        text = open(secret_file).read()
        raw = z85.decode(next(l.split('"')[1] for l in text.splitlines()
                              if l.startswith("secret")))
        cluster_secret = hashlib.sha256(b"peerwire cluster key v1\x00" + raw).digest()
        cluster_public = zmq.curve_public(z85.encode(cluster_secret))
        s = ctx.socket(zmq.DEALER)
        s.curve_serverkey = cluster_public
        s.curve_publickey = public
        s.curve_secretkey = secret
        s.rcvtimeo = 10000
        s.connect("tcp://127.0.0.1:%s" % port)
        # A plain client (PROTOCOL.md section 12) in its own key's name (section 10a).
        node_id = bytearray(hashlib.sha256(b"peerwire node id v1\x00" + z85.decode(public)).digest()[:16])
        node_id[6] = 0x80 | (node_id[6] & 0x0F)
        node_id[8] = 0x80 | (node_id[8] & 0x3F)
        msg_id = bytearray(int(time.time() * 1000).to_bytes(6, "big") + os.urandom(10))
        msg_id[6] = 0x70 | (msg_id[6] & 0x0F)
        msg_id[8] = 0x80 | (msg_id[8] & 0x3F)
        header = {"v": 1, "k": 1, "id": bytes(msg_id), "src": bytes(node_id), "tgt": target,
                  "dl": 5000}
        s.send_multipart([msgpack.packb(header), msgpack.packb("hi")])
        h, payload = s.recv_multipart()
        kind, value = msgpack.unpackb(h)["k"], msgpack.unpackb(payload)
        say(**({"reply": value} if kind == 2 else {"error": value}))
    else:
        raise SystemExit("unknown mode " + mode)
    s.close(linger=1000)
    ctx.term()


if __name__ == "__main__":
    main()
