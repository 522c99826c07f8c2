//! Intake and discovery: recording that an address was seen (creating the attacker row only
//! when enrichd owns `attackers`), mapping attacker rows to canonical IPs, the backlog of due
//! work, and read-only views of stored state.

use chrono::{DateTime, Utc};
use enrichd_core::CanonicalIp;
use enrichd_core::payload::IntelPayload;
use enrichd_core::text::column_text;
use sea_orm::{ConnectionTrait, Value};

use crate::state::{self, ApplyContext, ProviderState, PtrState, StoredScope};
use crate::work::{backoff, mapped_attackers, read_provider_states, read_ptr};
use crate::{Store, StoreError};

/// Attempts at an intake transaction that hit a busy database or a serialization failure.
const TX_ATTEMPTS: u32 = 4;
/// Mapping rounds per backlog call.
const MAP_ROUNDS: u32 = 20;

/// What [`Store::note_event`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intake {
    /// Attacker rows whose address canonicalises to the event's, ascending.
    pub attacker_uuids: Vec<String>,
    /// The attacker row this call created (only when enrichd owns `attackers`).
    pub created: Option<String>,
}

impl Store {
    /// Records that `ip` was seen (its scope, first and last event time) and finds its
    /// attacker rows. With `attacker_uuid`, that row is mapped from the address stored in it.
    /// When no row has the address and enrichd owns `attackers`, one is created (uuid4 with
    /// dashes), serialised per IP so replicas never create two; on a table the reference owns,
    /// nothing is inserted there.
    pub async fn note_event(
        &self,
        ip: CanonicalIp,
        scope: StoredScope,
        attacker_uuid: Option<&str>,
        first_seen: Option<DateTime<Utc>>,
    ) -> Result<Intake, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.note_once(ip, scope, attacker_uuid, first_seen).await {
                Err(e) if e.is_retryable() && attempt < TX_ATTEMPTS => backoff(attempt).await,
                other => return other,
            }
        }
    }

    async fn note_once(
        &self,
        ip: CanonicalIp,
        scope: StoredScope,
        attacker_uuid: Option<&str>,
        first_seen: Option<DateTime<Utc>>,
    ) -> Result<Intake, StoreError> {
        let sql = self.sql;
        let ip_text = ip.to_string();
        let txn = self.begin_write().await?;
        let now = sql.now(&txn).await?;
        let first = first_seen.map_or(now, |f| f.min(now));
        // The upsert takes the IP row's lock (PostgreSQL) until commit: concurrent intake of
        // one IP queues here, so the row-creation check below is race-free.
        txn.execute_raw(sql.stmt(
            "INSERT INTO enrichd_ip_state (ip, scope, ptr_attempts, first_event_at, \
             last_event_at, updated_at) VALUES ($1, $2, 0, $3, $4, $4) ON CONFLICT (ip) DO UPDATE \
             SET scope = excluded.scope, last_event_at = excluded.last_event_at, \
             first_event_at = COALESCE(enrichd_ip_state.first_event_at, excluded.first_event_at), \
             updated_at = excluded.updated_at",
            vec![
                ip_text.clone().into(),
                scope.as_str().into(),
                sql.ts(first),
                sql.ts(now),
            ],
        ))
        .await?;
        if sql.is_pg() {
            txn.execute_raw(sql.stmt(
                "SELECT ip FROM enrichd_ip_state WHERE ip = $1 FOR UPDATE",
                vec![ip_text.clone().into()],
            ))
            .await?;
        }
        let owned = self.owns_attackers_in(&txn).await?;

        if let Some(uuid_text) = attacker_uuid {
            let uuid_text = column_text(uuid_text.trim(), 36);
            let row = txn
                .query_one_raw(sql.stmt(
                    "SELECT uuid, ip FROM attackers WHERE uuid = $1",
                    vec![uuid_text.clone().into()],
                ))
                .await?;
            if let Some(row) = row {
                let stored_ip: String = row.try_get("", "ip")?;
                map_one(self, &txn, &uuid_text, &stored_ip, now).await?;
            } else if owned && let Ok(parsed) = uuid::Uuid::parse_str(&uuid_text) {
                let uuid = parsed.hyphenated().to_string();
                insert_attacker(self, &txn, &uuid, &ip_text, first, now).await?;
            }
        }

        let mut attackers: Vec<String> = mapped_attackers(self, &txn, &ip_text, now)
            .await?
            .into_iter()
            .map(|a| a.uuid)
            .collect();
        let mut created = None;
        if attackers.is_empty() && owned {
            let uuid = uuid::Uuid::new_v4().hyphenated().to_string();
            insert_attacker(self, &txn, &uuid, &ip_text, first, now).await?;
            attackers.push(uuid.clone());
            created = Some(uuid);
        } else if owned && !attackers.is_empty() {
            // Our own table: keep `last_seen` meaningful for the backlog's ordering.
            txn.execute_raw(sql.stmt(
                "UPDATE attackers SET last_seen = $2, updated_at = $2 WHERE uuid IN \
                 (SELECT attacker_uuid FROM enrichd_attacker_map WHERE ip = $1)",
                vec![ip_text.clone().into(), sql.ts(now)],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(Intake {
            attacker_uuids: attackers,
            created,
        })
    }

    /// Maps up to `limit` attacker rows not mapped yet to their canonical IP; a stored `ip`
    /// that is not an address is recorded once with its reason and never selected again.
    /// Returns how many rows were mapped.
    pub async fn sync_attacker_map(&self, limit: u32) -> Result<usize, StoreError> {
        let sql = self.sql;
        let txn = self.begin_write().await?;
        let now = sql.now(&txn).await?;
        let rows = txn
            .query_all_raw(sql.stmt(
                "SELECT a.uuid AS uuid, a.ip AS ip FROM attackers a WHERE NOT EXISTS \
                 (SELECT 1 FROM enrichd_attacker_map m WHERE m.attacker_uuid = a.uuid) \
                 ORDER BY a.uuid LIMIT $1",
                vec![i64::from(limit).into()],
            ))
            .await?;
        let mut mapped = 0;
        for row in &rows {
            let uuid: String = row.try_get("", "uuid")?;
            let ip: String = row.try_get("", "ip")?;
            map_one(self, &txn, &uuid, &ip, now).await?;
            mapped += 1;
        }
        txn.commit().await?;
        Ok(mapped)
    }

    /// Canonical IPs with due work, newest `attackers.last_seen` first, deduplicated: IPs of
    /// attackers with no `attacker_intel` row or whose `ptr_record` was nulled behind our back
    /// while we hold a good name, or whose IP has a due configured provider (not
    /// parked) or a due PTR (when enabled); IPs with a live lease are left out, ours included:
    /// our own jobs are single-flight in the Aggregator, and a lease we keep after a provider
    /// turned out unavailable must hold the address back until it lapses, or the backfill
    /// would spin on it.
    /// Unmapped attacker rows are mapped first.
    pub async fn backlog(
        &self,
        limit: u32,
        ctx: &ApplyContext,
    ) -> Result<Vec<CanonicalIp>, StoreError> {
        // Bounded per call so a first start on a large reference table still answers soon;
        // later calls map the rest.
        let batch = limit.max(500);
        for _ in 0..MAP_ROUNDS {
            if self.sync_attacker_map(batch).await? < batch as usize {
                break;
            }
        }
        let sql = self.sql;
        let now = self.db_now().await?;
        let parked = self.parked_providers(now).await?;
        let providers: Vec<&str> = ctx
            .providers
            .iter()
            .filter(|p| !parked.contains(p))
            .map(|p| p.as_str())
            .collect();
        let mut values: Vec<Value> = vec![
            sql.ts(now),
            i64::from(limit).into(),
            i64::try_from(providers.len()).unwrap_or(0).into(),
        ];
        let first = values.len() + 1;
        let list: Vec<String> = (first..first + providers.len())
            .map(|i| format!("${i}"))
            .collect();
        values.extend(providers.iter().map(|p| Value::from(*p)));
        let provider_due = if providers.is_empty() {
            "FALSE".to_owned()
        } else {
            format!(
                "(SELECT COUNT(*) FROM enrichd_provider_state ps WHERE ps.ip = m.ip \
                 AND ps.provider IN ({}) AND ps.outcome IS NOT NULL \
                 AND (ps.next_attempt_at IS NULL OR ps.next_attempt_at > $1)) < $3",
                list.join(", ")
            )
        };
        let ptr_due = if ctx.ptr_enabled {
            "(s.ip IS NULL OR s.ptr_outcome IS NULL OR s.ptr_expires_at <= $1)"
        } else {
            "FALSE"
        };
        let statement = format!(
            "SELECT m.ip AS ip, MAX(a.last_seen) AS newest \
             FROM attackers a JOIN enrichd_attacker_map m ON m.attacker_uuid = a.uuid \
             LEFT JOIN enrichd_ip_state s ON s.ip = m.ip \
             WHERE m.ip IS NOT NULL \
             AND NOT (s.ip IS NOT NULL AND s.ptr_lease_until IS NOT NULL \
                  AND s.ptr_lease_until >= $1) \
             AND NOT EXISTS (SELECT 1 FROM enrichd_provider_state pl WHERE pl.ip = m.ip \
                 AND pl.lease_until >= $1) \
             AND (NOT EXISTS (SELECT 1 FROM attacker_intel ai WHERE ai.attacker_uuid = a.uuid) \
                  OR (s.ptr_name IS NOT NULL AND a.ptr_record IS NULL) \
                  OR ((s.scope IS NULL OR s.scope = 'global') AND ({ptr_due} OR {provider_due}))) \
             GROUP BY m.ip ORDER BY newest DESC, m.ip LIMIT $2"
        );
        let rows = self.read.query_all_raw(sql.stmt(statement, values)).await?;
        let mut ips = Vec::with_capacity(rows.len());
        for row in rows {
            let text: String = row.try_get("", "ip")?;
            let ip = CanonicalIp::parse(&text)
                .map_err(|e| StoreError::malformed("enrichd_attacker_map.ip", e.to_string()))?;
            ips.push(ip);
        }
        Ok(ips)
    }

    /// The PTR state stored for `ip`, if any.
    pub async fn ptr_state(&self, ip: CanonicalIp) -> Result<Option<PtrState>, StoreError> {
        let row = self
            .read
            .query_one_raw(self.sql.stmt(
                "SELECT * FROM enrichd_ip_state WHERE ip = $1",
                vec![ip.to_string().into()],
            ))
            .await?;
        row.map(|r| read_ptr(self, &r)).transpose()
    }

    /// The provider states stored for `ip`, ascending by provider.
    pub async fn provider_states(&self, ip: CanonicalIp) -> Result<Vec<ProviderState>, StoreError> {
        read_provider_states(self, &self.read, &ip.to_string()).await
    }

    /// The stored scope of `ip` (`None`: never classified).
    pub async fn stored_scope(&self, ip: CanonicalIp) -> Result<Option<StoredScope>, StoreError> {
        let row = self
            .read
            .query_one_raw(self.sql.stmt(
                "SELECT scope FROM enrichd_ip_state WHERE ip = $1",
                vec![ip.to_string().into()],
            ))
            .await?;
        let scope: Option<String> = row.map(|r| r.try_get("", "scope")).transpose()?.flatten();
        Ok(scope.as_deref().and_then(StoredScope::from_label))
    }

    /// The payloads `enrichd lookup` prints for `ip`, built from stored state: one per
    /// attacker row with the address, or one with `attacker_uuid` null when there is none.
    /// Reads only.
    pub async fn lookup_view(
        &self,
        ip: CanonicalIp,
        ctx: &ApplyContext,
    ) -> Result<Vec<IntelPayload>, StoreError> {
        let sql = self.sql;
        let ip_text = ip.to_string();
        let now = self.db_now().await?;
        let scope = self.stored_scope(ip).await?.unwrap_or(StoredScope::Global);
        let states = self.provider_states(ip).await?;
        let ptr = self.ptr_state(ip).await?.unwrap_or_default();
        let merged = state::merge(&ip_text, scope, &states, &ptr, ctx, now);
        let rows = self
            .read
            .query_all_raw(sql.stmt(
                "SELECT attacker_uuid AS uuid FROM enrichd_attacker_map WHERE ip = $1 \
                 AND attacker_uuid IN (SELECT uuid FROM attackers) \
                 UNION SELECT uuid FROM attackers WHERE ip = $1 ORDER BY uuid",
                vec![ip_text.into()],
            ))
            .await?;
        let mut uuids = Vec::with_capacity(rows.len());
        for row in rows {
            uuids.push(row.try_get::<String>("", "uuid")?);
        }
        if uuids.is_empty() {
            return Ok(vec![merged.payload]);
        }
        Ok(uuids
            .into_iter()
            .map(|u| IntelPayload {
                attacker_uuid: Some(u),
                ..merged.payload.clone()
            })
            .collect())
    }
}

/// Records `uuid → canonical(stored_ip)`, or "not an IP" with the reason, once.
async fn map_one<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    uuid: &str,
    stored_ip: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let sql = store.sql;
    let (ip, reason) = match CanonicalIp::parse(stored_ip) {
        Ok(ip) => (Some(ip.to_string()), None),
        Err(e) => (None, Some(column_text(&e.to_string(), 128))),
    };
    db.execute_raw(sql.stmt(
        "INSERT INTO enrichd_attacker_map (attacker_uuid, ip, reason, mapped_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (attacker_uuid) DO NOTHING",
        vec![uuid.into(), ip.into(), reason.into(), sql.ts(now)],
    ))
    .await?;
    Ok(())
}

/// Inserts an attacker row into enrichd's own `attackers` table, every NOT NULL column
/// written, with the stored PTR name if there is one, and maps it.
async fn insert_attacker<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    uuid: &str,
    ip: &str,
    first_seen: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let sql = store.sql;
    db.execute_raw(sql.stmt(
        "INSERT INTO attackers (uuid, ip, first_seen, last_seen, updated_at, ptr_record) \
         VALUES ($1, $2, $3, $4, $4, (SELECT ptr_name FROM enrichd_ip_state WHERE ip = $2)) \
         ON CONFLICT (uuid) DO NOTHING",
        vec![uuid.into(), ip.into(), sql.ts(first_seen), sql.ts(now)],
    ))
    .await?;
    map_one(store, db, uuid, ip, now).await
}
