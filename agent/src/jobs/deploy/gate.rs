//! The health gate: a new container must pass its check (or keep running) before it takes
//! over; how a check reaches it (HTTP, TCP, a command inside).

use std::time::{Duration, Instant};

use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::LogsOptionsBuilder;
use bollard::Docker;
use futures::StreamExt;
use nebula_protocol::deploy::{HealthCheck, HealthProbe};

use super::{MAX_OUTPUT, SETTLE};

/// Wait until the container passes its health check (or, without one, keeps running for
/// [`SETTLE`]). The error is what people need to see: the check's output or the exit.
pub(super) async fn gate(
    docker: &Docker,
    id: &str,
    health: Option<&HealthCheck>,
    timeout: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let Some(hc) = health else {
        tokio::time::sleep(SETTLE).await;
        let info = inspect(docker, id).await?;
        return match exited(&info) {
            None => Ok(()),
            Some(code) => Err(stopped_message(docker, id, code).await),
        };
    };
    let interval = Duration::from_millis(hc.interval_ms.max(100) as u64);
    let check_timeout = Duration::from_millis(hc.timeout_ms.max(100) as u64);
    let start_period = Duration::from_millis(hc.start_period_ms as u64);
    let mut failures = 0;
    loop {
        let info = inspect(docker, id).await?;
        if let Some(code) = exited(&info) {
            return Err(stopped_message(docker, id, code).await);
        }
        let output = match probe(docker, id, &info, &hc.probe, check_timeout).await {
            Ok(()) => return Ok(()),
            Err(output) => output,
        };
        if started.elapsed() >= start_period {
            failures += 1;
            if failures >= hc.retries.max(1) {
                return Err(format!(
                    "health check failed {failures} time(s) in a row: {output}"
                ));
            }
        }
        if started.elapsed() + interval > timeout {
            return Err(format!(
                "not healthy within {}; last check: {output}",
                humantime::format_duration(timeout)
            ));
        }
        tokio::time::sleep(interval).await;
    }
}

pub(super) async fn inspect(docker: &Docker, id: &str) -> Result<ContainerInspectResponse, String> {
    docker
        .inspect_container(id, None)
        .await
        .map_err(|e| format!("inspecting the container: {e}"))
}

/// `Some(exit code)` when the container is not running.
pub(super) fn exited(info: &ContainerInspectResponse) -> Option<i64> {
    let state = info.state.as_ref()?;
    if state.running == Some(true) && state.restarting != Some(true) {
        None
    } else {
        Some(state.exit_code.unwrap_or(-1))
    }
}

pub(super) async fn stopped_message(docker: &Docker, id: &str, code: i64) -> String {
    let opts = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail("20")
        .build();
    let mut logs = docker.logs(id, Some(opts));
    let mut text = String::new();
    while let Some(Ok(chunk)) = logs.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        if text.len() > MAX_OUTPUT {
            break;
        }
    }
    let text = text.trim();
    if text.is_empty() {
        format!("the container stopped (exit code {code})")
    } else {
        format!("the container stopped (exit code {code}); its last output: {text}")
    }
}

/// Where the agent reaches the container's `port`: its address on its first network, or the
/// published host port on the loopback address; on the host's network, the port itself on the
/// loopback address.
pub(super) fn address(info: &ContainerInspectResponse, port: u16) -> Option<String> {
    let host_network = info
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        == Some("host");
    if host_network {
        return Some(format!("127.0.0.1:{port}"));
    }
    let settings = info.network_settings.as_ref()?;
    if let Some(ip) = settings.networks.as_ref().and_then(|n| {
        let mut nets: Vec<_> = n.iter().collect();
        nets.sort_by(|a, b| a.0.cmp(b.0));
        nets.into_iter()
            .find_map(|(_, e)| e.ip_address.clone().filter(|ip| !ip.is_empty()))
    }) {
        return Some(format!("{ip}:{port}"));
    }
    let bound = settings
        .ports
        .as_ref()?
        .get(&format!("{port}/tcp"))?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.clone().filter(|p| !p.is_empty()))?;
    Some(format!("127.0.0.1:{bound}"))
}

pub(super) async fn probe(
    docker: &Docker,
    id: &str,
    info: &ContainerInspectResponse,
    probe: &HealthProbe,
    timeout: Duration,
) -> Result<(), String> {
    match probe {
        HealthProbe::Http { port, path } => {
            let addr = address(info, *port)
                .ok_or_else(|| format!("the container has no address for port {port}"))?;
            let url = format!("http://{addr}{path}");
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| e.to_string())?;
            match client.get(&url).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() || status.is_redirection() {
                        return Ok(());
                    }
                    let body = resp.text().await.unwrap_or_default();
                    Err(format!(
                        "GET {url}: HTTP {status}{}",
                        if body.trim().is_empty() {
                            String::new()
                        } else {
                            format!(": {}", cut(body.trim().to_string(), 200))
                        }
                    ))
                }
                Err(e) => Err(format!("GET {url}: {e}")),
            }
        }
        HealthProbe::Tcp { port } => {
            let addr = address(info, *port)
                .ok_or_else(|| format!("the container has no address for port {port}"))?;
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
                Err(_) => Err(format!("connect {addr}: no answer within {timeout:?}")),
            }
        }
        HealthProbe::Cmd { command } => {
            match tokio::time::timeout(timeout, exec_in(docker, id, command)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "`{}` did not finish within {timeout:?}",
                    command.join(" ")
                )),
            }
        }
    }
}

pub(super) async fn exec_in(docker: &Docker, id: &str, command: &[String]) -> Result<(), String> {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    let exec = docker
        .create_exec(
            id,
            CreateExecOptions {
                cmd: Some(command.to_vec()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("exec `{}`: {e}", command.join(" ")))?;
    let mut text = String::new();
    if let Ok(StartExecResults::Attached { mut output, .. }) =
        docker.start_exec(&exec.id, None).await
    {
        while let Some(Ok(chunk)) = output.next().await {
            if text.len() < MAX_OUTPUT {
                text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            }
        }
    }
    let code = docker
        .inspect_exec(&exec.id)
        .await
        .ok()
        .and_then(|i| i.exit_code)
        .unwrap_or(-1);
    if code == 0 {
        Ok(())
    } else {
        Err(format!(
            "`{}` exited with {code}: {}",
            command.join(" "),
            cut(text.trim().to_string(), 500)
        ))
    }
}

pub(super) fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str(" [cut]");
    }
    s
}
