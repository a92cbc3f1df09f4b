//! The dashboard in a real browser: Debian's headless Chromium driven through chromedriver
//! (WebDriver, with fantoccini), against a real controller, real agents and the real Docker
//! Engine. Every page visited is saved as a PNG under `target/screenshots/`.

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::docker::{docker, require, Containers, IMAGE};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// chromedriver on a free port, and a headless Chromium session through it.
struct Browser {
    driver: std::process::Child,
    client: Option<Client>,
    shots: PathBuf,
    /// The browser's own home (its certificate store), when it was told to trust a CA.
    _home: Option<tempfile::TempDir>,
}

impl Browser {
    async fn start() -> Browser {
        Self::launch(None).await
    }

    /// A browser whose certificate store (NSS, as Chromium on Linux reads it) trusts the CA
    /// in the PEM file `ca`, in a home of its own.
    async fn start_trusting(ca: &std::path::Path) -> Browser {
        Self::launch(Some(ca)).await
    }

    async fn launch(trust: Option<&std::path::Path>) -> Browser {
        for tool in ["chromium", "chromedriver"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                found,
                "{tool} is missing: the browser tests need Debian's chromium and chromium-driver (scripts/test installs them)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let home = trust.map(|ca| {
            let home = tempfile::tempdir().unwrap();
            let db = home.path().join(".pki/nssdb");
            std::fs::create_dir_all(&db).unwrap();
            let db = format!("sql:{}", db.display());
            for args in [
                vec!["-N", "-d", &db, "--empty-password"],
                vec!["-A", "-d", &db, "-t", "C,,", "-n", "nebula-fleet-ca", "-i"],
            ] {
                let mut cmd = Command::new("certutil");
                cmd.args(&args);
                if args[0] == "-A" {
                    cmd.arg(ca);
                }
                let out = cmd
                    .output()
                    .expect("certutil (Debian's libnss3-tools; scripts/test installs it)");
                assert!(
                    out.status.success(),
                    "certutil {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            home
        });
        let mut driver = Command::new("chromedriver");
        driver
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(h) = &home {
            driver.env("HOME", h.path());
        }
        let driver = driver.spawn().expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"]
            }
        }))
        .unwrap();
        let client = wait_for(
            "chromedriver to start a session",
            Duration::from_secs(30),
            || {
                let caps = caps.clone();
                let url = url.clone();
                async move {
                    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                    ClientBuilder::new(connector)
                        .capabilities(caps)
                        .connect(&url)
                        .await
                        .ok()
                }
            },
        )
        .await;
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver,
            client: Some(client),
            shots,
            _home: home,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn shot(&self, name: &str) {
        let png = self.c().screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// The text of the first element matching `css`, read in one script (live updates replace
    /// elements, so a found element may be gone by the time its text is asked for).
    async fn text(&self, css: &str) -> String {
        let v = self
            .c()
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                vec![json!(css)],
            )
            .await
            .unwrap();
        v.as_str()
            .unwrap_or_else(|| panic!("no element matches {css}"))
            .to_owned()
    }

    async fn has(&self, css: &str) -> bool {
        self.c()
            .execute(
                "return document.querySelector(arguments[0]) !== null;",
                vec![json!(css)],
            )
            .await
            .unwrap()
            == json!(true)
    }

    /// Wait for an element to exist (and return its text).
    async fn wait_text(&self, css: &str, timeout: Duration) -> String {
        wait_for(&format!("{css} to appear"), timeout, || async {
            if self.has(css).await {
                Some(self.text(css).await)
            } else {
                None
            }
        })
        .await
    }

    /// Fill in and send the sign-in form on the current page.
    async fn submit_login(&self, user: &str, password: &str) {
        let c = self.c();
        for (id, text) in [("username", user), ("password", password)] {
            c.find(Locator::Id(id))
                .await
                .unwrap()
                .send_keys(text)
                .await
                .unwrap();
        }
        c.find(Locator::Css("form.login button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn login(&self, base: &str, user: &str, password: &str) {
        let c = self.c();
        c.goto(&format!("{base}/ui/")).await.unwrap();
        assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
        self.submit_login(user, password).await;
        wait_for(
            "the overview after signing in",
            Duration::from_secs(10),
            || async {
                (self.has("h1").await && self.text("h1").await == "Command center").then_some(())
            },
        )
        .await;
    }

    /// `fetch` from the page (the session cookie goes along); the HTTP status.
    async fn post_status(&self, path: &str, fields: Value) -> u64 {
        let v = self
            .c()
            .execute_async(
                "const [path, fields, done] = arguments;
                 fetch(path, {method: 'POST', body: new URLSearchParams(fields), redirect: 'manual'})
                   .then(r => done(r.status)).catch(e => done(-1));",
                vec![json!(path), fields],
            )
            .await
            .unwrap();
        v.as_u64().unwrap_or(0)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // Ending the session needs the runtime; chromedriver's exit ends Chromium anyway.
            drop(c);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

pub(crate) async fn create_user(c: &Controller, name: &str, role: &str) -> String {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(json!({"username": name, "password": password, "role": role})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    password
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    require();
    let images = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/build-test-image"
    ))
    .output()
    .unwrap();
    assert!(images.status.success());
    let managed = common::docker::Managed::default();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--reconcile-interval", "2s"],
        ..Default::default()
    })
    .await;
    let base = c.url("");
    let admin_pw = create_user(&c, "ana", "admin").await;
    let viewer_pw = create_user(&c, "vic", "viewer").await;
    let b = Browser::start().await;

    // Wrong password: refused with a message, no session.
    b.c().goto(&format!("{base}/ui/login")).await.unwrap();
    b.shot("login").await;
    b.submit_login("ana", "not-it").await;
    let refused = b.wait_text(".error", Duration::from_secs(10)).await;
    assert!(refused.contains("wrong username or password"), "{refused}");

    // Log in; the overview is empty; a node card appears, live, when an agent joins.
    b.login(&base, "ana", &admin_pw).await;
    assert_eq!(b.text("h1").await, "Command center");
    assert!(!b.has("#node-web-host").await);
    let dir = tempfile::tempdir().unwrap();
    let token = c.token(1, "10m", json!({"zone": "home"})).await;
    // Restarting a managed container from the node page needs nothing more than the
    // agent's default `docker.control = "managed"`.
    let _agent = Agent::join_with_config(
        &c,
        &token,
        &dir.path().join("a"),
        "web-host",
        &[],
        "[docker]\ncontrol = \"managed\"\n",
    );
    let card = b.wait_text("#node-web-host", Duration::from_secs(30)).await;
    assert!(card.contains("web-host"), "{card}");
    let node = c
        .wait_status(
            "web-host",
            common::NodeStatus::Online,
            Duration::from_secs(20),
        )
        .await;
    let node_id = node.id.to_string();
    managed.add(&node_id);
    // Its telemetry arrives without a reload too.
    wait_for("the card's figures", Duration::from_secs(30), || async {
        b.text("#node-web-host")
            .await
            .contains("Containers")
            .then_some(())
    })
    .await;
    assert!(
        !b.has("#no-cards").await,
        "the empty-fleet note goes with the first card"
    );
    wait_for(
        "the topology to show the zone",
        Duration::from_secs(15),
        || async { b.text("#topology").await.contains("home").then_some(()) },
    )
    .await;
    b.shot("overview").await;

    // A container state change shows live: one that turns unhealthy.
    let ours = Containers::new();
    let sick = ours.run(
        &format!("sick-{}", &node_id[..8]),
        &[
            "--health-cmd",
            "false",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            IMAGE,
            "sleep",
            "600",
        ],
    );
    wait_for(
        "the card to show an unhealthy container",
        Duration::from_secs(30),
        || async {
            b.text("#node-web-host .containers")
                .await
                .contains("unhealthy")
                .then_some(())
        },
    )
    .await;
    b.shot("overview-unhealthy").await;
    docker(&["rm", "-f", &sick]);

    // Node page: charts, containers.
    b.c()
        .goto(&format!("{base}/ui/nodes/web-host"))
        .await
        .unwrap();
    assert!(b.has(".chart svg").await);
    assert_eq!(
        b.c().find_all(Locator::Css(".chart")).await.unwrap().len(),
        4
    );
    b.shot("node").await;

    // Plan then apply a service map from the UI: a running container.
    let map = "services:\n  hello:\n    image: nebula-test/web:v1\n    placement: { node: web-host }\n    health:\n      http: { port: 80, path: /healthz }\n      interval: 300ms\n";
    b.c().goto(&format!("{base}/ui/services")).await.unwrap();
    let area = b.c().find(Locator::Id("document")).await.unwrap();
    area.clear().await.unwrap();
    area.send_keys(map).await.unwrap();
    b.c()
        .find(Locator::Id("plan-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let plan = b.wait_text("#plan", Duration::from_secs(10)).await;
    assert!(plan.contains("create hello on web-host"), "{plan}");
    b.shot("services-plan").await;
    b.c()
        .find(Locator::Id("apply-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let applied = b.wait_text("#applied", Duration::from_secs(10)).await;
    assert!(applied.contains("Applied as version 1"), "{applied}");
    wait_for("hello to run", Duration::from_secs(60), || async {
        let ids = docker(&[
            "ps",
            "-q",
            "--filter",
            "label=nebula.service=hello",
            "--filter",
            &format!("label=nebula.node={node_id}"),
            "--filter",
            "status=running",
        ]);
        (!ids.is_empty()).then_some(())
    })
    .await;
    wait_for(
        "the services page to say converged",
        Duration::from_secs(30),
        || async {
            b.c().goto(&format!("{base}/ui/services")).await.ok()?;
            b.text("#service-hello")
                .await
                .contains("converged")
                .then_some(())
        },
    )
    .await;
    assert!(
        b.text("#history").await.contains("hello"),
        "deployment history"
    );
    b.shot("services").await;

    // Keyboard: every control is reachable by Tab (none taken out of the order), and Tab from
    // the top of the page reaches the Apply button.
    let unreachable = b
        .c()
        .execute(
            "return [...document.querySelectorAll('a[href],button,input:not([type=hidden]),select,textarea')].filter(e => e.tabIndex < 0).length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unreachable, json!(0));
    b.c()
        .execute(
            "document.activeElement && document.activeElement.blur(); window.focus();",
            vec![],
        )
        .await
        .unwrap();
    let mut reached = false;
    for _ in 0..80 {
        let el = b.c().active_element().await.unwrap();
        if el.attr("id").await.unwrap().as_deref() == Some("apply-button") {
            reached = true;
            break;
        }
        el.send_keys("\u{E004}").await.unwrap();
    }
    assert!(reached, "Tab reaches the Apply button");

    // Jobs: restart a container from the node page (a job); its page streams the log live.
    let hello = docker(&[
        "ps",
        "--format",
        "{{.Names}}",
        "--filter",
        "label=nebula.service=hello",
        "--filter",
        &format!("label=nebula.node={node_id}"),
    ]);
    b.c()
        .goto(&format!("{base}/ui/nodes/web-host"))
        .await
        .unwrap();
    let restart = format!("button[aria-label='Restart {hello}']");
    wait_for(
        "the container in the node's table",
        Duration::from_secs(20),
        || async {
            if b.has(&restart).await {
                Some(())
            } else {
                b.c().refresh().await.ok()?;
                None
            }
        },
    )
    .await;
    b.shot("node-containers").await;
    b.c()
        .find(Locator::Css(&restart))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the restart job to succeed, live",
        Duration::from_secs(30),
        || async {
            (b.has("#job-state").await
                && b.text("#job-state").await == "succeeded"
                && b.text("#log").await.contains("restarted"))
            .then_some(())
        },
    )
    .await;
    b.shot("job").await;
    b.c()
        .goto(&format!("{base}/ui/jobs?state=succeeded"))
        .await
        .unwrap();
    let jobs = b.text("table").await;
    assert!(
        jobs.contains(&format!("restart {hello}")) && jobs.contains("deploy hello"),
        "{jobs}"
    );
    b.shot("jobs").await;

    // Enrollment: a token and the one-line install commands.
    b.c().goto(&format!("{base}/ui/enroll")).await.unwrap();
    b.c()
        .find(Locator::Id("create-token"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let linux = b.wait_text("#install-linux", Duration::from_secs(10)).await;
    assert!(
        // The page names the address the browser used (plain HTTP here, no TLS proxy in front).
        linux.starts_with(&format!("curl -fsSL {base}/install.sh"))
            && linux.contains("/install.sh | sudo sh -s -- --token nebula-join:"),
        "{linux}"
    );
    assert!(b.text("#install-windows").await.contains("install.ps1"));
    b.shot("enroll").await;

    // Audit log.
    b.c().goto(&format!("{base}/ui/audit")).await.unwrap();
    let audit = b.text("table").await;
    assert!(
        audit.contains("desired.apply") && audit.contains("user.login"),
        "{audit}"
    );
    b.shot("audit").await;

    // A POST without the CSRF token is refused (as admin: the token is the only thing missing),
    // and changes nothing.
    let status = b
        .post_status("/ui/services/apply", json!({"document": "services: {}\n"}))
        .await;
    assert_eq!(status, 403);
    assert_eq!(desired_version(&c).await, Some(1));

    // Phone width: readable (no sideways scrolling).
    b.c().goto(&format!("{base}/ui/")).await.unwrap();
    b.c().set_window_size(390, 844).await.unwrap();
    let wide = b
        .c()
        .execute("return document.documentElement.scrollWidth", vec![])
        .await
        .unwrap();
    assert!(wide.as_u64().unwrap() <= 390, "scroll width {wide}");
    b.shot("overview-phone").await;
    b.c().set_window_size(1280, 900).await.unwrap();

    // Sign out; then a viewer: no Apply button, and its POST is refused anyway.
    b.c()
        .find(Locator::Css("header form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text("form.login", Duration::from_secs(10)).await;
    b.login(&base, "vic", &viewer_pw).await;
    b.c().goto(&format!("{base}/ui/services")).await.unwrap();
    assert!(b.has("#plan-button").await, "viewers may plan");
    assert!(
        !b.has("#apply-button").await,
        "no Apply button for a viewer"
    );
    assert!(!b.text("#services").await.contains("Roll back"));
    let csrf = b
        .c()
        .find(Locator::Css("#map-form input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let status = b
        .post_status(
            "/ui/services/apply",
            json!({"csrf": csrf, "document": "services: {}\n"}),
        )
        .await;
    assert_eq!(status, 403, "a viewer's apply is refused by the server");
    assert_eq!(desired_version(&c).await, Some(1));
    b.c().goto(&format!("{base}/ui/enroll")).await.unwrap();
    assert!(b.text("main").await.contains("needs the Admin role"));
    b.shot("viewer-services").await;
}

/// The Containers pages: the fleet's list (search), a container's page with its log followed
/// live and filtered by the search box, actions for operators only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_pages_follow_a_log_live_in_a_real_browser() {
    let ctrs = Containers::new();
    let c = Controller::start(ControllerOpts::default()).await;
    let base = c.url("");
    let admin_pw = create_user(&c, "ana", "admin").await;
    let viewer_pw = create_user(&c, "vic", "viewer").await;
    let dir = tempfile::tempdir().unwrap();
    // The container is not Nebula's: acting on it, or a shell in it, takes "all".
    let config = "[docker]\ncontrol = \"all\"\nexec = \"all\"\n";
    let (_agent, _) = join_ready(&c, dir.path(), "box", &[], Some(config)).await;
    let name = format!("ticker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    ctrs.run(
        &name,
        &[
            IMAGE,
            "sh",
            "-c",
            "i=0; while true; do echo \"tick $i\"; echo \"oops $i\" >&2; i=$((i+1)); sleep 0.2; done",
        ],
    );
    let b = Browser::start().await;
    b.login(&base, "ana", &admin_pw).await;
    let link = format!("a[href='/ui/nodes/box/containers/{name}']");
    wait_for(
        "the container in the list",
        Duration::from_secs(30),
        || async {
            b.c()
                .goto(&format!("{base}/ui/containers?q={name}"))
                .await
                .ok()?;
            b.has(&link).await.then_some(())
        },
    )
    .await;
    let table = b.text("#containers").await;
    assert!(
        table.contains("box") && table.contains("running") && table.contains("no"),
        "{table}"
    );
    b.shot("containers").await;
    // A search that matches nothing says so.
    b.c()
        .goto(&format!("{base}/ui/containers?q=no-such-thing-here"))
        .await
        .unwrap();
    assert!(b.has("#no-containers").await);

    b.c()
        .goto(&format!("{base}/ui/nodes/box/containers/{name}"))
        .await
        .unwrap();
    assert!(b.has("#action-stop").await, "an admin may act");
    // The log arrives live, stdout and stderr.
    wait_for("the log to follow", Duration::from_secs(20), || async {
        let log = b.text("#container-log").await;
        (log.contains("tick 3") && log.contains("oops 3")).then_some(())
    })
    .await;
    b.shot("container-log").await;
    // Each line shows within a second of being written (its runtime timestamp against the
    // browser's clock, on the same host), measured as lines are added to the page.
    b.c()
        .execute(
            "window.__lateness = [];
             new MutationObserver(ms => ms.forEach(m => m.addedNodes.forEach(n => {
               if (n.title) window.__lateness.push(Date.now() - Date.parse(n.title));
             }))).observe(document.getElementById('container-log'), {childList: true});",
            vec![],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lateness = b
        .c()
        .execute("return window.__lateness;", vec![])
        .await
        .unwrap();
    let lateness: Vec<f64> = serde_json::from_value(lateness).unwrap();
    assert!(lateness.len() >= 10, "lines kept coming: {lateness:?}");
    let worst = lateness.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "dashboard log lateness: {} lines, worst {worst} ms",
        lateness.len()
    );
    assert!(
        worst < 1000.0,
        "a line took {worst} ms to show: {lateness:?}"
    );
    // The search box keeps only the lines that contain it, also as new ones arrive.
    b.c()
        .find(Locator::Id("log-search"))
        .await
        .unwrap()
        .send_keys("oops")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let shown = b.text("#container-log").await;
    let lines: Vec<&str> = shown.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|l| l.starts_with("oops ")), "{lines:?}");
    b.shot("container-log-search").await;

    // A terminal: open it, type a command, read its output, leave with a status.
    b.c()
        .find(Locator::Id("terminal-open"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the terminal to connect",
        Duration::from_secs(15),
        || async { (b.text("#terminal-status").await == "connected").then_some(()) },
    )
    .await;
    let keys = b
        .c()
        .find(Locator::Css("#terminal .xterm-helper-textarea"))
        .await
        .unwrap();
    keys.send_keys("echo web-$((6*7))\u{E007}").await.unwrap();
    wait_for("the command's output", Duration::from_secs(15), || async {
        b.text("#terminal .xterm-rows")
            .await
            .contains("web-42")
            .then_some(())
    })
    .await;
    b.shot("container-terminal").await;
    keys.send_keys("exit 4\u{E007}").await.unwrap();
    wait_for("the shell to exit", Duration::from_secs(15), || async {
        (b.text("#terminal-status").await == "exited with status 4").then_some(())
    })
    .await;

    // Stop it from the page: a job, and the container is stopped.
    b.c()
        .find(Locator::Id("action-stop"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the stop job to succeed",
        Duration::from_secs(30),
        || async {
            (b.has("#job-state").await && b.text("#job-state").await == "succeeded").then_some(())
        },
    )
    .await;
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Status}}", &name]),
        "exited"
    );

    // The node's disk usage, its images and volumes, and a prune that removes what it showed.
    let tag = format!(
        "nebula-test/dash-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let image = crate::containers::unique_image(&format!("{tag}:1"));
    b.c().goto(&format!("{base}/ui/nodes/box")).await.unwrap();
    let usage = b.wait_text("#disk-usage", Duration::from_secs(10)).await;
    assert!(
        usage.contains("Images") && usage.contains("reclaimable"),
        "{usage}"
    );
    b.c()
        .goto(&format!("{base}/ui/nodes/box/storage"))
        .await
        .unwrap();
    let images = b.text("#images").await;
    assert!(
        images.contains(&format!("{tag}:1")) && images.contains("unused"),
        "{images}"
    );
    b.shot("node-storage").await;
    b.c()
        .find(Locator::Id("prune-match"))
        .await
        .unwrap()
        .send_keys(&tag)
        .await
        .unwrap();
    b.c()
        .find(Locator::Id("prune-preview"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let list = b.wait_text("#prune-list", Duration::from_secs(15)).await;
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(list.contains(&format!("{tag}:1")), "{list}");
    b.shot("prune-preview").await;
    b.c()
        .find(Locator::Id("prune-confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let result = b.wait_text("#prune-result", Duration::from_secs(30)).await;
    assert!(result.starts_with("Removed 1,"), "{result}");
    let gone = Command::new("docker")
        .args(["image", "inspect", &image])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the image is gone");

    // A viewer sees the page and the log, and no actions.
    b.c()
        .find(Locator::Css("header form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text("form.login", Duration::from_secs(10)).await;
    b.login(&base, "vic", &viewer_pw).await;
    b.c()
        .goto(&format!("{base}/ui/nodes/box/containers/{name}"))
        .await
        .unwrap();
    b.wait_text("#container-log", Duration::from_secs(10)).await;
    assert!(!b.has("#action-stop").await, "no actions for a viewer");
    assert!(!b.has("#terminal-open").await, "no terminal for a viewer");
}

/// The Models and Chat pages. The backend is the Ollama stand-in (no real Ollama can run here):
/// it reports its models, pulls with Ollama's streamed progress and echoes chat prompts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_chat_pages_in_a_real_browser() {
    let backend = common::fake_ollama::FakeOllama::start(&[("llama3:latest", true)]).await;
    // A pull long enough (about 4 s) for the page's once-a-second refresh to show it under way.
    backend.state.lock().unwrap().pull_step = Duration::from_millis(160);
    let c = Controller::start(ControllerOpts::default()).await;
    let base = c.url("");
    let pw = create_user(&c, "mo", "operator").await;
    let dir = tempfile::tempdir().unwrap();
    let token = c.token(1, "10m", json!({})).await;
    let config = format!(
        "[ai]\ndiscover = false\npoll_interval = \"300ms\"\n[[ai.backends]]\nkind = \"ollama\"\nurl = \"{}\"\n",
        backend.url()
    );
    let _agent =
        Agent::join_with_config(&c, &token, &dir.path().join("gpu"), "gpu-box", &[], &config);
    c.wait_status(
        "gpu-box",
        common::NodeStatus::Online,
        Duration::from_secs(20),
    )
    .await;
    let b = Browser::start().await;
    b.login(&base, "mo", &pw).await;

    // Inventory per node and backend.
    b.c().goto(&format!("{base}/ui/models")).await.unwrap();
    let table = b.wait_text("#model-table", Duration::from_secs(15)).await;
    assert!(
        table.contains("gpu-box") && table.contains("llama3:latest") && table.contains("loaded"),
        "{table}"
    );

    // Pull a model from the page: progress shows live, then the model is in the table.
    b.c()
        .find(Locator::Css("#pull-form input[name=name]"))
        .await
        .unwrap()
        .send_keys("mistral:7b")
        .await
        .unwrap();
    b.c()
        .find(Locator::Css("#pull-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let progress = b
        .wait_text("#models progress", Duration::from_secs(10))
        .await;
    let _ = progress;
    b.shot("models-pulling").await;
    wait_for(
        "mistral:7b in the inventory table",
        Duration::from_secs(20),
        || async {
            let t = b.text("#models").await;
            (t.contains("mistral:7b") && !b.has("#models progress").await).then_some(())
        },
    )
    .await;
    b.shot("models").await;

    // Chat: the answer streams in, and the page says which node served it.
    b.c().goto(&format!("{base}/ui/chat")).await.unwrap();
    b.c()
        .find(Locator::Id("chat-input"))
        .await
        .unwrap()
        .send_keys("Hello from the dashboard chat")
        .await
        .unwrap();
    b.c()
        .find(Locator::Id("chat-send"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the streamed answer", Duration::from_secs(15), || async {
        let log = b.text("#chat-log").await;
        log.contains("Assistant: Hello from the dashboard chat")
            .then_some(())
    })
    .await;
    assert_eq!(b.text("#chat-node").await, "served by gpu-box");
    b.shot("chat").await;
    // Without the CSRF token the chat endpoint refuses.
    let status = b
        .c()
        .execute_async(
            "const done = arguments[0];
             fetch('/ui/chat/send', {method: 'POST', headers: {'content-type': 'application/json'},
               body: JSON.stringify({model: 'llama3', messages: []})}).then(r => done(r.status));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(403));
}

async fn desired_version(c: &Controller) -> Option<i64> {
    let d: nebula_types::api::desired::DesiredView = c.get_as("/api/v1/desired").await;
    d.version
}

/// Built-in HTTPS with a certificate from the fleet CA: a browser told to trust that CA (and
/// nothing else) signs in, and the session cookie carries `Secure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_over_https_with_the_fleet_ca() {
    let c = Controller::start(ControllerOpts {
        extra: vec!["--https", "fleet-ca", "--https-name", "127.0.0.1"],
        ..Default::default()
    })
    .await;
    assert_eq!(c.scheme, "https", "the controller says it serves HTTPS");
    let password = crate::dashboard_http::first_admin_password(&c).await;
    let ca = c.dir.path().join("data/pki/ca.crt");
    let b = Browser::start_trusting(&ca).await;
    let base = c.url("");
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    b.login(&base, "admin", &password).await;
    let url = b.c().current_url().await.unwrap();
    assert_eq!(url.scheme(), "https");
    let cookies = b.c().get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|k| k.name() == "nebula_session")
        .expect("the session cookie");
    assert_eq!(session.secure(), Some(true), "{session:?}");
    assert_eq!(session.http_only(), Some(true), "{session:?}");
    b.shot("https-overview").await;

    // A browser that was not told to trust the CA gets no page from it.
    let untrusting = Browser::start().await;
    untrusting.c().goto(&format!("{base}/ui/login")).await.ok();
    assert!(
        !untrusting.has("form.login").await,
        "an untrusted certificate must not show the sign-in form"
    );
}

/// Replicas on PostgreSQL: a browser signed in on a follower's address, and the AI gateway
/// reached through that address, keep working while the leader is killed. The follower passes
/// requests on to whichever replica leads, and serves the page's live stream itself: the page
/// stays open through the failover and receives the node's live updates from the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_gateway_through_a_leader_kill_on_a_follower() {
    let Some(db) = common::pg::PgDb::create() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let mut all = crate::ha::three(&db, work.path()).await;
    let mut alive = vec![true; 3];
    let (lead, _) = crate::ha::leader(&all, &alive, Duration::from_secs(20)).await;
    let follower = (lead + 1) % 3;
    let backend = common::fake_ollama::FakeOllama::start(&[("llama3", true)]).await;
    let agent =
        crate::ai::agent(&all[lead], work.path(), "gpu-box", "ollama", &backend.url()).await;
    let (f_client, f_base, f_token) = (
        all[follower].client.clone(),
        all[follower].url(""),
        all[follower].admin_token.clone(),
    );
    let chat = || async {
        f_client
            .post(format!("{f_base}/v1/chat/completions"))
            .bearer_auth(&f_token)
            .json(&json!({"model": "llama3", "messages": [{"role": "user", "content": "ping"}]}))
            .send()
            .await
            .unwrap()
    };
    wait_for(
        "the gateway through the follower",
        Duration::from_secs(30),
        || async { (chat().await.status() == 200).then_some(()) },
    )
    .await;

    let pw = create_user(&all[follower], "ana", "admin").await;
    let b = Browser::start().await;
    b.login(&f_base, "ana", &pw).await;
    b.wait_text("#node-gpu-box", Duration::from_secs(20)).await;

    b.c()
        .execute("window.__before_failover = true;", vec![])
        .await
        .unwrap();
    // The agent has heard of every replica (sent within a renewal of the list changing).
    wait_for(
        "the agent to know every replica",
        Duration::from_secs(10),
        || async {
            let state = std::fs::read_to_string(work.path().join("gpu-box/agent.json")).ok()?;
            let v: Value = serde_json::from_str(&state).ok()?;
            (v["replicas"].as_array()?.len() == 3).then_some(())
        },
    )
    .await;
    all[lead].proc.kill();
    alive[lead] = false;
    let (now_leads, _) = crate::ha::leader(&all, &alive, Duration::from_secs(15)).await;
    let back = tokio::time::timeout(
        Duration::from_secs(30),
        all[now_leads].wait_status(
            "gpu-box",
            common::NodeStatus::Online,
            Duration::from_secs(31),
        ),
    )
    .await;
    assert!(
        back.is_ok(),
        "the agent did not come back:\n{}\n{:?}",
        agent.proc.output(),
        std::fs::read_to_string(work.path().join("gpu-box/agent.json"))
    );
    run_js(
        &b,
        "document.getElementById('node-gpu-box').dataset.mark = 'old';",
    )
    .await
    .unwrap();
    // The page's stream is the follower's own (events reach it from whichever replica leads),
    // so the page stays as it is, and a live update from the new leader replaces the card
    // (the mark set on the card goes with the old element).
    wait_for(
        "a live node update from the new leader",
        Duration::from_secs(40),
        || async {
            let v = run_js(
                &b,
                "const e = document.getElementById('node-gpu-box');
                    return !!e && !e.dataset.mark && e.dataset.status === 'online';",
            )
            .await?;
            (v == json!(true)).then_some(())
        },
    )
    .await;
    assert_eq!(
        run_js(&b, "return window.__before_failover === true;").await,
        Some(json!(true)),
        "the page was loaded again: its stream ended with the leader"
    );
    let card = b.text("#node-gpu-box").await;
    assert!(card.contains("gpu-box"), "{card}");
    b.shot("failover-follower").await;
    // The gateway through the same follower answers again, from the node's backend.
    wait_for(
        "the gateway after the failover",
        Duration::from_secs(30),
        || async {
            let r = chat().await;
            (r.status() == 200).then_some(())
        },
    )
    .await;
}

/// Run a script in the page; its value (`None` when the page was between loads).
async fn run_js(b: &Browser, script: &str) -> Option<Value> {
    b.c().execute(script, vec![]).await.ok()
}
