//! Whole-system tests: real `nebula serve` and `nebula-agent` processes talking real QUIC with
//! mutual TLS on 127.0.0.1, ports chosen by the OS.

use crate::common;

use std::time::{Duration, Instant};

use common::{Agent, Controller, ControllerOpts};
use common::{NodeView, Page};
use nebula_types::api::access::TokenView;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_join_and_show_online_with_facts_and_labels() {
    let c = Controller::start(ControllerOpts::default()).await;
    let token = c.token(2, "1h", json!({"zone": "home"})).await;
    let dir = tempfile::tempdir().unwrap();
    let _a = Agent::join(&c, &token, &dir.path().join("a"), "alpha", &["role=gpu"]);
    let _b = Agent::join(&c, &token, &dir.path().join("b"), "beta", &[]);
    let a = c
        .wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    let b = c
        .wait_status("beta", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    let labels = |pairs: &[(&str, &str)]| -> nebula_protocol::Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(a.labels, labels(&[("zone", "home"), ("role", "gpu")]));
    assert_eq!(b.labels, labels(&[("zone", "home")]));
    for n in [&a, &b] {
        assert!(n.facts.cpu_count >= 1, "{n:?}");
        assert!(n.facts.memory_bytes > 0);
        assert_eq!(n.facts.arch, std::env::consts::ARCH);
        assert!(!n.facts.hostname.is_empty());
        assert!(!n.facts.kernel.is_empty());
        assert_eq!(n.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(n.cert_not_after.is_some());
    }
    assert_ne!(a.id, b.id);
    let list = c.nodes().await;
    let names: Vec<_> = list.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    // Filters and pagination.
    let page: Page<NodeView> = c.get_as("/api/v1/nodes?limit=1").await;
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.next_cursor.as_deref(), Some("alpha"));
    let page2: Page<NodeView> = c.get_as("/api/v1/nodes?limit=1&cursor=alpha").await;
    assert_eq!(page2.items[0].name, "beta");
    assert!(page2.next_cursor.is_none());
    let gpu: Page<NodeView> = c.get_as("/api/v1/nodes?label=role=gpu").await;
    assert_eq!(gpu.items.len(), 1);
    // The token is used up.
    let tokens: Page<TokenView> = c.get_as("/api/v1/tokens").await;
    assert_eq!(tokens.items[0].state, "used");
    assert_eq!(tokens.items[0].uses, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_goes_offline_within_idle_timeout_and_returns_with_same_id() {
    let c = Controller::start(ControllerOpts::default()).await; // idle timeout 3 s
    let token = c.token(1, "1h", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a");
    let mut a = Agent::join(&c, &token, &state, "alpha", &[]);
    let before = c
        .wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    let killed_at = Instant::now();
    a.proc.kill(); // SIGKILL: no Bye, no close; only the idle timeout can tell
    c.wait_status("alpha", common::NodeStatus::Offline, Duration::from_secs(4))
        .await;
    let took = killed_at.elapsed();
    assert!(took <= Duration::from_secs(4), "offline after {took:?}");
    // Restart from saved state: same id, no new enrollment (the single-use token is spent).
    let _a = Agent::run(&state);
    let after = c
        .wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    assert_eq!(before.id, after.id);
    assert_eq!(before.enrolled_at, after.enrolled_at);
    assert_eq!(c.nodes().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_agents_reconnect_by_themselves_within_10s() {
    let mut c = Controller::start(ControllerOpts {
        // A long idle timeout: reconnecting quickly must not depend on it.
        idle_timeout: "30s",
        keep_alive: "1s",
        ..ControllerOpts::default()
    })
    .await;
    let token = c.token(2, "1h", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let _a = Agent::join(&c, &token, &dir.path().join("a"), "alpha", &[]);
    let _b = Agent::join(&c, &token, &dir.path().join("b"), "beta", &[]);
    let a0 = c
        .wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    let b0 = c
        .wait_status("beta", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    let since0 = a0.connected_since.clone();

    c.restart_hard().await; // SIGKILL, then a fresh process on the same ports and data dir
    let restarted = Instant::now();
    let a1 = c
        .wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(10))
        .await;
    let b1 = c
        .wait_status("beta", common::NodeStatus::Online, Duration::from_secs(10))
        .await;
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(10), "reconnected after {took:?}");
    assert_eq!(a0.id, a1.id);
    assert_eq!(b0.id, b1.id);
    assert_ne!(since0, a1.connected_since, "a new session");
    assert_eq!(c.nodes().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_node_is_cut_off_and_refused_on_reconnect() {
    let c = Controller::start(ControllerOpts::default()).await;
    let token = c.token(2, "1h", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a");
    let mut a = Agent::join(&c, &token, &state, "alpha", &[]);
    let _b = Agent::join(&c, &token, &dir.path().join("b"), "beta", &[]);
    c.wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    c.wait_status("beta", common::NodeStatus::Online, Duration::from_secs(20))
        .await;

    let (status, v) = c
        .api(reqwest::Method::DELETE, "/api/v1/nodes/alpha", None)
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(c.node("alpha").await.is_none(), "node left the list");
    // The running agent is cut off and stops: retrying cannot help.
    let st = a.proc.exit(Duration::from_secs(10)).await;
    assert!(!st.success());
    assert!(a.proc.output().contains("revoked"), "{}", a.proc.output());
    // Reconnecting with the revoked certificate is refused with a clear reason.
    let mut again = Agent::run(&state);
    let st = again.proc.exit(Duration::from_secs(15)).await;
    assert!(!st.success());
    let out = again.proc.output();
    assert!(out.contains("revoked"), "{out}");
    assert!(c.node("alpha").await.is_none());
    // The other node is untouched.
    c.wait_status("beta", common::NodeStatus::Online, Duration::from_secs(1))
        .await;
    // Removing it again: 404 with the error shape.
    let (status, v) = c
        .api(reqwest::Method::DELETE, "/api/v1/nodes/alpha", None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(common::error_of(&v).code, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_over_the_session_and_the_new_one_works() {
    let c = Controller::start(ControllerOpts {
        cert_lifetime: "12s",
        ..ControllerOpts::default()
    })
    .await;
    let token = c.token(1, "1h", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a");
    let mut a = Agent::join(&c, &token, &state, "alpha", &[]);
    let first = c
        .wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    let first_expiry = first.cert_not_after.clone().unwrap();
    let first_crt = std::fs::read(state.join("node.crt")).unwrap();
    let first_key = std::fs::read(state.join("node.key")).unwrap();
    // A thief's copy of the node's state (key and certificate) before the renewal.
    let stolen = dir.path().join("stolen");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&state)
        .arg(&stolen)
        .status()
        .unwrap();
    assert!(copied.success());
    // Renewal after 2/3 of the 12 s lifetime (+ clock-skew slack).
    let renewed = common::wait_for("a renewed certificate", Duration::from_secs(20), || {
        let c = &c;
        let first_expiry = first_expiry.clone();
        async move {
            let n = c.node("alpha").await?;
            (n.cert_not_after.as_deref()? > first_expiry.as_str()).then_some(n)
        }
    })
    .await;
    assert_eq!(
        renewed.status,
        common::NodeStatus::Online,
        "the session stayed up"
    );
    common::wait_for(
        "the agent to save its new certificate",
        Duration::from_secs(5),
        || {
            let state = state.clone();
            let first_crt = first_crt.clone();
            async move { (std::fs::read(state.join("node.crt")).ok()? != first_crt).then_some(()) }
        },
    )
    .await;
    assert_ne!(
        std::fs::read(state.join("node.key")).unwrap(),
        first_key,
        "a fresh key"
    );
    // Once the agent has saved the new certificate, the old one is revoked: the stolen copy
    // is refused at once, long before the old certificate would have expired.
    let mut thief = Agent::run(&stolen);
    let st = thief.proc.exit(Duration::from_secs(15)).await;
    assert!(!st.success());
    let out = thief.proc.output();
    assert!(out.contains("revoked"), "{out}");
    c.wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(1))
        .await;
    // Once the first certificate has expired, a restarted agent still gets in with the new one.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.proc.kill();
    c.wait_status("alpha", common::NodeStatus::Offline, Duration::from_secs(5))
        .await;
    let _a = Agent::run(&state);
    c.wait_status("alpha", common::NodeStatus::Online, Duration::from_secs(15))
        .await;
}

/// The README's first set-up command, run as written (in the test profile, so the binaries the
/// suite built are reused): `cargo run` must resolve to `nebula`, `dev` must come up with its
/// banner and a healthy API, the next command it prints must work as printed, and Ctrl-C must
/// stop everything cleanly.
/// A command as a person types it in a shell: without the variables `cargo test` gives this
/// test (`CARGO_MANIFEST_DIR` and the like). Cargo fingerprints some crates by them, so with
/// them the nested `cargo run` would build the workspace a second time.
fn as_typed(cmd: &mut std::process::Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_EXE_")
            || matches!(
                k.as_str(),
                "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "LD_LIBRARY_PATH"
                    | "RUST_RECURSION_COUNT"
            )
        {
            cmd.env_remove(k);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_runs_as_written_and_stops_cleanly_on_ctrl_c() {
    common::tls_provider();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let first = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|block| block.lines().next())
        .expect("the README starts its set-up with a ```sh block");
    let words: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(words[..2], ["cargo", "run"], "first command: {first}");
    let dash = words
        .iter()
        .position(|w| *w == "--")
        .expect("cargo run -- ARGS");
    assert_eq!(words[dash + 1..], ["dev"], "first command: {first}");
    // The test profile stands in for --release; everything else is the README's.
    let cargo_args: Vec<&str> = words[2..dash]
        .iter()
        .copied()
        .filter(|w| *w != "--release")
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(&cargo);
    cmd.current_dir(root)
        .arg("run")
        .args(&cargo_args)
        .arg("--")
        .args(&words[dash + 1..])
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
        ]);
    as_typed(&mut cmd);
    let mut dev = common::Proc::spawn(cmd);
    let (api, try_line) = common::wait_for(
        "nebula dev's banner with its agent online",
        // `cargo run` may link the binary again first (the tests' feature set differs), on a
        // machine busy with the other tests.
        Duration::from_secs(300),
        || {
            let out = &dev.stdout;
            async move {
                let text = out.text();
                text.contains("Nebula Command dev environment")
                    .then_some(())?;
                text.contains(" online").then_some(())?;
                let api = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("API:").map(|s| s.trim().to_owned()))?;
                let try_line = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Try:").map(|s| s.trim().to_owned()))?;
                Some((api, try_line))
            }
        },
    )
    .await;
    let health = reqwest::get(format!("{api}/healthz")).await.unwrap();
    assert!(health.status().is_success(), "{}", health.status());
    // The next command works exactly as printed (from the same directory, with a shell).
    let mut sh = std::process::Command::new("sh");
    sh.current_dir(root).arg("-c").arg(&try_line);
    as_typed(&mut sh);
    let next = sh.env("CARGO", &cargo).output().unwrap();
    let listing = String::from_utf8_lossy(&next.stdout);
    assert!(
        next.status.success(),
        "`{try_line}` failed:\n{listing}\n{}",
        String::from_utf8_lossy(&next.stderr)
    );
    assert!(
        listing.contains("online"),
        "`{try_line}` printed:\n{listing}"
    );
    // The admin token works against the printed API, and the local agent is there.
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let nodes: Page<NodeView> = reqwest::Client::new()
        .get(format!("{api}/api/v1/nodes"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        nodes.items[0].status,
        common::NodeStatus::Online,
        "{nodes:?}"
    );
    assert_eq!(nodes.items[0].labels["env"], "dev");
    // Ctrl-C: every task stops and the process exits cleanly (`cargo run` execs the program,
    // so the signal reaches `nebula` itself).
    let _ = std::process::Command::new("kill")
        .args(["-INT", &dev.child.id().to_string()])
        .status();
    let status = dev.exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{}", dev.output());
}
