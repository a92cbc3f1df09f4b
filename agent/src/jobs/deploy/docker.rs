//! The Docker side of a deploy: the create body a spec becomes, and listing, stopping,
//! removing and inspecting the managed containers.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, DeviceRequest, HealthConfig, HostConfig, PortBinding,
    RestartPolicy as DockerRestart, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use nebula_protocol::deploy::{
    labels, ContainerSpec, DeploySpec, GpuRequest, HealthProbe, HostAccess, NetworkMode,
    RestartPolicy, SecretBytes, SecretFile,
};

use super::{Managed, STOP_GRACE_SECS};

/// The Docker create body for one replica of the spec, with its host access.
pub(super) fn container_body(
    spec: &DeploySpec,
    host: &HostAccess,
    replica: u32,
) -> ContainerCreateBody {
    let c: &ContainerSpec = &spec.container;
    let labels = HashMap::from([
        (labels::MANAGED.to_string(), "true".to_string()),
        (labels::SERVICE.to_string(), spec.service.clone()),
        (labels::REVISION.to_string(), spec.revision.clone()),
        (labels::NODE.to_string(), spec.node.clone()),
        (labels::REPLICA.to_string(), replica.to_string()),
    ]);
    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &c.ports {
        let key = format!("{}/{}", p.container_port, p.protocol.as_str());
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: p.host_ip.clone(),
                host_port: Some(p.host_port.map(|h| h.to_string()).unwrap_or_default()),
            });
    }
    let binds: Vec<String> = c
        .volumes
        .iter()
        .map(|v| {
            format!(
                "{}:{}{}",
                v.source,
                v.target,
                if v.read_only { ":ro" } else { "" }
            )
        })
        .collect();
    let restart = match c.restart {
        RestartPolicy::No => DockerRestart {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        },
        RestartPolicy::Always => DockerRestart {
            name: Some(RestartPolicyNameEnum::ALWAYS),
            maximum_retry_count: None,
        },
        RestartPolicy::UnlessStopped => DockerRestart {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        },
        RestartPolicy::OnFailure { max_retries } => DockerRestart {
            name: Some(RestartPolicyNameEnum::ON_FAILURE),
            maximum_retry_count: max_retries.map(i64::from),
        },
    };
    let device_requests = match c.gpus {
        GpuRequest::None => None,
        GpuRequest::All => Some(vec![gpu_request(-1)]),
        GpuRequest::Count(n) => Some(vec![gpu_request(i64::from(n))]),
    };
    let healthcheck = c.health.as_ref().and_then(|h| match &h.probe {
        HealthProbe::Cmd { command } => Some(HealthConfig {
            test: Some(
                std::iter::once("CMD".to_string())
                    .chain(command.iter().cloned())
                    .collect(),
            ),
            interval: Some(ms_to_ns(h.interval_ms)),
            timeout: Some(ms_to_ns(h.timeout_ms)),
            retries: Some(i64::from(h.retries)),
            start_period: Some(ms_to_ns(h.start_period_ms)),
            start_interval: None,
        }),
        _ => None,
    });
    ContainerCreateBody {
        image: Some(c.image.clone()),
        cmd: c.command.clone(),
        env: Some(c.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        healthcheck,
        host_config: Some(HostConfig {
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            binds: (!binds.is_empty()).then_some(binds),
            restart_policy: Some(restart),
            device_requests,
            privileged: host.privileged.then_some(true),
            network_mode: match host.network {
                NetworkMode::Bridge => None,
                NetworkMode::Host | NetworkMode::None => Some(host.network.as_str().to_owned()),
            },
            pid_mode: host.pid_host.then(|| "host".to_owned()),
            cap_add: (!host.cap_add.is_empty()).then(|| host.cap_add.clone()),
            devices: (!host.devices.is_empty()).then(|| {
                host.devices
                    .iter()
                    .map(|d| DeviceMapping {
                        path_on_host: Some(d.host_path.clone()),
                        path_in_container: Some(d.container_path.clone()),
                        cgroup_permissions: Some("rwm".into()),
                    })
                    .collect()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn gpu_request(count: i64) -> DeviceRequest {
    DeviceRequest {
        driver: Some("nvidia".into()),
        count: Some(count),
        device_ids: None,
        capabilities: Some(vec![vec!["gpu".into()]]),
        options: None,
    }
}

pub(super) fn ms_to_ns(ms: u32) -> i64 {
    i64::from(ms) * 1_000_000
}

pub(super) async fn list(
    docker: &Docker,
    service: &str,
    node: &str,
) -> Result<Vec<Managed>, String> {
    let filters = HashMap::from([(
        "label",
        vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={service}", labels::SERVICE),
            format!("{}={node}", labels::NODE),
        ],
    )]);
    let opts = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let list = docker
        .list_containers(Some(opts))
        .await
        .map_err(|e| format!("listing containers: {e}"))?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let labels_of = c.labels.unwrap_or_default();
            // The daemon filtered already; check again so a filter bug cannot reach others.
            if labels_of.get(labels::MANAGED).map(String::as_str) != Some("true")
                || labels_of.get(labels::SERVICE).map(String::as_str) != Some(service)
                || labels_of.get(labels::NODE).map(String::as_str) != Some(node)
            {
                return None;
            }
            Some(Managed {
                id: c.id?,
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                revision: labels_of.get(labels::REVISION).cloned().unwrap_or_default(),
                replica: labels_of
                    .get(labels::REPLICA)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(u32::MAX),
                running: c.state.map(|s| s.to_string()) == Some("running".into()),
            })
        })
        .collect())
}

pub(super) async fn stop(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    let opts = StopContainerOptionsBuilder::default()
        .t(STOP_GRACE_SECS)
        .build();
    match docker.stop_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        // 304: already stopped.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) async fn remove(
    docker: &Docker,
    id: &str,
    running: bool,
) -> Result<(), bollard::errors::Error> {
    if running {
        stop(docker, id).await?;
    }
    let opts = RemoveContainerOptionsBuilder::default().force(true).build();
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        // Already gone.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A secret file's target: an absolute path without `.`, `..` or empty parts, not `/` itself.
pub(super) fn check_target(target: &str) -> Result<(), String> {
    let ok = target.len() <= 1024
        && target.starts_with('/')
        && target.len() > 1
        && !target.contains('\0')
        && target[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{target}` is not an absolute file path in the container"
        ))
    }
}

/// A tar archive (extracted at `/`) holding each file at its target with its mode, owned by
/// root: Docker's archive upload writes it into the container before it starts.
pub(super) fn files_archive(
    files: &[SecretFile],
    contents: &[SecretBytes],
) -> Result<Vec<u8>, String> {
    let mut tar = tar::Builder::new(Vec::new());
    for (file, bytes) in files.iter().zip(contents) {
        check_target(&file.target)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.0.len() as u64);
        header.set_mode(file.mode & 0o7777);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, &file.target[1..], bytes.0.as_slice())
            .map_err(|e| format!("packing {}: {e}", file.target))?;
    }
    tar.into_inner()
        .map_err(|e| format!("packing the secret files: {e}"))
}

/// Write the secret files into a created (not yet started) container.
pub(super) async fn upload_files(
    docker: &Docker,
    id: &str,
    files: &[SecretFile],
    contents: &[SecretBytes],
) -> Result<(), String> {
    if files.is_empty() {
        return Ok(());
    }
    let archive = files_archive(files, contents)?;
    let opts = UploadToContainerOptionsBuilder::default().path("/").build();
    docker
        .upload_to_container(id, Some(opts), bollard::body_full(archive.into()))
        .await
        .map_err(|e| format!("writing the secret files: {e}"))
}
