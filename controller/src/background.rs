//! The controller's background tasks: what each is, where it runs, and the work of the small
//! periodic ones. [`register`] puts them all on the [`tasks::Driver`]; ARCHITECTURE.md's task
//! table lists the same names (a test holds the two together).

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;
use tokio_util::task::TaskTracker;

use crate::store::{self, millis};
use crate::tasks::{self, Scope, TaskDef, Trigger};
use crate::{desired, jobs, transport, wake, ControlPlane};

pub const JOB_WRITER: TaskDef = TaskDef {
    name: "job-writer",
    description: "writes job state changes, logs and audit rows in group commits",
    scope: Scope::EveryReplica,
};
pub const JOB_SCHEDULER: TaskDef = TaskDef {
    name: "job-scheduler",
    description: "routes queued jobs to nodes, retries, expires leases and deadlines",
    scope: Scope::Leader,
};
pub const RECONCILER: TaskDef = TaskDef {
    name: "reconciler",
    description: "plans the service map against what runs and starts deploys and model pulls",
    scope: Scope::Leader,
};
pub const MAP_WATCH: TaskDef = TaskDef {
    name: "service-map-watch",
    description: "applies service-map.yml when the file changes (last good map kept)",
    scope: Scope::Leader,
};
pub const WAKE_WATCH: TaskDef = TaskDef {
    name: "wake-watch",
    description: "ends wake-ups when the node comes online, fails those past their timeout",
    scope: Scope::Leader,
};
pub const RELEASE_SCAN: TaskDef = TaskDef {
    name: "release-scan",
    description: "finds agent binaries dropped into the agent directory and signs them",
    scope: Scope::EveryReplica,
};
pub const QUIC_LISTENER: TaskDef = TaskDef {
    name: "quic-listener",
    description: "accepts agent connections: enrollment and sessions over QUIC with mutual TLS",
    scope: Scope::EveryReplica,
};
pub const ROLLUP_WRITER: TaskDef = TaskDef {
    name: "rollup-writer",
    description: "writes finished one-minute telemetry rollups in batches",
    scope: Scope::EveryReplica,
};
pub const USAGE_WRITER: TaskDef = TaskDef {
    name: "usage-writer",
    description: "adds the AI gateway's usage counters to the store",
    scope: Scope::EveryReplica,
};
pub const RETENTION: TaskDef = TaskDef {
    name: "retention-sweeper",
    description: "deletes telemetry rollups past the retention window",
    scope: Scope::Leader,
};
pub const LEADER_ELECTION: TaskDef = TaskDef {
    name: "leader-election",
    description:
        "takes or renews the leader lease (replicas on PostgreSQL); stops at once on SQLite",
    scope: Scope::EveryReplica,
};
pub const EVENT_FANOUT: TaskDef = TaskDef {
    name: "event-fanout",
    description:
        "passes events between replicas as PostgreSQL notifications (resync after a gap); \
                  stops at once on SQLite",
    scope: Scope::EveryReplica,
};
pub const SESSION_BALANCE: TaskDef = TaskDef {
    name: "session-balance",
    description: "moves a few agent sessions at a time to replicas holding fewer than their \
                  share; idle on SQLite",
    scope: Scope::Leader,
};
pub const BACKUP: TaskDef = TaskDef {
    name: "backup-scheduler",
    description: "writes a backup into [backup] dir every interval and keeps the newest ones",
    scope: Scope::Leader,
};
pub const ALERT_EVALUATOR: TaskDef = TaskDef {
    name: "alert-evaluator",
    description: "evaluates the alert rules and queues their notifications",
    scope: Scope::Leader,
};
pub const ALERT_SENDER: TaskDef = TaskDef {
    name: "alert-sender",
    description: "delivers queued notifications to their sinks, with retries",
    scope: Scope::Leader,
};
pub const MONITOR_ASSIGN: TaskDef = TaskDef {
    name: "monitor-assign",
    description: "works out which monitors each node runs (sessions send changed sets)",
    scope: Scope::EveryReplica,
};
pub const MONITOR_WRITER: TaskDef = TaskDef {
    name: "monitor-writer",
    description: "adds monitor results, counted per hour, to the store",
    scope: Scope::EveryReplica,
};
pub const WORKFLOW_DRIVER: TaskDef = TaskDef {
    name: "workflow-driver",
    description: "advances workflow runs: starts steps as jobs, applies their outcomes, retries",
    scope: Scope::Leader,
};
pub const WORKFLOWS_WATCH: TaskDef = TaskDef {
    name: "workflows-watch",
    description: "loads workflows.yml at start and when the file changes (last good set kept)",
    scope: Scope::Leader,
};
pub const WORKFLOW_TRIGGERS: TaskDef = TaskDef {
    name: "workflow-triggers",
    description: "starts workflow runs on their schedules and on the fleet's events",
    scope: Scope::Leader,
};
pub const HTTP_SERVER: TaskDef = TaskDef {
    name: "http-server",
    description: "serves the API, the dashboard and the AI gateway",
    scope: Scope::EveryReplica,
};
pub const HTTPS_CERTIFICATE: TaskDef = TaskDef {
    name: "https-certificate",
    description: "keeps the HTTP listener's certificate current (files reloaded, renewals)",
    scope: Scope::EveryReplica,
};
pub const HTTP_REDIRECT: TaskDef = TaskDef {
    name: "http-redirect",
    description: "answers plain HTTP with a redirect to HTTPS",
    scope: Scope::EveryReplica,
};

/// Every task but the job writer (started first, so that recovery can write through it).
pub fn register(
    d: &mut tasks::Driver,
    cp: &Arc<ControlPlane>,
    endpoint: quinn::Endpoint,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    redirect: Option<(tokio::net::TcpListener, axum::Router)>,
    tracker: &TaskTracker,
) {
    let c = cp.clone();
    d.periodic_with(
        JOB_SCHEDULER,
        jobs::SCHEDULER_PERIOD,
        cp.jobs.kick.clone(),
        false,
        move |trigger| {
            let cp = c.clone();
            async move { jobs::schedule_pass(&cp, trigger).await }
        },
    );
    let c = cp.clone();
    d.service(RECONCILER, move |cx| desired::reconciler(c.clone(), cx));
    let c = cp.clone();
    d.service(MAP_WATCH, move |cx| {
        desired::watch_file(c.clone(), cx.cancel)
    });
    let c = cp.clone();
    d.service(WAKE_WATCH, move |cx| wake::wake_watch(c.clone(), cx.cancel));
    let c = cp.clone();
    d.periodic(
        RELEASE_SCAN,
        cp.config
            .release_scan_interval
            .max(std::time::Duration::from_millis(100)),
        false,
        move |_| {
            let cp = c.clone();
            async move { crate::releases::rescan_once(&cp).await }
        },
    );
    // Services start once per scope; the listener and the router are handed over to the
    // first (and, being every-replica tasks, only) start.
    let c = cp.clone();
    let t = tracker.clone();
    let mut endpoint = Some(endpoint);
    d.service(QUIC_LISTENER, move |cx| {
        let endpoint = endpoint.take();
        let (cp, tracker) = (c.clone(), t.clone());
        async move {
            if let Some(endpoint) = endpoint {
                transport::accept_loop(cp, endpoint, cx.cancel, tracker).await;
            }
        }
    });
    let c = cp.clone();
    d.periodic(
        ROLLUP_WRITER,
        cp.config.rollup_flush_interval,
        true,
        move |trigger| {
            let cp = c.clone();
            async move { Ok(write_rollups(&cp, trigger).await) }
        },
    );
    let c = cp.clone();
    d.periodic(
        USAGE_WRITER,
        cp.config.ai.usage_flush_interval,
        true,
        move |_| {
            let cp = c.clone();
            async move { Ok(write_usage(&cp).await) }
        },
    );
    let c = cp.clone();
    d.periodic(
        RETENTION,
        cp.config.retention_sweep_interval,
        false,
        move |_| {
            let cp = c.clone();
            async move { sweep(&cp).await }
        },
    );
    register_replicas(d, cp);
    let c = cp.clone();
    d.periodic(BACKUP, cp.config.backup.interval, false, move |trigger| {
        let cp = c.clone();
        async move { crate::backup::run_scheduled(&cp, trigger).await }
    });
    let c = cp.clone();
    d.periodic(
        ALERT_EVALUATOR,
        cp.config.alerts.evaluate_interval,
        false,
        move |_| {
            let cp = c.clone();
            async move { crate::alerts::evaluate(&cp).await }
        },
    );
    let c = cp.clone();
    d.periodic_with(
        ALERT_SENDER,
        std::time::Duration::from_secs(1),
        cp.alerts.send_now.clone(),
        false,
        move |_| {
            let cp = c.clone();
            async move { crate::alerts::sinks::send_due(&cp).await }
        },
    );
    let c = cp.clone();
    d.periodic_with(
        MONITOR_ASSIGN,
        cp.config.monitors.assign_interval,
        cp.monitors.assign_now.clone(),
        false,
        move |_| {
            let cp = c.clone();
            async move { crate::monitors::assign(&cp).await }
        },
    );
    let c = cp.clone();
    d.periodic(
        MONITOR_WRITER,
        cp.config.monitors.flush_interval,
        true,
        move |_| {
            let cp = c.clone();
            async move { crate::monitors::flush(&cp).await }
        },
    );
    let c = cp.clone();
    d.service(WORKFLOW_DRIVER, move |cx| {
        crate::workflows::drive(c.clone(), cx.cancel)
    });
    let c = cp.clone();
    d.service(WORKFLOWS_WATCH, move |cx| {
        crate::workflows::watch_file(c.clone(), cx.cancel)
    });
    let c = cp.clone();
    d.service(WORKFLOW_TRIGGERS, move |cx| {
        crate::workflows::triggers::run(c.clone(), cx.cancel)
    });
    register_http(d, cp, listener, router, redirect, tracker);
}

/// What replicas on PostgreSQL run: the election, the events' fan-out, spreading sessions.
fn register_replicas(d: &mut tasks::Driver, cp: &Arc<ControlPlane>) {
    let c = cp.clone();
    d.service(LEADER_ELECTION, move |cx| {
        let cp = c.clone();
        c.ha.clone()
            .run(c.store.clone(), c.config.ha.clone(), cx.cancel, move || {
                let cp = cp.clone();
                async move { cp.take_over().await }
            })
    });
    let c = cp.clone();
    d.service(EVENT_FANOUT, move |cx| {
        crate::events::fanout(c.clone(), cx.cancel)
    });
    let c = cp.clone();
    let balancer = Arc::new(transport::balance::Balancer::default());
    d.periodic(
        SESSION_BALANCE,
        cp.config.ha.balance_interval,
        false,
        move |_| {
            let (cp, balancer) = (c.clone(), balancer.clone());
            async move { balancer.pass(&cp).await }
        },
    );
}

/// The HTTP listener, and with HTTPS its certificate keeper and the plain redirect listener.
fn register_http(
    d: &mut tasks::Driver,
    cp: &Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    redirect: Option<(tokio::net::TcpListener, axum::Router)>,
    tracker: &TaskTracker,
) {
    let tls = cp.https.as_ref().map(|h| h.acceptor.clone());
    http_service(d, HTTP_SERVER, cp, (listener, router), tls, tracker);
    if let Some(https) = cp.https.clone() {
        let c = cp.clone();
        d.service(HTTPS_CERTIFICATE, move |cx| {
            crate::https::keep_current(c.clone(), https.clone(), cx.cancel)
        });
    }
    if let Some(plain) = redirect {
        http_service(d, HTTP_REDIRECT, cp, plain, None, tracker);
    }
}

/// One HTTP listener as a service (TLS when `tls` is given), under the HTTP limits.
fn http_service(
    d: &mut tasks::Driver,
    def: TaskDef,
    cp: &Arc<ControlPlane>,
    serve: (tokio::net::TcpListener, axum::Router),
    tls: Option<tokio_rustls::TlsAcceptor>,
    tracker: &TaskTracker,
) {
    let c = cp.clone();
    let t = tracker.clone();
    let mut serve = Some(serve);
    d.service(def, move |cx| {
        let serve = serve.take();
        let (cp, tracker, tls) = (c.clone(), t.clone(), tls.clone());
        async move {
            if let Some((listener, router)) = serve {
                crate::http::server::serve(
                    listener,
                    router,
                    cp.config.http_limits.clone(),
                    tls,
                    cx.cancel,
                    tracker,
                )
                .await;
            }
        }
    });
}

/// Write finished one-minute rollups in one batch; on the way out, the open minutes too. A
/// failed batch goes back to be written next time.
async fn write_rollups(cp: &ControlPlane, trigger: Trigger) -> serde_json::Value {
    let stopping = trigger == Trigger::Stopping;
    let now = millis(SystemTime::now()) + if stopping { 60_000 } else { 0 };
    let batch = cp.telemetry.take_rollups(now);
    if batch.is_empty() {
        return json!({ "rows": 0 });
    }
    let started = std::time::Instant::now();
    match cp.store.insert_rollups(&batch).await {
        Ok(()) => {
            cp.metrics
                .store_write_seconds
                .observe(started.elapsed().as_secs_f64());
            json!({ "rows": batch.len() })
        }
        Err(e) => {
            let rows = batch.len();
            tracing::warn!(
                rows,
                "writing telemetry rollups failed (will retry): {:#}",
                anyhow::Error::from(e)
            );
            cp.telemetry.requeue(batch);
            json!({ "rows": 0, "requeued": rows })
        }
    }
}

/// Add the AI usage counted in memory to the store; a failed batch is counted again.
async fn write_usage(cp: &ControlPlane) -> serde_json::Value {
    let batch = cp.ai.take_usage();
    if batch.is_empty() {
        return json!({ "rows": 0 });
    }
    let rows: Vec<store::UsageRow> = batch
        .iter()
        .map(|((token, model, node), u)| store::UsageRow {
            token: token.clone(),
            model: model.clone(),
            node: node.clone(),
            requests: i64::try_from(u.requests).unwrap_or(i64::MAX),
            prompt_tokens: i64::try_from(u.prompt_tokens).unwrap_or(i64::MAX),
            completion_tokens: i64::try_from(u.completion_tokens).unwrap_or(i64::MAX),
        })
        .collect();
    match cp.store.add_ai_usage(&rows).await {
        Ok(()) => json!({ "rows": rows.len() }),
        Err(e) => {
            tracing::warn!(
                rows = rows.len(),
                "writing AI usage failed (will retry): {:#}",
                anyhow::Error::from(e)
            );
            cp.ai.requeue_usage(batch);
            json!({ "rows": 0, "requeued": rows.len() })
        }
    }
}

/// Delete rollups older than the retention window.
async fn sweep(cp: &ControlPlane) -> anyhow::Result<serde_json::Value> {
    let hour = millis(SystemTime::now()) / 3_600_000;
    let hours = cp
        .store
        .prune_monitor_hours(hour - crate::monitors::KEEP_DAYS * 24)
        .await?;
    let cutoff = millis(SystemTime::now() - cp.config.rollup_retention);
    let fence = cp.ha.fence()?;
    let n = cp
        .store
        .delete_rollups_before(fence.as_ref(), cutoff)
        .await?;
    if n > 0 {
        tracing::info!(
            rows = n,
            "deleted telemetry rollups past the retention window"
        );
    }
    Ok(json!({ "deleted": n, "monitor_hours_deleted": hours }))
}
