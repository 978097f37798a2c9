//! Which client a request came from, when it came through proxies we trust.
//!
//! Behind the gateway every request's TCP peer is the gateway. A proxy appends the peer it
//! saw to `X-Forwarded-For`, so the header reads `client, proxy1, proxy2` with the peer
//! being the last proxy. Anyone can write that header, so it is read only from a peer in
//! the trusted list, and then from the right: each address a trusted proxy vouches for
//! is the next hop back, until one that is not a trusted proxy, which is the client (what
//! HashiCorp Vault's `x_forwarded_for_authorized_addrs` and nginx's `set_real_ip_from`
//! with `real_ip_recursive` do).

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

impl Block {
    fn contains(self, address: IpAddr) -> bool {
        // An IPv4 peer may come as an IPv4-mapped IPv6 address on a dual-stack socket.
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            IpAddr::V4(_) => address,
        };
        match (self.network, address) {
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
    let ignored = u32::from(width - prefix);
    a.checked_shr(ignored).unwrap_or(0) == b.checked_shr(ignored).unwrap_or(0)
}

impl FromStr for Block {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {width}"))?,
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

    /// The client's address: `peer`, unless `peer` is a trusted proxy, then the last
    /// address in `forwarded_for` (the `X-Forwarded-For` values, in order) that no
    /// trusted proxy holds. An entry that is not an IP address ends the walk at the hop
    /// that wrote it.
    pub fn client<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a [u8]>,
    ) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let entries: Vec<&[u8]> = forwarded_for
            .flat_map(|value| value.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .collect();
        let mut client = peer;
        for entry in entries.iter().rev() {
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
        trusted.client(ip(peer), headers.iter().map(|h| h.as_bytes()))
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
    fn bad_lists_are_refused() {
        for bad in ["10.0.0.0/33", "::/129", "gateway", "10.0.0.0/x", "1.2.3.4/"] {
            assert!(bad.parse::<TrustedProxies>().is_err(), "{bad}");
        }
        assert!("".parse::<TrustedProxies>().unwrap().is_empty());
    }
}
