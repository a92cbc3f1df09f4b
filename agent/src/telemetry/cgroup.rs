//! Container CPU, memory and network counters read straight from the kernel (cgroup files and
//! `/proc/<pid>/net/dev`), as cAdvisor does. A few small file reads per container instead of an
//! HTTP request and a JSON document from the Docker daemon; containers whose files cannot be read
//! fall back to the daemon's stats API.

use std::path::{Path, PathBuf};

/// Where the kernel keeps container cgroups on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v1: separate `cpuacct` and `memory` hierarchies.
    V1 { root: PathBuf },
    /// cgroup v2: one unified hierarchy.
    V2 { root: PathBuf },
}

/// One reading of a container's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// CPU time used, nanoseconds.
    pub cpu_ns: u64,
    pub memory_used: u64,
    pub memory_limit: Option<u64>,
}

impl Layout {
    pub fn detect() -> Option<Layout> {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    pub fn detect_at(root: &Path) -> Option<Layout> {
        if root.join("cgroup.controllers").exists() {
            Some(Layout::V2 {
                root: root.to_owned(),
            })
        } else if root.join("cpuacct").is_dir() && root.join("memory").is_dir() {
            Some(Layout::V1 {
                root: root.to_owned(),
            })
        } else {
            None
        }
    }

    /// The container's cgroup directory under `base` for either Docker cgroup driver.
    fn dir(base: &Path, id: &str) -> Option<PathBuf> {
        [
            base.join("docker").join(id),
            base.join("system.slice").join(format!("docker-{id}.scope")),
        ]
        .into_iter()
        .find(|p| p.is_dir())
    }

    /// The directories holding one container's counters (found once, then reused).
    pub fn locate(&self, id: &str) -> Option<Dirs> {
        match self {
            Layout::V1 { root } => Some(Dirs::V1 {
                cpu: Self::dir(&root.join("cpuacct"), id)?,
                mem: Self::dir(&root.join("memory"), id)?,
            }),
            Layout::V2 { root } => Some(Dirs::V2(Self::dir(root, id)?)),
        }
    }

    pub fn read(&self, id: &str) -> Option<Counters> {
        self.locate(id)?.read()
    }
}

/// A container's cgroup directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dirs {
    V1 { cpu: PathBuf, mem: PathBuf },
    V2(PathBuf),
}

impl Dirs {
    pub fn read(&self) -> Option<Counters> {
        match self {
            Dirs::V1 { cpu, mem } => {
                let cpu_ns = read_u64(&cpu.join("cpuacct.usage"))?;
                let usage = read_u64(&mem.join("memory.usage_in_bytes"))?;
                let inactive = stat_value(
                    &mem.join("memory.stat"),
                    &["total_inactive_file", "inactive_file"],
                )
                .unwrap_or(0);
                let limit = read_u64(&mem.join("memory.limit_in_bytes")).filter(|l| *l < (1 << 62));
                Some(Counters {
                    cpu_ns,
                    memory_used: usage.saturating_sub(inactive.min(usage)),
                    memory_limit: limit,
                })
            }
            Dirs::V2(dir) => {
                let cpu_us = stat_value(&dir.join("cpu.stat"), &["usage_usec"])?;
                let usage = read_u64(&dir.join("memory.current"))?;
                let inactive =
                    stat_value(&dir.join("memory.stat"), &["inactive_file"]).unwrap_or(0);
                let limit = read_u64(&dir.join("memory.max"));
                Some(Counters {
                    cpu_ns: cpu_us.saturating_mul(1000),
                    memory_used: usage.saturating_sub(inactive.min(usage)),
                    memory_limit: limit,
                })
            }
        }
    }
}

/// Bytes received and sent by a container, from its init process's network namespace.
pub fn net_bytes(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    let mut rx = 0;
    let mut tx = 0;
    for line in text.lines().skip(2) {
        let (name, rest) = line.split_once(':')?;
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        rx += f.first().copied().unwrap_or(0);
        tx += f.get(8).copied().unwrap_or(0);
    }
    Some((rx, tx))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The first of `keys` found in a `key value` file such as `memory.stat`.
fn stat_value(path: &Path, keys: &[&str]) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    keys.iter().find_map(|k| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn reads_cgroup_v1_files() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(&r.join("cpuacct/docker/abc/cpuacct.usage"), "30347324\n");
        write(
            &r.join("memory/docker/abc/memory.usage_in_bytes"),
            "1658880\n",
        );
        write(
            &r.join("memory/docker/abc/memory.stat"),
            "cache 5\ninactive_file 1\ntotal_inactive_file 1318912\n",
        );
        write(
            &r.join("memory/docker/abc/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        let l = Layout::detect_at(r).unwrap();
        assert!(matches!(l, Layout::V1 { .. }));
        let c = l.read("abc").unwrap();
        assert_eq!(
            c,
            Counters {
                cpu_ns: 30347324,
                memory_used: 1658880 - 1318912,
                memory_limit: None
            }
        );
        assert!(l.read("missing").is_none());
    }

    #[test]
    fn reads_cgroup_v2_files_with_the_systemd_driver() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(&r.join("cgroup.controllers"), "cpu memory\n");
        let dir = r.join("system.slice/docker-abc.scope");
        write(&dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n");
        write(&dir.join("memory.current"), "4096000\n");
        write(&dir.join("memory.stat"), "anon 1\ninactive_file 96000\n");
        write(&dir.join("memory.max"), "max\n");
        let l = Layout::detect_at(r).unwrap();
        let c = l.read("abc").unwrap();
        assert_eq!(
            c,
            Counters {
                cpu_ns: 1_500_000,
                memory_used: 4_000_000,
                memory_limit: None
            }
        );
        write(&dir.join("memory.max"), "536870912\n");
        assert_eq!(l.read("abc").unwrap().memory_limit, Some(536870912));
    }
}
