//! The prefix filters a PUB keeps for each subscriber, and its labels.

use bytes::Bytes;
use parking_lot::RwLock;

use crate::transport::error::ProtocolViolation;

/// Prefix filters a PUB keeps for one subscriber (a multiset, as in ZeroMQ: subscribing
/// twice and cancelling once leaves the prefix subscribed).
///
/// Matching costs at most one lookup per distinct prefix length present (no more than the
/// topic's length), however many prefixes the subscriber holds: a subscriber with
/// thousands of prefixes must not make every publish slow for everyone.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    prefixes: RwLock<Prefixes>,
}

#[derive(Debug, Default)]
struct Prefixes {
    /// Each distinct prefix and how many times it is subscribed.
    counts: std::collections::HashMap<Bytes, u32>,
    /// How many distinct prefixes there are of each length.
    lengths: std::collections::BTreeMap<usize, u32>,
    /// Subscriptions held (with repeats) and their bytes, against the limits.
    held: usize,
    bytes: usize,
    /// The distinct prefixes that start with a zero byte: labels (see
    /// [`Subscriptions::labels`]). Also in `counts`: a label filters like any prefix.
    labels: Vec<Bytes>,
}

/// Up to this many distinct prefixes, matching compares each (cheaper than hashing).
const SCAN_UP_TO: usize = 8;

impl Subscriptions {
    /// Applies a SUBSCRIBE or CANCEL. Refuses to grow past `max` prefixes or
    /// `max_bytes` of them, so a subscriber cannot exhaust memory.
    pub fn apply(
        &self,
        subscribe: bool,
        topic: &[u8],
        max: usize,
        max_bytes: usize,
    ) -> Result<(), ProtocolViolation> {
        let mut p = self.prefixes.write();
        if subscribe {
            if p.held >= max || p.bytes + topic.len() > max_bytes {
                return Err(ProtocolViolation::TooManySubscriptions { max, max_bytes });
            }
            p.held += 1;
            p.bytes += topic.len();
            match p.counts.get_mut(topic) {
                Some(n) => *n += 1,
                None => {
                    // Copied: a slice would keep the connection's whole read buffer alive.
                    let topic = Bytes::copy_from_slice(topic);
                    if topic.first() == Some(&0) {
                        p.labels.push(topic.clone());
                    }
                    p.counts.insert(topic.clone(), 1);
                    *p.lengths.entry(topic.len()).or_default() += 1;
                }
            }
        } else if let Some(n) = p.counts.get_mut(topic) {
            *n -= 1;
            let gone = *n == 0;
            p.held -= 1;
            p.bytes -= topic.len();
            if gone {
                p.counts.remove(topic);
                p.labels.retain(|l| l != topic);
                if let Some(l) = p.lengths.get_mut(&topic.len()) {
                    *l -= 1;
                    if *l == 0 {
                        p.lengths.remove(&topic.len());
                    }
                }
            }
        }
        Ok(())
    }

    pub fn matches(&self, first_frame: &[u8]) -> bool {
        let p = self.prefixes.read();
        if p.counts.len() <= SCAN_UP_TO {
            return p.counts.keys().any(|k| first_frame.starts_with(k));
        }
        p.lengths
            .range(..=first_frame.len())
            .any(|(&len, _)| p.counts.contains_key(&first_frame[..len]))
    }

    /// The subscriber's labels: its subscriptions that start with a zero byte. No topic
    /// an application publishes starts with one, so a SUB can subscribe to such a prefix
    /// to say who it is, in a way every ZeroMQ library can (many never send a SUB's
    /// identity).
    pub fn labels(&self) -> Vec<Bytes> {
        self.prefixes.read().labels.clone()
    }

    pub fn list(&self) -> Vec<Bytes> {
        let p = self.prefixes.read();
        p.counts
            .iter()
            .flat_map(|(k, &n)| std::iter::repeat_n(k.clone(), n as usize))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_are_a_multiset_matched_by_prefix() {
        let s = Subscriptions::default();
        s.apply(true, b"news.", 100, 1000).unwrap();
        s.apply(true, b"news.", 100, 1000).unwrap();
        assert!(s.matches(b"news.flash"));
        s.apply(false, b"news.", 100, 1000).unwrap();
        assert!(s.matches(b"news.flash"), "subscribed twice, cancelled once");
        s.apply(false, b"news.", 100, 1000).unwrap();
        assert!(!s.matches(b"news.flash"));
        // Many prefixes (the indexed path): still exact.
        for i in 0..50 {
            s.apply(true, format!("t{i}.").as_bytes(), 100, 1000)
                .unwrap();
        }
        assert!(
            s.matches(b"t7.x") && s.matches(b"t49.") && !s.matches(b"t50.") && !s.matches(b"t")
        );
        s.apply(true, b"", 100, 1000).unwrap();
        assert!(s.matches(b"anything"), "the empty prefix matches all");
        assert_eq!(s.list().len(), 51);
        // Bounds: count and bytes, repeats included.
        assert!(s.apply(true, &[b'x'; 900], 100, 1000).is_err());
    }
}
