//! One run of one check: HTTP (status, body, certificate expiry), TCP, ping, DNS, the
//! container runtime. Every run ends within its timeout and says why it is down.

use std::time::{Duration, Instant};

use nebula_protocol::monitors::{MonitorCheck, MonitorResult, MonitorSpec, MAX_ERROR_BYTES};
use nebula_protocol::time::UnixMillis;

/// What checks need from the agent.
#[derive(Debug, Default)]
pub struct CheckContext {
    /// The container runtime's socket from `[docker]`.
    pub docker_socket: Option<String>,
}

/// The most of a body read for `body_contains`.
const MAX_BODY: usize = 1 << 20;

#[derive(Default)]
struct Outcome {
    status: Option<u16>,
    cert_expires_ms: Option<i64>,
    method: Option<String>,
}

pub async fn run(ctx: &CheckContext, spec: &MonitorSpec) -> MonitorResult {
    let at_ms = UnixMillis::now().as_i64();
    let started = Instant::now();
    let timeout = Duration::from_millis(spec.timeout_ms.into());
    let mut outcome = Outcome::default();
    let result =
        match tokio::time::timeout(timeout, check(ctx, &spec.check, timeout, &mut outcome)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
        };
    let latency_us = started.elapsed().as_micros() as u64;
    let error = result.err().map(|mut e| {
        if e.len() > MAX_ERROR_BYTES {
            let mut cut = MAX_ERROR_BYTES;
            while !e.is_char_boundary(cut) {
                cut -= 1;
            }
            e.truncate(cut);
        }
        e
    });
    MonitorResult {
        name: spec.name.clone(),
        at_ms,
        up: error.is_none(),
        latency_us,
        status: outcome.status,
        cert_expires_ms: outcome.cert_expires_ms,
        method: outcome.method,
        error,
    }
}

async fn check(
    ctx: &CheckContext,
    check: &MonitorCheck,
    timeout: Duration,
    out: &mut Outcome,
) -> Result<(), String> {
    match check {
        MonitorCheck::Http {
            url,
            statuses,
            body_contains,
            insecure,
        } => {
            http(
                url,
                statuses,
                body_contains.as_deref(),
                *insecure,
                timeout,
                out,
            )
            .await
        }
        MonitorCheck::Tcp { address } => tokio::net::TcpStream::connect(address.as_str())
            .await
            .map(drop)
            .map_err(|e| format!("connect {address}: {e}")),
        MonitorCheck::Ping { host, tcp_port } => {
            let method = super::ping::ping(host, *tcp_port, timeout).await?;
            out.method = Some(method.into());
            Ok(())
        }
        MonitorCheck::Dns {
            name,
            record,
            server,
            expect,
        } => super::dns::check(name, *record, server.as_deref(), expect.as_deref(), timeout).await,
        MonitorCheck::Docker => {
            let docker = crate::docker::connect(ctx.docker_socket.as_deref())
                .map_err(|e| format!("no container runtime: {e}"))?;
            docker
                .ping()
                .await
                .map(drop)
                .map_err(|e| format!("the container runtime does not answer: {e}"))
        }
    }
}

async fn http(
    url: &str,
    statuses: &[u16],
    body_contains: Option<&str>,
    insecure: bool,
    timeout: Duration,
    out: &mut Outcome,
) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    }
    // A fresh connection each run: what is measured is what a new visitor gets; straight
    // from this node (never through a proxy from the environment), since what is checked is
    // what this node's network reaches.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(5))
        .pool_max_idle_per_host(0)
        .tls_info(true)
        .danger_accept_invalid_certs(insecure)
        .user_agent(concat!(
            "nebula-agent/",
            env!("CARGO_PKG_VERSION"),
            " monitor"
        ))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    let code = resp.status().as_u16();
    out.status = Some(code);
    out.cert_expires_ms = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .and_then(not_after_ms);
    let ok = if statuses.is_empty() {
        (200..400).contains(&code)
    } else {
        statuses.contains(&code)
    };
    if !ok {
        return Err(format!("HTTP {code}"));
    }
    if let Some(want) = body_contains {
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
        {
            body.extend_from_slice(&chunk);
            if body.len() >= MAX_BODY {
                break;
            }
        }
        if !String::from_utf8_lossy(&body).contains(want) {
            return Err(format!("the body does not contain `{want}`"));
        }
    }
    Ok(())
}

/// A certificate's end of validity (Unix milliseconds).
fn not_after_ms(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp() * 1000)
}

/// An error with its causes (reqwest's own message hides why a connection failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve(answer: &'static str) -> String {
        crate::tls::install_provider();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/health")
    }

    fn spec(check: MonitorCheck) -> MonitorSpec {
        MonitorSpec {
            name: "m".into(),
            check,
            interval_ms: 30_000,
            timeout_ms: 2_000,
        }
    }

    fn http_check(url: &str, statuses: Vec<u16>, body: Option<&str>) -> MonitorCheck {
        MonitorCheck::Http {
            url: url.into(),
            statuses,
            body_contains: body.map(Into::into),
            insecure: false,
        }
    }

    #[tokio::test]
    async fn http_checks_status_and_body() {
        let ctx = CheckContext::default();
        let ok =
            serve("HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nstatus=ok")
                .await;
        let r = run(&ctx, &spec(http_check(&ok, vec![], Some("status=ok")))).await;
        assert!(r.up, "{r:?}");
        assert_eq!(r.status, Some(200));
        let r = run(&ctx, &spec(http_check(&ok, vec![], Some("healthy")))).await;
        assert!(!r.up);
        assert!(r.error.unwrap().contains("does not contain `healthy`"));
        let r = run(&ctx, &spec(http_check(&ok, vec![204], None))).await;
        assert_eq!(
            r.error.as_deref(),
            Some("HTTP 200"),
            "only the statuses asked for"
        );
        let bad = serve(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let r = run(&ctx, &spec(http_check(&bad, vec![], None))).await;
        assert!(!r.up && r.status == Some(503), "{r:?}");
    }

    #[tokio::test]
    async fn tcp_and_unreachable_http_are_down_with_a_reason() {
        crate::tls::install_provider();
        let ctx = CheckContext::default();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let r = run(
            &ctx,
            &spec(MonitorCheck::Tcp {
                address: addr.clone(),
            }),
        )
        .await;
        assert!(r.up, "{r:?}");
        drop(l);
        // A port held bound but not listening: refused, and no other test can take it.
        let held =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        held.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        let addr = held.local_addr().unwrap().as_socket().unwrap().to_string();
        let r = run(
            &ctx,
            &spec(MonitorCheck::Tcp {
                address: addr.clone(),
            }),
        )
        .await;
        assert!(
            !r.up && r.error.as_ref().unwrap().contains("connect"),
            "{r:?}"
        );
        let r = run(
            &ctx,
            &spec(http_check(&format!("http://{addr}/"), vec![], None)),
        )
        .await;
        assert!(!r.up && r.error.as_ref().unwrap().contains("GET"), "{r:?}");
        let r = run(&ctx, &spec(http_check("ftp://x/", vec![], None))).await;
        assert!(r.error.unwrap().contains("not an http"));
    }

    /// An HTTPS server with a self-signed certificate valid until `not_after` (rustls over a
    /// blocking socket, one thread, `n` connections).
    fn https(not_after: std::time::SystemTime, n: usize) -> u16 {
        crate::tls::install_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let cfg = std::sync::Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], der)
                .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for tcp in listener.incoming().take(n) {
                let Ok(mut tcp) = tcp else { continue };
                let mut conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut buf = [0u8; 4096];
                if tls.read(&mut buf).is_ok() {
                    let _ = tls.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                    let _ = tls.flush();
                }
                conn.send_close_notify();
                let _ = conn.write_tls(&mut tcp);
            }
        });
        port
    }

    #[tokio::test]
    async fn https_reports_when_the_certificate_expires() {
        let ctx = CheckContext::default();
        let expires = std::time::UNIX_EPOCH + Duration::from_secs(1_924_992_000); // 2031-01-01
        let port = https(expires, 2);
        let url = format!("https://localhost:{port}/");
        let mut check = http_check(&url, vec![], Some("ok"));
        let r = run(&ctx, &spec(check.clone())).await;
        assert!(
            !r.up,
            "no root vouches for a self-signed certificate: {r:?}"
        );
        if let MonitorCheck::Http { insecure, .. } = &mut check {
            *insecure = true;
        }
        let r = run(&ctx, &spec(check)).await;
        assert!(r.up, "{r:?}");
        assert_eq!(r.cert_expires_ms, Some(1_924_992_000_000));
    }

    #[tokio::test]
    async fn a_check_that_hangs_ends_at_its_timeout() {
        crate::tls::install_provider();
        let ctx = CheckContext::default();
        // Accepts and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let mut s = spec(http_check(&url, vec![], None));
        s.timeout_ms = 300;
        let t = Instant::now();
        let r = run(&ctx, &s).await;
        assert!(!r.up);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(l);
    }
}
