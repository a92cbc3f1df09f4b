//! `http` jobs (a request from this host) and `infer` jobs (a request to one of this node's
//! inference backends, journalled like any job). Both answer with the status, the content type
//! and the body's first bytes; a status of 400 or more is still a finished request (the
//! controller decides what it means), only a request that could not be made fails the job.

use std::time::{Duration, Instant};

use nebula_protocol::ai::InferRequest;
use nebula_protocol::jobs::{
    HttpOutput, HttpSpec, JobOutput, JobResult, JobStatus, LogStream, MAX_HTTP_BODY,
};

use super::probe::error_chain;
use super::JobContext;

/// Longest an `http` job may take.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn run(ctx: &JobContext, spec: &HttpSpec) -> JobResult {
    if !HttpSpec::METHODS.contains(&spec.method.as_str()) {
        return refused(format!(
            "`{}` is not an HTTP method this agent sends",
            spec.method
        ));
    }
    let url = match reqwest::Url::parse(&spec.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => u,
        _ => return refused(format!("`{}` is not an http:// or https:// URL", spec.url)),
    };
    let timeout = Duration::from_millis(spec.timeout_ms.max(1).into()).min(MAX_TIMEOUT);
    let client = match reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("nebula-agent/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => return failed(format!("building the HTTP client: {e}")),
    };
    let method = reqwest::Method::from_bytes(spec.method.as_bytes()).expect("checked above");
    let mut req = client.request(method, url.clone());
    for (k, v) in &spec.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if !spec.body.is_empty() {
        req = req.body(spec.body.clone());
    }
    // Logged and reported without user information or query (either may hold a token).
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    if shown.query().is_some() {
        shown.set_query(Some("***"));
    }
    ctx.log(LogStream::Agent, format!("{} {shown}", spec.method));
    answer(ctx, req.send(), spec.max_bytes, timeout, &shown).await
}

/// An inference request to a backend of this node, with its whole answer.
pub async fn infer(
    ctx: &JobContext,
    req: &InferRequest,
    backends: &crate::ai::Backends,
) -> JobResult {
    let url = match backends.inference_url(&req.backend, &req.path) {
        Ok(u) => u,
        Err(e) => return refused(e),
    };
    let total = Duration::from_millis(req.total_timeout_ms.max(1).into());
    ctx.log(LogStream::Agent, format!("POST {url} ({})", req.backend));
    let sent = backends
        .client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(req.body.clone())
        .send();
    answer(ctx, sent, MAX_HTTP_BODY, total, &url).await
}

/// Wait for the response (within `timeout`, the body included) and keep its first
/// `max_bytes`.
async fn answer(
    ctx: &JobContext,
    sent: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    max_bytes: u32,
    timeout: Duration,
    url: &reqwest::Url,
) -> JobResult {
    let started = Instant::now();
    let max = max_bytes.min(MAX_HTTP_BODY) as usize;
    let read = async {
        let mut resp = sent.await.map_err(|e| error_chain(&e.without_url()))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| error_chain(&e.without_url()))?
        {
            let room = max - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok::<_, String>((status, content_type, body, truncated))
    };
    let (status, content_type, body, truncated) = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return failed(format!("{url}: {e}")),
        Err(_) => {
            return JobResult::new(
                JobStatus::TimedOut,
                Some(format!(
                    "{url} did not answer within {}",
                    humantime::format_duration(timeout)
                )),
            )
        }
    };
    let latency_us = started.elapsed().as_micros() as u64;
    ctx.log(
        LogStream::Agent,
        format!(
            "{status} {content_type}, {} bytes{} in {} ms",
            body.len(),
            if truncated { " (cut)" } else { "" },
            latency_us / 1000
        ),
    );
    JobResult {
        output: JobOutput::Http(HttpOutput {
            status,
            content_type,
            body,
            truncated,
            latency_us,
        }),
        ..JobResult::new(JobStatus::Succeeded, None)
    }
}

fn refused(why: String) -> JobResult {
    JobResult::new(JobStatus::Refused, Some(why))
}

fn failed(why: String) -> JobResult {
    JobResult::new(JobStatus::Failed, Some(why))
}
