//! A ROUTER that echoes, and a DEALER that sends it a multipart message, on loopback.
//!
//! Run: `cargo run --example echo`

use anyhow::Result;
use bytes::Bytes;
use peerwire::transport::{Dealer, Message, Router, SocketOptions};

#[tokio::main]
async fn main() -> Result<()> {
    let router = Router::bind("tcp://127.0.0.1:0", SocketOptions::default()).await?;
    let endpoint = format!("tcp://{}", router.local_addr());
    println!("ROUTER bound at {endpoint}");

    let server = tokio::spawn(async move {
        while let Ok((identity, msg)) = router.recv().await {
            println!("ROUTER got {} frame(s); echoing", msg.len());
            if router.send(&identity, msg).await.is_err() {
                break;
            }
        }
    });

    let dealer = Dealer::connect(&endpoint, SocketOptions::default())?;
    let msg = Message::from_frames(vec![
        Bytes::from_static(b"header"),
        Bytes::new(),
        Bytes::from_static(b"payload"),
    ]);
    dealer.send(msg.clone()).await?;
    let reply = dealer.recv().await?;
    assert_eq!(reply, msg);
    println!("DEALER got the echo: {:?}", reply.frames());
    dealer.close().await;
    server.abort();
    Ok(())
}
