//! The CURVE handshake and boxes, in memory.

use super::*;
use crate::transport::wire::DecodeLimits;

fn handshake() -> (CurveSession, CurveSession, [u8; 32], [u8; 32]) {
    let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
    let mut c = ClientHandshake::new(&client, server.public()).unwrap();
    let mut s = ServerHandshake::new(&server);
    let welcome = s.hello(&c.hello()).unwrap();
    c.welcome(&welcome).unwrap();
    let (who, meta) = s
        .initiate(&c.initiate(b"\x04Meta\0\0\0\x01x").unwrap())
        .unwrap();
    assert_eq!(who, client.public());
    assert_eq!(&meta[..], b"\x04Meta\0\0\0\x01x");
    let (ready, server_side) = s.ready(b"", who).unwrap();
    let (_, client_side) = c.ready(&ready).unwrap();
    (client_side, server_side, client.public(), server.public())
}

fn limits() -> DecodeLimits {
    DecodeLimits {
        max_frame_size: 1 << 20,
        max_message_size: 1 << 20,
        max_frames: 1,
    }
}

#[test]
fn a_handshake_proves_both_keys_and_frames_go_both_ways() {
    let (client, server, ck, sk) = handshake();
    assert_eq!((client.peer_key(), server.peer_key()), (sk, ck));
    let (mut seal, _) = client.split();
    let (_, open) = server.split();
    let mut wire = BytesMut::new();
    seal.seal_frame(&mut wire, true, b"header");
    seal.seal_frame(&mut wire, false, b"payload");
    seal.seal_command(&mut wire, &Command::Subscribe(Bytes::from_static(b"t")));
    let mut r = CurveReader::new(open, 1 << 20, 8);
    let mut dec = Decoder::new(limits());
    match r.decode(&mut dec, &mut wire).unwrap() {
        Some(Decoded::Message(m)) => assert_eq!(m.frames(), [&b"header"[..], b"payload"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.decode(&mut dec, &mut wire).unwrap(),
        Some(Decoded::Command(Command::Subscribe(Bytes::from_static(
            b"t"
        ))))
    );
    assert_eq!(r.decode(&mut dec, &mut wire).unwrap(), None);
}

#[test]
fn a_flipped_bit_a_replay_and_a_wrong_key_are_refused() {
    let (client, server, _, _) = handshake();
    let (mut seal, _) = client.split();
    let (_, open) = server.split();
    let mut r = CurveReader::new(open, 1 << 20, 8);
    let mut dec = Decoder::new(limits());
    let mut one = BytesMut::new();
    seal.seal_frame(&mut one, false, b"hello");
    // Any flipped bit in the box (past the frame header, the name and the nonce).
    // The reader is left as it was by a refusal, so the same one judges every copy
    // (and the untouched frame after them).
    for i in 2 + 16..one.len() {
        let mut bad = one.clone();
        bad[i] ^= 0x01;
        let mut fresh = Decoder::new(limits());
        assert!(r.decode(&mut fresh, &mut bad).is_err(), "byte {i}");
    }
    let mut again = one.clone();
    assert!(r.decode(&mut dec, &mut one).unwrap().is_some());
    // The same frame again: its nonce does not rise.
    assert_eq!(
        r.decode(&mut dec, &mut again),
        Err(ProtocolViolation::CurveNonce)
    );

    // A client that has another server key: the server cannot open its HELLO.
    let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
    let c = ClientHandshake::new(&client, CurveKeys::generate().public()).unwrap();
    let mut s = ServerHandshake::new(&server);
    assert!(matches!(
        s.hello(&c.hello()),
        Err(ProtocolViolation::CurveCrypto(_))
    ));
}

#[test]
fn truncated_and_replayed_handshake_commands_are_refused() {
    let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
    let mut c = ClientHandshake::new(&client, server.public()).unwrap();
    let mut s = ServerHandshake::new(&server);
    let hello = c.hello();
    for n in [0, 1, 6, 100, 199] {
        assert!(
            ServerHandshake::new(&server).hello(&hello[..n]).is_err(),
            "{n}"
        );
    }
    let welcome = s.hello(&hello).unwrap();
    for n in [0, 8, 100, 167] {
        assert!(c.welcome(&welcome[..n]).is_err(), "{n}");
    }
    c.welcome(&welcome).unwrap();
    let initiate = c.initiate(b"").unwrap();
    assert!(s.initiate(&initiate[..256]).is_err());
    // An INITIATE replayed on another connection: its cookie is not that one's.
    let mut other = ServerHandshake::new(&server);
    other
        .hello(
            &ClientHandshake::new(&client, server.public())
                .unwrap()
                .hello(),
        )
        .unwrap();
    assert!(other.initiate(&initiate).is_err());
    s.initiate(&initiate).unwrap();
}

#[test]
fn keys_read_and_write_as_z85() {
    let k = CurveKeys::generate();
    let text = encode_key(&k.public());
    assert_eq!(text.len(), 40);
    assert_eq!(decode_key(&text).unwrap(), k.public());
    assert_eq!(decode_key(&format!("{text}\0")).unwrap(), k.public());
    assert!(decode_key("too short").is_err());
    assert!(decode_key(&"~".repeat(40)).is_err());
    assert_eq!(CurveKeys::from_secret(*k.secret()).public(), k.public());
    // The rfc 32 test vector.
    let v = [0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B];
    assert_eq!(z85::encode(v), "HelloWorld");
}

#[test]
fn certificates_round_trip_and_guard_their_secret() {
    let dir = std::env::temp_dir().join(format!("pw-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = CurveKeys::generate();
    let (secret, public) = (dir.join("node.key_secret"), dir.join("node.key"));
    let _ = std::fs::remove_file(&secret);
    let _ = std::fs::remove_file(&public);
    write_certificate(&secret, &keys, true).unwrap();
    write_certificate(&public, &keys, false).unwrap();
    // Never overwritten.
    assert!(write_certificate(&secret, &CurveKeys::generate(), true).is_err());
    let s = read_certificate(&secret).unwrap();
    assert_eq!(s.public, keys.public());
    assert_eq!(s.keys.unwrap().secret(), keys.secret());
    let p = read_certificate(&public).unwrap();
    assert_eq!((p.public, p.keys.is_none()), (keys.public(), true));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_certificate(&secret).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn low_order_and_out_of_range_keys_are_refused() {
    let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
    // A server key of all zeros (a placeholder): the box would be under a key anyone
    // can compute.
    assert!(matches!(
        ClientHandshake::new(&client, [0; 32]),
        Err(ProtocolViolation::CurveCrypto(_))
    ));
    // A HELLO whose transient key is of low order (zero, or the point of order 1).
    for low in [[0u8; 32], {
        let mut one = [0u8; 32];
        one[0] = 1;
        one
    }] {
        let mut hello = ClientHandshake::new(&client, server.public())
            .unwrap()
            .hello()
            .to_vec();
        hello[80..112].copy_from_slice(&low);
        let e = ServerHandshake::new(&server).hello(&hello).unwrap_err();
        assert!(e.to_string().contains("low-order"), "{e}");
    }
    assert!(weak(
        client.secret_key(),
        &PublicKey::from({
            let mut k = [0u8; 32];
            k[0] = 1;
            k
        })
    ));
    assert!(!weak(client.secret_key(), server.public_key()));
}

#[test]
fn a_flipped_bit_anywhere_in_a_handshake_command_is_refused() {
    let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
    let flipped = |cmd: &[u8], i: usize| {
        let mut bad = cmd.to_vec();
        bad[i] ^= 0x01;
        bad
    };
    // HELLO: its version, C', nonce and box (the 72 bytes of padding are not checked,
    // by libzmq either).
    let hello = ClientHandshake::new(&client, server.public())
        .unwrap()
        .hello();
    for i in (0..8).chain(80..hello.len()) {
        assert!(
            ServerHandshake::new(&server)
                .hello(&flipped(&hello, i))
                .is_err(),
            "HELLO {i}"
        );
    }
    // WELCOME, INITIATE and READY: every byte.
    let fresh = || {
        let c = ClientHandshake::new(&client, server.public()).unwrap();
        let mut s = ServerHandshake::new(&server);
        let welcome = s.hello(&c.hello()).unwrap();
        (c, s, welcome)
    };
    let (_, _, welcome) = fresh();
    for i in 0..welcome.len() {
        let (mut c, _, _) = fresh();
        assert!(c.welcome(&flipped(&welcome, i)).is_err(), "WELCOME {i}");
    }
    let (mut c0, mut s0, welcome0) = fresh();
    c0.welcome(&welcome0).unwrap();
    let initiate = c0.initiate(b"").unwrap();
    for i in 0..initiate.len() {
        // The server's state is left as it was by a refusal: one judges every copy.
        assert!(s0.initiate(&flipped(&initiate, i)).is_err(), "INITIATE {i}");
    }
    let (who, _) = s0.initiate(&initiate).unwrap();
    let (ready, _) = s0.ready(b"", who).unwrap();
    for i in 0..ready.len() {
        let (mut c, mut s, welcome) = fresh();
        c.welcome(&welcome).unwrap();
        let (who, _) = s.initiate(&c.initiate(b"").unwrap()).unwrap();
        let (ready, _) = s.ready(b"", who).unwrap();
        assert!(c.ready(&flipped(&ready, i)).is_err(), "READY {i}");
    }
}

/// A cluster's handshake up to the server's READY: the server proves the cluster's
/// key, and `prover`'s own in the READY property. Returns the client's session and the
/// proof.
fn cluster_handshake(cluster: &CurveKeys, prover: &CurveKeys) -> (CurveSession, Bytes) {
    let client = CurveKeys::generate();
    let mut c = ClientHandshake::new(&client, cluster.public()).unwrap();
    let mut s = ServerHandshake::new(cluster);
    c.welcome(&s.hello(&c.hello()).unwrap()).unwrap();
    let (who, _) = s.initiate(&c.initiate(b"").unwrap()).unwrap();
    let proof = s.node_proof(prover).unwrap();
    let (ready, _) = s.ready(b"", who).unwrap();
    let (_, session) = c.ready(&ready).unwrap();
    (session, proof)
}

#[test]
fn a_cluster_server_proves_its_own_key_for_this_connection_only() {
    let (cluster, node) = (CurveKeys::generate(), CurveKeys::generate());
    let (mut session, proof) = cluster_handshake(&cluster, &node);
    // Before the proof, the server is only "a member".
    assert_eq!(session.peer_key(), cluster.public());
    assert_eq!(session.accept_node_proof(&proof).unwrap(), node.public());
    assert_eq!(session.peer_key(), node.public());

    // A proof made for another connection (a member replaying what the node sent it).
    let (mut other, _) = cluster_handshake(&cluster, &node);
    assert!(matches!(
        other.accept_node_proof(&proof),
        Err(ProtocolViolation::CurveCrypto(_))
    ));
    // Another key named in front of a valid box, each bit flipped, a short proof.
    let (mut session, proof) = cluster_handshake(&cluster, &node);
    let mut renamed = proof.to_vec();
    renamed[..32].copy_from_slice(&CurveKeys::generate().public());
    assert!(session.accept_node_proof(&renamed).is_err());
    for i in 0..proof.len() {
        let mut p = proof.to_vec();
        p[i] ^= 0x01;
        assert!(session.accept_node_proof(&p).is_err(), "bit flipped at {i}");
    }
    assert!(session
        .accept_node_proof(&proof[..proof.len() - 1])
        .is_err());
    assert!(session.accept_node_proof(&[0u8; NODE_PROOF_LEN]).is_err());
    // The failures left the session as it was; the real proof still holds.
    assert_eq!(session.peer_key(), cluster.public());
    assert_eq!(session.accept_node_proof(&proof).unwrap(), node.public());
}
