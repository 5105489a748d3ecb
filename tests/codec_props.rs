//! Property tests for the ZMTP frame codec: round trips and arbitrary input.

use bytes::{Bytes, BytesMut};
use peerwire::transport::wire::{encode_message, Command, DecodeLimits, Decoded, Decoder};
use peerwire::transport::Message;
use proptest::prelude::*;

fn limits() -> DecodeLimits {
    DecodeLimits {
        max_frame_size: 1 << 20,
        max_message_size: 4 << 20,
        max_frames: 64,
    }
}

fn frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..=255),
        proptest::collection::vec(any::<u8>(), 256..3000),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    proptest::collection::vec(frame(), 1..8)
        .prop_map(|fs| Message::from_frames(fs.into_iter().map(Bytes::from).collect()))
}

fn command() -> impl Strategy<Value = Command> {
    let bytes16 = proptest::collection::vec(any::<u8>(), 0..=16).prop_map(Bytes::from);
    let topic = proptest::collection::vec(any::<u8>(), 0..100).prop_map(Bytes::from);
    prop_oneof![
        (any::<u16>(), bytes16.clone())
            .prop_map(|(ttl_ds, context)| Command::Ping { ttl_ds, context }),
        bytes16.prop_map(Command::Pong),
        topic.clone().prop_map(Command::Subscribe),
        topic.prop_map(Command::Cancel),
        "[ -~]{0,100}".prop_map(Command::Error),
        proptest::collection::vec(
            (
                "[A-Za-z0-9-]{1,20}",
                proptest::collection::vec(any::<u8>(), 0..50)
            ),
            0..5
        )
        .prop_map(|ps| Command::Ready(ps.into_iter().map(|(k, v)| (k, Bytes::from(v))).collect())),
    ]
}

/// Feeds `bytes` to a decoder in chunks of the given sizes, collecting what it yields.
fn decode_in_chunks(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Decoded>, String> {
    let mut d = Decoder::new(limits());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut cuts = cuts.iter().cycle();
    while pos < bytes.len() {
        let n = (*cuts.next().unwrap()).clamp(1, bytes.len() - pos);
        buf.extend_from_slice(&bytes[pos..pos + n]);
        pos += n;
        while let Some(item) = d.decode(&mut buf).map_err(|e| e.to_string())? {
            out.push(item);
        }
    }
    if !buf.is_empty() {
        return Err(format!("{} bytes left over", buf.len()));
    }
    Ok(out)
}

proptest! {
    #[test]
    fn messages_round_trip(msgs in proptest::collection::vec(message(), 1..6),
                           cuts in proptest::collection::vec(1usize..700, 1..10)) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode_message(m, &mut wire);
        }
        let got = decode_in_chunks(&wire, &cuts).unwrap();
        let expected: Vec<Decoded> = msgs.into_iter().map(Decoded::Message).collect();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn commands_round_trip(cmds in proptest::collection::vec(command(), 1..6),
                           cuts in proptest::collection::vec(1usize..50, 1..10)) {
        let mut wire = BytesMut::new();
        for c in &cmds {
            c.encode(&mut wire);
        }
        let got = decode_in_chunks(&wire, &cuts).unwrap();
        let expected: Vec<Decoded> = cmds.into_iter().map(Decoded::Command).collect();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                                    cuts in proptest::collection::vec(1usize..300, 1..10)) {
        // Either an error or some items; never a panic, and no item over the limits.
        if let Ok(items) = decode_in_chunks(&bytes, &cuts) {
            for item in items {
                if let Decoded::Message(m) = item {
                    prop_assert!(m.len() <= limits().max_frames);
                    prop_assert!(m.byte_len() <= limits().max_message_size);
                }
            }
        }
    }
}

mod envelopes {
    use peerwire::codec::{decode_header, encode_header, Envelope, Header, Id, Kind, Version};
    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = Header> {
        (
            1u8..=9,
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            "[a-z.]{0,30}",
            proptest::option::of(any::<u64>()),
            proptest::collection::btree_map("[a-z-]{1,10}", "[ -~]{0,20}", 0..4),
            proptest::option::of("[a-z0-9]{1,10}"),
            any::<u64>(),
            proptest::option::of((any::<u16>(), any::<u16>())),
        )
            .prop_map(|(k, id, cid, tgt, dl, h, sk, seq, mv)| {
                let mut hd = Header::new(Kind::from_code(k), Id(uuid::Uuid::from_bytes(id)), tgt);
                hd.correlation_id = Id(uuid::Uuid::from_bytes(cid));
                hd.deadline_ms = dl;
                hd.headers = h;
                hd.shard_key = sk;
                hd.seq = seq;
                hd.method_version = mv.map(|(a, b)| Version::new(a, b));
                hd
            })
    }

    proptest! {
        #[test]
        fn headers_round_trip(h in header()) {
            prop_assert_eq!(decode_header(&encode_header(&h)).unwrap(), h);
        }

        #[test]
        fn arbitrary_envelopes_never_panic(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..4)) {
            let frames: Vec<bytes::Bytes> = frames.into_iter().map(bytes::Bytes::from).collect();
            let _ = Envelope::from_frames(&frames);
            let _ = Envelope::from_pub_frames(&frames);
            if let Some(f) = frames.first() {
                let _ = decode_header(f);
            }
        }
    }
}

mod curve {
    use super::*;
    use peerwire::transport::curve::{ClientHandshake, CurveKeys, CurveReader, ServerHandshake};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Arbitrary bytes as any CURVE handshake command, at any step, or as boxed
        /// frames after it: refused, never a panic, never accepted.
        #[test]
        fn forged_curve_traffic_is_refused(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
            prop_assert!(ServerHandshake::new(&server).hello(&data).is_err());
            let mut c = ClientHandshake::new(&client, server.public()).unwrap();
            let mut s = ServerHandshake::new(&server);
            let welcome = s.hello(&c.hello()).unwrap();
            prop_assert!(s.initiate(&data).is_err());
            prop_assert!(ClientHandshake::new(&client, server.public()).unwrap().welcome(&data).is_err());
            c.welcome(&welcome).unwrap();
            prop_assert!(ClientHandshake::new(&client, server.public()).unwrap().ready(&data).is_err());
            let (who, _) = s.initiate(&c.initiate(b"").unwrap()).unwrap();
            let (_, session) = s.ready(b"", who).unwrap();
            let (_, opener) = session.split();
            let mut r = CurveReader::new(opener, 1 << 16, 16);
            let mut d = Decoder::new(DecodeLimits {
                max_frame_size: (1 << 16) + 33,
                max_message_size: (1 << 16) + 33,
                max_frames: 1,
            });
            let mut buf = BytesMut::from(&data[..]);
            prop_assert!(!matches!(r.decode(&mut d, &mut buf), Ok(Some(_))));
        }
    }
}
