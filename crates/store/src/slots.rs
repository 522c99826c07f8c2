//! Rate slots leased from the store a few at a time.
//!
//! Every metered call needs a cluster-wide slot, and taking one is a write transaction on the
//! provider's limits row: at a high configured rate that round trip, not the limit, bounded a
//! backfill (535 addresses/s metered against 980 unmetered). So a replica takes the slots of
//! the next [`BLOCK_SPAN`] at once, in one transaction, and hands them out locally at their
//! times. The slots come off the one shared cursor (`next_slot_at`) like single ones, so the
//! cluster-wide rate holds exactly; what a replica does not use in time is given back with its
//! next block (the quota units, and the rate cursor when nobody reserved after it).
//!
//! At the default rates (2/s and less) a block is one slot, which is the old behaviour. A park
//! recorded elsewhere reaches a replica with its next block, within [`BLOCK_SPAN`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::ProviderId;
use enrichd_core::ports::Reservation;
use tokio::time::Instant;

/// How far ahead one block reaches.
pub(crate) const BLOCK_SPAN: Duration = Duration::from_millis(250);

/// The most slots one block holds, whatever the rate. At 10,000/s a block of 32 lasted 3 ms
/// and the reserving transactions queued behind SQLite's one writer; 256 last 25 ms.
const MAX_BLOCK: u32 = 256;

/// Slots per block at `rate_per_sec`: those of [`BLOCK_SPAN`], at least one.
pub(crate) fn block_size(rate_per_sec: f64) -> u32 {
    if !rate_per_sec.is_finite() || rate_per_sec <= 0.0 {
        return 1;
    }
    let slots = (rate_per_sec * BLOCK_SPAN.as_secs_f64()).floor();
    if slots >= f64::from(MAX_BLOCK) {
        MAX_BLOCK
    } else if slots >= 1.0 {
        // In range: checked above.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "1..32"
        )]
        let n = slots as u32;
        n
    } else {
        1
    }
}

/// One slot of a block: its time on the database clock, and the quota left after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) at: DateTime<Utc>,
    pub(crate) quota_remaining: Option<u32>,
}

/// Slots reserved and not handed out, to be given back with the next block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Unused {
    /// How many (each holds a unit of quota, when a quota applies).
    pub(crate) count: u32,
    /// The first of them still ahead when it was given up, if any.
    pub(crate) first_ahead: Option<DateTime<Utc>>,
    /// The limits row's `next_slot_at` right after the block was taken: the rate cursor is
    /// rewound only while it still stands there (nobody reserved after us).
    pub(crate) cursor_after: Option<DateTime<Utc>>,
    /// The quota day the block was taken in: units of a past day are not given back.
    pub(crate) quota_day: Option<String>,
}

/// A block being handed out.
#[derive(Debug)]
pub(crate) struct Block {
    slots: VecDeque<Slot>,
    /// The database clock when the block was taken, and the local instant of that moment.
    db_now: DateTime<Utc>,
    taken: Instant,
    /// Slots that passed unused.
    expired: u32,
    cursor_after: Option<DateTime<Utc>>,
    quota_day: Option<String>,
}

impl Block {
    pub(crate) fn new(
        slots: Vec<Slot>,
        db_now: DateTime<Utc>,
        cursor_after: Option<DateTime<Utc>>,
        quota_day: Option<String>,
    ) -> Self {
        Self {
            slots: slots.into(),
            db_now,
            taken: Instant::now(),
            expired: 0,
            cursor_after,
            quota_day,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.db_now + chrono::Duration::from_std(self.taken.elapsed()).unwrap_or_default()
    }

    /// The next slot not yet passed, as a grant; slots passed meanwhile are counted unused.
    /// A slot is never used late: calls closer than the rate's spacing would follow.
    fn take(&mut self) -> Option<Reservation> {
        let now = self.now();
        while let Some(slot) = self.slots.pop_front() {
            if slot.at < now {
                self.expired += 1;
                continue;
            }
            return Some(Reservation::Granted {
                wait: (slot.at - now).to_std().unwrap_or_default(),
                quota_remaining: slot.quota_remaining,
            });
        }
        None
    }

    fn into_unused(self) -> Unused {
        let now = self.now();
        Unused {
            count: self.expired + u32::try_from(self.slots.len()).unwrap_or(u32::MAX),
            first_ahead: self.slots.front().map(|s| s.at).filter(|at| *at >= now),
            cursor_after: self.cursor_after,
            quota_day: self.quota_day,
        }
    }
}

/// Each provider's current block, shared by the clones of one [`crate::Store`].
#[derive(Clone, Default)]
pub(crate) struct SlotBlocks {
    blocks: Arc<Mutex<HashMap<ProviderId, Block>>>,
    /// Blocks dropped early (a park), to be given back with the next block.
    dropped: Arc<Mutex<HashMap<ProviderId, Vec<Unused>>>>,
    /// One block is taken at a time per provider: calls that find none wait for it.
    turns: Arc<Mutex<HashMap<ProviderId, Arc<tokio::sync::Mutex<()>>>>>,
}

impl SlotBlocks {
    /// The next slot of `provider`'s block, when it has one left.
    pub(crate) fn take(&self, provider: ProviderId) -> Option<Reservation> {
        lock(&self.blocks).get_mut(&provider)?.take()
    }

    /// Ends `provider`'s block and returns what it, and any block dropped before it, did not
    /// hand out.
    pub(crate) fn end(&self, provider: ProviderId) -> Vec<Unused> {
        let mut unused = lock(&self.dropped).remove(&provider).unwrap_or_default();
        unused.extend(lock(&self.blocks).remove(&provider).map(Block::into_unused));
        unused
    }

    /// Stops handing out `provider`'s block (it was parked); its slots are given back with
    /// the next block.
    pub(crate) fn drop_block(&self, provider: ProviderId) {
        if let Some(block) = lock(&self.blocks).remove(&provider) {
            lock(&self.dropped)
                .entry(provider)
                .or_default()
                .push(block.into_unused());
        }
    }

    /// Makes `block` the one `provider` hands out from.
    pub(crate) fn start(&self, provider: ProviderId, block: Block) {
        lock(&self.blocks).insert(provider, block);
    }

    /// Ends every provider's block (shutdown): what each did not hand out, by provider.
    pub(crate) fn end_all(&self) -> BTreeMap<ProviderId, Vec<Unused>> {
        let providers: Vec<ProviderId> = {
            let blocks = lock(&self.blocks);
            let dropped = lock(&self.dropped);
            let mut all: Vec<ProviderId> = blocks.keys().chain(dropped.keys()).copied().collect();
            all.sort_unstable();
            all.dedup();
            all
        };
        providers
            .into_iter()
            .map(|p| (p, self.end(p)))
            .filter(|(_, unused)| !unused.is_empty())
            .collect()
    }

    /// The lock a caller holds while it takes a new block for `provider`.
    pub(crate) fn turn(&self, provider: ProviderId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.turns).entry(provider).or_default())
    }
}

/// Locks, ignoring poisoning: every critical section here leaves the map consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_holds_the_slots_of_a_quarter_second_within_bounds() {
        assert_eq!(block_size(0.0), 1);
        assert_eq!(block_size(1.0 / 1.5), 1);
        assert_eq!(block_size(2.0), 1);
        assert_eq!(block_size(8.0), 2);
        assert_eq!(block_size(100.0), 25);
        assert_eq!(block_size(1_000.0), 250);
        assert_eq!(block_size(10_000.0), MAX_BLOCK);
        assert_eq!(block_size(f64::NAN), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_handed_out_at_their_times_and_never_late() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let ms = chrono::Duration::milliseconds;
        let slots: Vec<Slot> = (0..4)
            .map(|i| Slot {
                at: t0 + ms(10 * i),
                quota_remaining: Some(u32::try_from(99 - i).unwrap()),
            })
            .collect();
        let mut block = Block::new(slots, t0, Some(t0 + ms(40)), Some("day".into()));
        assert_eq!(
            block.take(),
            Some(Reservation::Granted {
                wait: Duration::ZERO,
                quota_remaining: Some(99)
            })
        );
        assert_eq!(
            block.take(),
            Some(Reservation::Granted {
                wait: Duration::from_millis(10),
                quota_remaining: Some(98)
            })
        );
        // 25 ms later the slot at 20 ms has passed: it is skipped, not used late.
        tokio::time::advance(Duration::from_millis(25)).await;
        assert_eq!(
            block.take(),
            Some(Reservation::Granted {
                wait: Duration::from_millis(5),
                quota_remaining: Some(96)
            })
        );
        assert_eq!(block.take(), None);
        let unused = block.into_unused();
        assert_eq!(unused.count, 1, "the skipped one");
        assert_eq!(unused.first_ahead, None);
        assert_eq!(unused.cursor_after, Some(t0 + ms(40)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_block_gives_back_what_is_still_ahead() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let ms = chrono::Duration::milliseconds;
        let slots = (0..3)
            .map(|i| Slot {
                at: t0 + ms(100 * i),
                quota_remaining: None,
            })
            .collect();
        let blocks = SlotBlocks::default();
        blocks.start(
            ProviderId::Abuseipdb,
            Block::new(slots, t0, Some(t0 + ms(300)), None),
        );
        assert!(blocks.take(ProviderId::Abuseipdb).is_some());
        blocks.drop_block(ProviderId::Abuseipdb);
        assert!(
            blocks.take(ProviderId::Abuseipdb).is_none(),
            "parked: no more"
        );
        let unused = blocks.end(ProviderId::Abuseipdb);
        assert_eq!(unused.len(), 1);
        assert_eq!(unused[0].count, 2);
        assert_eq!(unused[0].first_ahead, Some(t0 + ms(100)));
        assert!(
            blocks.end(ProviderId::Abuseipdb).is_empty(),
            "given back once"
        );
    }
}
