//! The scenarios of issue 7, each pushing its figures into a [`ScenarioReport`] as it goes,
//! so a scenario cut short by its time cap still reports what it measured.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use enrichd_bus::Topology;
use enrichd_core::ProviderId;
use enrichd_core::payload::TOPIC_SCORED;
use enrichd_harness::bus::{Enriched, TestBus};
use enrichd_harness::enrichd::{Enrichd, Limits, PER_ADDRESS};
use enrichd_harness::events;
use enrichd_harness::fakes::{Fakes, Stats};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::amqp;
use crate::db::{self, Target as Db};
use crate::enrichd::{Launcher, Watch};
use crate::floor;
use crate::procs::{self, CpuSnapshot, Profiler, round3};
use crate::report::{Figure, ScenarioReport, Target};

/// Prefetch enrichd uses by default (SPEC §4), used by the bare consumer too.
const PREFETCH: u16 = 500;
/// Events excluded from the latency percentiles while pools and caches warm up.
const LATENCY_WARMUP: usize = 500;

/// Sizes and knobs of the run.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    pub latency_ms: u64,
    pub backfill_attackers: usize,
    pub ingest_events: usize,
    pub ingest_ips: usize,
    pub ceiling_messages: usize,
    pub ceiling_rows: usize,
    pub latency_events: usize,
    pub latency_rate: u32,
    pub rss_ips: usize,
}

/// Everything the scenarios share.
pub(crate) struct Ctx {
    pub run_id: String,
    pub sizes: Sizes,
    pub launcher: Launcher,
    pub fakes: Fakes,
    pub pg_server: String,
    pub amqp_url: String,
    pub work_dir: PathBuf,
    pub ticks: f64,
    pub perf: bool,
    /// Log statements slower than this in the server log (`log_min_duration_statement`, set
    /// on the scenario's database only).
    pub pg_log_slow_ms: Option<u64>,
    /// The bare consumer's rate from the ceilings, the yardstick of ingestion.
    pub bare_consumer_rate: Mutex<Option<f64>>,
    /// The unmetered reference-shaped backfill's rate, the yardstick of the metered one.
    pub unmetered_backfill_rate: Mutex<Option<f64>>,
    /// Databases and topologies to remove at the end.
    pub cleanup: Mutex<Cleanup>,
}

/// What the run created.
#[derive(Default)]
pub(crate) struct Cleanup {
    pub databases: Vec<Db>,
    pub topologies: Vec<Topology>,
}

/// Addresses `first_octet.x.y.z` counting up from `.0.0.1`: global unicast space (45/8 and
/// its neighbours hold no special-purpose block), distinct per scenario.
pub(crate) fn ips(first_octet: u8, n: usize) -> Vec<Ipv4Addr> {
    let base = u32::from(first_octet) << 24;
    (1..=n)
        .map(|i| Ipv4Addr::from(base + u32::try_from(i).unwrap_or(u32::MAX)))
        .collect()
}

fn per_sec(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

impl Ctx {
    async fn pg(&self, label: &str) -> anyhow::Result<Db> {
        let target = Db::Postgres {
            server: self.pg_server.clone(),
            name: format!("enrichd_bench_{}_{label}", self.run_id),
        };
        target.create().await?;
        if let Some(ms) = self.pg_log_slow_ms {
            db::log_slow_statements(&target, ms).await?;
        }
        self.cleanup.lock().await.databases.push(target.clone());
        Ok(target)
    }

    async fn sqlite(&self, label: &str) -> anyhow::Result<Db> {
        let target = Db::Sqlite {
            path: self.work_dir.join(format!("{label}.db")),
        };
        target.create().await?;
        self.cleanup.lock().await.databases.push(target.clone());
        Ok(target)
    }

    /// Connects as `name` and declares enrichd's topology under the scenario's own names,
    /// removed at the end of the run.
    async fn bus(&self, label: &str, name: &str) -> anyhow::Result<TestBus> {
        let topology = Topology::new(
            &format!("enrichd-bench.{}.{label}", self.run_id),
            &format!("enrichd-bench.{}.{label}.work", self.run_id),
        );
        let bus = TestBus::declare(&self.amqp_url, name, topology.clone()).await?;
        self.cleanup.lock().await.topologies.push(topology);
        Ok(bus)
    }

    fn snapshot(&self, enrichd_pid: Option<u32>) -> CpuSnapshot {
        let mut pids = vec![("fakes", self.fakes.pid())];
        if let Some(pid) = enrichd_pid {
            pids.push(("enrichd", pid));
        }
        procs::cpu_snapshot(&pids)
    }

    fn profiler(&self, pid: u32, label: &str) -> Option<Profiler> {
        self.perf.then(|| {
            Profiler::attach(
                pid,
                &self.work_dir.join(format!("{label}.perf.data")),
                &self.work_dir.join(format!("{label}.perf.log")),
            )
        })?
    }
}

// === (a) ceilings ===

/// The machine's own ceilings: a bare lapin consumer with per-message acks on enrichd's kind
/// of queue, and batched upserts and small transactions on the same databases.
pub(crate) async fn ceilings(ctx: &Ctx, report: &mut ScenarioReport) -> anyhow::Result<()> {
    let sizes = &ctx.sizes;
    let bus = ctx.bus("ceiling", "enrichd-bench ceiling").await?;
    let addresses = ips(44, sizes.ingest_ips);
    let n = sizes.ceiling_messages;
    let bodies = (0..n).map(|i| amqp::scored(addresses[i % addresses.len()], i as u64));
    let publish_rate = amqp::publish_all(&bus, bodies).await?;
    report.figures.push(Figure::info(
        "publish_confirmed_per_sec",
        publish_rate,
        "msg/s",
        format!(
            "{n} persistent attacker.scored envelopes into a quorum queue, confirms, 1000 in flight"
        ),
    ));
    let before = ctx.snapshot(None);
    let (consumed, secs) = amqp::bare_consume(
        &bus,
        &bus.topology.queue,
        PREFETCH,
        n as u64,
        Duration::from_secs(120),
    )
    .await?;
    let cpu = before.until(&ctx.snapshot(None), ctx.ticks);
    let rate = per_sec(usize::try_from(consumed).unwrap_or(0), secs);
    let mut figure = Figure::info(
        "bare_consumer_per_sec",
        rate,
        "msg/s",
        format!(
            "lapin, prefetch {PREFETCH}, enrichd's decode, one ack per message; {consumed} messages"
        ),
    );
    if consumed != n as u64 {
        figure.status = crate::report::Status::Incomplete;
    }
    report.figures.push(figure);
    *ctx.bare_consumer_rate.lock().await = Some(rate);
    report.details["bare_consumer_cpu"] = json!(cpu);
    for failure in bus.delete().await {
        eprintln!("enrichd-bench: cleanup: {failure}");
    }
    bus.close().await;

    let pg = ctx.pg("ceiling").await?;
    let (insert, upsert) = db::upsert_ceiling(&pg, sizes.ceiling_rows).await?;
    report.figures.push(Figure::info(
        "pg_batched_insert_rows_per_sec",
        insert,
        "rows/s",
        format!(
            "{} rows, 500-row INSERT, autocommit, one connection",
            sizes.ceiling_rows
        ),
    ));
    report.figures.push(Figure::info(
        "pg_batched_upsert_rows_per_sec",
        upsert,
        "rows/s",
        "the same keys again: every row conflicts and updates",
    ));
    let tx = db::transaction_ceiling(&pg, 2000, 8).await?;
    report.figures.push(Figure::info(
        "pg_small_transactions_per_sec",
        tx,
        "tx/s",
        "BEGIN; SELECT .. FOR UPDATE; UPDATE; COMMIT over 8 connections (enrichd's pool size)",
    ));
    let lite = ctx.sqlite("ceiling").await?;
    let (insert, upsert) = db::upsert_ceiling(&lite, sizes.ceiling_rows).await?;
    report.figures.push(Figure::info(
        "sqlite_batched_insert_rows_per_sec",
        insert,
        "rows/s",
        "WAL, synchronous=NORMAL, 500-row INSERT",
    ));
    report.figures.push(Figure::info(
        "sqlite_batched_upsert_rows_per_sec",
        upsert,
        "rows/s",
        "WAL, synchronous=NORMAL, every row conflicts and updates",
    ));
    let tx = db::transaction_ceiling(&lite, 2000, 1).await?;
    report.figures.push(Figure::info(
        "sqlite_small_transactions_per_sec",
        tx,
        "tx/s",
        "one writer connection, autocommit-free BEGIN/SELECT/UPDATE/COMMIT",
    ));
    Ok(())
}

// === (b), (f) backfill ===

/// `enrichd backfill` over attackers inserted directly into a database enrichd migrated.
/// What a backfill scenario runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BackfillShape {
    /// The providers' limits.
    pub limits: Limits,
    /// `attackers` created by the reference (its NOT NULL columns), not by enrichd.
    pub reference_tables: bool,
}

impl std::fmt::Display for BackfillShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.limits {
            Limits::Default => f.write_str("default limits")?,
            Limits::Lifted => f.write_str("limits lifted")?,
            Limits::Metered {
                rate_per_sec,
                daily_quota,
            } => write!(f, "metered at {rate_per_sec}/s, {daily_quota}/day")?,
        }
        if self.reference_tables {
            f.write_str(", the reference's attackers table")?;
        }
        Ok(())
    }
}

/// The configured rate of the metered backfill: far above what the run reaches, so the
/// slot reservations, not the limit, are what it measures.
pub(crate) const METERED_RATE: f64 = 10_000.0;

#[allow(clippy::too_many_lines, reason = "a scenario reads top to bottom")]
pub(crate) async fn backfill(
    ctx: &Ctx,
    report: &mut ScenarioReport,
    target: &Db,
    label: &str,
    first_octet: u8,
    shape: BackfillShape,
) -> anyhow::Result<()> {
    let n = ctx.sizes.backfill_attackers;
    let env = ctx.launcher.env(&target.url(), None, shape.limits);
    if shape.reference_tables {
        db::create_reference_attackers(target).await?;
    }
    ctx.launcher.migrate(label, &env).await?;
    db::insert_attackers(target, &ips(first_octet, n)).await?;
    ctx.fakes.reset().await?;

    let activity = db::ActivitySampler::start(target);
    let started = Instant::now();
    let mut child = ctx.launcher.start("backfill", label, &env)?;
    let pid = child.process().pid();
    let before = ctx.snapshot(Some(pid));
    let watch = Watch::start(pid, ctx.ticks);
    let profiler = ctx.profiler(pid, label);
    let exit = child
        .process_mut()
        .wait_exit(Duration::from_secs(240))
        .await;
    let wall = started.elapsed().as_secs_f64();
    watch.stop.store(true, Ordering::Relaxed);
    let mut cpu = before.until(&ctx.snapshot(None), ctx.ticks);
    cpu.groups.insert("enrichd".into(), watch.cpu_secs());
    cpu.other = round3((cpu.other - watch.cpu_secs()).max(0.0));
    let activity = match activity {
        Some(a) => a.finish().await,
        None => Value::Null,
    };
    if let Some(p) = profiler {
        p.stop().await;
    }
    let exited_ok = match exit {
        Some(s) if s.success() => true,
        Some(s) => bail!(
            "enrichd backfill failed ({s}):\n{}",
            child.process().log_tail(20)
        ),
        None => {
            let _ = child.process_mut().terminate(Duration::from_secs(5)).await;
            false
        }
    };
    let conn = target.connect(1).await?;
    let intel = db::scalar_i64(&conn, "SELECT COUNT(*) FROM attacker_intel").await?;
    let with_ptr = db::scalar_i64(
        &conn,
        "SELECT COUNT(*) FROM attackers WHERE ptr_record IS NOT NULL",
    )
    .await?;
    let _ = conn.close().await;
    let stats = ctx.fakes.stats().await?;
    let complete = exited_ok && usize::try_from(intel).unwrap_or(0) == n;

    let rate = per_sec(n, wall);
    report.figures.push(Figure::judged(
        "attackers_per_sec",
        rate,
        "attackers/s",
        Target::AtLeast(1000.0),
        complete,
        format!(
            "{n} attackers, wall time of the `enrichd backfill` process ({wall:.2} s, start-up \
             included); {intel} intel rows, {with_ptr} PTR names written; {shape}"
        ),
    ));
    if shape.reference_tables {
        push_metered_share(ctx, report, shape.limits, rate, complete).await;
    }
    if let Some((first, last)) = span_ms(&stats, &PER_ADDRESS) {
        let secs = (last.saturating_sub(first)).max(1) as f64 / 1000.0;
        report.figures.push(Figure::info(
            "provider_phase_attackers_per_sec",
            per_sec(n, secs),
            "attackers/s",
            format!("first to last provider request at the fakes ({secs:.2} s): start-up and the last write excluded"),
        ));
        report.figures.push(Figure::info(
            "startup_secs",
            round3((first as f64 / 1000.0) - epoch_secs_at(started)),
            "s",
            "process start to its first provider request (migration check, pool, feed download)",
        ));
    }
    push_calls_per_ip(report, &stats, n, complete);
    report.figures.push(Figure::info(
        "enrichd_cpu_secs",
        watch.cpu_secs(),
        "s",
        "user+system CPU of enrichd (sampled every 100 ms)",
    ));
    report.figures.push(Figure::info(
        "peak_rss_mib",
        watch.hwm_mib(),
        "MiB",
        "VmHWM of enrichd",
    ));
    record_cpu(report, &cpu);
    report.details["fakes"] = json!(stats.without_timelines());
    let counters = db::pg_counters(target).await;
    push_commits(report, &counters, n, "address");
    report.details["database"] = counters;
    report.details["database_activity"] = activity;
    Ok(())
}

/// The metered reference-shaped backfill against the unmetered one: what taking slots costs.
async fn push_metered_share(
    ctx: &Ctx,
    report: &mut ScenarioReport,
    limits: Limits,
    rate: f64,
    complete: bool,
) {
    let Limits::Metered { daily_quota, .. } = limits else {
        *ctx.unmetered_backfill_rate.lock().await = Some(rate);
        return;
    };
    match *ctx.unmetered_backfill_rate.lock().await {
        // The gate's own cost: a rate, as every keyed provider has by default, is judged.
        Some(unmetered) if unmetered > 0.0 && daily_quota == 0 => {
            report.figures.push(Figure::judged(
                "metered_share_of_unmetered",
                round3(rate / unmetered),
                "ratio",
                Target::AtLeast(0.9),
                complete,
                format!(
                    "{rate:.0} attackers/s with every keyed provider metered at \
                     {METERED_RATE}/s against {unmetered:.0}/s unmetered, same shape and size"
                ),
            ));
        }
        // With a daily quota an answer also keeps its concurrency slot until it is written
        // (what a crash can waste is bounded by the concurrency): what that costs, shown.
        Some(unmetered) if unmetered > 0.0 => report.figures.push(Figure::info(
            "quota_share_of_unmetered",
            round3(rate / unmetered),
            "ratio",
            format!(
                "{rate:.0} attackers/s metered at {METERED_RATE}/s and {daily_quota}/day, \
                 slots held until each answer is written, against {unmetered:.0}/s unmetered"
            ),
        )),
        _ => {
            report.details["note"] =
                Value::from("run backfill_reference_sqlite before this scenario for the ratio");
        }
    }
}

/// PostgreSQL commits per unit of work, from `pg_stat_database` (each commit is a WAL flush).
fn push_commits(report: &mut ScenarioReport, counters: &Value, units: usize, unit: &str) {
    if let Some(commits) = counters["xact_commit"].as_i64() {
        report.figures.push(Figure::info(
            &format!("pg_commits_per_{unit}"),
            if units == 0 { 0.0 } else { commits as f64 / units as f64 },
            "",
            format!("{commits} commits in the scenario's database (migration and bench queries included)"),
        ));
    }
}

/// The epoch time (seconds) at which `instant` happened.
fn epoch_secs_at(instant: Instant) -> f64 {
    let now_epoch = chrono::Utc::now().timestamp_micros();
    let now = now_epoch as f64 / 1e6;
    now - instant.elapsed().as_secs_f64()
}

/// First and last arrival (epoch ms) at the fakes over the given providers.
fn span_ms(stats: &Stats, providers: &[ProviderId]) -> Option<(u64, u64)> {
    let times = providers.iter().flat_map(|p| stats.timeline(*p));
    let first = times.clone().min()?;
    let last = times.max()?;
    Some((*first, *last))
}

/// Provider calls per unique address for each per-address provider, and Feodo downloads.
fn push_calls_per_ip(report: &mut ScenarioReport, stats: &Stats, unique: usize, complete: bool) {
    for provider in PER_ADDRESS {
        let k = stats.per_key(provider);
        let ratio = if unique > 0 {
            k.total as f64 / unique as f64
        } else {
            0.0
        };
        report.figures.push(Figure::judged(
            &format!("{provider}_calls_per_ip"),
            ratio,
            "",
            Target::Exactly(1.0),
            complete && k.distinct == unique as u64,
            format!(
                "/_stats: {} calls, {} distinct addresses, at most {} per address",
                k.total, k.distinct, k.max_per_key
            ),
        ));
    }
    report.figures.push(Figure::info(
        "feodo_downloads",
        stats.requests(ProviderId::Feodo) as f64,
        "",
        "feed downloads (not per address)",
    ));
}

// === helpers for `enrichd run` scenarios ===

/// A running `enrichd run` with its watchers.
struct Running {
    child: Enrichd,
    watch: Arc<Watch>,
    before: CpuSnapshot,
    profiler: Option<Profiler>,
    activity: Option<db::ActivitySampler>,
}

impl Running {
    fn start(ctx: &Ctx, target: &Db, topology: &Topology, label: &str) -> anyhow::Result<Self> {
        let env = ctx.launcher.env(
            &target.url(),
            Some((&ctx.amqp_url, topology)),
            Limits::Lifted,
        );
        let activity = db::ActivitySampler::start(target);
        let child = ctx.launcher.start("run", label, &env)?;
        let pid = child.process().pid();
        let before = ctx.snapshot(Some(pid));
        let watch = Watch::start(pid, ctx.ticks);
        let profiler = ctx.profiler(pid, label);
        Ok(Self {
            child,
            watch,
            before,
            profiler,
            activity,
        })
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        self.child.fail_if_exited()
    }

    async fn acked(&self) -> Option<f64> {
        self.child.metric("enrichd_events_acked_total", &[]).await
    }

    /// Samples once more, stops enrichd (SIGTERM) and returns the CPU split and the database
    /// activity profile.
    async fn stop(mut self, ctx: &Ctx) -> (Arc<Watch>, procs::CpuSplit, Value) {
        let pid = self.child.process().pid();
        self.watch.sample(pid, ctx.ticks);
        let cpu = self.before.until(&ctx.snapshot(Some(pid)), ctx.ticks);
        if let Some(p) = self.profiler.take() {
            p.stop().await;
        }
        let activity = match self.activity.take() {
            Some(a) => a.finish().await,
            None => Value::Null,
        };
        self.watch.stop.store(true, Ordering::Relaxed);
        let _ = self
            .child
            .process_mut()
            .terminate(Duration::from_secs(15))
            .await;
        (self.watch, cpu, activity)
    }
}

/// Polls until every per-address provider has been asked about `unique` addresses and the
/// call counts stop moving for 2 s, or `limit` passes (work left due waits for enrichd's next
/// backfill poll, 60 s by default).
async fn settle_providers(ctx: &Ctx, unique: u64, limit: Duration) -> anyhow::Result<Stats> {
    let give_up = Instant::now() + limit;
    let mut last = ctx.fakes.stats().await?;
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = ctx.fakes.stats().await?;
        if now.total_requests() != last.total_requests() {
            still_since = Instant::now();
        }
        last = now;
        let all_asked = PER_ADDRESS
            .iter()
            .all(|p| last.per_key(*p).distinct >= unique);
        if (all_asked && still_since.elapsed() >= Duration::from_secs(2))
            || Instant::now() > give_up
        {
            return Ok(last);
        }
    }
}

// === (c) ingestion ===

/// 100,000 `attacker.scored` envelopes over 5,000 addresses, loaded into the work queue
/// before one `enrichd run` starts; events per second from its first ack to its last.
#[allow(clippy::too_many_lines, reason = "a scenario reads top to bottom")]
pub(crate) async fn ingestion(ctx: &Ctx, report: &mut ScenarioReport) -> anyhow::Result<()> {
    let sizes = &ctx.sizes;
    let (n, unique) = (sizes.ingest_events, sizes.ingest_ips);
    let target = ctx.pg("ingest").await?;
    let bus = ctx.bus("ingest", "enrichd-bench ingest").await?;
    let topology = bus.topology.clone();
    let addresses = ips(46, unique);
    // Round robin, as the profiler scores every attacker on every tick.
    let bodies = (0..n).map(|i| amqp::scored(addresses[i % unique], (i / unique) as u64));
    amqp::publish_all(&bus, bodies).await?;
    let ready = bus.queue_counts(&topology.queue).await?.messages;
    if ready as usize != n {
        bail!("the work queue holds {ready} messages, not {n}");
    }
    ctx.fakes.reset().await?;

    let mut running = Running::start(ctx, &target, &topology, "ingest")?;
    let give_up = Instant::now() + Duration::from_secs(240);
    // (time, acked) at the first and last progress seen; by metrics when enrichd serves them,
    // else by the work queue's depth.
    let mut first: Option<(Instant, f64)> = None;
    let mut last: Option<(Instant, f64)> = None;
    let mut method = "";
    let total = n as f64;
    let launched = Instant::now();
    let mut series: Vec<(f64, f64)> = Vec::new();
    loop {
        running.alive()?;
        let now = Instant::now();
        let progress = if let Some(acked) = running.acked().await {
            method = "metrics";
            Some(acked)
        } else if method == "metrics" || launched.elapsed() < Duration::from_secs(5) {
            // Starting up, or one scrape missed.
            None
        } else {
            method = "queue depth";
            let ready = bus.queue_counts(&topology.queue).await?.messages;
            // Ready messages only: up to one prefetch window is in flight, unseen.
            Some(total - f64::from(ready) - f64::from(PREFETCH))
                .filter(|_| (ready as usize) < n)
                .map(|v| v.max(0.0))
        };
        if let Some(done) = progress {
            if first.is_none() && done > 0.0 {
                first = Some((now, done));
            }
            if first.is_some() {
                last = Some((now, done));
            }
            let secs = round3(launched.elapsed().as_secs_f64());
            if series.last().is_none_or(|(t, _)| secs - t >= 1.0) {
                series.push((secs, done));
            }
            let finished = if method == "metrics" {
                done >= total
            } else {
                done >= total - f64::from(PREFETCH)
            };
            if finished {
                break;
            }
        }
        if now > give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (rate, complete, consumed) = match (first, last) {
        (Some((t0, a0)), Some((t1, a1))) if t1 > t0 => (
            (a1 - a0) / t1.duration_since(t0).as_secs_f64(),
            a1 >= total
                - if method == "metrics" {
                    0.0
                } else {
                    f64::from(PREFETCH)
                },
            a1,
        ),
        _ => (0.0, false, 0.0),
    };
    let bare = *ctx.bare_consumer_rate.lock().await;
    match bare {
        Some(bare) if bare > 0.0 => {
            report.figures.push(Figure::judged(
                "events_per_sec",
                rate,
                "events/s",
                Target::AtLeast(0.6 * bare),
                complete,
                format!(
                    "{n} events over {unique} addresses, first to last ack ({method}); {consumed:.0} acked; \
                     target 60 % of the bare consumer's {bare:.0}/s"
                ),
            ));
            report.figures.push(Figure::info(
                "share_of_bare_consumer",
                rate / bare,
                "",
                "events/s divided by the bare consumer's rate",
            ));
        }
        _ => report.figures.push(Figure::info(
            "events_per_sec",
            rate,
            "events/s",
            format!("{n} events over {unique} addresses ({method}); no bare-consumer ceiling in this run"),
        )),
    }
    let stats = settle_providers(ctx, unique as u64, Duration::from_secs(75)).await?;
    push_calls_per_ip(report, &stats, unique, complete);
    let (watch, cpu, activity) = running.stop(ctx).await;
    report.details["database_activity"] = activity;
    report.figures.push(Figure::info(
        "enrichd_cpu_secs",
        watch.cpu_secs(),
        "s",
        "whole run",
    ));
    report.figures.push(Figure::info(
        "peak_rss_mib",
        watch.hwm_mib(),
        "MiB",
        "VmHWM of enrichd",
    ));
    record_cpu(report, &cpu);
    report.details["fakes"] = json!(stats.without_timelines());
    let counters = db::pg_counters(&target).await;
    push_commits(report, &counters, n, "event");
    report.details["database"] = counters;
    report.details["acked_series"] = json!(series);
    bus.close().await;
    Ok(())
}

// === (d) latency ===

/// New addresses at a steady rate; time from publish to the first `attacker.intel.enriched`
/// naming the address.
pub(crate) async fn latency(ctx: &Ctx, report: &mut ScenarioReport) -> anyhow::Result<()> {
    let target = ctx.pg("latency").await?;
    let bus = ctx.bus("latency", "enrichd-bench latency").await?;
    let topology = bus.topology.clone();
    let arrivals = bus.consume_enriched().await?;
    ctx.fakes.reset().await?;
    let mut running = Running::start(ctx, &target, &topology, "latency")?;
    running
        .child
        .wait_consuming(&bus, Duration::from_secs(60))
        .await?;

    let paced = Paced {
        bus: &bus,
        arrivals: &arrivals,
        first_octet: 47,
    };
    let timed = paced.run(ctx, report, || running.alive()).await?;
    timed.push(ctx, report, true);
    let (watch, cpu, activity) = running.stop(ctx).await;
    report.details["database_activity"] = activity;
    report.figures.push(Figure::info(
        "enrichd_cpu_secs",
        watch.cpu_secs(),
        "s",
        "whole run",
    ));
    record_cpu(report, &cpu);
    report.details["fakes"] = ctx
        .fakes
        .stats()
        .await
        .map_or(Value::Null, |s| json!(s.without_timelines()));
    report.details["database"] = db::pg_counters(&target).await;
    bus.close().await;
    Ok(())
}

/// The latency run without enrichd: the same events at the same rate through the least work
/// per new address that keeps SPEC's guarantees (see [`floor`]), on the same broker and
/// database. Its percentiles are what this machine allows any enricher at that rate.
pub(crate) async fn latency_floor(ctx: &Ctx, report: &mut ScenarioReport) -> anyhow::Result<()> {
    let target = ctx.pg("floor").await?;
    let bus = ctx.bus("floor", "enrichd-bench floor driver").await?;
    let topology = bus.topology.clone();
    let arrivals = bus.consume_enriched().await?;
    let relay = floor::Relay::start(
        &ctx.amqp_url,
        &target,
        &topology,
        PREFETCH,
        Duration::from_millis(ctx.sizes.latency_ms),
    )
    .await?;
    let before = ctx.snapshot(None);
    let paced = Paced {
        bus: &bus,
        arrivals: &arrivals,
        first_octet: 48,
    };
    let timed = paced.run(ctx, report, || relay.alive()).await;
    let cpu = before.until(&ctx.snapshot(None), ctx.ticks);
    let counts = relay.stop().await;
    let timed = timed?;
    timed.push(ctx, report, false);
    let relayed = counts.relayed.load(Ordering::Relaxed);
    let commits = counts.commits.load(Ordering::Relaxed);
    report.figures.push(Figure::info(
        "addresses_per_commit",
        round3(relayed as f64 * 2.0 / (commits.max(1) as f64)),
        "",
        format!("{relayed} addresses relayed in {commits} group commits (two per address)"),
    ));
    record_cpu(report, &cpu);
    report.details["database"] = db::pg_counters(&target).await;
    bus.close().await;
    Ok(())
}

/// A paced run of new addresses: the warm-up, then [`Sizes::latency_events`] addresses at
/// [`Sizes::latency_rate`], each timed until its first `attacker.intel.enriched` arrives.
struct Paced<'a> {
    bus: &'a TestBus,
    arrivals: &'a Enriched,
    /// Addresses are `first_octet.x.y.z`, distinct per scenario.
    first_octet: u8,
}

/// Milliseconds from publish to arrival per measured address, sorted.
struct Timed {
    latencies: Vec<f64>,
    /// p50 and p99 of the addresses published in each second of the run, in order: whether
    /// the tail is spread over the run (queueing) or gathered in a few seconds (a pause).
    by_second: Vec<(f64, f64)>,
    /// Addresses that never arrived (counted with their wait so far).
    missing: usize,
    rate: f64,
}

impl Paced<'_> {
    /// Publishes and times; `alive` fails the run as soon as the consumer side has died.
    async fn run(
        &self,
        ctx: &Ctx,
        report: &mut ScenarioReport,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Timed> {
        let sizes = &ctx.sizes;
        let received = || self.arrivals.addresses();
        // Warm-up: pools, the Feodo feed (loaded on first use) and caches, measured apart.
        let total = LATENCY_WARMUP + sizes.latency_events;
        let addresses = ips(self.first_octet, total);
        let interval = Duration::from_secs_f64(1.0 / f64::from(sizes.latency_rate.max(1)));
        let warm_started = Instant::now();
        for (i, ip) in addresses.iter().take(LATENCY_WARMUP).enumerate() {
            tokio::time::sleep_until(warm_started + interval.mul_f64(i as f64)).await;
            self.bus
                .publish_unconfirmed(TOPIC_SCORED, &events::body(&amqp::scored(*ip, 0))?)
                .await?;
        }
        let warm_deadline = Instant::now() + Duration::from_secs(90);
        while received() < LATENCY_WARMUP && Instant::now() < warm_deadline {
            alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report.figures.push(Figure::info(
            "warmup_secs",
            round3(warm_started.elapsed().as_secs_f64()),
            "s",
            format!("{LATENCY_WARMUP} warm-up addresses published and enriched (not measured)"),
        ));

        let mut sent: Vec<(String, Instant)> = Vec::with_capacity(total);
        let start = Instant::now();
        for (i, ip) in addresses.iter().enumerate().skip(LATENCY_WARMUP) {
            let due = start + interval.mul_f64((i - LATENCY_WARMUP) as f64);
            tokio::time::sleep_until(due).await;
            let body = events::body(&amqp::scored(*ip, 0))?;
            let at = Instant::now();
            self.bus.publish_unconfirmed(TOPIC_SCORED, &body).await?;
            sent.push((ip.to_string(), at));
        }
        let publish_secs = start.elapsed().as_secs_f64();
        let give_up = Instant::now() + Duration::from_secs(60);
        while received() < total && Instant::now() <= give_up {
            alive()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cut = Instant::now();
        // An address still waiting counts with its wait so far: the percentiles are then
        // lower bounds, and the figure is marked incomplete.
        let map = self.arrivals.first_arrivals();
        let mut missing = 0usize;
        let mut latencies: Vec<f64> = sent
            .iter()
            .map(|(ip, at)| {
                let end = map.get(ip).copied().unwrap_or_else(|| {
                    missing += 1;
                    cut
                });
                end.duration_since(*at).as_secs_f64() * 1000.0
            })
            .collect();
        let per_second = (sizes.latency_rate.max(1) as usize).min(latencies.len().max(1));
        let by_second = latencies
            .chunks(per_second)
            .map(|second| {
                let mut second = second.to_vec();
                second.sort_by(f64::total_cmp);
                (nearest_rank(&second, 0.50), nearest_rank(&second, 0.99))
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        Ok(Timed {
            latencies,
            by_second,
            missing,
            rate: per_sec(sizes.latency_events, publish_secs),
        })
    }
}

impl Timed {
    /// The percentile `p` (0 to 1) by the nearest-rank method.
    fn percentile(&self, p: f64) -> f64 {
        nearest_rank(&self.latencies, p)
    }

    /// p50, p90, p99 and max as figures; p99 judged against the target when `judged`.
    fn push(&self, ctx: &Ctx, report: &mut ScenarioReport, judged: bool) {
        let sizes = &ctx.sizes;
        let note = format!(
            "{} new addresses at {:.0}/s (after {LATENCY_WARMUP} warm-up), publish to \
             attacker.intel.enriched received; {} not received within 60 s of the last \
             publish (counted with their wait so far: lower bounds)",
            sizes.latency_events, self.rate, self.missing
        );
        report
            .figures
            .push(Figure::info("p50_ms", self.percentile(0.50), "ms", note));
        report
            .figures
            .push(Figure::info("p90_ms", self.percentile(0.90), "ms", ""));
        let target = sizes.latency_ms as f64 + 50.0;
        let p99 = self.percentile(0.99);
        report.figures.push(if judged {
            Figure::judged(
                "p99_ms",
                p99,
                "ms",
                Target::AtMost(target),
                self.missing == 0,
                format!("target: provider latency {} ms + 50 ms", sizes.latency_ms),
            )
        } else {
            let mut figure = Figure::info(
                "p99_ms",
                p99,
                "ms",
                format!("no enrichd in it; the latency scenario's target is {target} ms"),
            );
            if self.missing > 0 {
                figure.status = crate::report::Status::Incomplete;
            }
            figure
        });
        report
            .figures
            .push(Figure::info("max_ms", self.percentile(1.0), "ms", ""));
        report.details["by_second_p50_p99_ms"] = self
            .by_second
            .iter()
            .map(|(p50, p99)| json!([round3(*p50), round3(*p99)]))
            .collect();
    }
}

/// The percentile `p` (0 to 1) of `sorted` by the nearest-rank method.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into a short vector"
    )]
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

// === (e) memory ===

/// 100,000 distinct addresses published to one `enrichd run`; peak resident memory.
#[allow(clippy::too_many_lines, reason = "a scenario reads top to bottom")]
pub(crate) async fn memory(
    ctx: &Ctx,
    report: &mut ScenarioReport,
    limit: Duration,
) -> anyhow::Result<()> {
    let n = ctx.sizes.rss_ips;
    let target = ctx.pg("rss").await?;
    let bus = ctx.bus("rss", "enrichd-bench rss").await?;
    let topology = bus.topology.clone();
    ctx.fakes.reset().await?;
    let mut running = Running::start(ctx, &target, &topology, "rss")?;
    running
        .child
        .wait_consuming(&bus, Duration::from_secs(60))
        .await?;
    let started = Instant::now();
    let give_up = started + limit;
    let addresses = ips(49, n);
    let publish = amqp::publish_all(&bus, addresses.iter().map(|ip| amqp::scored(*ip, 0)));
    let publish_rate = tokio::time::timeout(limit, publish)
        .await
        .context("publishing did not finish within the cap")??;
    let conn = target.connect(1).await?;
    let total = n as f64;
    let mut all_acked_at: Option<(f64, f64)> = None;
    // (seconds, addresses seen, intel rows, VmRSS MiB)
    let mut series: Vec<(f64, f64, f64, f64)> = Vec::new();
    let intel = loop {
        running.alive()?;
        let acked = running.acked().await;
        let seen_all = match acked {
            Some(a) => a >= total,
            // Without metrics, an empty work queue means every event was delivered.
            None => bus
                .queue_counts(&topology.queue)
                .await
                .is_ok_and(|counts| counts.messages == 0),
        };
        if seen_all && all_acked_at.is_none() {
            all_acked_at = Some((started.elapsed().as_secs_f64(), running.watch.hwm_mib()));
        }
        let intel = db::scalar_i64(&conn, "SELECT COUNT(*) FROM attacker_intel").await?;
        running
            .watch
            .sample(running.child.process().pid(), ctx.ticks);
        series.push((
            round3(started.elapsed().as_secs_f64()),
            acked.unwrap_or(intel as f64),
            intel as f64,
            round3(running.watch.rss_kib.load(Ordering::Relaxed) as f64 / 1024.0),
        ));
        if usize::try_from(intel).unwrap_or(0) >= n || Instant::now() > give_up {
            break intel;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let _ = conn.close().await;
    let enriched_secs = started.elapsed().as_secs_f64();
    let (watch, cpu, activity) = running.stop(ctx).await;
    report.details["database_activity"] = activity;
    let complete = usize::try_from(intel).unwrap_or(0) >= n;
    report.figures.push(Figure::judged(
        "peak_rss_mib",
        watch.hwm_mib(),
        "MiB",
        Target::AtMost(100.0),
        complete,
        format!(
            "VmHWM of enrichd after {n} distinct addresses published ({publish_rate:.0}/s); \
             {intel} enriched when measured"
        ),
    ));
    if let Some((secs, hwm)) = all_acked_at {
        report.figures.push(Figure::info(
            "peak_rss_when_all_acked_mib",
            hwm,
            "MiB",
            format!("all {n} events acked after {secs:.1} s"),
        ));
    }
    if !complete && let Some(projected) = project(&series, total) {
        report.figures.push(Figure::judged(
            "projected_rss_at_all_mib",
            projected,
            "MiB",
            Target::AtMost(100.0),
            true,
            format!(
                "VmRSS fitted linearly against addresses seen over the later half of the run, \
                 extrapolated to {n}: the run could not see them all in its time cap"
            ),
        ));
    }
    report.figures.push(Figure::info(
        "new_addresses_per_sec",
        intel as f64 / enriched_secs,
        "addresses/s",
        "attacker_intel rows written per second through the bus (new addresses, 4 providers + PTR each)",
    ));
    report.figures.push(Figure::info(
        "enrichd_cpu_secs",
        watch.cpu_secs(),
        "s",
        "whole run",
    ));
    record_cpu(report, &cpu);
    report.details["fakes"] = ctx
        .fakes
        .stats()
        .await
        .map_or(Value::Null, |s| json!(s.without_timelines()));
    let counters = db::pg_counters(&target).await;
    push_commits(
        report,
        &counters,
        usize::try_from(intel).unwrap_or(0),
        "address",
    );
    report.details["database"] = counters;
    report.details["series_secs_seen_enriched_rss"] = json!(series);
    bus.close().await;
    Ok(())
}

/// Least-squares line of resident memory against addresses seen, over the samples from half
/// the final count on, evaluated at `at`.
fn project(series: &[(f64, f64, f64, f64)], at: f64) -> Option<f64> {
    let last_seen = series.last()?.1;
    let points: Vec<(f64, f64)> = series
        .iter()
        .filter(|s| s.1 >= last_seen / 2.0)
        .map(|s| (s.1, s.3))
        .collect();
    if points.len() < 3 {
        return None;
    }
    let k = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / k;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / k;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = sxy / sxx;
    Some(round3(mean_y + slope * (at - mean_x)))
}

/// The SQLite and PostgreSQL targets of the backfill scenarios, one per scenario `label`.
pub(crate) async fn backfill_target(ctx: &Ctx, sqlite: bool, label: &str) -> anyhow::Result<Db> {
    if sqlite {
        ctx.sqlite(label).await
    } else {
        ctx.pg(label).await
    }
}

/// The scenario's CPU split into its details, and the CPU time the hypervisor took from this
/// machine as a figure: a figure is only comparable with another host's, or another run's,
/// when both had little of it.
fn record_cpu(report: &mut ScenarioReport, cpu: &procs::CpuSplit) {
    let share = if cpu.wall_secs > 0.0 {
        cpu.steal / cpu.wall_secs
    } else {
        0.0
    };
    report.figures.push(Figure::info(
        "steal_secs",
        cpu.steal,
        "s",
        format!(
            "CPU time given to other guests ({:.0} % of one core over the run)",
            share * 100.0
        ),
    ));
    report.details["cpu"] = json!(cpu);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_extends_the_later_trend() {
        // 10 MiB + 1 MiB per 1000 addresses.
        let series: Vec<_> = (1..=10)
            .map(|i| {
                let seen = f64::from(i) * 1000.0;
                (f64::from(i), seen, seen, 10.0 + seen / 1000.0)
            })
            .collect();
        let at = project(&series, 100_000.0).unwrap();
        assert!((at - 110.0).abs() < 1e-6, "{at}");
        assert_eq!(project(&series[..2], 100_000.0), None);
    }
}
