//! `probe` jobs: an HTTP GET or a TCP connect from this host, with a timeout. The result carries
//! whether it worked, the HTTP status and the latency; a probe that fails is a finished job whose
//! output says why (the job itself only fails when the probe could not be attempted).

use std::time::{Duration, Instant};

use nebula_protocol::jobs::{JobOutput, JobResult, JobStatus, LogStream, ProbeOutput, ProbeSpec};

use super::JobContext;

/// Longest timeout a probe may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(ctx: &JobContext, spec: &ProbeSpec) -> JobResult {
    let started = Instant::now();
    let (ok, status, error) = match spec {
        ProbeSpec::Tcp {
            address,
            timeout_ms,
        } => {
            let timeout = limit(*timeout_ms);
            ctx.log(LogStream::Agent, format!("tcp connect {address}"));
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address.as_str()))
                .await
            {
                Ok(Ok(_)) => (true, None, None),
                Ok(Err(e)) => (false, None, Some(format!("connect {address}: {e}"))),
                Err(_) => (
                    false,
                    None,
                    Some(format!(
                        "no connection within {}",
                        humantime::format_duration(timeout)
                    )),
                ),
            }
        }
        ProbeSpec::Http { url, timeout_ms } => {
            let timeout = limit(*timeout_ms);
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return JobResult::new(
                    JobStatus::Refused,
                    Some(format!("`{url}` is not an http:// or https:// URL")),
                );
            }
            ctx.log(LogStream::Agent, format!("GET {url}"));
            match http_get(url, timeout).await {
                Ok(code) => ((200..400).contains(&code), Some(code), None),
                Err(e) => (false, None, Some(e)),
            }
        }
    };
    let latency_us = started.elapsed().as_micros() as u64;
    if let Some(e) = &error {
        ctx.log(LogStream::Agent, e.clone());
    }
    JobResult {
        output: JobOutput::Probe(ProbeOutput {
            ok,
            status,
            latency_us,
            error,
        }),
        ..JobResult::new(JobStatus::Succeeded, None)
    }
}

fn limit(timeout_ms: u32) -> Duration {
    Duration::from_millis(timeout_ms.max(1).into()).min(MAX_TIMEOUT)
}

async fn http_get(url: &str, timeout: Duration) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("nebula-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    Ok(resp.status().as_u16())
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
