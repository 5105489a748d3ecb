//! Fuzzes CURVE: arbitrary bytes as each handshake command (on both sides, at each step
//! of a real handshake) and as boxed frames after it. Nothing may panic; nothing forged
//! may be accepted.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use peerwire::transport::curve::{ClientHandshake, CurveKeys, CurveReader, ServerHandshake};
use peerwire::transport::wire::{DecodeLimits, Decoder};

fuzz_target!(|data: &[u8]| {
    let (server, client) = (CurveKeys::generate(), CurveKeys::generate());
    // As a HELLO, and as an INITIATE after a real HELLO.
    assert!(ServerHandshake::new(&server).hello(data).is_err() || data.len() == 200);
    let mut c = ClientHandshake::new(&client, server.public()).unwrap();
    let mut s = ServerHandshake::new(&server);
    let welcome = s.hello(&c.hello()).unwrap();
    assert!(s.initiate(data).is_err());
    // As a WELCOME, and as a READY after a real WELCOME.
    let _ = ClientHandshake::new(&client, server.public()).unwrap().welcome(data);
    c.welcome(&welcome).unwrap();
    assert!(ClientHandshake::new(&client, server.public()).unwrap().ready(data).is_err());
    // As boxed frames on an established session.
    let (who, _) = s.initiate(&c.initiate(b"").unwrap()).unwrap();
    let (_, session) = s.ready(b"", who).unwrap();
    let (_, opener) = session.split();
    let mut r = CurveReader::new(opener, 16384, 16);
    let limits = DecodeLimits {
        max_frame_size: 16384 + 33,
        max_message_size: 16384 + 33,
        max_frames: 1,
    };
    let mut d = Decoder::new(limits);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = r.decode(&mut d, &mut buf) {
        panic!("a forged frame was accepted");
    }
});
