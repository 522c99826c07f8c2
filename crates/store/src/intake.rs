//! Intake and discovery: recording that an address was seen (creating the attacker row only
//! when enrichd owns `attackers`), mapping attacker rows to canonical IPs, and the backlog of
//! due work.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use enrichd_core::CanonicalIp;
use enrichd_core::text::column_text;
use sea_orm::{ConnectionTrait, DatabaseTransaction, Value};

use crate::attackers::{
    AttackerAddress, NewAttacker, insert_attackers, map_rows, mapped_attackers_of,
};
use crate::claim::{ClaimMode, ClaimSettings, Claims, Lease, LockedClaim};
use crate::error::retry_busy;
use crate::ip_state::distinct_rounds;
use crate::sql::{Assign, Joined, OnConflict, Params, RowsBack};
use crate::state::{ApplyContext, StoredScope};
use crate::{Store, StoreError};

/// Mapping rounds per backlog call.
const MAP_ROUNDS: u32 = 20;

/// What [`Store::note_event`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intake {
    /// Attacker rows whose address canonicalises to the event's, ascending.
    pub attacker_uuids: Vec<String>,
    /// The attacker row this call created (only when enrichd owns `attackers`).
    pub created: Option<String>,
    /// The work claimed in the same transaction, for an [`EventNote::claim`] event.
    pub claims: Option<Claims>,
}

/// One bus event for [`Store::note_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    /// The event's address.
    pub ip: CanonicalIp,
    /// Its scope under the current policy.
    pub scope: StoredScope,
    /// The attacker row the event names, if any.
    pub attacker_uuid: Option<String>,
    /// When the event says the attacker was first seen.
    pub first_seen: Option<DateTime<Utc>>,
    /// Also claim the address's due work, as [`Store::claim_batch`] with the
    /// [`ClaimSettings`] given to [`Store::note_events`] would, in the intake's own
    /// transaction: a new address's job then starts with one commit instead of two.
    pub claim: bool,
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
        let note = EventNote {
            ip,
            scope,
            attacker_uuid: attacker_uuid.map(str::to_owned),
            first_seen,
            claim: false,
        };
        self.note_events(vec![note], &ClaimSettings::default())
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::malformed("note_event", "no result")))
    }

    /// [`Store::note_event`] for many events in one transaction per round of distinct
    /// addresses, a handful of statements whatever the batch size. Results come back in the
    /// order of `notes`. A batch the database refuses is recorded again one event at a time,
    /// so only the event at fault is refused. Events marked [`EventNote::claim`] claim their
    /// address's due work under `claim`.
    pub async fn note_events(
        &self,
        notes: Vec<EventNote>,
        claim: &ClaimSettings,
    ) -> Vec<Result<Intake, StoreError>> {
        let mut results: Vec<Option<Result<Intake, StoreError>>> =
            notes.iter().map(|_| None).collect();
        let ips: Vec<CanonicalIp> = notes.iter().map(|n| n.ip).collect();
        for round in distinct_rounds(&ips) {
            let refs: Vec<&EventNote> = round.iter().map(|&i| &notes[i]).collect();
            match self.note_round(&refs, claim).await {
                Ok(intakes) => {
                    for (&i, intake) in round.iter().zip(intakes) {
                        results[i] = Some(Ok(intake));
                    }
                }
                Err(e) if e.is_unavailable() || round.len() == 1 => {
                    for &i in &round {
                        results[i] = Some(Err(e.shared()));
                    }
                }
                Err(_) => {
                    for &i in &round {
                        results[i] = Some(self.note_round(&[&notes[i]], claim).await.and_then(
                            |mut v| {
                                v.pop()
                                    .ok_or_else(|| StoreError::malformed("note_event", "no result"))
                            },
                        ));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::malformed("note_event", "no result"))))
            .collect()
    }

    async fn note_round(
        &self,
        notes: &[&EventNote],
        claim: &ClaimSettings,
    ) -> Result<Vec<Intake>, StoreError> {
        retry_busy(move || self.note_once(notes, claim)).await
    }

    /// One intake transaction over `notes` (distinct addresses in key order).
    async fn note_once(
        &self,
        notes: &[&EventNote],
        claim: &ClaimSettings,
    ) -> Result<Vec<Intake>, StoreError> {
        let dialect = self.dialect;
        let keys: Vec<String> = notes.iter().map(|n| n.ip.to_string()).collect();
        let (txn, clock) = self.begin_keyed_write().await?;
        let now = self.upsert_event_rows(&txn, clock, notes, &keys).await?;
        let firsts: Vec<DateTime<Utc>> = notes
            .iter()
            .map(|n| n.first_seen.map_or(now, |f| f.min(now)))
            .collect();
        let owned = self.owns_attackers_in(&txn).await?;
        self.note_named_rows(&txn, notes, &keys, &firsts, owned, now)
            .await?;

        let mut by_ip = mapped_attackers_of(self, &txn, &keys, now).await?;
        let mut intakes = Vec::with_capacity(notes.len());
        let mut created: Vec<NewAttacker> = Vec::new();
        let mut touched: Vec<String> = Vec::new();
        for (key, first) in keys.iter().zip(&firsts) {
            let mut attackers: Vec<String> = by_ip
                .remove(key)
                .unwrap_or_default()
                .into_iter()
                .map(|a| a.uuid)
                .collect();
            let mut made = None;
            if attackers.is_empty() && owned {
                let uuid = uuid::Uuid::new_v4().hyphenated().to_string();
                created.push(NewAttacker {
                    uuid: uuid.clone(),
                    ip: key.clone(),
                    first_seen: *first,
                });
                attackers.push(uuid.clone());
                made = Some(uuid);
            } else if owned {
                touched.push(key.clone());
            }
            intakes.push(Intake {
                attacker_uuids: attackers,
                created: made,
                claims: None,
            });
        }
        // The attacker rows' writes go with the claim's first statement on PostgreSQL: the
        // claim writes only `enrichd_ip_state` and `enrichd_provider_state`, and reads neither
        // table these write.
        let mut joined = Joined::default();
        insert_attackers(self, &txn, &mut joined, &created, now).await?;
        if !touched.is_empty() {
            // Our own table: keep `last_seen` meaningful for the backlog's ordering.
            let mut p = Params::default();
            let now_p = p.push(dialect.ts(now));
            let list = p.list(touched);
            let touch = format!(
                "UPDATE attackers SET last_seen = {now_p}, updated_at = {now_p} WHERE uuid IN \
                 (SELECT attacker_uuid FROM enrichd_attacker_map WHERE ip IN ({list}))"
            );
            joined.add(dialect, &txn, touch, p.0).await?;
        }
        claim_with_intake(
            self,
            &txn,
            &mut joined,
            notes,
            &keys,
            claim,
            now,
            &mut intakes,
        )
        .await?;
        joined.finish(dialect, &txn).await?;
        txn.commit().await?;
        Ok(intakes)
    }

    /// Records the events' times on their `enrichd_ip_state` rows (created when missing), and
    /// returns the transaction's clock.
    async fn upsert_event_rows(
        &self,
        txn: &DatabaseTransaction,
        clock: Option<DateTime<Utc>>,
        notes: &[&EventNote],
        keys: &[String],
    ) -> Result<DateTime<Utc>, StoreError> {
        let dialect = self.dialect;
        // The upsert takes each IP row's lock (where rows are locked) until commit, in key order:
        // concurrent intake of one IP queues here, so `note_once`'s check for attacker rows
        // to create is race-free. When the clock was not read with `BEGIN`, the upsert uses
        // the database's own and returns it.
        let mut p = Params::default();
        let now_p = match clock {
            Some(now) => p.push(dialect.ts(now)),
            None => dialect.now_expr().to_owned(),
        };
        let rows: Vec<String> = notes
            .iter()
            .zip(keys)
            .map(|(note, key)| {
                let first = match (note.first_seen, clock) {
                    (None, _) => now_p.clone(),
                    (Some(first), Some(now)) => p.push(dialect.ts(first.min(now))),
                    (Some(first), None) => dialect.least(&p.push(dialect.ts(first)), &now_p),
                };
                format!(
                    "({}, {}, 0, {first}, {now_p}, {now_p})",
                    p.push(key.clone()),
                    p.push(note.scope.as_str()),
                )
            })
            .collect();
        let set = [
            Assign::Inserted("scope"),
            Assign::Inserted("last_event_at"),
            Assign::To {
                column: "first_event_at".into(),
                value: format!(
                    "COALESCE(enrichd_ip_state.first_event_at, {})",
                    dialect.inserted("first_event_at")
                ),
            },
            Assign::Inserted("updated_at"),
        ];
        let upsert = dialect.insert(
            "enrichd_ip_state (ip, scope, ptr_attempts, first_event_at, last_event_at, \
             updated_at)",
            &format!("VALUES {}", rows.join(", ")),
            OnConflict::Update {
                key: "ip",
                set: &set,
                only_if: None,
            },
        );
        // Without a clock read at `BEGIN`, the database's comes back with the upsert.
        let text = match (self.clock_item(clock), dialect.rows_back()) {
            (Some(item), RowsBack::Returning) => format!("{upsert} RETURNING {item}"),
            (None, _) => upsert,
        };
        let upserted = txn.query_all_raw(dialect.stmt(text, p.0)).await?;
        self.keyed_clock(txn, clock, upserted.first()).await
    }

    /// The attacker rows the events name: a row that exists is mapped from the address
    /// stored in it; a missing one is created under that uuid when enrichd owns `attackers`.
    async fn note_named_rows(
        &self,
        txn: &DatabaseTransaction,
        notes: &[&EventNote],
        keys: &[String],
        firsts: &[DateTime<Utc>],
        owned: bool,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        /// An attacker row an event names: the uuid as given, and the event's index.
        struct Named {
            uuid: String,
            note: usize,
        }
        let named: Vec<Named> = notes
            .iter()
            .enumerate()
            .filter_map(|(note, n)| {
                n.attacker_uuid.as_deref().map(|u| Named {
                    uuid: column_text(u.trim(), 36),
                    note,
                })
            })
            .collect();
        if named.is_empty() {
            return Ok(());
        }
        let dialect = self.dialect;
        let mut p = Params::default();
        let list = p.list(named.iter().map(|n| n.uuid.clone()));
        let rows = txn
            .query_all_raw(dialect.stmt(
                format!("SELECT uuid, ip FROM attackers WHERE uuid IN ({list})"),
                p.0,
            ))
            .await?;
        let mut stored = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let uuid: String = row.try_get("", "uuid")?;
            let ip: String = row.try_get("", "ip")?;
            stored.insert(uuid, ip);
        }
        let mut created = Vec::new();
        let mut found = Vec::new();
        for Named { uuid, note } in &named {
            if let Some(stored_ip) = stored.get(uuid) {
                found.push(AttackerAddress {
                    uuid: uuid.clone(),
                    stored_ip: stored_ip.clone(),
                });
            } else if owned && let Ok(parsed) = uuid::Uuid::parse_str(uuid) {
                created.push(NewAttacker {
                    uuid: parsed.hyphenated().to_string(),
                    ip: keys[*note].clone(),
                    first_seen: firsts[*note],
                });
            }
        }
        map_rows(self, txn, &found, now).await?;
        let mut joined = Joined::default();
        insert_attackers(self, txn, &mut joined, &created, now).await?;
        joined.finish(self.dialect, txn).await
    }

    /// Maps up to `limit` attacker rows not mapped yet to their canonical IP; a stored `ip`
    /// that is not an address is recorded once with its reason and never selected again.
    /// Returns how many rows were mapped.
    pub async fn sync_attacker_map(&self, limit: u32) -> Result<usize, StoreError> {
        let dialect = self.dialect;
        let (txn, now) = self.begin_write_at().await?;
        let rows = txn
            .query_all_raw(dialect.stmt(
                "SELECT a.uuid AS uuid, a.ip AS ip FROM attackers a WHERE NOT EXISTS \
                 (SELECT 1 FROM enrichd_attacker_map m WHERE m.attacker_uuid = a.uuid) \
                 ORDER BY a.uuid LIMIT $1",
                vec![i64::from(limit).into()],
            ))
            .await?;
        let mut found = Vec::with_capacity(rows.len());
        for row in &rows {
            found.push(AttackerAddress {
                uuid: row.try_get("", "uuid")?,
                stored_ip: row.try_get("", "ip")?,
            });
        }
        map_rows(self, &txn, &found, now).await?;
        txn.commit().await?;
        Ok(found.len())
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
        let dialect = self.dialect;
        let now = self.db_now().await?;
        let parked = self.parked_providers(now).await?;
        let providers: Vec<&str> = ctx
            .providers
            .iter()
            .filter(|p| !parked.contains(p))
            .map(|p| p.as_str())
            .collect();
        let mut values: Vec<Value> = vec![
            dialect.ts(now),
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
        let rows = self
            .read
            .query_all_raw(dialect.stmt(statement, values))
            .await?;
        let mut ips = Vec::with_capacity(rows.len());
        for row in rows {
            let text: String = row.try_get("", "ip")?;
            let ip = CanonicalIp::parse(&text)
                .map_err(|e| StoreError::malformed("enrichd_attacker_map.ip", e.to_string()))?;
            ips.push(ip);
        }
        Ok(ips)
    }

    /// Every address with an attacker row, in key order, `limit` at a time after `after`
    /// (`enrichd backfill --all`: a pass for each, whatever is due). Unmapped attacker rows
    /// are mapped first.
    pub async fn mapped_addresses(
        &self,
        after: Option<CanonicalIp>,
        limit: u32,
    ) -> Result<Vec<CanonicalIp>, StoreError> {
        if after.is_none() {
            let batch = limit.max(500);
            while self.sync_attacker_map(batch).await? >= batch as usize {}
        }
        let dialect = self.dialect;
        let order = dialect.byte_order("ip");
        let statement = format!(
            "SELECT ip FROM enrichd_attacker_map m \
             WHERE ip IS NOT NULL AND {order} > $1 \
             AND EXISTS (SELECT 1 FROM attackers a WHERE a.uuid = m.attacker_uuid) \
             GROUP BY ip ORDER BY {order} LIMIT $2"
        );
        let rows = self
            .read
            .query_all_raw(dialect.stmt(
                statement,
                vec![
                    after.map_or_else(String::new, |ip| ip.to_string()).into(),
                    i64::from(limit).into(),
                ],
            ))
            .await?;
        let mut ips = Vec::with_capacity(rows.len());
        for row in rows {
            let text: String = row.try_get("", "ip")?;
            ips.push(
                CanonicalIp::parse(&text)
                    .map_err(|e| StoreError::malformed("enrichd_attacker_map.ip", e.to_string()))?,
            );
        }
        Ok(ips)
    }
}
/// Claims, in the intake's transaction, the work of the events that ask for it
/// ([`EventNote::claim`]). The intake's upsert locked their `enrichd_ip_state` rows in key
/// order, as a claim of its own would. The claim's first statement carries `joined`.
#[expect(
    clippy::too_many_arguments,
    reason = "the intake's state, passed as it is by its one caller"
)]
async fn claim_with_intake(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    notes: &[&EventNote],
    keys: &[String],
    claim: &ClaimSettings,
    now: DateTime<Utc>,
    intakes: &mut [Intake],
) -> Result<(), StoreError> {
    let to_claim: Vec<String> = notes
        .iter()
        .zip(keys)
        .filter(|(note, _)| note.claim)
        .map(|(_, key)| key.clone())
        .collect();
    if to_claim.is_empty() {
        return Ok(());
    }
    let created = HashSet::new();
    let mut claimed = LockedClaim {
        store,
        txn,
        keys: &to_claim,
        created: &created,
        wanted: &claim.providers,
        ptr: claim.ptr,
        lease: Lease::starting(now, claim.lease),
        now,
        mode: ClaimMode::Due,
    }
    .run(joined)
    .await?;
    for ((note, key), intake) in notes.iter().zip(keys).zip(intakes) {
        if note.claim {
            intake.claims = Some(claimed.remove(key).unwrap_or_default());
        }
    }
    Ok(())
}
