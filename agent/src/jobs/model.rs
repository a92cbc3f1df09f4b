//! Model jobs: pull a model into Ollama (its streamed `/api/pull`, progress summed over every
//! layer into one figure), download a model file for a file-based backend (resumed from a
//! partial file, checked against its SHA-256, progress by bytes), delete, list. After a change
//! the backends are read again at once, so the inventory shows it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nebula_protocol::ai::{BackendKind, ModelAction, ModelSpec};
use nebula_protocol::jobs::{JobResult, JobStatus, LogStream};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::JobContext;
use crate::ai::Backends;

fn fail(msg: impl Into<String>) -> JobResult {
    JobResult::new(JobStatus::Failed, Some(msg.into()))
}

pub async fn run(ctx: &JobContext, spec: &ModelSpec, backends: &Backends) -> JobResult {
    let result = match &spec.action {
        ModelAction::Pull { name } => pull(ctx, spec.backend.as_deref(), name, backends).await,
        ModelAction::Delete { name } => delete(ctx, spec.backend.as_deref(), name, backends).await,
        ModelAction::Download { url, file, sha256 } => {
            download(ctx, url, file, sha256.as_deref(), backends).await
        }
        ModelAction::List => list(ctx, backends).await,
    };
    backends.refresh.notify_one();
    result
}

/// Per-layer byte counts from Ollama's pull stream, summed into one figure.
#[derive(Debug, Default)]
struct PullProgress {
    layers: BTreeMap<String, (u64, u64)>,
}

impl PullProgress {
    fn update(&mut self, line: &Value) -> Option<f32> {
        let digest = line.get("digest")?.as_str()?;
        let total = line.get("total").and_then(Value::as_u64).unwrap_or(0);
        let done = line.get("completed").and_then(Value::as_u64).unwrap_or(0);
        let e = self.layers.entry(digest.to_owned()).or_default();
        e.0 = e.0.max(total);
        e.1 = e.1.max(done.min(e.0));
        let (t, d) = self
            .layers
            .values()
            .fold((0u64, 0u64), |(t, d), (lt, ld)| (t + lt, d + ld));
        (t > 0).then(|| (d as f64 * 100.0 / t as f64) as f32)
    }
}

async fn pull(
    ctx: &JobContext,
    backend: Option<&str>,
    name: &str,
    backends: &Backends,
) -> JobResult {
    let Some((bname, kind, url)) = backends.pick(backend, BackendKind::Ollama) else {
        return JobResult::new(
            JobStatus::Refused,
            Some("no Ollama backend on this node".into()),
        );
    };
    if kind != BackendKind::Ollama {
        return JobResult::new(
            JobStatus::Refused,
            Some(format!(
                "{bname} is not an Ollama backend: use a download for file-based backends"
            )),
        );
    }
    ctx.log(LogStream::Agent, format!("pulling {name} into {bname}"));
    let resp = backends
        .client
        .post(format!("{url}/api/pull"))
        .json(&serde_json::json!({"model": name, "stream": true}))
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            return fail(format!("{url}/api/pull: HTTP {status}: {}", body.trim()));
        }
        Err(e) => return fail(format!("{url}/api/pull: {e}")),
    };
    let mut progress = PullProgress::default();
    let mut buf = Vec::new();
    let mut last_status = String::new();
    let mut last_sent = -1.0f32;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return fail(format!("the pull stream broke: {e}")),
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if let Some(err) = v.get("error").and_then(Value::as_str) {
                return fail(format!("Ollama: {err}"));
            }
            let status = v.get("status").and_then(Value::as_str).unwrap_or_default();
            if status != last_status && !status.starts_with("pulling ") || last_status.is_empty() {
                ctx.log(LogStream::Agent, status.to_owned());
            }
            if let Some(p) = progress.update(&v) {
                if p - last_sent >= 0.5 || p >= 100.0 {
                    last_sent = p;
                    ctx.progress(p, format!("{name}: {status}"));
                }
            }
            if status == "success" {
                ctx.progress(100.0, format!("{name}: pulled"));
                ctx.log(LogStream::Agent, format!("{name} pulled"));
                return JobResult::new(JobStatus::Succeeded, None);
            }
            last_status = status.to_owned();
        }
    }
    fail(format!(
        "the pull of {name} ended without success (last status: {last_status})"
    ))
}

async fn delete(
    ctx: &JobContext,
    backend: Option<&str>,
    name: &str,
    backends: &Backends,
) -> JobResult {
    let Some((bname, kind, url)) = backends.pick(backend, BackendKind::Ollama) else {
        return delete_file(ctx, name, backends).await;
    };
    if kind != BackendKind::Ollama {
        return delete_file(ctx, name, backends).await;
    }
    let resp = backends
        .client
        .delete(format!("{url}/api/delete"))
        .json(&serde_json::json!({"model": name}))
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => {
            ctx.log(LogStream::Agent, format!("{name} deleted from {bname}"));
            JobResult::new(JobStatus::Succeeded, None)
        }
        Ok(r) if r.status().as_u16() == 404 => fail(format!("{bname} has no model {name}")),
        Ok(r) => fail(format!("{url}/api/delete: HTTP {}", r.status().as_u16())),
        Err(e) => fail(format!("{url}/api/delete: {e}")),
    }
}

/// A file name inside the models directory (no paths, no hidden files).
fn safe_file(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
}

async fn delete_file(ctx: &JobContext, name: &str, backends: &Backends) -> JobResult {
    if !safe_file(name) {
        return JobResult::new(
            JobStatus::Refused,
            Some(format!("`{name}` is not a model file name")),
        );
    }
    let path = backends.models_dir.join(name);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {
            ctx.log(LogStream::Agent, format!("{} removed", path.display()));
            JobResult::new(JobStatus::Succeeded, None)
        }
        Err(e) => fail(format!("{}: {e}", path.display())),
    }
}

async fn download(
    ctx: &JobContext,
    url: &str,
    file: &str,
    sha256: Option<&str>,
    backends: &Backends,
) -> JobResult {
    if !safe_file(file) {
        return JobResult::new(
            JobStatus::Refused,
            Some(format!("`{file}` is not a model file name")),
        );
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return JobResult::new(
            JobStatus::Refused,
            Some("the URL must be http:// or https://".into()),
        );
    }
    let dir = &backends.models_dir;
    if let Err(e) = tokio::fs::create_dir_all(dir).await {
        return fail(format!("{}: {e}", dir.display()));
    }
    let dest = dir.join(file);
    let part = dir.join(format!("{file}.part"));
    // Resume: hash what is there, ask for the rest.
    let mut hasher = Sha256::new();
    let mut have = 0u64;
    if let Ok(mut f) = tokio::fs::File::open(&part).await {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    have += n as u64;
                }
                Err(e) => return fail(format!("{}: {e}", part.display())),
            }
        }
    }
    let mut req = backends
        .client
        .get(url)
        .timeout(Duration::from_secs(24 * 3600));
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        ctx.log(LogStream::Agent, format!("resuming {file} at {have} bytes"));
    }
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return fail(format!("{url}: {e}")),
    };
    let status = resp.status().as_u16();
    if have > 0 && status == 200 {
        // The server ignored the range: start over.
        have = 0;
        hasher = Sha256::new();
        ctx.log(
            LogStream::Agent,
            "the server does not resume; starting over".into(),
        );
    } else if !(200..300).contains(&status) {
        return fail(format!("{url}: HTTP {status}"));
    }
    let total = resp.content_length().map(|n| n + have);
    let mut out = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(have > 0)
        .write(true)
        .truncate(have == 0)
        .open(&part)
        .await
    {
        Ok(f) => f,
        Err(e) => return fail(format!("{}: {e}", part.display())),
    };
    let mut done = have;
    let mut last = -1.0f32;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                hasher.update(&c);
                if let Err(e) = out.write_all(&c).await {
                    return fail(format!("{}: {e}", part.display()));
                }
                done += c.len() as u64;
                if let Some(t) = total.filter(|t| *t > 0) {
                    let p = (done as f64 * 100.0 / t as f64) as f32;
                    if p - last >= 0.5 {
                        last = p;
                        ctx.progress(p, format!("{file}: {done} of {t} bytes"));
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = out.flush().await;
                return fail(format!(
                    "the download broke at {done} bytes (run it again to resume): {e}"
                ));
            }
        }
    }
    if let Err(e) = out.sync_all().await {
        return fail(format!("{}: {e}", part.display()));
    }
    drop(out);
    let actual = hex::encode(hasher.finalize());
    if let Some(want) = sha256 {
        if !actual.eq_ignore_ascii_case(want.trim()) {
            let _ = tokio::fs::remove_file(&part).await;
            return fail(format!(
                "checksum mismatch: downloaded {actual}, expected {want}; the file was removed"
            ));
        }
    }
    if let Err(e) = tokio::fs::rename(&part, &dest).await {
        return fail(format!("{}: {e}", dest.display()));
    }
    ctx.progress(100.0, format!("{file}: downloaded"));
    ctx.log(
        LogStream::Agent,
        format!("{} ({done} bytes, sha256 {actual})", dest.display()),
    );
    JobResult::new(JobStatus::Succeeded, None)
}

async fn list(ctx: &JobContext, backends: &Backends) -> JobResult {
    let dir: &Path = &backends.models_dir;
    if let Ok(mut rd) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            if let Ok(meta) = e.metadata().await {
                ctx.log(
                    LogStream::Stdout,
                    format!("file {} {}", e.file_name().to_string_lossy(), meta.len()),
                );
            }
        }
    }
    JobResult::new(JobStatus::Succeeded, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_progress_is_one_figure_over_all_layers() {
        let mut p = PullProgress::default();
        assert_eq!(
            p.update(&serde_json::json!({"status": "pulling manifest"})),
            None
        );
        let a =
            p.update(&serde_json::json!({"digest": "sha256:a", "total": 300, "completed": 150}));
        assert_eq!(a, Some(50.0));
        // A second layer appears: the figure is over both.
        let b = p.update(&serde_json::json!({"digest": "sha256:b", "total": 100, "completed": 0}));
        assert_eq!(b, Some(37.5));
        let c =
            p.update(&serde_json::json!({"digest": "sha256:b", "total": 100, "completed": 100}));
        assert_eq!(c, Some(62.5));
    }

    #[test]
    fn model_file_names_stay_inside_the_directory() {
        assert!(safe_file("SmolLM2-135M-Instruct.Q4_1.gguf"));
        for bad in ["../x.gguf", "a/b.gguf", ".hidden", ""] {
            assert!(!safe_file(bad), "{bad}");
        }
    }
}
