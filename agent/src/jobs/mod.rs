//! Jobs on the agent: one QUIC stream per job, a journal so that nothing runs twice, and a bound
//! on how many run at once.
//!
//! Tasks: [`JobRunner::serve`] runs once per job stream the controller opens (spawned by the
//! session loop); it answers from the journal, or attaches to the run already in progress, or
//! starts a new run on the runner's [`TaskTracker`]. A run outlives its stream: when the
//! connection drops, the run goes on, its log lines are kept (the newest [`KEPT_LINES`]) and its
//! result goes to the journal, and the controller's next delivery of the same job attaches to it
//! or reads the result. Runs wait for one of `jobs.max_concurrent` slots (a semaphore) before
//! they start. Each run publishes its progress through a `watch` counter that the streams
//! attached to it follow.

use nebula_protocol::time::UnixMillis;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use nebula_protocol::jobs::{
    decode_request, DecodedControl, JobControl, JobEvent, JobRequest, JobResult, JobSpec,
    JobStatus, LogLine, LogStream, MAX_LOG_LINE,
};
use nebula_protocol::{self as proto, FrameError, NodeFacts};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{DeployConfig, DockerConfig, ExecConfig, JobsConfig};
use deploy::Extras;

pub mod container;
pub mod deploy;
pub mod exec;
pub mod http;
pub mod inventory;
pub mod journal;
pub mod model;
pub mod probe;
pub mod storage;
pub mod wake;

#[cfg(test)]
mod fenced_tests;

pub use journal::{Journal, RunKey};

/// The cancel reason of runs stopped because the agent stops: they end `Interrupted`, so the
/// controller treats them as lost (and retries idempotent ones), not as cancelled by a person.
const AGENT_STOPPING: &str = "the agent is stopping";

/// Log lines kept per run for streams that attach later.
pub const KEPT_LINES: usize = 10_000;
/// Log streams served at once (each holds one batch of lines and a runtime connection).
pub const MAX_LOG_STREAMS: usize = 64;
/// Interactive commands served at once.
pub const MAX_EXEC_STREAMS: usize = 32;
/// Largest frame accepted on a job stream from the controller.
const MAX_CONTROL_FRAME: usize = 1024 * 1024;
/// Largest first frame of a stream: an inference request carries its client's body (a long
/// prompt, an image for img2img) in it.
const MAX_FIRST_FRAME: usize = proto::DEFAULT_MAX_FRAME;

/// What the runner needs to know about its host.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub jobs: JobsConfig,
    pub exec: ExecConfig,
    /// What deploys may ask of the container runtime here.
    pub deploy: DeployConfig,
    /// How far the controller reaches into containers here, and the runtime's socket.
    pub docker: DockerConfig,
    pub repo_dirs: Vec<PathBuf>,
    pub facts: NodeFacts,
    /// This node's id (from its certificate): deploys for another node's containers are refused.
    pub node_id: Option<uuid::Uuid>,
    /// Inference backends, for inference streams (none: they are refused).
    pub ai: Option<Arc<crate::ai::Backends>>,
}

impl RunnerConfig {
    /// Every setting at its default, for a host with these facts and this node id (tests, the
    /// bench's simulated agents).
    pub fn defaults(facts: NodeFacts, node_id: Option<uuid::Uuid>) -> Self {
        RunnerConfig {
            jobs: JobsConfig::default(),
            exec: ExecConfig::default(),
            deploy: DeployConfig::default(),
            docker: DockerConfig::default(),
            repo_dirs: Vec::new(),
            facts,
            node_id,
            ai: None,
        }
    }
}

/// Runs jobs for one agent.
pub struct JobRunner {
    config: RunnerConfig,
    state: Mutex<RunnerState>,
    slots: Arc<Semaphore>,
    log_streams: Arc<Semaphore>,
    exec_streams: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The highest leader term seen (shared with the session): a fenced job of a lower term
    /// is refused.
    pub terms: Arc<crate::term::Terms>,
}

struct RunnerState {
    journal: Journal,
    running: HashMap<RunKey, Arc<Running>>,
    service_locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner")
            .field("slots", &self.slots.available_permits())
            .finish()
    }
}

/// Why a run was stopped before it ended by itself.
#[derive(Debug, Clone)]
pub enum Stop {
    Cancelled(String),
    Deadline,
}

/// One run in progress.
pub struct Running {
    log: Mutex<RunLog>,
    changed: watch::Sender<u64>,
    cancel: CancellationToken,
    cancel_reason: Mutex<Option<String>>,
}

#[derive(Default)]
struct RunLog {
    /// The latest progress: a counter that changes with it, the percentage and a message.
    progress: Option<(u64, f32, String)>,
    lines: VecDeque<LogLine>,
    next_seq: u64,
    started: bool,
    result: Option<JobResult>,
}

impl Running {
    fn new() -> Arc<Self> {
        Arc::new(Running {
            log: Mutex::new(RunLog::default()),
            changed: watch::channel(0).0,
            cancel: CancellationToken::new(),
            cancel_reason: Mutex::new(None),
        })
    }

    fn update(&self, f: impl FnOnce(&mut RunLog)) {
        f(&mut self.log.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.send_modify(|v| *v += 1);
    }

    fn cancel(&self, reason: String) {
        self.cancel_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason);
        self.cancel.cancel();
    }

    fn progress(&self) -> Option<(u64, f32, String)> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .progress
            .clone()
    }

    /// Lines from `from` on, whether the run started, and its result if it ended.
    fn read_from(&self, from: u64) -> (Vec<LogLine>, bool, Option<JobResult>) {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let lines = log
            .lines
            .iter()
            .filter(|l| l.seq >= from)
            .cloned()
            .collect();
        (lines, log.started, log.result.clone())
    }
}

/// What a job's work sees: where to write its log, and when to stop.
pub struct JobContext {
    running: Arc<Running>,
    deadline: Option<tokio::time::Instant>,
    /// The container runtime's socket from the agent's config (`None`: look for one).
    docker_socket: Option<String>,
}

impl JobContext {
    /// A client for this host's container runtime.
    pub fn docker(&self) -> Result<bollard::Docker, String> {
        crate::docker::connect(self.docker_socket.as_deref())
            .map_err(|e| format!("no container runtime reachable: {e}"))
    }

    pub fn log(&self, stream: LogStream, line: String) {
        // Text columns (PostgreSQL) and terminals take no NUL bytes.
        let mut line = if line.contains('\0') {
            line.replace('\0', "\u{FFFD}")
        } else {
            line
        };
        if line.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str(" [line cut]");
        }
        let at_unix_ms = UnixMillis::now().as_i64();
        self.running.update(|log| {
            let seq = log.next_seq;
            log.next_seq += 1;
            log.lines.push_back(LogLine {
                seq,
                at_unix_ms,
                stream,
                line,
            });
            if log.lines.len() > KEPT_LINES {
                log.lines.pop_front();
            }
        });
    }

    /// One figure for the whole job (0-100) and what it is doing; sent as `Progress` events
    /// (the latest wins when they come faster than they can be sent).
    pub fn progress(&self, percent: f32, message: String) {
        self.running.update(|log| {
            let n = log.progress.as_ref().map_or(0, |p| p.0 + 1);
            log.progress = Some((n, percent.clamp(0.0, 100.0), message));
        });
    }

    /// Resolves when the job must stop: cancelled, or its deadline passed.
    pub async fn stopped(&self) -> Stop {
        let deadline = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.running.cancel.cancelled() => Stop::Cancelled(
                self.running
                    .cancel_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "cancelled".into()),
            ),
            _ = deadline => Stop::Deadline,
        }
    }
}

impl JobRunner {
    /// Open the journal under `state_dir` and get ready to run jobs.
    pub fn new(config: RunnerConfig, state_dir: &std::path::Path) -> std::io::Result<Arc<Self>> {
        // Probes and health gates use reqwest, which takes rustls' process-wide provider: make
        // sure there is one (ring), once for every job (installing twice is a harmless error).
        crate::tls::install_provider();
        std::fs::create_dir_all(state_dir)?;
        let journal = Journal::open(&state_dir.join("jobs.journal"), config.jobs.journal_entries)?;
        Ok(Arc::new(JobRunner {
            slots: Arc::new(Semaphore::new(config.jobs.max_concurrent.max(1))),
            log_streams: Arc::new(Semaphore::new(MAX_LOG_STREAMS)),
            exec_streams: Arc::new(Semaphore::new(MAX_EXEC_STREAMS)),
            config,
            state: Mutex::new(RunnerState {
                journal,
                running: HashMap::new(),
                service_locks: HashMap::new(),
            }),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            terms: Arc::default(),
        }))
    }

    /// The lock a service's deploys and undeploys take on this node.
    fn service_lock(&self, service: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut st = self.lock();
        // Locks nobody holds or waits for go (a service removed from the map).
        st.service_locks.retain(|_, l| Arc::strong_count(l) > 1);
        st.service_locks
            .entry(service.to_owned())
            .or_default()
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunnerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs in progress now.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    /// Serve one job stream opened by the controller, on the runner's tracker.
    pub fn spawn_stream(self: &Arc<Self>, send: quinn::SendStream, recv: quinn::RecvStream) {
        let runner = self.clone();
        self.tracker
            .spawn(async move { runner.serve(send, recv).await });
    }

    /// Stop every run (they end as cancelled, "agent stopping", in the journal) and wait for
    /// them and their streams.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let running: Vec<Arc<Running>> = self.lock().running.values().cloned().collect();
        for r in running {
            r.cancel(AGENT_STOPPING.into());
        }
        self.tracker.close();
        self.tracker.wait().await;
        if let Err(e) = self.lock().journal.flush() {
            warn!("writing the job journal: {e}");
        }
    }

    /// Serve one job stream: read the request, answer it from the journal or run it, and
    /// forward the run's events until it ends or the stream goes away.
    pub async fn serve(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let first = tokio::time::timeout(
            Duration::from_secs(10),
            proto::read_frame(&mut recv, MAX_FIRST_FRAME),
        )
        .await;
        let payload = match first {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                debug!("job stream without a request: {e}");
                return;
            }
            Err(_) => return,
        };
        let req = match decode_request(&payload) {
            Ok(DecodedControl::Control(JobControl::Request(r))) => r,
            Ok(DecodedControl::Control(JobControl::Fenced { term, request })) => {
                match self.terms.admit(term) {
                    Ok(_) => request,
                    Err(why) => {
                        warn!(job = %request.id, term, "refusing a job from a deposed leader: {why}");
                        refuse(&mut send, JobStatus::Refused, why).await;
                        return;
                    }
                }
            }
            Ok(DecodedControl::UnknownKind { header, kind, term }) => {
                warn!(job = %header.id, kind, "refusing a job of a kind this agent does not know");
                if let Some(Err(why)) = term.map(|t| self.terms.admit(t)) {
                    refuse(&mut send, JobStatus::Refused, why).await;
                    return;
                }
                let why = format!(
                    "job kind #{kind} is not supported by nebula-agent {}; upgrade the agent",
                    crate::version()
                );
                refuse(&mut send, JobStatus::Refused, why).await;
                return;
            }
            Ok(DecodedControl::Control(JobControl::Infer(r))) => {
                match &self.config.ai {
                    Some(b) => crate::ai::serve_infer(r, send, b.clone()).await,
                    None => {
                        let _ = proto::write_message(
                            &mut send,
                            &nebula_protocol::ai::InferEvent::Error {
                                message: "this agent serves no inference".into(),
                                timeout: false,
                            },
                        )
                        .await;
                        let _ = send.finish();
                    }
                }
                return;
            }
            Ok(DecodedControl::Control(JobControl::Logs(r))) => {
                // Each follower holds a batch and the runtime's log connection: bounded.
                match self.log_streams.clone().try_acquire_owned() {
                    Ok(_permit) => {
                        crate::logs::serve(r, send, &self.config.docker, self.config.node_id).await
                    }
                    Err(_) => {
                        let message = format!(
                            "this node already serves {MAX_LOG_STREAMS} log streams; try again later"
                        );
                        let ev = nebula_protocol::containers::LogEvent::Error { message };
                        let _ = proto::write_message(&mut send, &ev).await;
                        let _ = send.finish();
                    }
                }
                return;
            }
            Ok(DecodedControl::Control(JobControl::Exec(r))) => {
                match self.exec_streams.clone().try_acquire_owned() {
                    Ok(_permit) => {
                        crate::shell::serve(r, send, recv, &self.config.docker, self.config.node_id)
                            .await
                    }
                    Err(_) => {
                        let message = format!(
                            "this node already runs {MAX_EXEC_STREAMS} interactive commands; try again later"
                        );
                        let ev = nebula_protocol::containers::ExecOutput::Error { message };
                        let _ = proto::write_message(&mut send, &ev).await;
                        let _ = send.finish();
                    }
                }
                return;
            }
            Ok(DecodedControl::Control(JobControl::Cancel { .. })) | Err(_) => {
                debug!("job stream opened with something other than a request");
                let _ = send.reset(1u32.into());
                return;
            }
        };
        let span = tracing::debug_span!("job", id = %req.id, attempt = req.attempt, kind = req.spec.kind());
        self.serve_request(req, send, recv).instrument(span).await;
    }

    async fn serve_request(
        self: Arc<Self>,
        req: JobRequest,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let key = RunKey {
            id: req.id,
            attempt: req.attempt,
        };
        let attached = {
            let mut st = self.lock();
            if let Some(r) = st.running.get(&key) {
                Ok((r.clone(), true))
            } else {
                match st.journal.get(&key).cloned() {
                    Some(journal::Entry::Finished(result)) => Err(result),
                    Some(journal::Entry::Started { .. }) => {
                        // Started before this agent restarted, never finished: do not run it
                        // again (it may have changed the host halfway).
                        let result = JobResult::new(
                            JobStatus::Interrupted,
                            Some(
                                "the agent restarted while this job ran; it was not run again"
                                    .into(),
                            ),
                        );
                        if let Err(e) = st.journal.finished(key, &result, true) {
                            warn!("writing the job journal: {e}");
                        }
                        Err(result)
                    }
                    None => {
                        let durable = !req.spec.is_read_only();
                        match st.journal.started(key, req.spec.kind(), durable) {
                            Ok(()) => {
                                let running = Running::new();
                                st.running.insert(key, running.clone());
                                let runner = self.clone();
                                let req = req.clone();
                                let r = running.clone();
                                self.tracker.spawn(
                                    async move { runner.execute(key, req, r).await }
                                        .in_current_span(),
                                );
                                Ok((running, false))
                            }
                            Err(e) => Err(JobResult::new(
                                JobStatus::Failed,
                                Some(format!("cannot write the job journal: {e}")),
                            )),
                        }
                    }
                }
            }
        };
        let (running, resumed) = match attached {
            Ok(a) => a,
            Err(result) => {
                let _ = write_events(
                    &mut send,
                    &[
                        JobEvent::Accepted { resumed: true },
                        JobEvent::Finished(result),
                    ],
                )
                .await;
                let _ = send.finish();
                return;
            }
        };
        if resumed {
            debug!(
                logs_from = req.logs_from,
                "job delivered again; attaching to the run"
            );
        }
        // A quick job (a noop, a refusal) is often over after one yield: its acknowledgement and
        // result then leave in one packet.
        if !resumed {
            tokio::task::yield_now().await;
        }
        let mut changed = running.changed.subscribe();
        let mut cursor = req.logs_from;
        let mut told_started = false;
        let mut told_progress: Option<u64> = None;
        let mut pending = vec![JobEvent::Accepted { resumed }];
        let mut reading = true;
        let mut frames = proto::FrameReader::new(MAX_CONTROL_FRAME);
        loop {
            changed.borrow_and_update();
            let (lines, started, result) = running.read_from(cursor);
            if started && !told_started {
                told_started = true;
                pending.push(JobEvent::Started);
            }
            if let Some(last) = lines.last() {
                cursor = last.seq + 1;
            }
            pending.extend(lines.into_iter().map(JobEvent::Log));
            if let Some((n, percent, message)) = running.progress() {
                if told_progress != Some(n) {
                    told_progress = Some(n);
                    pending.push(JobEvent::Progress { percent, message });
                }
            }
            let done = result.is_some();
            if let Some(result) = result {
                pending.push(JobEvent::Finished(result));
            }
            if !pending.is_empty() {
                if write_events(&mut send, &pending).await.is_err() {
                    debug!("job stream lost; the run goes on");
                    return;
                }
                pending.clear();
            }
            if done {
                let _ = send.finish();
                // Keep the stream open until the controller has read everything.
                let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
                return;
            }
            tokio::select! {
                c = changed.changed() => if c.is_err() { return },
                frame = frames.read_message::<JobControl, _>(&mut recv), if reading => {
                    match frame {
                        Ok(JobControl::Cancel { reason }) => {
                            info!(%reason, "job cancelled by the controller");
                            running.cancel(reason);
                        }
                        Ok(JobControl::Request(_) | JobControl::Fenced { .. } | JobControl::Infer(_) | JobControl::Logs(_) | JobControl::Exec(_)) => debug!("second request on a job stream ignored"),
                        Err(FrameError::Closed) => reading = false,
                        Err(e) => {
                            debug!("job stream lost ({e}); the run goes on");
                            return;
                        }
                    }
                }
            }
        }
    }

    async fn execute(self: Arc<Self>, key: RunKey, req: JobRequest, running: Arc<Running>) {
        let deadline = req
            .deadline_unix_ms
            .map(|ms| {
                let left = ms.saturating_sub(UnixMillis::now().as_i64()).max(0) as u64;
                tokio::time::Instant::now() + Duration::from_millis(left)
            })
            .or_else(|| match &req.spec {
                JobSpec::Exec(_) => self
                    .config
                    .exec
                    .default_timeout
                    .map(|t| tokio::time::Instant::now() + t),
                _ => None,
            });
        let ctx = JobContext {
            running: running.clone(),
            deadline,
            docker_socket: self.config.docker.socket.clone(),
        };
        // One deploy or undeploy of a service at a time: a second one (sent by a new leader
        // that did not know of the first, or by hand) waits, then finds the first's work done.
        let service_lock = req.spec.deploy_service().map(|s| self.service_lock(s));
        let _service = match &service_lock {
            Some(lock) => tokio::select! {
                g = lock.lock() => Some(g),
                stop = ctx.stopped() => {
                    self.finish(key, &running, stop.result(), !req.spec.is_read_only());
                    return;
                }
            },
            None => None,
        };
        let permit = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.ok(),
            stop = ctx.stopped() => {
                self.finish(key, &running, stop.result(), !req.spec.is_read_only());
                return;
            }
        };
        running.update(|log| log.started = true);
        let no_host_access = nebula_protocol::deploy::HostAccess::default();
        let work = async {
            match &req.spec {
                JobSpec::Noop => JobResult::new(JobStatus::Succeeded, None),
                JobSpec::Exec(spec) => match exec::resolve(&self.config.exec, spec) {
                    Ok(plan) => exec::run(&ctx, plan).await,
                    Err(refusal) => {
                        warn!(op = %spec.op, "exec refused: {refusal}");
                        JobResult::new(JobStatus::Refused, Some(refusal))
                    }
                },
                JobSpec::Probe(spec) => tokio::select! {
                    r = probe::run(&ctx, spec) => r,
                    stop = ctx.stopped() => stop.result(),
                },
                JobSpec::Deploy(spec) => tokio::select! {
                    r = deploy::deploy(&ctx, spec, Extras::host(&no_host_access), self.config.node_id, &self.config.deploy) => r,
                    stop = ctx.stopped() => stop.result(),
                },
                JobSpec::DeployWithHostAccess(d) => tokio::select! {
                    r = deploy::deploy(&ctx, &d.deploy, Extras::host(&d.host_access), self.config.node_id, &self.config.deploy) => r,
                    stop = ctx.stopped() => stop.result(),
                },
                JobSpec::DeployWithFiles(d) => {
                    let extras = Extras {
                        host: &d.host_access,
                        files: &d.files,
                        contents: &d.contents,
                    };
                    tokio::select! {
                        r = deploy::deploy(&ctx, &d.deploy, extras, self.config.node_id, &self.config.deploy) => r,
                        stop = ctx.stopped() => stop.result(),
                    }
                }
                JobSpec::Undeploy(spec) => tokio::select! {
                    r = deploy::undeploy(&ctx, spec, self.config.node_id) => r,
                    stop = ctx.stopped() => stop.result(),
                },
                JobSpec::Wake(spec) => wake::run(&ctx, spec).await,
                JobSpec::Storage(action) => tokio::select! {
                    r = storage::run(&ctx, action, &self.config.docker) => r,
                    stop = ctx.stopped() => stop.result(),
                },
                JobSpec::Container(job) => tokio::select! {
                    r = container::run(&ctx, job, &self.config.docker, self.config.node_id) => r,
                    stop = ctx.stopped() => stop.result(),
                },
                JobSpec::Model(spec) => match &self.config.ai {
                    Some(backends) => tokio::select! {
                        r = model::run(&ctx, spec, backends) => r,
                        stop = ctx.stopped() => stop.result(),
                    },
                    None => JobResult::new(
                        JobStatus::Refused,
                        Some("this agent has no inference backends".into()),
                    ),
                },
                JobSpec::Http(_) if !self.config.jobs.http => JobResult::new(
                    JobStatus::Refused,
                    Some("this agent sends no HTTP requests for jobs (turn on `[jobs] http = true` in its config)".into()),
                ),
                JobSpec::Http(spec) => tokio::select! {
                    r = http::run(&ctx, spec) => r,
                    stop = ctx.stopped() => stop.result(),
                },
                JobSpec::Infer(req) => match &self.config.ai {
                    Some(backends) => tokio::select! {
                        r = http::infer(&ctx, req, backends) => r,
                        stop = ctx.stopped() => stop.result(),
                    },
                    None => JobResult::new(
                        JobStatus::Refused,
                        Some("this agent has no inference backends".into()),
                    ),
                },
                JobSpec::Inventory => {
                    let dirs = if self.config.repo_dirs.is_empty() {
                        &self.config.exec.git_dirs
                    } else {
                        &self.config.repo_dirs
                    };
                    tokio::select! {
                        r = inventory::run(self.config.facts.clone(), dirs, self.config.docker.socket.as_deref()) => r,
                        stop = ctx.stopped() => stop.result(),
                    }
                }
            }
        };
        // A bug in a job's code must not leave the job running forever: it fails instead.
        let result = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
            Ok(r) => r,
            Err(_) => JobResult::new(
                JobStatus::Failed,
                Some("the agent failed while running this job (see its log)".into()),
            ),
        };
        drop(permit);
        self.finish(key, &running, result, !req.spec.is_read_only());
    }

    /// Journal the result, then publish it, under the runner's lock: a delivery that arrives
    /// now either finds the run (and its result) or the journal entry.
    fn finish(&self, key: RunKey, running: &Running, mut result: JobResult, durable: bool) {
        if result.status == JobStatus::Cancelled && result.error.as_deref() == Some(AGENT_STOPPING)
        {
            result.status = JobStatus::Interrupted;
        }
        debug!(status = ?result.status, "job finished");
        let mut st = self.lock();
        if let Err(e) = st.journal.finished(key, &result, durable) {
            warn!(job = %key, "writing the job journal: {e}");
        }
        st.running.remove(&key);
        running.update(|log| log.result = Some(result));
    }
}

/// Answer a request without running it (nothing goes to the journal) and end the stream.
async fn refuse(send: &mut quinn::SendStream, status: JobStatus, why: String) {
    let result = JobResult::new(status, Some(why));
    let events = [
        JobEvent::Accepted { resumed: false },
        JobEvent::Finished(result),
    ];
    let _ = write_events(send, &events).await;
    let _ = send.finish();
}

/// Write several events as one write (fewer packets for short jobs).
async fn write_events(send: &mut quinn::SendStream, events: &[JobEvent]) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    for ev in events {
        buf.extend_from_slice(&proto::encode_frame(ev)?);
    }
    send.write_all(&buf)
        .await
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))
}
