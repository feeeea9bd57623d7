//! The guest network in runvm's own types, and their conversion to and from protobuf. What the
//! guest sends back is parsed and bounded before use.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use runvm_protocol::agent as pb;
use serde::{Deserialize, Serialize};

use super::AgentError;

/// Most interfaces or routes accepted in one reply.
const MAX_ENTRIES: usize = 4096;
/// Longest device name accepted (Linux allows 15 bytes).
const MAX_DEVICE_NAME: usize = 15;

/// An address with its prefix length, written `10.0.0.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpNet {
    /// The address.
    pub address: IpAddr,
    /// The prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix_len: u8,
}

impl IpNet {
    /// `address/prefix_len`, if the prefix length fits the family.
    pub fn new(address: IpAddr, prefix_len: u8) -> Result<IpNet, String> {
        let max = if address.is_ipv6() { 128 } else { 32 };
        if prefix_len > max {
            return Err(format!(
                "{address}/{prefix_len}: prefix length {prefix_len} is over {max}"
            ));
        }
        Ok(IpNet {
            address,
            prefix_len,
        })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<IpNet, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{s:?}: {len:?} is not a prefix length"))?;
        IpNet::new(ip, len)
    }
}

impl TryFrom<String> for IpNet {
    type Error = String;
    fn try_from(s: String) -> Result<IpNet, String> {
        s.parse()
    }
}

impl From<IpNet> for String {
    fn from(n: IpNet) -> String {
        n.to_string()
    }
}

/// A network interface of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Device name in the guest (`eth0`).
    pub name: String,
    /// MAC address `aa:bb:cc:dd:ee:ff`; the guest finds the device by it.
    pub mac: String,
    /// MTU (0: leave as is).
    #[serde(default)]
    pub mtu: u32,
    /// Exactly the addresses the device should have (link-local ones aside).
    #[serde(default)]
    pub addresses: Vec<IpNet>,
    /// Whether the device is up.
    #[serde(default = "yes")]
    pub up: bool,
}

fn yes() -> bool {
    true
}

/// A route of the guest's main table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Destination; `None` (or absent) is the default route.
    #[serde(default)]
    pub destination: Option<IpNet>,
    /// Next hop, if any.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Output device name in the guest.
    #[serde(default)]
    pub device: String,
    /// Preferred source address.
    #[serde(default)]
    pub source: Option<IpAddr>,
    /// Route scope (0 universe, 253 link, 254 host).
    #[serde(default)]
    pub scope: u8,
    /// Route priority (0: the kernel's default).
    #[serde(default)]
    pub metric: u32,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.destination {
            Some(d) => write!(f, "{d}")?,
            None => write!(f, "default")?,
        }
        if let Some(g) = &self.gateway {
            write!(f, " via {g}")?;
        }
        if !self.device.is_empty() {
            write!(f, " dev {}", self.device)?;
        }
        Ok(())
    }
}

/// A permanent neighbour (ARP/NDP) entry in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Guest device name.
    pub device: String,
    /// Its MAC address.
    pub mac: String,
}

fn family(ip: &IpAddr) -> pb::ipaddress::Family {
    if ip.is_ipv6() {
        pb::ipaddress::Family::V6
    } else {
        pb::ipaddress::Family::V4
    }
}

fn pb_address(n: &IpNet) -> pb::IPAddress {
    pb::IPAddress {
        family: family(&n.address).into(),
        address: n.address.to_string(),
        prefix_len: n.prefix_len.into(),
        ..Default::default()
    }
}

/// The protobuf form of `i`.
pub fn to_pb_interface(i: &Interface) -> pb::Interface {
    pb::Interface {
        name: i.name.clone(),
        hw_addr: i.mac.clone(),
        addresses: i.addresses.iter().map(pb_address).collect(),
        mtu: i.mtu.into(),
        up: i.up,
        ..Default::default()
    }
}

fn reject(method: &'static str, reason: String) -> AgentError {
    AgentError::InvalidReply { method, reason }
}

fn device_name(method: &'static str, name: String) -> Result<String, AgentError> {
    if name.len() > MAX_DEVICE_NAME || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(reject(method, format!("bad device name {:?}", name)));
    }
    Ok(name)
}

fn mac_text(method: &'static str, mac: String) -> Result<String, AgentError> {
    if mac.len() > 64 || !mac.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
        return Err(reject(method, format!("bad MAC address {mac:?}")));
    }
    Ok(mac)
}

/// An interface the guest reported, checked.
pub fn from_pb_interface(method: &'static str, p: pb::Interface) -> Result<Interface, AgentError> {
    if p.addresses.len() > MAX_ENTRIES {
        return Err(reject(method, "too many addresses".into()));
    }
    let addresses = p
        .addresses
        .iter()
        .map(|a| {
            let ip: IpAddr = a
                .address
                .parse()
                .map_err(|_| reject(method, format!("bad address {:?}", a.address)))?;
            let len = u8::try_from(a.prefix_len)
                .map_err(|_| reject(method, format!("bad prefix length {}", a.prefix_len)))?;
            IpNet::new(ip, len).map_err(|e| reject(method, e))
        })
        .collect::<Result<_, _>>()?;
    Ok(Interface {
        name: device_name(method, p.name)?,
        mac: mac_text(method, p.hw_addr)?,
        mtu: u32::try_from(p.mtu).map_err(|_| reject(method, format!("bad MTU {}", p.mtu)))?,
        addresses,
        up: p.up,
    })
}

/// Interfaces the guest reported, checked.
pub fn from_pb_interfaces(
    method: &'static str,
    list: Vec<pb::Interface>,
) -> Result<Vec<Interface>, AgentError> {
    if list.len() > MAX_ENTRIES {
        return Err(reject(method, format!("{} interfaces", list.len())));
    }
    list.into_iter()
        .map(|i| from_pb_interface(method, i))
        .collect()
}

/// The protobuf form of `r`.
pub fn to_pb_route(r: &Route) -> pb::Route {
    let fam = r
        .destination
        .map(|d| d.address)
        .or(r.gateway)
        .map(|ip| family(&ip))
        .unwrap_or(pb::ipaddress::Family::V4);
    pb::Route {
        destination: r
            .destination
            .map(|d| d.to_string())
            .unwrap_or_else(|| "default".into()),
        gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
        device: r.device.clone(),
        source: r.source.map(|s| s.to_string()).unwrap_or_default(),
        scope: r.scope.into(),
        metric: r.metric,
        family: fam.into(),
        ..Default::default()
    }
}

/// Routes the guest reported, checked.
pub fn from_pb_routes(
    method: &'static str,
    list: Vec<pb::Route>,
) -> Result<Vec<Route>, AgentError> {
    if list.len() > MAX_ENTRIES {
        return Err(reject(method, format!("{} routes", list.len())));
    }
    let ip = |field: &str, s: &str| -> Result<Option<IpAddr>, AgentError> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| reject(method, format!("bad {field} {s:?}")))
    };
    list.into_iter()
        .map(|p| {
            let destination = match p.destination.as_str() {
                "default" | "" => None,
                d => Some(d.parse().map_err(|e: String| reject(method, e))?),
            };
            Ok(Route {
                destination,
                gateway: ip("gateway", &p.gateway)?,
                device: device_name(method, p.device)?,
                source: ip("source", &p.source)?,
                scope: u8::try_from(p.scope)
                    .map_err(|_| reject(method, format!("bad scope {}", p.scope)))?,
                metric: p.metric,
            })
        })
        .collect()
}

/// The protobuf form of `n`.
pub fn to_pb_neighbor(n: &Neighbor) -> pb::ARPNeighbor {
    pb::ARPNeighbor {
        to_ip: protobuf::MessageField::some(pb::IPAddress {
            family: family(&n.ip).into(),
            address: n.ip.to_string(),
            prefix_len: if n.ip.is_ipv6() { 128 } else { 32 },
            ..Default::default()
        }),
        device: n.device.clone(),
        ll_addr: n.mac.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipnet_parses_prints_and_refuses_by_value() {
        let n: IpNet = "10.0.0.2/24".parse().unwrap();
        assert_eq!(n.to_string(), "10.0.0.2/24");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"10.0.0.2/24\"");
        for bad in ["10.0.0.2", "10.0.0.2/33", "300.0.0.1/8", "fd00::1/129"] {
            let e = bad.parse::<IpNet>().unwrap_err();
            assert!(e.contains(bad.split('/').next().unwrap()), "{e}");
        }
    }

    #[test]
    fn routes_round_trip_through_protobuf() {
        let r = Route {
            destination: None,
            gateway: Some("10.0.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: None,
            scope: 0,
            metric: 0,
        };
        let back = from_pb_routes("ListRoutes", vec![to_pb_route(&r)]).unwrap();
        assert_eq!(back, std::slice::from_ref(&r));
        assert_eq!(r.to_string(), "default via 10.0.0.1 dev eth0");
    }

    #[test]
    fn bad_guest_replies_are_refused() {
        let mut p = to_pb_interface(&Interface {
            name: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            addresses: vec![],
            up: true,
        });
        p.name = "x".repeat(100);
        assert!(from_pb_interface("ListInterfaces", p.clone()).is_err());
        p.name = "eth0".into();
        p.hw_addr = "\n".into();
        assert!(from_pb_interface("ListInterfaces", p).is_err());
    }
}
