//! Built-in HTTPS on the controller's HTTP listener, with real TLS clients: the fleet CA's
//! certificate (trusted through the fleet CA only), HSTS for public names only, `Secure`
//! cookies, the plain listener's redirect, and certificate files replaced on disk while the
//! controller runs (a broken pair is not taken).

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sha2::{Digest, Sha256};

use crate::common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client trusting only `ca_pem`, which reports the certificate it was served.
fn client_trusting(ca_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .resolve(
            "nebula.example.net",
            "127.0.0.1:0".parse().unwrap(), // the port comes from the URL
        )
        .tls_info(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// SHA-256 of the leaf certificate an answer came with.
fn served(resp: &reqwest::Response) -> String {
    let info = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("TLS info");
    hex::encode(Sha256::digest(
        info.peer_certificate().expect("a certificate"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_ca_certificate_hsts_secure_cookies_and_the_redirect() {
    let redirect = free_port();
    let redirect_arg: &'static str = Box::leak(format!("127.0.0.1:{redirect}").into_boxed_str());
    let c = Controller::start(ControllerOpts {
        extra: vec![
            "--https",
            "fleet-ca",
            "--https-name",
            "127.0.0.1",
            "--https-name",
            "nebula.example.net",
            "--https-redirect-listen",
            redirect_arg,
        ],
        ..Default::default()
    })
    .await;
    assert_eq!(c.scheme, "https");
    let port = c.http.port();
    let ca = std::fs::read(c.dir.path().join("data/pki/ca.crt")).unwrap();
    let client = client_trusting(&ca);

    // The API over HTTPS, trusted through the fleet CA alone; a local address gets no HSTS.
    let resp = client
        .get(format!("https://127.0.0.1:{port}/api/v1/nodes"))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("strict-transport-security").is_none());
    // A public name does.
    let resp = client
        .get(format!("https://nebula.example.net:{port}/ui/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    // The sign-in form's cookie is `Secure` (and a client cannot talk it out of it).
    let cookie = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");

    // A client that trusts only the public roots refuses the certificate.
    let public_only = reqwest::Client::new()
        .get(format!("https://127.0.0.1:{port}/api/v1/nodes"))
        .send()
        .await;
    assert!(public_only.is_err(), "the fleet CA is not a public root");
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/v1/nodes"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "no API over plain HTTP"
    );

    // The plain listener sends everything to HTTPS, path and query kept.
    let resp = client
        .get(format!(
            "http://127.0.0.1:{redirect}/ui/login?next=%2Fui%2F"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://127.0.0.1:{port}/ui/login?next=%2Fui%2F").as_str()
    );

    // The CLI talks to it too, given the CA (`NEBULA_CA_FILE`).
    let ca_file = c.dir.path().join("data/pki/ca.crt");
    let out = std::process::Command::new(bin("nebula"))
        .args(["nodes"])
        .env("NEBULA_CONTROLLER", c.url(""))
        .env("NEBULA_TOKEN", &c.admin_token)
        .env("NEBULA_CA_FILE", &ca_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA of the test's own and a certificate for `localhost` from it.
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM, SHA-256 of the certificate).
    fn leaf(&self) -> (String, String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let digest = hex::encode(Sha256::digest(cert.der()));
        (cert.pem(), key.serialize_pem(), digest)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_are_served_and_reloaded_when_they_change() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (cert1, key1, first) = ca.leaf();
    std::fs::write(&cert_path, &cert1).unwrap();
    std::fs::write(&key_path, &key1).unwrap();
    let cert_arg: &'static str = Box::leak(cert_path.display().to_string().into_boxed_str());
    let key_arg: &'static str = Box::leak(key_path.display().to_string().into_boxed_str());
    let c = Controller::start(ControllerOpts {
        extra: vec!["--tls-cert-file", cert_arg, "--tls-key-file", key_arg],
        ..Default::default()
    })
    .await;
    assert_eq!(c.scheme, "https", "certificate files turn HTTPS on");
    let port = c.http.port();
    let client = client_trusting(ca.pem.as_bytes());
    let get = || async {
        // A new connection each time: a kept-alive one would show the old certificate.
        client_trusting(ca.pem.as_bytes())
            .get(format!("https://localhost:{port}/ui/login"))
            .send()
            .await
    };
    let resp = get().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(served(&resp), first);
    drop(client);

    // New files: served within the reload interval, without a restart.
    let (cert2, key2, second) = ca.leaf();
    std::fs::write(&key_path, &key2).unwrap();
    std::fs::write(&cert_path, &cert2).unwrap();
    wait_for(
        "the new certificate to be served",
        Duration::from_secs(20),
        || async { get().await.ok().filter(|r| served(r) == second).map(|_| ()) },
    )
    .await;

    // A broken pair (a key that is not the certificate's) is not taken: the last good one stays.
    let (_, other_key, _) = ca.leaf();
    std::fs::write(&key_path, &other_key).unwrap();
    wait_for(
        "the controller to refuse the broken pair",
        Duration::from_secs(20),
        || async {
            c.proc
                .output()
                .contains("HTTPS certificate not reloaded")
                .then_some(())
        },
    )
    .await;
    let resp = get().await.unwrap();
    assert_eq!(served(&resp), second, "the certificate in use stays");
}

/// tailscaled's local API on a Unix socket, as far as the controller uses it: a stand-in,
/// since no real tailscaled (and no tailnet or Let's Encrypt) can run here. It answers
/// `GET /localapi/v0/status` with a status document in tailscaled's own shape and
/// `GET /localapi/v0/cert/NAME?type=pair` with the key and chain in PEM, as tailscaled does.
async fn fake_tailscaled(
    socket: &std::path::Path,
    name: &'static str,
    pair_pem: String,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use axum::extract::Request;
    use axum::response::IntoResponse;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let status = serde_json::json!({
        "Version": "1.76.1-t1234567-g89abcdef",
        "BackendState": "Running",
        "AuthURL": "",
        "TailscaleIPs": ["100.101.102.103", "fd7a:115c:a1e0::1"],
        "Self": {
            "ID": "nABCDEF1CNTRL", "PublicKey": "nodekey:0123456789abcdef",
            "HostName": "box", "DNSName": format!("{name}."), "OS": "linux", "UserID": 1,
            "TailscaleIPs": ["100.101.102.103"], "Addrs": null, "CurAddr": "", "Relay": "fra",
            "RxBytes": 0, "TxBytes": 0,
            "Created": "2026-01-02T03:04:05Z", "LastWrite": "0001-01-01T00:00:00Z",
            "LastSeen": "0001-01-01T00:00:00Z", "LastHandshake": "0001-01-01T00:00:00Z",
            "Online": true, "ExitNode": false, "ExitNodeOption": false, "Active": false,
            "PeerAPIURL": ["http://100.101.102.103:40123"], "InNetworkMap": true,
            "InMagicSock": false, "InEngine": false
        },
        "Health": null,
        "CurrentTailnet": {"Name": "example.github", "MagicDNSSuffix": "tail1234.ts.net", "MagicDNSEnabled": true},
        "CertDomains": [name],
        "Peer": {},
        "User": {}
    });
    let app = axum::Router::new().fallback(move |req: Request| {
        let log = log.clone();
        let status = status.clone();
        let pair = pair_pem.clone();
        async move {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            log.lock().unwrap().push(path.clone());
            if path == "/localapi/v0/status" {
                axum::Json(status).into_response()
            } else if path == format!("/localapi/v0/cert/{name}?type=pair") {
                pair.into_response()
            } else {
                (axum::http::StatusCode::NOT_FOUND, "not found").into_response()
            }
        }
    });
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tailscale_source_serves_the_tailnet_name_from_tailscaled() {
    const NAME: &str = "box.tail1234.ts.net";
    let ca = TestCa::new();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![NAME.to_owned()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    let digest = hex::encode(Sha256::digest(leaf.der()));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tailscaled.sock");
    let seen = fake_tailscaled(
        &socket,
        NAME,
        format!("{}{}{}", key.serialize_pem(), leaf.pem(), ca.pem),
    )
    .await;
    let socket_arg: &'static str = Box::leak(socket.display().to_string().into_boxed_str());
    let c = Controller::start(ControllerOpts {
        extra: vec!["--https", "tailscale", "--tailscale-socket", socket_arg],
        ..Default::default()
    })
    .await;
    assert_eq!(c.scheme, "https");
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .resolve(NAME, "127.0.0.1:0".parse().unwrap())
        .tls_info(true)
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://{NAME}:{}/ui/login", c.http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(served(&resp), digest, "the certificate tailscaled gave");
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000",
        "a tailnet name is a public DNS name"
    );
    let asked = seen.lock().unwrap().clone();
    assert!(
        asked.contains(&"/localapi/v0/status".to_owned()),
        "{asked:?}"
    );
    assert!(
        asked.contains(&format!("/localapi/v0/cert/{NAME}?type=pair")),
        "{asked:?}"
    );

    // Without tailscaled the controller does not start, and says why.
    let out = std::process::Command::new(bin("nebula"))
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .args(["--https", "tailscale", "--tailscale-socket"])
        .arg(dir.path().join("missing.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tailscaled at"), "{err}");
}

/// Debian's `pebble` (a real ACME server, Let's Encrypt's test CA) on 127.0.0.1, serving its
/// directory over HTTPS with a certificate from `ca`, validating challenges on the given
/// ports of `localhost`.
struct Pebble {
    /// Killed on drop.
    proc: Proc,
    directory: String,
    management: u16,
}

impl Pebble {
    fn start(dir: &std::path::Path, ca: &TestCa, http_port: u16, tls_port: u16) -> Pebble {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca.issuer)
            .unwrap();
        std::fs::write(dir.join("pebble.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("pebble.key"), key.serialize_pem()).unwrap();
        let (listen, management) = (free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("pebble.crt"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let mut cmd = std::process::Command::new("pebble");
        cmd.arg("-config")
            .arg(dir.join("pebble.json"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0");
        let proc = Proc::spawn(cmd);
        Pebble {
            proc,
            directory: format!("https://localhost:{listen}/dir"),
            management,
        }
    }

    /// The root pebble issues under (made anew by every pebble process).
    async fn root(&self, ca: &TestCa) -> String {
        let client = client_trusting(ca.pem.as_bytes());
        let url = format!("https://localhost:{}/roots/0", self.management);
        wait_for("pebble's root", Duration::from_secs(20), || async {
            let r = client.get(&url).send().await.ok()?;
            r.status().is_success().then_some(())?;
            r.text().await.ok()
        })
        .await
    }
}

/// The certificate `localhost:port` serves, checked against `root` alone (a new connection).
async fn served_under(root: &str, port: u16) -> Option<String> {
    let resp = client_trusting(root.as_bytes())
        .get(format!("https://localhost:{port}/ui/login"))
        .send()
        .await
        .ok()?;
    resp.status().is_success().then(|| served(&resp))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_against_pebble_issues_keeps_and_renews_the_certificate() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (https_port, http_port) = (free_port(), free_port());
    let pebble = Pebble::start(dir.path(), &ca, http_port, https_port);
    let root = pebble.root(&ca).await;
    std::fs::write(dir.path().join("test-ca.pem"), &ca.pem).unwrap();
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let mut c = Controller::start(ControllerOpts {
        http_listen: Some(format!("127.0.0.1:{https_port}").parse().unwrap()),
        extra: vec![
            "--https",
            "acme",
            "--https-name",
            "localhost",
            "--acme-directory",
            leak(pebble.directory.clone()),
            "--acme-directory-ca-file",
            leak(dir.path().join("test-ca.pem").display().to_string()),
            "--acme-challenge",
            "tls-alpn-01",
            "--acme-contact",
            "mailto:ops@example.net",
            "--https-reload-interval",
            "1s",
        ],
        ..Default::default()
    })
    .await;
    assert_eq!(c.scheme, "https");
    // TLS-ALPN-01 on the HTTPS listener itself: pebble connects to it with `acme-tls/1`.
    let mut first = None;
    for _ in 0..120 {
        first = served_under(&root, https_port).await;
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Some(first) = first else {
        panic!(
            "no certificate from pebble\ncontroller:\n{}\npebble:\n{}",
            c.proc.output(),
            pebble.proc.output()
        );
    };
    let acme_dir = c.dir.path().join("data/acme");
    for f in ["account.json", "cert.pem", "key.pem"] {
        assert!(acme_dir.join(f).exists(), "{f} kept in the data dir");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(acme_dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A restart serves the kept certificate and orders nothing.
    c.restart_hard().await;
    assert_eq!(
        served_under(&root, https_port).await.as_deref(),
        Some(first.as_str())
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !c.proc.output().contains("ordering the HTTPS certificate"),
        "a certificate with most of its life left is kept"
    );

    // With the clock past two thirds of its life it is renewed, this time by HTTP-01 on the
    // plain listener (which otherwise redirects to HTTPS).
    let at = c
        .opts
        .extra
        .iter()
        .position(|a| *a == "tls-alpn-01")
        .unwrap();
    c.opts.extra[at] = "http-01";
    c.opts.extra.extend([
        "--https-clock-skew",
        "1500days",
        "--https-redirect-listen",
        leak(format!("127.0.0.1:{http_port}")),
    ]);
    c.restart_hard().await;
    let renewed = wait_for(
        "the renewed certificate",
        Duration::from_secs(60),
        || async {
            served_under(&root, https_port)
                .await
                .filter(|s| *s != first)
        },
    )
    .await;
    assert_ne!(renewed, first);
    let log = c.proc.output();
    assert!(log.contains("ordering the HTTPS certificate"), "{log}");
    assert!(
        pebble.proc.output().contains("Issued certificate"),
        "pebble says it issued: {}",
        pebble.proc.output()
    );
}
