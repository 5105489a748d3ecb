//! Prints an annotated-ready hex dump of one envelope of each kind, as PROTOCOL.md shows.
//!
//! Run: `cargo run --example envelope_hex`

use peerwire::codec::{self, Envelope, ErrorBody, Header, Hello, Id, Kind, Version};
use uuid::Uuid;

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    // Fixed ids so the dump is reproducible.
    let id = Id(Uuid::from_bytes([
        0x01, 0x9a, 0xd0, 0x6b, 0x3c, 0x10, 0x7e, 0x11, 0x8f, 0x00, 0, 0, 0, 0, 0, 0x01,
    ]));
    let cid = Id(Uuid::from_bytes([
        0x01, 0x9a, 0xd0, 0x6b, 0x3c, 0x0f, 0x7e, 0x11, 0x8f, 0x00, 0, 0, 0, 0, 0, 0x02,
    ]));
    let src = Id(Uuid::from_bytes([
        0x01, 0x9a, 0xd0, 0x6a, 0x00, 0x00, 0x70, 0x00, 0x80, 0x00, 0, 0, 0, 0, 0, 0xaa,
    ]));
    let mk = |kind: Kind, target: &str| {
        let mut h = Header::new(kind, src, target);
        h.id = id;
        h
    };
    let mut req = mk(Kind::Request, "orders.create");
    req.deadline_ms = Some(5000);
    req.method_version = Some(Version::new(1, 0));
    // Replies name what they answer by correlation id alone: no target.
    let mut reply = mk(Kind::Reply, "");
    reply.correlation_id = cid;
    let mut err = mk(Kind::ErrorReply, "");
    err.correlation_id = cid;
    let note = mk(Kind::Notification, "mail.send");
    let mut event = mk(Kind::Event, "stock.low");
    event.seq = 3;
    let mut greq = mk(Kind::GatherRequest, "stock.check");
    greq.deadline_ms = Some(300);
    let mut grep = mk(Kind::GatherReply, "");
    grep.correlation_id = cid;
    let hello = mk(Kind::Hello, "");
    let mut cancel = mk(Kind::Cancel, "");
    cancel.correlation_id = cid;
    let cases: Vec<(Header, Vec<u8>)> = vec![
        (
            req,
            codec::encode_payload(&serde_json_like()).unwrap().to_vec(),
        ),
        (reply, codec::encode_payload(&42u32).unwrap().to_vec()),
        (
            err,
            codec::encode_payload(&ErrorBody {
                code: "invalid_qty".into(),
                message: "quantity must be positive".into(),
            })
            .unwrap()
            .to_vec(),
        ),
        (note, codec::encode_payload("hi").unwrap().to_vec()),
        (event, codec::encode_payload(&3u8).unwrap().to_vec()),
        (greq, codec::encode_payload("book").unwrap().to_vec()),
        (grep, codec::encode_payload(&7u8).unwrap().to_vec()),
        (
            hello,
            codec::encode_payload(&Hello {
                node_id: src,
                name: "a".into(),
                cluster: "default".into(),
                host: "127.0.0.1".into(),
                router_port: 5555,
                pub_port: 5556,
                ..Default::default()
            })
            .unwrap()
            .to_vec(),
        ),
        (cancel, Vec::new()),
    ];
    for (h, payload) in cases {
        let env = Envelope {
            header: h.clone(),
            payload: payload.into(),
        };
        let frames = if matches!(h.kind, Kind::Event | Kind::GatherRequest) {
            env.to_pub_frames()
        } else {
            env.to_frames()
        };
        println!("{:?}:", h.kind);
        for (i, f) in frames.iter().enumerate() {
            println!("  frame {i} ({} bytes): {}", f.len(), hex(f));
        }
    }
}

#[derive(serde::Serialize)]
struct CreateOrder {
    item: &'static str,
    qty: u32,
}

fn serde_json_like() -> CreateOrder {
    CreateOrder {
        item: "book",
        qty: 2,
    }
}
