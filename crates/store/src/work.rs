//! Per-IP work: leases (claimed on the database clock inside the claiming statement) and the
//! one-transaction write of a pass's results, with the merged `attacker_intel` rows and the
//! outbox.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::payload::{Envelope, IntelPayload, TOPIC_INTEL_ENRICHED};
use enrichd_core::ports::PtrReport;
use enrichd_core::text::column_text;
use enrichd_core::{
    CanonicalIp, ProviderFields, ProviderId, ProviderOutcome, ProviderReport, PtrOutcome, Verdict,
};
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult, Value};

use crate::state::{self, ApplyContext, IntelColumns, ProviderState, PtrState, StoredScope};
use crate::{Store, StoreError};

/// Column limit of `enrichd_provider_state.last_error`.
const LAST_ERROR_CHARS: usize = 512;
/// Column limit of `attackers.ptr_record` / `enrichd_ip_state.ptr_name`.
const PTR_CHARS: usize = 256;
/// Attempts at a transaction that hit a serialization failure, deadlock or busy database.
const TX_ATTEMPTS: u32 = 4;

/// A lease on one piece of work, claimed on the database clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// When it was claimed (database clock); becomes the result's `queried_at`, the fence.
    pub claimed_at: DateTime<Utc>,
    /// When it lapses (database clock).
    pub until: DateTime<Utc>,
}

/// Whether to claim only due work or everything (`enrichd lookup --refresh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimMode {
    /// Only work that is due (never answered, or its due time has passed).
    Due,
    /// Everything not leased by another live owner.
    Refresh,
}

/// The work this process now holds for one IP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Claims {
    /// The PTR lease, when PTR work was asked for, due and free.
    pub ptr: Option<Lease>,
    /// Provider leases, in ascending provider order.
    pub providers: Vec<(ProviderId, Lease)>,
}

impl Claims {
    /// Whether nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.ptr.is_none() && self.providers.is_empty()
    }
}

/// What [`Store::apply`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// Provider results written.
    pub applied: Vec<ProviderId>,
    /// Provider results refused by the fence (a newer result was already stored).
    pub stale: Vec<ProviderId>,
    /// Whether the PTR result was written (`None`: there was none).
    pub ptr_applied: Option<bool>,
    /// `attacker_intel` rows upserted.
    pub intel_rows: usize,
    /// Outbox rows inserted or bumped.
    pub events: usize,
}

// === impl Store: leases ===

impl Store {
    /// Claims the due (or, with [`ClaimMode::Refresh`], all) work for `ip` that no other live
    /// owner holds: PTR when `ptr` is set, and each of `providers`. A lease lasts `lease_for`
    /// on the database clock.
    pub async fn claim_work(
        &self,
        ip: CanonicalIp,
        providers: &[ProviderId],
        ptr: bool,
        lease_for: Duration,
        mode: ClaimMode,
    ) -> Result<Claims, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.claim_once(ip, providers, ptr, lease_for, mode).await {
                Err(e) if e.is_retryable() && attempt < TX_ATTEMPTS => backoff(attempt).await,
                other => return other,
            }
        }
    }

    async fn claim_once(
        &self,
        ip: CanonicalIp,
        providers: &[ProviderId],
        ptr: bool,
        lease_for: Duration,
        mode: ClaimMode,
    ) -> Result<Claims, StoreError> {
        let sql = self.sql;
        let ip_text = ip.to_string();
        let txn = self.begin_write().await?;
        let now = sql.now(&txn).await?;
        let until =
            now + chrono::Duration::from_std(lease_for).unwrap_or(chrono::Duration::seconds(60));
        let lease = Lease {
            claimed_at: crate::sql::micros(now),
            until: crate::sql::micros(until),
        };
        ensure_ip_row(self, &txn, &ip_text, now).await?;
        let mut claims = Claims::default();
        let due_ptr = match mode {
            ClaimMode::Due => " AND (ptr_outcome IS NULL OR ptr_expires_at <= $4)",
            ClaimMode::Refresh => "",
        };
        if ptr {
            // RETURNING hands back the fence in the same round trip as the claim.
            let claimed = txn
                .query_all_raw(sql.stmt(
                    format!(
                        "UPDATE enrichd_ip_state SET ptr_lease_owner = $2, ptr_lease_until = $3 \
                         WHERE ip = $1 AND (ptr_lease_until IS NULL OR ptr_lease_until < $4 \
                         OR ptr_lease_owner = $2){due_ptr} RETURNING ptr_queried_at"
                    ),
                    vec![
                        ip_text.clone().into(),
                        self.owner.to_string().into(),
                        sql.ts(until),
                        sql.ts(now),
                    ],
                ))
                .await?;
            if let Some(row) = claimed.first() {
                let last = sql.get_ts(row, "ptr_queried_at")?;
                claims.ptr = Some(newer_than(lease, last));
            }
        }
        let mut wanted: Vec<ProviderId> = providers.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        if !wanted.is_empty() {
            claims.providers = self
                .claim_providers(&txn, &ip_text, &wanted, lease, now, mode)
                .await?;
        }
        txn.commit().await?;
        Ok(claims)
    }

    /// Creates the missing provider rows of `ip` and leases the due ones, `wanted` in
    /// ascending order: one statement for each, in provider order (the order every writer
    /// locks them in). The fence of each lease comes back with the claim (`RETURNING`).
    async fn claim_providers(
        &self,
        txn: &DatabaseTransaction,
        ip_text: &str,
        wanted: &[ProviderId],
        lease: Lease,
        now: DateTime<Utc>,
        mode: ClaimMode,
    ) -> Result<Vec<(ProviderId, Lease)>, StoreError> {
        let sql = self.sql;
        let ip_text = ip_text.to_owned();
        let mut claimed_leases = Vec::new();
        let due_provider = match mode {
            ClaimMode::Due => " AND (outcome IS NULL OR next_attempt_at <= $4)",
            ClaimMode::Refresh => "",
        };
        // One statement creates the missing rows, one claims every due one, in provider
        // order (the order every writer locks them in).
        let mut values: Vec<Value> = vec![ip_text.clone().into(), sql.ts(now)];
        let rows: Vec<String> = wanted
            .iter()
            .map(|p| {
                values.push(p.as_str().into());
                format!("($1, ${}, 0, $2)", values.len())
            })
            .collect();
        txn.execute_raw(sql.stmt(
            format!(
                "INSERT INTO enrichd_provider_state (ip, provider, attempts, updated_at) \
                     VALUES {} ON CONFLICT (ip, provider) DO NOTHING",
                rows.join(", ")
            ),
            values,
        ))
        .await?;
        let mut values: Vec<Value> = vec![
            ip_text.clone().into(),
            self.owner.to_string().into(),
            sql.ts(lease.until),
            sql.ts(now),
        ];
        let list: Vec<String> = wanted
            .iter()
            .map(|p| {
                values.push(p.as_str().into());
                format!("${}", values.len())
            })
            .collect();
        let claimed = txn
            .query_all_raw(sql.stmt(
                format!(
                    "UPDATE enrichd_provider_state SET lease_owner = $2, lease_until = $3 \
                         WHERE ip = $1 AND provider IN ({}) AND (lease_until IS NULL \
                         OR lease_until < $4 OR lease_owner = $2){due_provider} \
                         RETURNING provider, queried_at",
                    list.join(", ")
                ),
                values,
            ))
            .await?;
        for row in &claimed {
            let label: String = row.try_get("", "provider")?;
            let provider = ProviderId::from_id(&label)
                .ok_or_else(|| StoreError::malformed("enrichd_provider_state.provider", label))?;
            let fence = sql.get_ts(row, "queried_at")?;
            claimed_leases.push((provider, newer_than(lease, fence)));
        }
        claimed_leases.sort_by_key(|(p, _)| *p);
        Ok(claimed_leases)
    }

    /// Shortens this process's lease on (`ip`, `provider`) to end at `until`: the provider had
    /// no slot for it before then. The item is then left alone by every replica's backlog until
    /// `until` (no spinning on it) and taken again right after, instead of when a full lease
    /// would have lapsed. Due time and backoff are untouched.
    pub async fn defer_work(
        &self,
        ip: CanonicalIp,
        provider: ProviderId,
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let sql = self.sql;
        let txn = self.begin_write().await?;
        txn.execute_raw(sql.stmt(
            "UPDATE enrichd_provider_state SET lease_until = $4 \
             WHERE ip = $1 AND provider = $2 AND lease_owner = $3",
            vec![
                ip.to_string().into(),
                provider.as_str().into(),
                self.owner.to_string().into(),
                sql.ts(crate::sql::micros(until)),
            ],
        ))
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Gives back this process's leases on `ip` for `providers` (and PTR when `ptr`), for
    /// work it will not do after all (a provider parked or breaker-open): another replica or
    /// the backfill may take it at once. Due times and backoff are untouched.
    pub async fn release_work(
        &self,
        ip: CanonicalIp,
        providers: &[ProviderId],
        ptr: bool,
    ) -> Result<(), StoreError> {
        let sql = self.sql;
        let ip_text = ip.to_string();
        let txn = self.begin_write().await?;
        if ptr {
            txn.execute_raw(sql.stmt(
                "UPDATE enrichd_ip_state SET ptr_lease_owner = NULL, ptr_lease_until = NULL \
                 WHERE ip = $1 AND ptr_lease_owner = $2",
                vec![ip_text.clone().into(), self.owner.to_string().into()],
            ))
            .await?;
        }
        let mut sorted = providers.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        for provider in sorted {
            txn.execute_raw(sql.stmt(
                "UPDATE enrichd_provider_state SET lease_owner = NULL, lease_until = NULL \
                 WHERE ip = $1 AND provider = $2 AND lease_owner = $3",
                vec![
                    ip_text.clone().into(),
                    provider.as_str().into(),
                    self.owner.to_string().into(),
                ],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(())
    }

    // === impl Store: the per-IP write ===

    /// Writes one pass's results for `ip` in one transaction (see the crate docs): fenced
    /// provider and PTR state, every `attacker_intel` row of the IP's attackers recomputed from
    /// the merged stored state, `attackers.ptr_record`, and (with a bus) the outbox.
    ///
    /// Serialization failures and deadlocks are retried; a write the database still refuses
    /// is recorded as an `error` (with backoff) for the given providers, and the refusal is
    /// returned.
    pub async fn apply(
        &self,
        ip: CanonicalIp,
        scope: StoredScope,
        ptr: Option<(Lease, PtrReport)>,
        providers: Vec<(Lease, ProviderReport)>,
        ctx: &ApplyContext,
    ) -> Result<ApplyOutcome, StoreError> {
        // Deduplicated by provider (the last report wins) and written in ascending order, so
        // concurrent writers lock rows in the same order.
        let mut by_provider: BTreeMap<ProviderId, (Lease, ProviderReport)> = BTreeMap::new();
        for (lease, report) in providers {
            by_provider.insert(report.provider, (lease, report));
        }
        let reports: Vec<(Lease, ProviderReport)> = by_provider.into_values().collect();
        let mut attempt = 0;
        let err = loop {
            attempt += 1;
            match self
                .apply_once(ip, scope, ptr.as_ref(), &reports, ctx, true)
                .await
            {
                Ok(outcome) => return Ok(outcome),
                Err(e) if e.is_retryable() && attempt < TX_ATTEMPTS => backoff(attempt).await,
                Err(e) => break e,
            }
        };
        if matches!(err, StoreError::Rejected(_) | StoreError::Malformed { .. }) {
            let reason = column_text(
                &format!("write rejected: {}", enrichd_core::error::chain(&err)),
                LAST_ERROR_CHARS,
            );
            let as_errors: Vec<(Lease, ProviderReport)> = reports
                .iter()
                .map(|(lease, r)| (*lease, ProviderReport::error(r.provider, reason.clone())))
                .collect();
            if let Err(e) = self
                .apply_once(ip, scope, None, &as_errors, ctx, false)
                .await
            {
                tracing::warn!(ip = %ip, error = %enrichd_core::error::chain(&e), "Recording a rejected write as an error failed.");
            }
        }
        Err(err)
    }

    async fn apply_once(
        &self,
        ip: CanonicalIp,
        scope: StoredScope,
        ptr: Option<&(Lease, PtrReport)>,
        reports: &[(Lease, ProviderReport)],
        ctx: &ApplyContext,
        write_rows: bool,
    ) -> Result<ApplyOutcome, StoreError> {
        let sql = self.sql;
        let ip_text = ip.to_string();
        let txn = self.begin_write().await?;
        let now = sql.now(&txn).await?;
        let mut outcome = ApplyOutcome::default();

        // The IP's row first: every writer for this IP queues here.
        ensure_ip_row(self, &txn, &ip_text, now).await?;
        let row = txn
            .query_one_raw(sql.stmt(
                format!(
                    "SELECT * FROM enrichd_ip_state WHERE ip = $1{}",
                    sql.for_update()
                ),
                vec![ip_text.clone().into()],
            ))
            .await?
            .ok_or_else(|| StoreError::malformed("enrichd_ip_state", "row vanished"))?;
        let old_ptr = read_ptr(self, &row)?;
        let stored_scope: Option<String> = row.try_get("", "scope")?;
        if stored_scope.as_deref() != Some(scope.as_str()) {
            txn.execute_raw(sql.stmt(
                "UPDATE enrichd_ip_state SET scope = $2, updated_at = $3 WHERE ip = $1",
                vec![ip_text.clone().into(), scope.as_str().into(), sql.ts(now)],
            ))
            .await?;
        }

        let mut new_ptr = old_ptr.clone();
        if let Some((lease, report)) = ptr {
            let fresh = old_ptr.queried_at.is_none_or(|q| q < lease.claimed_at);
            outcome.ptr_applied = Some(fresh);
            if fresh {
                new_ptr = next_ptr_state(&old_ptr, lease, report, now);
                write_ptr(self, &txn, &ip_text, &new_ptr, now).await?;
            }
        }

        let mut states = read_provider_states(self, &txn, &ip_text).await?;
        for (lease, report) in reports {
            // The claim created the row; only a caller that skipped claiming needs this.
            if !states.iter().any(|s| s.provider == report.provider) {
                ensure_provider_row(self, &txn, &ip_text, report.provider, now).await?;
            }
            let old = states
                .iter()
                .find(|s| s.provider == report.provider)
                .cloned();
            let old_queried = old.as_ref().and_then(|s| s.queried_at);
            if old_queried.is_some_and(|q| q >= lease.claimed_at) {
                outcome.stale.push(report.provider);
                continue;
            }
            let next = next_provider_state(old.as_ref(), lease, report, ctx.ttl, now);
            let written = write_provider(self, &txn, &ip_text, &next, lease, now).await?;
            if written {
                outcome.applied.push(report.provider);
                states.retain(|s| s.provider != report.provider);
                states.push(next);
            } else {
                outcome.stale.push(report.provider);
            }
        }

        if write_rows {
            let merged = state::merge(&ip_text, scope, &states, &new_ptr, ctx, now);
            let attackers = mapped_attackers(self, &txn, &ip_text, now).await?;
            for attacker in &attackers {
                upsert_intel(self, &txn, &attacker.uuid, &merged.columns).await?;
                outcome.intel_rows += 1;
            }
            sync_ptr_record(
                self,
                &txn,
                &ip_text,
                old_ptr.name.as_deref(),
                new_ptr.name.as_deref(),
            )
            .await?;
            if ctx.outbox_enabled && scope.is_global() {
                for attacker in &attackers {
                    let mut payload = merged.payload.clone();
                    payload.attacker_uuid = Some(attacker.uuid.clone());
                    let digest = state::payload_digest(&payload);
                    if attacker.digest.as_deref() == Some(digest.as_str()) {
                        continue;
                    }
                    enqueue(self, &txn, &attacker.uuid, &payload, &digest, now).await?;
                    outcome.events += 1;
                }
            }
        }
        txn.commit().await?;
        Ok(outcome)
    }
}

pub(crate) async fn backoff(attempt: u32) {
    // Retry pacing after a lock conflict, not synchronisation: the other writer just committed.
    tokio::time::sleep(Duration::from_millis(15 * u64::from(attempt))).await;
}

/// A claim is always newer than the result it may replace, even within the clock's
/// resolution, so the fence never refuses the legitimate holder.
fn newer_than(lease: Lease, last: Option<DateTime<Utc>>) -> Lease {
    match last.filter(|l| *l >= lease.claimed_at) {
        Some(last) => Lease {
            claimed_at: last + chrono::Duration::microseconds(1),
            ..lease
        },
        None => lease,
    }
}

pub(crate) async fn ensure_ip_row(
    store: &Store,
    txn: &DatabaseTransaction,
    ip: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    txn.execute_raw(store.sql.stmt(
        "INSERT INTO enrichd_ip_state (ip, ptr_attempts, updated_at) VALUES ($1, 0, $2) \
         ON CONFLICT (ip) DO NOTHING",
        vec![ip.into(), store.sql.ts(now)],
    ))
    .await?;
    Ok(())
}

async fn ensure_provider_row(
    store: &Store,
    txn: &DatabaseTransaction,
    ip: &str,
    provider: ProviderId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    txn.execute_raw(store.sql.stmt(
        "INSERT INTO enrichd_provider_state (ip, provider, attempts, updated_at) \
         VALUES ($1, $2, 0, $3) ON CONFLICT (ip, provider) DO NOTHING",
        vec![ip.into(), provider.as_str().into(), store.sql.ts(now)],
    ))
    .await?;
    Ok(())
}

fn count(value: Option<i64>) -> u32 {
    value.and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

pub(crate) fn read_ptr(store: &Store, row: &QueryResult) -> Result<PtrState, StoreError> {
    let sql = store.sql;
    let outcome: Option<String> = row.try_get("", "ptr_outcome")?;
    let outcome = outcome
        .map(|o| PtrOutcome::from_label(&o).ok_or_else(|| StoreError::malformed("ptr_outcome", o)))
        .transpose()?;
    Ok(PtrState {
        name: row.try_get("", "ptr_name")?,
        outcome,
        resolved_at: sql.get_ts(row, "ptr_resolved_at")?,
        expires_at: sql.get_ts(row, "ptr_expires_at")?,
        attempts: count(sql.get_i64(row, "ptr_attempts")?),
        queried_at: sql.get_ts(row, "ptr_queried_at")?,
    })
}

pub(crate) async fn read_provider_states<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    ip: &str,
) -> Result<Vec<ProviderState>, StoreError> {
    let sql = store.sql;
    let rows = db
        .query_all_raw(sql.stmt(
            "SELECT * FROM enrichd_provider_state WHERE ip = $1 ORDER BY provider",
            vec![ip.into()],
        ))
        .await?;
    let mut states = Vec::with_capacity(rows.len());
    for row in rows {
        let provider: String = row.try_get("", "provider")?;
        let Some(provider) = ProviderId::from_id(&provider) else {
            continue;
        };
        let outcome: Option<String> = row.try_get("", "outcome")?;
        let outcome = outcome
            .map(|o| {
                ProviderOutcome::from_label(&o).ok_or_else(|| StoreError::malformed("outcome", o))
            })
            .transpose()?;
        let verdict: Option<String> = row.try_get("", "verdict")?;
        let fields = sql
            .get_json(&row, "fields")?
            .and_then(|f| serde_json::from_value::<ProviderFields>(f).ok());
        states.push(ProviderState {
            provider,
            outcome,
            verdict: verdict.as_deref().and_then(Verdict::from_label),
            fields,
            raw: sql.get_json(&row, "raw")?,
            answered_at: sql.get_ts(&row, "answered_at")?,
            queried_at: sql.get_ts(&row, "queried_at")?,
            next_attempt_at: sql.get_ts(&row, "next_attempt_at")?,
            attempts: count(sql.get_i64(&row, "attempts")?),
            last_error: row.try_get("", "last_error")?,
        });
    }
    Ok(states)
}

/// The PTR state after applying `report` (claimed at `lease.claimed_at`) to `old`.
pub(crate) fn next_ptr_state(
    old: &PtrState,
    lease: &Lease,
    report: &PtrReport,
    now: DateTime<Utc>,
) -> PtrState {
    let outcome = report.outcome;
    let attempts = if outcome.is_failure() {
        old.attempts.saturating_add(1)
    } else {
        0
    };
    let expires_at = outcome.due(attempts, report.record_ttl).at(now);
    let good_name = report
        .name
        .as_deref()
        .map(|n| column_text(n, PTR_CHARS))
        .filter(|n| outcome == PtrOutcome::Ok && !n.is_empty());
    let (name, resolved_at) = match (outcome, good_name) {
        (PtrOutcome::Ok, Some(name)) => (Some(name), Some(lease.claimed_at)),
        // A failure, or switching PTR off, never erases a good stored name.
        (PtrOutcome::Servfail | PtrOutcome::Timeout | PtrOutcome::Disabled, _)
        | (PtrOutcome::Ok, None) => (old.name.clone(), old.resolved_at),
        // A negative answer replaces it.
        (PtrOutcome::Nxdomain | PtrOutcome::InvalidName | PtrOutcome::SkippedNonGlobal, _) => {
            (None, None)
        }
    };
    PtrState {
        name,
        outcome: Some(outcome),
        resolved_at,
        expires_at,
        attempts,
        queried_at: Some(lease.claimed_at),
    }
}

async fn write_ptr(
    store: &Store,
    txn: &DatabaseTransaction,
    ip: &str,
    ptr: &PtrState,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let sql = store.sql;
    txn.execute_raw(sql.stmt(
        "UPDATE enrichd_ip_state SET ptr_name = $2, ptr_outcome = $3, ptr_resolved_at = $4, \
         ptr_expires_at = $5, ptr_attempts = $6, ptr_queried_at = $7, \
         ptr_lease_until = CASE WHEN ptr_lease_owner = $8 THEN NULL ELSE ptr_lease_until END, \
         ptr_lease_owner = CASE WHEN ptr_lease_owner = $8 THEN NULL ELSE ptr_lease_owner END, \
         updated_at = $9 WHERE ip = $1",
        vec![
            ip.into(),
            ptr.name.clone().into(),
            ptr.outcome.map(|o| o.as_str().to_owned()).into(),
            sql.ts_opt(ptr.resolved_at),
            sql.ts_opt(ptr.expires_at),
            i64::from(ptr.attempts).into(),
            sql.ts_opt(ptr.queried_at),
            store.owner.to_string().into(),
            sql.ts(now),
        ],
    ))
    .await?;
    Ok(())
}

/// The provider state after applying `report` (claimed at `lease.claimed_at`) to `old`.
pub(crate) fn next_provider_state(
    old: Option<&ProviderState>,
    lease: &Lease,
    report: &ProviderReport,
    ttl: Duration,
    now: DateTime<Utc>,
) -> ProviderState {
    let outcome = report.outcome;
    let old_attempts = old.map_or(0, |s| s.attempts);
    let attempts = if outcome.is_failure() {
        old_attempts.saturating_add(1)
    } else if outcome.is_answer() {
        0
    } else {
        // Rate limits, quota and skips do not advance per-IP backoff.
        old_attempts
    };
    let next_attempt_at = outcome
        .due(attempts, ttl, report.resume_at, report.min_backoff)
        .at(now);
    if outcome.is_answer() {
        ProviderState {
            provider: report.provider,
            outcome: Some(outcome),
            verdict: report.verdict,
            fields: report.fields.clone(),
            raw: Some(report.raw.clone()),
            answered_at: Some(lease.claimed_at),
            queried_at: Some(lease.claimed_at),
            next_attempt_at,
            attempts,
            last_error: None,
        }
    } else {
        // No answer: the earlier answer's columns, verdict and raw body stay.
        let mut next = old.cloned().unwrap_or(ProviderState {
            provider: report.provider,
            outcome: None,
            verdict: None,
            fields: None,
            raw: None,
            answered_at: None,
            queried_at: None,
            next_attempt_at: None,
            attempts: 0,
            last_error: None,
        });
        next.outcome = Some(outcome);
        next.queried_at = Some(lease.claimed_at);
        next.next_attempt_at = next_attempt_at;
        next.attempts = attempts;
        next.last_error = report
            .error
            .as_deref()
            .map(|e| column_text(e, LAST_ERROR_CHARS));
        next
    }
}

/// Writes `next`, fenced on `queried_at`; returns whether the row was written.
async fn write_provider(
    store: &Store,
    txn: &DatabaseTransaction,
    ip: &str,
    next: &ProviderState,
    lease: &Lease,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let sql = store.sql;
    let fields = next
        .fields
        .as_ref()
        .and_then(|f| serde_json::to_value(f).ok());
    let written = txn
        .execute_raw(sql.stmt(
            "UPDATE enrichd_provider_state SET outcome = $3, verdict = $4, fields = $5, raw = $6, \
             answered_at = $7, queried_at = $8, expires_at = $9, next_attempt_at = $9, \
             attempts = $10, last_error = $11, \
             lease_until = CASE WHEN lease_owner = $12 THEN NULL ELSE lease_until END, \
             lease_owner = CASE WHEN lease_owner = $12 THEN NULL ELSE lease_owner END, \
             updated_at = $13 \
             WHERE ip = $1 AND provider = $2 AND (queried_at IS NULL OR queried_at < $8)",
            vec![
                ip.into(),
                next.provider.as_str().into(),
                next.outcome.map(|o| o.as_str().to_owned()).into(),
                next.verdict.map(|v| v.as_str().to_owned()).into(),
                sql.json_opt(fields.as_ref()),
                sql.json_opt(next.raw.as_ref()),
                sql.ts_opt(next.answered_at),
                sql.ts(lease.claimed_at),
                sql.ts_opt(next.next_attempt_at),
                i64::from(next.attempts).into(),
                next.last_error.clone().into(),
                store.owner.to_string().into(),
                sql.ts(now),
            ],
        ))
        .await?
        .rows_affected();
    Ok(written == 1)
}

pub(crate) struct MappedAttacker {
    pub(crate) uuid: String,
    pub(crate) digest: Option<String>,
}

/// Maps attacker rows whose stored `ip` is this canonical text (the common case; other
/// spellings are mapped by `sync_attacker_map`), then lists every attacker of the IP.
pub(crate) async fn mapped_attackers<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    ip: &str,
    now: DateTime<Utc>,
) -> Result<Vec<MappedAttacker>, StoreError> {
    let sql = store.sql;
    db.execute_raw(sql.stmt(
        "INSERT INTO enrichd_attacker_map (attacker_uuid, ip, mapped_at) \
         SELECT a.uuid, $1, $2 FROM attackers a WHERE a.ip = $1 AND NOT EXISTS \
         (SELECT 1 FROM enrichd_attacker_map m WHERE m.attacker_uuid = a.uuid) \
         ON CONFLICT (attacker_uuid) DO NOTHING",
        vec![ip.into(), sql.ts(now)],
    ))
    .await?;
    let rows = db
        .query_all_raw(sql.stmt(
            "SELECT m.attacker_uuid AS attacker_uuid, m.payload_digest AS payload_digest \
             FROM enrichd_attacker_map m JOIN attackers a ON a.uuid = m.attacker_uuid \
             WHERE m.ip = $1 ORDER BY m.attacker_uuid",
            vec![ip.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok(MappedAttacker {
                uuid: r.try_get("", "attacker_uuid")?,
                digest: r.try_get("", "payload_digest")?,
            })
        })
        .collect()
}

async fn upsert_intel(
    store: &Store,
    txn: &DatabaseTransaction,
    attacker_uuid: &str,
    c: &IntelColumns,
) -> Result<(), StoreError> {
    let sql = store.sql;
    let columns = [
        "attacker_ip",
        "greynoise_classification",
        "greynoise_name",
        "greynoise_tags",
        "greynoise_raw",
        "greynoise_queried_at",
        "abuseipdb_score",
        "abuseipdb_categories",
        "abuseipdb_raw",
        "abuseipdb_queried_at",
        "feodo_listed",
        "feodo_malware_family",
        "feodo_raw",
        "feodo_queried_at",
        "threatfox_listed",
        "threatfox_threat_types",
        "threatfox_ioc_types",
        "threatfox_malware_families",
        "threatfox_raw",
        "threatfox_queried_at",
        "aggregate_verdict",
        "cached_at",
        "expires_at",
    ];
    let mut values: Vec<Value> = vec![
        uuid::Uuid::new_v4().simple().to_string().into(),
        attacker_uuid.into(),
        c.attacker_ip.clone().into(),
        c.greynoise_classification.clone().into(),
        c.greynoise_name.clone().into(),
        sql.json(&c.greynoise_tags),
        sql.json(&c.greynoise_raw),
        sql.ts_opt(c.greynoise_queried_at),
        c.abuseipdb_score.into(),
        sql.json(&c.abuseipdb_categories),
        sql.json(&c.abuseipdb_raw),
        sql.ts_opt(c.abuseipdb_queried_at),
        c.feodo_listed.into(),
        c.feodo_malware_family.clone().into(),
        sql.json(&c.feodo_raw),
        sql.ts_opt(c.feodo_queried_at),
        c.threatfox_listed.into(),
        sql.json(&c.threatfox_threat_types),
        sql.json(&c.threatfox_ioc_types),
        sql.json(&c.threatfox_malware_families),
        sql.json(&c.threatfox_raw),
        sql.ts_opt(c.threatfox_queried_at),
        c.aggregate_verdict.clone().into(),
        sql.ts(c.cached_at),
        sql.ts(c.expires_at),
    ];
    values.push(1_i32.into());
    let placeholders: Vec<String> = (1..=values.len()).map(|i| format!("${i}")).collect();
    let updates: Vec<String> = columns
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    let statement = format!(
        "INSERT INTO attacker_intel (uuid, attacker_uuid, {cols}, schema_version) VALUES ({ph}) \
         ON CONFLICT (attacker_uuid) DO UPDATE SET {updates}",
        cols = columns.join(", "),
        ph = placeholders.join(", "),
        updates = updates.join(", "),
    );
    txn.execute_raw(sql.stmt(statement, values)).await?;
    Ok(())
}

/// Keeps `attackers.ptr_record` in step with the stored name: a good name is written (and
/// restores one something else nulled); a name a negative answer cleared is removed.
async fn sync_ptr_record(
    store: &Store,
    txn: &DatabaseTransaction,
    ip: &str,
    old: Option<&str>,
    new: Option<&str>,
) -> Result<(), StoreError> {
    let sql = store.sql;
    let of_ip = "uuid IN (SELECT attacker_uuid FROM enrichd_attacker_map WHERE ip = $1)";
    match (old, new) {
        (_, Some(name)) => {
            txn.execute_raw(sql.stmt(
                format!(
                    "UPDATE attackers SET ptr_record = $2 WHERE {of_ip} \
                     AND (ptr_record IS NULL OR ptr_record <> $2)"
                ),
                vec![ip.into(), name.into()],
            ))
            .await?;
        }
        (Some(old), None) => {
            txn.execute_raw(sql.stmt(
                format!("UPDATE attackers SET ptr_record = NULL WHERE {of_ip} AND ptr_record = $2"),
                vec![ip.into(), old.into()],
            ))
            .await?;
        }
        (None, None) => {}
    }
    Ok(())
}

/// Puts `payload` in the outbox for `attacker_uuid`: a new row at version 1, or a newer
/// payload replacing an unpublished one with the version bumped. A claim in progress is kept,
/// so the relay deleting the old version releases the new one (see `delete_outbox`).
async fn enqueue(
    store: &Store,
    txn: &DatabaseTransaction,
    attacker_uuid: &str,
    payload: &IntelPayload,
    digest: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let sql = store.sql;
    #[expect(
        clippy::cast_precision_loss,
        reason = "epoch milliseconds fit an f64 exactly until year 287396"
    )]
    let ts = now.timestamp_micros() as f64 / 1e6;
    let envelope = Envelope::new(TOPIC_INTEL_ENRICHED, "intel.enriched", ts, payload);
    let text = serde_json::to_string(&envelope)
        .map_err(|e| StoreError::malformed("enrichd_outbox.payload", e.to_string()))?;
    txn.execute_raw(sql.stmt(
        "INSERT INTO enrichd_outbox (attacker_uuid, version, payload, created_at, updated_at) \
         VALUES ($1, 1, $2, $3, $3) ON CONFLICT (attacker_uuid) DO UPDATE SET \
         version = enrichd_outbox.version + 1, payload = excluded.payload, \
         updated_at = excluded.updated_at",
        vec![attacker_uuid.into(), text.into(), sql.ts(now)],
    ))
    .await?;
    txn.execute_raw(sql.stmt(
        "UPDATE enrichd_attacker_map SET payload_digest = $2 WHERE attacker_uuid = $1",
        vec![attacker_uuid.into(), digest.into()],
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use enrichd_core::ProviderFields;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
    }

    fn lease() -> Lease {
        Lease {
            claimed_at: t0(),
            until: t0() + chrono::Duration::seconds(30),
        }
    }

    const TTL: Duration = Duration::from_hours(24);

    fn good() -> ProviderReport {
        ProviderReport::answer(
            ProviderOutcome::Ok,
            Some(Verdict::Malicious),
            ProviderFields::Feodo {
                listed: true,
                malware_family: Some("QakBot".into()),
            },
            serde_json::json!({"ip_address": "1.2.3.4"}),
        )
    }

    #[test]
    fn errors_keep_the_answer_and_back_off_by_consecutive_failures() {
        let ok = next_provider_state(None, &lease(), &good(), TTL, t0());
        assert_eq!(ok.attempts, 0);
        assert_eq!(ok.next_attempt_at, Some(t0() + chrono::Duration::hours(24)));
        let err = ProviderReport::error(ProviderId::Feodo, "server error 503");
        let e1 = next_provider_state(Some(&ok), &lease(), &err, TTL, t0());
        assert_eq!(e1.attempts, 1);
        assert_eq!(e1.fields, ok.fields);
        assert_eq!(e1.verdict, Some(Verdict::Malicious));
        assert_eq!(
            e1.next_attempt_at,
            Some(t0() + chrono::Duration::minutes(5))
        );
        let e2 = next_provider_state(Some(&e1), &lease(), &err, TTL, t0());
        assert_eq!(e2.attempts, 2);
        assert_eq!(
            e2.next_attempt_at,
            Some(t0() + chrono::Duration::minutes(10))
        );
        let parked = ProviderReport {
            resume_at: Some(t0() + chrono::Duration::hours(3)),
            ..ProviderReport::bare(ProviderId::Feodo, ProviderOutcome::RateLimited)
        };
        let rl = next_provider_state(Some(&e2), &lease(), &parked, TTL, t0());
        assert_eq!(rl.attempts, 2, "rate limits do not advance backoff");
        assert_eq!(rl.next_attempt_at, Some(t0() + chrono::Duration::hours(3)));
        let negative = ProviderReport::answer(
            ProviderOutcome::Ok,
            None,
            ProviderFields::Feodo {
                listed: false,
                malware_family: None,
            },
            serde_json::json!({}),
        );
        let cleared = next_provider_state(Some(&rl), &lease(), &negative, TTL, t0());
        assert_eq!(cleared.verdict, None);
        assert_eq!(cleared.attempts, 0);
        assert!(matches!(
            cleared.fields,
            Some(ProviderFields::Feodo { listed: false, .. })
        ));
    }

    #[test]
    fn ptr_failures_keep_a_good_name_and_negative_answers_clear_it() {
        let named = PtrReport {
            outcome: PtrOutcome::Ok,
            name: Some("dns.google".into()),
            record_ttl: Some(Duration::from_secs(7200)),
            forward_confirmed: None,
        };
        let good = next_ptr_state(&PtrState::default(), &lease(), &named, t0());
        assert_eq!(good.name.as_deref(), Some("dns.google"));
        assert_eq!(good.expires_at, Some(t0() + chrono::Duration::hours(2)));
        let failed = next_ptr_state(
            &good,
            &lease(),
            &PtrReport::without_name(PtrOutcome::Timeout),
            t0(),
        );
        assert_eq!(failed.name.as_deref(), Some("dns.google"));
        assert_eq!(failed.attempts, 1);
        assert_eq!(
            failed.expires_at,
            Some(t0() + chrono::Duration::minutes(15))
        );
        let gone = next_ptr_state(
            &failed,
            &lease(),
            &PtrReport::without_name(PtrOutcome::Nxdomain),
            t0(),
        );
        assert_eq!(gone.name, None);
        assert_eq!(gone.attempts, 0);
    }
}
