//! `exec` jobs: named operations from this host's own allow-list ([`ExecConfig`]).
//!
//! [`resolve`] turns an operation and its arguments into a plan (a program to run, or a container
//! to restart) or a refusal; nothing runs unless the config allows it. Programs run without a
//! shell (except `sh` where `allow_any` is on), in their own process group, with stdin closed;
//! their stdout and stderr stream back line by line. Cancel or a deadline stops the whole group:
//! SIGTERM, then SIGKILL after a grace period.
//!
//! `git-pull` runs git as the repository's owner when the agent runs as root (so the owner's
//! config and credentials act with the owner's rights, never root's), keeps git's ownership
//! check on, and switches off hooks and fsmonitor: nothing from the repository runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nebula_protocol::jobs::{ExecSpec, JobResult, JobStatus, LogStream};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use super::{JobContext, Stop};
use crate::config::ExecConfig;

/// How long a stopped process group gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);

/// What an allowed operation does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Run {
        argv: Vec<String>,
        cwd: Option<PathBuf>,
    },
    /// `git pull --ff-only` in an allowed repository (its real path), as its owner.
    GitPull {
        repo: PathBuf,
    },
    DockerRestart {
        container: String,
    },
}

/// Check an operation against the allow-list. The error is a refusal for people.
pub fn resolve(cfg: &ExecConfig, spec: &ExecSpec) -> Result<Plan, String> {
    let args = &spec.args;
    let one_arg = |what: &str| -> Result<&str, String> {
        match args.as_slice() {
            [a] if !a.is_empty() => Ok(a.as_str()),
            _ => Err(format!("`{}` takes exactly one argument: {what}", spec.op)),
        }
    };
    match spec.op.as_str() {
        "git-pull" => {
            let repo = one_arg("the repository path")?;
            let repo = allowed_repo(cfg, Path::new(repo))?;
            Ok(Plan::GitPull { repo })
        }
        "systemctl-restart" => {
            let unit = one_arg("the unit name")?;
            if !cfg.systemd_units.iter().any(|u| u == unit) {
                return Err(format!(
                    "unit `{unit}` is not in this host's exec.systemd_units list"
                ));
            }
            Ok(Plan::Run {
                argv: vec!["systemctl".into(), "restart".into(), unit.into()],
                cwd: None,
            })
        }
        "docker-restart" => {
            let container = one_arg("the container name")?;
            // A name or id only: it goes into an API path, where `/`, `..` or `?` would reach
            // other endpoints.
            let valid = container.len() <= 128
                && container
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
                && container
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !valid {
                return Err(format!("`{container}` is not a container name or id"));
            }
            if !cfg
                .docker_containers
                .iter()
                .any(|c| c == "*" || c == container)
            {
                return Err(format!(
                    "container `{container}` is not in this host's exec.docker_containers list"
                ));
            }
            Ok(Plan::DockerRestart {
                container: container.into(),
            })
        }
        "sh" => {
            if !cfg.allow_any {
                return Err(
                    "arbitrary commands are off on this host (exec.allow_any = false)".into(),
                );
            }
            let script = one_arg("the shell command")?;
            Ok(Plan::Run {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                cwd: None,
            })
        }
        name => match cfg.commands.get(name) {
            Some(cmd) if !cmd.argv.is_empty() => {
                if !args.is_empty() && !cmd.accept_args {
                    return Err(format!(
                        "`{name}` is a fixed command on this host and takes no arguments"
                    ));
                }
                let mut argv = cmd.argv.clone();
                argv.extend(args.iter().cloned());
                Ok(Plan::Run {
                    argv,
                    cwd: cmd.cwd.clone(),
                })
            }
            _ => {
                let mut allowed: Vec<&str> = Vec::new();
                if !cfg.git_dirs.is_empty() {
                    allowed.push("git-pull");
                }
                if !cfg.systemd_units.is_empty() {
                    allowed.push("systemctl-restart");
                }
                if !cfg.docker_containers.is_empty() {
                    allowed.push("docker-restart");
                }
                if cfg.allow_any {
                    allowed.push("sh");
                }
                allowed.extend(cfg.commands.keys().map(String::as_str));
                let allowed = if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                };
                Err(format!(
                    "`{name}` is not an allowed operation on this host (allowed: {allowed})"
                ))
            }
        },
    }
}

/// A repository path is allowed when, with symlinks and `..` resolved, it lies inside one of the
/// configured directories (and exists).
fn allowed_repo(cfg: &ExecConfig, repo: &Path) -> Result<PathBuf, String> {
    if cfg.git_dirs.is_empty() {
        return Err("git-pull is off on this host (exec.git_dirs is empty)".into());
    }
    let real =
        std::fs::canonicalize(repo).map_err(|e| format!("repository `{}`: {e}", repo.display()))?;
    let inside = cfg.git_dirs.iter().any(|d| {
        std::fs::canonicalize(d)
            .map(|d| real.starts_with(&d))
            .unwrap_or(false)
    });
    if !inside {
        return Err(format!(
            "`{}` is outside the directories git-pull may touch on this host",
            real.display()
        ));
    }
    // The repository itself, not a directory inside one: git would otherwise search upwards
    // and could pull a repository outside the allowed directories.
    if !real.join(".git").exists() {
        return Err(format!("`{}` is not a git repository", real.display()));
    }
    Ok(real)
}

/// `git pull` with nothing of the repository's own running: no hooks (`core.hooksPath` at a
/// directory that holds none; git for Windows reads `/dev/null` as `NUL`), no fsmonitor
/// command. There is no `safe.directory` override: git's check that the repository belongs to
/// the user running it stays on ([`RunAs::owner_of`] makes that the owner). The repository's
/// other commands (`core.sshCommand`, `credential.helper`) are left alone: they run with the
/// rights of the repository's owner, who could run them anyway.
fn git_pull_argv(repo: &Path) -> Vec<String> {
    [
        "git",
        "-c",
        "core.hooksPath=/dev/null",
        "-c",
        "core.fsmonitor=false",
        "-C",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        repo.display().to_string(),
        "pull".into(),
        "--ff-only".into(),
    ])
    .collect()
}

/// Whom a program runs as when that is not the agent's own user.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(unix), allow(dead_code))]
struct RunAs {
    uid: u32,
    gid: u32,
    /// The user's home directory, or a path that does not exist (nothing for git to read).
    home: PathBuf,
    name: Option<String>,
}

/// Environment variables a program run as another user keeps; the rest of the agent's (its
/// HOME, XDG dirs, `GIT_*`, an SSH agent) stays out.
const KEPT_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
];

impl RunAs {
    /// The owner of `dir` (uid and gid of the directory itself) when the agent runs as root and
    /// the owner is not root; `None`: run as the agent.
    #[cfg(unix)]
    fn owner_of(dir: &Path) -> Result<Option<RunAs>, String> {
        use nix::unistd::{geteuid, Uid, User};
        use std::os::unix::fs::MetadataExt;
        if !geteuid().is_root() {
            return Ok(None);
        }
        let meta = std::fs::metadata(dir).map_err(|e| format!("`{}`: {e}", dir.display()))?;
        if meta.uid() == 0 {
            return Ok(None);
        }
        let user = User::from_uid(Uid::from_raw(meta.uid())).ok().flatten();
        let home = user
            .as_ref()
            .map(|u| u.dir.clone())
            .filter(|d| d.is_absolute() && d.is_dir())
            .unwrap_or_else(|| PathBuf::from("/nonexistent"));
        Ok(Some(RunAs {
            uid: meta.uid(),
            gid: meta.gid(),
            home,
            name: user.map(|u| u.name),
        }))
    }

    /// Elsewhere git runs as the agent; its own ownership check refuses others' repositories.
    #[cfg(not(unix))]
    fn owner_of(_dir: &Path) -> Result<Option<RunAs>, String> {
        Ok(None)
    }
}

/// Run a plan to the end (or until stopped).
pub async fn run(ctx: &JobContext, plan: Plan) -> JobResult {
    match plan {
        Plan::Run { argv, cwd } => run_program(ctx, &argv, cwd.as_deref(), None).await,
        Plan::GitPull { repo } => match RunAs::owner_of(&repo) {
            Ok(who) => run_program(ctx, &git_pull_argv(&repo), None, who.as_ref()).await,
            Err(e) => JobResult::new(
                JobStatus::Failed,
                Some(format!("finding the repository's owner: {e}")),
            ),
        },
        Plan::DockerRestart { container } => docker_restart(ctx, &container).await,
    }
}

async fn run_program(
    ctx: &JobContext,
    argv: &[String],
    cwd: Option<&Path>,
    run_as: Option<&RunAs>,
) -> JobResult {
    let Some((program, rest)) = argv.split_first() else {
        return JobResult::new(JobStatus::Refused, Some("empty command".into()));
    };
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut shown = shell_words(argv);
    if let Some(who) = run_as {
        // With the uid set, std also drops the agent's supplementary groups.
        #[cfg(unix)]
        cmd.uid(who.uid).gid(who.gid);
        cmd.env_clear();
        for key in KEPT_ENV {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        cmd.env("HOME", &who.home);
        if let Some(name) = &who.name {
            cmd.env("USER", name).env("LOGNAME", name);
        }
        shown.push_str(&format!(
            " as {} (uid {}, gid {})",
            who.name.as_deref().unwrap_or("the owner"),
            who.uid,
            who.gid
        ));
    }
    cmd.env("GIT_TERMINAL_PROMPT", "0");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    #[cfg(unix)]
    cmd.process_group(0);
    ctx.log(LogStream::Agent, format!("running {shown}"));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return JobResult::new(
                JobStatus::Failed,
                Some(format!("cannot start `{program}`: {e}")),
            )
        }
    };
    let pid = child.id();
    let out = child.stdout.take();
    let err = child.stderr.take();
    let stop;
    {
        let pumps = async {
            if let Some(o) = out {
                pump(ctx, o, LogStream::Stdout).await;
            }
        };
        let pumps_err = async {
            if let Some(e) = err {
                pump(ctx, e, LogStream::Stderr).await;
            }
        };
        let waited = async {
            // Output until the process exits; then a moment for what is still in the pipes (a
            // grandchild that keeps them open must not hold the job up).
            let output = async { tokio::join!(pumps, pumps_err) };
            tokio::pin!(output);
            tokio::select! {
                status = child.wait() => {
                    let _ = tokio::time::timeout(Duration::from_millis(500), &mut output).await;
                    status
                }
                _ = &mut output => child.wait().await,
            }
        };
        tokio::pin!(waited);
        stop = tokio::select! {
            status = &mut waited => return exited(status),
            stop = ctx.stopped() => stop,
        };
        // Stop the whole process group: first politely, then for good.
        signal_group(pid, false);
        if let Ok(status) = tokio::time::timeout(KILL_GRACE, &mut waited).await {
            let mut r = stop.result();
            r.exit_code = status.ok().and_then(|s| s.code());
            return r;
        }
    }
    signal_group(pid, true);
    let _ = child.start_kill();
    let mut r = stop.result();
    r.exit_code = child.wait().await.ok().and_then(|s| s.code());
    r
}

fn exited(status: std::io::Result<std::process::ExitStatus>) -> JobResult {
    match status {
        Ok(s) if s.success() => JobResult {
            exit_code: s.code(),
            ..JobResult::new(JobStatus::Succeeded, None)
        },
        Ok(s) => JobResult {
            exit_code: s.code(),
            ..JobResult::new(
                JobStatus::Failed,
                Some(match s.code() {
                    Some(c) => format!("exited with status {c}"),
                    None => format!("ended by {s}"),
                }),
            )
        },
        Err(e) => JobResult::new(
            JobStatus::Failed,
            Some(format!("waiting for the process: {e}")),
        ),
    }
}

/// Read lines (lossy UTF-8, cut at the protocol's limit) into the job's log.
async fn pump(ctx: &JobContext, stream: impl AsyncRead + Unpin, which: LogStream) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                ctx.log(which, String::from_utf8_lossy(&buf).into_owned());
            }
        }
    }
}

#[cfg(unix)]
fn signal_group(pid: Option<u32>, kill: bool) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let sig = if kill {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

#[cfg(not(unix))]
fn signal_group(_pid: Option<u32>, _kill: bool) {
    // Without process groups the child is stopped by `start_kill` after the grace period.
}

async fn docker_restart(ctx: &JobContext, container: &str) -> JobResult {
    use bollard::query_parameters::RestartContainerOptions;
    let docker = match ctx.docker() {
        Ok(d) => d,
        Err(e) => return JobResult::new(JobStatus::Failed, Some(e)),
    };
    ctx.log(
        LogStream::Agent,
        format!("restarting container {container}"),
    );
    let restart = docker.restart_container(container, None::<RestartContainerOptions>);
    tokio::select! {
        r = restart => match r {
            Ok(()) => {
                ctx.log(LogStream::Agent, format!("container {container} restarted"));
                JobResult::new(JobStatus::Succeeded, None)
            }
            Err(e) => JobResult::new(JobStatus::Failed, Some(format!("restarting {container}: {e}"))),
        },
        stop = ctx.stopped() => stop.result(),
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Stop {
    pub fn result(self) -> JobResult {
        match self {
            Stop::Cancelled(reason) => JobResult::new(JobStatus::Cancelled, Some(reason)),
            Stop::Deadline => JobResult::new(
                JobStatus::TimedOut,
                Some("the job's deadline passed; it was stopped".into()),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CommandConfig;

    fn spec(op: &str, args: &[&str]) -> ExecSpec {
        ExecSpec {
            op: op.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn only_the_allow_list_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("repos/app");
        std::fs::create_dir_all(inside.join(".git")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        let mut cfg = ExecConfig {
            git_dirs: vec![dir.path().join("repos")],
            systemd_units: vec!["nginx.service".into()],
            docker_containers: vec!["web".into()],
            ..ExecConfig::default()
        };
        cfg.commands.insert(
            "backup".into(),
            CommandConfig {
                argv: vec!["/bin/echo".into(), "ok".into()],
                cwd: None,
                accept_args: false,
            },
        );
        cfg.commands.insert(
            "say".into(),
            CommandConfig {
                argv: vec!["/bin/echo".into()],
                cwd: None,
                accept_args: true,
            },
        );
        assert!(matches!(
            resolve(&cfg, &spec("git-pull", &[inside.to_str().unwrap()])),
            Ok(Plan::GitPull { .. })
        ));
        // `..` and paths outside are refused, as are missing ones.
        let sneaky = inside.join("../../../");
        assert!(resolve(&cfg, &spec("git-pull", &[sneaky.to_str().unwrap()])).is_err());
        assert!(resolve(&cfg, &spec("git-pull", &[outside.path().to_str().unwrap()])).is_err());
        assert!(resolve(&cfg, &spec("git-pull", &["/nonexistent/repo"])).is_err());
        #[cfg(unix)]
        {
            let link = dir.path().join("repos/escape");
            std::os::unix::fs::symlink(outside.path(), &link).unwrap();
            assert!(resolve(&cfg, &spec("git-pull", &[link.to_str().unwrap()])).is_err());
        }
        assert!(resolve(&cfg, &spec("systemctl-restart", &["nginx.service"])).is_ok());
        assert!(resolve(&cfg, &spec("systemctl-restart", &["sshd.service"])).is_err());
        assert!(resolve(&cfg, &spec("docker-restart", &["web"])).is_ok());
        assert!(resolve(&cfg, &spec("docker-restart", &["db"])).is_err());
        cfg.docker_containers = vec!["*".into()];
        let bad = resolve(&cfg, &spec("docker-restart", &["x/../../volumes/prune?"])).unwrap_err();
        assert!(bad.contains("not a container name"), "{bad}");
        // The allowed root is not itself a repository: no upward search into another one.
        assert!(resolve(
            &cfg,
            &spec("git-pull", &[dir.path().join("repos").to_str().unwrap()])
        )
        .is_err());
        assert!(resolve(&cfg, &spec("backup", &[])).is_ok());
        assert!(resolve(&cfg, &spec("backup", &["--all"])).is_err());
        // A command that takes arguments gets each as one argv item, as given.
        match resolve(&cfg, &spec("say", &["a; rm -rf /", "$(reboot)"])) {
            Ok(Plan::Run { argv, .. }) => {
                assert_eq!(argv, vec!["/bin/echo", "a; rm -rf /", "$(reboot)"])
            }
            other => panic!("{other:?}"),
        }
        let refused = resolve(&cfg, &spec("sh", &["rm -rf /"])).unwrap_err();
        assert!(refused.contains("allow_any"), "{refused}");
        let unknown = resolve(&cfg, &spec("reboot", &[])).unwrap_err();
        assert!(unknown.contains("not an allowed operation"), "{unknown}");
        assert!(unknown.contains("backup"), "{unknown}");
        cfg.allow_any = true;
        assert!(resolve(&cfg, &spec("sh", &["uptime"])).is_ok());
        assert!(resolve(&cfg, &spec("sh", &[])).is_err());
    }

    #[test]
    fn git_pull_runs_no_hooks_and_keeps_the_ownership_check() {
        let argv = git_pull_argv(Path::new("/srv/app"));
        let line = argv.join(" ");
        assert_eq!(argv[0], "git");
        assert!(line.contains("-c core.hooksPath=/dev/null"), "{line}");
        assert!(line.contains("-c core.fsmonitor=false"), "{line}");
        assert!(line.contains("-C /srv/app pull --ff-only"), "{line}");
        assert!(!line.contains("safe.directory"), "{line}");
        // Options before the subcommand: `-c` after `pull` would mean something else.
        let pull = argv.iter().position(|a| a == "pull").unwrap();
        assert!(argv.iter().rposition(|a| a == "-c").unwrap() < pull);
    }

    /// A repository owned by another user (65534 when the tests run as root, as in CI), with a
    /// post-merge hook: a pull fast-forwards it, as that user, and the hook does not run.
    #[cfg(unix)]
    #[tokio::test]
    async fn git_pull_runs_as_the_repository_owner_and_not_its_hooks() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        use std::process::Command as Std;
        let root = nix::unistd::geteuid().is_root();
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let git = |args: &[&str]| {
            let out = Std::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                .args(args)
                .current_dir(&base)
                .output()
                .expect("run git");
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        git(&["init", "-q", "--bare", "-b", "main", "remote.git"]);
        git(&["init", "-q", "-b", "main", "work"]);
        std::fs::write(base.join("work/a"), "1").unwrap();
        git(&["-C", "work", "add", "a"]);
        git(&["-C", "work", "commit", "-q", "-m", "one"]);
        git(&["-C", "work", "push", "-q", "../remote.git", "main"]);
        std::fs::create_dir(base.join("repos")).unwrap();
        git(&["clone", "-q", "remote.git", "repos/app"]);
        std::fs::write(base.join("work/b"), "2").unwrap();
        git(&["-C", "work", "add", "b"]);
        git(&["-C", "work", "commit", "-q", "-m", "two"]);
        git(&["-C", "work", "push", "-q", "../remote.git", "main"]);
        let app = base.join("repos/app");
        let marker = base.join("hook-ran");
        let hook = app.join(".git/hooks/post-merge");
        std::fs::write(
            &hook,
            format!("#!/bin/sh\nid -u > '{}'\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        if root {
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
            let chown = Std::new("chown")
                .args(["-R", "65534:65534"])
                .arg(&base)
                .status()
                .expect("run chown");
            assert!(chown.success());
        }
        let cfg = ExecConfig {
            git_dirs: vec![base.join("repos")],
            ..ExecConfig::default()
        };
        let plan = resolve(&cfg, &spec("git-pull", &[app.to_str().unwrap()])).unwrap();
        let running = super::super::Running::new();
        let ctx = JobContext {
            running: running.clone(),
            deadline: None,
            docker_socket: None,
        };
        let result = run(&ctx, plan).await;
        let log: Vec<String> = running.read_from(0).0.into_iter().map(|l| l.line).collect();
        assert_eq!(result.status, JobStatus::Succeeded, "{result:?}\n{log:#?}");
        assert!(app.join("b").exists(), "the pull fast-forwarded: {log:#?}");
        assert!(
            !marker.exists(),
            "the repository's hook ran: {:?}",
            std::fs::read_to_string(&marker)
        );
        if root {
            assert!(log[0].contains("(uid 65534, gid 65534)"), "{log:#?}");
            let owner = std::fs::metadata(app.join("b")).unwrap().uid();
            assert_eq!(owner, 65534, "git ran as the repository's owner");
        }
    }
}
