//! Feodo Tracker IP blocklist: a bulk feed, `GET {base}/downloads/ipblocklist.json`, kept as
//! a local index; lookups never touch the network (SPEC §7).
//!
//! Refresh is pull-driven: [`Feodo::ensure_fresh`] (which the actor calls before each lookup
//! through [`ProviderHooks::availability`]) downloads the feed when it is due, conditionally
//! (`If-None-Match` / `If-Modified-Since`; a 304 keeps the index). One refresh runs at a
//! time; while the current data is usable, lookups never wait for it. A failed refresh keeps
//! the last good index and is retried with backoff (1 min doubling up to the refresh
//! interval), never per lookup. Data not confirmed within `max_age` makes the provider
//! [`Availability::Stale`], which the actor reports as unavailable (due work waits) rather
//! than an error per address.

mod index;

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use enrichd_core::outcome::doubling;
use enrichd_core::ports::IntelProvider;
use enrichd_core::{
    CanonicalIp, ProviderError, ProviderFields, ProviderId, ProviderOutcome, ProviderReport,
    Verdict,
};
use reqwest::header::HeaderValue;
use tokio::time::Instant;

pub use index::{FeodoIndex, Listing};

use crate::client::{HttpClient, key_header};
use crate::config::{BuildError, FeodoConfig};
use crate::hooks::{Availability, Observed, ProviderHooks};
use crate::json;

/// First retry delay after a failed refresh.
const RETRY_BASE: Duration = Duration::from_secs(60);

/// Why a feed refresh failed. The last good index is kept in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The download failed (transport, timeout, body over the cap).
    #[error("feed download failed")]
    Http(#[source] ProviderError),
    /// The server answered with an unusable status.
    #[error("feed answered http status {0}")]
    Status(u16),
    /// The body is not JSON.
    #[error("feed is not valid json: {0}")]
    Decode(String),
    /// The body is JSON but not an array.
    #[error("feed is not a list (got {0})")]
    NotAList(&'static str),
}

/// What a successful refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A new index was swapped in.
    Updated {
        /// Listed addresses in the new index.
        addresses: usize,
    },
    /// 304: the index is current.
    NotModified,
}

/// The data lookups read: swapped whole, so a lookup sees one consistent index.
#[derive(Debug, Default)]
struct Snapshot {
    index: Arc<FeodoIndex>,
    /// When the server last confirmed this data (200 or 304); `None` before the first load.
    confirmed_at: Option<Instant>,
}

/// Refresh bookkeeping, owned by whoever holds the refresh lock.
#[derive(Debug, Default)]
struct Schedule {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
    /// `None`: due now.
    next_attempt: Option<Instant>,
    failures: u32,
}

/// The Feodo provider; see the module docs.
pub struct Feodo {
    http: HttpClient,
    key: Option<HeaderValue>,
    refresh: Duration,
    max_age: Duration,
    snapshot: RwLock<Arc<Snapshot>>,
    schedule: tokio::sync::Mutex<Schedule>,
}

impl fmt::Debug for Feodo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.snapshot();
        f.debug_struct("Feodo")
            .field("addresses", &snapshot.index.len())
            .field("confirmed_at", &snapshot.confirmed_at)
            .field("refresh", &self.refresh)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl Feodo {
    /// Builds the provider with an empty index; the first [`Feodo::ensure_fresh`] downloads
    /// the feed.
    pub fn new(config: &FeodoConfig) -> Result<Self, BuildError> {
        let key = config
            .http
            .key()
            .map(|k| key_header(ProviderId::Feodo, k))
            .transpose()?;
        Ok(Self {
            http: HttpClient::new(ProviderId::Feodo, &config.http)?,
            key,
            refresh: config.refresh,
            max_age: config.max_age,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            schedule: tokio::sync::Mutex::new(Schedule::default()),
        })
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn swap(&self, snapshot: Snapshot) {
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
    }

    /// Whether the data is usable now (loaded and confirmed within `max_age`).
    pub fn availability(&self) -> Availability {
        let fresh = self
            .snapshot()
            .confirmed_at
            .is_some_and(|at| Instant::now().saturating_duration_since(at) <= self.max_age);
        if fresh {
            Availability::Ready
        } else {
            Availability::Stale
        }
    }

    /// The current index (possibly empty or stale).
    pub fn index(&self) -> Arc<FeodoIndex> {
        Arc::clone(&self.snapshot().index)
    }

    /// Refreshes the feed if a refresh is due, then reports availability.
    ///
    /// With usable data this never waits behind a refresh another caller is running; with no
    /// usable data it does, so the first lookups after start-up see the first download.
    pub async fn ensure_fresh(&self) -> Availability {
        let mut schedule = if self.availability() == Availability::Ready {
            match self.schedule.try_lock() {
                Ok(schedule) => schedule,
                Err(_) => return Availability::Ready,
            }
        } else {
            self.schedule.lock().await
        };
        if schedule.next_attempt.is_none_or(|at| Instant::now() >= at) {
            // The outcome is logged inside; availability below says what callers need.
            let _ = self.refresh_locked(&mut schedule).await;
        }
        drop(schedule);
        self.availability()
    }

    /// Refreshes now, whatever the schedule (operators' `check`, tests).
    ///
    /// # Errors
    /// A [`FeedError`]; the last good index is kept and the next attempt backs off.
    pub async fn refresh(&self) -> Result<RefreshOutcome, FeedError> {
        let mut schedule = self.schedule.lock().await;
        self.refresh_locked(&mut schedule).await
    }

    async fn refresh_locked(&self, schedule: &mut Schedule) -> Result<RefreshOutcome, FeedError> {
        let result = self.download(schedule).await;
        let now = Instant::now();
        match &result {
            Ok(outcome) => {
                schedule.failures = 0;
                schedule.next_attempt = Some(now + self.refresh);
                tracing::debug!(provider = "feodo", outcome = ?outcome, "Feed refreshed.");
            }
            Err(err) => {
                schedule.failures = schedule.failures.saturating_add(1);
                let wait = doubling(RETRY_BASE, schedule.failures, self.refresh.max(RETRY_BASE));
                schedule.next_attempt = Some(now + wait);
                tracing::warn!(
                    provider = "feodo",
                    attempt = schedule.failures,
                    retry_in_s = wait.as_secs(),
                    error = %enrichd_core::error::chain(err),
                    "Feed refresh failed; keeping the last good index."
                );
            }
        }
        result
    }

    async fn download(&self, schedule: &mut Schedule) -> Result<RefreshOutcome, FeedError> {
        let url = self.http.url("/downloads/ipblocklist.json");
        let mut request = self.http.get(&url).header("accept", "application/json");
        if let Some(key) = &self.key {
            request = request.header("auth-key", key.clone());
        }
        let have_data = self.snapshot().confirmed_at.is_some();
        if have_data {
            if let Some(etag) = &schedule.etag {
                request = request.header("if-none-match", etag.clone());
            }
            if let Some(modified) = &schedule.last_modified {
                request = request.header("if-modified-since", modified.clone());
            }
        }
        let exchange = self.http.exchange(request).await.map_err(FeedError::Http)?;
        match exchange.status {
            304 if have_data => {
                let current = self.snapshot();
                self.swap(Snapshot {
                    index: Arc::clone(&current.index),
                    confirmed_at: Some(Instant::now()),
                });
                Ok(RefreshOutcome::NotModified)
            }
            200 => {
                let body = exchange.body.map_err(FeedError::Http)?;
                // A 64 MiB parse would stall the actor thread; run it where blocking is fine.
                let index = tokio::task::spawn_blocking(move || FeodoIndex::from_json(&body))
                    .await
                    .map_err(|_| FeedError::Decode("feed parser task failed".into()))??;
                let addresses = index.len();
                self.swap(Snapshot {
                    index: Arc::new(index),
                    confirmed_at: Some(Instant::now()),
                });
                schedule.etag = exchange.headers.get("etag").cloned();
                schedule.last_modified = exchange.headers.get("last-modified").cloned();
                Ok(RefreshOutcome::Updated { addresses })
            }
            status => Err(FeedError::Status(status)),
        }
    }

    /// The answer from the current index, without checking freshness.
    fn answer(&self, ip: CanonicalIp) -> ProviderReport {
        match self.snapshot().index.get(ip) {
            Some(listing) => ProviderReport::answer(
                ProviderOutcome::Ok,
                Some(Verdict::Malicious),
                ProviderFields::Feodo {
                    listed: true,
                    malware_family: listing.malware_family.clone(),
                },
                Arc::clone(&listing.raw),
            ),
            None => ProviderReport::answer(
                ProviderOutcome::NotFound,
                None,
                ProviderFields::Feodo {
                    listed: false,
                    malware_family: None,
                },
                json::empty_object(),
            ),
        }
    }
}

impl IntelProvider for Feodo {
    fn id(&self) -> ProviderId {
        ProviderId::Feodo
    }

    /// Answers from the local index, refreshing first when due.
    ///
    /// Callers should check [`ProviderHooks::availability`] first (the actor does): with
    /// stale data this returns `Unexpected`, which would record an error per address.
    async fn lookup(&self, ip: CanonicalIp) -> Result<ProviderReport, ProviderError> {
        match self.ensure_fresh().await {
            Availability::Ready => Ok(self.answer(ip)),
            Availability::Stale => Err(ProviderError::Unexpected(
                "feodo feed data missing or stale".into(),
            )),
        }
    }
}

impl ProviderHooks for Feodo {
    fn metered(&self) -> bool {
        false
    }

    async fn availability(&self) -> Availability {
        self.ensure_fresh().await
    }

    async fn lookup_observed(&self, ip: CanonicalIp) -> Observed {
        // The actor has just checked availability; answering from what is loaded avoids a
        // spurious error if the data turned stale in between.
        Observed {
            result: Ok(self.answer(ip)),
            quota: None,
        }
    }
}
