//! The "orders" service most node tests call: typed request and reply, and a handler
//! that can fail, panic or take its time on demand.

use std::time::Duration;

use peerwire::codec::Version;
use peerwire::node::{HandlerError, Node};
use serde::{Deserialize, Serialize};

use super::start_node;

/// The request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateOrder {
    pub item: String,
    pub qty: u32,
}

/// The reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCreated {
    pub id: u64,
    pub item: String,
}

/// Version 1.0.
pub const V1: Version = Version::new(1, 0);

/// An order of `qty` × `item`.
pub fn order(item: &str, qty: u32) -> CreateOrder {
    CreateOrder {
        item: item.into(),
        qty,
    }
}

/// A node serving `orders.create` at 1.2: `qty` 0 is refused, item `boom` panics, item
/// `slow` takes 3 s.
pub async fn orders_server() -> Node {
    let server = start_node("orders", &[]).await;
    server.handle(
        "orders.create",
        Version::new(1, 2),
        |req: CreateOrder, _ctx| async move {
            if req.qty == 0 {
                return Err(HandlerError::new(
                    "invalid_qty",
                    "quantity must be positive",
                ));
            }
            if req.item == "boom" {
                panic!("the handler exploded");
            }
            if req.item == "slow" {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Ok(OrderCreated {
                id: req.qty as u64 * 10,
                item: req.item,
            })
        },
    );
    server
}
