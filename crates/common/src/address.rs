//! Addresses that are never a fleet instance's, whoever registers them.
//!
//! A service's token may register instances of that service at any address, and the
//! gateway then forwards the service's traffic there, answers included. Clouds serve each
//! machine's instance metadata, temporary credentials among it, on a link-local address
//! (`169.254.169.254`; AWS also on `fd00:ec2::254`, Google on `fd20:ce::254`, Alibaba on
//! `100.100.100.200`; Azure's WireServer is `168.63.129.16`) to
//! whatever runs on that machine: an instance registered there would hand the gateway's
//! machine's credentials to any client of the service. So the registry refuses such an
//! address, and the gateway and the monitor refuse to connect to one a name resolves to
//! (`metadata.google.internal` is a name). Unspecified, multicast and broadcast addresses
//! go too: no service is reached at them.
//!
//! Loopback stays allowed: on one machine (`cargo xtask up`) every service listens there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Cloud metadata and credential services outside the link-local ranges.
const METADATA: [IpAddr; 6] = [
    // AWS's instance metadata service over IPv6 (a unique local address).
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    // The EKS Pod Identity Agent over IPv6, which hands pods AWS credentials.
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
    // Google Cloud's metadata server over IPv6.
    IpAddr::V6(Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254)),
    // Alibaba Cloud's (in the shared address space of carrier-grade NAT).
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    // Azure's WireServer, the host's own endpoint for each VM.
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    // Oracle Cloud Classic's metadata service.
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
];

/// Why `address` can never be an instance's, or `None` if it can be.
pub fn refused(address: IpAddr) -> Option<&'static str> {
    // `::ffff:169.254.169.254` reaches what `169.254.169.254` does.
    let address = match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    };
    if METADATA.contains(&address) {
        return Some("a cloud metadata service's address");
    }
    let link_local = match address {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if link_local {
        return Some("a link-local address, where clouds serve instance metadata");
    }
    if address.is_unspecified() {
        return Some("the unspecified address");
    }
    if address.is_multicast() || address == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Some("a multicast or broadcast address");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_link_local_and_unreachable_addresses_are_refused() {
        for refused_one in [
            "169.254.169.254",
            "169.254.0.1",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "fd00:ec2::23",
            "fd20:ce::254",
            "100.100.100.200",
            "168.63.129.16",
            "192.0.0.192",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
        ] {
            let address: IpAddr = refused_one.parse().unwrap();
            assert!(refused(address).is_some(), "{refused_one} was allowed");
        }
    }

    #[test]
    fn ordinary_addresses_loopback_included_are_allowed() {
        for allowed in [
            "127.0.0.1",
            "::1",
            "10.0.0.7",
            "172.17.0.2",
            "192.168.1.20",
            "100.64.0.1",
            "fd00:ec2::253",
            "fd12:3456::1",
            "2001:db8::1",
            "8.8.8.8",
        ] {
            let address: IpAddr = allowed.parse().unwrap();
            assert_eq!(refused(address), None, "{allowed} was refused");
        }
    }
}
