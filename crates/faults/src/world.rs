//! One scenario's world: a fresh database and vhost, an `enrichd-fakes`, and replicas of
//! `enrichd run` pointed at them; plus the observations every check is built from.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use enrichd_core::ProviderId;
use enrichd_harness::bus::TestBus;
use enrichd_harness::enrichd::{Enrichd, EnrichdEnv, Limits as ProviderLimits, PER_ADDRESS};
use enrichd_harness::events::Scored;
use enrichd_harness::fakes::{Fakes, FakesOptions};
use tokio::time::Instant;

use crate::pg;
use crate::rabbit::{self, Vhost};
use crate::report::Report;
use crate::services::{Services, poll, wait_until};

/// What every scenario shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// The `enrichd` binary.
    pub(crate) enrichd: PathBuf,
    /// The `enrichd-fakes` binary.
    pub(crate) fakes: PathBuf,
    /// Where logs go.
    pub(crate) logs: PathBuf,
    /// Unique per run, part of every database and vhost name.
    pub(crate) run_id: String,
    /// The shared services.
    pub(crate) services: Services,
    /// Added to every replica's environment last (`--replica-env`).
    pub(crate) extra_env: Vec<(String, String)>,
}

/// Provider limits for the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limits {
    /// No rate limit, no quota, concurrency 16 per provider and replica.
    Lifted,
    /// The contract's defaults (greynoise 1 per 1.5 s, abuseipdb 2/s and 1000/day,
    /// threatfox 2/s, concurrency 4).
    Default,
    /// A paid plan: every keyed provider metered at a high rate with a daily quota (what a
    /// crash can waste), concurrency 16 per provider and replica.
    Quota,
}

/// The `Quota` limits' rate and daily quota per provider.
pub(crate) const QUOTA_RATE: f64 = 10_000.0;
pub(crate) const QUOTA_PER_DAY: u32 = 1_000_000;

/// One `enrichd run` replica.
#[derive(Debug)]
pub(crate) struct Replica {
    /// `r1`, `r2`, …
    pub(crate) name: String,
    /// The process.
    pub(crate) enrichd: Enrichd,
}

impl Replica {
    /// Whether the process is still running.
    pub(crate) fn running(&mut self) -> bool {
        self.enrichd.process_mut().running()
    }

    /// A metric summed over its label sets (0 when absent or unreachable).
    pub(crate) async fn metric(&self, name: &str) -> f64 {
        self.enrichd.metric(name, &[]).await.unwrap_or(0.0)
    }
}

/// Counts read from the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Rows in `attackers`.
    pub(crate) attackers: i64,
    /// Distinct IPs in `attackers`.
    pub(crate) attacker_ips: i64,
    /// Rows in `attacker_intel`.
    pub(crate) intel: i64,
    /// Intel rows with an answer from all four providers.
    pub(crate) enriched: i64,
    /// Attackers with a PTR name.
    pub(crate) ptr: i64,
}

/// `n` distinct global IPv4 addresses (45.64.0.0/10 is ordinary allocated space).
pub(crate) fn ips(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("45.{}.{}.{}", 64 + i / 62_500, (i / 250) % 250, 1 + i % 250))
        .collect()
}

/// A scenario's world.
#[derive(Debug)]
pub(crate) struct World<'a> {
    ctx: &'a Ctx,
    /// Scenario name.
    pub(crate) name: String,
    /// Its database.
    pub(crate) db: String,
    /// Its vhost.
    pub(crate) vhost: Vhost,
    /// Its fake providers and DNS.
    pub(crate) fakes: Fakes,
    /// Its replicas, in start order.
    pub(crate) replicas: Vec<Replica>,
    env: EnrichdEnv,
    /// Events published so far, for the reliability ledger.
    published: std::sync::atomic::AtomicUsize,
    started: Instant,
}

/// Calls in flight per provider and replica when limits are lifted.
pub(crate) const LIFTED_CONCURRENCY: u32 = 16;

impl<'a> World<'a> {
    /// Creates the database and vhost and starts `enrichd-fakes` with `fakes`.
    pub(crate) async fn create(
        ctx: &'a Ctx,
        name: &str,
        fakes: FakesOptions,
        limits: Limits,
    ) -> Result<Self> {
        let unique = format!("faults_{}_{}", ctx.run_id, name.replace('-', "_"));
        pg::create(&unique).await.context("create the database")?;
        let vhost = match Vhost::create(&unique).await {
            Ok(vhost) => vhost,
            Err(e) => {
                let _ = pg::drop(&unique).await;
                return Err(e.context("create the vhost"));
            }
        };
        let fakes = match Fakes::start(
            &ctx.fakes,
            fakes,
            &ctx.logs.join(format!("{name}-fakes.log")),
        )
        .await
        {
            Ok(fakes) => fakes,
            Err(e) => {
                let _ = pg::drop(&unique).await;
                let _ = vhost.delete().await;
                return Err(e);
            }
        };
        let env = ctx
            .extra_env
            .iter()
            .fold(Self::env(&unique, &vhost, &fakes, limits), |env, (k, v)| {
                env.set(k, v.as_str())
            });
        Ok(Self {
            ctx,
            name: name.to_owned(),
            db: unique,
            vhost,
            fakes,
            replicas: Vec::new(),
            env,
            published: std::sync::atomic::AtomicUsize::new(0),
            started: Instant::now(),
        })
    }

    fn env(db: &str, vhost: &Vhost, fakes: &Fakes, limits: Limits) -> EnrichdEnv {
        let env = EnrichdEnv::new()
            .database(&pg::url(db))
            .bus(&vhost.url(), &rabbit::topology())
            .dns_servers(&fakes.dns_addr().to_string())
            .set("ENRICHD_PTR_CONCURRENCY", "32")
            // The backfill finishes leftover work (lapsed leases, retries) quickly.
            .set("ENRICHD_POLL_INTERVAL_SECS", "2")
            .set("ENRICHD_GRACE_SECS", "10")
            .api_key(ProviderId::Greynoise, "fake-greynoise-key")
            .api_key(ProviderId::Abuseipdb, "fake-abuseipdb-key")
            .api_key(ProviderId::Threatfox, "fake-threatfox-key")
            .set("RUST_LOG", "info")
            .providers_at(&fakes.base_url());
        let limits = match limits {
            Limits::Default => return env,
            Limits::Lifted => ProviderLimits::Lifted,
            Limits::Quota => ProviderLimits::Metered {
                rate_per_sec: QUOTA_RATE,
                daily_quota: QUOTA_PER_DAY,
            },
        };
        env.limits(&PER_ADDRESS, limits)
            .concurrency(&PER_ADDRESS, LIFTED_CONCURRENCY)
    }

    /// Seconds since the world was created, for progress lines.
    pub(crate) fn clock(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Starts `n` replicas and waits until each answers `/readyz` and consumes the queue.
    pub(crate) async fn start_replicas(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            let name = format!("r{}", self.replicas.len() + 1);
            let log = self.ctx.logs.join(format!("{}-{name}.log", self.name));
            let enrichd = Enrichd::start(&self.ctx.enrichd, &["run"], &self.env, &log)?;
            self.replicas.push(Replica { name, enrichd });
        }
        for replica in &mut self.replicas {
            let ready = wait_until(Duration::from_secs(90), || async {
                replica.enrichd.ready().await
            })
            .await;
            if !ready || !replica.running() {
                let process = replica.enrichd.process_mut();
                bail!(
                    "replica {} never became ready (exit {:?}); log {}:\n{}",
                    replica.name,
                    process.exit().map(|status| status.code()),
                    process.log().display(),
                    process.log_warnings(10).join("\n")
                );
            }
        }
        let vhost = &self.vhost;
        let consuming = wait_until(Duration::from_secs(60), || async {
            vhost.work_consumers().await.is_ok_and(|c| c.len() >= n)
        })
        .await;
        if !consuming {
            bail!("the replicas did not all consume the work queue within 60 s");
        }
        Ok(())
    }

    /// Publishes `per_ip` `attacker.scored` events for every address, round-robin (so
    /// repetition is spread over the run, as a profiler's ticks are), persistent and confirmed,
    /// 512 at a time. Declares the topology exactly as the replicas do first, so events
    /// published before they consume are routed. Returns the count.
    pub(crate) async fn publish(&self, ips: &[String], per_ip: usize) -> Result<usize> {
        let events = (0..per_ip as u64).flat_map(|tick| {
            // A profiler tick's timestamp: a fixed day plus the tick, in seconds.
            let ts = 1_795_000_000.0 + f64::from(u32::try_from(tick % 100_000).unwrap_or(0));
            ips.iter()
                .map(move |ip| Scored::tick(ip.as_str(), tick).envelope(ts))
        });
        let bus = TestBus::declare(
            &self.vhost.url(),
            "enrichd-faults publisher",
            rabbit::topology(),
        )
        .await?;
        let published = bus.publish_events(events, 512).await;
        bus.close().await;
        let n = usize::try_from(published?)?;
        self.published
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }

    /// Events published so far.
    pub(crate) fn published(&self) -> usize {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts from the database.
    pub(crate) async fn progress(&self) -> Result<Progress> {
        let n = pg::numbers(
            &self.db,
            "SELECT (SELECT count(*) FROM attackers), \
                    (SELECT count(DISTINCT ip) FROM attackers), \
                    (SELECT count(*) FROM attacker_intel), \
                    (SELECT count(*) FROM attacker_intel WHERE greynoise_queried_at IS NOT NULL \
                       AND abuseipdb_queried_at IS NOT NULL AND feodo_queried_at IS NOT NULL \
                       AND threatfox_queried_at IS NOT NULL), \
                    (SELECT count(*) FROM attackers WHERE ptr_record IS NOT NULL)",
        )
        .await?;
        let at = |i: usize| n.get(i).copied().unwrap_or(0);
        Ok(Progress {
            attackers: at(0),
            attacker_ips: at(1),
            intel: at(2),
            enriched: at(3),
            ptr: at(4),
        })
    }

    /// Replicas still running.
    pub(crate) fn alive(&mut self) -> usize {
        self.replicas
            .iter_mut()
            .map(Replica::running)
            .filter(|up| *up)
            .count()
    }

    /// Waits up to `within` until every one of `n` attackers is enriched and named; returns
    /// the last progress and whether it got there.
    pub(crate) async fn wait_all_enriched(
        &mut self,
        n: i64,
        within: Duration,
    ) -> Result<(Progress, bool)> {
        self.wait_for("every attacker enriched", within, |p| {
            p.enriched >= n && p.ptr >= n
        })
        .await
    }

    /// Waits until `count` attackers are enriched, the point where a scenario strikes; `what`
    /// names that share ("a fifth"). A run that never gets there fails the scenario.
    pub(crate) async fn wait_some_enriched(&mut self, what: &str, count: i64) -> Result<Progress> {
        let (at, reached) = self
            .wait_for(&format!("{what} enriched"), Duration::from_secs(120), |p| {
                p.enriched >= count
            })
            .await?;
        anyhow::ensure!(reached, "the run never got {what} done: {at:?}");
        Ok(at)
    }

    /// Polls the database until `done` holds or `within` passes; returns the last progress
    /// and whether `done` held. A database that does not answer (restarting) is polled again.
    /// Fails early when every replica has exited.
    pub(crate) async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        done: impl Fn(&Progress) -> bool,
    ) -> Result<(Progress, bool)> {
        let deadline = Instant::now() + within;
        let mut last = Progress::default();
        let mut shown = Instant::now();
        loop {
            if let Ok(p) = self.progress().await {
                last = p;
                if done(&p) {
                    return Ok((p, true));
                }
            }
            if self.alive() == 0 {
                bail!("every replica has exited while waiting for {what}");
            }
            if Instant::now() >= deadline {
                return Ok((last, false));
            }
            if shown.elapsed() >= Duration::from_secs(10) {
                shown = Instant::now();
                Report::progress(&format!(
                    "t={:.0}s waiting for {what}: attackers {}, intel {}, enriched {}, ptr {}",
                    self.clock(),
                    last.attackers,
                    last.intel,
                    last.enriched,
                    last.ptr
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the work queue holds nothing (ready or unacknowledged); returns the last
    /// depths (work, dead) and whether it drained.
    pub(crate) async fn wait_drained(&self, within: Duration) -> ((u64, u64), bool) {
        let vhost = &self.vhost;
        let (last, drained) = poll(
            within,
            || async { vhost.queue_depths().await.ok() },
            |depths| depths.0 == 0,
        )
        .await;
        (last.unwrap_or((u64::MAX, u64::MAX)), drained)
    }

    /// `events_acked / lookups` per running replica, as a figure.
    pub(crate) async fn spread(&mut self) -> String {
        let mut parts = Vec::new();
        for replica in &mut self.replicas {
            if !replica.running() {
                parts.push(format!("{} (gone)", replica.name));
                continue;
            }
            let acked = replica.metric("enrichd_events_acked_total").await;
            let lookups = replica.metric("enrichd_lookups_total").await;
            parts.push(format!("{} {acked:.0}/{lookups:.0}", replica.name));
        }
        parts.join(", ")
    }

    /// SIGTERM to every running replica; their exit codes (`None` = did not exit cleanly).
    pub(crate) async fn stop_all(&mut self) -> Vec<(String, Option<i32>)> {
        let mut codes = Vec::new();
        for replica in &mut self.replicas {
            if !replica.running() {
                continue;
            }
            let status = replica
                .enrichd
                .process_mut()
                .terminate(Duration::from_secs(30))
                .await;
            codes.push((replica.name.clone(), status.and_then(|s| s.code())));
        }
        codes
    }

    /// Warnings and errors from every replica's log (for a failed scenario).
    pub(crate) fn log_tails(&self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for replica in &self.replicas {
            let process = replica.enrichd.process();
            out.push(format!(
                "--- {} ({})",
                replica.name,
                process.log().display()
            ));
            out.extend(process.log_warnings(n));
        }
        out
    }

    /// Stops everything and removes the database and the vhost.
    pub(crate) async fn teardown(mut self) {
        for replica in &mut self.replicas {
            let _ = replica.enrichd.process_mut().kill9().await;
        }
        // The services may still be coming back from a restart.
        let db = self.db.clone();
        let _ = wait_until(Duration::from_secs(30), || async {
            pg::drop(&db).await.is_ok()
        })
        .await;
        let vhost = &self.vhost;
        let _ = wait_until(Duration::from_secs(30), || async {
            vhost.delete().await.is_ok()
        })
        .await;
    }
}
