//! The monitor operations every front end calls: list with each node's state and uptime, one
//! with its recent results and hours, create and delete (monitors made through the API; the
//! map's own change with the map).

use nebula_types::api::monitors::{
    CreateMonitor, MonitorDetail, MonitorHour, MonitorNodeView, MonitorPoint, MonitorSeries,
    MonitorView,
};

use super::{MonitorDef, Source, Stats, HOUR_MS};
use crate::authz::{Change, Op, OpCtx};
use crate::store::monitors::MonitorRecord;
use crate::{ControlPlane, OpError};

fn rfc3339(ms: i64) -> String {
    crate::store::rfc3339_millis(crate::store::from_millis(ms))
}

fn now() -> i64 {
    nebula_protocol::time::UnixMillis::now().as_i64()
}

fn node_view(node: &str, s: Option<&Stats>, t: i64) -> MonitorNodeView {
    let last = s.and_then(|s| s.last.as_ref());
    MonitorNodeView {
        node: node.to_owned(),
        status: match last {
            None => "pending",
            Some(r) if r.up => "up",
            Some(_) => "down",
        }
        .into(),
        since: s.filter(|s| s.last.is_some()).map(|s| rfc3339(s.since_ms)),
        last_check: last.map(|r| rfc3339(r.at_ms)),
        latency_ms: last.map(|r| r.latency_us as f64 / 1000.0),
        http_status: last.and_then(|r| r.status),
        method: last.and_then(|r| r.method.clone()),
        error: last.and_then(|r| r.error.clone()),
        certificate_expires: last.and_then(|r| r.cert_expires_ms).map(rfc3339),
        uptime_24h: s.and_then(|s| s.uptime(t, 24)),
        uptime_7d: s.and_then(|s| s.uptime(t, 7 * 24)),
        uptime_30d: s.and_then(|s| s.uptime(t, 30 * 24)),
    }
}

impl ControlPlane {
    fn monitor_view(&self, d: &MonitorDef, t: i64) -> MonitorView {
        let nodes: Vec<MonitorNodeView> = d
            .nodes
            .iter()
            .map(|n| node_view(n, self.monitors.stats(&d.name, n).as_ref(), t))
            .collect();
        let status = if nodes.is_empty() {
            "idle"
        } else if nodes.iter().any(|n| n.status == "down") {
            "down"
        } else if nodes.iter().all(|n| n.status == "up") {
            "up"
        } else {
            "pending"
        };
        MonitorView {
            name: d.name.clone(),
            kind: d.monitor.check.kind().into(),
            target: d.monitor.check.target(),
            source: d.source.as_str().into(),
            service: d.monitor.service.clone(),
            interval_secs: d.monitor.interval.as_secs(),
            timeout_secs: d.monitor.timeout.as_secs_f64(),
            created_by: d.created_by.clone(),
            status: status.into(),
            nodes,
        }
    }

    /// Every monitor, down ones first, then by name.
    pub fn monitors_list(&self, cx: &OpCtx) -> Result<Vec<MonitorView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let t = now();
        let mut out: Vec<MonitorView> = self
            .monitors
            .defs()
            .values()
            .map(|d| self.monitor_view(d, t))
            .collect();
        out.sort_by_key(|m| (m.status != "down", m.name.clone()));
        Ok(out)
    }

    pub fn monitor_detail(&self, cx: &OpCtx, name: &str) -> Result<MonitorDetail, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let defs = self.monitors.defs();
        let d = defs
            .get(name)
            .ok_or_else(|| OpError::NotFound(format!("no monitor named `{name}`")))?;
        let t = now();
        let series = d
            .nodes
            .iter()
            .map(|n| {
                let s = self.monitors.stats(name, n).unwrap_or_default();
                MonitorSeries {
                    node: n.clone(),
                    recent: s
                        .recent
                        .iter()
                        .map(|p| MonitorPoint {
                            at_ms: p.at_ms,
                            up: p.up,
                            latency_ms: p.latency_us as f64 / 1000.0,
                        })
                        .collect(),
                    hours: s
                        .hours
                        .iter()
                        .map(|h| MonitorHour {
                            hour_ms: h.hour * HOUR_MS,
                            checks: h.checks,
                            up: h.up,
                            latency_avg_ms: h.latency_sum_us as f64
                                / h.checks.max(1) as f64
                                / 1000.0,
                            latency_max_ms: h.latency_max_us as f64 / 1000.0,
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(MonitorDetail {
            monitor: self.monitor_view(d, t),
            series,
        })
    }

    /// Add a monitor (or replace one made through the API). Its nodes must be enrolled.
    pub async fn create_monitor(
        &self,
        cx: &OpCtx,
        req: CreateMonitor,
    ) -> Result<MonitorView, OpError> {
        self.authorize(cx, Op::ManageAlerts)?;
        if !nebula_protocol::valid_name(&req.name) {
            return Err(OpError::Invalid(format!(
                "`{}` is not a valid monitor name: use 1-63 letters, digits, '-', '_' or '.'",
                req.name
            )));
        }
        if let Some(d) = self.monitors.defs().get(&req.name) {
            if d.source != Source::Api {
                return Err(OpError::Conflict(format!(
                    "monitor `{}` comes from the {}; change it there",
                    req.name,
                    if d.source == Source::Map {
                        "service map"
                    } else {
                        "built-ins"
                    }
                )));
            }
        }
        let names: std::collections::HashSet<String> = self
            .store
            .list_nodes()
            .await?
            .into_iter()
            .map(|n| n.name)
            .collect();
        nebula_desired::map::monitors::monitor(&req.monitor, &|n| names.contains(n))
            .map_err(|e| OpError::Invalid(format!("monitor `{}`: {e}", req.name)))?;
        let (api_count, exists) = {
            let api = self.monitors.api.read().unwrap_or_else(|p| p.into_inner());
            (api.len(), api.iter().any(|m| m.name == req.name))
        };
        if !exists && api_count >= nebula_desired::map::monitors::MAX_MONITORS {
            return Err(OpError::Conflict("too many monitors".into()));
        }
        let rec = MonitorRecord {
            name: req.name.clone(),
            spec: serde_json::to_string(&req.monitor).unwrap_or_default(),
            created_by: cx.actor.clone(),
            created_at: now(),
        };
        self.store.put_monitor(&rec).await?;
        self.reload_api_monitors().await?;
        self.record(
            cx,
            Change {
                action: "monitor.create",
                target: req.name.clone(),
                detail: serde_json::to_value(&req.monitor).unwrap_or_default(),
                event: None,
            },
        );
        let defs = self.monitors.defs();
        let d = defs
            .get(&req.name)
            .ok_or_else(|| OpError::NotFound(format!("monitor `{}` vanished", req.name)))?;
        Ok(self.monitor_view(d, now()))
    }

    pub async fn delete_monitor(&self, cx: &OpCtx, name: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageAlerts)?;
        if !self.store.delete_monitor(name).await? {
            let why = match self.monitors.defs().get(name).map(|d| d.source) {
                Some(Source::Map) => "comes from the service map; remove it there",
                Some(Source::BuiltIn) => {
                    "is built in (`[monitors] builtin = false` turns those off)"
                }
                _ => "does not exist",
            };
            return Err(OpError::NotFound(format!("monitor `{name}` {why}")));
        }
        self.reload_api_monitors().await?;
        self.record(
            cx,
            Change {
                action: "monitor.delete",
                target: name.to_owned(),
                detail: serde_json::json!({}),
                event: None,
            },
        );
        Ok(())
    }

    /// Read the API's monitors again and work the sets out now.
    async fn reload_api_monitors(&self) -> Result<(), OpError> {
        let recs = self.store.monitors().await?;
        *self.monitors.api.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(recs);
        if let Err(e) = super::assign(self).await {
            tracing::warn!("assigning monitors: {e:#}");
            self.monitors.assign_now.activate();
        }
        Ok(())
    }
}
