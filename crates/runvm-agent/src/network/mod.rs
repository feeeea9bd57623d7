//! The guest's network: interfaces, routes and ARP neighbours as the host asks for them.
//!
//! Every change is all or nothing: the state before is read first, and on any failure what was
//! changed is put back, so a bad request leaves the guest's working network as it was.

mod netlink;

use std::net::IpAddr;

use rtnetlink::Handle;
use runvm_protocol::agent;

use crate::error::AgentError;
use netlink::{Addr, Link, RouteEntry};

type Result<T> = std::result::Result<T, AgentError>;

/// How long a device named in a request may take to appear (a hot-added card being probed).
const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Serializes network changes: two requests must not interleave their rollbacks.
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Brings the loopback device up (the kernel leaves it down).
pub async fn loopback_up() -> Result<()> {
    let h = netlink::connect()?;
    for l in netlink::links(&h).await? {
        if l.loopback && !l.up {
            netlink::set_link(&h, l.index, None, None, Some(true)).await?;
        }
    }
    Ok(())
}

/// Brings the loopback device up in the network namespace `netns` (a `/proc/PID/ns/net`), as
/// runc does in every network namespace it creates: a new namespace starts with `lo` down, so
/// `127.0.0.1` would be unreachable inside. Runs on a thread of its own that joins the
/// namespace (the netlink socket belongs to the namespace it is opened in) and then ends, so no
/// thread of the agent stays in the container's namespace.
pub async fn loopback_up_in(netns: std::path::PathBuf) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let what = format!("bring up lo in {}", netns.display());
    std::thread::Builder::new()
        .name("netns-lo".into())
        .spawn(move || {
            let _ = tx.send(loopback_up_on_this_thread(&netns));
        })
        .map_err(|e| AgentError::internal(format!("{what}: cannot start a thread: {e}")))?;
    rx.await
        .map_err(|_| AgentError::internal(format!("{what}: its thread died")))?
}

fn loopback_up_on_this_thread(netns: &std::path::Path) -> Result<()> {
    let what = || format!("bring up lo in {}", netns.display());
    let ns = std::fs::File::open(netns)
        .map_err(|e| AgentError::internal(format!("{}: cannot open it: {e}", what())))?;
    // Only this thread moves: setns(2) changes the calling thread's namespace.
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| AgentError::internal(format!("{}: setns: {e}", what())))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AgentError::internal(format!("{}: no runtime: {e}", what())))?;
    rt.block_on(loopback_up()).map_err(|e| e.context(what()))
}

/// "aa:bb:cc:dd:ee:ff" to bytes.
fn parse_mac(s: &str) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|p| {
            if p.len() == 2 {
                u8::from_str_radix(p, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(|| {
            AgentError::invalid(format!("MAC address {s:?} is not aa:bb:cc:dd:ee:ff"))
        })?;
    if bytes.len() != 6 {
        return Err(AgentError::invalid(format!(
            "MAC address {s:?} is not aa:bb:cc:dd:ee:ff"
        )));
    }
    Ok(bytes)
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn family_of(ip: &IpAddr) -> agent::ipaddress::Family {
    if ip.is_ipv6() {
        agent::ipaddress::Family::V6
    } else {
        agent::ipaddress::Family::V4
    }
}

fn parse_ip(text: &str, what: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| AgentError::invalid(format!("{what} {text:?} is not an IP address")))
}

fn parse_cidr(text: &str, what: &str) -> Result<(IpAddr, u8)> {
    let (ip, len) = text
        .split_once('/')
        .ok_or_else(|| AgentError::invalid(format!("{what} {text:?} is not ADDRESS/PREFIX")))?;
    let ip = parse_ip(ip, what)?;
    let len: u8 = len
        .parse()
        .map_err(|_| AgentError::invalid(format!("{what} {text:?} has a bad prefix length")))?;
    check_prefix(ip, len, text)?;
    Ok((ip, len))
}

fn check_prefix(ip: IpAddr, len: u8, text: &str) -> Result<()> {
    let max = if ip.is_ipv6() { 128 } else { 32 };
    if len > max {
        return Err(AgentError::invalid(format!(
            "{text}: prefix length {len} is over {max}"
        )));
    }
    Ok(())
}

fn to_proto_interface(link: &Link, addrs: &[Addr]) -> agent::Interface {
    let mut i = agent::Interface::new();
    i.name = link.name.clone();
    i.hw_addr = format_mac(&link.mac);
    i.mtu = link.mtu.into();
    i.up = link.up;
    i.addresses = addrs
        .iter()
        .filter(|a| a.index == link.index)
        .map(|a| {
            let mut p = agent::IPAddress::new();
            p.family = family_of(&a.ip).into();
            p.address = a.ip.to_string();
            p.prefix_len = a.prefix.into();
            p
        })
        .collect();
    i
}

/// Every device but loopback, with its addresses.
pub async fn list_interfaces() -> Result<agent::Interfaces> {
    let h = netlink::connect()?;
    let links = netlink::links(&h).await?;
    let addrs = netlink::addrs(&h, None).await?;
    let mut out = agent::Interfaces::new();
    out.interfaces = links
        .iter()
        .filter(|l| !l.loopback)
        .map(|l| to_proto_interface(l, &addrs))
        .collect();
    Ok(out)
}

/// Configures the device with the MAC of `wanted`: name, MTU, exactly these addresses, up or
/// down. Returns the device as it then is.
pub async fn update_interface(wanted: &agent::Interface) -> Result<agent::Interface> {
    let _guard = LOCK.lock().await;
    let mac = parse_mac(&wanted.hw_addr)?;
    let mut addrs = Vec::new();
    for a in &wanted.addresses {
        let ip = parse_ip(&a.address, "address")?;
        let text = format!("{}/{}", a.address, a.prefix_len);
        let prefix = u8::try_from(a.prefix_len)
            .map_err(|_| AgentError::invalid(format!("address {text}: bad prefix length")))?;
        check_prefix(ip, prefix, &text)?;
        addrs.push((ip, prefix));
    }
    if wanted.name.is_empty() || wanted.name.len() > 15 || wanted.name.contains('/') {
        return Err(AgentError::invalid(format!(
            "interface name {:?} must be 1 to 15 characters without '/'",
            wanted.name
        )));
    }
    let mtu = u32::try_from(wanted.mtu)
        .map_err(|_| AgentError::invalid(format!("MTU {} is out of range", wanted.mtu)))?;
    let h = netlink::connect()?;
    // A hot-added card shows up once the guest kernel has probed it.
    let deadline = tokio::time::Instant::now() + DEVICE_WAIT;
    let (links, before) = loop {
        let links = netlink::links(&h).await?;
        if let Some(l) = links.iter().find(|l| l.mac == mac).cloned() {
            break (links, l);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AgentError::not_found(format!(
                "no network device with MAC {} (waited {} s)",
                wanted.hw_addr,
                DEVICE_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if let Some(other) = links
        .iter()
        .find(|l| l.name == wanted.name && l.index != before.index)
    {
        return Err(AgentError::exists(format!(
            "another device ({}) is named {:?}",
            format_mac(&other.mac),
            wanted.name
        )));
    }
    let before_addrs = netlink::addrs(&h, Some(before.index)).await?;
    let wanted_addrs: Vec<Addr> = addrs
        .iter()
        .map(|&(ip, prefix)| Addr {
            index: before.index,
            ip,
            prefix,
        })
        .collect();
    let before_routes = netlink::routes(&h).await?;
    let applied = apply_interface(&h, &before, &before_addrs, wanted, mtu, &wanted_addrs).await;
    if let Err(e) = applied {
        tracing::warn!(error = %e, device = %before.name, "interface update failed; rolling back");
        if let Err(r) = restore_interface(&h, &before, &before_addrs, &before_routes).await {
            tracing::error!(error = %r, device = %before.name, "rollback failed");
        }
        return Err(e);
    }
    let link = netlink::links(&h)
        .await?
        .into_iter()
        .find(|l| l.index == before.index)
        .ok_or_else(|| AgentError::internal("the device went away while being configured"))?;
    let addrs = netlink::addrs(&h, Some(before.index)).await?;
    Ok(to_proto_interface(&link, &addrs))
}

/// Puts device `before.index` back as it was, with the routes that went with it. The device
/// is taken down only to rename it back: downing it would drop its routes.
async fn restore_interface(
    h: &Handle,
    before: &Link,
    before_addrs: &[Addr],
    before_routes: &[RouteEntry],
) -> Result<()> {
    let now = netlink::links(h)
        .await?
        .into_iter()
        .find(|l| l.index == before.index)
        .ok_or_else(|| AgentError::internal("the device went away"))?;
    if now.name != before.name {
        netlink::set_link(h, before.index, None, None, Some(false)).await?;
        netlink::set_link(h, before.index, Some(&before.name), None, None).await?;
    }
    if now.mtu != before.mtu {
        netlink::set_link(h, before.index, None, Some(before.mtu), None).await?;
    }
    let addrs = netlink::addrs(h, Some(before.index)).await?;
    for a in addrs.iter().filter(|a| !before_addrs.contains(a)) {
        netlink::del_addr(h, *a).await?;
    }
    for a in before_addrs.iter().filter(|a| !addrs.contains(a)) {
        netlink::add_addr(h, *a).await?;
    }
    netlink::set_link(h, before.index, None, None, Some(before.up)).await?;
    let routes = netlink::routes(h).await?;
    let mut missing: Vec<&RouteEntry> = before_routes
        .iter()
        .filter(|r| !routes.iter().any(|n| same_route(n, r)))
        .collect();
    missing.sort_by_key(|r| r.gateway.is_some());
    for r in missing {
        netlink::add_route(h, r, "rollback").await?;
    }
    Ok(())
}

async fn apply_interface(
    h: &Handle,
    before: &Link,
    before_addrs: &[Addr],
    wanted: &agent::Interface,
    mtu: u32,
    wanted_addrs: &[Addr],
) -> Result<()> {
    if before.name != wanted.name {
        // A device is renamed only while down.
        netlink::set_link(h, before.index, None, None, Some(false)).await?;
        netlink::set_link(h, before.index, Some(&wanted.name), None, None).await?;
    }
    if mtu != 0 && mtu != before.mtu {
        netlink::set_link(h, before.index, None, Some(mtu), None).await?;
    }
    for a in before_addrs.iter().filter(|a| !wanted_addrs.contains(a)) {
        netlink::del_addr(h, *a).await?;
    }
    for a in wanted_addrs {
        netlink::add_addr(h, *a).await?;
    }
    netlink::set_link(h, before.index, None, None, Some(wanted.up)).await
}

fn to_proto_route(r: &RouteEntry, links: &[Link]) -> agent::Route {
    let mut p = agent::Route::new();
    p.destination = match r.destination {
        Some((ip, len)) => format!("{ip}/{len}"),
        None => "default".into(),
    };
    p.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
    p.device = r
        .oif
        .and_then(|i| links.iter().find(|l| l.index == i))
        .map(|l| l.name.clone())
        .unwrap_or_default();
    p.source = r.source.map(|s| s.to_string()).unwrap_or_default();
    p.scope = r.scope.into();
    p.metric = r.metric;
    p.family = if r.v6 {
        agent::ipaddress::Family::V6
    } else {
        agent::ipaddress::Family::V4
    }
    .into();
    p
}

fn describe(p: &agent::Route) -> String {
    let mut s = p.destination.clone();
    if !p.gateway.is_empty() {
        s.push_str(&format!(" via {}", p.gateway));
    }
    if !p.device.is_empty() {
        s.push_str(&format!(" dev {}", p.device));
    }
    s
}

fn from_proto_route(p: &agent::Route, links: &[Link]) -> Result<RouteEntry> {
    let what = describe(p);
    let destination = if p.destination == "default" || p.destination.is_empty() {
        None
    } else {
        Some(parse_cidr(&p.destination, "route destination")?)
    };
    let gateway = match p.gateway.as_str() {
        "" => None,
        g => Some(parse_ip(g, "gateway")?),
    };
    let source = match p.source.as_str() {
        "" => None,
        s => Some(parse_ip(s, "route source")?),
    };
    let oif = match p.device.as_str() {
        "" => None,
        d => Some(
            links
                .iter()
                .find(|l| l.name == d)
                .map(|l| l.index)
                .ok_or_else(|| {
                    AgentError::invalid(format!("route {what}: no device named {d:?}"))
                })?,
        ),
    };
    let v6 = match (destination, gateway) {
        (Some((ip, _)), _) | (None, Some(ip)) => ip.is_ipv6(),
        (None, None) => p.family.value() == agent::ipaddress::Family::V6 as i32,
    };
    if let Some(g) = gateway {
        if g.is_ipv6() != v6 {
            return Err(AgentError::invalid(format!(
                "route {what}: gateway and destination are of different families"
            )));
        }
    }
    let scope = u8::try_from(p.scope)
        .map_err(|_| AgentError::invalid(format!("route {what}: scope {} is over 255", p.scope)))?;
    Ok(RouteEntry {
        v6,
        destination,
        gateway,
        oif,
        source,
        scope,
        metric: p.metric,
    })
}

pub async fn list_routes() -> Result<agent::Routes> {
    let h = netlink::connect()?;
    let links = netlink::links(&h).await?;
    let mut out = agent::Routes::new();
    out.routes = netlink::routes(&h)
        .await?
        .iter()
        .map(|r| to_proto_route(r, &links))
        .collect();
    Ok(out)
}

/// Makes the main table hold exactly `wanted` (IPv6 link-local and multicast routes aside).
pub async fn update_routes(wanted: &agent::Routes) -> Result<agent::Routes> {
    let _guard = LOCK.lock().await;
    let h = netlink::connect()?;
    let links = netlink::links(&h).await?;
    let mut entries = Vec::new();
    for p in &wanted.routes {
        entries.push((from_proto_route(p, &links)?, describe(p)));
    }
    // Routes through a gateway need the route to the gateway first.
    entries.sort_by_key(|(r, _)| r.gateway.is_some());
    let before = netlink::routes(&h).await?;
    let applied = async {
        for r in before
            .iter()
            .filter(|r| !entries.iter().any(|(w, _)| same_route(w, r)))
        {
            netlink::del_route(&h, r, &to_proto_route(r, &links).destination).await?;
        }
        for (r, what) in &entries {
            netlink::add_route(&h, r, what).await?;
        }
        Ok::<(), AgentError>(())
    }
    .await;
    if let Err(e) = applied {
        tracing::warn!(error = %e, "route update failed; rolling back");
        let now = netlink::routes(&h).await.unwrap_or_default();
        for r in now
            .iter()
            .filter(|r| !before.iter().any(|b| same_route(b, r)))
        {
            let _ = netlink::del_route(&h, r, "rollback").await;
        }
        let mut old = before.clone();
        old.sort_by_key(|r| r.gateway.is_some());
        for r in old.iter().filter(|r| !now.iter().any(|n| same_route(n, r))) {
            if let Err(r) = netlink::add_route(&h, r, "rollback").await {
                tracing::error!(error = %r, "route rollback failed");
            }
        }
        return Err(e);
    }
    list_routes().await
}

/// Same destination, gateway, device and (for IPv6, where it tells routes apart) metric.
fn same_route(a: &RouteEntry, b: &RouteEntry) -> bool {
    a.v6 == b.v6
        && a.destination == b.destination
        && a.gateway == b.gateway
        && a.oif == b.oif
        && (!a.v6 || a.metric == 0 || b.metric == 0 || a.metric == b.metric)
}

/// Adds (or replaces) permanent neighbour entries.
pub async fn add_neighbors(wanted: &agent::ARPNeighbors) -> Result<()> {
    let _guard = LOCK.lock().await;
    let h = netlink::connect()?;
    let links = netlink::links(&h).await?;
    for n in &wanted.neighbors {
        let ip = parse_ip(&n.to_ip.address, "neighbour address")?;
        let mac = parse_mac(&n.ll_addr)?;
        let index = links
            .iter()
            .find(|l| l.name == n.device)
            .map(|l| l.index)
            .ok_or_else(|| {
                AgentError::invalid(format!("neighbour {ip}: no device named {:?}", n.device))
            })?;
        netlink::add_neighbour(&h, index, ip, &mac).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(
            parse_mac("02:AA:bb:0c:dd:ee").unwrap(),
            [2, 0xaa, 0xbb, 12, 0xdd, 0xee]
        );
        assert_eq!(
            format_mac(&[2, 0xaa, 0xbb, 12, 0xdd, 0xee]),
            "02:aa:bb:0c:dd:ee"
        );
        for bad in ["", "02:aa", "02:aa:bb:cc:dd:ee:ff", "zz:aa:bb:cc:dd:ee"] {
            assert!(parse_mac(bad).unwrap_err().message.contains(bad));
        }
    }

    #[test]
    fn routes_are_validated_naming_the_value() {
        let links = vec![Link {
            index: 2,
            name: "eth0".into(),
            mac: vec![2, 0, 0, 0, 0, 1],
            mtu: 1500,
            up: true,
            loopback: false,
        }];
        let mut p = agent::Route::new();
        p.destination = "default".into();
        p.gateway = "10.0.0.1".into();
        p.device = "nosuch0".into();
        let e = from_proto_route(&p, &links).unwrap_err();
        assert!(e.message.contains("nosuch0"), "{}", e.message);
        p.device = "eth0".into();
        let r = from_proto_route(&p, &links).unwrap();
        assert_eq!(r.oif, Some(2));
        assert!(!r.v6 && r.destination.is_none());
        p.destination = "10.1.0.0/40".into();
        let e = from_proto_route(&p, &links).unwrap_err();
        assert!(e.message.contains("10.1.0.0/40"), "{}", e.message);
        p.destination = "fd00::/64".into();
        assert!(from_proto_route(&p, &links).is_err(), "mixed families");
    }
}
