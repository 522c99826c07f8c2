//! The scenarios. Each builds its own world, drives it, and records figures and checks; every
//! wait is on observed state (database rows, queue depths, consumers, fake counters) with a
//! deadline.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Result;
use enrichd_core::ProviderId;
use enrichd_harness::enrichd::PER_ADDRESS as PER_IP;
use enrichd_harness::fakes::{FakesOptions, RequestLog, Stats};
use tokio::time::Instant;

use crate::pg;
use crate::report::Report;
use crate::services::poll;
use crate::world::{Ctx, Limits, World, ips};

/// A scenario: name, what it does.
pub(crate) const ALL: [(&str, &str); 5] = [
    (
        "lifted",
        "limits lifted, 3 replicas, 20,000 events over 2,000 IPs: every attacker enriched, one call per (IP, provider)",
    ),
    (
        "kill9",
        "a paid plan's limits (10,000/s, 1,000,000/day), 3 replicas, kill -9 of one mid-run: nothing lost, no duplicate rows, repeated calls within its concurrency",
    ),
    (
        "rabbitmq-restart",
        "limits lifted, 3 replicas, RabbitMQ restarted twice mid-run: every replica reconnects each time and the run completes",
    ),
    (
        "postgres-restart",
        "limits lifted, 3 replicas, PostgreSQL restarted mid-run: nothing lost, no call repeated",
    ),
    (
        "default-limits-faults",
        "default limits, 3 replicas, providers answering 10 % errors and 3 % 429s: cluster-wide rate, parks, retries",
    ),
];

/// Runs scenario `name`; setup errors are returned, check results go to `report`.
pub(crate) async fn run(name: &str, ctx: &Ctx, report: &mut Report) -> Result<()> {
    let slow = FakesOptions {
        latency_ms: 40,
        ..FakesOptions::default()
    };
    let (fakes, limits) = match name {
        "lifted" => (FakesOptions::default(), Limits::Lifted),
        // With a daily quota, as the keyed providers have: what a crash wastes is quota.
        "kill9" => (slow, Limits::Quota),
        // Slow enough answers that "mid-run" is a wide target and leases are held.
        "rabbitmq-restart" | "postgres-restart" => (slow, Limits::Lifted),
        "default-limits-faults" => (
            FakesOptions {
                error_rate: 0.10,
                rate_limit_rate: 0.03,
                seed: 20_261_123,
                ..FakesOptions::default()
            },
            Limits::Default,
        ),
        other => anyhow::bail!("no scenario named {other:?}"),
    };
    let mut world = World::create(ctx, name, fakes, limits).await?;
    let result = match name {
        "lifted" => lifted(&mut world, report).await,
        "kill9" => kill9(&mut world, report).await,
        "rabbitmq-restart" => rabbitmq_restart(ctx, &mut world, report).await,
        "postgres-restart" => postgres_restart(ctx, &mut world, report).await,
        _ => default_limits_faults(&mut world, report).await,
    };
    if result.is_err() || !report.passed() {
        for line in world.log_tails(8) {
            Report::progress(&line);
        }
    }
    world.teardown().await;
    result
}

// === shared pieces ===

/// Calls beyond the first per (IP, provider), summed over the per-address providers.
fn duplicate_calls(stats: &Stats) -> u64 {
    PER_IP
        .iter()
        .map(|p| {
            let calls = stats.per_key(*p);
            calls.total - calls.distinct
        })
        .sum()
}

fn per_key_figure(stats: &Stats) -> String {
    PER_IP
        .iter()
        .chain(&[ProviderId::Feodo])
        .map(|p| {
            let calls = stats.per_key(*p);
            format!(
                "{p} {} calls/{} keys/max {}",
                calls.total, calls.distinct, calls.max_per_key
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every attacker has an intel row with all four providers and a PTR name.
fn check_enriched(report: &mut Report, p: &crate::world::Progress, ips: usize, done: bool) {
    let n = i64::try_from(ips).unwrap_or(i64::MAX);
    report.check(
        "every attacker enriched",
        done && p.attackers == n && p.intel == n && p.enriched == n,
        format!(
            "attackers {} for {ips} IPs, intel rows {}, with all four providers {}",
            p.attackers, p.intel, p.enriched
        ),
    );
    report.check(
        "every attacker has its PTR name",
        p.ptr == n,
        format!("{} of {n}", p.ptr),
    );
}

/// The figures every scenario ends with, each checked against its bound: events published,
/// rows written, rows lost, duplicate rows, and provider calls repeated.
async fn ledger(
    world: &World<'_>,
    report: &mut Report,
    ips: usize,
    calls_bound: u64,
    calls_why: &str,
) -> Result<()> {
    let n = pg::numbers(
        &world.db,
        "SELECT (SELECT count(*) FROM attackers), (SELECT count(DISTINCT ip) FROM attackers), \
                (SELECT count(*) FROM attacker_intel), \
                (SELECT count(DISTINCT attacker_uuid) FROM attacker_intel)",
    )
    .await?;
    let at = |i: usize| u64::try_from(n.get(i).copied().unwrap_or(0)).unwrap_or(0);
    let (attackers, attacker_ips, rows, row_attackers) = (at(0), at(1), at(2), at(3));
    let expected = ips as u64;
    let lost = expected.saturating_sub(row_attackers);
    let duplicate_rows =
        (attackers - attacker_ips.min(attackers)) + (rows - row_attackers.min(rows));
    let stats = world.fakes.stats().await?;
    let repeated = duplicate_calls(&stats);
    Report::figure(
        "ledger",
        format!(
            "{} events published; {rows} intel rows written for {expected} attackers; \
             {lost} lost (bound 0); {duplicate_rows} duplicate rows (bound 0); \
             {repeated} repeated provider calls (bound {calls_bound}: {calls_why})",
            world.published()
        ),
    );
    report.check("no row lost", lost == 0, format!("{lost} of {expected}"));
    report.check(
        "no duplicate rows",
        duplicate_rows == 0,
        format!(
            "attackers {attackers} over {attacker_ips} IPs, intel rows {rows} for \
             {row_attackers} attackers"
        ),
    );
    report.check(
        &format!("repeated provider calls within {calls_why}"),
        repeated <= calls_bound,
        format!("{repeated} repeated, bound {calls_bound}"),
    );
    Ok(())
}

/// Calls in flight a replica may have at once (the suite's `_CONCURRENCY` per provider):
/// what a crash can cost of a daily quota, since such an answer keeps its slot until it is
/// durable.
const REPLICA_CONCURRENCY: u64 = crate::world::LIFTED_CONCURRENCY as u64 * PER_IP.len() as u64;

async fn check_drained(world: &World<'_>, report: &mut Report) {
    let ((work, dead), drained) = world.wait_drained(Duration::from_secs(180)).await;
    report.check(
        "every event acked, none dead-lettered",
        drained && dead == 0,
        format!("work queue {work}, dead-letter queue {dead}"),
    );
}

async fn check_clean_exit(world: &mut World<'_>, report: &mut Report, expected: usize) {
    let alive = world.alive();
    let codes = world.stop_all().await;
    let text = codes
        .iter()
        .map(|(name, code)| format!("{name} {code:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    report.check(
        "replicas alive to the end and exit 0 on SIGTERM",
        alive == expected && codes.iter().all(|(_, c)| *c == Some(0)),
        format!("{alive} of {expected} running; exits {text}"),
    );
}

/// Publishes, then waits until `trigger` attackers are enriched; returns the publish time.
async fn publish_and_wait(
    world: &mut World<'_>,
    ips: &[String],
    per_ip: usize,
) -> Result<Duration> {
    let started = Instant::now();
    let events = world.publish(ips, per_ip).await?;
    let took = started.elapsed();
    Report::figure(
        "published",
        format!(
            "{events} events over {} IPs in {:.1} s",
            ips.len(),
            took.as_secs_f64()
        ),
    );
    Ok(took)
}

// === scenarios ===

async fn lifted(world: &mut World<'_>, report: &mut Report) -> Result<()> {
    let ips = ips(2_000);
    world.start_replicas(3).await?;
    let started = Instant::now();
    publish_and_wait(world, &ips, 10).await?;
    let n = i64::try_from(ips.len())?;
    let (p, done) = world.wait_all_enriched(n, Duration::from_secs(300)).await?;
    let took = started.elapsed().as_secs_f64();
    Report::figure(
        "enriched",
        format!(
            "{} attackers in {took:.1} s ({:.0} IPs/s, {:.0} events/s)",
            p.enriched,
            p.enriched as f64 / took,
            20_000.0 / took
        ),
    );
    check_enriched(report, &p, ips.len(), done);
    check_drained(world, report).await;
    Report::figure("events acked/lookups per replica", world.spread().await);
    let stats = world.fakes.stats().await?;
    Report::figure("provider calls", per_key_figure(&stats));
    Report::figure("DNS queries", stats.dns.queries);
    for provider in PER_IP {
        let calls = stats.per_key(provider);
        report.check(
            &format!("{provider}: exactly one call per IP"),
            calls.distinct == ips.len() as u64 && calls.max_per_key == 1,
            format!(
                "{} calls, {} distinct IPs, at most {} per IP",
                calls.total, calls.distinct, calls.max_per_key
            ),
        );
    }
    ledger(world, report, ips.len(), 0, "nothing broke").await?;
    check_clean_exit(world, report, 3).await;
    Ok(())
}

/// The provider leases `owner`-by-owner: `(owner, ip, provider, lease_until)`.
async fn live_leases(db: &str) -> Result<Vec<(String, String, String, String)>> {
    let rows = pg::psql(
        db,
        "SELECT lease_owner, ip, provider, lease_until FROM enrichd_provider_state \
         WHERE lease_owner IS NOT NULL AND lease_until > (now() AT TIME ZONE 'UTC')",
    )
    .await?;
    Ok(rows
        .into_iter()
        .filter(|r| r.len() == 4)
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone(), r[3].clone()))
        .collect())
}

/// The leases the killed replica held. Taken right after the kill: the dead owner's leases
/// stay exactly as they were until they lapse, while every live owner's leases of that moment
/// are applied (cleared) within seconds. Returns the count held by owners whose leases never
/// changed once every other owner's did (0 if every owner's changed).
async fn victim_leases(db: &str) -> Result<(u64, usize)> {
    let at_kill = live_leases(db).await?;
    let mut by_owner: BTreeMap<&str, Vec<&(String, String, String, String)>> = BTreeMap::new();
    for lease in &at_kill {
        by_owner.entry(lease.0.as_str()).or_default().push(lease);
    }
    let owners = by_owner.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = live_leases(db).await.unwrap_or_default();
        let unchanged: Vec<usize> = by_owner
            .values()
            .filter(|leases| leases.iter().all(|l| now.contains(l)))
            .map(Vec::len)
            .collect();
        if unchanged.len() <= 1 || Instant::now() >= deadline {
            return Ok((unchanged.iter().sum::<usize>() as u64, owners));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn kill9(world: &mut World<'_>, report: &mut Report) -> Result<()> {
    let ips = ips(1_000);
    let n = i64::try_from(ips.len())?;
    world.start_replicas(3).await?;
    publish_and_wait(world, &ips, 10).await?;
    let at_kill = world.wait_some_enriched("a quarter", n / 4).await?;
    let victim = &mut world.replicas[1];
    victim.enrichd.process_mut().kill9().await?;
    let killed = Instant::now();
    let (held, owners) = victim_leases(&world.db).await?;
    Report::figure(
        "kill -9",
        format!(
            "r2 at {} of {n} enriched; it held {held} provider leases ({owners} owners held leases then)",
            at_kill.enriched
        ),
    );
    let (p, done) = world.wait_all_enriched(n, Duration::from_secs(240)).await?;
    Report::figure(
        "completed after the kill",
        format!(
            "{:.1} s (leases lapse after about 32 s)",
            killed.elapsed().as_secs_f64()
        ),
    );
    check_enriched(report, &p, ips.len(), done);
    check_drained(world, report).await;
    let stats = world.fakes.stats().await?;
    Report::figure("provider calls", per_key_figure(&stats));
    ledger(
        world,
        report,
        ips.len(),
        REPLICA_CONCURRENCY,
        "the killed replica's concurrency, not its leases",
    )
    .await?;
    let every_ip = PER_IP
        .iter()
        .all(|p| stats.per_key(*p).distinct == ips.len() as u64);
    report.check(
        "every (IP, provider) asked",
        every_ip,
        PER_IP
            .iter()
            .map(|p| format!("{p} {}", stats.per_key(*p).distinct))
            .collect::<Vec<_>>()
            .join(", "),
    );
    Report::figure("events acked/lookups per replica", world.spread().await);
    check_clean_exit(world, report, 2).await;
    Ok(())
}

async fn rabbitmq_restart(ctx: &Ctx, world: &mut World<'_>, report: &mut Report) -> Result<()> {
    let ips = ips(1_000);
    let n = i64::try_from(ips.len())?;
    world.start_replicas(3).await?;
    let before: Vec<String> = world.vhost.work_consumers().await?;
    // Twice, each time with deliveries and acks in flight: a replica once kept no consumer
    // after about one restart in four, and a broker that flaps must find every replica
    // reconnected from a reconnected session too. The first restart comes a fifth of the way
    // through; the second right after every event is published again, while the repeats are
    // being acked (and the first pass's addresses may still be enriched).
    for restart in 0..2 {
        publish_and_wait(world, &ips, 10).await?;
        let at = if restart == 0 {
            world.wait_some_enriched("a fifth", n / 5).await?
        } else {
            world.progress().await?
        };
        let away = ctx.services.restart_rabbitmq().await?;
        let back = Instant::now();
        Report::figure(
            &format!("RabbitMQ restart {}", restart + 1),
            format!(
                "at {} of {n} enriched; stop_app + start_app took {:.1} s",
                at.enriched,
                away.as_secs_f64()
            ),
        );
        let vhost = &world.vhost;
        let (consumers, reconnected) = poll(
            Duration::from_secs(120),
            || async { vhost.work_consumers().await.ok() },
            |consumers| consumers.len() >= 3,
        )
        .await;
        let consumers = consumers.unwrap_or_default();
        report.check(
            &format!(
                "every replica reconnected and consumes again after restart {}",
                restart + 1
            ),
            reconnected && consumers.len() == 3,
            format!(
                "{} consumers {:.1} s after the broker came back (before: {})",
                consumers.len(),
                back.elapsed().as_secs_f64(),
                before.len()
            ),
        );
    }
    let (p, done) = world.wait_all_enriched(n, Duration::from_secs(240)).await?;
    check_enriched(report, &p, ips.len(), done);
    check_drained(world, report).await;
    let stats = world.fakes.stats().await?;
    Report::figure("provider calls", per_key_figure(&stats));
    ledger(world, report, ips.len(), 0, "redelivery repeats no lookup").await?;
    Report::figure("events acked/lookups per replica", world.spread().await);
    check_clean_exit(world, report, 3).await;
    Ok(())
}

async fn postgres_restart(ctx: &Ctx, world: &mut World<'_>, report: &mut Report) -> Result<()> {
    let ips = ips(1_000);
    let n = i64::try_from(ips.len())?;
    world.start_replicas(3).await?;
    publish_and_wait(world, &ips, 10).await?;
    let at = world.wait_some_enriched("a fifth", n / 5).await?;
    // Only a call made under a lease can have its answer lost with the restart: a call
    // whose lease is taken while the database is down cannot start.
    let held = live_leases(&world.db).await?.len() as u64;
    let away = ctx.services.restart_postgres().await?;
    let back = Instant::now();
    Report::figure(
        "PostgreSQL restart",
        format!(
            "at {} of {n} enriched; restart took {:.1} s",
            at.enriched,
            away.as_secs_f64()
        ),
    );
    let (p, done) = world.wait_all_enriched(n, Duration::from_secs(240)).await?;
    Report::figure(
        "completed after the restart",
        format!("{:.1} s", back.elapsed().as_secs_f64()),
    );
    check_enriched(report, &p, ips.len(), done);
    check_drained(world, report).await;
    let stats = world.fakes.stats().await?;
    Report::figure("provider calls", per_key_figure(&stats));
    Report::figure("leases live just before the restart", held);
    ledger(
        world,
        report,
        ips.len(),
        0,
        "answers received survive the outage: their writes wait for the store",
    )
    .await?;
    Report::figure("events acked/lookups per replica", world.spread().await);
    check_clean_exit(world, report, 3).await;
    Ok(())
}

// === default limits with faults ===

/// Most requests of `timeline` (epoch ms, any order) inside any half-open window of
/// `window_ms`.
fn max_in_window(timeline: &[u64], window_ms: u64) -> usize {
    let mut sorted = timeline.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window_ms {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// Requests of a provider that arrived while it was parked by a 429 sent at `t`
/// (`Retry-After: 2`): in `(t + grace, t + 2 s - 100 ms)`. `grace` covers requests already
/// on the wire when the 429 left the fake.
fn requests_while_parked(parks: &[u64], requests: &[u64], grace_ms: u64) -> Vec<(u64, u64)> {
    let mut hits = Vec::new();
    for t in parks {
        for r in requests {
            if *r > t + grace_ms && *r < t + 1_900 {
                hits.push((*t, *r));
            }
        }
    }
    hits
}

async fn default_limits_faults(world: &mut World<'_>, report: &mut Report) -> Result<()> {
    let ips = ips(40);
    let n = ips.len();
    world.start_replicas(3).await?;
    let started = Instant::now();
    publish_and_wait(world, &ips, 3).await?;
    // Settled: every (IP, provider) has a final outcome for this run: an answer, or an error
    // whose retry is minutes away. Rate-limited work is retried after its 2 s park.
    let db = world.db.clone();
    let expected = i64::try_from(n * PER_IP.len())?;
    let settle_sql = "SELECT (SELECT count(*) FROM enrichd_provider_state \
           WHERE provider IN ('greynoise', 'abuseipdb', 'threatfox') \
             AND outcome IN ('ok', 'not_found', 'error')), \
          (SELECT count(*) FROM attacker_intel)";
    let rows = i64::try_from(n)?;
    let (last, settled) = poll(
        Duration::from_secs(240),
        || async { pg::numbers(&db, settle_sql).await.ok() },
        |last| last.len() == 2 && last[0] >= expected && last[1] >= rows,
    )
    .await;
    let last = last.filter(|l| l.len() == 2).unwrap_or_else(|| vec![0, 0]);
    Report::figure(
        "settled",
        format!(
            "{} of {expected} (IP, provider) final, {} intel rows, in {:.1} s",
            last[0],
            last[1],
            started.elapsed().as_secs_f64()
        ),
    );
    report.check(
        "every attacker has its intel row and every provider a final outcome",
        settled,
        format!(
            "{} of {expected} final, {} of {n} intel rows",
            last[0], last[1]
        ),
    );

    let stats = world.fakes.stats().await?;
    let log = world.fakes.request_log().await?;
    Report::figure("provider calls", per_key_figure(&stats));
    check_answers_land(world, report, &log, n).await?;
    check_parks_and_rates(report, &stats);
    let failed_answers = PER_IP
        .iter()
        .flat_map(|p| log.entries(*p))
        .filter(|e| matches!(e.status(), 429 | 500))
        .count() as u64;
    ledger(
        world,
        report,
        n,
        failed_answers,
        "a repeat only after a 500 or a 429",
    )
    .await?;
    check_clean_exit(world, report, 3).await;
    Ok(())
}

/// Every (IP, provider) ends as the fake last answered it: an answer in the intel row, or an
/// error retried minutes later; no (IP, provider) is left on a 429.
async fn check_answers_land(
    world: &World<'_>,
    report: &mut Report,
    log: &RequestLog,
    n: usize,
) -> Result<()> {
    // What the fake answered last per (provider, IP), and whether a 429 was followed by
    // another request.
    let mut last_status: HashMap<(String, String), u16> = HashMap::new();
    let mut unretried_429 = 0;
    for provider in PER_IP {
        let mut entries = log.entries(provider).to_vec();
        entries.sort();
        for entry in &entries {
            last_status.insert(
                (provider.as_str().to_owned(), entry.key().to_owned()),
                entry.status(),
            );
        }
        unretried_429 += last_status
            .iter()
            .filter(|((p, _), s)| p == provider.as_str() && **s == 429)
            .count();
    }

    let rows = pg::psql(
        &world.db,
        "SELECT s.ip, s.provider, coalesce(s.outcome, ''), \
                (s.next_attempt_at > (now() AT TIME ZONE 'UTC') + interval '60 seconds')::text, \
                (CASE s.provider WHEN 'greynoise' THEN i.greynoise_queried_at \
                   WHEN 'abuseipdb' THEN i.abuseipdb_queried_at \
                   ELSE i.threatfox_queried_at END IS NOT NULL)::text \
         FROM enrichd_provider_state s LEFT JOIN attacker_intel i ON i.attacker_ip = s.ip \
         WHERE s.provider IN ('greynoise', 'abuseipdb', 'threatfox')",
    )
    .await?;
    let mut answered = 0;
    let mut failed_later = 0;
    let mut mismatches = Vec::new();
    for row in rows.iter().filter(|r| r.len() == 5) {
        let (ip, provider, outcome) = (&row[0], &row[1], row[2].as_str());
        let retry_later = row[3] == "true";
        let in_row = row[4] == "true";
        let fake = last_status
            .get(&(provider.clone(), ip.clone()))
            .copied()
            .unwrap_or(0);
        let consistent = match fake {
            200 | 404 => {
                answered += 1;
                matches!(outcome, "ok" | "not_found") && in_row
            }
            500 => {
                failed_later += 1;
                outcome == "error" && retry_later && !in_row
            }
            _ => false,
        };
        if !consistent {
            mismatches.push(format!(
                "{provider}/{ip}: fake {fake}, outcome {outcome:?}, retry later {retry_later}, in row {in_row}"
            ));
        }
    }
    report.check(
        "every attacker ends with the providers that answered; failed ones retried later",
        mismatches.is_empty() && answered + failed_later == n * PER_IP.len(),
        format!(
            "{answered} answered and in the rows, {failed_later} failed with next_attempt_at minutes away{}",
            mismatches
                .first()
                .map(|m| format!("; first mismatch {m} (of {})", mismatches.len()))
                .unwrap_or_default()
        ),
    );
    report.check(
        "every 429 was retried after its park",
        unretried_429 == 0,
        format!("{unretried_429} (IP, provider) left on a 429"),
    );
    Ok(())
}

/// No request inside a park; no 10 s window over the cluster-wide rate.
fn check_parks_and_rates(report: &mut Report, stats: &Stats) {
    let mut parked_hits = Vec::new();
    let mut parks_total = 0;
    for provider in PER_IP {
        let parks = stats.rate_limited(provider);
        parks_total += parks.len();
        let requests = stats.timeline(provider);
        for (t, r) in requests_while_parked(parks, requests, 250) {
            parked_hits.push(format!("{provider} +{} ms", r - t));
        }
    }
    report.check(
        "no request while a provider is parked",
        parked_hits.is_empty(),
        format!(
            "{parks_total} parks (429 with Retry-After 2), {} requests inside one{}",
            parked_hits.len(),
            if parked_hits.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    parked_hits
                        .iter()
                        .take(8)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ),
    );

    // Rate: slots are 1/rate apart on the database clock, so a half-open 10 s window holds at
    // most ceil(10 s x rate) of them. A request reaches the fake a little after its slot; one
    // delivered late can share a window with the slots after it, so one more is allowed.
    for (provider, rate) in [
        (ProviderId::Greynoise, 1.0 / 1.5),
        (ProviderId::Abuseipdb, 2.0),
        (ProviderId::Threatfox, 2.0),
    ] {
        let requests = stats.timeline(provider);
        let worst = max_in_window(requests, 10_000);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a small positive count"
        )]
        let allowed = (10.0_f64 * rate - 1e-9).ceil() as usize;
        let span = requests
            .iter()
            .max()
            .zip(requests.iter().min())
            .map_or(0, |(a, b)| a - b);
        report.check(
            &format!("{provider}: no 10 s window over the cluster-wide limit"),
            worst <= allowed + 1,
            format!(
                "busiest 10 s window {worst}, limit {allowed} slots (+1 late delivery); {} requests over {:.1} s",
                requests.len(),
                span as f64 / 1000.0
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_window_counts_half_open() {
        assert_eq!(max_in_window(&[], 10_000), 0);
        let slots: Vec<u64> = (0..20).map(|i| 1_000 + i * 1_500).collect();
        assert_eq!(max_in_window(&slots, 10_000), 7);
        assert_eq!(max_in_window(&[0, 10_000, 10_001, 5], 10_000), 3);
    }

    #[test]
    fn requests_inside_a_park_are_found() {
        let parks = [10_000];
        let requests = [9_990, 10_100, 10_600, 11_950, 12_500];
        assert_eq!(
            requests_while_parked(&parks, &requests, 250),
            vec![(10_000, 10_600)]
        );
    }

    #[test]
    fn addresses_are_distinct_and_global_looking() {
        let all = ips(2_000);
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 2_000);
        assert!(
            all.iter()
                .all(|ip| ip.starts_with("45.") && ip.parse::<std::net::Ipv4Addr>().is_ok())
        );
    }
}
