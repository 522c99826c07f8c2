//! Attacker rows: mapping them to canonical IPs (`enrichd_attacker_map`), creating them when
//! enrichd owns `attackers`, and the rows every attacker of a written address sees
//! (`attacker_intel`, `attackers.ptr_record`; the outbox rows through [`crate::outbox`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use enrichd_core::CanonicalIp;
use enrichd_core::text::column_text;
use sea_orm::{ConnectionTrait, DatabaseTransaction};

use crate::apply::{ApplyItem, ApplyOutcome};
use crate::outbox::{HandedOff, OutboxEntry, enqueue_rows};
use crate::sql::{self, Assign, Bound, Dialect, Joined, OnConflict, Params};
use crate::state::{self, ApplyContext, IntelColumns, ProviderState};
use crate::transition::PtrChange;
use crate::{Store, StoreError};

/// Rows a batch writes once every address's state is known.
#[derive(Default)]
struct RowWrites<'a> {
    /// `attacker_intel` rows.
    intel: Vec<IntelRow>,
    /// Merged columns, one per address in batch order.
    columns: Vec<IntelColumns<'a>>,
    /// `attackers.ptr_record` values to set.
    ptr_names: Vec<PtrRecord>,
    /// Addresses whose stored name a negative answer cleared.
    ptr_cleared: Vec<ClearedPtr>,
    /// Outbox rows.
    outbox: Vec<OutboxEntry>,
}

/// An attacker's `attacker_intel` row, to be written from its address's merged columns.
struct IntelRow {
    attacker_uuid: String,
    /// The address's index in the batch, which is also its index into the merged columns.
    address: usize,
}

/// An `attackers.ptr_record` value to keep in step with the stored name.
struct PtrRecord {
    attacker_uuid: String,
    name: String,
}

/// An address whose stored PTR name a negative answer cleared, with that name.
struct ClearedPtr {
    ip: String,
    old_name: String,
}

/// An attacker row for enrichd's own `attackers` table, created by intake.
pub(crate) struct NewAttacker {
    /// The row's uuid (hyphenated).
    pub(crate) uuid: String,
    /// The canonical address it is created for.
    pub(crate) ip: String,
    pub(crate) first_seen: DateTime<Utc>,
}

/// An attacker row to map: its uuid and the `ip` text stored in it, canonical or not.
pub(crate) struct AttackerAddress {
    pub(crate) uuid: String,
    pub(crate) stored_ip: String,
}

/// A batch's addresses with the state the write settled on, in key order.
pub(crate) struct Settled<'a> {
    pub(crate) items: &'a [&'a ApplyItem],
    pub(crate) keys: &'a [String],
    /// Old and new PTR state of each address.
    pub(crate) ptrs: &'a [PtrChange],
    /// Provider states of each address after the write.
    pub(crate) states: &'a HashMap<String, Vec<ProviderState>>,
    /// Every attacker of each address, as read under the addresses' locks.
    pub(crate) attackers: &'a HashMap<String, Vec<MappedAttacker>>,
}

/// The rows every attacker of the batch's addresses sees: `attacker_intel`, `ptr_record` and
/// (with a bus) the outbox, recomputed from the merged stored state.
pub(crate) async fn write_attacker_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    settled: Settled<'_>,
    ctx: &ApplyContext,
    now: DateTime<Utc>,
    outcomes: &mut [ApplyOutcome],
) -> Result<(), StoreError> {
    let Settled {
        items,
        keys,
        ptrs,
        states,
        attackers,
    } = settled;
    let mut rows = RowWrites::default();
    for (index, (item, key)) in items.iter().zip(keys).enumerate() {
        if !item.write_rows {
            // Keeps `columns` one per address: `intel` points into it by index.
            rows.columns.push(IntelColumns::empty(key, now, now));
            continue;
        }
        let PtrChange {
            old: old_ptr,
            new: new_ptr,
        } = &ptrs[index];
        let known = states.get(key).map_or(&[][..], Vec::as_slice);
        let merged = state::merge(key, item.scope, known, new_ptr, ctx, now);
        let of_ip = attackers.get(key).map_or(&[][..], Vec::as_slice);
        match (old_ptr.name.as_deref(), new_ptr.name.as_deref()) {
            (_, Some(name)) => rows.ptr_names.extend(of_ip.iter().map(|a| PtrRecord {
                attacker_uuid: a.uuid.clone(),
                name: name.to_owned(),
            })),
            (Some(old), None) => rows.ptr_cleared.push(ClearedPtr {
                ip: key.clone(),
                old_name: old.to_owned(),
            }),
            (None, None) => {}
        }
        if ctx.outbox_enabled && item.scope.is_global() {
            for attacker in of_ip {
                let mut payload = merged.payload.clone();
                payload.attacker_uuid = Some(attacker.uuid.clone());
                let digest = state::payload_digest(&payload);
                if attacker.digest.as_deref() == Some(digest.as_str()) {
                    continue;
                }
                rows.outbox.push(OutboxEntry {
                    attacker_uuid: attacker.uuid.clone(),
                    payload,
                    digest,
                    address: index,
                });
                outcomes[index].events += 1;
            }
        }
        outcomes[index].intel_rows = of_ip.len();
        rows.intel.extend(of_ip.iter().map(|a| IntelRow {
            attacker_uuid: a.uuid.clone(),
            address: index,
        }));
        rows.columns.push(merged.columns);
    }
    for cleared in &rows.ptr_cleared {
        clear_ptr_record(store, txn, cleared).await?;
    }
    // The rest write distinct rows (`attacker_intel`, `attackers`, the map's digests, the
    // outbox) and nothing reads them before commit: they join the caller's `joined`.
    upsert_intel_rows(store, txn, joined, &rows.intel, &rows.columns).await?;
    set_ptr_records(store, txn, joined, &rows.ptr_names).await?;
    // Attacker order, the order the relay deletes in (no lock cycle between the two).
    rows.outbox
        .sort_by(|a, b| a.attacker_uuid.cmp(&b.attacker_uuid));
    let claim_until = ctx.relay_claim.map(|claim| {
        now + chrono::Duration::from_std(claim).unwrap_or(chrono::Duration::seconds(30))
    });
    let handed_off = enqueue_rows(store, txn, joined, &rows.outbox, now, claim_until).await?;
    for HandedOff { address, row } in handed_off {
        outcomes[address].handed_off.push(row);
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub(crate) struct MappedAttacker {
    pub(crate) uuid: String,
    pub(crate) digest: Option<String>,
}

/// Maps attacker rows whose stored `ip` is one of these canonical texts (the common case;
/// other spellings are mapped by `sync_attacker_map`), then lists every attacker of each IP:
/// one statement on PostgreSQL, two on SQLite.
pub(crate) async fn mapped_attackers_of<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    keys: &[String],
    now: DateTime<Utc>,
) -> Result<HashMap<String, Vec<MappedAttacker>>, StoreError> {
    let dialect = store.dialect;
    let mut by_ip: HashMap<String, Vec<MappedAttacker>> = HashMap::with_capacity(keys.len());
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(dialect.ts(now));
        let list = p.list(keys.iter().cloned());
        let rows = if dialect.writing_ctes() {
            db.query_all_raw(dialect.stmt(
                format!(
                    "WITH {} {} ORDER BY ip, attacker_uuid",
                    synced_cte(dialect, &now_p, &list),
                    attackers_with_synced(&list)
                ),
                p.0,
            ))
            .await?
        } else {
            db.execute_raw(dialect.stmt(sync_statement(dialect, &now_p, &list), p.0))
                .await?;
            let mut p = Params::default();
            let list = p.list(keys.iter().cloned());
            db.query_all_raw(dialect.stmt(
                format!("{} ORDER BY m.ip, m.attacker_uuid", mapped_select(&list)),
                p.0,
            ))
            .await?
        };
        for row in &rows {
            let ip: String = row.try_get("", "ip")?;
            by_ip.entry(ip).or_default().push(MappedAttacker {
                uuid: row.try_get("", "attacker_uuid")?,
                digest: row.try_get("", "payload_digest")?,
            });
        }
    }
    Ok(by_ip)
}

/// Maps the attacker rows not mapped yet whose stored `ip` is one of the addresses in the
/// placeholder `list`, at the placeholder `now`.
fn sync_statement(dialect: Dialect, now: &str, list: &str) -> String {
    dialect.insert(
        "enrichd_attacker_map (attacker_uuid, ip, mapped_at)",
        &format!(
            "SELECT a.uuid, a.ip, {now} FROM attackers a WHERE a.ip IN ({list}) \
             AND NOT EXISTS (SELECT 1 FROM enrichd_attacker_map m \
             WHERE m.attacker_uuid = a.uuid)"
        ),
        OnConflict::Ignore {
            key: "attacker_uuid",
        },
    )
}

/// [`sync_statement`] as the CTE `synced`, returning the rows it maps, for a dialect with
/// data-modifying CTEs (PostgreSQL).
pub(crate) fn synced_cte(dialect: Dialect, now: &str, list: &str) -> String {
    format!(
        "synced AS ({} RETURNING ip, attacker_uuid, payload_digest)",
        sync_statement(dialect, now, list)
    )
}

/// Every attacker of the addresses in the placeholder `list` (`ip`, `attacker_uuid`,
/// `payload_digest`), beside a [`synced_cte`]: one round trip maps and lists them. The rows
/// the sync maps come back from it, since the outer query's snapshot does not see them (so
/// none is listed twice).
pub(crate) fn attackers_with_synced(list: &str) -> String {
    format!(
        "{} UNION ALL SELECT ip, attacker_uuid, payload_digest FROM synced",
        mapped_select(list)
    )
}

/// The attackers mapped to the addresses in the placeholder `list`.
fn mapped_select(list: &str) -> String {
    format!(
        "SELECT m.ip AS ip, m.attacker_uuid AS attacker_uuid, m.payload_digest AS payload_digest \
         FROM enrichd_attacker_map m JOIN attackers a ON a.uuid = m.attacker_uuid \
         WHERE m.ip IN ({list})"
    )
}

/// Every `attacker_intel` row in `intel` upserted from its address's `columns`, a few hundred
/// rows per statement.
async fn upsert_intel_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    intel: &[IntelRow],
    columns: &[IntelColumns<'_>],
) -> Result<(), StoreError> {
    const COLUMNS: [&str; 23] = [
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
    let dialect = store.dialect;
    let updates: Vec<Assign> = COLUMNS.into_iter().map(Assign::Inserted).collect();
    for chunk in intel.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let version = p.push(1_i32);
        let rows: Vec<String> = chunk
            .iter()
            .filter_map(|row| {
                let c = columns.get(row.address)?;
                let placeholders = [
                    p.push(uuid::Uuid::new_v4().simple().to_string()),
                    p.push(row.attacker_uuid.clone()),
                    p.push(c.attacker_ip.clone()),
                    p.push(c.greynoise_classification.clone()),
                    p.push(c.greynoise_name.clone()),
                    p.push_json(dialect, Some(&c.greynoise_tags)),
                    p.push_json_object(dialect, c.greynoise_raw),
                    p.push(dialect.ts_opt(c.greynoise_queried_at)),
                    p.push(c.abuseipdb_score),
                    p.push_json(dialect, Some(&c.abuseipdb_categories)),
                    p.push_json_object(dialect, c.abuseipdb_raw),
                    p.push(dialect.ts_opt(c.abuseipdb_queried_at)),
                    p.push(c.feodo_listed),
                    p.push(c.feodo_malware_family.clone()),
                    p.push_json_object(dialect, c.feodo_raw),
                    p.push(dialect.ts_opt(c.feodo_queried_at)),
                    p.push(c.threatfox_listed),
                    p.push_json(dialect, Some(&c.threatfox_threat_types)),
                    p.push_json(dialect, Some(&c.threatfox_ioc_types)),
                    p.push_json(dialect, Some(&c.threatfox_malware_families)),
                    p.push_json_object(dialect, c.threatfox_raw),
                    p.push(dialect.ts_opt(c.threatfox_queried_at)),
                    p.push(c.aggregate_verdict.clone()),
                    p.push(dialect.ts(c.cached_at)),
                    p.push(dialect.ts(c.expires_at)),
                ];
                Some(format!("({}, {version})", placeholders.join(", ")))
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let statement = dialect.insert(
            &format!(
                "attacker_intel (uuid, attacker_uuid, {}, schema_version)",
                COLUMNS.join(", ")
            ),
            &format!("VALUES {}", rows.join(", ")),
            OnConflict::Update {
                key: "attacker_uuid",
                set: &updates,
                only_if: None,
            },
        );
        joined.add(dialect, txn, statement, p.0).await?;
    }
    Ok(())
}

/// Keeps `attackers.ptr_record` in step with the stored name: each of `names` is written where
/// it differs, which also restores a name something else nulled.
async fn set_ptr_records(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    names: &[PtrRecord],
) -> Result<(), StoreError> {
    let dialect = store.dialect;
    for chunk in names.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let arms: Vec<String> = chunk
            .iter()
            .map(|record| {
                format!(
                    "WHEN {} THEN {}",
                    p.push(record.attacker_uuid.clone()),
                    p.push(record.name.clone())
                )
            })
            .collect();
        let name_of = format!("CASE uuid {} END", arms.join(" "));
        let uuids = p.list(chunk.iter().map(|record| record.attacker_uuid.clone()));
        let statement = format!(
            "UPDATE attackers SET ptr_record = {name_of} WHERE uuid IN ({uuids}) \
             AND (ptr_record IS NULL OR ptr_record <> {name_of})"
        );
        joined.add(dialect, txn, statement, p.0).await?;
    }
    Ok(())
}

/// A negative PTR answer cleared an address's stored name: remove it from the address's
/// attacker rows (only where it is still that name).
async fn clear_ptr_record(
    store: &Store,
    txn: &DatabaseTransaction,
    cleared: &ClearedPtr,
) -> Result<(), StoreError> {
    txn.execute_raw(store.dialect.stmt(
        "UPDATE attackers SET ptr_record = NULL WHERE uuid IN \
         (SELECT attacker_uuid FROM enrichd_attacker_map WHERE ip = $1) AND ptr_record = $2",
        vec![cleared.ip.clone().into(), cleared.old_name.clone().into()],
    ))
    .await?;
    Ok(())
}

/// Records `uuid → canonical(stored ip)`, or "not an IP" with the reason, once, for each
/// row; a few hundred rows per statement.
pub(crate) async fn map_rows<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    rows: &[AttackerAddress],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(sql::ROWS_PER_STATEMENT) {
        let Bound { text, values } = map_statement(store, chunk, now);
        db.execute_raw(store.dialect.stmt(text, values)).await?;
    }
    Ok(())
}

/// The statement of [`map_rows`] for one chunk.
fn map_statement(store: &Store, chunk: &[AttackerAddress], now: DateTime<Utc>) -> Bound {
    let mut p = Params::default();
    let now_p = p.push(store.dialect.ts(now));
    let values: Vec<String> = chunk
        .iter()
        .map(|row| {
            let (ip, reason) = match CanonicalIp::parse(&row.stored_ip) {
                Ok(ip) => (Some(ip.to_string()), None),
                Err(e) => (None, Some(column_text(&e.to_string(), 128))),
            };
            format!(
                "({}, {}, {}, {now_p})",
                p.push(row.uuid.clone()),
                p.push(ip),
                p.push(reason)
            )
        })
        .collect();
    Bound {
        text: store.dialect.insert(
            "enrichd_attacker_map (attacker_uuid, ip, reason, mapped_at)",
            &format!("VALUES {}", values.join(", ")),
            OnConflict::Ignore {
                key: "attacker_uuid",
            },
        ),
        values: p.0,
    }
}

/// Inserts attacker rows into enrichd's own `attackers` table, every NOT NULL column written, with the stored PTR name if there is one, and maps
/// them: added to `joined`, which the caller runs.
pub(crate) async fn insert_attackers<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    joined: &mut Joined,
    rows: &[NewAttacker],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let dialect = store.dialect;
    for chunk in rows.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(dialect.ts(now));
        let values: Vec<String> = chunk
            .iter()
            .map(|row| {
                let ip = p.push(row.ip.clone());
                format!(
                    "({}, {ip}, {}, {now_p}, {now_p}, \
                     (SELECT ptr_name FROM enrichd_ip_state WHERE ip = {ip}))",
                    p.push(row.uuid.clone()),
                    p.push(dialect.ts(row.first_seen))
                )
            })
            .collect();
        let insert = dialect.insert(
            "attackers (uuid, ip, first_seen, last_seen, updated_at, ptr_record)",
            &format!("VALUES {}", values.join(", ")),
            OnConflict::Ignore { key: "uuid" },
        );
        let mapped: Vec<AttackerAddress> = chunk
            .iter()
            .map(|row| AttackerAddress {
                uuid: row.uuid.clone(),
                stored_ip: row.ip.clone(),
            })
            .collect();
        // The map has no foreign key to `attackers`, so the two need not see each other: one
        // round trip for both on PostgreSQL.
        let map = map_statement(store, &mapped, now);
        joined.add(dialect, db, insert, p.0).await?;
        joined.add(dialect, db, map.text, map.values).await?;
    }
    Ok(())
}
