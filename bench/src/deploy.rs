//! `nebula-bench deploy`: applying a service map of N services over 3 real agents (real
//! containers on the local Docker Engine), from `PUT /api/v1/desired` until every service is
//! reported converged through the API, against the same N containers started by `docker run` in
//! a shell loop. Runs alternate between the two; the ratio of medians is recorded.
//!
//! `nebula-bench plan`: the pure planner on a synthetic fleet (10,000 services over 1,000
//! nodes): a first plan (everything to create) and the steady-state plan (everything converged).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nebula_desired::map::revision;
use nebula_desired::plan::{
    plan, Action, Desired, DesiredService, Observed, ObservedContainer, ObservedNode, PlacementRule,
};
use nebula_protocol::deploy::{
    ContainerSpec, GpuRequest, PortMapping, PortProtocol, RestartPolicy, UpdateStrategy,
};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{docker, join_token, percentile, start_controller, stats, KillOnDrop};

const IMAGE: &str = "nebula-test/busybox:1";

fn remove_labelled(label: &str) -> anyhow::Result<()> {
    let ids = docker(&["ps", "-aq", "--filter", &format!("label={label}")])?;
    let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        docker(&args)?;
    }
    Ok(())
}

pub(crate) fn agent_bin() -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name("nebula-agent");
    if !p.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// `docker run -d` N times from one shell loop, as a person would script it.
fn docker_loop(n: usize, label: &str) -> anyhow::Result<f64> {
    let script = format!(
        "for i in $(seq 1 {n}); do docker run -d --name bench-loop-$i --label {label} {IMAGE} sleep 3600 >/dev/null || exit 1; done"
    );
    let started = Instant::now();
    let status = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .status()?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the docker run loop failed");
    }
    Ok(secs)
}

fn bench_map(n: usize, nodes: &[String]) -> String {
    let mut s = String::from("services:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  svc-{i}:\n    image: {IMAGE}\n    command: [\"sleep\", \"3600\"]\n    placement: {{ node: {} }}\n",
            nodes[i % nodes.len()]
        ));
    }
    s
}

async fn services(client: &reqwest::Client, http: std::net::SocketAddr, admin: &str) -> Vec<Value> {
    match client
        .get(format!("http://{http}/api/v1/services"))
        .bearer_auth(admin)
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

async fn put_map(
    client: &reqwest::Client,
    http: std::net::SocketAddr,
    admin: &str,
    map: String,
) -> anyhow::Result<()> {
    let resp = client
        .put(format!("http://{http}/api/v1/desired"))
        .bearer_auth(admin)
        .body(map)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("PUT /desired: {}", resp.text().await.unwrap_or_default());
    }
    Ok(())
}

pub async fn deploy_bench(n: usize, runs: usize, out: &Path) -> anyhow::Result<()> {
    let build = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-test-image");
    if !Command::new(build).arg(IMAGE).status()?.success() {
        bail!("building the test image failed");
    }
    let dir = tempfile::tempdir()?;
    let ctl = start_controller(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--reconcile-interval", "5s"],
    )?;
    let client = reqwest::Client::new();
    let names: Vec<String> = (0..3).map(|i| format!("bench-node-{i}")).collect();
    let token = join_token(&client, ctl.http, &ctl.admin, names.len()).await?;
    let mut agents = Vec::new();
    for name in &names {
        let child = Command::new(agent_bin()?)
            .args(["join", "--controller", &ctl.quic.to_string()])
            .args(["--token", &token.to_string(), "--name", name, "--state-dir"])
            .arg(dir.path().join(name))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        agents.push(KillOnDrop(child));
    }
    // Every agent online with its first inventory.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes: Value = client
            .get(format!("http://{}/api/v1/nodes", ctl.http))
            .bearer_auth(&ctl.admin)
            .send()
            .await?
            .json()
            .await?;
        let online = nodes["items"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|n| n["status"] == "online").count());
        if online == names.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("agents did not come online");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loop_label = format!("nebula.bench={}", std::process::id());
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..runs {
        // Alternate which goes first, so neither always meets a warmer daemon.
        for first in [run % 2 == 0, run % 2 != 0] {
            if first {
                let started = Instant::now();
                put_map(&client, ctl.http, &ctl.admin, bench_map(n, &names)).await?;
                let deadline = started + Duration::from_secs(600);
                loop {
                    let list = services(&client, ctl.http, &ctl.admin).await;
                    let done = list
                        .iter()
                        .filter(|s| s["status"] == "converged" && s["running"] == 1)
                        .count();
                    if done == n {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("only {done} of {n} services converged");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let secs = started.elapsed().as_secs_f64();
                println!("run {run}: apply {n} services: {secs:.2} s");
                ours.push(secs);
                // Tear down through the product (an empty map: every container is an orphan).
                put_map(&client, ctl.http, &ctl.admin, "services: {}\n".into()).await?;
                let deadline = Instant::now() + Duration::from_secs(600);
                while !services(&client, ctl.http, &ctl.admin).await.is_empty() {
                    if Instant::now() > deadline {
                        bail!("orphans were not removed");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } else {
                let secs = docker_loop(n, &loop_label)?;
                println!("run {run}: docker run x {n}: {secs:.2} s");
                theirs.push(secs);
                remove_labelled(&loop_label)?;
            }
        }
    }
    drop(agents);
    let med = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        percentile(&s, 0.5)
    };
    let ratio = med(&ours) / med(&theirs);
    println!(
        "apply {n} services over 3 agents: median {:.2} s; docker run loop: median {:.2} s; ratio {ratio:.2}",
        med(&ours),
        med(&theirs)
    );
    let result = json!({
        "benchmark": "deploy",
        "command": format!("nebula-bench deploy --services {n} --runs {runs}"),
        "machine": "2 cores, local Docker Engine, 3 nebula-agent processes on one host",
        "services": n,
        "agents": 3,
        "apply_seconds": ours,
        "docker_run_loop_seconds": theirs,
        "apply_median_s": med(&ours),
        "docker_run_loop_median_s": med(&theirs),
        "ratio_of_medians": ratio,
        "target_ratio": 1.15,
        "measured": "PUT /api/v1/desired until GET /api/v1/services reports every service converged (containers created, started, settled and seen in telemetry)",
    });
    write(out, &result)
}

fn write(out: &Path, v: &Value) -> anyhow::Result<()> {
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// A synthetic fleet: `nodes` nodes in 10 zones, a tenth with GPUs; `services` services, a third
/// pinned to a node, a third placed by zone label (1-3 replicas), the rest anywhere, every fifth
/// with a fixed host port.
fn synthetic(services: usize, nodes: usize) -> (Desired, Observed) {
    let observed = Observed {
        nodes: (0..nodes)
            .map(|i| ObservedNode {
                id: Uuid::from_u128(i as u128 + 1),
                name: format!("node-{i:04}"),
                labels: BTreeMap::from([("zone".into(), format!("z{}", i % 10))]),
                online: true,
                gpus: u32::from(i % 10 == 0),
                max_free_vram_mb: if i % 10 == 0 { 24_000 } else { 0 },
                containers: Vec::new(),
                docker: true,
                known: true,
            })
            .collect(),
        ..Default::default()
    };
    let mut desired = Desired::default();
    for i in 0..services {
        let spec = ContainerSpec {
            image: format!("registry.local/app-{}:1.{}", i % 50, i % 7),
            command: None,
            env: vec![("SERVICE".into(), format!("svc-{i}"))],
            ports: vec![PortMapping {
                host_ip: None,
                host_port: (i % 5 == 0).then_some(10_000 + (i % 1000) as u16),
                container_port: 8080,
                protocol: PortProtocol::Tcp,
            }],
            volumes: vec![],
            restart: RestartPolicy::UnlessStopped,
            gpus: GpuRequest::None,
            health: None,
        };
        let placement = match i % 3 {
            0 => PlacementRule {
                node: Some(format!("node-{:04}", i % nodes)),
                ..Default::default()
            },
            1 => PlacementRule {
                labels: BTreeMap::from([("zone".into(), format!("z{}", i % 10))]),
                ..Default::default()
            },
            _ => PlacementRule::default(),
        };
        desired.services.insert(
            format!("svc-{i:05}"),
            DesiredService {
                revision: revision(&spec),
                spec,
                replicas: if i % 3 == 1 { 1 + (i % 3) as u32 } else { 1 },
                placement,
                strategy: UpdateStrategy::StartFirst,
                health_timeout: Duration::from_secs(60),
                depends_on: vec![],
            },
        );
    }
    (desired, observed)
}

/// What agents would report after every action of `p` ran.
fn converge(desired: &Desired, observed: &mut Observed, p: &nebula_desired::plan::Plan) {
    for action in &p.actions {
        let node = observed
            .nodes
            .iter_mut()
            .find(|n| n.id == action.node_id())
            .expect("planned on a known node");
        node.containers.retain(|c| c.service != action.service());
        let replicas = match action {
            Action::Create { replicas, .. }
            | Action::Update { replicas, .. }
            | Action::Repair { replicas, .. } => *replicas,
            Action::Remove { .. } => 0,
        };
        for r in 0..replicas {
            node.containers.push(ObservedContainer {
                name: format!("{}-{r}", action.service()),
                service: action.service().to_owned(),
                revision: desired.services[action.service()].revision.clone(),
                running: true,
            });
        }
    }
}

pub fn plan_bench(
    services: usize,
    nodes: usize,
    iterations: usize,
    out: &Path,
) -> anyhow::Result<()> {
    let (desired, mut observed) = synthetic(services, nodes);
    let time = |d: &Desired, o: &Observed| {
        let mut v = Vec::with_capacity(iterations);
        let mut last = None;
        for _ in 0..iterations {
            let started = Instant::now();
            let p = plan(d, o);
            v.push(started.elapsed().as_secs_f64() * 1e3);
            last = Some(p);
        }
        (v, last.expect("at least one iteration"))
    };
    let (first_ms, first) = time(&desired, &observed);
    converge(&desired, &mut observed, &first);
    let (steady_ms, steady) = time(&desired, &observed);
    if !steady.actions.is_empty() {
        bail!(
            "the converged fleet still plans {} actions",
            steady.actions.len()
        );
    }
    // One service changes its image: the usual plan after an edit.
    let mut edited = desired.clone();
    if let Some(s) = edited.services.values_mut().next() {
        s.spec.image.push_str("-next");
        s.revision = revision(&s.spec);
    }
    let (edit_ms, edit) = time(&edited, &observed);
    let containers: usize = observed.nodes.iter().map(|n| n.containers.len()).sum();
    let first_stats = stats(first_ms);
    let steady_stats = stats(steady_ms);
    let edit_stats = stats(edit_ms);
    println!(
        "plan {services} services over {nodes} nodes ({containers} containers): first {:.1} ms, steady {:.1} ms, one edit {:.1} ms (medians of {iterations})",
        first_stats["median"].as_f64().unwrap_or(0.0),
        steady_stats["median"].as_f64().unwrap_or(0.0),
        edit_stats["median"].as_f64().unwrap_or(0.0),
    );
    write(
        out,
        &json!({
            "benchmark": "plan",
            "command": format!("nebula-bench plan --services {services} --nodes {nodes} --iterations {iterations}"),
            "services": services,
            "nodes": nodes,
            "containers_when_converged": containers,
            "first_plan_actions": first.actions.len(),
            "edit_plan_actions": edit.actions.len(),
            "first_plan_ms": first_stats,
            "steady_plan_ms": steady_stats,
            "one_edit_plan_ms": edit_stats,
            "target_ms": 50,
        }),
    )
}
