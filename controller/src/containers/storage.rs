//! A node's images and volumes: listed by a `storage` job on the node (sizes and which
//! containers use each), a prune previewed from that list, and a prune that removes exactly
//! what the preview showed (the node checks each again and leaves what is in use by then).

use std::sync::Arc;
use std::time::Duration;

use nebula_protocol::containers::StorageReport;
use nebula_protocol::jobs::JobOutput;
pub use nebula_types::api::containers::{
    DiskUsageView, ImageView, PrunePreview, PruneRequest, PruneResult, StorageView, VolumeView,
};
use nebula_types::jobs::{JobRecord, JobState, StorageActionKind, Target, Work};

use crate::authz::{Change, Op, OpCtx};
use crate::jobs::NewJob;
use crate::{ControlPlane, OpError};

/// How long a listing may take on the node (volume sizes are measured there).
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a prune may take.
const PRUNE_TIMEOUT: Duration = Duration::from_secs(300);

fn image_view(i: &nebula_protocol::containers::ImageInfo) -> ImageView {
    ImageView {
        id: i.id.clone(),
        tags: i.tags.clone(),
        size_bytes: i.size_bytes,
        created: crate::store::rfc3339_millis(crate::store::from_millis(
            i.created_unix.saturating_mul(1000),
        )),
        containers: i.containers.clone(),
    }
}

fn volume_view(v: &nebula_protocol::containers::VolumeInfo) -> VolumeView {
    VolumeView {
        name: v.name.clone(),
        driver: v.driver.clone(),
        size_bytes: v.size_bytes,
        containers: v.containers.clone(),
    }
}

/// A listing as the API shows it.
pub fn storage_view(node: &str, r: &StorageReport) -> StorageView {
    let images: Vec<ImageView> = r.images.iter().map(image_view).collect();
    let volumes: Vec<VolumeView> = r.volumes.iter().map(volume_view).collect();
    let reclaimable = images
        .iter()
        .filter(|i| i.containers.is_empty())
        .map(|i| i.size_bytes)
        .chain(
            volumes
                .iter()
                .filter(|v| v.containers.is_empty())
                .filter_map(|v| v.size_bytes),
        )
        .sum();
    StorageView {
        node: node.to_owned(),
        disk: DiskUsageView {
            images_bytes: images.iter().map(|i| i.size_bytes).sum(),
            containers_bytes: r.containers_bytes,
            volumes_bytes: volumes.iter().filter_map(|v| v.size_bytes).sum(),
            reclaimable_bytes: reclaimable,
        },
        images,
        volumes,
    }
}

/// The job's report, or why there is none.
fn report(rec: &JobRecord) -> Result<&StorageReport, OpError> {
    match (&rec.state, &rec.output) {
        (JobState::Succeeded, Some(JobOutput::Storage(r))) => Ok(r),
        (state, _) if !state.is_terminal() => Err(OpError::Conflict(format!(
            "node `{}` did not answer in time (job {})",
            rec.node.as_deref().unwrap_or("?"),
            rec.id
        ))),
        _ => {
            let why = rec
                .error
                .as_deref()
                .or(rec.reason.as_deref())
                .unwrap_or("no report");
            if why.contains("refused by the node's") {
                Err(OpError::Forbidden(
                    why.trim_start_matches("refused by the agent: ").to_owned(),
                ))
            } else {
                Err(OpError::Conflict(format!("the storage job failed: {why}")))
            }
        }
    }
}

impl ControlPlane {
    async fn storage_job(
        self: &Arc<Self>,
        cx: &OpCtx,
        node: &str,
        work: Work,
        timeout: Duration,
    ) -> Result<JobRecord, OpError> {
        let node_id = self.node_id(node).await?;
        if self.registry.connection(node_id).is_none() {
            return Err(OpError::Conflict(format!("node `{node}` is offline")));
        }
        let job = self
            .create_job(
                NewJob {
                    work,
                    target: Target::Node(node.to_owned()),
                    deadline: Some(timeout),
                    idempotent: false,
                    max_attempts: None,
                },
                cx,
            )
            .await?;
        self.wait_job(job.id, timeout + Duration::from_secs(2))
            .await
    }

    /// A node's images and volumes, with sizes and users (a `storage` job on the node).
    pub async fn node_storage(
        self: &Arc<Self>,
        cx: &OpCtx,
        node: &str,
    ) -> Result<StorageView, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        // Reading is allowed to viewers; the listing job runs on their behalf.
        let reader = OpCtx::internal(cx.actor.clone());
        let work = Work::Storage {
            action: StorageActionKind::List,
            images: Vec::new(),
            volumes: Vec::new(),
        };
        let rec = self.storage_job(&reader, node, work, LIST_TIMEOUT).await?;
        Ok(storage_view(node, report(&rec)?))
    }

    /// What a prune would remove now: unused images, and unused volumes when asked; only
    /// those whose tag, id or name contains `matching`, when given.
    pub async fn prune_preview(
        self: &Arc<Self>,
        cx: &OpCtx,
        node: &str,
        volumes: bool,
        matching: Option<&str>,
    ) -> Result<PrunePreview, OpError> {
        self.authorize(cx, Op::PruneStorage)?;
        let view = self.node_storage(cx, node).await?;
        let hit = |s: &str| matching.is_none_or(|m| s.contains(m));
        let images: Vec<ImageView> = view
            .images
            .into_iter()
            .filter(|i| i.containers.is_empty())
            .filter(|i| hit(&i.id) || i.tags.iter().any(|t| hit(t)))
            .collect();
        let volumes: Vec<VolumeView> = if volumes {
            view.volumes
                .into_iter()
                .filter(|v| v.containers.is_empty() && hit(&v.name))
                .collect()
        } else {
            Vec::new()
        };
        let bytes = images.iter().map(|i| i.size_bytes).sum::<u64>()
            + volumes.iter().filter_map(|v| v.size_bytes).sum::<u64>();
        Ok(PrunePreview {
            node: node.to_owned(),
            images,
            volumes,
            bytes,
        })
    }

    /// Remove exactly the images and volumes named (a preview's), as a job on the node.
    pub async fn prune(
        self: &Arc<Self>,
        cx: &OpCtx,
        node: &str,
        req: PruneRequest,
    ) -> Result<PruneResult, OpError> {
        self.authorize(cx, Op::PruneStorage)?;
        if req.images.is_empty() && req.volumes.is_empty() {
            return Err(OpError::Invalid(
                "name the images and volumes to remove (a preview lists them)".into(),
            ));
        }
        let work = Work::Storage {
            action: StorageActionKind::Prune,
            images: req.images.clone(),
            volumes: req.volumes.clone(),
        };
        work.validate().map_err(OpError::Invalid)?;
        let rec = self.storage_job(cx, node, work, PRUNE_TIMEOUT).await?;
        let r = report(&rec)?;
        self.record(
            cx,
            Change {
                action: "node.prune",
                target: node.to_owned(),
                detail: serde_json::json!({
                    "job": rec.id,
                    "removed": r.removed,
                    "skipped": r.skipped,
                    "reclaimed_bytes": r.reclaimed_bytes,
                }),
                event: None,
            },
        );
        Ok(PruneResult {
            node: node.to_owned(),
            job: rec.id,
            removed: r.removed.clone(),
            skipped: r.skipped.clone(),
            reclaimed_bytes: r.reclaimed_bytes,
        })
    }
}
