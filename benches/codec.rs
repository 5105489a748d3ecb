//! Envelope header encode + decode (pure code, so criterion).
//! Run: `cargo bench --bench codec`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use peerwire::codec::{decode_header, encode_header, Header, Id, Kind, Version};

fn request_header() -> Header {
    let mut h = Header::new(Kind::Request, Id::new(), "orders.create");
    h.deadline_ms = Some(5000);
    h.method_version = Some(Version::new(1, 0));
    h
}

fn bench(c: &mut Criterion) {
    let h = request_header();
    let bytes = encode_header(&h);
    c.bench_function("header encode", |b| b.iter(|| encode_header(black_box(&h))));
    c.bench_function("header decode", |b| {
        b.iter(|| decode_header(black_box(&bytes)).unwrap())
    });
    c.bench_function("header encode+decode", |b| {
        b.iter(|| decode_header(&encode_header(black_box(&h))).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
