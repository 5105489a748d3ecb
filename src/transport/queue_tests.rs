//! Unit tests of `queue.rs`.
use super::*;

#[test]
fn a_shared_budget_bounds_the_total_and_comes_back() {
    let budget = std::sync::Arc::new(Budget::new(10));
    let a: Queue<Vec<u8>> = Queue::with_budget(100, 100, budget.clone());
    let b: Queue<Vec<u8>> = Queue::with_budget(100, 100, budget.clone());
    assert!(a.try_push(vec![0; 6]).is_ok());
    assert!(b.try_push(vec![0; 6]).is_ok()); // soft by one item, as the bounds are
    let (_, u) = b.try_push(vec![0; 1]).unwrap_err();
    assert!(u.over_budget);
    assert_eq!(budget.used(), 12);
    a.try_pop().unwrap();
    assert!(b.try_push(vec![0; 1]).is_ok());
    let mut taken = VecDeque::new();
    b.take_all(&mut taken);
    b.release(1, 6);
    assert_eq!(budget.used(), 1);
    drop(b); // one byte still counted: given back with the queue
    assert_eq!(budget.used(), 0);
}

impl Cost for Vec<u8> {
    fn cost(&self) -> (usize, usize) {
        (1, self.len())
    }
}

#[test]
fn a_drained_queue_gives_its_burst_capacity_back() {
    let q: Queue<Vec<u8>> = Queue::new(100_000, 1 << 30);
    for _ in 0..10_000 {
        q.try_push(vec![1]).unwrap();
    }
    while q.try_pop().is_some() {}
    assert!(q.state.lock().items.capacity() <= KEEP_CAPACITY);
    for _ in 0..10_000 {
        q.try_push(vec![1]).unwrap();
    }
    let mut taken = VecDeque::new();
    q.take_all(&mut taken);
    assert!(q.state.lock().items.capacity() <= KEEP_CAPACITY);
    taken.clear();
    shrink_if_empty(&mut taken);
    assert!(taken.capacity() <= KEEP_CAPACITY);
}

#[test]
fn bounded_in_items_and_bytes() {
    let q: Queue<Vec<u8>> = Queue::new(3, 10);
    assert!(q.try_push(vec![0; 6]).is_ok());
    assert!(
        q.try_push(vec![0; 6]).is_ok(),
        "under the byte bound: accepted"
    );
    assert!(
        q.try_push(vec![0; 1]).is_err(),
        "at the byte bound: refused"
    );
    assert_eq!(q.try_pop().unwrap().len(), 6);
    assert!(q.try_push(vec![]).is_ok());
    assert!(q.try_push(vec![]).is_ok());
    assert!(q.try_push(vec![]).is_err(), "item bound");
    assert_eq!(
        q.usage(),
        Usage {
            count: 3,
            bytes: 6,
            over_budget: false
        }
    );
}

#[test]
fn oversized_item_accepted_only_alone() {
    let q: Queue<Vec<u8>> = Queue::new(10, 10);
    assert!(q.try_push(vec![0; 50]).is_ok());
    assert!(q.try_push(vec![0; 1]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_receivers_get_every_item_once() {
    let q = std::sync::Arc::new(Queue::<Vec<u8>>::new(100_000, 1 << 30));
    let mut rx = Vec::new();
    for _ in 0..3 {
        let q = q.clone();
        rx.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(v) = q.pop().await {
                got.push(u32::from_le_bytes(v[..4].try_into().unwrap()));
            }
            got
        }));
    }
    for i in 0..20_000u32 {
        q.try_push(i.to_le_bytes().to_vec()).unwrap();
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Wait until drained, then close so the receivers finish.
    while q.usage().count > 0 {
        tokio::task::yield_now().await;
    }
    q.close();
    let mut all = Vec::new();
    for r in rx {
        all.extend(
            tokio::time::timeout(std::time::Duration::from_secs(10), r)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    all.sort();
    assert_eq!(all, (0..20_000).collect::<Vec<_>>());
}

#[tokio::test]
async fn writable_waits_exactly_while_push_would_fail() {
    let q = std::sync::Arc::new(Queue::<Vec<u8>>::new(10, 1000));
    for _ in 0..3 {
        q.try_push(vec![0; 400]).unwrap();
    }
    assert!(q.try_push(vec![0; 400]).is_err());
    let q2 = q.clone();
    let waiter = tokio::spawn(async move { q2.writable().await });
    tokio::task::yield_now().await;
    assert!(
        !waiter.is_finished(),
        "full queue: the waiter must sleep, not spin"
    );
    q.try_pop().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(q.try_push(vec![0; 400]).is_ok());
}

#[test]
fn take_all_holds_cost_until_release() {
    let q: Queue<Vec<u8>> = Queue::new(2, 100);
    q.try_push(vec![1]).unwrap();
    q.try_push(vec![2]).unwrap();
    let mut held = VecDeque::new();
    q.take_all(&mut held);
    assert!(q.try_push(vec![3]).is_err());
    q.requeue_front(held.drain(..));
    assert_eq!(q.try_pop(), Some(vec![1]));
    q.release(0, 0);
    assert!(q.try_push(vec![3]).is_ok());
}

/// A sender that writes a message itself first asks `is_idle_and_open`: whenever it says
/// yes, an empty queue's push would have been taken too (so nothing bypasses a bound), and
/// it says no whenever the queue holds items.
#[test]
fn idle_and_open_only_where_a_push_would_be_taken() {
    let budget = std::sync::Arc::new(Budget::new(10));
    // Spends the budget for the last case (alive until the end of the test).
    let spender: Queue<Vec<u8>> = Queue::with_budget(10, 100, budget.clone());
    spender.try_push(vec![0; 10]).unwrap();
    let cases: Vec<(&str, Queue<Vec<u8>>)> = vec![
        ("open", Queue::new(10, 100)),
        ("no items allowed", Queue::new(0, 100)),
        ("no bytes allowed", Queue::new(10, 0)),
        ("closed", {
            let q = Queue::new(10, 100);
            q.close();
            q
        }),
        ("budget spent", Queue::with_budget(10, 100, budget.clone())),
    ];
    for (what, q) in cases {
        let idle = q.is_idle_and_open();
        let taken = q.try_push(vec![1]).is_ok();
        assert_eq!(idle, taken, "{what}: idle {idle}, push taken {taken}");
        if taken {
            assert!(!q.is_idle_and_open(), "{what}: an item waits");
        }
    }
}
