//! Who runs a backend found on a local port. Anything on this host can listen on 11434: the
//! inventory says whose it is, so that a person can tell their Ollama from someone else's.
//!
//! On Linux: the listening socket that takes `127.0.0.1:PORT` is looked up in `/proc/net/tcp`
//! and `/proc/net/tcp6` (its inode and owner uid), the uid named from `/etc/passwd`, and the
//! process holding the socket found by scanning `/proc/*/fd` for `socket:[INODE]` (processes of
//! the socket's uid first; at most [`MAX_FDS`] descriptors looked at; another user's processes
//! are only readable as root). The answer is kept per inode: a backend that keeps running is
//! looked up once, one restarted (a new socket) again. Elsewhere nothing is known.

use std::collections::HashMap;
use std::fmt;

/// The owner of a local listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    /// From `/etc/passwd`.
    pub user: Option<String>,
    /// The process holding the socket, and its command name, when visible.
    pub process: Option<(u32, String)>,
}

impl fmt::Display for Owner {
    /// `uid 1000 alice, pid 1234 ollama`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {}", self.uid)?;
        if let Some(u) = &self.user {
            write!(f, " {u}")?;
        }
        if let Some((pid, comm)) = &self.process {
            write!(f, ", pid {pid} {comm}")?;
        }
        Ok(())
    }
}

/// Descriptors looked at, at most, when looking for a socket's process (all of `/proc/*/fd`
/// on a busy host can be far more; a few thousand readlinks take milliseconds).
pub const MAX_FDS: usize = 20_000;

/// Owners already looked up, by socket inode.
#[derive(Debug, Default)]
pub struct Owners {
    by_inode: HashMap<u64, Owner>,
}

/// Sockets remembered at most (a host has a handful of backends).
const KEPT: usize = 64;

impl Owners {
    /// The owner of the socket listening where `127.0.0.1:port` connects, if it can be seen.
    pub fn of_port(&mut self, port: u16) -> Option<Owner> {
        let (inode, uid) = listening_socket(port)?;
        if let Some(o) = self.by_inode.get(&inode) {
            return Some(o.clone());
        }
        let owner = Owner {
            uid,
            user: std::fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|p| user_name(&p, uid)),
            process: process_of(inode, uid),
        };
        if self.by_inode.len() >= KEPT {
            self.by_inode.clear();
        }
        self.by_inode.insert(inode, owner.clone());
        Some(owner)
    }
}

/// The socket (inode, uid) listening on `port` that a connection to `127.0.0.1:port` reaches.
#[cfg(target_os = "linux")]
fn listening_socket(port: u16) -> Option<(u64, u32)> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|path| {
        let table = std::fs::read_to_string(path).ok()?;
        listener_in(&table, port)
    })
}

#[cfg(not(target_os = "linux"))]
fn listening_socket(_port: u16) -> Option<(u64, u32)> {
    None
}

/// `TCP_LISTEN` in the `st` column.
const LISTEN: &str = "0A";

/// In a `/proc/net/tcp` or `/proc/net/tcp6` table, the listening socket on `port` that takes
/// connections to `127.0.0.1`: bound to it, to any IPv4 address, to any IPv6 address (dual
/// stack), or to `::ffff:127.0.0.1`. Its (inode, uid).
pub fn listener_in(table: &str, port: u16) -> Option<(u64, u32)> {
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, st, uid, inode) = (f.get(1)?, f.get(3)?, f.get(7)?, f.get(9)?);
        if *st != LISTEN {
            return None;
        }
        let (addr, p) = local.split_once(':')?;
        if u16::from_str_radix(p, 16).ok()? != port || !reaches_loopback(addr) {
            return None;
        }
        let inode: u64 = inode.parse().ok()?;
        (inode != 0).then_some((inode, uid.parse().ok()?))
    })
}

/// Does a socket bound to this address (as the kernel prints it: each 32-bit word in hex, in
/// the host's byte order) take connections to `127.0.0.1`?
fn reaches_loopback(hex: &str) -> bool {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|i| {
            let w = hex.get(i * 8..i * 8 + 8)?;
            u32::from_str_radix(w, 16).ok().map(u32::to_ne_bytes)
        })
        .collect();
    let Some(words) = words.filter(|w| w.len() * 8 == hex.len()) else {
        return false;
    };
    let bytes: Vec<u8> = words.concat();
    match bytes.len() {
        4 => {
            let a = std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
            a.is_unspecified() || a == std::net::Ipv4Addr::LOCALHOST
        }
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&bytes);
            let a = std::net::Ipv6Addr::from(b);
            a.is_unspecified()
                || a.to_ipv4_mapped() == Some(std::net::Ipv4Addr::LOCALHOST)
                || a.to_ipv4_mapped() == Some(std::net::Ipv4Addr::UNSPECIFIED)
        }
        _ => false,
    }
}

/// The name of `uid` in an `/etc/passwd` text.
pub fn user_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        (f.next()?.parse::<u32>().ok()? == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

/// The process (pid, command) with `socket:[inode]` open, processes of `uid` first, looking at
/// no more than [`MAX_FDS`] descriptors.
#[cfg(target_os = "linux")]
fn process_of(inode: u64, uid: u32) -> Option<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let target = format!("socket:[{inode}]");
    let mut pids: Vec<(bool, u32)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let theirs = e.metadata().ok()?.uid() == uid;
            Some((!theirs, pid))
        })
        .collect();
    pids.sort_unstable();
    let mut budget = MAX_FDS;
    for (_, pid) in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            if budget == 0 {
                return None;
            }
            budget -= 1;
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default();
                return Some((pid, comm));
            }
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn process_of(_inode: u64, _uid: u32) -> Option<(u32, String)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/proc/net/tcp` as an x86 Linux prints it: port 11434 (0x2CAA) listening on 0.0.0.0
    /// by uid 1000, port 8080 (0x1F90) on another address only, port 8000 (0x1F40) on
    /// 127.0.0.1 by uid 0, and an established connection to 11434 (not a listener).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2CAA 0100007F:D1C2 01 00000000:00000000 00:00000000 00000000  1000        0 99999 1 0000000000000000 20 4 30 10 -1
   1: 00000000:2CAA 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000000000000000 100 0 0 10 0
   2: 0501A8C0:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 222 1 0000000000000000 100 0 0 10 0
   3: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0
";

    /// A `/proc/net/tcp6`: port 1234 (0x04D2) on `::` (dual stack), port 7860 (0x1EB4) on
    /// `::1` only (no IPv4 connection reaches it), port 8000 on `::ffff:127.0.0.1`.
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:04D2 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   998        0 4444 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1EB4 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   998        0 5555 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000    42        0 6666 1 0000000000000000 100 0 0 10 0
";

    #[cfg(target_endian = "little")]
    #[test]
    fn the_listener_that_takes_loopback_connections_is_found_in_the_tables() {
        assert_eq!(listener_in(TCP, 11434), Some((123456, 1000)));
        assert_eq!(listener_in(TCP, 8000), Some((333, 0)));
        assert_eq!(listener_in(TCP, 8080), None, "bound to 192.168.1.5 only");
        assert_eq!(listener_in(TCP, 1234), None);
        assert_eq!(listener_in(TCP6, 1234), Some((4444, 998)));
        assert_eq!(
            listener_in(TCP6, 7860),
            None,
            "::1 takes no IPv4 connection"
        );
        assert_eq!(listener_in(TCP6, 8000), Some((6666, 42)));
        assert_eq!(listener_in("", 11434), None);
        assert_eq!(
            listener_in("header\n 0: garbage 0A\n 1: 00000000:2CAA x 0A", 11434),
            None
        );
    }

    #[test]
    fn uids_are_named_from_passwd_and_owners_print_what_is_known() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# a comment\nbroken\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\nollama:x:998:998::/usr/share/ollama:/bin/false\n";
        assert_eq!(user_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_name(passwd, 998).as_deref(), Some("ollama"));
        assert_eq!(user_name(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_name(passwd, 4242), None);
        let o = Owner {
            uid: 1000,
            user: Some("alice".into()),
            process: Some((1234, "ollama".into())),
        };
        assert_eq!(o.to_string(), "uid 1000 alice, pid 1234 ollama");
        let bare = Owner {
            uid: 1001,
            user: None,
            process: None,
        };
        assert_eq!(bare.to_string(), "uid 1001");
    }

    /// A real listener opened here: found, owned by this test's uid, held by this process.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_listener_opened_by_this_test_is_owned_by_its_uid_and_process() {
        use std::os::unix::fs::MetadataExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let port = listener.local_addr().expect("its address").port();
        let me = std::fs::metadata("/proc/self").expect("/proc/self").uid();
        let mut owners = Owners::default();
        let owner = owners
            .of_port(port)
            .expect("the listener is in /proc/net/tcp");
        assert_eq!(owner.uid, me);
        let (pid, comm) = owner
            .process
            .clone()
            .expect("this process's own fds are readable");
        assert_eq!(pid, std::process::id());
        assert!(!comm.is_empty());
        if let Some(name) = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|p| user_name(&p, me))
        {
            assert_eq!(owner.user.as_deref(), Some(name.as_str()));
        }
        // Asked again, the same answer (from memory).
        assert_eq!(owners.of_port(port), Some(owner));
        drop(listener);
    }
}
