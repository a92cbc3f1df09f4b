//! Telemetry: Prometheus metrics, a node's figures and history.

use super::nodes::rfc3339;
use super::prelude::*;
use crate::containers::container_row;
use nebula_types::api::telemetry::{
    DiskView, GpuProcessView, GpuView, InterfaceView, LatestSample, MinutePoint, NodeTelemetry,
    Points,
};

pub use nebula_types::api::nodes::TelemetrySummary;

pub(super) fn summary(view: &crate::telemetry::NodeView) -> Option<TelemetrySummary> {
    use nebula_protocol::telemetry::{ContainerHealth, ContainerState};
    let s = view.latest.as_ref()?;
    let inv = view.inventory.as_ref();
    let utils: Vec<f32> = s
        .gpus
        .iter()
        .filter_map(|g| g.utilization_percent)
        .map(f32::from)
        .collect();
    let gpu_mem: Vec<u64> = s.gpus.iter().filter_map(|g| g.memory_used_bytes).collect();
    Some(TelemetrySummary {
        sampled_at: rfc3339(view.received_at_ms),
        cpu_percent: s.host.cpu_percent,
        load1: s.host.load[0],
        memory_used_bytes: s.host.memory_used_bytes,
        memory_total_bytes: s.host.memory_total_bytes,
        gpus: s.gpus.len(),
        gpu_utilization_percent: (!utils.is_empty())
            .then(|| utils.iter().sum::<f32>() / utils.len() as f32),
        gpu_memory_used_bytes: (!gpu_mem.is_empty())
            .then(|| crate::telemetry::saturating_sum(gpu_mem.iter().copied())),
        gpu_memory_total_bytes: inv
            .filter(|i| !i.gpus.is_empty())
            .map(|i| crate::telemetry::saturating_sum(i.gpus.iter().map(|g| g.memory_total_bytes))),
        containers_total: s.containers.len(),
        containers_running: s
            .containers
            .iter()
            .filter(|c| c.state == ContainerState::Running)
            .count(),
        containers_unhealthy: s
            .containers
            .iter()
            .filter(|c| c.health == ContainerHealth::Unhealthy)
            .count(),
    })
}

pub(super) async fn metrics(State(cp): State<Arc<ControlPlane>>) -> Response {
    match cp.metrics.render() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "encoding metrics failed",
        )
        .into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryQuery {
    /// RFC 3339 time, or a duration back from now (`15m`, `24h`). Default: 1 h back.
    since: Option<String>,
    /// `raw` (in-memory full resolution) or `1m` (stored rollups).
    resolution: Option<String>,
}

pub(super) fn parse_since(s: Option<&str>) -> ApiResult<SystemTime> {
    let Some(s) = s else {
        return Ok(SystemTime::now() - Duration::from_secs(3600));
    };
    // Out-of-range times are refused here, at the edge, never formatted or subtracted later.
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return SystemTime::now()
            .checked_sub(d)
            .filter(|t| *t >= SystemTime::UNIX_EPOCH)
            .ok_or_else(|| ApiError::bad_request(format!("since `{s}` is before 1970")));
    }
    Err(ApiError::bad_request(format!(
        "since `{s}`: use an RFC 3339 time or a duration such as 15m"
    )))
}

impl ControlPlane {
    /// A node's latest sample as the API shows it (the Discord bot's `/node`).
    pub fn latest_sample(&self, node: uuid::Uuid) -> Option<LatestSample> {
        self.telemetry.view(node).as_ref().and_then(sample_view)
    }
}

/// The latest sample with names filled in from the inventory.
fn sample_view(view: &crate::telemetry::NodeView) -> Option<LatestSample> {
    let s = view.latest.as_ref()?;
    let inv = view.inventory.as_ref()?;
    let disks = inv
        .disks
        .iter()
        .zip(&s.disks_used_bytes)
        .map(|(d, used)| DiskView {
            mount: d.mount.clone(),
            filesystem: d.filesystem.clone(),
            used_bytes: *used,
            total_bytes: d.total_bytes,
        })
        .collect();
    let interfaces = inv
        .interfaces
        .iter()
        .zip(&s.interfaces)
        .map(|(name, r)| InterfaceView {
            name: name.clone(),
            rx_bytes_per_sec: r.rx_bytes_per_sec,
            tx_bytes_per_sec: r.tx_bytes_per_sec,
        })
        .collect();
    let gpus = inv
        .gpus
        .iter()
        .zip(&s.gpus)
        .map(|(g, v)| GpuView {
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            memory_total_bytes: g.memory_total_bytes,
            power_limit_mw: g.power_limit_mw,
            utilization_percent: v.utilization_percent,
            memory_used_bytes: v.memory_used_bytes,
            temperature_c: v.temperature_c,
            power_mw: v.power_mw,
            fan_percent: v.fan_percent,
            sm_clock_mhz: v.sm_clock_mhz,
            memory_clock_mhz: v.memory_clock_mhz,
            processes: v
                .processes
                .iter()
                .map(|p| GpuProcessView {
                    pid: p.pid,
                    name: p.name.clone(),
                    memory_used_bytes: p.memory_used_bytes,
                })
                .collect(),
        })
        .collect();
    let now = nebula_protocol::time::UnixMillis::now().as_i64();
    let details = view.details.as_ref().map(|d| &d.containers);
    let containers = inv
        .containers
        .iter()
        .zip(&s.containers)
        .enumerate()
        .map(|(i, (c, v))| {
            let detail = details.and_then(|d| d.get(i));
            container_row(view.id, &view.name, c, v, detail, now)
        })
        .collect();
    Some(LatestSample {
        seq: s.seq,
        taken_at: rfc3339(i64::try_from(s.taken_at_ms).unwrap_or(0)),
        received_at: rfc3339(view.received_at_ms),
        host: s.host.clone(),
        os: inv.os.clone(),
        kernel: inv.kernel.clone(),
        container_runtime: inv.container_runtime.clone(),
        gpu_driver: inv.gpu_driver.clone(),
        disks,
        interfaces,
        gpus,
        containers,
    })
}

pub(super) async fn node_telemetry(
    State(cp): State<Arc<ControlPlane>>,
    Path(name): Path<String>,
    query: Result<Query<TelemetryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<NodeTelemetry>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let node = cp
        .store
        .node_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no node named `{name}`")))?;
    let since = parse_since(q.since.as_deref())?;
    let view = cp.telemetry.view(node.id);
    let latest = view.as_ref().and_then(sample_view);
    let resolution = q.resolution.as_deref().unwrap_or("raw");
    let points = match resolution {
        "raw" => {
            let since_s = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as u32)
                .unwrap_or(0);
            let history = cp.telemetry.history(node.id, since_s);
            Points::Raw(history.iter().map(Into::into).collect())
        }
        "1m" => {
            let rows = cp
                .store
                .rollups(node.id, crate::store::millis(since))
                .await?;
            Points::Minute(rows.iter().map(minute_point).collect())
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "resolution `{other}`: use raw or 1m"
            )))
        }
    };
    Ok(Json(NodeTelemetry {
        node: node.name,
        resolution: resolution.to_owned(),
        since: crate::store::rfc3339_seconds(since),
        latest,
        points,
    }))
}

fn minute_point(r: &crate::store::Rollup) -> MinutePoint {
    MinutePoint {
        t: rfc3339(r.minute),
        samples: r.samples,
        cpu_percent: r.cpu.into(),
        memory_used_bytes: r.mem_used.into(),
        load1: r.load1.into(),
        net_rx_bytes_per_sec: r.net_rx.into(),
        net_tx_bytes_per_sec: r.net_tx.into(),
        gpu_utilization_percent: r.gpu_util.map(Into::into),
        gpu_memory_used_bytes: r.gpu_mem_used.map(Into::into),
        gpu_temperature_c: r.gpu_temp.map(Into::into),
        containers_running: r.containers_running,
    }
}

#[cfg(test)]
mod input_tests {
    //! Whatever a client asks or an agent reports, the API's views never panic.

    use std::time::Duration;

    use nebula_protocol::telemetry::{
        ContainerInfo, ContainerSample, DiskInfo, GpuInfo, GpuSample, HostSample, NetRate,
        TelemetryInventory, TelemetrySample,
    };
    use proptest::prelude::*;

    use super::{container_row, parse_since, sample_view, summary};
    use crate::telemetry::TelemetryHub;

    fn extreme_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0),
            Just(u64::MAX),
            Just(u64::MAX / 2 + 1),
            any::<u64>()
        ]
    }

    fn extreme_i64() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(-1),
            Just(253_402_300_800),
            any::<i64>()
        ]
    }

    fn extreme_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(f32::MAX),
            any::<f32>()
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_since_strings_never_panic(s in ".{0,40}", n in any::<u64>(), unit in "(ns|us|ms|s|m|h|d|w|y|M)") {
            let _ = parse_since(Some(&s));
            if let Ok(t) = parse_since(Some(&format!("{n}{unit}"))) {
                let _ = crate::store::rfc3339_seconds(t);
            }
            if let Ok(t) = parse_since(Some(&s)) {
                let _ = crate::store::rfc3339_seconds(t);
                let _ = crate::store::rfc3339_millis(t);
            }
        }

        #[test]
        fn random_agent_numbers_never_panic_the_views(
            created in extreme_i64(),
            taken in extreme_u64(),
            big in proptest::collection::vec(extreme_u64(), 8),
            f in proptest::collection::vec(extreme_f32(), 5),
            restarts in any::<u32>(),
        ) {
            let hub = TelemetryHub::new(Duration::from_secs(60));
            let id = uuid::Uuid::now_v7();
            hub.register(id, "n1");
            let inv = TelemetryInventory {
                epoch: 1,
                disks: vec![DiskInfo { mount: "/".into(), filesystem: "ext4".into(), total_bytes: big[0] }],
                interfaces: vec!["a".into(), "b".into()],
                gpus: vec![
                    GpuInfo { uuid: "g0".into(), name: "x".into(), memory_total_bytes: big[1], power_limit_mw: Some(u32::MAX) },
                    GpuInfo { uuid: "g1".into(), name: "y".into(), memory_total_bytes: big[2], power_limit_mw: None },
                ],
                containers: vec![ContainerInfo { id: "c".into(), name: "c".into(), image: "i".into(), created_unix: created, ..Default::default() }],
                ..Default::default()
            };
            prop_assert!(hub.set_inventory(id, inv).is_ok());
            let gpu = |used: u64| GpuSample { utilization_percent: Some(u8::MAX), memory_used_bytes: Some(used), power_mw: Some(u32::MAX), ..Default::default() };
            let sample = TelemetrySample {
                epoch: 1,
                seq: 1,
                taken_at_ms: taken,
                host: HostSample {
                    cpu_percent: f[0],
                    per_core_percent: vec![f[1]],
                    load: [f[2], f[3], f[4]],
                    memory_used_bytes: big[3],
                    memory_total_bytes: big[4],
                    swap_used_bytes: big[5],
                    swap_total_bytes: big[6],
                    uptime_secs: big[7],
                },
                disks_used_bytes: vec![big[5]],
                interfaces: vec![
                    NetRate { rx_bytes_per_sec: big[3], tx_bytes_per_sec: big[4] },
                    NetRate { rx_bytes_per_sec: big[4], tx_bytes_per_sec: big[3] },
                ],
                gpus: vec![gpu(big[6]), gpu(big[7])],
                containers: vec![ContainerSample { restart_count: restarts, cpu_percent: Some(f[0]), memory_used_bytes: Some(big[0]), memory_limit_bytes: Some(big[1]), ..Default::default() }],
            };
            prop_assert!(hub.ingest(id, sample).is_ok());
            let view = hub.view(id).expect("registered");
            prop_assert!(summary(&view).is_some());
            let latest = sample_view(&view).expect("a sample");
            prop_assert!(!latest.containers[0].created.is_empty());
            prop_assert!(serde_json::to_string(&latest).is_ok());
            let inv = view.inventory.as_ref().expect("inventory");
            let s = view.latest.as_ref().expect("sample");
            let _ = container_row(uuid::Uuid::nil(), "n1", &inv.containers[0], &s.containers[0], None, 0);
            let _ = hub.free_vram(id);
            let _ = hub.history(id, 0);
        }
    }
}
