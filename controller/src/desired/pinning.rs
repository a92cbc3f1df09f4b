//! The map in force is kept twice: as written (`Active::raw`) and pinned (`Active::desired`),
//! where every `${secret:NAME}` names the version in force (`${secret:NAME@4}`). Revisions,
//! plans, stored jobs and the deployment history are made from the pinned map, so they hold
//! references and versions only, and a new version of a secret is a new revision of each
//! service that uses it: a rolling update whose plan shows the variable or file that changed.
//! The map is pinned again whenever a secret is set, imported or removed, and at each
//! reconcile run (a safety net for changes made elsewhere). The values themselves are put in
//! only on a deploy job's stream (`crate::secrets::refs`).

use std::sync::Arc;

use nebula_desired::map::secrets as refs;

use super::plan::Desired;
use super::Active;
use crate::{ControlPlane, OpError};

impl ControlPlane {
    /// `raw` with each reference pinned to the store's newest version (see
    /// [`refs::pin`]), and a line for each service whose secrets the store does not have.
    pub(crate) async fn pin_desired(
        &self,
        raw: &Desired,
    ) -> Result<(Desired, Vec<String>), OpError> {
        let latest = self.store.latest_secret_versions().await?;
        Ok(refs::pin(raw, &latest))
    }

    /// Pin the map in force again after secrets changed (`why` says which): services whose
    /// revision changed roll, and a rollback pin on one of them ends. Returns the services
    /// that changed.
    pub(crate) async fn repin_secrets(&self, why: &str) -> Vec<String> {
        for _ in 0..3 {
            let Some(active) = self.desired.active() else {
                return Vec::new();
            };
            let latest = match self.store.latest_secret_versions().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("pinning the service map's secrets: {e}");
                    return Vec::new();
                }
            };
            // The same map pinned with the same versions already (every reconcile run asks).
            let same = |st: &super::Inner| {
                st.pinned_with.as_ref().is_some_and(|(map, versions)| {
                    *versions == latest && map.upgrade().is_some_and(|a| Arc::ptr_eq(&a, &active))
                })
            };
            if same(&self.desired.lock()) {
                return Vec::new();
            }
            let (pinned, problems) = refs::pin(&active.raw, &latest);
            let changed: Vec<String> = pinned
                .services
                .iter()
                .filter(|(n, s)| {
                    active
                        .desired
                        .services
                        .get(*n)
                        .is_none_or(|a| a.revision != s.revision)
                })
                .map(|(n, _)| n.clone())
                .collect();
            if changed.is_empty() {
                self.desired.lock().pinned_with = Some((Arc::downgrade(&active), latest));
                return changed;
            }
            let dropped = {
                let mut st = self.desired.lock();
                // A map applied meanwhile was pinned when it was applied: start again.
                if !st.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, &active)) {
                    continue;
                }
                let dropped: Vec<String> = changed
                    .iter()
                    .filter(|n| st.pins.remove(*n).is_some())
                    .cloned()
                    .collect();
                let now = Arc::new(Active {
                    record: active.record.clone(),
                    raw: active.raw.clone(),
                    desired: pinned,
                    warnings: active.warnings.clone(),
                });
                st.pinned_with = Some((Arc::downgrade(&now), latest));
                st.active = Some(now);
                dropped
            };
            for p in &problems {
                tracing::warn!("{p}");
            }
            for name in dropped {
                if let Err(e) = self.store.delete_pin(&name).await {
                    tracing::warn!(service = %name, "ending a rollback pin: {e}");
                }
            }
            tracing::info!(services = ?changed, "{why}: the services that use it roll");
            self.desired.kick(why);
            return changed;
        }
        Vec::new()
    }
}
