//! `StoreBatcher`: bus events' intake and the jobs' claims and writes, gathered into shared
//! transactions.
//!
//! Recording an event, a job's claim and its write are each one small transaction, and a commit is the scarce
//! resource (about 4,000 a second on the reference machine, whatever their size). The batcher
//! takes whatever requests have queued while the previous batch ran (up to [`MAX_BATCH`]) and
//! runs them as one [`Store::note_events`], [`Store::claim_batch`] or [`Store::apply_batch`]: under load a commit
//! carries dozens of addresses, and a lone request never waits for company, because a batch
//! starts as soon as the loop's running transaction has committed.

use std::collections::VecDeque;
use std::sync::Arc;

use enrichd_core::CanonicalIp;
use enrichd_store::{
    ApplyContext, ApplyItem, ApplyOutcome, ClaimMode, Claims, EventNote, Intake, Store, StoreError,
};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tracing::{error, warn};

/// Addresses per transaction. Larger batches commit less often but hold their rows' locks
/// longer, and a refused batch is written again one address at a time.
const MAX_BATCH: usize = 64;

/// The batch sizes a loop uses: powers of two and one and a half times each, up to
/// [`MAX_BATCH`]. Every size is a statement text of its own (`IN` lists, multi-row `VALUES`),
/// prepared and cached on each connection, so the sizes are few; a batch is what queued,
/// rounded down to one of these, and the rest go first into the next batch. Between powers of
/// two alone a third of a typical batch waited for the next transaction.
const BATCH_SIZES: [usize; 12] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64];
const _: () = assert!(BATCH_SIZES[BATCH_SIZES.len() - 1] == MAX_BATCH);

/// Transactions a loop may have in flight on PostgreSQL, each on its own connection; SQLite
/// has one writer, so one there. A loop runs one at a time and takes the others only for a
/// backlog (see [`batch_loop`]). Three at once as the rule cost PostgreSQL about a sixth more
/// CPU for the same addresses and did not shorten the wait: a batch that waits for a free
/// slot gathers no more than one that waits for the running transaction to commit
/// (BENCHMARKS.md, "One transaction at a time").
const PG_SLOTS: u32 = 3;

pub use enrichd_store::ClaimSettings;

struct ClaimRequest {
    ip: CanonicalIp,
    mode: ClaimMode,
    reply: oneshot::Sender<Result<Claims, StoreError>>,
}

struct NoteRequest {
    note: EventNote,
    reply: oneshot::Sender<Result<Intake, StoreError>>,
}

struct ApplyRequest {
    item: ApplyItem,
    reply: oneshot::Sender<Result<ApplyOutcome, StoreError>>,
}

/// Handle to the two batching loops; cheap to clone. The loops end when every handle is gone.
#[derive(Debug, Clone)]
pub struct StoreBatcher {
    notes: mpsc::UnboundedSender<NoteRequest>,
    claims: mpsc::UnboundedSender<ClaimRequest>,
    applies: mpsc::UnboundedSender<ApplyRequest>,
}

impl StoreBatcher {
    /// Starts the loops on a thread of their own, each loop with a PostgreSQL pool of its own.
    ///
    /// Why a thread: every new address passes through the batcher twice, and under load the
    /// thread the actors share is busy; batches that waited for it held their transactions
    /// (and row locks) open meanwhile. Their statements' encoding, decoding and socket
    /// wake-ups now happen here instead (see [`Store::with_own_pool`]).
    pub fn start(store: &Store, claim: ClaimSettings, ctx: ApplyContext) -> Self {
        let (notes, note_rx) = mpsc::unbounded_channel();
        let (claims, claim_rx) = mpsc::unbounded_channel();
        let (applies, apply_rx) = mpsc::unbounded_channel();
        let shared = store.clone();
        let loops = async move {
            let slots = if shared.single_writer() { 1 } else { PG_SLOTS };
            let (note_stores, claim_stores, apply_stores) = (
                LoopStores::open(&shared).await,
                LoopStores::open(&shared).await,
                LoopStores::open(&shared).await,
            );
            let claim = Arc::new(claim);
            let ctx = Arc::new(ctx);
            let note_claim = Arc::clone(&claim);
            futures::future::join3(
                batch_loop(note_rx, slots, move |batch| {
                    let claim = Arc::clone(&note_claim);
                    note_stores.run(|store| run_notes(store, claim, batch))
                }),
                batch_loop(claim_rx, slots, move |batch| {
                    let claim = Arc::clone(&claim);
                    claim_stores.run(|store| run_claims(store, claim, batch))
                }),
                batch_loop(apply_rx, slots, move |batch| {
                    let ctx = Arc::clone(&ctx);
                    apply_stores.run(|store| run_applies(store, ctx, batch))
                }),
            )
            .await;
        };
        run_on_own_thread(loops);
        Self {
            notes,
            claims,
            applies,
        }
    }

    /// Records a bus event (see [`Store::note_event`]), in the next intake batch; with
    /// [`EventNote::claim`], claims its due work in the same transaction.
    ///
    /// # Errors
    /// This event's [`StoreError`]; `Unavailable` when the batcher did not answer.
    pub async fn note(&self, note: EventNote) -> Result<Intake, StoreError> {
        request(&self.notes, |reply| NoteRequest { note, reply }).await
    }

    /// Claims the due (or all) work of `ip`, in the next claim batch.
    ///
    /// # Errors
    /// The batch's [`StoreError`]; `Unavailable` when the batcher did not answer.
    pub async fn claim(&self, ip: CanonicalIp, mode: ClaimMode) -> Result<Claims, StoreError> {
        request(&self.claims, |reply| ClaimRequest { ip, mode, reply }).await
    }

    /// Writes one pass's results, in the next write batch.
    ///
    /// # Errors
    /// This address's [`StoreError`]; `Unavailable` when the batcher did not answer.
    pub async fn apply(&self, item: ApplyItem) -> Result<ApplyOutcome, StoreError> {
        request(&self.applies, |reply| ApplyRequest { item, reply }).await
    }
}

/// One loop's PostgreSQL connections: one it runs on whenever it can, and a pool for the
/// other slots of a backlog. Nine for the batcher, three in use in steady state.
///
/// Why a connection of its own for each loop: each statement text is prepared and planned on
/// every connection that runs it (the first time costs its parse and plan, milliseconds for a
/// write's joined statement). One pool hands its idle connections out in turn, so every
/// loop's texts were prepared on every connection the pool had opened: 358 parses in a
/// latency run. A loop running one transaction at a time now keeps to its first connection.
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
            warn!(error = %enrichd_core::error::chain(&e), "A store batcher loop shares the process's pool.");
            shared.clone()
        }
    }
}

/// Queues the request `make` builds around a reply channel, and waits for the reply.
async fn request<R, T>(
    queue: &mpsc::UnboundedSender<R>,
    make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> R,
) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue.send(make(reply)).map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?
}

fn stopped() -> StoreError {
    // The loops stopped, or a batch task died before answering: either way nothing was
    // written for this request, and the caller's retry or the backfill takes it again.
    StoreError::unavailable("the store batcher did not answer")
}

/// Runs what is queued as one batch on a task of its own, one batch at a time: the next
/// starts when the running one has finished, with everything that queued meanwhile. Only a
/// backlog runs more at once: while a whole batch ([`MAX_BATCH`]) is waiting, it starts in a
/// free slot of `slots` without waiting, so one slow transaction does not cap the loop at
/// [`MAX_BATCH`] requests per transaction time.
///
/// A batch holds one of [`BATCH_SIZES`] requests; the rest go first into the next batch.
async fn batch_loop<R, F, Fut>(mut requests: mpsc::UnboundedReceiver<R>, slots: u32, run: F)
where
    R: Send + 'static,
    F: Fn(Vec<R>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = slots.max(1);
    let free_slots = Arc::new(Semaphore::new(slots as usize));
    let finished = Arc::new(Notify::new());
    let mut waiting: VecDeque<R> = VecDeque::new();
    let mut open = true;
    loop {
        while open && waiting.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => waiting.push_back(request),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if waiting.is_empty() {
            if !open {
                break;
            }
            match requests.recv().await {
                Some(request) => waiting.push_back(request),
                None => open = false,
            }
            continue;
        }
        let idle = free_slots.available_permits() == slots as usize;
        if (idle || waiting.len() >= MAX_BATCH)
            && let Ok(permit) = Arc::clone(&free_slots).try_acquire_owned()
        {
            let size = batch_size_at_most(waiting.len());
            let work = run(waiting.drain(..size).collect());
            let finished = Arc::clone(&finished);
            tokio::spawn(async move {
                work.await;
                drop(permit);
                finished.notify_one();
            });
            continue;
        }
        tokio::select! {
            () = finished.notified() => {}
            next = requests.recv(), if open && waiting.len() < MAX_BATCH => match next {
                Some(request) => waiting.push_back(request),
                None => open = false,
            },
        }
    }
    // Batches still running answer before the loop ends (and with it, maybe, their runtime).
    let _ = free_slots.acquire_many(slots).await;
}

/// Runs `work` to its end on a new thread with a runtime of its own; on the current runtime
/// when no thread can be started, so the batcher works either way.
fn run_on_own_thread(work: impl Future<Output = ()> + Send + 'static) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "No runtime for the store batcher; it shares the current one.");
            tokio::spawn(work);
            return;
        }
    };
    // The work and its runtime go over a channel so that, when the thread cannot be started,
    // they come back instead of being dropped with the closure (dropping a runtime here, in
    // an async context, would panic).
    let (hand, take) = std::sync::mpsc::sync_channel::<(tokio::runtime::Runtime, _)>(1);
    let started = std::thread::Builder::new()
        .name("store-batcher".into())
        .spawn(move || {
            if let Ok((runtime, work)) = take.recv() {
                runtime.block_on(work);
            }
        });
    if let Err(e) = started {
        error!(error = %e, "No thread for the store batcher; it shares the current runtime.");
    }
    if let Err(std::sync::mpsc::SendError((runtime, work))) = hand.send((runtime, work)) {
        runtime.shutdown_background();
        tokio::spawn(work);
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

async fn run_claims(store: Store, claim: Arc<ClaimSettings>, batch: Vec<ClaimRequest>) {
    // `lookup --refresh` claims everything; keep it out of the due-only statement.
    let (due, refresh): (Vec<_>, Vec<_>) =
        batch.into_iter().partition(|r| r.mode == ClaimMode::Due);
    for (mode, requests) in [(ClaimMode::Due, due), (ClaimMode::Refresh, refresh)] {
        if requests.is_empty() {
            continue;
        }
        let ips: Vec<CanonicalIp> = requests.iter().map(|r| r.ip).collect();
        match store
            .claim_batch(&ips, &claim.providers, claim.ptr, claim.lease, mode)
            .await
        {
            Ok(claims) => {
                for (request, claims) in requests.into_iter().zip(claims) {
                    // A job that went away needs no answer; its leases lapse.
                    let _ = request.reply.send(Ok(claims));
                }
            }
            Err(e) => {
                for request in requests {
                    let _ = request.reply.send(Err(e.shared()));
                }
            }
        }
    }
}

async fn run_notes(store: Store, claim: Arc<ClaimSettings>, batch: Vec<NoteRequest>) {
    let (notes, replies): (Vec<EventNote>, Vec<_>) =
        batch.into_iter().map(|r| (r.note, r.reply)).unzip();
    let intakes = store.note_events(notes, &claim).await;
    for (reply, intake) in replies.into_iter().zip(intakes) {
        // A delivery that went away needs no answer; it is redelivered.
        let _ = reply.send(intake);
    }
}

async fn run_applies(store: Store, ctx: Arc<ApplyContext>, batch: Vec<ApplyRequest>) {
    let (items, replies): (Vec<ApplyItem>, Vec<_>) =
        batch.into_iter().map(|r| (r.item, r.reply)).unzip();
    let outcomes = store.apply_batch(items, &ctx).await;
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A queue holding requests `0..n` whose senders are all gone.
    fn closed_queue(n: u32) -> mpsc::UnboundedReceiver<u32> {
        let (tx, rx) = mpsc::unbounded_channel();
        for request in 0..n {
            tx.send(request).unwrap();
        }
        rx
    }

    #[test]
    fn batches_take_the_largest_size_that_fits() {
        let sizes: Vec<usize> = [0, 1, 2, 3, 5, 7, 11, 13, 47, 63, 64, 65]
            .map(batch_size_at_most)
            .to_vec();
        assert_eq!(sizes, [0, 1, 2, 3, 4, 6, 8, 12, 32, 48, 64, 64]);
    }

    #[tokio::test]
    async fn every_request_is_run_once_in_order() {
        let rx = closed_queue(100);
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        batch_loop(rx, 1, move |batch: Vec<u32>| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send(batch);
            }
        })
        .await;
        let mut batches = Vec::new();
        while let Some(batch) = seen_rx.recv().await {
            batches.push(batch);
        }
        assert!(batches.iter().all(|b| BATCH_SIZES.contains(&b.len())));
        let flat: Vec<u32> = batches.concat();
        assert_eq!(flat, (0..100).collect::<Vec<_>>());
    }

    /// The most batches `batch_loop` ran at once, with `queued` requests waiting at the start
    /// and each batch taking a second.
    async fn most_batches_at_once(queued: u32) -> (usize, Vec<usize>) {
        let rx = closed_queue(queued);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (r, m, z) = (Arc::clone(&running), Arc::clone(&most), Arc::clone(&sizes));
        batch_loop(rx, 3, move |batch: Vec<u32>| {
            let (running, most, sizes) = (Arc::clone(&r), Arc::clone(&m), Arc::clone(&z));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                sizes.lock().unwrap().push(batch.len());
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                running.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .await;
        let sizes = sizes.lock().unwrap().clone();
        (most.load(Ordering::SeqCst), sizes)
    }

    #[tokio::test(start_paused = true)]
    async fn one_batch_runs_at_a_time_unless_a_whole_batch_is_waiting() {
        // 40 waiting: 32 now, then the 8 left once those are written, never two at once.
        assert_eq!(most_batches_at_once(40).await, (1, vec![32, 8]));
        // 200 waiting: three whole batches at once (every slot), then the rest.
        assert_eq!(most_batches_at_once(200).await, (3, vec![64, 64, 64, 8]));
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_ends_only_once_its_running_batches_have_finished() {
        let rx = closed_queue(10);
        let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&finished);
        batch_loop(rx, 3, move |batch: Vec<u32>| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                seen.lock().unwrap().extend(batch);
            }
        })
        .await;
        let mut finished = finished.lock().unwrap().clone();
        finished.sort_unstable();
        assert_eq!(finished, (0..10).collect::<Vec<_>>());
    }
}
