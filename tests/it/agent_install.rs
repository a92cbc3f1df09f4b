//! Installing and updating agents for real: `install.sh` as served by a real controller, run in a
//! clean Debian root (debootstrap, imported into the real Docker Engine; systemd is not running
//! there, so the script starts the agent itself and `systemd-analyze verify` checks its unit),
//! and self-update of a real agent process from the controller's `/downloads/`.
//!
//! Newer builds are the same agent binary with another version stamped into it (the controller
//! reads versions from that stamp), so no second compile is needed. A build that cannot reach
//! the controller is made by changing its session ALPN (`nebula/1` -> `nebula/9`): the
//! controller refuses the handshake, as it would a build that speaks another protocol.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{bin, docker, wait_for, Agent, Controller, ControllerOpts, Proc};
use nebula_protocol::release;
use nebula_types::api::models::AgentReleases;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const DEBIAN: &str = "nebula-test/debian:bookworm";

/// The agent binary with `version` stamped into it.
fn stamped(version: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(bin("nebula-agent")).unwrap();
    let (at, _) = release::find_version_stamp_at(&bytes).expect("the agent carries a stamp");
    bytes[at..at + release::VERSION_STAMP_LEN].copy_from_slice(&release::version_stamp(version));
    assert_eq!(
        release::find_version_stamp(&bytes).as_deref(),
        Some(version)
    );
    bytes
}

/// A build whose session ALPN the controller does not speak.
fn unreachable_build(version: &str) -> Vec<u8> {
    let mut bytes = stamped(version);
    let needle = nebula_protocol::ALPN_SESSION;
    let hits: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "the session ALPN appears once in the agent");
    let last = hits[0] + needle.len() - 1;
    bytes[last] = b'9';
    bytes
}

/// Put a file in place atomically (the controller may be scanning the directory).
fn put(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::rename(&tmp, path).unwrap();
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn platform_file() -> String {
    release::file_name(std::env::consts::OS, std::env::consts::ARCH)
}

async fn node_view(c: &Controller, name: &str) -> Option<common::NodeView> {
    c.node(name).await
}

/// The agent builds the controller serves.
async fn releases(c: &Controller) -> AgentReleases {
    c.get_as("/api/v1/agent/releases").await
}

/// Wait until `name` is online running `version`.
async fn wait_version(
    c: &Controller,
    name: &str,
    version: &str,
    timeout: Duration,
) -> common::NodeView {
    wait_for(
        &format!("{name} online with agent {version}"),
        timeout,
        || async {
            let n = node_view(c, name).await?;
            (n.status == common::NodeStatus::Online && n.agent_version == version).then_some(n)
        },
    )
    .await
}

/// The agent's record of its last update (`update.json` in its state dir).
fn update_record(state: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(state.join("update.json")).ok()?).ok()
}

/// A container of the clean Debian image on the host's network (the controller listens on
/// 127.0.0.1), removed when dropped.
struct Box_ {
    name: String,
}

impl Box_ {
    fn start() -> Self {
        docker::ensure_image_named(DEBIAN);
        let name = format!("nebula-install-{}", uuid::Uuid::new_v4().simple());
        docker::docker(&["run", "-d", "--network", "host", "--name", &name, DEBIAN]);
        Box_ { name }
    }

    fn exec(&self, script: &str) -> Output {
        Command::new("docker")
            .args(["exec", &self.name, "sh", "-c", script])
            .output()
            .expect("docker exec")
    }

    fn ok(&self, script: &str) -> String {
        let out = self.exec(script);
        let text = text(&out);
        assert!(out.status.success(), "`{script}` failed:\n{text}");
        text
    }

    fn copy_in(&self, local: &Path, remote: &str) {
        docker::docker(&[
            "cp",
            &local.display().to_string(),
            &format!("{}:{remote}", self.name),
        ]);
    }

    /// SHA-256 of the installed agent binary.
    fn installed_sha(&self) -> String {
        self.ok("sha256sum /usr/local/bin/nebula-agent | cut -d' ' -f1")
            .trim()
            .to_owned()
    }

    /// Every path in the container's own filesystem (not /proc, /sys, /dev).
    /// Every path of the root, kept inside the box as `/dev/shm/NAME` (outside what is
    /// listed), so that listings are compared where they are made. One walk of the root has
    /// been seen to miss an entry of a large directory (`/usr/share/man/man8`, on the image's
    /// overlay file system): a listing is the union of three walks.
    fn listing(&self, name: &str) {
        self.ok(&format!(
            "for walk in 1 2 3; do find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -print; done | sort -u > /dev/shm/{name} && test -s /dev/shm/{name}"
        ));
    }

    /// The paths in listing `b` and not in `a` (`+`), and in `a` and not in `b` (`-`).
    fn changes(&self, a: &str, b: &str) -> Vec<String> {
        self.ok(&format!(
            "comm -3 /dev/shm/{a} /dev/shm/{b} | sed 's/^\\t/+ /; t; s/^/- /'"
        ))
        .lines()
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for Box_ {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A static file server on 127.0.0.1 (python3's http.server) standing in for a tampered mirror.
fn static_server(root: &Path) -> (Proc, u16) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        &port.to_string(),
        "--directory",
    ])
    .arg(root);
    (Proc::spawn(cmd), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_installs_upgrades_refuses_bad_downloads_and_uninstalls_in_a_clean_debian_root()
{
    let agents = tempfile::tempdir().unwrap();
    let file = platform_file();
    let v0 = stamped("0.1.0");
    put(&agents.path().join(&file), &v0);
    let agent_dir: &'static str = Box::leak(agents.path().display().to_string().into_boxed_str());
    let c = Controller::start(ControllerOpts {
        extra: vec!["--release-scan-interval", "200ms", "--agent-dir", agent_dir],
        ..ControllerOpts::default()
    })
    .await;

    // The script as served: this controller's addresses, CA pin, key and the binary's checksum.
    let script = c
        .client
        .get(c.url("/install.sh"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = releases(&c).await.public_key;
    assert!(
        script.contains(&format!("DEFAULT_URL='{}'", c.url(""))),
        "{script}"
    );
    assert!(script.contains(&format!("DEFAULT_CONTROLLER='{}'", c.quic)));
    assert!(script.contains(&format!("RELEASE_KEY_HEX='{key}'")));
    assert!(script.contains(&format!("{file}) echo '{}'", sha_hex(&v0))));
    let work = tempfile::tempdir().unwrap();
    let served_v0 = work.path().join("install-v0.sh");
    std::fs::write(&served_v0, &script).unwrap();
    // shellcheck is clean on the file in the repository and on the script as served.
    for path in [
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/installers/install.sh"
        )),
        served_v0.clone(),
    ] {
        let out = Command::new("shellcheck")
            .args(["-s", "sh"])
            .arg(&path)
            .output()
            .expect("shellcheck is installed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "shellcheck {}:\n{}",
            path.display(),
            text(&out)
        );
    }

    let b = Box_::start();
    b.listing("before");
    // A single-use token: an upgrade that enrolled again would be refused.
    let token = c.token(1, "10m", json!({})).await;
    let out = b.ok(&format!(
        "curl -fsSL {} | sh -s -- --token {token} --name debian-box --label zone=lab",
        c.url("/install.sh")
    ));
    assert!(
        out.contains("checksum and signature verified (0.1.0)"),
        "{out}"
    );
    assert!(out.contains("installed and joined"), "{out}");
    let node = wait_version(&c, "debian-box", "0.1.0", Duration::from_secs(20)).await;
    let id = node.id;
    assert_eq!(node.labels["zone"], "lab");
    assert_eq!(b.installed_sha(), sha_hex(&v0));
    let conf = b.ok("cat /etc/nebula-agent/agent.toml");
    assert!(
        conf.contains(&format!("controller = \"{}\"", c.quic)),
        "{conf}"
    );
    assert!(conf.contains(&format!("release_key = \"{key}\"")), "{conf}");
    assert_eq!(b.ok("stat -c %a /var/lib/nebula-agent").trim(), "700");
    // systemd is not running in the container; its unit file must still be valid.
    let unit = b.ok("cat /etc/systemd/system/nebula-agent.service");
    assert!(
        unit.contains("Restart=always") && unit.contains("NoNewPrivileges=yes"),
        "{unit}"
    );
    b.ok("systemd-analyze verify /etc/systemd/system/nebula-agent.service");
    // systemd-analyze leaves a marker of its own in /run; it is the check's, not the installer's.
    b.ok("rm -f /run/systemd/systemd-units-load");

    // A newer build: re-running the installer (the used-up token given again) upgrades in place.
    let v1 = stamped("0.1.1");
    put(&agents.path().join(&file), &v1);
    let out = b.ok(&format!(
        "curl -fsSL {} | sh -s -- --token {token}",
        c.url("/install.sh")
    ));
    assert!(
        out.contains("already enrolled; keeping this node's identity"),
        "{out}"
    );
    assert!(out.contains("upgraded to 0.1.1"), "{out}");
    let node = wait_version(&c, "debian-box", "0.1.1", Duration::from_secs(20)).await;
    assert_eq!(node.id, id, "same identity after the upgrade");
    assert_eq!(c.nodes().await.len(), 1);
    assert_eq!(b.installed_sha(), sha_hex(&v1));

    // Wrong checksum: the script pinned 0.1.1's digest; the controller now serves other bytes.
    let served_v1 = work.path().join("install-v1.sh");
    let script_v1 = c
        .client
        .get(c.url("/install.sh"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    std::fs::write(&served_v1, &script_v1).unwrap();
    b.copy_in(&served_v1, "/root/install-v1.sh");
    let mut tampered = v1.clone();
    tampered.extend_from_slice(b"\0tampered");
    put(&agents.path().join(&file), &tampered);
    wait_for(
        "the controller to serve the new bytes",
        Duration::from_secs(10),
        || async {
            let r = releases(&c).await;
            (r.releases[0].sha256 == sha_hex(&tampered)).then_some(())
        },
    )
    .await;
    let out = b.exec("sh /root/install-v1.sh");
    let msg = text(&out);
    assert!(!out.status.success(), "{msg}");
    assert!(
        msg.contains("checksum mismatch") && msg.contains("refusing to install"),
        "{msg}"
    );
    assert_eq!(b.installed_sha(), sha_hex(&v1));

    // Wrong signature: a mirror serving 0.1.1 with a consistent checksum but a forged signature.
    let mirror = tempfile::tempdir().unwrap();
    let dl = mirror.path().join("downloads");
    std::fs::create_dir(&dl).unwrap();
    std::fs::write(dl.join(&file), &v1).unwrap();
    std::fs::write(
        dl.join(format!("{file}.sha256")),
        format!("{}  {file}\n", sha_hex(&v1)),
    )
    .unwrap();
    let digest: [u8; 32] = Sha256::digest(&v1).into();
    std::fs::write(
        dl.join(format!("{file}.manifest")),
        release::manifest(
            "0.1.1",
            std::env::consts::OS,
            std::env::consts::ARCH,
            &digest,
        ),
    )
    .unwrap();
    std::fs::write(dl.join(format!("{file}.sig")), [0x5au8; 64]).unwrap();
    let (_mirror_proc, port) = static_server(mirror.path());
    wait_for("the mirror to listen", Duration::from_secs(10), || async {
        reqwest::get(format!("http://127.0.0.1:{port}/downloads/{file}.sha256"))
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    let out = b.exec(&format!(
        "sh /root/install-v1.sh --url http://127.0.0.1:{port}"
    ));
    let msg = text(&out);
    assert!(!out.status.success(), "{msg}");
    assert!(
        msg.contains("bad signature") && msg.contains("refusing to install"),
        "{msg}"
    );
    assert_eq!(b.installed_sha(), sha_hex(&v1));
    // The agent kept running through both refusals.
    wait_version(&c, "debian-box", "0.1.1", Duration::from_secs(5)).await;

    // Uninstall: the agent stops and the root is as it was before the install.
    let out = b.ok("sh /root/install-v1.sh --uninstall && rm /root/install-v1.sh");
    assert!(out.contains("removed"), "{out}");
    wait_for("debian-box offline", Duration::from_secs(20), || async {
        let n = node_view(&c, "debian-box").await?;
        (n.status == common::NodeStatus::Offline).then_some(())
    })
    .await;
    b.listing("after");
    let changes = b.changes("before", "after");
    assert!(
        changes.is_empty(),
        "left behind (+) or removed (-): {changes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_update_swaps_confirms_refuses_a_foreign_key_and_rolls_back_a_build_that_cannot_connect(
) {
    let agents = tempfile::tempdir().unwrap();
    let agent_dir: &'static str = Box::leak(agents.path().display().to_string().into_boxed_str());
    let c = Controller::start(ControllerOpts {
        extra: vec!["--release-scan-interval", "200ms", "--agent-dir", agent_dir],
        ..ControllerOpts::default()
    })
    .await;
    let file = platform_file();
    // The agent runs from its own copy, which it may replace.
    let home = tempfile::tempdir().unwrap();
    let exe = home.path().join("nebula-agent");
    let v0 = stamped("0.1.0");
    put(&exe, &v0);
    let state = home.path().join("state");
    let config = home.path().join("agent.toml");
    let write_config = |key: &str| {
        std::fs::write(
            &config,
            format!(
                "[update]\nenabled = true\nurl = \"{}\"\nrelease_key = \"{key}\"\nconfirm_timeout = \"20s\"\n",
                c.url("")
            ),
        )
        .unwrap();
    };
    // First with a key that is not the controller's.
    write_config(&"ab".repeat(32));
    let token = c.token(1, "10m", json!({})).await;
    let mut cmd = Command::new(&exe);
    cmd.arg("--config")
        .arg(&config)
        .arg("join")
        .arg("--controller")
        .arg(c.quic.to_string())
        .arg("--token")
        .arg(&token)
        .arg("--state-dir")
        .arg(&state)
        .arg("--name")
        .arg("updater");
    let mut agent = Agent {
        proc: Proc::spawn(cmd),
        state_dir: state.clone(),
    };
    wait_version(&c, "updater", "0.1.0", Duration::from_secs(20)).await;

    let v1 = stamped("0.1.1");
    put(&agents.path().join(&file), &v1);
    wait_for(
        "the update to be refused",
        Duration::from_secs(20),
        || async { agent.proc.output().contains("update refused").then_some(()) },
    )
    .await;
    assert!(
        agent.proc.output().contains("is not the pinned key"),
        "{}",
        agent.proc.output()
    );
    assert_eq!(sha_hex(&std::fs::read(&exe).unwrap()), sha_hex(&v0));
    assert_eq!(
        node_view(&c, "updater").await.unwrap().agent_version,
        "0.1.0"
    );

    // With the controller's key: download, verify, swap, restart in place, confirm.
    agent.proc.terminate();
    let key = releases(&c).await.public_key.to_owned();
    write_config(&key);
    let mut cmd = Command::new(&exe);
    cmd.arg("--config")
        .arg(&config)
        .arg("run")
        .arg("--state-dir")
        .arg(&state);
    agent.proc = Proc::spawn(cmd);
    let pid = agent.proc.child.id();
    wait_version(&c, "updater", "0.1.1", Duration::from_secs(30)).await;
    assert_eq!(sha_hex(&std::fs::read(&exe).unwrap()), sha_hex(&v1));
    let record = wait_for(
        "the update to be confirmed",
        Duration::from_secs(10),
        || async {
            let r = update_record(&state)?;
            (r["outcome"]["state"] == "confirmed").then_some(r)
        },
    )
    .await;
    assert_eq!(
        (record["from"].as_str(), record["to"].as_str()),
        (Some("0.1.0"), Some("0.1.1"))
    );
    assert!(
        !home.path().join("nebula-agent.prev").exists(),
        "the old binary is gone once confirmed"
    );
    assert!(
        agent.proc.child.try_wait().unwrap().is_none(),
        "restarted in place (pid {pid})"
    );

    // A build that cannot reach the controller: swapped in, then the previous binary comes back.
    let broken = unreachable_build("0.1.2");
    put(&agents.path().join(&file), &broken);
    let record = wait_for(
        "the update to be rolled back",
        Duration::from_secs(40),
        || async {
            let r = update_record(&state)?;
            (r["to"] == "0.1.2" && r["outcome"]["state"] == "rolled_back").then_some(r)
        },
    )
    .await;
    assert!(record["outcome"]["reason"].as_str().is_some(), "{record}");
    wait_version(&c, "updater", "0.1.1", Duration::from_secs(30)).await;
    assert_eq!(sha_hex(&std::fs::read(&exe).unwrap()), sha_hex(&v1));
    let out = agent.proc.output();
    assert!(out.contains("update rolled back"), "{out}");
    // It does not try the same build again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        node_view(&c, "updater").await.unwrap().status,
        common::NodeStatus::Online
    );
    assert_eq!(sha_hex(&std::fs::read(&exe).unwrap()), sha_hex(&v1));
    assert_eq!(
        agent
            .proc
            .output()
            .matches("downloading a newer agent")
            .count(),
        2,
        "{}",
        agent.proc.output()
    );
}

/// With HTTPS from the fleet CA (which no public root vouches for), the dashboard's one-liner
/// pins the key the controller serves (`curl --pinnedpubkey`), and the script then trusts the
/// fleet CA it carries, checked against the join token's pin, for every download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_over_https_trusts_the_fleet_ca_the_dashboard_pins() {
    let agents = tempfile::tempdir().unwrap();
    put(&agents.path().join(platform_file()), &stamped("0.1.0"));
    let agent_dir: &'static str = Box::leak(agents.path().display().to_string().into_boxed_str());
    let c = Controller::start(ControllerOpts {
        extra: vec![
            "--https",
            "fleet-ca",
            "--release-scan-interval",
            "200ms",
            "--agent-dir",
            agent_dir,
        ],
        ..ControllerOpts::default()
    })
    .await;
    assert_eq!(c.scheme, "https");
    let password = crate::dashboard_http::first_admin_password(&c).await;
    let ca = std::fs::read(c.dir.path().join("data/pki/ca.crt")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = crate::dashboard_http::sign_in_with(http.clone(), &c, "admin", &password, false)
        .await
        .expect("signed in");
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let page = http
        .get(c.url("/ui/enroll"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = crate::dashboard_http::csrf_of(&page);
    let created = http
        .post(c.url("/ui/enroll"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str()), ("ttl", "1h"), ("uses", "1")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = created
        .split("id=\"install-linux\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| panic!("the Linux one-liner in: {created}"))
        .replace("&#39;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&");
    assert!(line.contains("--pinnedpubkey 'sha256//"), "{line}");
    assert!(line.contains(&c.url("/install.sh")), "{line}");
    let line = line.replace("| sudo sh", "| sh");

    let b = Box_::start();
    // Without the pin, curl refuses the certificate; with a wrong one too.
    let out = b.exec(&format!("curl -fsS {}", c.url("/install.sh")));
    assert!(!out.status.success(), "{}", text(&out));
    let fetch = line.split('|').next().unwrap();
    let wrong = fetch.replacen("sha256//", "sha256//AAAA", 1);
    let out = b.exec(&format!("{wrong} -o /dev/null"));
    assert!(!out.status.success(), "{}", text(&out));
    b.ok(&format!("{fetch} -o /dev/null"));
    let out = b.ok(&format!("{line} --name tls-box"));
    assert!(
        out.contains("checksum and signature verified (0.1.0)"),
        "{out}"
    );
    assert!(out.contains("installed and joined"), "{out}");
    let node = wait_version(&c, "tls-box", "0.1.0", Duration::from_secs(20)).await;
    assert_eq!(node.name, "tls-box");
}
