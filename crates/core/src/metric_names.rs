//! Prometheus series names, in one place so the exporter, the Grafana dashboard and the
//! deployment test agree (a dashboard panel on a series that does not exist shows nothing and
//! nobody notices).
//!
//! Names are as exported. `enrichd-metrics` registers each with its help text and type; a
//! counter's without the `_total` suffix, which prometheus-client appends, and its tests check
//! that every name here comes out exactly once.

/// Deliveries received from the work queue.
pub const EVENTS_CONSUMED: &str = "enrichd_events_consumed_total";
/// Deliveries acked.
pub const EVENTS_ACKED: &str = "enrichd_events_acked_total";
/// Deliveries republished to the dead-letter exchange (label `reason`).
pub const EVENTS_DEAD_LETTERED: &str = "enrichd_events_dead_lettered_total";
/// Provider lookups (labels `provider`, `outcome`).
pub const LOOKUPS: &str = "enrichd_lookups_total";
/// Provider call latency in seconds (label `provider`).
pub const PROVIDER_LATENCY: &str = "enrichd_provider_latency_seconds";
/// Work skipped because stored state was fresh (label `provider`, `ptr` for reverse DNS).
pub const CACHE_HITS: &str = "enrichd_cache_hits_total";
/// Provider quota left, when known (label `provider`).
pub const QUOTA_REMAINING: &str = "enrichd_quota_remaining";
/// Circuit breaker state: 0 closed, 1 half-open, 2 open (label `provider`).
pub const BREAKER_STATE: &str = "enrichd_breaker_state";
/// Attackers with due work, as of the last backfill pass.
pub const BACKLOG: &str = "enrichd_backlog";
/// Jobs in flight in this replica.
pub const IN_FLIGHT: &str = "enrichd_in_flight";
/// Outbox rows waiting to be published.
pub const OUTBOX_DEPTH: &str = "enrichd_outbox_depth";
/// Age of the oldest unpublished outbox row, seconds.
pub const OUTBOX_OLDEST_AGE: &str = "enrichd_outbox_oldest_age_seconds";
/// PTR lookups (label `outcome`).
pub const PTR_LOOKUPS: &str = "enrichd_ptr_lookups_total";

/// Every series name, for tests that check dashboards and alerts reference real series.
pub const ALL: [&str; 13] = [
    EVENTS_CONSUMED,
    EVENTS_ACKED,
    EVENTS_DEAD_LETTERED,
    LOOKUPS,
    PROVIDER_LATENCY,
    CACHE_HITS,
    QUOTA_REMAINING,
    BREAKER_STATE,
    BACKLOG,
    IN_FLIGHT,
    OUTBOX_DEPTH,
    OUTBOX_OLDEST_AGE,
    PTR_LOOKUPS,
];
