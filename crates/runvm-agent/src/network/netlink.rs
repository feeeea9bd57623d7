//! Thin wrappers over rtnetlink: the guest's links, addresses, routes and neighbours as plain
//! values, and the changes the agent makes to them.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec};

use crate::error::AgentError;

type Result<T> = std::result::Result<T, AgentError>;

/// A network device as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
}

/// An address on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub v6: bool,
    /// `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub metric: u32,
}

fn nl_err(what: impl std::fmt::Display, e: rtnetlink::Error) -> AgentError {
    match e {
        rtnetlink::Error::NetlinkError(m) => {
            let errno = m.code.map(|c| -c.get()).unwrap_or(0);
            let text = std::io::Error::from_raw_os_error(errno);
            let code = if errno == libc::EINVAL || errno == libc::ERANGE {
                ttrpc::Code::INVALID_ARGUMENT
            } else {
                ttrpc::Code::INTERNAL
            };
            AgentError::new(code, format!("{what}: {text}"))
        }
        other => AgentError::internal(format!("{what}: {other}")),
    }
}

/// Opens a netlink connection whose driver runs on the current tokio runtime.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| AgentError::internal(format!("open a netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

fn link_from(m: LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        loopback: m.header.link_layer_type == LinkLayerType::Loopback,
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(mac) => link.mac = mac,
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            _ => {}
        }
    }
    link
}

pub async fn links(h: &Handle) -> Result<Vec<Link>> {
    let mut out = Vec::new();
    let mut s = h.link().get().execute();
    while let Some(m) = s.try_next().await.map_err(|e| nl_err("list devices", e))? {
        out.push(link_from(m));
    }
    Ok(out)
}

/// Addresses of `index` (all devices if `None`), without link-local ones (the kernel makes
/// those itself).
pub async fn addrs(h: &Handle, index: Option<u32>) -> Result<Vec<Addr>> {
    let mut out = Vec::new();
    let mut req = h.address().get();
    if let Some(i) = index {
        req = req.set_link_index_filter(i);
    }
    let mut s = req.execute();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(|e| nl_err("list addresses", e))?
    {
        if let Some(a) = addr_from(&m) {
            out.push(a);
        }
    }
    Ok(out)
}

fn addr_from(m: &AddressMessage) -> Option<Addr> {
    if m.header.scope == AddressScope::Link || m.header.scope == AddressScope::Host {
        return None;
    }
    let ip = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let ip = ip.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    Some(Addr {
        index: m.header.index,
        ip,
        prefix: m.header.prefix_len,
    })
}

pub async fn add_addr(h: &Handle, a: Addr) -> Result<()> {
    h.address()
        .add(a.index, a.ip, a.prefix)
        .replace()
        .execute()
        .await
        .map_err(|e| nl_err(format!("add address {}/{}", a.ip, a.prefix), e))
}

pub async fn del_addr(h: &Handle, a: Addr) -> Result<()> {
    let mut s = h.address().get().set_link_index_filter(a.index).execute();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(|e| nl_err("list addresses", e))?
    {
        if addr_from(&m) == Some(a) {
            return h
                .address()
                .del(m)
                .execute()
                .await
                .map_err(|e| nl_err(format!("remove address {}/{}", a.ip, a.prefix), e));
        }
    }
    Ok(())
}

/// Sets name, MTU and up/down of device `index` (`None`: leave as is).
pub async fn set_link(
    h: &Handle,
    index: u32,
    name: Option<&str>,
    mtu: Option<u32>,
    up: Option<bool>,
) -> Result<()> {
    let mut b = LinkMessageBuilder::<LinkUnspec>::new().index(index);
    if let Some(n) = name {
        b = b.name(n);
    }
    if let Some(m) = mtu {
        b = b.mtu(m);
    }
    match up {
        Some(true) => b = b.up(),
        Some(false) => b = b.down(),
        None => {}
    }
    let what = format!(
        "set device {index}{}{}",
        name.map(|n| format!(" name {n}")).unwrap_or_default(),
        mtu.map(|m| format!(" mtu {m}")).unwrap_or_default()
    );
    h.link()
        .set(b.build())
        .execute()
        .await
        .map_err(|e| nl_err(what, e))
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn route_from(m: &RouteMessage) -> Option<RouteEntry> {
    if m.header.table != RouteHeader::RT_TABLE_MAIN || m.header.kind != RouteType::Unicast {
        return None;
    }
    let v6 = m.header.address_family == AddressFamily::Inet6;
    let mut r = RouteEntry {
        v6,
        destination: None,
        gateway: None,
        oif: None,
        source: None,
        scope: m.header.scope.into(),
        metric: 0,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                r.destination = route_addr(d).map(|ip| (ip, m.header.destination_prefix_length))
            }
            RouteAttribute::Gateway(g) => r.gateway = route_addr(g),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::PrefSource(s) => r.source = route_addr(s),
            RouteAttribute::Priority(p) => r.metric = *p,
            _ => {}
        }
    }
    // IPv6 link-local and multicast routes are the kernel's own.
    if let Some((IpAddr::V6(ip), _)) = r.destination {
        if ip.segments()[0] & 0xffc0 == 0xfe80 || ip.segments()[0] & 0xff00 == 0xff00 {
            return None;
        }
    }
    Some(r)
}

pub async fn routes(h: &Handle) -> Result<Vec<RouteEntry>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        let mut s = h.route().get(msg).execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl_err("list routes", e))? {
            if let Some(r) = route_from(&m) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn route_message(r: &RouteEntry) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = if r.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::from(r.scope);
    m.header.kind = RouteType::Unicast;
    if let Some((ip, len)) = r.destination {
        m.header.destination_prefix_length = len;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip)));
    }
    if let Some(g) = r.gateway {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    if let Some(i) = r.oif {
        m.attributes.push(RouteAttribute::Oif(i));
    }
    if let Some(s) = r.source {
        m.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(s)));
    }
    if r.metric != 0 {
        m.attributes.push(RouteAttribute::Priority(r.metric));
    }
    m
}

pub async fn add_route(h: &Handle, r: &RouteEntry, what: &str) -> Result<()> {
    h.route()
        .add(route_message(r))
        .replace()
        .execute()
        .await
        .map_err(|e| nl_err(format!("add route {what}"), e))
}

pub async fn del_route(h: &Handle, r: &RouteEntry, what: &str) -> Result<()> {
    match h.route().del(route_message(r)).execute().await {
        Ok(()) => Ok(()),
        // Already gone (e.g. with its address).
        Err(rtnetlink::Error::NetlinkError(m)) if m.code.map(|c| -c.get()) == Some(libc::ESRCH) => {
            Ok(())
        }
        Err(e) => Err(nl_err(format!("remove route {what}"), e)),
    }
}

pub async fn add_neighbour(h: &Handle, index: u32, ip: IpAddr, mac: &[u8]) -> Result<()> {
    h.neighbours()
        .add(index, ip)
        .link_layer_address(mac)
        .state(NeighbourState::Permanent)
        .flags(NeighbourFlags::empty())
        .replace()
        .execute()
        .await
        .map_err(|e| nl_err(format!("add neighbour {ip}"), e))
}
