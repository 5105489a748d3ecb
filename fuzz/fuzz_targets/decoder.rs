//! Fuzzes the ZMTP decoder: the greeting checks, then the frame and command decoder fed
//! in chunks whose sizes come from the input itself. Nothing may panic, and nothing
//! decoded may exceed the limits.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use peerwire::transport::wire::{
    check_greeting_prefix, parse_greeting, DecodeLimits, Decoded, Decoder, GREETING_LEN,
};

fuzz_target!(|data: &[u8]| {
    if data.len() >= GREETING_LEN {
        let g: [u8; GREETING_LEN] = data[..GREETING_LEN].try_into().unwrap();
        let _ = check_greeting_prefix(&g);
        let _ = parse_greeting(&g);
    }
    let limits = DecodeLimits {
        max_frame_size: 4096,
        max_message_size: 16384,
        max_frames: 16,
    };
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = (chunk as usize).max(1);
    let mut d = Decoder::new(limits);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(Decoded::Message(m))) => {
                    assert!(m.len() <= limits.max_frames);
                    assert!(m.byte_len() <= limits.max_message_size);
                }
                Ok(Some(Decoded::Command(_))) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.wanted(buf.len()) <= 9 + limits.max_frame_size.max(65536));
    }
});
