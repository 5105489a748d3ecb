//! Fuzzes the envelope decoders: the hand-written header decoder on arbitrary bytes, and
//! envelopes of two and three frames cut from the input. Nothing may panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use peerwire::codec::{decode_header, encode_header, Envelope};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = decode_header(data) {
        // Whatever decodes re-encodes and decodes to the same header.
        let again = decode_header(&encode_header(&h)).expect("re-encoded header decodes");
        assert_eq!(again, h);
    }
    let cut = data.first().copied().unwrap_or(0) as usize;
    let rest = data.get(1..).unwrap_or_default();
    let cut = cut.min(rest.len());
    let frames = [
        Bytes::copy_from_slice(&rest[..cut]),
        Bytes::copy_from_slice(&rest[cut..]),
    ];
    let _ = Envelope::from_frames(&frames);
    let three = [Bytes::from_static(b"topic"), frames[0].clone(), frames[1].clone()];
    let _ = Envelope::from_pub_frames(&three);
});
