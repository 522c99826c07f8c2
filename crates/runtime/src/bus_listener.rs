//! `BusListener`: the RabbitMQ side of the worker (SPEC §4).
//!
//! Two connections, one consuming and one publishing, so a slow publish never delays acks
//! and the other way round. A session declares the topology and this replica's control queue,
//! consumes with the configured prefetch, and runs the outbox relay and the health beat on the
//! publishing connection. When the session fails (broker restart, network), the listener
//! reconnects with backoff while the backfill keeps working from the database.
//!
//! Each delivery ends in exactly one of: ack once its address's state is durable; dead-letter
//! (republish to the DLX with `x-enrichd-reason`, confirmed, then ack) when it is poison; or
//! no settlement at all when the store is down (the prefetch window then pauses intake, and
//! nothing is nacked, so the quorum queue's delivery limit never dead-letters good events).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use backon::{BackoffBuilder, Retryable};
use chrono::{DateTime, NaiveDateTime, Utc};
use enrichd_bus::decode::cut_oversized;
use enrichd_bus::publish::{Outgoing, Publisher};
use enrichd_bus::{BusError, DeadLetterReason, Poison, Topology, connect, decode};
use enrichd_core::Secret;
use enrichd_core::job::{DeliveryTag, JobId, Origin, PersistError};
use enrichd_core::payload::{Envelope, TOPIC_HEALTH};
use enrichd_store::Store;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, Event};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::acks::AckBatcher;
use crate::aggregator::Aggregator;
use crate::health::HealthSource;
use crate::messages::{CloseConnection, EnrichIp, Shutdown, StopIntake};
use crate::relay::{OutboxHandoff, RelayEnd, run_relay};
use crate::supervision::backoff;

/// Longest wait for an ack, a cancel or a close. Each takes microseconds on a live
/// connection; on one that died without lapin settling its promise it may never finish, and a
/// session loop waiting on it would never reconnect (a replica once stayed silent after a
/// broker restart in the fault suite until it was stopped).
const BUS_CALL_WITHIN: Duration = Duration::from_secs(5);

/// Longest wait for both connections, the topology and the consumers. A broker still starting
/// may answer `connection.open` with `connection.close`, and lapin has left `connect` pending
/// on that before (amqp-rs/lapin#470).
const OPEN_WITHIN: Duration = Duration::from_secs(30);

/// How often a session checks that both connections and the consuming channel are still up,
/// for a failure that reached neither a consumer stream nor a connection's events.
const LIVENESS_EVERY: Duration = Duration::from_secs(2);

/// Health beats: at start and every 30 s, expiring after 90 s.
const HEALTH_EVERY: Duration = Duration::from_secs(30);
const HEALTH_EXPIRATION_MS: u64 = 90_000;

/// Bus settings of one replica.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// `amqp://` / `amqps://` URL (may carry credentials).
    pub url: Secret,
    /// Exchange and queue names.
    pub topology: Topology,
    /// Deliveries in flight.
    pub prefetch: u16,
    /// This replica's id (connection names, health beats).
    pub instance: String,
}

/// Counters for health and metrics.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Deliveries received.
    pub consumed: AtomicU64,
    /// Deliveries acked.
    pub acked: AtomicU64,
    /// Deliveries dead-lettered.
    pub dead_lettered: AtomicU64,
    /// A session is up and taking deliveries; turns false once intake has stopped and every
    /// delivery in flight is settled (a `watch`, so `StopIntake` can wait for it).
    pub connected: watch::Sender<bool>,
}

/// What a session needs besides its configuration.
#[derive(Clone)]
pub struct BusDeps {
    /// Where deliveries go.
    pub aggregator: Addr<Aggregator>,
    /// For the outbox relay.
    pub store: Store,
    /// Rows this process's writes hand to the relay, and its wake-up for the others.
    pub outbox: Arc<OutboxHandoff>,
    /// Notified when the bus goes down, so poll mode picks up at once.
    pub backfill_wake: Arc<Notify>,
    /// Health beat contents.
    pub health: HealthSource,
    /// Told about a cluster-wide `stop`.
    pub coordinator: Recipient<Shutdown>,
    /// Shared counters.
    pub stats: Arc<BusStats>,
}

/// The actor: holds the switches of the session loop running in the background.
pub struct BusListener {
    config: BusConfig,
    deps: BusDeps,
    intake_stop: watch::Sender<bool>,
    relay_stop: watch::Sender<bool>,
    /// Turns true when the session loop has ended (all deliveries settled, connections closed).
    finished: watch::Receiver<bool>,
    finished_tx: Option<watch::Sender<bool>>,
}

impl BusListener {
    /// A listener for `config`; it connects when started.
    pub fn new(config: BusConfig, deps: BusDeps) -> Self {
        let (finished_tx, finished) = watch::channel(false);
        Self {
            config,
            deps,
            intake_stop: watch::channel(false).0,
            relay_stop: watch::channel(false).0,
            finished,
            finished_tx: Some(finished_tx),
        }
    }
}

impl Actor for BusListener {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        let Some(finished_tx) = self.finished_tx.take() else {
            return;
        };
        let config = self.config.clone();
        let deps = self.deps.clone();
        let intake_stop = self.intake_stop.subscribe();
        let relay_stop = self.relay_stop.subscribe();
        actix::spawn(async move {
            session_loop(config, deps, intake_stop, relay_stop).await;
            let _ = finished_tx.send(true);
        });
    }
}

impl Handler<StopIntake> for BusListener {
    type Result = ResponseFuture<()>;

    /// Cancels the consumers; replies once every delivery in flight is settled.
    fn handle(&mut self, _msg: StopIntake, _ctx: &mut Context<Self>) -> Self::Result {
        let _ = self.intake_stop.send(true);
        let stats = Arc::clone(&self.deps.stats);
        let mut finished = self.finished.clone();
        let mut connected = stats.connected.subscribe();
        Box::pin(async move {
            // In a session, intake stops when its consumers are cancelled and its deliveries
            // settled (`connected` turns false); without one it is already off.
            tokio::select! {
                _ = connected.wait_for(|up| !*up) => {}
                _ = finished.wait_for(|done| *done) => {}
            }
        })
    }
}

impl Handler<CloseConnection> for BusListener {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: CloseConnection, _ctx: &mut Context<Self>) -> Self::Result {
        let _ = self.intake_stop.send(true);
        let _ = self.relay_stop.send(true);
        let mut finished = self.finished.clone();
        Box::pin(async move {
            let _ = finished.wait_for(|done| *done).await;
        })
    }
}

// === the session loop ===

enum SessionEnd {
    Stopped,
    Failed(SessionError),
}

/// Why a bus session ended early; the listener reconnects with backoff whatever it is.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Connecting, declaring, opening a channel or a consumer failed.
    #[error("bus call failed")]
    Bus(#[from] BusError),
    /// A call on the session did not finish within its deadline: the connection is taken as
    /// lost (lapin does not always notice a broker restart).
    #[error("{call} not done in time; the connection is taken as lost")]
    Hung {
        /// Which call.
        call: &'static str,
    },
    /// The work queue's consumer stream failed.
    #[error("consumer failed")]
    Consumer(#[source] lapin::Error),
    /// The broker cancelled the consumer (the queue was deleted, or the node stopped).
    #[error("consumer cancelled by the broker")]
    ConsumerCancelled,
    /// Either connection reported an error.
    #[error("connection failed")]
    Connection(#[source] lapin::Error),
    /// The liveness check found a connection or the consuming channel closed.
    #[error("connection lost")]
    ConnectionLost,
    /// The relay or the health beat found the publishing connection gone.
    #[error("publishing connection failed")]
    PublishingFailed,
}

/// `source` as a [`BusError`] of `operation`.
fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> SessionError {
    move |source| SessionError::Bus(BusError::Amqp { operation, source })
}

async fn session_loop(
    config: BusConfig,
    deps: BusDeps,
    intake_stop: watch::Receiver<bool>,
    mut relay_stop: watch::Receiver<bool>,
) {
    // From 800 ms to 30 s; a session that lasted a minute starts the delays afresh.
    let reconnects = || backoff(Duration::from_millis(800), Duration::from_secs(30)).build();
    let mut delays = reconnects();
    let mut attempt = 0u32;
    loop {
        if *relay_stop.borrow() {
            return;
        }
        let started = tokio::time::Instant::now();
        match session(&config, &deps, intake_stop.clone(), relay_stop.clone()).await {
            SessionEnd::Stopped => return,
            SessionEnd::Failed(reason) => {
                deps.stats.connected.send_replace(false);
                deps.backfill_wake.notify_one();
                if started.elapsed() > Duration::from_secs(60) {
                    attempt = 0;
                    delays = reconnects();
                }
                attempt += 1;
                let wait = delays.next().unwrap_or(Duration::from_secs(30));
                let reason = enrichd_core::error::chain(&reason);
                warn!(error = %reason, attempt, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "Bus unavailable; running on the backlog and reconnecting.");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = relay_stop.changed() => {}
                }
            }
        }
    }
}

/// An open session: both connections, the publisher, and the two consumers.
struct Session {
    consume_conn: lapin::Connection,
    publish_conn: lapin::Connection,
    publisher: Publisher,
    consume_ch: lapin::Channel,
    work: lapin::Consumer,
    work_tag: String,
    control: lapin::Consumer,
    control_tag: String,
}

async fn open_session(config: &BusConfig) -> Result<Session, SessionError> {
    let consume_conn =
        connect(&config.url, &format!("enrichd-consume {}", config.instance)).await?;
    let publish_conn =
        connect(&config.url, &format!("enrichd-publish {}", config.instance)).await?;
    let publisher = Publisher::open(&publish_conn).await?;
    for mismatch in config.topology.declare(&publish_conn).await? {
        // A queue from an older release: consuming goes on, and the operator learns what
        // differs and how to migrate, once per session.
        warn!(
            queue = %mismatch.queue,
            broker = %mismatch.broker_says,
            migrate = %mismatch.migrate,
            "Queue exists with other arguments than this version declares; using it as it is."
        );
    }
    let consume_ch = consume_conn
        .create_channel()
        .await
        .map_err(amqp("open consume channel"))?;
    consume_ch
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(amqp("set prefetch"))?;
    let control_queue = config.topology.declare_control_queue(&consume_ch).await?;
    let work_tag = format!("enrichd-{}", config.instance);
    let work = consume_ch
        .basic_consume(
            config.topology.queue.as_str().into(),
            work_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("consume work queue"))?;
    let control_tag = format!("enrichd-control-{}", config.instance);
    let control = consume_ch
        .basic_consume(
            control_queue.as_str().into(),
            control_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("consume control queue"))?;
    Ok(Session {
        consume_conn,
        publish_conn,
        publisher,
        consume_ch,
        work,
        work_tag,
        control,
        control_tag,
    })
}

/// The relay and the health beat, on the publishing connection. Each task ends `true` when
/// the connection failed.
fn start_background(
    config: &BusConfig,
    deps: &BusDeps,
    publisher: &Publisher,
    relay_stop: &watch::Receiver<bool>,
) -> JoinSet<bool> {
    let mut background = JoinSet::new();
    background.spawn({
        let (store, publisher, exchange, outbox, stop) = (
            deps.store.clone(),
            publisher.clone(),
            config.topology.exchange.clone(),
            Arc::clone(&deps.outbox),
            relay_stop.clone(),
        );
        async move { run_relay(store, publisher, exchange, outbox, stop).await == RelayEnd::BusFailed }
    });
    background.spawn({
        let (publisher, exchange, health, mut stop) = (
            publisher.clone(),
            config.topology.exchange.clone(),
            deps.health.clone(),
            relay_stop.clone(),
        );
        async move {
            loop {
                if let Err(e) = publish_health(&publisher, &exchange, &health).await {
                    debug!(error = %enrichd_core::error::chain(&e), "Health beat not published.");
                }
                tokio::select! {
                    () = tokio::time::sleep(HEALTH_EVERY) => {}
                    _ = stop.changed() => return false,
                }
            }
        }
    });
    background
}

async fn session(
    config: &BusConfig,
    deps: &BusDeps,
    mut intake_stop: watch::Receiver<bool>,
    relay_stop: watch::Receiver<bool>,
) -> SessionEnd {
    let Session {
        consume_conn,
        publish_conn,
        publisher,
        consume_ch,
        mut work,
        work_tag,
        mut control,
        control_tag,
    } = match tokio::time::timeout(OPEN_WITHIN, open_session(config)).await {
        Ok(Ok(session)) => session,
        Ok(Err(reason)) => return SessionEnd::Failed(reason),
        Err(_) => return SessionEnd::Failed(hung("opening the session")),
    };
    // Subscribed before anything else happens on the connections: lapin sends events only
    // while someone listens.
    let mut connection_events = futures::stream::select(
        consume_conn.events_listener(),
        publish_conn.events_listener(),
    );
    let mut liveness = tokio::time::interval(LIVENESS_EVERY);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    deps.stats.connected.send_replace(true);
    info!(queue = %config.topology.queue, prefetch = config.prefetch, "Connected to the bus.");
    let mut background = start_background(config, deps, &publisher, &relay_stop);

    // What every delivery's task needs, shared: cloning the handles and names for each of
    // tens of thousands of deliveries a second was measurable allocation work.
    let settling = Arc::new(Settling {
        deps: deps.clone(),
        publisher: publisher.clone(),
        topology: config.topology.clone(),
    });
    let mut deliveries: JoinSet<(u64, Fate)> = JoinSet::new();
    let mut acks: AckBatcher<Acker> = AckBatcher::default();
    let mut intake_open = !*intake_stop.borrow();
    let end = loop {
        let held_until = acks.next_deadline();
        tokio::select! {
            next = work.next(), if intake_open => match next {
                Some(Ok(mut delivery)) => {
                    deps.stats.consumed.fetch_add(1, Ordering::Relaxed);
                    enrichd_metrics::global().events_consumed.inc();
                    acks.delivered(delivery.delivery_tag);
                    // At once, before anything waits: held whole, a flood of large poison
                    // costs its full size per delivery until each is dead-lettered.
                    let oversized = cut_oversized(&mut delivery.data);
                    let (settling, stop) = (Arc::clone(&settling), intake_stop.clone());
                    deliveries.spawn(async move {
                        let tag = delivery.delivery_tag;
                        (tag, settle(delivery, oversized, &settling, stop).await)
                    });
                }
                Some(Err(e)) => break SessionEnd::Failed(SessionError::Consumer(e)),
                None => break SessionEnd::Failed(SessionError::ConsumerCancelled),
            },
            next = control.next(), if intake_open => if let Some(Ok(delivery)) = next {
                on_control(&delivery, deps);
                // Acked before any coalesced ack can go out, so none settles it by accident.
                if within(delivery.ack(BasicAckOptions::default())).await.is_none() {
                    break SessionEnd::Failed(hung("control ack"));
                }
            },
            _ = intake_stop.changed(), if intake_open => {
                intake_open = false;
                let stopped = stop_intake(&consume_ch, [&work_tag, &control_tag], &mut deliveries, &mut acks, deps).await;
                deps.stats.connected.send_replace(false);
                if let Err(reason) = stopped {
                    break SessionEnd::Failed(reason);
                }
                info!("Intake stopped.");
            },
            Some(joined) = deliveries.join_next(), if !deliveries.is_empty() => {
                record_fate(&mut acks, joined);
                // Everything else that settled meanwhile joins this round of acks.
                while let Some(joined) = deliveries.try_join_next() {
                    record_fate(&mut acks, joined);
                }
                if let Err(reason) = send_acks(&mut acks, deps, false).await {
                    break SessionEnd::Failed(reason);
                }
            },
            () = sleep_until_some(held_until) => if let Err(reason) = send_acks(&mut acks, deps, false).await {
                break SessionEnd::Failed(reason);
            },
            Some(event) = connection_events.next() => if let Event::Error(e) = event {
                break SessionEnd::Failed(SessionError::Connection(e));
            },
            _ = liveness.tick() => if !all_up(&consume_conn, &publish_conn, &consume_ch) {
                break SessionEnd::Failed(SessionError::ConnectionLost);
            },
            Some(joined) = background.join_next() => {
                if matches!(joined, Ok(true)) {
                    break SessionEnd::Failed(SessionError::PublishingFailed);
                }
                if !intake_open && background.is_empty() {
                    break SessionEnd::Stopped;
                }
            },
        }
    };
    background.abort_all();
    deliveries.abort_all();
    // Best effort: after a failure the broker has closed them already.
    let _ = within(consume_conn.close(200, "bye".into())).await;
    let _ = within(publish_conn.close(200, "bye".into())).await;
    end
}

/// Whether lapin still counts both connections and the consuming channel as connected.
fn all_up(
    consume: &lapin::Connection,
    publish: &lapin::Connection,
    channel: &lapin::Channel,
) -> bool {
    consume.status().connected() && publish.status().connected() && channel.status().connected()
}

/// `call`, or `None` when it has not finished within [`BUS_CALL_WITHIN`].
async fn within<T>(call: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(BUS_CALL_WITHIN, call).await.ok()
}

/// Why a session ends when a call on it hung.
fn hung(call: &'static str) -> SessionError {
    SessionError::Hung { call }
}

/// Cancels both consumers, lets the deliveries in flight settle and sends their acks. `Err`
/// when an ack hung.
async fn stop_intake(
    consume_ch: &lapin::Channel,
    consumer_tags: [&str; 2],
    deliveries: &mut JoinSet<(u64, Fate)>,
    acks: &mut AckBatcher<Acker>,
    deps: &BusDeps,
) -> Result<(), SessionError> {
    for tag in consumer_tags {
        // A cancel that hangs is a dead connection: the broker requeues everything anyway.
        let _ = within(consume_ch.basic_cancel(tag.into(), BasicCancelOptions::default())).await;
    }
    while let Some(joined) = deliveries.join_next().await {
        record_fate(acks, joined);
    }
    send_acks(acks, deps, true).await
}

/// How one delivery ended.
enum Fate {
    /// Its state is durable: ack it (coalesced with others by the [`AckBatcher`]).
    Ack(Acker),
    /// Dead-lettered and acked on its own.
    Settled,
    /// Left unacked for redelivery: no ack may cover it.
    Unsettled,
}

fn record_fate(acks: &mut AckBatcher<Acker>, joined: Result<(u64, Fate), tokio::task::JoinError>) {
    // A delivery whose task failed to join stays outstanding: never acked, redelivered.
    let Ok((tag, fate)) = joined else { return };
    match fate {
        Fate::Ack(acker) => acks.ready(tag, acker, tokio::time::Instant::now()),
        Fate::Settled => acks.settled_elsewhere(tag),
        Fate::Unsettled => {}
    }
}

/// Sends the acks that are due (all that are ready with `flush`). `Err` when an ack hung: the
/// connection is gone, and the acks not sent are redelivered to whoever consumes next.
async fn send_acks(
    acks: &mut AckBatcher<Acker>,
    deps: &BusDeps,
    flush: bool,
) -> Result<(), SessionError> {
    let round = acks.take(tokio::time::Instant::now(), flush);
    if round.is_empty() {
        return Ok(());
    }
    let mut sent = 0u64;
    let mut outcome = Ok(());
    // `Ok(false)` or an error: the channel is gone, and the broker redelivers those.
    if let Some(acker) = round.multiple {
        match within(acker.ack(BasicAckOptions { multiple: true })).await {
            Some(Ok(true)) => sent += u64::try_from(round.covered).unwrap_or(u64::MAX),
            Some(_) => {}
            None => outcome = Err(hung("ack")),
        }
    }
    for acker in round.singles {
        if outcome.is_err() {
            break;
        }
        match within(acker.ack(BasicAckOptions::default())).await {
            Some(Ok(true)) => sent += 1,
            Some(_) => {}
            None => outcome = Err(hung("ack")),
        }
    }
    deps.stats.acked.fetch_add(sent, Ordering::Relaxed);
    enrichd_metrics::global().events_acked.inc_by(sent);
    outcome
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What settling a delivery needs.
struct Settling {
    deps: BusDeps,
    publisher: Publisher,
    topology: Topology,
}

/// Decides the fate of one delivery (the only place that does); dead-letters poison.
/// `oversized`: the body was over 64 KiB and was cut to that on receipt (its original size).
async fn settle(
    delivery: Delivery,
    oversized: Option<usize>,
    settling: &Settling,
    mut stop: watch::Receiver<bool>,
) -> Fate {
    let Settling {
        deps,
        publisher,
        topology,
    } = settling;
    if let Some(size) = oversized {
        let reason = Poison::TooLarge(size).into();
        return dead_letter(&delivery, deps, publisher, topology, &reason).await;
    }
    let request = match decode(&delivery.data, delivery.routing_key.as_str()) {
        Ok(request) => request,
        Err(poison) => {
            return dead_letter(&delivery, deps, publisher, topology, &poison.into()).await;
        }
    };
    let first_seen = request.first_seen.as_deref().and_then(parse_first_seen);
    let ask = || {
        deps.aggregator.send(EnrichIp {
            job_id: JobId::new(),
            ip: request.ip,
            attacker_uuid: request.attacker_uuid.clone(),
            first_seen,
            origin: Origin::Bus(DeliveryTag(delivery.delivery_tag)),
        })
    };
    let mut answer = ask().await;
    if let Ok(Err(PersistError::Unavailable(reason))) = &answer {
        warn!(ip = %request.ip, error = %reason, "Store unavailable; intake paused until it is back.");
        // Asked again until the store is back (never nacked: the quorum queue's delivery
        // limit would dead-letter a good event); shutting down meanwhile leaves it unacked,
        // and the broker redelivers it.
        let retried = (|| async {
            match ask().await {
                Ok(Err(PersistError::Unavailable(reason))) => Err(reason),
                other => Ok(other),
            }
        })
        .retry(backoff(Duration::from_millis(400), Duration::from_secs(10)));
        answer = tokio::select! {
            retried = retried => match retried {
                Ok(other) => other,
                // The policy has no end; only a policy change could get here.
                Err(_still_unavailable) => return Fate::Unsettled,
            },
            () = shutting_down(&mut stop) => return Fate::Unsettled,
        };
    }
    match answer {
        Ok(Ok(())) => Fate::Ack(delivery.acker),
        Ok(Err(PersistError::Rejected(reason))) => {
            let reason = DeadLetterReason::store_rejected(&reason);
            dead_letter(&delivery, deps, publisher, topology, &reason).await
        }
        Ok(Err(PersistError::Unavailable(_))) => Fate::Unsettled,
        Err(e) => {
            error!(error = %e, "Aggregator unreachable; delivery left for redelivery.");
            Fate::Unsettled
        }
    }
}

/// Resolves once `stop` turns true (never, if its sender is gone without it).
async fn shutting_down(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn dead_letter(
    delivery: &Delivery,
    deps: &BusDeps,
    publisher: &Publisher,
    topology: &Topology,
    reason: &DeadLetterReason,
) -> Fate {
    match publisher
        .dead_letter(
            &topology.dead_letter_exchange,
            &topology.dead_queue,
            delivery,
            reason,
        )
        .await
    {
        Ok(()) => {
            warn!(reason = %reason, "Delivery dead-lettered.");
            if !matches!(
                within(delivery.ack(BasicAckOptions::default())).await,
                Some(Ok(true))
            ) {
                // The channel is gone; the broker redelivers it.
                return Fate::Unsettled;
            }
            deps.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            enrichd_metrics::global()
                .events_dead_lettered
                .get_or_create(&enrichd_metrics::ReasonLabel {
                    reason: reason.as_label().to_owned(),
                })
                .inc();
            Fate::Settled
        }
        Err(e) => {
            warn!(error = %enrichd_core::error::chain(&e), "Dead-lettering failed; delivery left for redelivery.");
            Fate::Unsettled
        }
    }
}

/// `first_seen` as the reference writes it: RFC 3339, or naive `YYYY-MM-DD[T ]HH:MM:SS[.f]` in UTC.
fn parse_first_seen(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .map(|n| n.and_utc())
}

fn on_control(delivery: &Delivery, deps: &BusDeps) {
    let value: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
    let payload = match value.get("payload") {
        Some(p) if p.is_object() => p,
        _ => &value,
    };
    let action = payload
        .get("action")
        .and_then(|a| a.as_str())
        .unwrap_or_default();
    let requested_by = payload
        .get("requested_by")
        .map(ToString::to_string)
        .unwrap_or_default();
    if action == "stop" {
        info!(requested_by = %requested_by, "Cluster-wide stop requested; draining.");
        deps.coordinator.do_send(Shutdown { exit_code: 0 });
    } else {
        info!(action = %action.chars().take(64).collect::<String>(), "Control action ignored.");
    }
}

async fn publish_health(
    publisher: &Publisher,
    exchange: &str,
    health: &HealthSource,
) -> Result<(), BusError> {
    let payload = health.snapshot().await;
    let ts = crate::health::epoch_seconds();
    let envelope = Envelope::new(TOPIC_HEALTH, "health", ts, payload);
    let body = serde_json::to_vec(&envelope).map_err(BusError::Encode)?;
    publisher
        .publish(Outgoing {
            exchange,
            routing_key: TOPIC_HEALTH,
            body: &body,
            message_id: Some(&envelope.id),
            persistent: false,
            expiration_ms: Some(HEALTH_EXPIRATION_MS),
            headers: None,
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_seen_accepts_the_reference_shapes() {
        let expected = DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for text in [
            "2026-11-23T10:00:00Z",
            "2026-11-23T10:00:00+00:00",
            "2026-11-23T10:00:00",
            "2026-11-23 10:00:00.000000",
        ] {
            assert_eq!(parse_first_seen(text), Some(expected), "{text}");
        }
        assert_eq!(parse_first_seen("yesterday"), None);
    }
}
