//! Test harness: real `nebula serve` and `nebula-agent` processes on 127.0.0.1 with ports the OS
//! picks, a real HTTP client, and waits on conditions with deadlines (never bare sleeps).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

pub use nebula_types::api::access::CreatedTokenView;
pub use nebula_types::api::jobs::JobView;
pub use nebula_types::api::nodes::{NodeStatus, NodeView};
pub use nebula_types::api::Page;
pub use nebula_types::jobs::{JobRecord, JobState};

/// Path of a binary built by `cargo build --workspace --bins` in this profile.
/// rustls's crypto provider for this test process (reqwest needs it even for plain HTTP);
/// call before building an HTTP client. Installing twice is harmless.
pub fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Poll `f` until it returns `Some`, or panic with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the first sample line of `metrics` that starts with `series` (name and labels,
/// as Prometheus prints them); 0 when absent.
pub fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Server-sent events read from a streaming answer.
pub struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    pub fn new(resp: reqwest::Response) -> Self {
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next `(event, data)`, or `None` when the stream ended or `timeout` passed.
    pub async fn next(&mut self, timeout: Duration) -> Option<(String, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut event = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = Some(e.trim().to_owned());
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                match event {
                    Some(e) => return Some((e, data)),
                    None => continue,
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// Output lines of a child, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn spawn(self, r: impl std::io::Read + Send + 'static) -> Self {
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                lines.0.lock().unwrap().push(line);
            }
        });
        self
    }
    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
    pub fn find(&self, prefix: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix(prefix).map(|s| s.trim().to_owned()))
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        // `info` unless the test asked for more.
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        // A binary a test has just written (an agent build) can be "busy" for a moment: a
        // process forked meanwhile by another test holds its write descriptor until it execs.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r.expect("spawn"),
            }
        };
        let stdout = Lines::default().spawn(child.stdout.take().unwrap());
        let stderr = Lines::default().spawn(child.stderr.take().unwrap());
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_free_sigterm(self.child.id());
        self.child.wait().expect("wait")
    }

    /// Wait for the process to exit by itself.
    pub async fn exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads drain.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "process did not exit within {timeout:?}\nstderr:\n{}",
                    self.stderr.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout.text(), self.stderr.text())
    }
}

fn unsafe_free_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A step run on a controller's test directory before its first start.
pub type Prepare = Arc<dyn Fn(&Path) + Send + Sync>;

/// Options for a controller under test.
#[derive(Clone)]
pub struct ControllerOpts {
    pub idle_timeout: &'static str,
    pub keep_alive: &'static str,
    pub cert_lifetime: &'static str,
    pub max_frame_bytes: Option<usize>,
    /// More `nebula serve` flags.
    pub extra: Vec<&'static str>,
    /// The QUIC listen address (default `127.0.0.1:0`).
    pub quic_listen: Option<SocketAddr>,
    /// Environment variables for the process (`RUST_LOG`).
    pub env: Vec<(&'static str, &'static str)>,
    /// The HTTP listen address (default `127.0.0.1:0`).
    pub http_listen: Option<SocketAddr>,
    /// The admin API token (default: a new random one).
    pub admin_token: Option<String>,
    /// Runs on the test's directory before the first start (the data dir is `<dir>/data`).
    pub prepare: Option<Prepare>,
}

impl Default for ControllerOpts {
    fn default() -> Self {
        ControllerOpts {
            idle_timeout: "3s",
            keep_alive: "1s",
            cert_lifetime: "1h",
            max_frame_bytes: None,
            extra: Vec::new(),
            quic_listen: None,
            env: Vec::new(),
            http_listen: None,
            admin_token: None,
            prepare: None,
        }
    }
}

/// A `nebula serve` process with its own data dir.
pub struct Controller {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub admin_token: String,
    pub opts: ControllerOpts,
    /// `http`, or `https` when the controller serves TLS (its client then trusts the fleet CA).
    pub scheme: &'static str,
    pub client: reqwest::Client,
}

impl Controller {
    pub async fn start(opts: ControllerOpts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin_token = opts
            .admin_token
            .clone()
            .unwrap_or_else(|| format!("nbl_test_{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(dir.path().join("admin.token"), &admin_token).unwrap();
        if let Some(prepare) = &opts.prepare {
            prepare(dir.path());
        }
        let (proc, http, quic) = Self::spawn(
            dir.path(),
            &opts,
            opts.http_listen
                .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()),
            opts.quic_listen
                .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()),
        )
        .await;
        tls_provider();
        let https = proc.stdout.find("API: https://").is_some();
        let client = match std::fs::read(dir.path().join("data/pki/ca.crt")) {
            Ok(ca) if https => reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
                .build()
                .unwrap(),
            _ => reqwest::Client::new(),
        };
        Controller {
            proc,
            dir,
            http,
            quic,
            admin_token,
            opts,
            scheme: if https { "https" } else { "http" },
            client,
        }
    }

    async fn spawn(
        dir: &Path,
        opts: &ControllerOpts,
        http: SocketAddr,
        quic: SocketAddr,
    ) -> (Proc, SocketAddr, SocketAddr) {
        let mut cmd = Command::new(bin("nebula"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--http-listen")
            .arg(http.to_string())
            .arg("--quic-listen")
            .arg(quic.to_string())
            .arg("--admin-token-file")
            .arg(dir.join("admin.token"))
            .arg("--idle-timeout")
            .arg(opts.idle_timeout)
            .arg("--keep-alive")
            .arg(opts.keep_alive)
            .arg("--cert-lifetime")
            .arg(opts.cert_lifetime);
        if let Some(m) = opts.max_frame_bytes {
            cmd.arg("--max-frame-bytes").arg(m.to_string());
        }
        cmd.args(&opts.extra);
        cmd.envs(opts.env.iter().copied());
        let mut proc = Proc::spawn(cmd);
        let addresses = |out: &Lines| -> Option<(SocketAddr, SocketAddr)> {
            let http = out
                .find("API: http://")
                .or_else(|| out.find("API: https://"))?
                .parse()
                .ok()?;
            let quic = out.find("QUIC: ")?.parse().ok()?;
            Some((http, quic))
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((http, quic)) = addresses(&proc.stdout) {
                return (proc, http, quic);
            }
            let exited = proc.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "the controller did not print its addresses ({exited:?}):\n{}",
                    proc.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kill (SIGKILL) and start again on the same ports and data dir.
    pub async fn restart_hard(&mut self) {
        self.proc.kill();
        let (proc, http, quic) =
            Self::spawn(self.dir.path(), &self.opts, self.http, self.quic).await;
        self.proc = proc;
        assert_eq!((http, quic), (self.http, self.quic));
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.http)
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let v = resp.json().await.unwrap_or(Value::Null);
        (status, v)
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, v) = self.api(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// Run the `nebula` CLI against this controller with the admin token.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("nebula"))
            .args(args)
            .env("NEBULA_CONTROLLER", self.url(""))
            .env("NEBULA_TOKEN", &self.admin_token)
            .output()
            .expect("run nebula")
    }

    /// PUT a service map (YAML) as the desired state: the status and the answer.
    pub async fn put_map(&self, yaml: &str) -> (u16, Value) {
        let resp = self
            .client
            .put(self.url("/api/v1/desired"))
            .bearer_auth(&self.admin_token)
            .header("content-type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .expect("PUT /api/v1/desired");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// GET an API path as its type; panics unless it answers 200 with that type.
    pub async fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let v = self.get(path).await;
        serde_json::from_value(v.clone()).unwrap_or_else(|e| {
            panic!("GET {path}: not a {}: {e}: {v}", std::any::type_name::<T>())
        })
    }

    /// Create a join token through the API.
    pub async fn token(&self, uses: u32, ttl: &str, labels: Value) -> String {
        let (status, v) = self
            .api(
                reqwest::Method::POST,
                "/api/v1/tokens",
                Some(serde_json::json!({"uses": uses, "ttl": ttl, "labels": labels})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        let created: CreatedTokenView = serde_json::from_value(v).expect("a created token");
        created.token
    }

    /// Create a job; panics unless the API accepts it.
    pub async fn job(&self, body: Value) -> JobRecord {
        let (status, v) = self
            .api(reqwest::Method::POST, "/api/v1/jobs", Some(body.clone()))
            .await;
        assert!(
            (200..=202).contains(&status),
            "POST /api/v1/jobs {body}: {status} {v}"
        );
        serde_json::from_value(v).expect("a job record")
    }

    /// Wait until a job satisfies `pred`.
    pub async fn wait_job(
        &self,
        id: Uuid,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&JobRecord) -> bool,
    ) -> JobRecord {
        let path = format!("/api/v1/jobs/{id}");
        wait_for(what, timeout, || async {
            let (status, v) = self.api(reqwest::Method::GET, &path, None).await;
            let job: Option<JobView> =
                (status == 200).then(|| serde_json::from_value(v).expect("a job"));
            job.map(|j| j.record).filter(|j| pred(j))
        })
        .await
    }

    pub async fn nodes(&self) -> Vec<NodeView> {
        self.get_as::<Page<NodeView>>("/api/v1/nodes").await.items
    }

    pub async fn node(&self, name: &str) -> Option<NodeView> {
        let (status, v) = self
            .api(reqwest::Method::GET, &format!("/api/v1/nodes/{name}"), None)
            .await;
        (status == 200).then(|| serde_json::from_value(v).expect("a node"))
    }

    pub async fn wait_status(&self, name: &str, status: NodeStatus, timeout: Duration) -> NodeView {
        wait_for(
            &format!("{name} to be {}", status.as_str()),
            timeout,
            || async { self.node(name).await.filter(|n| n.status == status) },
        )
        .await
    }
}

/// Join an agent (with an agent config file when given) and wait until it is online with its
/// first telemetry in (the reconciler and the container views need it). Returns the agent
/// and its node id.
pub async fn join_ready(
    c: &Controller,
    dir: &Path,
    name: &str,
    labels: &[&str],
    config: Option<&str>,
) -> (Agent, String) {
    let token = c.token(1, "10m", serde_json::json!({})).await;
    let agent = match config {
        Some(cfg) => Agent::join_with_config(c, &token, &dir.join(name), name, labels, cfg),
        None => Agent::join(c, &token, &dir.join(name), name, labels),
    };
    let node = c
        .wait_status(name, NodeStatus::Online, Duration::from_secs(20))
        .await;
    wait_for("the node's telemetry", Duration::from_secs(20), || async {
        let n = c.node(name).await?;
        n.telemetry.is_some().then_some(())
    })
    .await;
    (agent, node.id.to_string())
}

/// Resident memory of a process, from `/proc`.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The API's error body in an answer (panics when it is not one).
pub fn error_of(v: &Value) -> nebula_types::api::ErrorDetail {
    serde_json::from_value::<nebula_types::api::ErrorBody>(v.clone())
        .unwrap_or_else(|e| panic!("not an API error body: {e}: {v}"))
        .error
}

/// A `nebula-agent` process.
pub struct Agent {
    pub proc: Proc,
    pub state_dir: PathBuf,
}

impl Agent {
    pub fn join(
        c: &Controller,
        token: &str,
        state_dir: &Path,
        name: &str,
        labels: &[&str],
    ) -> Self {
        Self::join_with_env(c, token, state_dir, name, labels, &[])
    }

    pub fn join_with_env(
        c: &Controller,
        token: &str,
        state_dir: &Path,
        name: &str,
        labels: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new(bin("nebula-agent"));
        cmd.envs(env.iter().copied());
        cmd.arg("join")
            .arg("--controller")
            .arg(c.quic.to_string())
            .arg("--token")
            .arg(token)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--name")
            .arg(name);
        for l in labels {
            cmd.arg("--label").arg(l);
        }
        Agent {
            proc: Proc::spawn(cmd),
            state_dir: state_dir.to_owned(),
        }
    }

    /// Join with an agent config file (TOML), e.g. an exec allow-list.
    pub fn join_with_config(
        c: &Controller,
        token: &str,
        state_dir: &Path,
        name: &str,
        labels: &[&str],
        config: &str,
    ) -> Self {
        let path = state_dir.with_extension("toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, config).unwrap();
        let path = path.display().to_string();
        Self::join_with_env(
            c,
            token,
            state_dir,
            name,
            labels,
            &[("NEBULA_AGENT_CONFIG", path.as_str())],
        )
    }

    /// Run from saved state with a config file.
    pub fn run_with_config(state_dir: &Path) -> Self {
        let mut cmd = Command::new(bin("nebula-agent"));
        cmd.arg("run")
            .arg("--state-dir")
            .arg(state_dir)
            .env("NEBULA_AGENT_CONFIG", state_dir.with_extension("toml"));
        Agent {
            proc: Proc::spawn(cmd),
            state_dir: state_dir.to_owned(),
        }
    }

    pub fn run(state_dir: &Path) -> Self {
        let mut cmd = Command::new(bin("nebula-agent"));
        cmd.arg("run").arg("--state-dir").arg(state_dir);
        Agent {
            proc: Proc::spawn(cmd),
            state_dir: state_dir.to_owned(),
        }
    }
}

/// The real Docker Engine, with a test image built locally (no registry is reachable): a root
/// filesystem holding Debian's static busybox, imported as an image.
pub mod fake_discord;
pub mod fake_ollama;
pub mod netlab;
pub mod pg;
pub mod scripted_llm;

pub mod docker {
    use std::process::Command;

    pub const IMAGE: &str = "nebula-test/busybox:1";

    /// Run `docker` and return stdout; panic with stderr on failure.
    pub fn docker(args: &[&str]) -> String {
        let out = Command::new("docker")
            .args(args)
            .output()
            .expect("run docker");
        assert!(
            out.status.success(),
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// These tests need the real engine; without it they fail (they never pass by skipping).
    pub fn require() {
        let ok = Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "the Docker Engine is not reachable; these tests need a real one (scripts/test checks)"
        );
    }

    /// Build the test image if it is missing (`scripts/build-test-image`, idempotent).
    pub fn ensure_image() {
        ensure_image_named(IMAGE);
    }

    /// Build one of `scripts/build-test-image`'s images if it is missing.
    pub fn ensure_image_named(image: &str) {
        require();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-test-image");
        let out = Command::new(script)
            .arg(image)
            .output()
            .expect("run build-test-image");
        assert!(
            out.status.success(),
            "building the test image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Removes every managed container of the given nodes when dropped (also on a failed
    /// assert). Declare it before the controller and agents, so it runs after they are stopped
    /// and nothing can start a container again.
    #[derive(Default)]
    pub struct Managed(std::sync::Mutex<Vec<String>>);

    impl Managed {
        pub fn add(&self, node: &str) {
            self.0.lock().unwrap().push(node.to_owned());
        }
    }

    impl Drop for Managed {
        fn drop(&mut self) {
            for node in self.0.lock().unwrap().iter() {
                let ids = docker(&[
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=nebula.node={node}"),
                ]);
                for id in ids.lines().filter(|l| !l.is_empty()) {
                    let _ = Command::new("docker").args(["rm", "-f", id]).output();
                }
            }
        }
    }

    /// Containers labelled for one test, removed on drop.
    pub struct Containers {
        pub label: String,
    }

    impl Containers {
        pub fn new() -> Self {
            ensure_image();
            Containers {
                label: format!("nebula.test={}", uuid::Uuid::new_v4().simple()),
            }
        }

        /// `docker run -d` with this test's label; returns the id.
        pub fn run(&self, name: &str, args: &[&str]) -> String {
            let mut all = vec!["run", "-d", "--name", name, "--label", &self.label];
            all.extend_from_slice(args);
            docker(&all)
        }
    }

    impl Drop for Containers {
        fn drop(&mut self) {
            let ids = docker(&["ps", "-aq", "--filter", &format!("label={}", self.label)]);
            for id in ids.lines().filter(|l| !l.is_empty()) {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

/// Raw sessions for tests that speak the protocol themselves (refusals, bad input).
pub mod session {
    use std::time::Duration;

    use nebula_agent::{AgentConfig, Identity, StateDir};
    use nebula_protocol::{
        self as proto, Hello, JoinToken, NodeFacts, ProtocolVersion, ServerHello, Welcome,
        CONTROLLER_SERVER_NAME,
    };

    use super::Controller;

    /// Enroll in-process (real QUIC) and return the saved identity.
    pub async fn enrolled_identity(c: &Controller, name: &str, dir: &std::path::Path) -> Identity {
        let token: JoinToken = c
            .token(1, "1h", serde_json::json!({}))
            .await
            .parse()
            .unwrap();
        let agent = nebula_agent::Agent::new(AgentConfig {
            controller: Some(c.quic.to_string()),
            state_dir: dir.to_owned(),
            name: Some(name.into()),
            ..AgentConfig::default()
        });
        agent.join(&token).await.unwrap();
        StateDir::new(dir).load().unwrap()
    }

    /// A `nebula/1` connection with this identity; nothing sent yet.
    pub async fn raw_session(identity: &Identity, c: &Controller) -> quinn::Connection {
        let cfg = nebula_agent::tls::session_config(
            identity,
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .unwrap();
        let ep = nebula_agent::tls::client_endpoint(c.quic).unwrap();
        ep.connect_with(cfg, c.quic, CONTROLLER_SERVER_NAME)
            .unwrap()
            .await
            .unwrap()
    }

    pub fn hello(version: ProtocolVersion) -> Hello {
        Hello {
            version,
            agent_version: "test".into(),
            facts: NodeFacts::default(),
        }
    }

    /// A session past `Hello`/`Welcome`: the connection, the session stream and the welcome.
    pub async fn welcomed(
        identity: &Identity,
        c: &Controller,
    ) -> (
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
        Welcome,
    ) {
        let conn = raw_session(identity, c).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        proto::write_message(&mut send, &hello(proto::PROTOCOL_VERSION))
            .await
            .unwrap();
        match proto::read_message::<ServerHello, _>(&mut recv, 1 << 20)
            .await
            .unwrap()
        {
            ServerHello::Welcome(w) => (conn, send, recv, w),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Wait for the controller to close the connection; its application code and reason.
    pub async fn close_reason(conn: &quinn::Connection) -> (u32, String) {
        match tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closed in time")
        {
            quinn::ConnectionError::ApplicationClosed(a) => (
                u32::try_from(a.error_code.into_inner()).unwrap(),
                String::from_utf8_lossy(&a.reason).into_owned(),
            ),
            other => (u32::MAX, other.to_string()),
        }
    }
}

/// Agents running inside the test process: the real agent library, with GPUs and models
/// injected (this host has no NVIDIA GPU and no inference backend).
pub mod inproc {
    use std::path::Path;

    use nebula_agent::telemetry::gpu::SimulatedGpu;
    use nebula_agent::{Agent, AgentConfig, GpuSource};
    use nebula_protocol::telemetry::{GpuInfo, ModelInfo};
    use tokio_util::sync::CancellationToken;

    use super::Controller;

    pub struct InProcAgent {
        pub name: String,
        pub state_dir: std::path::PathBuf,
        stop: CancellationToken,
        task: Option<tokio::task::JoinHandle<()>>,
        config: AgentConfig,
        gpu: GpuSource,
        models: Vec<ModelInfo>,
    }

    /// A GPU with `total_gib` of memory of which `used_gib` is in use.
    pub fn gpu(total_gib: u64, used_gib: u64) -> SimulatedGpu {
        SimulatedGpu {
            info: GpuInfo {
                uuid: format!("GPU-sim-{total_gib}-{used_gib}"),
                name: "NVIDIA GeForce RTX 4090".into(),
                memory_total_bytes: total_gib << 30,
                power_limit_mw: Some(450_000),
            },
            memory_used_bytes: used_gib << 30,
            utilization_percent: 10,
        }
    }

    pub fn model(name: &str, loaded: bool) -> ModelInfo {
        ModelInfo {
            name: name.into(),
            backend: "ollama".into(),
            loaded,
            size_bytes: 4 << 30,
            vram_bytes: loaded.then_some(5 << 30),
        }
    }

    impl InProcAgent {
        /// Join with `token` and keep running until stopped.
        pub async fn join(
            c: &Controller,
            token: &str,
            dir: &Path,
            name: &str,
            config: impl FnOnce(&mut AgentConfig),
            gpus: Vec<SimulatedGpu>,
            models: Vec<ModelInfo>,
        ) -> Self {
            let mut cfg = AgentConfig {
                controller: Some(c.quic.to_string()),
                state_dir: dir.join(name),
                name: Some(name.to_owned()),
                ..AgentConfig::default()
            };
            config(&mut cfg);
            let agent = Agent::new(cfg.clone());
            agent
                .join(&token.parse().expect("join token"))
                .await
                .expect("join");
            let mut a = InProcAgent {
                name: name.to_owned(),
                state_dir: cfg.state_dir.clone(),
                stop: CancellationToken::new(),
                task: None,
                config: cfg,
                gpu: if gpus.is_empty() {
                    GpuSource::None
                } else {
                    GpuSource::Simulated(gpus)
                },
                models,
            };
            a.start();
            a
        }

        /// (Re)start the agent from its saved state.
        pub fn start(&mut self) {
            self.stop = CancellationToken::new();
            let agent = Agent::new(self.config.clone())
                .with_gpu(self.gpu.clone())
                .with_models(self.models.clone());
            let stop = self.stop.clone();
            self.task = Some(tokio::spawn(async move {
                let _ = agent.run(stop).await;
            }));
        }

        /// Stop the agent (it says goodbye) and wait for it.
        pub async fn stop(&mut self) {
            self.stop.cancel();
            if let Some(t) = self.task.take() {
                let _ = t.await;
            }
        }
    }

    impl Drop for InProcAgent {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }
}
