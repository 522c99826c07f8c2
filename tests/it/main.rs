//! enrichd cross-crate integration tests: one binary, one module per scenario family.

mod store_apply;
mod store_batch;
mod store_common;
mod store_gate;
mod store_intake;
mod store_leases;
mod store_migrations;
mod store_outbox;
