//! `Aggregator`: one job per address at a time inside the process (single-flight), the point
//! where bus deliveries learn that their address's state is durable, and the drain on
//! shutdown.
//!
//! Concurrent requests for one address share the running job: a request arriving before the
//! job's claims are committed waits for them; one arriving after is answered at once and marks
//! the job for one more (cheap) write pass, so an attacker row mapped meanwhile still gets its
//! intel row without another lookup.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use enrichd_core::CanonicalIp;
use enrichd_core::job::{JobId, Origin, PersistError};
use enrichd_store::{ClaimMode, EventNote, StoredScope};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::job::{JobDeps, JobSummary, enrich};
use crate::messages::{Drain, EnrichIp, JobDone, JobDurable, JoinJob, Ping, Room, StartRecorded};
use crate::repository_writer::Writer;

/// Counters shared with the health beat and metrics.
#[derive(Debug, Default)]
pub struct AggregatorStats {
    /// Jobs running now.
    pub in_flight: AtomicUsize,
    /// Jobs finished since start.
    pub processed_total: AtomicU64,
}

type Waiter = oneshot::Sender<Result<(), PersistError>>;

/// How long a finished address answers repeated bus events from memory. An attacker row
/// created meanwhile and named by no event's uuid is picked up by the backfill (it has no
/// intel row) within its poll interval, so this only has to outlast the profiler's ticks and
/// the consumption of a large backlog (100,000 queued events over 5,000 addresses took longer
/// than 30 s to reach their repeats).
const RECENT_FOR: Duration = Duration::from_secs(300);
/// Jobs queued or running beyond which bus deliveries are no longer acked at once (see
/// `Handler<EnrichIp>`): it bounds the memory a burst of new addresses can take.
const MAX_QUEUED_JOBS: usize = 1024;
/// Bound on remembered addresses; expired entries are dropped when it is reached.
const RECENT_CAP: usize = 200_000;
/// Jobs running their claims, calls and write at once in one process. More wait before they
/// claim anything: a job that has not claimed yet loses nothing by waiting, while one that
/// has called its providers must get its write in before its leases lapse. Claims and writes
/// go through the batcher and hold no connection while they wait, so this only bounds memory
/// and the depth of the providers' queues (each provider still caps its own calls); it must
/// exceed the providers' combined concurrency, or their slots idle while jobs sit in the
/// batcher.
const MAX_RUNNING_JOBS: usize = 256;

/// An address whose job just finished: events naming it (and only attacker rows we already
/// mapped to it) need no database work until `until`.
struct Recent {
    until: Instant,
    attacker_uuids: Vec<String>,
}

#[derive(Default)]
struct JobState {
    /// Claims committed: new requests are answered at once.
    durable: bool,
    /// Requests waiting for `durable`.
    waiters: Vec<Waiter>,
    /// Requests waiting for the job's end (`lookup` prints the written state).
    done_waiters: Vec<Waiter>,
    /// A request arrived after the claims: write once more when the job ends.
    rerun: bool,
    /// Attacker rows the events of this job mapped to the address.
    attacker_uuids: Vec<String>,
}

/// Single-flight job runner (see the module docs).
pub struct Aggregator {
    deps: JobDeps,
    /// Where the jobs' claims and writes go (`RepositoryWriter`).
    writer: Writer,
    jobs: HashMap<CanonicalIp, JobState>,
    /// Addresses finished moments ago (see [`Recent`]).
    recent: HashMap<CanonicalIp, Recent>,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// Callers waiting until fewer than so many jobs are queued or running (see [`Room`]).
    room_waiters: Vec<(usize, oneshot::Sender<()>)>,
    stats: Arc<AggregatorStats>,
    /// Permits to run (see [`MAX_RUNNING_JOBS`]).
    running: Arc<tokio::sync::Semaphore>,
}

impl Aggregator {
    /// An aggregator running passes with `deps`, writing through `writer`.
    pub fn new(deps: JobDeps, writer: Writer, stats: Arc<AggregatorStats>) -> Self {
        Self {
            writer,
            running: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING_JOBS)),
            deps,
            jobs: HashMap::new(),
            recent: HashMap::new(),
            drain_waiters: Vec::new(),
            room_waiters: Vec::new(),
            stats,
        }
    }

    /// Starts the job for `ip`; with `event`, its first transaction records that bus event.
    fn start_job(
        &mut self,
        ip: CanonicalIp,
        mode: ClaimMode,
        job_id: JobId,
        event: Option<EventNote>,
        ctx: &mut Context<Self>,
    ) {
        self.jobs.entry(ip).or_default();
        self.stats
            .in_flight
            .store(self.jobs.len(), Ordering::Relaxed);
        let deps = self.deps.clone();
        let writer = self.writer.clone();
        let me = ctx.address();
        let running = Arc::clone(&self.running);
        // A task of its own, not a future in this actor's context: actix polls every future
        // spawned into a context on each of its wake-ups, which made every wake-up cost as
        // much as the number of jobs in flight (half of enrichd's CPU under load).
        actix::spawn(async move {
            // Never closed, so the permit always comes.
            let _permit = running.acquire_owned().await;
            let durable_to = me.clone();
            let durable =
                move |attacker_uuids| durable_to.do_send(JobDurable { ip, attacker_uuids });
            // Boxed: a task's allocation is its future's largest state, and a queued job
            // waits on the permit above with the whole pass's state reserved. Hundreds queue
            // under a backlog; unboxed they held about 40 MiB doing nothing.
            let pass = Box::pin(enrich(job_id, ip, mode, event, &deps, &writer, durable));
            let result = match crate::supervision::contain_future(pass).await {
                Ok(result) => result.map_err(PersistError::from),
                // A bug, not a failure mode; the work stays due and the next pass retries it.
                Err(panic) => Err(PersistError::Rejected(panic.to_string())),
            };
            // `do_send` queues even past the mailbox capacity; it fails only when the
            // aggregator is gone, and then nobody waits for the answer.
            me.do_send(JobDone { ip, job_id, result });
        });
    }

    fn finish(
        &mut self,
        ip: CanonicalIp,
        job_id: JobId,
        result: &Result<JobSummary, PersistError>,
        ctx: &mut Context<Self>,
    ) {
        let state = self.jobs.remove(&ip).unwrap_or_default();
        self.stats.processed_total.fetch_add(1, Ordering::Relaxed);
        if result.is_ok() {
            self.remember(ip, state.attacker_uuids.clone());
        }
        let reply = match result {
            Ok(summary) => {
                debug!(%job_id, %ip, asked = summary.asked.len(), events = summary.applied.events, "Job done.");
                Ok(())
            }
            Err(e) => {
                warn!(%job_id, %ip, error = %e, "Job failed; its work stays due.");
                Err(e.clone())
            }
        };
        for waiter in state.waiters.into_iter().chain(state.done_waiters) {
            // A waiter that went away (its delivery was already settled) needs no answer.
            let _ = waiter.send(reply.clone());
        }
        if state.rerun && result.is_ok() {
            self.start_job(ip, ClaimMode::Due, JobId::new(), None, ctx);
        }
        self.stats
            .in_flight
            .store(self.jobs.len(), Ordering::Relaxed);
        let queued = self.jobs.len();
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .room_waiters
            .drain(..)
            .partition(|(below, _)| queued < *below);
        self.room_waiters = waiting;
        for (_, waiter) in ready {
            let _ = waiter.send(());
        }
        if self.jobs.is_empty() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// Joins the running job for `ip` or starts one; the receiver answers when durable.
    fn join_or_start(
        &mut self,
        ip: CanonicalIp,
        origin: Origin,
        job_id: JobId,
        attacker_uuids: Vec<String>,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Result<(), PersistError>> {
        let (tx, rx) = oneshot::channel();
        let wants_end = matches!(origin, Origin::Lookup { .. });
        if let Some(state) = self.jobs.get_mut(&ip) {
            for uuid in attacker_uuids {
                if !state.attacker_uuids.contains(&uuid) {
                    state.attacker_uuids.push(uuid);
                }
            }
            if wants_end {
                // Its claims may predate this request; one more pass after it is cheap.
                state.rerun = true;
                state.done_waiters.push(tx);
            } else if state.durable {
                state.rerun = true;
                let _ = tx.send(Ok(()));
            } else {
                state.waiters.push(tx);
            }
            return rx;
        }
        let mode = match origin {
            Origin::Lookup { refresh: true } => ClaimMode::Refresh,
            _ => ClaimMode::Due,
        };
        let state = if wants_end {
            JobState {
                done_waiters: vec![tx],
                ..JobState::default()
            }
        } else {
            JobState {
                waiters: vec![tx],
                ..JobState::default()
            }
        };
        self.jobs.insert(ip, state);
        self.start_job(ip, mode, job_id, None, ctx);
        rx
    }
}

impl Aggregator {
    fn remember(&mut self, ip: CanonicalIp, attacker_uuids: Vec<String>) {
        let now = Instant::now();
        if self.recent.len() >= RECENT_CAP {
            self.recent.retain(|_, r| r.until > now);
        }
        if self.recent.len() < RECENT_CAP {
            self.recent.insert(
                ip,
                Recent {
                    until: now + RECENT_FOR,
                    attacker_uuids,
                },
            );
        }
    }

    /// Whether a bus event for `ip` naming `attacker_uuid` is already fully handled: the
    /// address finished moments ago, or its job is queued or running after an event that was
    /// recorded, and the event names no attacker row we have not mapped to it.
    fn already_handled(&self, ip: CanonicalIp, attacker_uuid: Option<&str>) -> bool {
        let known = |uuids: &[String]| attacker_uuid.is_none_or(|u| uuids.iter().any(|k| k == u));
        let recent = self
            .recent
            .get(&ip)
            .is_some_and(|r| r.until > Instant::now() && known(&r.attacker_uuids));
        // A job started by the backfill or `lookup` recorded no event: its uuids are empty,
        // so only a job with a recorded bus event answers for it.
        let running = self
            .jobs
            .get(&ip)
            .is_some_and(|j| !j.attacker_uuids.is_empty() && known(&j.attacker_uuids));
        recent || running
    }
}

impl Actor for Aggregator {
    type Context = Context<Self>;
}

impl Handler<JobDone> for Aggregator {
    type Result = ();

    fn handle(&mut self, msg: JobDone, ctx: &mut Context<Self>) {
        self.finish(msg.ip, msg.job_id, &msg.result, ctx);
    }
}

impl Handler<StartRecorded> for Aggregator {
    type Result = Result<oneshot::Receiver<Result<(), PersistError>>, EventNote>;

    fn handle(&mut self, msg: StartRecorded, ctx: &mut Context<Self>) -> Self::Result {
        let StartRecorded { ip, job_id, event } = msg;
        if self.jobs.contains_key(&ip) || self.jobs.len() >= MAX_RUNNING_JOBS {
            return Err(event);
        }
        let (tx, rx) = oneshot::channel();
        self.jobs.insert(
            ip,
            JobState {
                waiters: vec![tx],
                ..JobState::default()
            },
        );
        self.start_job(ip, ClaimMode::Due, job_id, Some(event), ctx);
        Ok(rx)
    }
}

/// The answer to [`JoinJob`].
pub(crate) struct Joined {
    /// Answers when the job is durable (or done, for `lookup`).
    receiver: oneshot::Receiver<Result<(), PersistError>>,
    /// A bus request may be acked now (see `Handler<EnrichIp>`).
    early: bool,
}

impl<A: Actor, M: Message<Result = Joined>> dev::MessageResponse<A, M> for Joined {
    fn handle(self, _ctx: &mut A::Context, tx: Option<dev::OneshotSender<Joined>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

impl Handler<JoinJob> for Aggregator {
    type Result = Joined;

    fn handle(&mut self, msg: JoinJob, ctx: &mut Context<Self>) -> Joined {
        let JoinJob {
            ip,
            origin,
            job_id,
            attacker_uuids,
        } = msg;
        let receiver = self.join_or_start(ip, origin, job_id, attacker_uuids, ctx);
        let early = matches!(origin, Origin::Bus(_)) && self.jobs.len() <= MAX_QUEUED_JOBS;
        Joined { receiver, early }
    }
}

impl Handler<JobDurable> for Aggregator {
    type Result = ();

    fn handle(&mut self, msg: JobDurable, _ctx: &mut Context<Self>) {
        if let Some(state) = self.jobs.get_mut(&msg.ip) {
            state.durable = true;
            for uuid in msg.attacker_uuids {
                if !state.attacker_uuids.contains(&uuid) {
                    state.attacker_uuids.push(uuid);
                }
            }
            for waiter in state.waiters.drain(..) {
                let _ = waiter.send(Ok(()));
            }
        }
    }
}

impl Handler<EnrichIp> for Aggregator {
    type Result = ResponseFuture<Result<(), PersistError>>;

    fn handle(&mut self, msg: EnrichIp, ctx: &mut Context<Self>) -> Self::Result {
        let EnrichIp {
            job_id,
            ip,
            attacker_uuid,
            first_seen,
            origin,
        } = msg;
        if matches!(origin, Origin::Bus(_)) && self.already_handled(ip, attacker_uuid.as_deref()) {
            // The profiler repeats every attacker on every tick: answer from memory.
            enrichd_metrics::global()
                .cache_hits
                .get_or_create(&enrichd_metrics::ProviderLabel { provider: "event" })
                .inc();
            return Box::pin(async { Ok(()) });
        }
        let writer = self.writer.clone();
        let scope = StoredScope::from(self.deps.policy.scope(ip));
        let deadline = self.deps.ack_deadline;
        let me = ctx.address();
        // The request runs as its own task (see `start_job` for why not in this context).
        Box::pin(async move {
            // Bus events are recorded first: the attacker row is found, mapped or (on a table
            // we own) created, serialised per address by the store. A new job records its
            // event in the transaction of its claims; otherwise the event is recorded alone,
            // then joins the job. The batcher bounds how many are recorded at once; waiting
            // deliveries simply stay unacked a moment longer.
            let attacker_uuids = match origin {
                Origin::Bus(_) => {
                    let event = EventNote {
                        ip,
                        scope,
                        attacker_uuid,
                        first_seen,
                        claim: false,
                    };
                    let started = me
                        .send(StartRecorded { ip, job_id, event })
                        .await
                        .map_err(|_| PersistError::Unavailable("aggregator stopped".into()))?;
                    match started {
                        // Durable once the job's first commit recorded the event and its
                        // claims: the ack waits for nothing else, so no deadline is needed.
                        Ok(durable) => {
                            return durable.await.unwrap_or_else(|_| {
                                Err(PersistError::Unavailable("aggregator stopped".into()))
                            });
                        }
                        Err(event) => {
                            writer
                                .note(event)
                                .await
                                .map_err(PersistError::from)?
                                .attacker_uuids
                        }
                    }
                }
                Origin::Backfill | Origin::Lookup { .. } => Vec::new(),
            };
            let joined = me
                .send(JoinJob {
                    ip,
                    origin,
                    job_id,
                    attacker_uuids,
                })
                .await
                .map_err(|_| PersistError::Unavailable("aggregator stopped".into()))?;
            // A recorded bus event is durable: its attacker row is mapped (or created), so
            // the backfill finishes its work if this process does not. Ack it now while the
            // queue of jobs is short; past that, hold it (the prefetch window then slows
            // intake) until its job has claimed, but never longer than the ack deadline.
            if joined.early {
                return Ok(());
            }
            let answer = if matches!(origin, Origin::Bus(_)) {
                match tokio::time::timeout(deadline, joined.receiver).await {
                    Ok(answer) => answer,
                    Err(_elapsed) => return Ok(()),
                }
            } else {
                joined.receiver.await
            };
            answer.unwrap_or_else(|_| Err(PersistError::Unavailable("aggregator stopped".into())))
        })
    }
}

impl Handler<Drain> for Aggregator {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.jobs.is_empty() {
            let _ = tx.send(());
        } else {
            self.drain_waiters.push(tx);
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<Room> for Aggregator {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Room, _ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.jobs.len() < msg.below {
            let _ = tx.send(());
        } else {
            self.room_waiters.push((msg.below, tx));
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<Ping> for Aggregator {
    type Result = ();

    fn handle(&mut self, _msg: Ping, _ctx: &mut Context<Self>) {}
}
