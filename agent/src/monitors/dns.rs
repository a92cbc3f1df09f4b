//! A DNS check: one query over UDP (RFC 1035 wire format) to a chosen server or the host's
//! first resolver, read back with its answers (name compression followed, bounded).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use nebula_protocol::monitors::DnsRecord;

pub async fn check(
    name: &str,
    record: DnsRecord,
    server: Option<&str>,
    expect: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let server = match server {
        Some(s) => parse_server(s)?,
        None => system_resolver()?,
    };
    let id: u16 = rand::random();
    let query = encode_query(id, name, record)?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("udp socket: {e}"))?;
    sock.connect(server)
        .await
        .map_err(|e| format!("{server}: {e}"))?;
    sock.send(&query)
        .await
        .map_err(|e| format!("{server}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let answer = tokio::time::timeout(timeout, async {
        loop {
            let n = sock
                .recv(&mut buf)
                .await
                .map_err(|e| format!("{server}: {e}"))?;
            // Another id is a stray answer: keep waiting for ours.
            if let Some(a) = decode_answer(&buf[..n], id, record)? {
                return Ok::<_, String>(a);
            }
        }
    })
    .await
    .map_err(|_| format!("{server} did not answer"))??;
    if answer.rcode != 0 {
        return Err(format!("{server} answered {}", rcode_name(answer.rcode)));
    }
    if answer.addresses.is_empty() {
        return Err(format!("no {} record for {name}", record.as_str()));
    }
    if let Some(want) = expect {
        let want: IpAddr = want
            .parse()
            .map_err(|_| format!("`{want}` is not an IP address"))?;
        if !answer.addresses.contains(&want) {
            let got: Vec<String> = answer.addresses.iter().map(ToString::to_string).collect();
            return Err(format!("{name} is {}, not {want}", got.join(", ")));
        }
    }
    Ok(())
}

fn parse_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("`{s}` is not a DNS server address (IP or IP:port)"))
}

/// The first `nameserver` in `/etc/resolv.conf`.
fn system_resolver() -> Result<SocketAddr, String> {
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| format!("no DNS server given and /etc/resolv.conf unreadable: {e}"))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|rest| parse_server(rest.trim()).ok())
        .ok_or_else(|| "no DNS server given and none in /etc/resolv.conf".into())
}

fn qtype(record: DnsRecord) -> u16 {
    match record {
        DnsRecord::A => 1,
        DnsRecord::Aaaa => 28,
    }
}

/// A standard query with recursion desired.
pub fn encode_query(id: u16, name: &str, record: DnsRecord) -> Result<Vec<u8>, String> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    let name = name.trim_end_matches('.');
    if name.is_empty() || name.len() > 253 {
        return Err(format!("`{name}` is not a DNS name"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{name}` is not a DNS name"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype(record).to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Ok(q)
}

#[derive(Debug, PartialEq)]
pub struct Answer {
    pub rcode: u8,
    pub addresses: Vec<IpAddr>,
}

fn rcode_name(rcode: u8) -> String {
    match rcode {
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN (no such name)".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("rcode {n}"),
    }
}

/// Read an answer: `None` when it is for another query id; an error when malformed.
pub fn decode_answer(b: &[u8], id: u16, record: DnsRecord) -> Result<Option<Answer>, String> {
    let bad = || "malformed DNS answer".to_string();
    if b.len() < 12 {
        return Err(bad());
    }
    if u16::from_be_bytes([b[0], b[1]]) != id || b[2] & 0x80 == 0 {
        return Ok(None);
    }
    let rcode = b[3] & 0x0f;
    let qd = u16::from_be_bytes([b[4], b[5]]);
    let an = u16::from_be_bytes([b[6], b[7]]);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(b, at).ok_or_else(bad)? + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..an {
        at = skip_name(b, at).ok_or_else(bad)?;
        let head = b.get(at..at + 10).ok_or_else(bad)?;
        let rtype = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[8], head[9]]));
        let data = b.get(at + 10..at + 10 + len).ok_or_else(bad)?;
        at += 10 + len;
        if rtype != qtype(record) {
            continue; // a CNAME on the way
        }
        match (record, len) {
            (DnsRecord::A, 4) => addresses.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            ))),
            (DnsRecord::Aaaa, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(data);
                addresses.push(IpAddr::V6(Ipv6Addr::from(o)));
            }
            _ => return Err(bad()),
        }
    }
    Ok(Some(Answer { rcode, addresses }))
}

/// The offset after a (possibly compressed) name.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *b.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => {
                b.get(at + 1)?;
                return Some(at + 2);
            }
            l => at += 1 + usize::from(l),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as a server writes it: the question echoed, a CNAME then an A record with a
    /// compressed name.
    fn answer(id: u16, rcode: u8) -> Vec<u8> {
        let q = encode_query(id, "www.example.org", DnsRecord::A).unwrap();
        let mut b = q.clone();
        b[2] = 0x81;
        b[3] = 0x80 | rcode;
        b[7] = 2; // two answers
                  // CNAME: name = pointer to the question's name, type 5, class 1, ttl, rdata = pointer
        b.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 16]);
        // A: name pointer, type 1, class 1, ttl, 4 bytes
        b.extend_from_slice(&[0xc0, 16, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
        b
    }

    #[test]
    fn a_query_is_well_formed() {
        let q = encode_query(0x1234, "example.org.", DnsRecord::Aaaa).unwrap();
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], b"\x07example\x03org\x00\x00\x1c\x00\x01");
        assert!(encode_query(1, "a..b", DnsRecord::A).is_err());
        assert!(encode_query(1, &"x".repeat(64), DnsRecord::A).is_err());
    }

    #[test]
    fn answers_are_read_through_compression_and_cnames() {
        let a = decode_answer(&answer(7, 0), 7, DnsRecord::A)
            .unwrap()
            .unwrap();
        assert_eq!(a.rcode, 0);
        assert_eq!(a.addresses, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(decode_answer(&answer(7, 0), 8, DnsRecord::A).unwrap(), None);
        let nx = decode_answer(&answer(7, 3), 7, DnsRecord::A)
            .unwrap()
            .unwrap();
        assert_eq!(nx.rcode, 3);
        let full = answer(7, 0);
        for cut in [5, 20, full.len() - 2] {
            assert!(
                decode_answer(&full[..cut], 7, DnsRecord::A).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn a_check_against_a_local_server() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = server.recv_from(&mut buf).await else {
                    return;
                };
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let rcode = if buf[..n].windows(8).any(|w| w == b"\x07missing") {
                    3
                } else {
                    0
                };
                let _ = server.send_to(&answer(id, rcode), from).await;
            }
        });
        let t = Duration::from_secs(2);
        check("www.example.org", DnsRecord::A, Some(&addr), None, t)
            .await
            .unwrap();
        check(
            "www.example.org",
            DnsRecord::A,
            Some(&addr),
            Some("192.0.2.7"),
            t,
        )
        .await
        .unwrap();
        let e = check(
            "www.example.org",
            DnsRecord::A,
            Some(&addr),
            Some("192.0.2.8"),
            t,
        )
        .await
        .unwrap_err();
        assert!(e.contains("not 192.0.2.8"), "{e}");
        let e = check("missing.example.org", DnsRecord::A, Some(&addr), None, t)
            .await
            .unwrap_err();
        assert!(e.contains("NXDOMAIN"), "{e}");
    }
}
