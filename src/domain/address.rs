//! Which network addresses falgate may call on a client's behalf. A webhook URL is the client's
//! to choose, so without a check a client could make falgate call what only falgate can reach:
//! its own loopback, the private network it runs in, a cloud's metadata service. Only public
//! addresses pass, unless configuration allows a network (a sandbox, tests).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why an address is not public; each named in the refusal a client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotPublic {
    Unspecified,
    Loopback,
    /// RFC 1918 and IPv6 unique local addresses.
    Private,
    /// Link-local, where cloud metadata services answer (169.254.169.254).
    LinkLocal,
    /// Carrier-grade NAT (100.64.0.0/10).
    SharedAddressSpace,
    Multicast,
    Broadcast,
    /// Documentation, benchmarking, protocol assignments and reserved ranges.
    Reserved,
}

impl NotPublic {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local (cloud metadata)",
            Self::SharedAddressSpace => "shared address space (carrier-grade NAT)",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
        }
    }
}

/// `Ok` for an address on the public internet; otherwise what it is. An IPv6 address that
/// carries an IPv4 one (mapped, NAT64, 6to4) is judged by the IPv4 address it reaches.
pub fn classify(ip: IpAddr) -> Result<(), NotPublic> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Result<(), NotPublic> {
    let [a, b, c, _] = ip.octets();
    let refused = match (a, b, c) {
        (0, _, _) => NotPublic::Unspecified,
        (127, _, _) => NotPublic::Loopback,
        (10, _, _) | (192, 168, _) => NotPublic::Private,
        (172, b, _) if (16..32).contains(&b) => NotPublic::Private,
        (169, 254, _) => NotPublic::LinkLocal,
        (100, b, _) if (64..128).contains(&b) => NotPublic::SharedAddressSpace,
        (224..=239, _, _) => NotPublic::Multicast,
        _ if ip == Ipv4Addr::BROADCAST => NotPublic::Broadcast,
        (240..=255, _, _) => NotPublic::Reserved,
        // IETF protocol assignments, documentation, benchmarking.
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => NotPublic::Reserved,
        (198, 18 | 19, _) => NotPublic::Reserved,
        _ => return Ok(()),
    };
    Err(refused)
}

fn classify_v6(ip: Ipv6Addr) -> Result<(), NotPublic> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let segments = ip.segments();
    let embedded_v4 = |high: u16, low: u16| {
        Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8)
    };
    let refused = match segments {
        [0, 0, 0, 0, 0, 0, 0, 0] => NotPublic::Unspecified,
        [0, 0, 0, 0, 0, 0, 0, 1] => NotPublic::Loopback,
        // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
        [0x64, 0xff9b, 0, 0, 0, 0, high, low] => return classify_v4(embedded_v4(high, low)),
        // 6to4 (2002::/16) reaches the IPv4 address in bits 16 to 48.
        [0x2002, high, low, ..] => return classify_v4(embedded_v4(high, low)),
        [first, ..] if first & 0xfe00 == 0xfc00 => NotPublic::Private,
        [first, ..] if first & 0xffc0 == 0xfe80 => NotPublic::LinkLocal,
        [first, ..] if first & 0xff00 == 0xff00 => NotPublic::Multicast,
        [0x2001, 0x0db8, ..] => NotPublic::Reserved,
        // The rest of ::/8 (IPv4-compatible and other deprecated forms).
        [0, ..] => NotPublic::Reserved,
        _ => return Ok(()),
    };
    Err(refused)
}

/// A network in CIDR notation (`10.0.0.0/8`, `::1/128`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.base, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            _ => ip,
        };
        match (self.base, ip) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(base) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(base), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(base) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let base: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not an IP address or network"))?;
        let most = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => most,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= most)
                .ok_or_else(|| format!("`{text}` has a prefix length outside 0 to {most}"))?,
        };
        Ok(Self { base, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> Result<(), NotPublic> {
        classify(text.parse().unwrap())
    }

    #[test]
    fn every_kind_of_address_that_is_not_public_is_named() {
        let table = [
            ("0.0.0.0", NotPublic::Unspecified),
            ("127.0.0.1", NotPublic::Loopback),
            ("127.255.0.9", NotPublic::Loopback),
            ("10.1.2.3", NotPublic::Private),
            ("172.16.0.1", NotPublic::Private),
            ("172.31.255.255", NotPublic::Private),
            ("192.168.1.1", NotPublic::Private),
            ("169.254.169.254", NotPublic::LinkLocal),
            ("100.64.0.1", NotPublic::SharedAddressSpace),
            ("100.127.255.254", NotPublic::SharedAddressSpace),
            ("224.0.0.1", NotPublic::Multicast),
            ("255.255.255.255", NotPublic::Broadcast),
            ("240.0.0.1", NotPublic::Reserved),
            ("192.0.2.1", NotPublic::Reserved),
            ("198.18.0.1", NotPublic::Reserved),
            ("::", NotPublic::Unspecified),
            ("::1", NotPublic::Loopback),
            ("fd00:ec2::254", NotPublic::Private),
            ("fc00::1", NotPublic::Private),
            ("fe80::1", NotPublic::LinkLocal),
            ("ff02::1", NotPublic::Multicast),
            ("2001:db8::1", NotPublic::Reserved),
            // IPv6 forms that reach an IPv4 address are judged by it.
            ("::ffff:127.0.0.1", NotPublic::Loopback),
            ("::ffff:169.254.169.254", NotPublic::LinkLocal),
            ("64:ff9b::a00:1", NotPublic::Private),
            ("2002:c0a8:0101::1", NotPublic::Private),
            ("::127.0.0.1", NotPublic::Reserved),
        ];
        for (address, expected) in table {
            assert_eq!(class(address), Err(expected), "{address}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for address in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "198.20.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(class(address), Ok(()), "{address}");
        }
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        let loopback: Network = "127.0.0.0/8".parse().unwrap();
        assert!(loopback.contains("127.9.9.9".parse().unwrap()));
        assert!(loopback.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!loopback.contains("128.0.0.1".parse().unwrap()));
        let one: Network = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let everything: Network = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "::1/129", "1.2.3.4/x"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }
}
