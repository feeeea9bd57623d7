//! The pod's network namespace as runvm sees it and changes it: its devices, addresses, routes
//! and neighbours (read over netlink), taps (`/dev/net/tun`), and the tc ingress qdiscs and
//! mirred filters that join a tap to a device.
//!
//! Netlink sockets and taps belong to the network namespace of the thread that makes them, so
//! every operation runs on a thread of its own that first joins the namespace ([`in_netns`]).

use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec};

use super::NetworkError;
use crate::agent::{IpNet, Neighbor, Route};

type Result<T> = std::result::Result<T, NetworkError>;

/// ETH_P_ALL: tc filters for every protocol (netlink wants it in network byte order).
const ETH_P_ALL: u16 = 0x0003;

/// A device of the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    /// Ethernet-like (veth, macvlan, physical) and not a tap or bridge.
    pub ethernet: bool,
}

/// What the pod's namespace holds for one device: the guest gets the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceScan {
    pub link: HostLink,
    pub addresses: Vec<IpNet>,
    pub routes: Vec<Route>,
    pub neighbors: Vec<Neighbor>,
}

/// Runs `work` on a thread inside the network namespace `netns`, with a tokio runtime of its
/// own (netlink sockets made there belong to that namespace).
pub async fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let file = File::open(netns).map_err(|source| NetworkError::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    let path = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("runvm-netns".into())
        .spawn(move || {
            let result = (|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetworkError::Netns {
                        path: path.clone(),
                        source: e.into(),
                    }
                })?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| NetworkError::Netlink {
                        action: "start a runtime in the network namespace".into(),
                        reason: e.to_string(),
                    })?;
                rt.block_on(work())
            })();
            let _ = tx.send(result);
        })
        .map_err(|e| NetworkError::Netlink {
            action: "start a thread for the network namespace".into(),
            reason: e.to_string(),
        })?;
    rx.await.map_err(|_| NetworkError::Netlink {
        action: "work in the network namespace".into(),
        reason: "its thread ended without an answer".into(),
    })?
}

fn nl(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let action = action.into();
    move |e| NetworkError::Netlink {
        action,
        reason: match e {
            rtnetlink::Error::NetlinkError(m) => {
                let errno = m.code.map(|c| -c.get()).unwrap_or(0);
                std::io::Error::from_raw_os_error(errno).to_string()
            }
            other => other.to_string(),
        },
    }
}

/// A netlink handle in the current thread's namespace (call inside [`in_netns`]).
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetworkError::Netlink {
        action: "open a netlink socket".into(),
        reason: e.to_string(),
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

fn link_from(m: LinkMessage) -> HostLink {
    let mut link = HostLink {
        index: m.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        ethernet: m.header.link_layer_type == LinkLayerType::Ether,
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(mac) => link.mac = mac,
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(kind) = i {
                        if matches!(kind, InfoKind::Tun | InfoKind::Bridge) {
                            link.ethernet = false;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    link
}

pub async fn links(h: &Handle) -> Result<Vec<HostLink>> {
    let mut out = Vec::new();
    let mut s = h.link().get().execute();
    while let Some(m) = s.try_next().await.map_err(nl("list devices"))? {
        out.push(link_from(m));
    }
    Ok(out)
}

pub async fn link_by_name(h: &Handle, name: &str) -> Result<HostLink> {
    links(h)
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| NetworkError::NoSuchDevice {
            device: name.to_owned(),
        })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// The addresses, routes and permanent neighbours of `link`.
pub async fn scan_device(h: &Handle, link: HostLink) -> Result<DeviceScan> {
    let mut addresses = Vec::new();
    let mut s = h
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute();
    while let Some(m) = s.try_next().await.map_err(nl("list addresses"))? {
        if matches!(m.header.scope, AddressScope::Link | AddressScope::Host) {
            continue;
        }
        let ip = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = ip {
            if let Ok(n) = IpNet::new(ip, m.header.prefix_len) {
                if !addresses.contains(&n) {
                    addresses.push(n);
                }
            }
        }
    }
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        let mut s = h.route().get(msg).execute();
        while let Some(m) = s.try_next().await.map_err(nl("list routes"))? {
            if m.header.table != RouteHeader::RT_TABLE_MAIN || m.header.kind != RouteType::Unicast {
                continue;
            }
            let mut r = Route {
                destination: None,
                gateway: None,
                device: link.name.clone(),
                source: None,
                scope: m.header.scope.into(),
                metric: 0,
            };
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => {
                        r.destination = route_ip(d)
                            .and_then(|ip| IpNet::new(ip, m.header.destination_prefix_length).ok())
                    }
                    RouteAttribute::Gateway(g) => r.gateway = route_ip(g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::PrefSource(p) => r.source = route_ip(p),
                    RouteAttribute::Priority(p) => r.metric = *p,
                    _ => {}
                }
            }
            let kernel_own = matches!(r.destination, Some(IpNet { address: IpAddr::V6(ip), .. })
                if ip.segments()[0] & 0xffc0 == 0xfe80 || ip.segments()[0] & 0xff00 == 0xff00);
            if oif == Some(link.index) && !kernel_own {
                routes.push(r);
            }
        }
    }
    let mut neighbors = Vec::new();
    let mut s = h.neighbours().get().execute();
    while let Some(m) = s.try_next().await.map_err(nl("list neighbours"))? {
        if m.header.ifindex != link.index || m.header.state != NeighbourState::Permanent {
            continue;
        }
        let mut ip = None;
        let mut mac = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(l) => mac = Some(format_mac(l)),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            neighbors.push(Neighbor {
                ip,
                device: link.name.clone(),
                mac,
            });
        }
    }
    Ok(DeviceScan {
        link,
        addresses,
        routes,
        neighbors,
    })
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Makes a persistent tap `name` in the current thread's namespace (call inside [`in_netns`]),
/// up, with `mtu`.
pub async fn create_tap(h: &Handle, name: &str, mtu: u32) -> Result<HostLink> {
    let tap_err = |source: std::io::Error| NetworkError::Tap {
        name: name.to_owned(),
        source,
    };
    // IFF_TUN_EXCL: fail rather than attach to a tap of that name that exists already.
    let tun = runvm_hypervisor::qemu::tun_attach(
        name,
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL,
    )
    .map_err(tap_err)?;
    // SAFETY: TUNSETPERSIST takes an int argument; `tun` is attached to the tap.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(tap_err(std::io::Error::last_os_error()));
    }
    drop(tun);
    let link = link_by_name(h, name).await?;
    let msg = LinkMessageBuilder::<LinkUnspec>::new()
        .index(link.index)
        .mtu(mtu)
        .up()
        .build();
    if let Err(e) = h.link().set(msg).execute().await {
        let _ = delete_link(h, link.index).await;
        return Err(nl(format!("set tap {name} up with MTU {mtu}"))(e));
    }
    Ok(link)
}

pub async fn delete_link(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .del(index)
        .execute()
        .await
        .map_err(nl(format!("remove device {index}")))
}

/// Makes a passthru macvtap `name` on `lower` (it takes the lower device's MAC and all its
/// traffic), up, with an interface index whose `/dev/tapN` node does not exist yet, so the node
/// that appears is this macvtap's. Returns the node.
pub async fn create_macvtap(h: &Handle, name: &str, lower: &HostLink) -> Result<PathBuf> {
    use rtnetlink::packet_route::link::MacVtapMode;
    let mut seed = [0u8; 4];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut seed);
    }
    let mut index = 20_000 + u32::from_ne_bytes(seed) % 40_000;
    for _ in 0..100 {
        if !Path::new(&format!("/dev/tap{index}")).exists() {
            break;
        }
        index = 20_000 + (index + 7) % 40_000;
    }
    let node = PathBuf::from(format!("/dev/tap{index}"));
    let msg = rtnetlink::LinkMacVtap::new(name, lower.index, MacVtapMode::Passthrough)
        .index(index)
        .mtu(lower.mtu)
        .up()
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(nl(format!("create macvtap {name} on {}", lower.name)))?;
    // devtmpfs makes the node as the device registers; give it a moment.
    for _ in 0..100 {
        if node.exists() {
            return Ok(node);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _ = delete_link(h, index).await;
    Err(NetworkError::Tap {
        name: name.to_owned(),
        source: std::io::Error::other(format!("{} did not appear", node.display())),
    })
}

/// Adds an ingress qdisc to `from` with a filter redirecting every frame to `to`'s egress.
pub async fn redirect(h: &Handle, from: &HostLink, to: &HostLink) -> Result<()> {
    h.qdisc()
        .add(from.index as i32)
        .ingress()
        .execute()
        .await
        .map_err(nl(format!("add an ingress qdisc to {}", from.name)))?;
    h.traffic_filter(from.index as i32)
        .add()
        .parent(0xffff_0000)
        .protocol(ETH_P_ALL.to_be())
        .redirect(to.index)
        .map_err(nl("build a mirred filter"))?
        .execute()
        .await
        .map_err(nl(format!(
            "add a filter redirecting {} to {}",
            from.name, to.name
        )))
}

/// Removes the ingress qdisc of device `index` (and so its filters).
pub async fn delete_ingress(h: &Handle, index: u32, name: &str) -> Result<()> {
    let mut req = h.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(0xffff_0000);
    req.execute()
        .await
        .map_err(nl(format!("remove the ingress qdisc of {name}")))
}

/// Whether device `index` has an ingress qdisc.
pub async fn has_ingress(h: &Handle, index: u32) -> Result<bool> {
    let mut s = h.qdisc().get().index(index as i32).ingress().execute();
    while let Some(m) = s.try_next().await.map_err(nl("list qdiscs"))? {
        if m.header.index == index as i32 && m.header.parent == TcHandle::INGRESS {
            return Ok(true);
        }
    }
    Ok(false)
}
