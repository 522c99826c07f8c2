//! Read-only views of stored state, for `enrichd lookup` and tests: an address's PTR and
//! provider states, its stored scope, and the payloads its attacker rows would get.

use enrichd_core::CanonicalIp;
use enrichd_core::payload::IntelPayload;
use sea_orm::ConnectionTrait;

use crate::ip_state::{read_provider_states, read_ptr};
use crate::state::{self, ApplyContext, ProviderState, PtrState, StoredScope};
use crate::{Store, StoreError};

impl Store {
    /// The PTR state stored for `ip`, if any.
    pub async fn ptr_state(&self, ip: CanonicalIp) -> Result<Option<PtrState>, StoreError> {
        let row = self
            .read
            .query_one_raw(self.dialect.stmt(
                "SELECT * FROM enrichd_ip_state WHERE ip = $1",
                vec![ip.to_string().into()],
            ))
            .await?;
        row.map(|r| read_ptr(self, &r)).transpose()
    }

    /// The provider states stored for `ip`, ascending by provider.
    pub async fn provider_states(&self, ip: CanonicalIp) -> Result<Vec<ProviderState>, StoreError> {
        read_provider_states(self, &self.read, &ip.to_string()).await
    }

    /// The stored scope of `ip` (`None`: never classified).
    pub async fn stored_scope(&self, ip: CanonicalIp) -> Result<Option<StoredScope>, StoreError> {
        let row = self
            .read
            .query_one_raw(self.dialect.stmt(
                "SELECT scope FROM enrichd_ip_state WHERE ip = $1",
                vec![ip.to_string().into()],
            ))
            .await?;
        let scope: Option<String> = row.map(|r| r.try_get("", "scope")).transpose()?.flatten();
        Ok(scope.as_deref().and_then(StoredScope::from_label))
    }

    /// The payloads `enrichd lookup` prints for `ip`, built from stored state: one per
    /// attacker row with the address, or one with `attacker_uuid` null when there is none.
    /// Reads only.
    pub async fn lookup_view(
        &self,
        ip: CanonicalIp,
        ctx: &ApplyContext,
    ) -> Result<Vec<IntelPayload>, StoreError> {
        let dialect = self.dialect;
        let ip_text = ip.to_string();
        let now = self.db_now().await?;
        let scope = self.stored_scope(ip).await?.unwrap_or(StoredScope::Global);
        let states = self.provider_states(ip).await?;
        let ptr = self.ptr_state(ip).await?.unwrap_or_default();
        let merged = state::merge(&ip_text, scope, &states, &ptr, ctx, now);
        let rows = self
            .read
            .query_all_raw(dialect.stmt(
                "SELECT attacker_uuid AS uuid FROM enrichd_attacker_map WHERE ip = $1 \
                 AND attacker_uuid IN (SELECT uuid FROM attackers) \
                 UNION SELECT uuid FROM attackers WHERE ip = $1 ORDER BY uuid",
                vec![ip_text.into()],
            ))
            .await?;
        let mut uuids = Vec::with_capacity(rows.len());
        for row in rows {
            uuids.push(row.try_get::<String>("", "uuid")?);
        }
        if uuids.is_empty() {
            return Ok(vec![merged.payload]);
        }
        Ok(uuids
            .into_iter()
            .map(|u| IntelPayload {
                attacker_uuid: Some(u),
                ..merged.payload.clone()
            })
            .collect())
    }
}
