//! A small network lab made of namespaces (root only): the controller on the "cloud" side
//! (this namespace, reached over a veth at 10.77.N.1), a "home" namespace (10.77.N.2 on the
//! cloud link, 192.168.N.2 on the home LAN) and a "target" namespace on the home LAN only
//! (192.168.N.3). This namespace has no route into the home LAN. Removed on drop.

use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces and two veth pairs; removed on drop.
pub struct Lab {
    pub home: String,
    pub target: String,
    pub cloud_link: String,
    /// Third octet of 10.77.N.0/24 (cloud link) and 192.168.N.0/24 (home LAN).
    pub n: u32,
}

impl Lab {
    pub fn new() -> Lab {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        assert!(
            is_root,
            "the Wake-on-LAN test creates network namespaces and needs root"
        );
        // Distinct per lab: tests in one process may each build one at the same time.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id() % 100_000 * 10 + nth % 10;
        let n = 20 + id % 200;
        let lab = Lab {
            home: format!("nbhome{id}"),
            target: format!("nbtgt{id}"),
            cloud_link: format!("nbc{id}"),
            n,
        };
        let (home, target) = (lab.home.as_str(), lab.target.as_str());
        ip(&["netns", "add", home]);
        ip(&["netns", "add", target]);
        // Cloud link: this namespace <-> home (the relay's uplink).
        let peer = format!("nbh{id}");
        ip(&[
            "link",
            "add",
            &lab.cloud_link,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", home]);
        ip(&[
            "addr",
            "add",
            &format!("10.77.{n}.1/24"),
            "dev",
            &lab.cloud_link,
        ]);
        ip(&["link", "set", &lab.cloud_link, "up"]);
        ip(&[
            "-n",
            home,
            "addr",
            "add",
            &format!("10.77.{n}.2/24"),
            "dev",
            &peer,
        ]);
        ip(&["-n", home, "link", "set", &peer, "up"]);
        // Home LAN: home <-> target.
        let (lan_h, lan_t) = (format!("nbl{id}"), format!("nbt{id}"));
        ip(&[
            "-n", home, "link", "add", &lan_h, "type", "veth", "peer", "name", &lan_t,
        ]);
        ip(&["-n", home, "link", "set", &lan_t, "netns", target]);
        ip(&[
            "-n",
            home,
            "addr",
            "add",
            &format!("192.168.{n}.2/24"),
            "brd",
            "+",
            "dev",
            &lan_h,
        ]);
        ip(&["-n", home, "link", "set", &lan_h, "up"]);
        ip(&[
            "-n",
            target,
            "addr",
            "add",
            &format!("192.168.{n}.3/24"),
            "brd",
            "+",
            "dev",
            &lan_t,
        ]);
        ip(&["-n", target, "link", "set", &lan_t, "up"]);
        for ns in [home, target] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.home, &self.target] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.cloud_link])
            .output();
    }
}
