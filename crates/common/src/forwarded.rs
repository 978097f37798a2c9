//! Which client a request came from, when it came through proxies we trust.
//!
//! Behind the gateway every request's TCP peer is the gateway. A proxy appends the peer it
//! saw to `X-Forwarded-For`, so the header reads `client, proxy1, proxy2` with the peer
//! being the last proxy. Anyone can write that header, so it is read only from a peer in
//! the trusted list, and then from the right: each address a trusted proxy vouches for
//! is the next hop back, until one that is not a trusted proxy, which is the client. That
//! is nginx's `set_real_ip_from` with `real_ip_recursive on`; HashiCorp Vault's
//! `x_forwarded_for_authorized_addrs` also reads the header only from listed peers, but
//! then skips a fixed number of hops.
//!
//! The list must hold the proxies alone: a client whose own address is listed is taken
//! for a proxy, and the address it wrote into the header for the client.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The proxies whose `X-Forwarded-For` is believed: addresses and CIDR blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Block>);

/// An address block: `network/prefix`, a single address having the full prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    network: IpAddr,
    prefix: u8,
}

/// An IPv4 address that came as IPv4-mapped IPv6 (`::ffff:10.0.0.1`, as a dual-stack
/// socket reports an IPv4 peer) as the IPv4 address it is.
fn unmapped(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

impl Block {
    fn contains(self, address: IpAddr) -> bool {
        match (self.network, unmapped(address)) {
            (IpAddr::V4(network), IpAddr::V4(address)) => same_prefix(
                network.to_bits().into(),
                address.to_bits().into(),
                32,
                self.prefix,
            ),
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                same_prefix(network.to_bits(), address.to_bits(), 128, self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the top `prefix` of the `width` bits of `a` and `b` agree.
fn same_prefix(a: u128, b: u128, width: u8, prefix: u8) -> bool {
    let ignored = u32::from(width.saturating_sub(prefix));
    a.checked_shr(ignored).unwrap_or(0) == b.checked_shr(ignored).unwrap_or(0)
}

impl FromStr for Block {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let written: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let width = if written.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {width}"))?,
        };
        // `::ffff:10.0.0.0/104` is 10.0.0.0/8, as the addresses it is matched with are.
        let network = unmapped(written);
        let prefix = if network == written {
            prefix
        } else {
            prefix.checked_sub(96).ok_or_else(|| {
                format!("{text:?}: an IPv4-mapped block needs a prefix of at least 96")
            })?
        };
        Ok(Self { network, prefix })
    }
}

impl FromStr for TrustedProxies {
    type Err = String;

    /// A comma-separated list such as `127.0.0.1, 10.0.0.0/8, fd00::/8`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(Block::from_str)
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, block) in self.0.iter().enumerate() {
            let separator = if i == 0 { "" } else { "," };
            write!(f, "{separator}{}/{}", block.network, block.prefix)?;
        }
        Ok(())
    }
}

impl TrustedProxies {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.0.iter().any(|block| block.contains(address))
    }

    /// The client's address: `peer`, unless `peer` is a trusted proxy. Then the
    /// `forwarded_for` values (the `X-Forwarded-For` lines, in order) are read from the
    /// right, empty entries skipped, and the first address no trusted proxy holds is the
    /// client. When every address is a trusted proxy's, the leftmost is; an entry that
    /// is not an address ends the walk at the hop that wrote it.
    pub fn client(&self, peer: IpAddr, forwarded_for: &[&[u8]]) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        // Lazily, from the right: the walk mostly ends after an entry or two, however
        // long the header.
        let entries = forwarded_for
            .iter()
            .rev()
            .flat_map(|value| value.rsplit(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|entry| !entry.is_empty());
        let mut client = peer;
        for entry in entries {
            let Some(address) = parse_address(entry) else {
                break;
            };
            client = address;
            if !self.trusts(address) {
                break;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, maybe with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_address(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    if let Ok(address) = text.parse() {
        return Some(address);
    }
    text.parse::<std::net::SocketAddr>()
        .ok()
        .map(|socket| socket.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn client(trusted: &str, peer: &str, headers: &[&str]) -> IpAddr {
        let trusted: TrustedProxies = trusted.parse().unwrap();
        let lines: Vec<&[u8]> = headers.iter().map(|h| h.as_bytes()).collect();
        trusted.client(ip(peer), &lines)
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_peer() {
        assert_eq!(client("", "10.0.0.5", &["1.2.3.4"]), ip("10.0.0.5"));
        assert_eq!(
            client("10.0.0.0/8", "192.168.1.1", &["1.2.3.4"]),
            ip("192.168.1.1")
        );
        assert_eq!(
            client("10.0.0.0/8", "10.0.0.5", &["1.2.3.4"]),
            ip("1.2.3.4")
        );
        // No header: the trusted peer itself.
        assert_eq!(client("10.0.0.0/8", "10.0.0.5", &[]), ip("10.0.0.5"));
    }

    #[test]
    fn the_walk_stops_at_the_first_address_no_trusted_proxy_holds() {
        // The client wrote "6.6.6.6" itself; the gateway appended the real peer.
        let header = ["6.6.6.6, 1.2.3.4, 10.0.0.7"];
        assert_eq!(client("10.0.0.0/8", "10.0.0.5", &header), ip("1.2.3.4"));
        // Two header lines are one list.
        let split = ["6.6.6.6", "1.2.3.4, 10.0.0.7"];
        assert_eq!(client("10.0.0.0/8", "10.0.0.5", &split), ip("1.2.3.4"));
        // Every hop trusted: the leftmost.
        assert_eq!(
            client("10.0.0.0/8", "10.0.0.5", &["10.1.1.1, 10.0.0.7"]),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn an_entry_that_is_no_address_ends_the_walk_at_its_writer() {
        assert_eq!(
            client("127.0.0.1", "127.0.0.1", &["unknown"]),
            ip("127.0.0.1")
        );
        assert_eq!(
            client("127.0.0.0/8", "127.0.0.1", &["9.9.9.9, bad, 127.0.0.2"]),
            ip("127.0.0.2")
        );
        assert_eq!(
            client("127.0.0.1", "127.0.0.1", &["1.2.3.4:5678"]),
            ip("1.2.3.4")
        );
        assert_eq!(
            client("127.0.0.1", "127.0.0.1", &["[2001:db8::1]:443"]),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn blocks_match_by_prefix_in_either_family() {
        let trusted: TrustedProxies = " 10.0.0.0/8 , fd00::/8, 192.168.1.1".parse().unwrap();
        assert!(trusted.trusts(ip("10.255.0.1")));
        assert!(!trusted.trusts(ip("11.0.0.1")));
        assert!(trusted.trusts(ip("fd12::1")));
        assert!(!trusted.trusts(ip("fe80::1")));
        assert!(trusted.trusts(ip("192.168.1.1")));
        assert!(!trusted.trusts(ip("192.168.1.2")));
        assert!(trusted.trusts(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        let everything: TrustedProxies = "0.0.0.0/0".parse().unwrap();
        assert!(everything.trusts(ip("8.8.8.8")));
        assert!(!everything.trusts(ip("::1")));
        assert_eq!(trusted.to_string(), "10.0.0.0/8,fd00::/8,192.168.1.1/32");
    }

    #[test]
    fn empty_entries_are_skipped_and_mapped_addresses_match() {
        assert_eq!(
            client("127.0.0.1", "127.0.0.1", &["1.2.3.4, , 127.0.0.1,"]),
            ip("1.2.3.4")
        );
        // An IPv4 peer on a dual-stack socket.
        assert_eq!(
            client("10.0.0.0/8", "::ffff:10.0.0.5", &["1.2.3.4"]),
            ip("1.2.3.4")
        );
        let mapped: TrustedProxies = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.trusts(ip("10.9.9.9")));
        assert!(!mapped.trusts(ip("11.0.0.1")));
        assert!("::ffff:10.0.0.0/95".parse::<TrustedProxies>().is_err());
        let single: TrustedProxies = "2001:db8::1, ::/0".parse().unwrap();
        assert!(single.trusts(ip("2001:db8::1")));
        assert!(
            single.trusts(ip("fe80::1")),
            "::/0 holds every IPv6 address"
        );
        let one: TrustedProxies = "2001:db8::1".parse().unwrap();
        assert!(!one.trusts(ip("2001:db8::2")));
    }

    #[test]
    fn bad_lists_are_refused() {
        for bad in ["10.0.0.0/33", "::/129", "gateway", "10.0.0.0/x", "1.2.3.4/"] {
            assert!(bad.parse::<TrustedProxies>().is_err(), "{bad}");
        }
        assert!("".parse::<TrustedProxies>().unwrap().is_empty());
    }
}
