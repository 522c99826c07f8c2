//! Schema 2: `enrichd_ip_state.ptr_forward_confirmed`, whether the stored PTR name resolves
//! back to the address (`ENRICHD_PTR_FCRDNS`). NULL: not checked, or no name.

use sea_orm_migration::prelude::*;

use crate::m0001_initial::{put_meta, run_all};
use crate::meta;

/// Adds the forward-confirmation column.
pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &'static str {
        "m0002_ptr_forward_confirmed"
    }
}

#[async_trait::async_trait]
#[allow(
    elided_lifetimes_in_paths,
    reason = "the signature must match the trait's, which elides the lifetime"
)]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if !manager
            .has_column("enrichd_ip_state", "ptr_forward_confirmed")
            .await?
        {
            run_all(
                manager,
                vec![
                    "ALTER TABLE enrichd_ip_state ADD COLUMN ptr_forward_confirmed BOOLEAN NULL"
                        .to_owned(),
                ],
            )
            .await?;
        }
        put_meta(manager, meta::SCHEMA_VERSION, "2", true).await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
