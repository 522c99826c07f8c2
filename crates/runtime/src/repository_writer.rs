//! `RepositoryWriter`: the actor that owns the jobs' database writes (SPEC §3). Bus events'
//! intake, the jobs' claims and their results are gathered into shared transactions.
//!
//! Recording an event, a job's claim and its write are each one small transaction, and a
//! commit is the scarce resource (about 4,000 a second on the reference machine, whatever its
//! size). The writer takes whatever requests of a kind have queued while the previous batch of
//! that kind ran (up to 64) and runs them as one [`Store::note_events`],
//! [`Store::claim_batch`] or [`Store::apply_batch`]: under load a commit carries dozens of
//! addresses, and a lone request never waits for company, because a batch starts as soon as
//! its lane's running transaction has committed.
//!
//! It runs on an arbiter of its own (a thread and a runtime of its own), with PostgreSQL
//! connections of its own: under load the thread the other actors share is busy, and batches
//! that waited for it held their transactions and row locks open meanwhile; a connection's
//! socket is noticed by the runtime that opened it only (see [`Store::with_own_pool`]).
//!
//! # Faults
//! It is supervised like the other actors. A batch that panics, or a pool that closed (it
//! never reopens), stops it; `Supervised::restarting` opens new pools, and the requests still
//! queued are written by the restarted actor behind the same address. Batches still running
//! answer their requests themselves; their completions from before the restart are ignored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use actix::prelude::*;
use enrichd_core::CanonicalIp;
use enrichd_store::{
    ApplyContext, ApplyItem, ApplyOutcome, ClaimMode, Claims, EventNote, Intake, Store, StoreError,
};
use tokio::sync::oneshot;
use tracing::{error, warn};

pub use enrichd_store::ClaimSettings;

use crate::messages::{BatchDone, BreakPools, ClaimWork, PersistResults, RecordEvent};
use crate::supervision::{RestartPolicy, contain_future};

/// Addresses per transaction. Larger batches commit less often but hold their rows' locks
/// longer, and a refused batch is written again one address at a time.
const MAX_BATCH: usize = 64;

/// The batch sizes a lane uses: powers of two and one and a half times each, up to
/// [`MAX_BATCH`]. Every size is a statement text of its own (`IN` lists, multi-row `VALUES`),
/// prepared and cached on each connection, so the sizes are few; a batch is what queued,
/// rounded down to one of these, and the rest go first into the next batch. Between powers of
/// two alone a third of a typical batch waited for the next transaction.
const BATCH_SIZES: [usize; 12] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64];
const _: () = assert!(BATCH_SIZES[BATCH_SIZES.len() - 1] == MAX_BATCH);

/// Transactions a lane may have in flight on PostgreSQL, each on its own connection; SQLite
/// has one writer, so one there. A lane runs one at a time and takes the others only for a
/// backlog (see [`Lane::next_batch`]). Three at once as the rule cost PostgreSQL about a sixth
/// more CPU for the same addresses and did not shorten the wait: a batch that waits for a
/// free slot gathers no more than one that waits for the running transaction to commit
/// (BENCHMARKS.md, "One transaction at a time").
const PG_SLOTS: u32 = 3;

/// Longest a caller waits for the writer's answer before it counts the store unavailable
/// (and retries, or leaves the work to the backfill).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Requests queued in the mailbox before a sender waits: far above what the running jobs and
/// deliveries can send at once, so the mailbox never slows them.
const MAILBOX: usize = 16_384;

/// The three kinds of work, each a lane of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaneKind {
    Notes,
    Claims,
    Applies,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// The requests of one kind waiting for a batch, and the batches of it running.
#[derive(Debug)]
pub(crate) struct Lane<R> {
    waiting: VecDeque<R>,
    running: u32,
}

impl<R> Default for Lane<R> {
    fn default() -> Self {
        Self {
            waiting: VecDeque::new(),
            running: 0,
        }
    }
}

impl<R> Lane<R> {
    fn push(&mut self, request: R) {
        self.waiting.push_back(request);
    }

    /// The next batch to start, if one may start now: when nothing of this lane runs, or
    /// while a whole batch ([`MAX_BATCH`]) is waiting and one of `slots` is free, so one slow
    /// transaction does not cap the lane at [`MAX_BATCH`] requests per transaction time.
    fn next_batch(&mut self, slots: u32) -> Option<Vec<R>> {
        let idle = self.running == 0;
        let backlog = self.waiting.len() >= MAX_BATCH && self.running < slots.max(1);
        if self.waiting.is_empty() || !(idle || backlog) {
            return None;
        }
        let size = batch_size_at_most(self.waiting.len());
        self.running += 1;
        Some(self.waiting.drain(..size).collect())
    }

    fn finished(&mut self) {
        self.running = self.running.saturating_sub(1);
    }
}

/// The largest of [`BATCH_SIZES`] not above `n` (0 for 0).
fn batch_size_at_most(n: usize) -> usize {
    BATCH_SIZES
        .iter()
        .rev()
        .copied()
        .find(|&size| size <= n)
        .unwrap_or(0)
}

/// A handle to the writer for the jobs and the aggregator; cheap to clone. A caller that gets
/// no answer (the writer gave up for good, or did not answer in 60 s) sees the
/// store as unavailable: nothing was written for it, and its retry or the backfill takes the
/// work again.
#[derive(Debug, Clone)]
pub struct Writer {
    addr: Addr<RepositoryWriter>,
    restarts: Arc<AtomicU32>,
}

impl Writer {
    /// Records a bus event (see [`Store::note_event`]), in the next intake batch; with
    /// [`EventNote::claim`], claims its due work in the same transaction.
    ///
    /// # Errors
    /// This event's [`StoreError`]; `Unavailable` when the writer did not answer.
    pub async fn note(&self, note: EventNote) -> Result<Intake, StoreError> {
        answer(self.addr.send(RecordEvent { note })).await
    }

    /// Claims the due (or all) work of `ip`, in the next claim batch.
    ///
    /// # Errors
    /// The batch's [`StoreError`]; `Unavailable` when the writer did not answer.
    pub async fn claim(&self, ip: CanonicalIp, mode: ClaimMode) -> Result<Claims, StoreError> {
        answer(self.addr.send(ClaimWork { ip, mode })).await
    }

    /// Writes one pass's results, in the next write batch.
    ///
    /// # Errors
    /// This address's [`StoreError`]; `Unavailable` when the writer did not answer.
    pub async fn apply(&self, item: ApplyItem) -> Result<ApplyOutcome, StoreError> {
        answer(self.addr.send(PersistResults { item })).await
    }

    /// The actor, for supervision tests and drills ([`BreakPools`]).
    pub fn addr(&self) -> &Addr<RepositoryWriter> {
        &self.addr
    }

    /// Supervised restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }
}

async fn answer<T>(
    request: impl Future<Output = Result<Result<T, StoreError>, MailboxError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(ANSWER_WITHIN, request).await {
        Ok(Ok(result)) => result,
        Ok(Err(_mailbox)) => Err(StoreError::unavailable("the repository writer is gone")),
        Err(_elapsed) => Err(StoreError::unavailable(
            "the repository writer did not answer in time",
        )),
    }
}

/// The actor; see the module docs.
pub struct RepositoryWriter {
    /// The process's store: the writer's own pools are opened from it (again on restart).
    store: Store,
    claim: Arc<ClaimSettings>,
    ctx: Arc<ApplyContext>,
    /// The lanes' connections; `None` until opened (messages wait for it, see `started`).
    pools: Option<Arc<Pools>>,
    notes: Lane<(EventNote, Reply<Intake>)>,
    claims: Lane<(CanonicalIp, ClaimMode, Reply<Claims>)>,
    applies: Lane<(ApplyItem, Reply<ApplyOutcome>)>,
    /// Bumped on every restart: completions of batches started before it are ignored.
    generation: u64,
    /// Supervised restarts so far, shared with the [`Writer`] handles.
    restarts: Arc<AtomicU32>,
    /// Restart budget; `None` restarts without limit (tests, short commands).
    restart_policy: Option<RestartPolicy>,
}

impl std::fmt::Debug for RepositoryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryWriter")
            .field("generation", &self.generation)
            .field("restarts", &self.restarts)
            .finish_non_exhaustive()
    }
}

/// Each lane's connections and how many transactions a lane may run at once.
struct Pools {
    notes: LoopStores,
    claims: LoopStores,
    applies: LoopStores,
    slots: u32,
}

impl Pools {
    async fn open(shared: &Store) -> Self {
        Self {
            notes: LoopStores::open(shared).await,
            claims: LoopStores::open(shared).await,
            applies: LoopStores::open(shared).await,
            slots: if shared.single_writer() { 1 } else { PG_SLOTS },
        }
    }

    fn closed(&self) -> bool {
        [&self.notes, &self.claims, &self.applies]
            .iter()
            .any(|lane| lane.first.is_closed() || lane.spare.is_closed())
    }

    fn close(&self) {
        for lane in [&self.notes, &self.claims, &self.applies] {
            lane.first.close_own_pool();
            lane.spare.close_own_pool();
        }
    }
}

impl RepositoryWriter {
    /// A writer claiming under `claim` and writing under `ctx`; start it with
    /// [`RepositoryWriter::start`].
    pub fn new(store: &Store, claim: ClaimSettings, ctx: ApplyContext) -> Self {
        Self {
            store: store.clone(),
            claim: Arc::new(claim),
            ctx: Arc::new(ctx),
            pools: None,
            notes: Lane::default(),
            claims: Lane::default(),
            applies: Lane::default(),
            generation: 0,
            restarts: Arc::default(),
            restart_policy: None,
        }
    }

    /// Limits restarts to `policy`'s budget.
    #[must_use]
    pub fn with_restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart_policy = Some(policy);
        self
    }

    /// Starts the writer supervised, on an arbiter of its own; the arbiter lives as long as
    /// the returned handle's actor does.
    pub fn start(self) -> Writer {
        let restarts = Arc::clone(&self.restarts);
        let arbiter = Arbiter::new();
        let addr = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| self);
        // Dropping the handle leaves the thread running until the actor system stops.
        drop(arbiter);
        Writer { addr, restarts }
    }

    /// Starts every batch that may start now.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let Some(pools) = self.pools.clone() else {
            return;
        };
        while let Some(batch) = self.notes.next_batch(pools.slots) {
            let claim = Arc::clone(&self.claim);
            let run = pools.notes.run(|store| run_notes(store, claim, batch));
            self.spawn(LaneKind::Notes, run, &pools, ctx);
        }
        while let Some(batch) = self.claims.next_batch(pools.slots) {
            let claim = Arc::clone(&self.claim);
            let run = pools.claims.run(|store| run_claims(store, claim, batch));
            self.spawn(LaneKind::Claims, run, &pools, ctx);
        }
        while let Some(batch) = self.applies.next_batch(pools.slots) {
            let ctx_ = Arc::clone(&self.ctx);
            let run = pools.applies.run(|store| run_applies(store, ctx_, batch));
            self.spawn(LaneKind::Applies, run, &pools, ctx);
        }
    }

    /// Runs one batch as a task of its own (not in this actor's context: actix polls every
    /// future of a context on each of its wake-ups), and hears about its end.
    fn spawn(
        &self,
        lane: LaneKind,
        run: impl Future<Output = ()> + 'static,
        pools: &Arc<Pools>,
        ctx: &mut Context<Self>,
    ) {
        let me = ctx.address();
        let generation = self.generation;
        let pools = Arc::clone(pools);
        actix::spawn(async move {
            let panicked = contain_future(run).await.is_err();
            // `do_send` queues past the mailbox's capacity; it fails only when the writer is
            // gone for good, and then nothing waits for the lane.
            me.do_send(BatchDone {
                lane,
                generation,
                broken: panicked || pools.closed(),
            });
        });
    }
}

impl Actor for RepositoryWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
        let shared = self.store.clone();
        // Messages wait until the pools are open.
        ctx.wait(
            async move { Pools::open(&shared).await }
                .into_actor(self)
                .map(|pools, act, ctx| {
                    act.pools = Some(Arc::new(pools));
                    act.pump(ctx);
                }),
        );
    }
}

impl Supervised for RepositoryWriter {
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        let restarts = self.restarts.fetch_add(1, Ordering::Relaxed) + 1;
        self.generation += 1;
        // Batches of the old generation answer their own requests; the lanes start afresh.
        self.notes.running = 0;
        self.claims.running = 0;
        self.applies.running = 0;
        self.pools = None;
        if let Some(policy) = self.restart_policy.as_mut() {
            policy.on_restart(ctx);
        }
        warn!(
            actor = "RepositoryWriter",
            restarts, "Repository writer restarting with new pools."
        );
    }
}

impl Handler<RecordEvent> for RepositoryWriter {
    type Result = ResponseFuture<Result<Intake, StoreError>>;

    fn handle(&mut self, msg: RecordEvent, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.notes.push((msg.note, reply));
        self.pump(ctx);
        Box::pin(async move { answer.await.unwrap_or_else(|_| Err(unanswered())) })
    }
}

impl Handler<ClaimWork> for RepositoryWriter {
    type Result = ResponseFuture<Result<Claims, StoreError>>;

    fn handle(&mut self, msg: ClaimWork, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.claims.push((msg.ip, msg.mode, reply));
        self.pump(ctx);
        Box::pin(async move { answer.await.unwrap_or_else(|_| Err(unanswered())) })
    }
}

impl Handler<PersistResults> for RepositoryWriter {
    type Result = ResponseFuture<Result<ApplyOutcome, StoreError>>;

    fn handle(&mut self, msg: PersistResults, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.applies.push((msg.item, reply));
        self.pump(ctx);
        Box::pin(async move { answer.await.unwrap_or_else(|_| Err(unanswered())) })
    }
}

impl Handler<BatchDone> for RepositoryWriter {
    type Result = ();

    fn handle(&mut self, msg: BatchDone, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        match msg.lane {
            LaneKind::Notes => self.notes.finished(),
            LaneKind::Claims => self.claims.finished(),
            LaneKind::Applies => self.applies.finished(),
        }
        if msg.broken {
            error!(
                actor = "RepositoryWriter",
                "A write batch panicked or its pool closed; restarting with new pools."
            );
            ctx.stop();
            return;
        }
        self.pump(ctx);
    }
}

impl Handler<BreakPools> for RepositoryWriter {
    type Result = ();

    fn handle(&mut self, _msg: BreakPools, _ctx: &mut Context<Self>) {
        warn!(actor = "RepositoryWriter", "Pools closed on request.");
        if let Some(pools) = &self.pools {
            pools.close();
        }
    }
}

/// What a request hears when its batch ended without answering (a panic): nothing was
/// written for it, and its retry or the backfill takes the work again.
fn unanswered() -> StoreError {
    StoreError::unavailable("the repository writer did not answer")
}

/// One lane's PostgreSQL connections: one it runs on whenever it can, and a pool for the
/// other slots of a backlog. Nine for the writer, three in use in steady state.
///
/// Why a connection of its own for each lane: each statement text is prepared and planned on
/// every connection that runs it (the first time costs its parse and plan, milliseconds for a
/// write's joined statement). One pool hands its idle connections out in turn, so every
/// lane's texts were prepared on every connection the pool had opened: 358 parses in a
/// latency run. A lane running one transaction at a time keeps to its first connection.
struct LoopStores {
    first: Store,
    first_free: Arc<tokio::sync::Mutex<()>>,
    spare: Store,
}

impl LoopStores {
    async fn open(shared: &Store) -> Self {
        Self {
            first: own_pool(shared, 1).await,
            first_free: Arc::new(tokio::sync::Mutex::new(())),
            spare: own_pool(shared, PG_SLOTS - 1).await,
        }
    }

    /// `batch` run on the first connection when it is free, else on a spare one; the first
    /// stays taken until the batch has finished.
    fn run<F, Fut>(&self, batch: F) -> impl Future<Output = ()> + use<F, Fut>
    where
        F: FnOnce(Store) -> Fut,
        Fut: Future<Output = ()>,
    {
        let (store, held) = match Arc::clone(&self.first_free).try_lock_owned() {
            Ok(held) => (self.first.clone(), Some(held)),
            Err(_) => (self.spare.clone(), None),
        };
        let work = batch(store);
        async move {
            work.await;
            drop(held);
        }
    }
}

/// A PostgreSQL pool of `size` connections opened as needed; on SQLite, or when the pool
/// cannot be set up, the process's own.
async fn own_pool(shared: &Store, size: u32) -> Store {
    match shared.with_own_pool(size).await {
        Ok(own) => own,
        Err(e) => {
            warn!(error = %enrichd_core::error::chain(&e), "A repository writer lane shares the process's pool.");
            shared.clone()
        }
    }
}

async fn run_claims(
    store: Store,
    claim: Arc<ClaimSettings>,
    batch: Vec<(CanonicalIp, ClaimMode, Reply<Claims>)>,
) {
    // `lookup --refresh` claims everything; keep it out of the due-only statement.
    let (due, refresh): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|(_, mode, _)| *mode == ClaimMode::Due);
    for (mode, requests) in [(ClaimMode::Due, due), (ClaimMode::Refresh, refresh)] {
        if requests.is_empty() {
            continue;
        }
        let ips: Vec<CanonicalIp> = requests.iter().map(|(ip, _, _)| *ip).collect();
        match store
            .claim_batch(&ips, &claim.providers, claim.ptr, claim.lease, mode)
            .await
        {
            Ok(claims) => {
                for ((_, _, reply), claims) in requests.into_iter().zip(claims) {
                    // A job that went away needs no answer; its leases lapse.
                    let _ = reply.send(Ok(claims));
                }
            }
            Err(e) => {
                for (_, _, reply) in requests {
                    let _ = reply.send(Err(e.shared()));
                }
            }
        }
    }
}

async fn run_notes(
    store: Store,
    claim: Arc<ClaimSettings>,
    batch: Vec<(EventNote, Reply<Intake>)>,
) {
    let (notes, replies): (Vec<EventNote>, Vec<_>) = batch.into_iter().unzip();
    let intakes = store.note_events(notes, &claim).await;
    for (reply, intake) in replies.into_iter().zip(intakes) {
        // A delivery that went away needs no answer; it is redelivered.
        let _ = reply.send(intake);
    }
}

async fn run_applies(
    store: Store,
    ctx: Arc<ApplyContext>,
    batch: Vec<(ApplyItem, Reply<ApplyOutcome>)>,
) {
    let (items, replies): (Vec<ApplyItem>, Vec<_>) = batch.into_iter().unzip();
    let outcomes = store.apply_batch(items, &ctx).await;
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lane with requests `0..n` waiting.
    fn lane(n: u32) -> Lane<u32> {
        let mut lane = Lane::default();
        for request in 0..n {
            lane.push(request);
        }
        lane
    }

    /// Batches started, and the most at once, when every batch runs until all that may start
    /// have started, then they finish one by one.
    fn batches(n: u32, slots: u32) -> (usize, Vec<usize>) {
        let mut lane = lane(n);
        let mut sizes = Vec::new();
        let mut most = 0;
        let mut running: u32 = 0;
        loop {
            while let Some(batch) = lane.next_batch(slots) {
                sizes.push(batch.len());
                running += 1;
            }
            most = most.max(running as usize);
            if running == 0 {
                break;
            }
            lane.finished();
            running -= 1;
        }
        (most, sizes)
    }

    #[test]
    fn batches_take_the_largest_size_that_fits() {
        let sizes: Vec<usize> = [0, 1, 2, 3, 5, 7, 11, 13, 47, 63, 64, 65]
            .map(batch_size_at_most)
            .to_vec();
        assert_eq!(sizes, [0, 1, 2, 3, 4, 6, 8, 12, 32, 48, 64, 64]);
    }

    #[test]
    fn every_request_is_taken_once_in_order() {
        let mut lane = lane(100);
        let mut taken = Vec::new();
        while let Some(batch) = lane.next_batch(1) {
            assert!(BATCH_SIZES.contains(&batch.len()));
            taken.extend(batch);
            lane.finished();
        }
        assert_eq!(taken, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn one_batch_runs_at_a_time_unless_a_whole_batch_is_waiting() {
        // 40 waiting: 32 now, then the 8 left once those are written, never two at once.
        assert_eq!(batches(40, 3), (1, vec![32, 8]));
        // 200 waiting: three whole batches at once (every slot), then the rest.
        assert_eq!(batches(200, 3), (3, vec![64, 64, 64, 8]));
        // SQLite's one writer: one at a time whatever waits.
        assert_eq!(batches(200, 1), (1, vec![64, 64, 64, 8]));
    }
}
