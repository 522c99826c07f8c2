//! Coalesced acknowledgements for one consuming channel.
//!
//! Every `basic.ack` is a command in a quorum queue's Raft log. Acked one by one, they cost the
//! broker (and lapin's I/O thread) more than everything else enrichd asks of it: on the
//! benchmark host a bare consumer read about 28,000 messages/s with one ack each and 107,000
//! with one `multiple` ack per 32. So a settled delivery is not acked at once. Its ack waits
//! until every delivery below it has settled, and one `multiple` ack then covers them all.
//!
//! A `multiple` ack settles *every* unacked delivery up to its tag. So it is sent only for a
//! tag below the lowest delivery still outstanding: in flight, being dead-lettered, or left
//! unsettled for redelivery. An ack that has waited [`HOLD`] while an older delivery is still
//! outstanding is sent on its own. A slow delivery (store outage, ack deadline) then never
//! holds the prefetch window shut.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

/// Longest an ack waits for the deliveries below it before it is sent on its own.
pub const HOLD: Duration = Duration::from_millis(50);

/// What to send now: at most one `multiple` ack and any number of single ones.
#[derive(Debug, PartialEq, Eq)]
pub struct AckRound<T> {
    /// The highest settled delivery below every outstanding one, acked with `multiple`.
    pub multiple: Option<T>,
    /// How many deliveries that `multiple` ack settles.
    pub covered: usize,
    /// Deliveries acked one by one, because an older delivery held them back too long.
    pub singles: Vec<T>,
}

impl<T> AckRound<T> {
    /// Whether this round sends nothing.
    pub fn is_empty(&self) -> bool {
        self.multiple.is_none() && self.singles.is_empty()
    }
}

/// The acks of one channel (`T` is the handle that sends one, lapin's `Acker`).
#[derive(Debug)]
pub struct AckBatcher<T> {
    /// Delivered and not settled yet; a `multiple` ack must stay below the first of these.
    outstanding: BTreeSet<u64>,
    /// Settled as "ack", not sent yet, with the time each became ready.
    ready: BTreeMap<u64, (T, Instant)>,
}

impl<T> Default for AckBatcher<T> {
    fn default() -> Self {
        Self {
            outstanding: BTreeSet::new(),
            ready: BTreeMap::new(),
        }
    }
}

impl<T> AckBatcher<T> {
    /// A delivery arrived.
    pub fn delivered(&mut self, tag: u64) {
        self.outstanding.insert(tag);
    }

    /// Its state is durable: ack it.
    pub fn ready(&mut self, tag: u64, acker: T, now: Instant) {
        self.outstanding.remove(&tag);
        self.ready.insert(tag, (acker, now));
    }

    /// It was settled another way (dead-lettered and acked on its own).
    pub fn settled_elsewhere(&mut self, tag: u64) {
        self.outstanding.remove(&tag);
    }

    // A delivery left unsettled for redelivery is never removed from `outstanding`: no
    // `multiple` ack may cover it.

    /// When the oldest held-back ack is due to go out on its own.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.ready.values().map(|(_, at)| *at + HOLD).min()
    }

    /// The acks to send at `now`: every ready one below the first outstanding delivery under
    /// one `multiple` ack; ready ones above it only once they have waited [`HOLD`] (or at
    /// once with `flush`, when no more deliveries will settle in this session).
    pub fn take(&mut self, now: Instant, flush: bool) -> AckRound<T> {
        let floor = self.outstanding.first().copied().unwrap_or(u64::MAX);
        let above = self.ready.split_off(&floor);
        let below = std::mem::replace(&mut self.ready, above);
        let covered = below.len();
        let multiple = below.into_values().next_back().map(|(acker, _)| acker);
        let singles = self
            .ready
            .extract_if(.., |_, (_, at)| flush || now >= *at + HOLD)
            .map(|(_, (acker, _))| acker)
            .collect();
        AckRound {
            multiple,
            covered,
            singles,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batcher(tags: &[u64]) -> AckBatcher<u64> {
        let mut acks = AckBatcher::default();
        for tag in tags {
            acks.delivered(*tag);
        }
        acks
    }

    #[test]
    fn settled_deliveries_in_order_go_out_as_one_multiple_ack() {
        let now = Instant::now();
        let mut acks = batcher(&[1, 2, 3]);
        for tag in [1, 2, 3] {
            acks.ready(tag, tag, now);
        }
        let round = acks.take(now, false);
        assert_eq!(round.multiple, Some(3));
        assert_eq!(round.covered, 3);
        assert!(round.singles.is_empty());
        assert!(acks.take(now, false).is_empty());
    }

    #[test]
    fn a_multiple_ack_never_covers_an_outstanding_delivery() {
        let now = Instant::now();
        let mut acks = batcher(&[1, 2, 3, 4]);
        acks.ready(1, 1, now);
        acks.ready(3, 3, now);
        acks.ready(4, 4, now);
        let round = acks.take(now, false);
        assert_eq!((round.multiple, round.covered), (Some(1), 1));
        assert!(round.singles.is_empty(), "3 and 4 wait for 2");
        acks.ready(2, 2, now);
        let round = acks.take(now, false);
        assert_eq!((round.multiple, round.covered), (Some(4), 3));
    }

    #[test]
    fn an_ack_held_back_too_long_goes_out_on_its_own() {
        let start = Instant::now();
        let mut acks = batcher(&[1, 2, 3]);
        acks.ready(2, 2, start);
        acks.ready(3, 3, start + Duration::from_millis(10));
        assert_eq!(acks.next_deadline(), Some(start + HOLD));
        let round = acks.take(start + HOLD, false);
        assert_eq!(round.multiple, None);
        assert_eq!(round.singles, vec![2]);
        assert_eq!(
            acks.next_deadline(),
            Some(start + Duration::from_millis(10) + HOLD)
        );
    }

    #[test]
    fn unsettled_and_dead_lettered_deliveries_bound_the_multiple_ack() {
        let now = Instant::now();
        let mut acks = batcher(&[1, 2, 3, 4]);
        // 1 is dead-lettered (acked on its own), 2 is left for redelivery: never settled here.
        acks.settled_elsewhere(1);
        acks.ready(3, 3, now);
        acks.ready(4, 4, now);
        let round = acks.take(now, true);
        assert_eq!(round.multiple, None, "a multiple ack would settle 2");
        assert_eq!(round.singles, vec![3, 4]);
    }

    #[test]
    fn nothing_ready_sends_nothing() {
        let mut acks = batcher(&[1]);
        assert!(acks.take(Instant::now(), true).is_empty());
        assert_eq!(acks.next_deadline(), None);
    }
}
