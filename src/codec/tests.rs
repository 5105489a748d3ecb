//! Unit tests of the codec.
use super::*;

#[test]
fn header_round_trip_all_fields() {
    let mut h = Header::new(Kind::Request, Id::new(), "orders.create");
    h.correlation_id = Id::new();
    h.deadline_ms = Some(1500);
    h.content_type = Some("application/json".into());
    h.headers
        .insert("traceparent".into(), "00-abc-def-01".into());
    h.shard_key = Some("customer-42".into());
    h.seq = 7;
    h.method_version = Some(Version::new(1, 2));
    h.message_type = Some(MessageType::Event);
    let b = encode_header(&h);
    assert_eq!(decode_header(&b).unwrap(), h);
}

#[test]
fn unknown_fields_are_ignored_and_unknown_kinds_kept() {
    #[derive(Serialize)]
    struct Newer<'a> {
        v: u8,
        k: u8,
        id: serde_bytes_16,
        src: serde_bytes_16,
        tgt: &'a str,
        future_field: Vec<u32>,
    }
    #[allow(non_camel_case_types)]
    struct serde_bytes_16([u8; 16]);
    impl Serialize for serde_bytes_16 {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }
    let b = rmp_serde::to_vec_named(&Newer {
        v: 1,
        k: 42,
        id: serde_bytes_16([1; 16]),
        src: serde_bytes_16([2; 16]),
        tgt: "x.y",
        future_field: vec![1, 2, 3],
    })
    .unwrap();
    let h = decode_header(&b).unwrap();
    assert_eq!(h.kind, Kind::Unknown(42));
    assert_eq!(h.target, "x.y");
    assert_eq!(h.id.0.as_bytes(), &[1; 16]);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for g in [
        &b""[..],
        b"\xc1",
        b"\x81\xa1v\xcc",
        b"\x93\x01\x02\x03",
        b"\xff\xff",
    ] {
        let _ = decode_header(g);
    }
    assert!(decode_header(b"\xc1").is_err());
}

#[test]
fn hand_written_encoding_matches_serde_both_ways() {
    let mut full = Header::new(Kind::Request, Id::new(), "orders.create");
    full.correlation_id = Id::new();
    full.deadline_ms = Some(70_000);
    full.content_type = Some("application/json".into());
    full.headers
        .insert("traceparent".into(), "00-abc-def-01".into());
    full.headers.insert("b".into(), "x".repeat(300));
    full.shard_key = Some("k".into());
    full.seq = u64::MAX;
    full.method_version = Some(Version::new(300, 2));
    full.message_type = Some(MessageType::Document);
    let minimal = Header::new(Kind::Event, Id::new(), "");
    for h in [full, minimal] {
        let ours = encode_header(&h);
        let theirs = rmp_serde::to_vec_named(&h).unwrap();
        assert_eq!(&ours[..], &theirs[..]);
        let back: Header = rmp_serde::from_slice(&ours).unwrap();
        assert_eq!(back, h);
        assert_eq!(decode_header(&theirs).unwrap(), h);
    }
}

#[test]
fn decoder_accepts_other_writers_forms() {
    // Positional struct (array) for the version, and an id as an integer array.
    #[derive(Serialize)]
    struct Alt {
        v: u8,
        k: u8,
        id: Vec<u8>,
        src: Vec<u8>,
        mv: (u16, u16),
        extra: BTreeMap<String, Vec<Option<f64>>>,
    }
    let b = rmp_serde::to_vec_named(&Alt {
        v: 1,
        k: 1,
        id: vec![7; 16],
        src: vec![8; 16],
        mv: (2, 3),
        extra: [("x".to_string(), vec![None, Some(1.5)])].into(),
    })
    .unwrap();
    let h = decode_header(&b).unwrap();
    assert_eq!(h.id.0.as_bytes(), &[7; 16]);
    assert_eq!(h.method_version, Some(Version::new(2, 3)));
}

#[test]
fn lying_lengths_are_refused_without_allocating() {
    // A map claiming 4 billion entries, an unknown key whose array claims as much.
    assert!(decode_header(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
    let mut b = vec![0x81, 0xa1, b'z', 0xdd, 0xff, 0xff, 0xff, 0xff];
    assert!(decode_header(&b).is_err());
    // Deep nesting in an unknown value.
    b = vec![0x81, 0xa1, b'z'];
    b.extend(std::iter::repeat_n(0x91, 10_000));
    b.push(0xc0);
    assert!(decode_header(&b).is_err());
}

#[test]
fn header_size_and_string_headers_are_capped() {
    let mut h = Header::new(Kind::Request, Id::new(), "t");
    for i in 0..65 {
        h.headers.insert(format!("k{i}"), "v".into());
    }
    assert!(decode_header(&encode_header(&h)).is_err());
    h.headers.clear();
    h.target = "x".repeat(70 * 1024);
    assert!(decode_header(&encode_header(&h)).is_err());
}

#[test]
fn versions() {
    assert!(Version::new(1, 3).serves(Version::new(1, 2)));
    assert!(!Version::new(1, 1).serves(Version::new(1, 2)));
    assert!(!Version::new(2, 0).serves(Version::new(1, 0)));
}

#[test]
fn message_types_default_by_kind_and_unknown_codes_read_as_absent() {
    let mut h = Header::new(Kind::Notification, Id::new(), "orders.created");
    assert_eq!(h.effective_type(), Some(MessageType::Command));
    h.message_type = Some(MessageType::Event);
    let b = encode_header(&h);
    let back = decode_header(&b).unwrap();
    assert_eq!(back.message_type, Some(MessageType::Event));
    assert_eq!(back.effective_type(), Some(MessageType::Event));
    for (kind, t) in [
        (Kind::Request, Some(MessageType::Command)),
        (Kind::GatherRequest, Some(MessageType::Command)),
        (Kind::Reply, Some(MessageType::Document)),
        (Kind::GatherReply, Some(MessageType::Document)),
        (Kind::Event, Some(MessageType::Event)),
        (Kind::Hello, None),
        (Kind::Cancel, None),
    ] {
        assert_eq!(
            Header::new(kind, Id::NIL, "").effective_type(),
            t,
            "{kind:?}"
        );
    }
    // A code from a newer sender: the kind's default, by both decoders.
    #[derive(Serialize)]
    struct Newer {
        v: u8,
        k: u8,
        #[serde(with = "serde_bytes16")]
        id: [u8; 16],
        mt: u8,
    }
    mod serde_bytes16 {
        pub fn serialize<S: serde::Serializer>(b: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
    }
    let b = rmp_serde::to_vec_named(&Newer {
        v: 1,
        k: 4,
        id: [7; 16],
        mt: 200,
    })
    .unwrap();
    let h = decode_header(&b).unwrap();
    assert_eq!(h.message_type, None);
    assert_eq!(h.effective_type(), Some(MessageType::Command));
    let by_serde: Header = rmp_serde::from_slice(&b).unwrap();
    assert_eq!(by_serde.message_type, None);
    for t in [
        MessageType::Command,
        MessageType::Event,
        MessageType::Document,
    ] {
        assert_eq!(MessageType::from_code(t.code() as u64), Some(t));
    }
}
