//! The vocabulary of an enrichment job, shared by the actors and the adapters: its id, where
//! a request came from, why a provider was not asked, a provider's answer with the slot it
//! holds, and why a request could not be made durable. The actor messages themselves live in
//! `enrichd_runtime::messages`; this crate stays free of actix.

use std::fmt;

use chrono::{DateTime, Utc};

use crate::ProviderReport;

/// One enrichment of one address; ties log lines and messages together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobId(pub uuid::Uuid);

impl JobId {
    /// A fresh, random job id.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.simple().fmt(f)
    }
}

/// An AMQP delivery tag on the consuming channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryTag(pub u64);

/// Where an enrichment request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A bus delivery: the event is recorded (attacker rows found or created) first.
    Bus(DeliveryTag),
    /// The backfill loop: the address comes from stored attacker rows.
    Backfill,
    /// `enrichd lookup`: never creates attacker rows; `refresh` asks again even when fresh.
    Lookup {
        /// Claim everything not leased elsewhere, not only what is due.
        refresh: bool,
    },
}

/// Why a provider actor did not call its provider. The work stays due and its per-IP
/// backoff does not advance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProviderUnavailable {
    /// Parked for a rate limit until this time.
    #[error("parked until {0}")]
    Parked(DateTime<Utc>),
    /// The cluster-wide rate has no slot for this call before this time (further ahead than
    /// a call may wait).
    #[error("no rate slot before {0}")]
    NoSlotUntil(DateTime<Utc>),
    /// Parked because the configured key was rejected.
    #[error("api key rejected")]
    KeyRejected,
    /// The circuit breaker is open.
    #[error("circuit breaker open")]
    BreakerOpen,
    /// Bulk data (Feodo) is older than the staleness limit.
    #[error("data stale")]
    Stale,
    /// The actor's mailbox is gone or it did not answer in time.
    #[error("provider actor unreachable")]
    Unreachable,
}

impl ProviderUnavailable {
    /// When the provider may have a slot again, for the waits that end at a known time.
    pub fn resumes_at(self) -> Option<DateTime<Utc>> {
        match self {
            Self::Parked(at) | Self::NoSlotUntil(at) => Some(at),
            Self::KeyRejected | Self::BreakerOpen | Self::Stale | Self::Unreachable => None,
        }
    }

    /// The state a person is shown for it (`enrichd lookup`, `provider_outcomes` there).
    pub fn label(self) -> &'static str {
        match self {
            Self::Parked(_) | Self::NoSlotUntil(_) => "rate_limited",
            Self::KeyRejected => "key_rejected",
            Self::BreakerOpen => "breaker_open",
            Self::Stale => "stale",
            Self::Unreachable => "unreachable",
        }
    }
}

/// Holds a provider's concurrency slot while it exists. A provider actor with a daily quota
/// hands one out with every answer from a call, and the job drops it once the answer is
/// durable: answers paid for but not yet written then never outnumber the provider's
/// concurrency, which is what a crash can waste of the day's quota.
pub struct CallSlot(Option<Box<dyn Send + Sync>>);

impl CallSlot {
    /// Holds `guard` (a semaphore permit) until this slot is dropped.
    pub fn holding(guard: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(guard)))
    }

    /// A slot that holds nothing: the answer cost no call, or nothing a crash could waste.
    pub fn free() -> Self {
        Self(None)
    }

    /// Whether it holds a provider's slot.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for CallSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "CallSlot(held)"
        } else {
            "CallSlot(free)"
        })
    }
}

/// A provider's report and the concurrency slot its call took (see [`CallSlot`]).
#[derive(Debug)]
pub struct ProviderAnswer {
    /// The report.
    pub report: ProviderReport,
    /// Released when dropped.
    pub slot: CallSlot,
}

impl ProviderAnswer {
    /// An answer that cost no call (skipped, quota spent): nothing to hold.
    pub fn free(report: ProviderReport) -> Self {
        Self {
            report,
            slot: CallSlot::free(),
        }
    }
}

impl std::ops::Deref for ProviderAnswer {
    type Target = ProviderReport;

    fn deref(&self) -> &ProviderReport {
        &self.report
    }
}

/// Answers compare by report: the slot is a resource, not a value.
impl PartialEq for ProviderAnswer {
    fn eq(&self, other: &Self) -> bool {
        self.report == other.report
    }
}

/// Why a request could not be made durable, as the bus needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// The store is unreachable or busy: keep the delivery unacked (intake pauses) and retry;
    /// never dead-letter.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the write for good: the bus dead-letters the delivery
    /// (`store rejected`), and the answers of the pass, if any, are stored as `error`s with
    /// backoff so they are not asked again at once.
    #[error("write rejected: {0}")]
    Rejected(String),
}
