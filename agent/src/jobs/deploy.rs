//! `deploy` and `undeploy` jobs: the Docker executor.
//!
//! A deploy converges one service's containers on this node to a [`DeploySpec`]: the image is
//! made present (pulled when missing), containers of the wanted revision are created with the
//! managed labels, started and held to a health gate; containers of other revisions are replaced
//! by the spec's strategy. When the new revision fails its gate, its containers are removed and
//! the previous revision's run again: the job fails with outcome `rolled-back` and the health
//! check's output. Running the same spec again finds nothing to do (`unchanged`).
//!
//! Only containers labelled `nebula.managed=true` with this node's id and the service's name are
//! ever listed, stopped or removed: nothing unmanaged is touched.
//!
//! Before anything else, the container a spec asks for is checked against this host's deploy
//! policy ([`policy`], the agent config's `[deploy]`): a deploy outside it is refused untouched.
//! A deploy with host access (privileged mode, the host's network or PID namespace, added
//! capabilities, devices) carries them into the same create body, so the policy judges them
//! like everything else, and an allowed one runs with them.

mod docker;
mod gate;
pub mod policy;

use docker::{check_target, container_body, list, remove, stop, upload_files};
use gate::{cut, gate};

use std::collections::BTreeSet;
use std::time::Duration;

use bollard::query_parameters::CreateContainerOptionsBuilder;
use bollard::Docker;
use nebula_protocol::deploy::{
    DeployOutcome, DeployReport, DeploySpec, HostAccess, SecretBytes, SecretFile, UndeploySpec,
    UpdateStrategy,
};
use nebula_protocol::jobs::{JobOutput, JobResult, JobStatus, LogStream};
use rand::Rng;
use tracing::warn;

use super::JobContext;
use crate::config::DeployConfig;

/// How long a container without a health check must keep running to pass the gate.
const SETTLE: Duration = Duration::from_secs(1);
/// Grace period for a container to stop before it is killed.
const STOP_GRACE_SECS: i32 = 10;
/// Most bytes of health-check or log output carried in a report.
const MAX_OUTPUT: usize = 2048;

/// One managed container of the service on this node.
#[derive(Debug, Clone)]
struct Managed {
    id: String,
    name: String,
    revision: String,
    replica: u32,
    running: bool,
}

/// What new containers get beyond the spec: host access (the default: none) and secret files
/// with their bytes (1.8).
#[derive(Debug, Clone, Copy)]
pub struct Extras<'a> {
    pub host: &'a HostAccess,
    pub files: &'a [SecretFile],
    pub contents: &'a [SecretBytes],
}

impl<'a> Extras<'a> {
    pub fn host(host: &'a HostAccess) -> Self {
        Self {
            host,
            files: &[],
            contents: &[],
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.files.len() != self.contents.len() {
            return Err(format!(
                "{} secret file(s) but {} content(s)",
                self.files.len(),
                self.contents.len()
            ));
        }
        self.files.iter().try_for_each(|f| check_target(&f.target))
    }
}

/// Converge to `spec`, its containers created with `extras`.
pub async fn deploy(
    ctx: &JobContext,
    spec: &DeploySpec,
    extras: Extras<'_>,
    own: Option<uuid::Uuid>,
    policy: &DeployConfig,
) -> JobResult {
    if let Err(e) = check_names(&spec.service, &spec.node)
        .and_then(|()| check_node(&spec.node, own))
        .and_then(|()| extras.check())
    {
        return JobResult::new(JobStatus::Refused, Some(e));
    }
    let host = extras.host;
    // Before any container is listed, created or touched. Replicas differ only in labels.
    if let Err(violation) = policy::check(policy, &container_body(spec, host, 0)) {
        warn!(service = %spec.service, "{violation}");
        ctx.log(LogStream::Agent, violation.to_string());
        return JobResult::new(JobStatus::Refused, Some(violation.to_string()));
    }
    let docker = match ctx.docker() {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let exec = Executor {
        ctx,
        docker: &docker,
        spec,
        host,
        extras,
    };
    match exec.run().await {
        Ok(report) => report_result(report),
        Err(e) => failed(e),
    }
}

pub async fn undeploy(ctx: &JobContext, spec: &UndeploySpec, own: Option<uuid::Uuid>) -> JobResult {
    if let Err(e) =
        check_names(&spec.service, &spec.node).and_then(|()| check_node(&spec.node, own))
    {
        return JobResult::new(JobStatus::Refused, Some(e));
    }
    let docker = match ctx.docker() {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let existing = match list(&docker, &spec.service, &spec.node).await {
        Ok(l) => l,
        Err(e) => return failed(e),
    };
    let previous: BTreeSet<String> = existing.iter().map(|c| c.revision.clone()).collect();
    for c in &existing {
        ctx.log(LogStream::Agent, format!("removing container {}", c.name));
        if let Err(e) = remove(&docker, &c.id, c.running).await {
            return failed(format!("removing {}: {e}", c.name));
        }
    }
    report_result(DeployReport {
        outcome: if existing.is_empty() {
            DeployOutcome::Unchanged
        } else {
            DeployOutcome::Deployed
        },
        previous: previous.into_iter().collect(),
        containers: Vec::new(),
        health_output: None,
    })
}

fn failed(error: String) -> JobResult {
    JobResult::new(JobStatus::Failed, Some(error))
}

fn report_result(report: DeployReport) -> JobResult {
    let (status, error) = match report.outcome {
        DeployOutcome::Unchanged | DeployOutcome::Deployed => (JobStatus::Succeeded, None),
        DeployOutcome::RolledBack => (
            JobStatus::Failed,
            Some(format!(
                "rolled back to {}: {}",
                report.previous.join(", "),
                report
                    .health_output
                    .as_deref()
                    .unwrap_or("the health gate failed")
            )),
        ),
        DeployOutcome::Failed => (
            JobStatus::Failed,
            Some(
                report
                    .health_output
                    .clone()
                    .unwrap_or_else(|| "the deploy failed".into()),
            ),
        ),
    };
    JobResult {
        status,
        exit_code: None,
        error,
        output: JobOutput::Deploy(report),
    }
}

/// Containers are managed per node: a spec for another node's containers is refused (two agents
/// may share one Docker Engine, and neither may touch the other's).
fn check_node(node: &str, own: Option<uuid::Uuid>) -> Result<(), String> {
    match own {
        Some(id) if id.to_string() != node => Err(format!(
            "this deploy is for node {node}, and this agent is node {id}"
        )),
        _ => Ok(()),
    }
}

/// Service names and node ids end up in container names and label filters.
fn check_names(service: &str, node: &str) -> Result<(), String> {
    let ok = nebula_protocol::valid_name;
    if !ok(service) {
        return Err(format!("`{service}` is not a valid service name"));
    }
    if !ok(node) {
        return Err(format!("`{node}` is not a valid node id"));
    }
    Ok(())
}

struct Executor<'a> {
    ctx: &'a JobContext,
    docker: &'a Docker,
    spec: &'a DeploySpec,
    host: &'a HostAccess,
    extras: Extras<'a>,
}

impl Executor<'_> {
    fn log(&self, line: String) {
        self.ctx.log(LogStream::Agent, line);
    }

    async fn run(&self) -> Result<DeployReport, String> {
        let spec = self.spec;
        let existing = list(self.docker, &spec.service, &spec.node).await?;
        let (mut current, old): (Vec<Managed>, Vec<Managed>) = existing
            .into_iter()
            .partition(|c| c.revision == spec.revision);
        current.sort_by_key(|c| (!c.running, c.replica));
        if current.len() == spec.replicas as usize
            && current.iter().all(|c| c.running)
            && old.is_empty()
        {
            self.log(format!(
                "{} runs {} replica(s) of revision {}: nothing to do",
                spec.service, spec.replicas, spec.revision
            ));
            return Ok(self
                .report(DeployOutcome::Unchanged, Vec::new(), None)
                .await);
        }
        self.ensure_image(&spec.container.image).await?;
        let surplus = current.split_off((spec.replicas as usize).min(current.len()));
        for c in &surplus {
            self.log(format!("removing surplus replica {}", c.name));
            remove(self.docker, &c.id, c.running)
                .await
                .map_err(|e| format!("removing {}: {e}", c.name))?;
        }
        let previous: Vec<String> = old
            .iter()
            .map(|c| c.revision.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if old.is_empty() {
            // Create or repair: nothing to roll back to.
            let (fresh, result) = self.bring_up(&current).await;
            return Ok(match result {
                Ok(()) => self.report(DeployOutcome::Deployed, previous, None).await,
                Err(output) => {
                    self.discard(&fresh).await;
                    self.report(DeployOutcome::Failed, previous, Some(output))
                        .await
                }
            });
        }
        let stop_first = spec.strategy == UpdateStrategy::StopFirst;
        self.log(format!(
            "updating {} from {} to {} ({})",
            spec.service,
            previous.join(", "),
            spec.revision,
            if stop_first {
                "stop-first"
            } else {
                "start-first"
            }
        ));
        if stop_first {
            let mut stopped: Vec<&Managed> = Vec::new();
            for c in old.iter().filter(|c| c.running) {
                self.log(format!("stopping {}", c.name));
                if let Err(e) = stop(self.docker, &c.id).await {
                    // Leave the service as it was: start again what this deploy stopped.
                    self.restart(&stopped).await;
                    return Err(format!("stopping {}: {e}", c.name));
                }
                stopped.push(c);
            }
        }
        let (fresh, result) = self.bring_up(&current).await;
        match result {
            Ok(()) => {
                for c in &old {
                    self.log(format!("removing {} (revision {})", c.name, c.revision));
                    remove(self.docker, &c.id, c.running && !stop_first)
                        .await
                        .map_err(|e| format!("removing {}: {e}", c.name))?;
                }
                Ok(self.report(DeployOutcome::Deployed, previous, None).await)
            }
            Err(output) => {
                self.log(format!("rolling back to {}: {output}", previous.join(", ")));
                self.discard(&fresh).await;
                for c in &current {
                    let _ = remove(self.docker, &c.id, true).await;
                }
                // The containers that ran before the deploy run again (with start-first they
                // never stopped; one stopped by hand stays stopped).
                let ran: Vec<&Managed> = old.iter().filter(|c| c.running).collect();
                let restarted = if stop_first {
                    self.restart(&ran).await
                } else {
                    true
                };
                let outcome = if restarted {
                    DeployOutcome::RolledBack
                } else {
                    DeployOutcome::Failed
                };
                Ok(self.report(outcome, previous, Some(output)).await)
            }
        }
    }

    /// Start the stopped containers of the wanted revision, create the missing replicas, and
    /// hold them all to the health gate. Returns the ids created (to discard on failure).
    async fn bring_up(&self, current: &[Managed]) -> (Vec<String>, Result<(), String>) {
        let spec = self.spec;
        let mut to_gate: Vec<(String, String)> = Vec::new();
        for c in current {
            if !c.running {
                self.log(format!("starting {} (stopped)", c.name));
                if let Err(e) = self.docker.start_container(&c.id, None).await {
                    return (Vec::new(), Err(format!("starting {}: {e}", c.name)));
                }
            }
            to_gate.push((c.id.clone(), c.name.clone()));
        }
        let used: BTreeSet<u32> = current.iter().map(|c| c.replica).collect();
        let missing = spec.replicas as usize - current.len().min(spec.replicas as usize);
        let mut fresh = Vec::new();
        for replica in (0..).filter(|r| !used.contains(r)).take(missing) {
            match self.create(replica).await {
                Ok((id, name)) => {
                    fresh.push(id.clone());
                    self.log(format!("starting {name}"));
                    if let Err(e) = self.docker.start_container(&id, None).await {
                        return (fresh, Err(format!("starting {name}: {e}")));
                    }
                    to_gate.push((id, name));
                }
                Err(e) => return (fresh, Err(e)),
            }
        }
        let timeout = Duration::from_millis(spec.health_timeout_ms.max(1000) as u64);
        let gates = to_gate.iter().map(|(id, name)| async move {
            let r = gate(self.docker, id, spec.container.health.as_ref(), timeout).await;
            match &r {
                Ok(()) => self.log(format!("{name} is healthy")),
                Err(e) => self.log(format!("{name} failed its health gate: {e}")),
            }
            r.map_err(|e| format!("{name}: {e}"))
        });
        let results = futures::future::join_all(gates).await;
        let result = results.into_iter().collect::<Result<Vec<()>, String>>();
        (fresh, result.map(|_| ()))
    }

    /// Start containers again; false when one would not start.
    async fn restart(&self, containers: &[&Managed]) -> bool {
        let mut all = true;
        for c in containers {
            self.log(format!("starting {} again", c.name));
            if let Err(e) = self.docker.start_container(&c.id, None).await {
                self.log(format!("starting {} again failed: {e}", c.name));
                all = false;
            }
        }
        all
    }

    async fn discard(&self, ids: &[String]) {
        for id in ids {
            if let Err(e) = remove(self.docker, id, true).await {
                self.log(format!("removing failed container {id}: {e}"));
            }
        }
    }

    async fn create(&self, replica: u32) -> Result<(String, String), String> {
        let spec = self.spec;
        let suffix: String = {
            let mut rng = rand::thread_rng();
            (0..6)
                .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)]))
                .collect()
        };
        let name = format!("{}-{}-{suffix}", spec.service, replica + 1);
        let body = container_body(spec, self.host, replica);
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        self.log(format!(
            "creating {name} from {} (revision {})",
            spec.container.image, spec.revision
        ));
        let created = self
            .docker
            .create_container(Some(opts), body)
            .await
            .map_err(|e| format!("creating {name}: {e}"))?;
        if !self.extras.files.is_empty() {
            self.log(format!(
                "writing {} secret file(s) into {name}",
                self.extras.files.len()
            ));
            let written = upload_files(
                self.docker,
                &created.id,
                self.extras.files,
                self.extras.contents,
            )
            .await;
            if let Err(e) = written {
                let _ = remove(self.docker, &created.id, false).await;
                return Err(format!("{name}: {e}"));
            }
        }
        Ok((created.id, name))
    }

    async fn ensure_image(&self, image: &str) -> Result<(), String> {
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        self.log(format!("image {image} is not on this node; pulling it"));
        crate::docker::pull(self.docker, image, |line| self.log(line)).await
    }

    async fn report(
        &self,
        outcome: DeployOutcome,
        previous: Vec<String>,
        health_output: Option<String>,
    ) -> DeployReport {
        let containers = list(self.docker, &self.spec.service, &self.spec.node)
            .await
            .map(|l| l.into_iter().map(|c| c.name).collect())
            .unwrap_or_default();
        DeployReport {
            outcome,
            previous,
            containers,
            health_output: health_output.map(|o| cut(o, MAX_OUTPUT)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::RestartPolicyNameEnum;
    use nebula_protocol::deploy::{
        ContainerSpec, GpuRequest, HealthCheck, HealthProbe, NetworkMode, PortMapping,
        PortProtocol, RestartPolicy, VolumeMount,
    };

    fn spec() -> DeploySpec {
        DeploySpec {
            service: "web".into(),
            revision: "abc123".into(),
            node: "node-1".into(),
            replicas: 1,
            container: ContainerSpec {
                image: "nebula-test/web:v1".into(),
                command: None,
                env: vec![("A".into(), "1".into())],
                ports: vec![
                    PortMapping {
                        host_ip: None,
                        host_port: Some(8080),
                        container_port: 80,
                        protocol: PortProtocol::Tcp,
                    },
                    PortMapping {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: None,
                        container_port: 53,
                        protocol: PortProtocol::Udp,
                    },
                ],
                volumes: vec![VolumeMount {
                    source: "/srv/data".into(),
                    target: "/data".into(),
                    read_only: true,
                }],
                restart: RestartPolicy::OnFailure {
                    max_retries: Some(3),
                },
                gpus: GpuRequest::Count(2),
                health: Some(HealthCheck {
                    probe: HealthProbe::Cmd {
                        command: vec!["true".into()],
                    },
                    interval_ms: 2000,
                    timeout_ms: 1000,
                    retries: 3,
                    start_period_ms: 0,
                }),
            },
            strategy: UpdateStrategy::StartFirst,
            health_timeout_ms: 30_000,
        }
    }

    #[test]
    fn the_create_body_carries_labels_ports_volumes_restart_and_gpus() {
        let body = container_body(&spec(), &HostAccess::default(), 0);
        let labels = body.labels.unwrap();
        assert_eq!(labels["nebula.managed"], "true");
        assert_eq!(labels["nebula.service"], "web");
        assert_eq!(labels["nebula.revision"], "abc123");
        assert_eq!(labels["nebula.node"], "node-1");
        assert_eq!(body.env.unwrap(), vec!["A=1".to_string()]);
        let host = body.host_config.unwrap();
        let ports = host.port_bindings.unwrap();
        let web = ports["80/tcp"].as_ref().unwrap();
        assert_eq!(web[0].host_port.as_deref(), Some("8080"));
        let dns = ports["53/udp"].as_ref().unwrap();
        assert_eq!(
            dns[0].host_port.as_deref(),
            Some(""),
            "Docker picks the port"
        );
        assert_eq!(dns[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(host.binds.unwrap(), vec!["/srv/data:/data:ro".to_string()]);
        let restart = host.restart_policy.unwrap();
        assert_eq!(restart.name, Some(RestartPolicyNameEnum::ON_FAILURE));
        assert_eq!(restart.maximum_retry_count, Some(3));
        let gpu = &host.device_requests.unwrap()[0];
        assert_eq!(gpu.driver.as_deref(), Some("nvidia"));
        assert_eq!(gpu.count, Some(2));
        assert_eq!(gpu.capabilities, Some(vec![vec!["gpu".to_string()]]));
        let hc = body.healthcheck.unwrap();
        assert_eq!(
            hc.test.unwrap(),
            vec!["CMD".to_string(), "true".to_string()]
        );
        assert_eq!(hc.interval, Some(2_000_000_000));
    }

    #[test]
    fn host_access_goes_into_the_create_body_and_only_when_asked_for() {
        let plain = container_body(&spec(), &HostAccess::default(), 0)
            .host_config
            .unwrap();
        assert_eq!(plain.privileged, None);
        assert_eq!(plain.network_mode, None);
        assert_eq!(plain.pid_mode, None);
        assert_eq!(plain.cap_add, None);
        assert_eq!(plain.devices, None);
        let host = HostAccess {
            privileged: true,
            network: NetworkMode::Host,
            pid_host: true,
            cap_add: vec!["NET_ADMIN".into()],
            devices: vec![nebula_protocol::deploy::DeviceMapping {
                host_path: "/dev/ttyUSB0".into(),
                container_path: "/dev/ttyS0".into(),
            }],
        };
        let body = container_body(&spec(), &host, 0).host_config.unwrap();
        assert_eq!(body.privileged, Some(true));
        assert_eq!(body.network_mode.as_deref(), Some("host"));
        assert_eq!(body.pid_mode.as_deref(), Some("host"));
        assert_eq!(body.cap_add, Some(vec!["NET_ADMIN".to_string()]));
        let device = &body.devices.unwrap()[0];
        assert_eq!(device.path_on_host.as_deref(), Some("/dev/ttyUSB0"));
        assert_eq!(device.path_in_container.as_deref(), Some("/dev/ttyS0"));
        let none = HostAccess {
            network: NetworkMode::None,
            ..Default::default()
        };
        let body = container_body(&spec(), &none, 0).host_config.unwrap();
        assert_eq!(body.network_mode.as_deref(), Some("none"));
    }

    /// The controller previews this agent's refusals from the policy summary it reports: for
    /// each rule both say the same words.
    #[test]
    fn the_controllers_preview_says_what_the_policy_says() {
        use nebula_protocol::deploy::{DeviceMapping as Device, VolumeMount};
        let policy = DeployConfig::default();
        let summary = policy.summary();
        let sockets = policy::RuntimeSockets::new(Vec::<std::path::PathBuf>::new());
        let mut plain = spec();
        plain.container.volumes.clear();
        plain.container.gpus = GpuRequest::None;
        let bind = |source: &str| {
            let mut s = plain.clone();
            s.container.volumes = vec![VolumeMount {
                source: source.into(),
                target: "/x".into(),
                read_only: false,
            }];
            s
        };
        let with = |f: &dyn Fn(&mut HostAccess)| {
            let mut h = HostAccess::default();
            f(&mut h);
            h
        };
        let cases: Vec<(DeploySpec, HostAccess)> = vec![
            (plain.clone(), with(&|h| h.privileged = true)),
            (plain.clone(), with(&|h| h.network = NetworkMode::Host)),
            (plain.clone(), with(&|h| h.pid_host = true)),
            (
                plain.clone(),
                with(&|h| h.cap_add = vec!["SYS_ADMIN".into()]),
            ),
            (
                plain.clone(),
                with(&|h| {
                    h.devices = vec![Device {
                        host_path: "/dev/null".into(),
                        container_path: "/dev/null".into(),
                    }]
                }),
            ),
            (bind("/"), HostAccess::default()),
            (bind("/srv/x/docker.sock"), HostAccess::default()),
        ];
        for (s, h) in cases {
            let agent = policy::check_with(&policy, &container_body(&s, &h, 0), &sockets)
                .expect_err("refused")
                .to_string();
            let preview = summary.refusal(&s.container, &h);
            assert_eq!(preview.as_deref(), Some(agent.as_str()), "{h:?}");
        }
        let gpus = DeployConfig {
            allow_gpus: false,
            ..DeployConfig::default()
        };
        let mut gpu = plain.clone();
        gpu.container.gpus = GpuRequest::All;
        let none = HostAccess::default();
        let agent = policy::check_with(&gpus, &container_body(&gpu, &none, 0), &sockets)
            .expect_err("refused")
            .to_string();
        assert_eq!(
            gpus.summary().refusal(&gpu.container, &none).as_deref(),
            Some(agent.as_str())
        );
        // And what one allows, the other does.
        let open = DeployConfig {
            allow_privileged: true,
            allow_host_network: true,
            ..DeployConfig::default()
        };
        let both = with(&|h| {
            h.privileged = true;
            h.network = NetworkMode::Host;
        });
        assert!(policy::check_with(&open, &container_body(&plain, &both, 0), &sockets).is_ok());
        assert_eq!(open.summary().refusal(&plain.container, &both), None);
    }

    #[test]
    fn all_gpus_is_count_minus_one() {
        let mut s = spec();
        s.container.gpus = GpuRequest::All;
        let none = HostAccess::default();
        let host = container_body(&s, &none, 0).host_config.unwrap();
        assert_eq!(host.device_requests.unwrap()[0].count, Some(-1));
        s.container.gpus = GpuRequest::None;
        assert!(container_body(&s, &none, 0)
            .host_config
            .unwrap()
            .device_requests
            .is_none());
    }

    #[test]
    fn names_that_could_escape_a_label_filter_are_refused() {
        assert!(check_names("web", "n1").is_ok());
        assert!(check_names("web,x=y", "n1").is_err());
        assert!(check_names("", "n1").is_err());
        assert!(check_names("-web", "n1").is_err());
        assert!(check_names("web", "a b").is_err());
    }

    #[test]
    fn secret_files_go_in_as_a_tar_at_their_targets_with_their_modes() {
        use nebula_protocol::deploy::{SecretBytes, SecretFile};
        let files = vec![
            SecretFile {
                target: "/run/secrets/db_password".into(),
                secret: "db_password@2".into(),
                mode: 0o400,
            },
            SecretFile {
                target: "/etc/app/token".into(),
                secret: "token@1".into(),
                mode: 0o444,
            },
        ];
        let contents = vec![
            SecretBytes(b"hunter2".to_vec()),
            SecretBytes(b"tok".to_vec()),
        ];
        let archive = docker::files_archive(&files, &contents).unwrap();
        let mut read = tar::Archive::new(archive.as_slice());
        let mut seen = Vec::new();
        for entry in read.entries().unwrap() {
            let mut e = entry.unwrap();
            let mut body = String::new();
            std::io::Read::read_to_string(&mut e, &mut body).unwrap();
            let h = e.header();
            seen.push((
                e.path().unwrap().display().to_string(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                body,
            ));
        }
        assert_eq!(
            seen,
            [
                ("run/secrets/db_password".into(), 0o400, 0, "hunter2".into()),
                ("etc/app/token".into(), 0o444, 0, "tok".into()),
            ]
        );
        // Paths that could leave the container's root, and bytes that do not match, are refused.
        let host = HostAccess::default();
        for bad in ["/run/../../etc/passwd", "relative", "/", "/a//b"] {
            let f = vec![SecretFile {
                target: bad.into(),
                secret: "x@1".into(),
                mode: 0o400,
            }];
            let extras = Extras {
                host: &host,
                files: &f,
                contents: &contents[..1],
            };
            assert!(extras.check().is_err(), "{bad}");
        }
        let extras = Extras {
            host: &host,
            files: &files,
            contents: &contents[..1],
        };
        assert!(extras
            .check()
            .unwrap_err()
            .contains("2 secret file(s) but 1"));
        // `Debug` never shows the bytes.
        assert!(!format!("{contents:?}").contains("hunter2"));
    }

    #[test]
    fn a_deploy_for_another_node_is_refused() {
        let me = uuid::Uuid::now_v7();
        assert!(check_node(&me.to_string(), Some(me)).is_ok());
        let other = uuid::Uuid::now_v7().to_string();
        let err = check_node(&other, Some(me)).unwrap_err();
        assert!(err.contains(&other), "{err}");
        assert!(
            check_node(&other, None).is_ok(),
            "no identity: nothing to compare"
        );
    }
}
