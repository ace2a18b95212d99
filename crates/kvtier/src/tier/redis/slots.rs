//! Redis Cluster key slots (CRC16/XMODEM, hash tags), and parsing of redirects and `CLUSTER SLOTS`.

use crate::transport::resp::Reply;

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for key slots.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`, honouring `{hash tags}`.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// A redirect in a cluster error reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED slot host:port`: the slot lives there now.
    Moved(u16, String),
    /// `ASK slot host:port`: ask there once (with `ASKING`), slot migrating.
    Ask(u16, String),
}

/// Parses `MOVED`/`ASK` error text. `seed_host` fills in an empty host (`:port`).
pub fn parse_redirect(err: &str, seed_host: &str) -> Option<Redirect> {
    let mut it = err.split_ascii_whitespace();
    let kind = it.next()?;
    let slot = it
        .next()?
        .parse::<u16>()
        .ok()
        .filter(|&s| (s as usize) < SLOTS)?;
    let addr = it.next()?;
    let addr = if addr.starts_with(':') {
        format!("{seed_host}{addr}")
    } else {
        addr.to_string()
    };
    match kind {
        "MOVED" => Some(Redirect::Moved(slot, addr)),
        "ASK" => Some(Redirect::Ask(slot, addr)),
        _ => None,
    }
}

/// One range of `CLUSTER SLOTS`: slots `start..=end` served by master `addr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRange {
    /// First slot.
    pub start: u16,
    /// Last slot (inclusive).
    pub end: u16,
    /// Master `host:port`.
    pub addr: String,
}

fn format_addr(host: &str, port: i64) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Parses a `CLUSTER SLOTS` reply. An empty or `?` host means "the node you asked"
/// (`asked_host`). Returns `None` on a malformed reply.
pub fn parse_slots(reply: &Reply, asked_host: &str) -> Option<Vec<SlotRange>> {
    let Reply::Array(ranges) = reply else {
        return None;
    };
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let Reply::Array(items) = r else { return None };
        let (Some(Reply::Int(start)), Some(Reply::Int(end)), Some(Reply::Array(master))) =
            (items.first(), items.get(1), items.get(2))
        else {
            return None;
        };
        let host = match master.first()? {
            Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            Reply::Status(s) => s.clone(),
            _ => return None,
        };
        let Reply::Int(port) = master.get(1)? else {
            return None;
        };
        let host = if host.is_empty() || host == "?" {
            asked_host.to_string()
        } else {
            host
        };
        let (start, end) = (u16::try_from(*start).ok()?, u16::try_from(*end).ok()?);
        if start > end || end as usize >= SLOTS || !(1..=65535).contains(port) {
            return None;
        }
        out.push(SlotRange {
            start,
            end,
            addr: format_addr(&host, *port),
        });
    }
    Some(out)
}

/// The host part of `host:port`.
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"{}x"), crc16(b"{}x") % 16384);
    }

    #[test]
    fn parses_redirects() {
        assert_eq!(
            parse_redirect("MOVED 3999 127.0.0.1:6381", "h"),
            Some(Redirect::Moved(3999, "127.0.0.1:6381".into()))
        );
        assert_eq!(
            parse_redirect("ASK 1 :7000", "10.0.0.1"),
            Some(Redirect::Ask(1, "10.0.0.1:7000".into()))
        );
        assert_eq!(parse_redirect("ERR nope", "h"), None);
        assert_eq!(parse_redirect("MOVED 99999 h:1", "h"), None);
        assert_eq!(parse_redirect("MOVED", "h"), None);
    }

    #[test]
    fn parses_cluster_slots() {
        let node = |h: &str, p: i64| {
            Reply::Array(vec![
                Reply::Bulk(h.as_bytes().to_vec()),
                Reply::Int(p),
                Reply::Bulk(b"id".to_vec()),
            ])
        };
        let r = Reply::Array(vec![
            Reply::Array(vec![
                Reply::Int(0),
                Reply::Int(5460),
                node("127.0.0.1", 7000),
            ]),
            Reply::Array(vec![Reply::Int(5461), Reply::Int(16383), node("", 7001)]),
        ]);
        let s = parse_slots(&r, "seed").unwrap();
        assert_eq!(s[0].addr, "127.0.0.1:7000");
        assert_eq!(s[1].addr, "seed:7001");
        assert_eq!(s[1].end, 16383);
        assert!(parse_slots(&Reply::Int(1), "h").is_none());
        assert!(parse_slots(
            &Reply::Array(vec![Reply::Array(vec![
                Reply::Int(5),
                Reply::Int(1),
                node("h", 1)
            ])]),
            "h"
        )
        .is_none());
    }
}
