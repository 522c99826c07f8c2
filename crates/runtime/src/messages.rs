//! Every message the actors exchange, one struct each: the protocol of the actor system in
//! one place. Each doc opens with one line, "sender → receiver, reply, fate on failure"; a test
//! (`tests/message_table.rs`) keeps ARCHITECTURE.md's message table equal to this file.
//!
//! Messages own their data and carry the `job_id` of the enrichment they belong to where there
//! is one, because tracing spans do not cross mailboxes. The vocabulary they carry (job ids,
//! origins, provider answers, failure kinds) is `enrichd_core::job`, free of actix.

use actix::{Addr, Message};
use chrono::{DateTime, Utc};
use enrichd_core::job::{JobId, Origin, PersistError, ProviderAnswer, ProviderUnavailable};
use enrichd_core::ports::PtrReport;
use enrichd_core::{CanonicalIp, ProviderId};
use enrichd_store::{ApplyItem, ApplyOutcome, ClaimMode, Claims, EventNote, Intake, StoreError};
use tokio::sync::oneshot;

use crate::aggregator::Joined;
use crate::bus_listener::BusListener;
use crate::job::JobSummary;
use crate::provider_actor::ProviderStatus;
use crate::repository_writer::LaneKind;

// === the pipeline ===

/// `BusListener` / backfill / `lookup` → `Aggregator`; reply once the address's state is durable
/// (`lookup`: once its pass is done); `Unavailable`: the delivery stays unacked and is retried
/// (intake pauses), `Rejected`: dead-lettered.
///
/// Concurrent requests for one address share one job. Durable means the address's work is
/// committed as leased by this live process, or as due, or already fresh: when a bus delivery
/// may be acked.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), PersistError>")]
pub struct EnrichIp {
    /// The job.
    pub job_id: JobId,
    /// The canonical address.
    pub ip: CanonicalIp,
    /// The attacker row the event named, when it named one.
    pub attacker_uuid: Option<String>,
    /// The event's `first_seen`, used when enrichd creates the attacker row.
    pub first_seen: Option<DateTime<Utc>>,
    /// Who asked; decides whether the event is recorded and what is claimed.
    pub origin: Origin,
}

/// A bus request's task → `Aggregator`; reply the new job's durable receiver, or the event back;
/// the event back means it is recorded on its own and joins the running job.
///
/// Starts a job for a bus event not recorded yet, whose first transaction records it and
/// claims the address's work together. The event comes back when it must be recorded on its
/// own first: a job for the address is already running (it is joined after the record), or
/// the running jobs are at their cap (a job that waits for a turn must not hold its event's
/// record back, or the event's ack waits with it).
#[derive(Debug, Message)]
#[rtype(result = "Result<oneshot::Receiver<Result<(), PersistError>>, EventNote>")]
pub(crate) struct StartRecorded {
    pub(crate) ip: CanonicalIp,
    pub(crate) job_id: JobId,
    pub(crate) event: EventNote,
}

/// A request's task → `Aggregator`; reply the job's receiver and whether to ack at once; never
/// fails while the aggregator lives (its end fails the request's send: left for redelivery).
///
/// Joins or starts the job for a request already recorded.
#[derive(Debug, Message)]
#[rtype(result = "Joined")]
pub(crate) struct JoinJob {
    pub(crate) ip: CanonicalIp,
    pub(crate) origin: Origin,
    pub(crate) job_id: JobId,
    pub(crate) attacker_uuids: Vec<String>,
}

/// Job → its `Aggregator`; no reply; lost only delays answers until the job's end (`do_send`).
///
/// The job for `ip` committed its claims.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub(crate) struct JobDurable {
    pub(crate) ip: CanonicalIp,
    /// The attacker rows of the bus event the job recorded itself (see [`StartRecorded`]).
    pub(crate) attacker_uuids: Vec<String>,
}

/// A job's task → its `Aggregator`; no reply; lost only if the aggregator is gone, and then
/// nobody waits for it.
///
/// A job ended, with what it did.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct JobDone {
    pub(crate) ip: CanonicalIp,
    pub(crate) job_id: JobId,
    pub(crate) result: Result<JobSummary, PersistError>,
}

/// Backfill → `Aggregator`; reply once fewer than `below` jobs are queued or running; on
/// failure the backfill queries again at once.
///
/// The backfill waits for this after a full batch instead of querying the backlog again at
/// once: while the jobs it (or the bus) started are still queued, their addresses are not
/// leased yet, so the backlog would only return them again, and on a large table every
/// backlog query is a scan.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Room {
    /// The queue length to wait below.
    pub below: usize,
}

/// Job → `PtrResolverPool`; reply the `PtrReport`; never fails (every failure is a
/// `PtrOutcome`); a mailbox timeout lets the lease lapse and the work is retried.
#[derive(Debug, Clone, Message)]
#[rtype(result = "PtrReport")]
pub struct ResolvePtr {
    /// The job.
    pub job_id: JobId,
    /// The address.
    pub ip: CanonicalIp,
}

/// A PTR lookup's task → `PtrResolverPool`; no reply; lost only if the pool is already
/// restarting.
///
/// A lookup on resolver `generation` panicked: restart to rebuild it.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub(crate) struct ResolverFaulted {
    pub(crate) generation: u64,
}

/// Job → `ProviderActor`; reply the answer (with the slot it holds) or why nothing was sent;
/// unavailable: the work stays leased, then due, and its backoff does not advance.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<ProviderAnswer, ProviderUnavailable>")]
pub struct QueryProvider {
    /// The job.
    pub job_id: JobId,
    /// The provider being asked (lets one recipient list serve all providers).
    pub provider: ProviderId,
    /// The address.
    pub ip: CanonicalIp,
}

/// Health beat, gauges → `ProviderActor`; reply its `ProviderStatus`; on failure reported as
/// unknown.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ProviderStatus")]
pub struct GetProviderStatus;

/// Tests, drills → `ProviderActor`; no reply; the actor stops and its supervisor restarts it
/// (state shared with the calls in flight survives).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct InjectFault;

/// A provider call's task → `ProviderActor`; no reply; lost only if the actor is already
/// stopping or gone.
///
/// A provider call panicked: restart.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub(crate) struct CallPanicked;

/// Job / Aggregator → `RepositoryWriter`; reply the event's `Intake` (with its claims when it
/// asked for them); `Unavailable` (or no answer): the delivery stays unacked and is retried.
///
/// Records a bus event in the next intake batch (see `Store::note_events`).
#[derive(Debug, Message)]
#[rtype(result = "Result<Intake, StoreError>")]
pub struct RecordEvent {
    /// The event.
    pub note: EventNote,
}

/// Job → `RepositoryWriter`; reply the address's `Claims`; on failure the job ends and the
/// work stays due (nothing was leased).
///
/// Claims the due (or, refreshing, all) work of an address in the next claim batch.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<Claims, StoreError>")]
pub struct ClaimWork {
    /// The address.
    pub ip: CanonicalIp,
    /// Due work only, or everything not leased elsewhere.
    pub mode: ClaimMode,
}

/// Job → `RepositoryWriter`; reply what the write did (`ApplyOutcome`); `Unavailable`: retried
/// until shortly before the pass's leases lapse, then the work is asked again later.
///
/// Writes a pass's results in the next write batch.
#[derive(Debug, Message)]
#[rtype(result = "Result<ApplyOutcome, StoreError>")]
pub struct PersistResults {
    /// The address's results.
    pub item: ApplyItem,
}

/// A write batch's task → `RepositoryWriter`; no reply; lost only if the writer is gone for
/// good, and then nothing waits for its lane.
///
/// A batch of a lane ended; `broken`: it panicked, or its pool closed (restart).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub(crate) struct BatchDone {
    pub(crate) lane: LaneKind,
    pub(crate) generation: u64,
    pub(crate) broken: bool,
}

/// Tests, drills → `RepositoryWriter`; no reply; its own pools close, its next batch fails
/// and it restarts with new ones.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct BreakPools;

// === lifecycle ===

/// `/healthz` → `Aggregator`; no reply but the answer itself; on failure the probe fails.
///
/// Answered by the actor itself, so a reply means the actor system runs.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Ping;

/// `Coordinator` → `BusListener`; reply when the consumers are cancelled; each shutdown step logs
/// its own failure and the next goes on.
///
/// Stop consuming; deliveries in flight are still settled.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct StopIntake;

/// `Coordinator`, backfill → `Aggregator`; reply once no job is in flight; bounded by the grace
/// period.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Drain;

/// `Coordinator` → `BusListener`; reply when the connections are closed; its failure is logged
/// and the process exits anyway (unacked deliveries are redelivered).
///
/// Close the bus after the final outbox round; sent last.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct CloseConnection;

/// Signal, control `stop`, `ChildGaveUp` → `Coordinator`; no reply; the grace period bounds it.
///
/// Begin the shutdown sequence and exit with `exit_code`.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    /// 0 for a requested stop, 1 for a failure.
    pub exit_code: u8,
}

/// Supervised child → `Coordinator`; no reply; the process exits 1, and its unacked deliveries
/// go to healthier replicas.
///
/// A supervised child spent its restart budget.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct ChildGaveUp {
    /// The actor's role name.
    pub actor: &'static str,
}

/// `run`'s wiring → `Coordinator`; no reply; lost only with the `Coordinator`, and the process
/// ends with it.
///
/// Attach the bus listener once both actors exist (each needs the other's address).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct AttachBus(pub Addr<BusListener>);
