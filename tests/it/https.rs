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
