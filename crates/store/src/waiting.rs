//! Work that is owed but cannot be done yet: the answer `enrichd backfill` gives when its
//! backlog is empty but the job is not finished (a rate slot ahead, a park, a quota, a retry
//! after an error), so it can wait for what comes soon and say what does not.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use enrichd_core::{ProviderId, ProviderOutcome, PtrOutcome};
use sea_orm::ConnectionTrait;

use crate::sql::Params;
use crate::state::ApplyContext;
use crate::{Store, StoreError};

/// Why owed work waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitReason {
    /// A lease is held until then: mostly a provider's next free rate slot (the work was
    /// deferred to it); also a pass running elsewhere, or one whose provider was unavailable.
    Leased,
    /// The provider is parked cluster-wide (a 429 or a spent quota it reported).
    Parked,
    /// The provider said the daily quota is spent (`skipped_quota`).
    Quota,
    /// The last attempt failed; the retry waits for its backoff.
    Backoff,
}

impl WaitReason {
    /// A few words for a person.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Leased => "waiting for rate limit",
            Self::Parked => "rate_limited",
            Self::Quota => "skipped_quota",
            Self::Backoff => "retrying after an error",
        }
    }
}

/// Owed work of one kind (`ptr` or a provider), on global addresses with attacker rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingWork {
    /// `"ptr"` or a provider id.
    pub what: &'static str,
    /// Why it waits (the reason of its earliest item).
    pub reason: WaitReason,
    /// Addresses owed this work.
    pub addresses: u64,
    /// When the first of them can be done (database clock).
    pub earliest: DateTime<Utc>,
    /// How long from now that is.
    pub wait: std::time::Duration,
}

impl Store {
    /// The configured work still owed to addresses with attacker rows, by kind, earliest
    /// first: never answered yet, answered with `error`, `rate_limited` or `skipped_quota`,
    /// or due again. Work that is takeable now is not here (the backlog has it); work that is
    /// finished for its TTL, or never due (`skipped_unsupported`), is not owed. Reads only.
    pub async fn waiting_work(&self, ctx: &ApplyContext) -> Result<Vec<WaitingWork>, StoreError> {
        let dialect = self.dialect;
        let now = self.db_now().await?;
        let parks = self.parks(now).await?;
        let mut waiting = Vec::new();
        if !ctx.providers.is_empty() {
            let mut p = Params::default();
            let now_p = p.push(dialect.ts(now));
            let list = p.list(ctx.providers.iter().map(|id| id.as_str()));
            let retried = p.list(
                [
                    ProviderOutcome::Error,
                    ProviderOutcome::RateLimited,
                    ProviderOutcome::SkippedQuota,
                ]
                .map(ProviderOutcome::as_str),
            );
            let statement = format!(
                "SELECT ps.provider AS provider, ps.outcome AS outcome, COUNT(*) AS n, \
                 MIN(CASE WHEN ps.lease_until IS NOT NULL AND (ps.next_attempt_at IS NULL \
                 OR ps.lease_until > ps.next_attempt_at) THEN ps.lease_until \
                 ELSE ps.next_attempt_at END) AS earliest \
                 FROM enrichd_provider_state ps JOIN enrichd_ip_state s ON s.ip = ps.ip \
                 WHERE ps.provider IN ({list}) AND (s.scope IS NULL OR s.scope = 'global') \
                 AND (ps.outcome IS NULL OR ps.outcome IN ({retried}) \
                      OR ps.next_attempt_at <= {now_p}) \
                 AND EXISTS (SELECT 1 FROM enrichd_attacker_map m WHERE m.ip = ps.ip) \
                 GROUP BY ps.provider, ps.outcome"
            );
            let rows = self
                .read
                .query_all_raw(dialect.stmt(statement, p.0))
                .await?;
            let mut by_provider: HashMap<ProviderId, WaitingWork> = HashMap::new();
            for row in rows {
                let id: String = row.try_get("", "provider")?;
                let Some(provider) = ProviderId::from_id(&id) else {
                    continue;
                };
                let outcome: Option<String> = row.try_get("", "outcome")?;
                let count: i64 = row.try_get("", "n")?;
                let stored = dialect.get_ts(&row, "earliest")?;
                let mut reason = match outcome.as_deref().and_then(ProviderOutcome::from_label) {
                    Some(ProviderOutcome::Error) => WaitReason::Backoff,
                    Some(ProviderOutcome::RateLimited) => WaitReason::Parked,
                    Some(ProviderOutcome::SkippedQuota) => WaitReason::Quota,
                    _ => WaitReason::Leased,
                };
                let mut earliest = stored.unwrap_or(now).max(now);
                if let Some(until) = parks.get(&provider).filter(|until| **until > earliest) {
                    earliest = *until;
                    reason = WaitReason::Parked;
                }
                let entry = by_provider.entry(provider).or_insert(WaitingWork {
                    what: provider.as_str(),
                    reason,
                    addresses: 0,
                    earliest,
                    wait: until(now, earliest),
                });
                entry.addresses += u64::try_from(count).unwrap_or(0);
                if earliest < entry.earliest {
                    entry.earliest = earliest;
                    entry.wait = until(now, earliest);
                    entry.reason = reason;
                }
            }
            waiting.extend(by_provider.into_values());
        }
        if ctx.ptr_enabled {
            waiting.extend(self.waiting_ptr(now).await?);
        }
        waiting.sort_by_key(|w| (w.earliest, w.what));
        Ok(waiting)
    }

    async fn waiting_ptr(&self, now: DateTime<Utc>) -> Result<Option<WaitingWork>, StoreError> {
        let dialect = self.dialect;
        let mut p = Params::default();
        let now_p = p.push(dialect.ts(now));
        let retried = p.list([PtrOutcome::Servfail, PtrOutcome::Timeout].map(PtrOutcome::as_str));
        let statement = format!(
            "SELECT COUNT(*) AS n, \
             MIN(CASE WHEN ptr_lease_until IS NOT NULL AND (ptr_expires_at IS NULL \
             OR ptr_lease_until > ptr_expires_at) THEN ptr_lease_until \
             ELSE ptr_expires_at END) AS earliest \
             FROM enrichd_ip_state s WHERE (s.scope IS NULL OR s.scope = 'global') \
             AND (s.ptr_outcome IS NULL OR s.ptr_outcome IN ({retried}) \
                  OR s.ptr_expires_at <= {now_p}) \
             AND EXISTS (SELECT 1 FROM enrichd_attacker_map m WHERE m.ip = s.ip)"
        );
        let Some(row) = self
            .read
            .query_one_raw(dialect.stmt(statement, p.0))
            .await?
        else {
            return Ok(None);
        };
        let count: i64 = row.try_get("", "n")?;
        if count == 0 {
            return Ok(None);
        }
        let earliest = dialect.get_ts(&row, "earliest")?.unwrap_or(now).max(now);
        Ok(Some(WaitingWork {
            what: "ptr",
            reason: WaitReason::Backoff,
            addresses: u64::try_from(count).unwrap_or(0),
            earliest,
            wait: until(now, earliest),
        }))
    }

    /// Providers parked cluster-wide at `now`, with the end of each park.
    pub(crate) async fn parks(
        &self,
        now: DateTime<Utc>,
    ) -> Result<HashMap<ProviderId, DateTime<Utc>>, StoreError> {
        let rows = self
            .read
            .query_all_raw(self.dialect.stmt(
                "SELECT provider, parked_until FROM enrichd_provider_limits \
                 WHERE parked_until > $1",
                vec![self.dialect.ts(now)],
            ))
            .await?;
        let mut parks = HashMap::new();
        for row in rows {
            let id: String = row.try_get("", "provider")?;
            if let (Some(provider), Some(until)) = (
                ProviderId::from_id(&id),
                self.dialect.get_ts(&row, "parked_until")?,
            ) {
                parks.insert(provider, until);
            }
        }
        Ok(parks)
    }
}

fn until(now: DateTime<Utc>, at: DateTime<Utc>) -> std::time::Duration {
    (at - now).to_std().unwrap_or_default()
}
