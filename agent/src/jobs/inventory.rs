//! `inventory` jobs: containers, system facts, git repositories under the configured directories
//! (branch, commit, dirty) and the agent's version.

use std::path::{Path, PathBuf};

use nebula_protocol::jobs::{GitRepository, InventoryReport, JobOutput, JobResult, JobStatus};
use nebula_protocol::telemetry::ContainerInfo;
use nebula_protocol::{Labels, NodeFacts};
use tokio::process::Command;

/// How deep below a configured directory repositories are looked for.
const MAX_DEPTH: usize = 3;
/// Repositories reported at most (a directory full of checkouts stays a bounded answer).
const MAX_REPOS: usize = 256;

pub async fn run(facts: NodeFacts, repo_dirs: &[PathBuf], socket: Option<&str>) -> JobResult {
    let (containers, container_states) = containers(socket).await;
    let mut repositories = Vec::new();
    for path in find_repos(repo_dirs) {
        if let Some(r) = describe(&path).await {
            repositories.push(r);
        }
    }
    JobResult {
        output: JobOutput::Inventory(Box::new(InventoryReport {
            agent_version: crate::version().into(),
            facts,
            containers,
            container_states,
            repositories,
        })),
        ..JobResult::new(JobStatus::Succeeded, None)
    }
}

async fn containers(socket: Option<&str>) -> (Vec<ContainerInfo>, Labels) {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let Ok(docker) = crate::docker::connect(socket) else {
        return (Vec::new(), Labels::new());
    };
    let opts = ListContainersOptionsBuilder::default().all(true).build();
    let Ok(list) = docker.list_containers(Some(opts)).await else {
        return (Vec::new(), Labels::new());
    };
    let mut states = Labels::new();
    let containers = list
        .into_iter()
        .map(|c| {
            let id = c.id.unwrap_or_default();
            if let Some(state) = &c.state {
                states.insert(id.clone(), state.to_string());
            }
            ContainerInfo {
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                image: c.image.unwrap_or_default(),
                labels: c
                    .labels
                    .map(|l| l.into_iter().collect())
                    .unwrap_or_default(),
                created_unix: c.created.unwrap_or(0),
                id,
            }
        })
        .collect();
    (containers, states)
}

/// Directories holding a `.git` entry, at most [`MAX_DEPTH`] levels below each root. Symlinked
/// directories are not followed.
fn find_repos(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = roots.iter().map(|r| (r.clone(), 0)).collect();
    while let Some((dir, depth)) = stack.pop() {
        if found.len() >= MAX_REPOS {
            break;
        }
        if dir.join(".git").exists() {
            found.push(dir);
            continue;
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    found.sort();
    found
}

async fn git(repo: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn describe(repo: &Path) -> Option<GitRepository> {
    let commit = git(repo, &["rev-parse", "HEAD"]).await?;
    let branch = git(repo, &["symbolic-ref", "--short", "-q", "HEAD"])
        .await
        .filter(|b| !b.is_empty());
    let dirty = git(repo, &["status", "--porcelain"])
        .await
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    Some(GitRepository {
        path: repo.display().to_string(),
        branch,
        commit,
        dirty,
    })
}
