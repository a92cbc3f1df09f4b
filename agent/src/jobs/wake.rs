//! `wake` jobs: this agent relays a Wake-on-LAN magic packet onto its own LAN, where the
//! sleeping host is (a controller in the cloud cannot broadcast into a home network).
//!
//! The packet leaves from the local address on the broadcast address's network, so it goes out
//! of the right interface even on a host with several (Docker bridges, VLANs); with the limited
//! broadcast `255.255.255.255` it goes out of the default route's interface.

use std::net::{IpAddr, Ipv4Addr};

use nebula_protocol::jobs::{JobResult, JobStatus, LogStream, WakeSpec};

use super::JobContext;

pub async fn run(ctx: &JobContext, spec: &WakeSpec) -> JobResult {
    let broadcast: Ipv4Addr = match spec.broadcast.parse() {
        Ok(b) => b,
        Err(_) => {
            return JobResult::new(
                JobStatus::Refused,
                Some(format!(
                    "`{}` is not an IPv4 broadcast address",
                    spec.broadcast
                )),
            )
        }
    };
    let local = local_address_for(broadcast, &interface_networks());
    let mac = spec
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    if spec.port != 9 {
        return JobResult::new(
            JobStatus::Refused,
            Some(format!("magic packets go to UDP port 9, not {}", spec.port)),
        );
    }
    let port = 9;
    let target = wol::MacAddr(spec.mac);
    let sent = tokio::task::spawn_blocking(move || {
        wol::send_wol(
            target,
            Some(IpAddr::V4(broadcast)),
            Some(IpAddr::V4(local.unwrap_or(Ipv4Addr::UNSPECIFIED))),
        )
    })
    .await;
    match sent {
        Ok(Ok(())) => {
            ctx.log(
                LogStream::Agent,
                format!(
                    "sent a magic packet for {mac} to {broadcast}:{port} from {}",
                    local.map_or("the default interface".to_owned(), |a| a.to_string())
                ),
            );
            JobResult::new(JobStatus::Succeeded, None)
        }
        Ok(Err(e)) => JobResult::new(
            JobStatus::Failed,
            Some(format!(
                "sending the magic packet to {broadcast}:{port}: {e}"
            )),
        ),
        Err(e) => JobResult::new(JobStatus::Failed, Some(e.to_string())),
    }
}

/// The IPv4 networks of this host's interfaces: (address, prefix length).
fn interface_networks() -> Vec<(Ipv4Addr, u8)> {
    let networks = sysinfo::Networks::new_with_refreshed_list();
    networks
        .values()
        .flat_map(|n| n.ip_networks().iter())
        .filter_map(|net| match net.addr {
            IpAddr::V4(a) if !a.is_loopback() => Some((a, net.prefix)),
            _ => None,
        })
        .collect()
}

/// The local address on the network whose broadcast address is `broadcast` (or that contains
/// it); `None` for the limited broadcast or an unknown network.
pub fn local_address_for(broadcast: Ipv4Addr, networks: &[(Ipv4Addr, u8)]) -> Option<Ipv4Addr> {
    if broadcast == Ipv4Addr::BROADCAST {
        return None;
    }
    networks.iter().find_map(|(addr, prefix)| {
        let mask = if *prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from((*prefix).min(32)))
        };
        (u32::from(*addr) & mask == u32::from(broadcast) & mask).then_some(*addr)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_leaves_from_the_address_on_the_broadcast_network() {
        let nets = [
            ("172.17.0.1".parse().unwrap(), 16),
            ("192.168.77.2".parse().unwrap(), 24),
            ("10.0.0.5".parse().unwrap(), 8),
        ];
        assert_eq!(
            local_address_for("192.168.77.255".parse().unwrap(), &nets),
            Some("192.168.77.2".parse().unwrap())
        );
        assert_eq!(
            local_address_for("10.255.255.255".parse().unwrap(), &nets),
            Some("10.0.0.5".parse().unwrap())
        );
        assert_eq!(local_address_for(Ipv4Addr::BROADCAST, &nets), None);
        assert_eq!(
            local_address_for("203.0.113.255".parse().unwrap(), &nets),
            None
        );
    }
}
