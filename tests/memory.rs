//! What a listening socket keeps after large messages: measured on the heap, alone in
//! this test binary (a separate process), so that no other test's allocations blur it.

mod support;

use bytes::Bytes;
use peerwire::transport::{Dealer, Router};
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[tokio::test]
async fn idle_connections_keep_nothing_of_the_large_messages_they_sent() {
    // Sixty peers each sending one 4 MB message and then staying connected held 273 MiB:
    // each connection's read buffer still pointed into the allocation its message came
    // in. Now an emptied buffer is replaced by a small one.
    init_tracing();
    let router = Router::bind("tcp://127.0.0.1:0", test_opts())
        .await
        .unwrap();
    let heap0 = heap_bytes();
    let mut peers = Vec::new();
    for _ in 0..40 {
        let d = Dealer::connect(ep(router.local_addr()), test_opts()).unwrap();
        d.send(Bytes::from(vec![3u8; 4 << 20]).into())
            .await
            .unwrap();
        peers.push(d);
    }
    for _ in 0..40 {
        let (_, m) = within("a large message", router.recv()).await.unwrap();
        assert_eq!(m.byte_len(), 4 << 20);
    }
    // Every message is taken and dropped; the connections stay up, idle.
    assert_eq!(router.peers().len(), 40);
    let grown_mib = heap_bytes().saturating_sub(heap0) >> 20;
    eprintln!("40 idle connections hold {grown_mib} MiB");
    assert!(grown_mib < 64, "40 idle connections hold {grown_mib} MiB");
}
