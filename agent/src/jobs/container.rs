//! `container` jobs: start, stop, restart, kill, remove a container, or pull its image again,
//! within what the agent's `docker.control` allows (none, the containers Nebula manages here,
//! or all).

use bollard::query_parameters::{KillContainerOptions, RemoveContainerOptions};
use nebula_protocol::containers::{
    policy_refusal, valid_container_ref, ContainerAction, ContainerJob, PolicyKey,
};
use nebula_protocol::deploy::labels;
use nebula_protocol::jobs::{JobResult, JobStatus, LogStream};
use tracing::{info, warn};

use super::JobContext;
use crate::config::DockerConfig;

pub async fn run(
    ctx: &JobContext,
    job: &ContainerJob,
    policy: &DockerConfig,
    node_id: Option<uuid::Uuid>,
) -> JobResult {
    let name = &job.container;
    if !valid_container_ref(name) {
        return JobResult::new(
            JobStatus::Refused,
            Some(format!("`{name}` is not a container name or id")),
        );
    }
    let docker = match ctx.docker() {
        Ok(d) => d,
        Err(e) => return JobResult::new(JobStatus::Failed, Some(e)),
    };
    let found = match crate::docker::find(&docker, name, node_id).await {
        Ok(f) => f,
        Err(e) => return JobResult::new(JobStatus::Failed, Some(e)),
    };
    let (managed, container_labels) = (found.managed, found.labels);
    let config = found.inspect.config.unwrap_or_default();
    if let Some(refusal) = policy_refusal(PolicyKey::Control, policy.control, name, managed) {
        warn!(container = %name, action = job.action.as_str(), "{refusal}");
        ctx.log(LogStream::Agent, refusal.clone());
        return JobResult::new(JobStatus::Refused, Some(refusal));
    }
    if managed {
        let service = container_labels
            .get(labels::SERVICE)
            .map(String::as_str)
            .unwrap_or("?");
        ctx.log(
            LogStream::Agent,
            format!("{name} belongs to service `{service}`: the reconciler puts it back as the map says"),
        );
    }
    info!(container = %name, action = job.action.as_str(), "container action");
    ctx.log(LogStream::Agent, format!("{} {name}", job.action.as_str()));
    let done = match job.action {
        ContainerAction::Start => docker.start_container(name, None).await,
        ContainerAction::Stop => docker.stop_container(name, None).await,
        ContainerAction::Restart => docker.restart_container(name, None).await,
        ContainerAction::Kill => {
            let opts = KillContainerOptions {
                signal: "SIGKILL".into(),
            };
            docker.kill_container(name, Some(opts)).await
        }
        ContainerAction::Remove => {
            let opts = RemoveContainerOptions {
                force: true,
                ..Default::default()
            };
            docker.remove_container(name, Some(opts)).await
        }
        ContainerAction::Pull => {
            let Some(image) = config.image.filter(|i| !i.is_empty()) else {
                return JobResult::new(
                    JobStatus::Failed,
                    Some(format!("{name} names no image to pull")),
                );
            };
            return match crate::docker::pull(&docker, &image, |l| ctx.log(LogStream::Agent, l))
                .await
            {
                Ok(()) => {
                    ctx.log(
                        LogStream::Agent,
                        format!("pulled {image}; restart {name} to use it"),
                    );
                    JobResult::new(JobStatus::Succeeded, None)
                }
                Err(e) => JobResult::new(JobStatus::Failed, Some(e)),
            };
        }
    };
    match done {
        // Docker answers 304 (not modified) to starting a running or stopping a stopped
        // container: already as asked.
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => {
            let now = match job.action {
                ContainerAction::Remove => String::new(),
                _ => docker
                    .inspect_container(name, None)
                    .await
                    .ok()
                    .and_then(|c| c.state)
                    .and_then(|s| s.status)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".into()),
            };
            let done = match job.action {
                ContainerAction::Start => "started",
                ContainerAction::Stop => "stopped",
                ContainerAction::Restart => "restarted",
                ContainerAction::Kill => "killed",
                ContainerAction::Remove => "removed",
                ContainerAction::Pull => "pulled",
            };
            let line = if job.action == ContainerAction::Remove {
                format!("{name} {done}")
            } else {
                format!("{name} {done}; it is {now}")
            };
            ctx.log(LogStream::Agent, line);
            JobResult::new(JobStatus::Succeeded, None)
        }
        Err(e) => JobResult::new(
            JobStatus::Failed,
            Some(format!("{} {name}: {e}", job.action.as_str())),
        ),
    }
}
