//! `storage` jobs: the node's images and volumes with their sizes and the containers that use
//! them, and the removal of exactly the unused ones a preview named. Images may be removed
//! unless `docker.control = "none"`; volumes hold data, so only with `docker.control = "all"`.
//! Each name is checked again just before it goes: one that a container uses by then stays
//! (and is reported as skipped, with the reason).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveImageOptions, RemoveVolumeOptions,
};
use bollard::Docker;
use nebula_protocol::containers::{ImageInfo, Reach, StorageAction, StorageReport, VolumeInfo};
use nebula_protocol::jobs::{JobOutput, JobResult, JobStatus, LogStream};

use super::JobContext;
use crate::config::DockerConfig;

/// Time spent measuring volumes' sizes at most, for all of them.
const MEASURE_BUDGET: Duration = Duration::from_secs(5);

pub async fn run(ctx: &JobContext, action: &StorageAction, policy: &DockerConfig) -> JobResult {
    let docker = match ctx.docker() {
        Ok(d) => d,
        Err(e) => return JobResult::new(JobStatus::Failed, Some(e)),
    };
    let mut report = StorageReport::default();
    if let StorageAction::Prune { images, volumes } = action {
        if let Some(refusal) = refusal(policy, images, volumes) {
            ctx.log(LogStream::Agent, refusal.clone());
            return JobResult::new(JobStatus::Refused, Some(refusal));
        }
        if let Err(e) = prune(ctx, &docker, images, volumes, &mut report).await {
            return JobResult::new(JobStatus::Failed, Some(e));
        }
    }
    match list(&docker, &mut report).await {
        Ok(()) => JobResult {
            output: JobOutput::Storage(report),
            ..JobResult::new(JobStatus::Succeeded, None)
        },
        Err(e) => JobResult::new(
            JobStatus::Failed,
            Some(format!("listing images and volumes: {e}")),
        ),
    }
}

fn refusal(policy: &DockerConfig, images: &[String], volumes: &[String]) -> Option<String> {
    if !images.is_empty() && policy.control == Reach::None {
        return Some(
            "refused by the node's docker.control = \"none\" (agent config): no image may be removed this way"
                .into(),
        );
    }
    if !volumes.is_empty() && policy.control != Reach::All {
        return Some(format!(
            "refused by the node's docker.control = \"{}\" (agent config): volumes hold data, so removing them takes docker.control = \"all\"",
            policy.control.as_str()
        ));
    }
    None
}

/// Who uses what: image id -> container names, volume name -> container names.
type Users = (
    BTreeMap<String, Vec<String>>,
    BTreeMap<String, Vec<String>>,
    u64,
);

async fn users(docker: &Docker) -> Result<Users, bollard::errors::Error> {
    let opts = ListContainersOptionsBuilder::default()
        .all(true)
        .size(true)
        .build();
    let mut by_image: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut by_volume: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut writable = 0u64;
    for c in docker.list_containers(Some(opts)).await? {
        let name = c
            .names
            .and_then(|n| n.into_iter().next())
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default();
        writable += c.size_rw.unwrap_or(0).max(0) as u64;
        if let Some(image) = c.image_id {
            by_image.entry(image).or_default().push(name.clone());
        }
        for m in c.mounts.unwrap_or_default() {
            if let Some(v) = m.name.filter(|_| m.typ.as_deref() == Some("volume")) {
                by_volume.entry(v).or_default().push(name.clone());
            }
        }
    }
    Ok((by_image, by_volume, writable))
}

async fn list(docker: &Docker, report: &mut StorageReport) -> Result<(), bollard::errors::Error> {
    let (by_image, by_volume, writable) = users(docker).await?;
    report.containers_bytes = writable;
    let images = docker
        .list_images(Some(ListImagesOptionsBuilder::default().all(false).build()))
        .await?;
    report.images = images
        .into_iter()
        .map(|i| ImageInfo {
            containers: by_image.get(&i.id).cloned().unwrap_or_default(),
            id: i.id,
            tags: i
                .repo_tags
                .into_iter()
                .filter(|t| t != "<none>:<none>")
                .collect(),
            size_bytes: i.size.max(0) as u64,
            created_unix: i.created,
        })
        .collect();
    report
        .images
        .sort_by_key(|i| std::cmp::Reverse(i.size_bytes));
    let volumes = docker
        .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
        .await?
        .volumes
        .unwrap_or_default();
    let mounts: HashMap<String, String> = volumes
        .iter()
        .map(|v| (v.name.clone(), v.mountpoint.clone()))
        .collect();
    let sizes = tokio::task::spawn_blocking(move || measure(mounts))
        .await
        .unwrap_or_default();
    report.volumes = volumes
        .into_iter()
        .map(|v| VolumeInfo {
            containers: by_volume.get(&v.name).cloned().unwrap_or_default(),
            size_bytes: v
                .usage_data
                .map(|u| u.size)
                .filter(|s| *s >= 0)
                .map(|s| s as u64)
                .or_else(|| sizes.get(&v.name).copied()),
            name: v.name,
            driver: v.driver,
        })
        .collect();
    report.volumes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(())
}

/// Bytes under each volume's mount point, where this process can read it (the runtime's own
/// accounting needs a newer API than many hosts run), within [`MEASURE_BUDGET`] in all.
fn measure(mounts: HashMap<String, String>) -> HashMap<String, u64> {
    let deadline = Instant::now() + MEASURE_BUDGET;
    let mut out = HashMap::new();
    for (name, mount) in mounts {
        if let Some(size) = du(Path::new(&mount), deadline) {
            out.insert(name, size);
        }
    }
    out
}

fn du(root: &Path, deadline: Instant) -> Option<u64> {
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    std::fs::metadata(root).ok()?;
    while let Some(dir) = stack.pop() {
        if Instant::now() > deadline {
            return None;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return None;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += allocated(&meta);
            }
        }
    }
    Some(total)
}

/// Bytes a file takes on disk (its length where blocks are not known).
fn allocated(meta: &std::fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.blocks() * 512
    }
    #[cfg(not(unix))]
    {
        meta.len()
    }
}

async fn prune(
    ctx: &JobContext,
    docker: &Docker,
    images: &[String],
    volumes: &[String],
    report: &mut StorageReport,
) -> Result<(), String> {
    let (by_image, by_volume, _) = users(docker)
        .await
        .map_err(|e| format!("listing containers: {e}"))?;
    let sizes: HashMap<String, u64> = docker
        .list_images(Some(ListImagesOptionsBuilder::default().all(false).build()))
        .await
        .map_err(|e| format!("listing images: {e}"))?
        .into_iter()
        .map(|i| (i.id, i.size.max(0) as u64))
        .collect();
    for id in images {
        if let Some(users) = by_image.get(id) {
            report
                .skipped
                .push((id.clone(), format!("in use by {}", users.join(", "))));
            continue;
        }
        let opts = RemoveImageOptions {
            force: false,
            noprune: false,
            ..Default::default()
        };
        match docker.remove_image(id, Some(opts), None).await {
            Ok(_) => {
                ctx.log(LogStream::Agent, format!("removed image {id}"));
                report.reclaimed_bytes += sizes.get(id).copied().unwrap_or(0);
                report.removed.push(id.clone());
            }
            Err(e) => report.skipped.push((id.clone(), short(&e))),
        }
    }
    for name in volumes {
        if let Some(users) = by_volume.get(name) {
            report
                .skipped
                .push((name.clone(), format!("mounted by {}", users.join(", "))));
            continue;
        }
        let size = docker.inspect_volume(name).await.ok().and_then(|v| {
            du(
                Path::new(&v.mountpoint),
                Instant::now() + Duration::from_secs(2),
            )
        });
        match docker
            .remove_volume(name, Some(RemoveVolumeOptions { force: false }))
            .await
        {
            Ok(()) => {
                ctx.log(LogStream::Agent, format!("removed volume {name}"));
                report.reclaimed_bytes += size.unwrap_or(0);
                report.removed.push(name.clone());
            }
            Err(e) => report.skipped.push((name.clone(), short(&e))),
        }
    }
    Ok(())
}

fn short(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_need_all_and_images_anything_but_none() {
        let with = |control| DockerConfig {
            control,
            ..DockerConfig::default()
        };
        let img = vec!["sha256:x".to_owned()];
        let vol = vec!["data".to_owned()];
        assert_eq!(refusal(&with(Reach::Managed), &img, &[]), None);
        assert!(refusal(&with(Reach::None), &img, &[])
            .unwrap()
            .contains("docker.control = \"none\""));
        let r = refusal(&with(Reach::Managed), &[], &vol).unwrap();
        assert!(r.contains("docker.control = \"all\""), "{r}");
        assert_eq!(refusal(&with(Reach::All), &img, &vol), None);
    }

    #[test]
    fn du_counts_what_is_under_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/f"), vec![1u8; 64 * 1024]).unwrap();
        let n = du(dir.path(), Instant::now() + Duration::from_secs(5)).unwrap();
        assert!(n >= 64 * 1024, "{n}");
        assert_eq!(
            du(
                &dir.path().join("missing"),
                Instant::now() + Duration::from_secs(1)
            ),
            None
        );
    }
}
