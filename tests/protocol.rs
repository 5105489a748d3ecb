//! PROTOCOL.md's rules for what a node receives, checked with hand-built frames: the
//! content type, strict payloads, required header fields, and which malformed messages
//! are still answered (those whose `id` can be read).

mod support;

use bytes::Bytes;
use peerwire::codec::{self, codes, ErrorBody, Header, Id, Kind};
use peerwire::transport::{Dealer, Message};
use support::orders::*;
use support::*;

/// A MessagePack map header written by hand: `fields` are (key, already-encoded value).
fn header(fields: &[(&str, Vec<u8>)]) -> Bytes {
    let mut out = Vec::new();
    rmp::encode::write_map_len(&mut out, fields.len() as u32).unwrap();
    for (k, v) in fields {
        rmp::encode::write_str(&mut out, k).unwrap();
        out.extend_from_slice(v);
    }
    Bytes::from(out)
}

fn uint(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_uint(&mut out, n).unwrap();
    out
}

fn bin(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_bin(&mut out, b).unwrap();
    out
}

fn text(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_str(&mut out, s).unwrap();
    out
}

/// The next envelope the node sends back on `raw`.
async fn next_reply(raw: &Dealer) -> codec::Envelope {
    let reply = within("a reply", raw.recv()).await.unwrap();
    codec::Envelope::from_frames(reply.frames()).unwrap()
}

/// Checks that the next reply is `bad_request` to `id`, its message naming `what`.
async fn expect_bad_request(raw: &Dealer, id: Id, what: &str) {
    let body = error_reply(raw, id).await;
    assert_eq!(body.code, codes::BAD_REQUEST);
    assert!(body.message.contains(what), "{}", body.message);
}

/// The error reply to the request with `id`: its code and message.
async fn error_reply(raw: &Dealer, id: Id) -> ErrorBody {
    let env = next_reply(raw).await;
    assert_eq!(env.header.kind, Kind::ErrorReply);
    assert_eq!(
        env.header.correlation_id, id,
        "answered to the request's id"
    );
    codec::decode_payload(&env.payload).unwrap()
}

async fn send(raw: &Dealer, header: Bytes, payload: &[u8]) {
    raw.send(Message::from_frames(vec![
        header,
        Bytes::copy_from_slice(payload),
    ]))
    .await
    .unwrap();
}

fn request_fields(id: Id) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("v", uint(1)),
        ("k", uint(1)),
        ("id", bin(id.0.as_bytes())),
        ("tgt", text("echo.echo")),
    ]
}

#[tokio::test]
async fn payloads_are_decoded_strictly_and_only_as_msgpack() {
    init_tracing();
    let server = orders_server().await;
    server.handle(
        "echo.echo",
        V1,
        |v: serde_json::Value, _| async move { Ok(v) },
    );
    let raw = Dealer::connect(server.endpoint(), test_opts()).unwrap();

    // JSON said to be JSON: refused, naming the content type (it used to be decoded as
    // MessagePack from its first byte, the rest dropped, and came back as `{`).
    let id = Id::new();
    let mut f = request_fields(id);
    f.push(("ct", text("application/json")));
    send(&raw, header(&f), br#"{"j":1}"#).await;
    expect_bad_request(&raw, id, "application/json").await;

    // Text sent with no content type: `p` (0x70) is a whole MessagePack value, the
    // integer 112. The bytes after that first value are an error now, never dropped.
    let id = Id::new();
    send(&raw, header(&request_fields(id)), b"plain text").await;
    expect_bad_request(&raw, id, "after the MessagePack value").await;

    // MessagePack said to be MessagePack: served.
    let id = Id::new();
    let mut f = request_fields(id);
    f.push(("ct", text("application/msgpack")));
    send(&raw, header(&f), &codec::encode_payload(&5u8).unwrap()).await;
    let env = next_reply(&raw).await;
    assert_eq!(
        (env.header.kind, env.header.correlation_id),
        (Kind::Reply, id)
    );
    assert_eq!(codec::decode_payload::<u8>(&env.payload).unwrap(), 5);
    assert!(server.stats().malformed >= 1, "the JSON one is counted");
}

#[tokio::test]
async fn malformed_headers_are_answered_when_their_id_can_be_read() {
    init_tracing();
    let server = orders_server().await;
    server.handle(
        "echo.echo",
        V1,
        |v: serde_json::Value, _| async move { Ok(v) },
    );
    let raw = Dealer::connect(server.endpoint(), test_opts()).unwrap();
    let payload = codec::encode_payload(&1u8).unwrap();

    // A sender id of the wrong length: the request cannot be served, but it can be
    // answered (it used to be dropped, leaving the caller to time out).
    let id = Id::new();
    let mut f = request_fields(id);
    f.push(("src", bin(&[1, 2, 3, 4, 5, 6, 7, 8])));
    send(&raw, header(&f), &payload).await;
    expect_bad_request(&raw, id, "16 bytes").await;

    // A required field missing: answered too.
    let id = Id::new();
    let f: Vec<_> = request_fields(id)
        .into_iter()
        .filter(|(k, _)| *k != "k")
        .collect();
    send(&raw, header(&f), &payload).await;
    expect_bad_request(&raw, id, "`k`").await;

    // A kind of the wrong type after a good id: answered (the id was read).
    let id = Id::new();
    send(
        &raw,
        header(&[
            ("v", uint(1)),
            ("id", bin(id.0.as_bytes())),
            ("k", text("request")),
        ]),
        &payload,
    )
    .await;
    let body = error_reply(&raw, id).await;
    assert_eq!(body.code, codes::BAD_REQUEST);

    // Another major version: a notification is not answered (nothing but a request is).
    let mut h = Header::new(Kind::Notification, Id::new(), "echo.echo");
    h.version = 9;
    send(&raw, codec::encode_header(&h), &payload).await;

    // An id of the wrong length: nothing to answer to. Dropped and counted; the next
    // request's reply is the next thing on the connection.
    let before = server.stats().malformed;
    let mut f = request_fields(Id::new());
    f[2] = ("id", bin(&[9; 8]));
    send(&raw, header(&f), &payload).await;
    let good = Id::new();
    send(&raw, header(&request_fields(good)), &payload).await;
    let env = next_reply(&raw).await;
    assert_eq!(
        (env.header.kind, env.header.correlation_id),
        (Kind::Reply, good)
    );
    assert_eq!(server.stats().malformed, before + 1);

    // A notification with a bad field is never answered (notifications never are).
    let mut h = Header::new(Kind::Notification, Id::new(), "echo.echo");
    h.content_type = Some("text/plain".into());
    send(&raw, codec::encode_header(&h), b"hi").await;
    let good = Id::new();
    send(&raw, header(&request_fields(good)), &payload).await;
    let env = next_reply(&raw).await;
    assert_eq!(env.header.correlation_id, good);
}

#[tokio::test]
async fn a_subscriber_without_an_identity_is_known_by_its_label() {
    // libzmq never sends a SUB's identity: a node is known by the label its SUB
    // subscribes to, `\0peerwire.node:` and its id's 16 bytes.
    init_tracing();
    let publisher = start_node("pub", &[]).await;
    let mut sub = RawPeer::connect(addr_of(&publisher.pub_endpoint())).await;
    sub.handshake("SUB").await;
    let id = Id::new();
    let mut label = b"\x00peerwire.node:".to_vec();
    label.extend_from_slice(id.0.as_bytes());
    for prefix in [&label[..], b"news."] {
        sub.send_command(&peerwire::transport::wire::Command::Subscribe(
            Bytes::copy_from_slice(prefix),
        ))
        .await
        .unwrap();
    }
    wait_until("known by its label", || {
        publisher.subscribers_of("news.flash") == vec![id]
    })
    .await;
    assert!(publisher.subscribers_of("sports.").is_empty());
    // Topics cannot collide with labels.
    assert!(publisher.publish("\0peerwire.node:x", &1).is_err());
}
