//! Ping: an ICMP echo where this host permits one (an unprivileged ping socket, else a raw
//! socket with `CAP_NET_RAW`), else a TCP connect to a port, where a refusal counts as an
//! answer (the host is there; the port is closed).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Ping `host`; the method used (`icmp` or `tcp`) when it answered.
pub async fn ping(host: &str, tcp_port: u16, timeout: Duration) -> Result<&'static str, String> {
    let ip = resolve(host).await?;
    let deadline = Instant::now() + timeout;
    match tokio::task::spawn_blocking(move || icmp_echo(ip, deadline))
        .await
        .map_err(|e| format!("ping: {e}"))?
    {
        Ok(()) => Ok("icmp"),
        Err(Icmp::NoAnswer(e)) => Err(e),
        Err(Icmp::NotPermitted) => {
            let left = deadline.saturating_duration_since(Instant::now());
            let addr = SocketAddr::new(ip, tcp_port);
            match tokio::time::timeout(left, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok("tcp"),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok("tcp"),
                Ok(Err(e)) => Err(format!("tcp {addr} (ICMP not permitted here): {e}")),
                Err(_) => Err(format!("no answer from {addr} (ICMP not permitted here)")),
            }
        }
    }
}

async fn resolve(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.trim_matches(|c| c == '[' || c == ']').parse() {
        return Ok(ip);
    }
    tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| format!("{host} has no address"))
}

enum Icmp {
    NotPermitted,
    NoAnswer(String),
}

fn open(ip: IpAddr) -> Result<(Socket, bool), Icmp> {
    let (domain, proto) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    if let Ok(s) = Socket::new(domain, Type::DGRAM, Some(proto)) {
        return Ok((s, false));
    }
    Socket::new(domain, Type::RAW, Some(proto))
        .map(|s| (s, true))
        .map_err(|_| Icmp::NotPermitted)
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in b.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo(ip: IpAddr, deadline: Instant) -> Result<(), Icmp> {
    let (sock, raw) = open(ip)?;
    let v6 = ip.is_ipv6();
    let ident: u16 = rand::random();
    let seq: u16 = rand::random();
    let (request, reply) = if v6 { (128u8, 129u8) } else { (8u8, 0u8) };
    let mut pkt = vec![request, 0, 0, 0];
    pkt.extend_from_slice(&ident.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"nebula-monitor..");
    if !v6 {
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
    let sock: std::net::UdpSocket = sock.into();
    let no_answer = |e: std::io::Error| Icmp::NoAnswer(format!("ping {ip}: {e}"));
    sock.send_to(&pkt, SocketAddr::new(ip, 0))
        .map_err(no_answer)?;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Icmp::NoAnswer(format!("no echo reply from {ip}")));
        }
        sock.set_read_timeout(Some(left)).map_err(no_answer)?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Icmp::NoAnswer(format!("no echo reply from {ip}")))
            }
            Err(e) => return Err(no_answer(e)),
        };
        // A raw IPv4 socket hands over the IP header too.
        let skip = if raw && !v6 {
            usize::from(buf[0] & 0x0f) * 4
        } else {
            0
        };
        let Some(m) = buf.get(skip..n) else { continue };
        if m.len() < 8 || m[0] != reply {
            continue;
        }
        let same_seq = u16::from_be_bytes([m[6], m[7]]) == seq;
        // A ping socket rewrites the identifier; a raw one sees every reply on the host.
        let same_id = !raw || u16::from_be_bytes([m[4], m[5]]) == ident;
        if same_seq && same_id {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_an_echo_request() {
        // 08 00 [cksum] 00 01 00 01: the sum of the words is 0x0802, so the checksum is !0x0802.
        assert_eq!(checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), !0x0802);
        let mut p = vec![8, 0, 0, 0, 0x12, 0x34, 0, 9, b'x'];
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
    }

    #[tokio::test]
    async fn loopback_answers_by_icmp_or_tcp() {
        let method = ping("127.0.0.1", 9, Duration::from_secs(2)).await.unwrap();
        assert!(method == "icmp" || method == "tcp", "{method}");
        let e = ping("no-such-host.invalid", 80, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.contains("resolving"), "{e}");
    }
}
