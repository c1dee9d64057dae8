//! Guest networking RPCs over rtnetlink: interfaces, addresses, routes, ARP
//! neighbours, in Kata's message shapes.
//!
//! Conventions as Kata's runtime uses them: an interface is found by MAC
//! (`hwAddr`) or else by name; an address mask is a prefix length ("24");
//! a route's `dest` is CIDR text, with "" (or "default") for the default
//! route; UpdateRoutes replaces every non-kernel route of the main table.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use kiln_protocol::{agent, types};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::{invalid, not_found, os, Result};

/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;
/// NUD_PERMANENT, the default neighbour state.
const NUD_PERMANENT: u16 = 0x80;
/// Largest lists accepted in one request.
const MAX_ITEMS: usize = 1024;

fn nl(what: &str, e: impl std::fmt::Display) -> crate::error::AgentError {
    os(format!("netlink: {what}"), e)
}

async fn connect() -> Result<Handle> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| nl("opening a route socket", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

// ---- parsing and formatting (pure, unit-tested) ----

pub fn parse_mac(s: &str) -> Result<Vec<u8>> {
    let bytes: Option<Vec<u8>> = s
        .split(':')
        .map(|b| {
            // Hex digits only: `from_str_radix` also takes a leading `+`.
            (b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()))
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect();
    match bytes {
        Some(b) if b.len() == 6 => Ok(b),
        _ => Err(invalid(format!(
            "hardware address {s:?} is not like 02:42:ac:11:00:02"
        ))),
    }
}

pub fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// "10.0.0.0/24" (or a bare address, which is a host route) to (ip, prefix).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| invalid(format!("{s:?} is not an IP address or CIDR")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| invalid(format!("{s:?} has a bad prefix length")))?,
        None => max,
    };
    Ok((ip, len))
}

/// An address's mask as Kata sends it: a prefix length, or a dotted mask.
pub fn parse_mask(mask: &str, ip: &IpAddr) -> Result<u8> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if mask.is_empty() {
        return Ok(max);
    }
    if let Ok(n) = mask.parse::<u8>() {
        if n <= max {
            return Ok(n);
        }
    }
    if let Ok(m) = mask.parse::<Ipv4Addr>() {
        let bits = u32::from(m);
        if bits.leading_ones() + bits.trailing_zeros() == 32 {
            return Ok(bits.leading_ones() as u8);
        }
    }
    Err(invalid(format!(
        "mask {mask:?} of {ip} is not a prefix length"
    )))
}

fn family(ip: &IpAddr) -> types::IPFamily {
    if ip.is_ipv4() {
        types::IPFamily::v4
    } else {
        types::IPFamily::v6
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

// ---- queries ----

struct Link {
    index: u32,
    name: String,
    mac: String,
    mtu: u32,
    flags: u32,
    kind: String,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: String::new(),
        mtu: 0,
        flags: m.header.flags.bits(),
        kind: String::new(),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(b) => l.mac = format_mac(b),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = k.to_string();
                    }
                }
            }
            _ => {}
        }
    }
    l
}

async fn links(h: &Handle) -> Result<Vec<Link>> {
    let msgs: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl("listing links", e))?;
    Ok(msgs.iter().map(link_of).collect())
}

async fn addresses(h: &Handle) -> Result<Vec<AddressMessage>> {
    h.address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl("listing addresses", e))
}

fn address_ip(m: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the interface's own address on point-to-point links.
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => addr = Some(*ip),
            _ => {}
        }
    }
    addr
}

fn interface(l: &Link, addrs: &[AddressMessage]) -> types::Interface {
    let mut i = types::Interface::new();
    i.device = l.name.clone();
    i.name = l.name.clone();
    i.mtu = l.mtu as u64;
    i.hwAddr = l.mac.clone();
    i.raw_flags = l.flags;
    i.type_ = l.kind.clone();
    for a in addrs.iter().filter(|a| a.header.index == l.index) {
        if let Some(ip) = address_ip(a) {
            let mut x = types::IPAddress::new();
            x.family = family(&ip).into();
            x.address = ip.to_string();
            x.mask = a.header.prefix_len.to_string();
            i.IPAddresses.push(x);
        }
    }
    i
}

pub async fn list_interfaces() -> Result<agent::Interfaces> {
    let h = connect().await?;
    let addrs = addresses(&h).await?;
    let mut out = agent::Interfaces::new();
    out.Interfaces = links(&h)
        .await?
        .iter()
        .map(|l| interface(l, &addrs))
        .collect();
    Ok(out)
}

async fn route_messages(h: &Handle) -> Result<Vec<RouteMessage>> {
    let mut v: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl("listing IPv4 routes", e))?;
    // A guest kernel without IPv6 refuses the dump; that is no error here.
    let v6: std::result::Result<Vec<RouteMessage>, _> = h
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await;
    match v6 {
        Ok(v6) => v.extend(v6),
        Err(e) => tracing::debug!("no IPv6 routes: {e}"),
    }
    Ok(v.into_iter()
        .filter(|r| r.header.table == RT_TABLE_MAIN && r.header.kind == RouteType::Unicast)
        .collect())
}

fn route_of(m: &RouteMessage, names: &HashMap<u32, String>) -> types::Route {
    let mut r = types::Route::new();
    r.family = (if m.header.address_family == AddressFamily::Inet6 {
        types::IPFamily::v6
    } else {
        types::IPFamily::v4
    })
    .into();
    r.scope = u8::from(m.header.scope) as u32;
    r.flags = m.header.flags.bits();
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                if let Some(ip) = route_ip(d) {
                    r.dest = format!("{ip}/{}", m.header.destination_prefix_length);
                }
            }
            RouteAttribute::Gateway(g) => {
                r.gateway = route_ip(g).map(|i| i.to_string()).unwrap_or_default()
            }
            RouteAttribute::PrefSource(s) => {
                r.source = route_ip(s).map(|i| i.to_string()).unwrap_or_default()
            }
            RouteAttribute::Oif(i) => r.device = names.get(i).cloned().unwrap_or_default(),
            RouteAttribute::Metrics(ms) => {
                for mt in ms {
                    if let rtnetlink::packet_route::route::RouteMetric::Mtu(v) = mt {
                        r.mtu = *v;
                    }
                }
            }
            _ => {}
        }
    }
    r
}

pub async fn list_routes() -> Result<agent::Routes> {
    let h = connect().await?;
    let names: HashMap<u32, String> = links(&h)
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let mut out = agent::Routes::new();
    out.Routes = route_messages(&h)
        .await?
        .iter()
        .map(|m| route_of(m, &names))
        .collect();
    Ok(out)
}

// ---- changes ----

pub async fn update_interface(req: Option<&types::Interface>) -> Result<types::Interface> {
    let want = req.ok_or_else(|| invalid("UpdateInterface has no interface"))?;
    if want.IPAddresses.len() > MAX_ITEMS {
        return Err(invalid("too many IP addresses"));
    }
    let mut new_addrs = Vec::new();
    for a in &want.IPAddresses {
        let ip: IpAddr = a
            .address
            .parse()
            .map_err(|_| invalid(format!("{:?} is not an IP address", a.address)))?;
        new_addrs.push((ip, parse_mask(&a.mask, &ip)?));
    }
    let h = connect().await?;
    let all = links(&h).await?;
    let link = if !want.hwAddr.is_empty() {
        let mac = format_mac(&parse_mac(&want.hwAddr)?);
        all.iter().find(|l| l.mac == mac)
    } else {
        let name = if want.device.is_empty() {
            &want.name
        } else {
            &want.device
        };
        all.iter().find(|l| &l.name == name)
    }
    .ok_or_else(|| {
        // Kata's Go runtime retries UpdateInterface while the error says
        // "Link not found" (a hot-plugged NIC may not have appeared yet).
        not_found(format!(
            "Link not found: no interface with hwAddr {:?} / name {:?}",
            want.hwAddr, want.name
        ))
    })?;
    let index = link.index;

    if !want.name.is_empty() && want.name != link.name {
        if want.name.len() > 15 || want.name.contains(['/', '\0', ' ']) {
            return Err(invalid(format!(
                "interface name {:?} is not valid",
                want.name
            )));
        }
        h.link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(|e| nl("setting link down", e))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(want.name.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| nl(&format!("renaming {} to {}", link.name, want.name), e))?;
    }
    if want.mtu > 0 {
        let mtu = u32::try_from(want.mtu)
            .map_err(|_| invalid(format!("mtu {} is too large", want.mtu)))?;
        h.link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| nl(&format!("setting mtu {mtu}"), e))?;
    }
    // Replace the addresses: drop the old ones, add the asked-for ones.
    for a in addresses(&h)
        .await?
        .into_iter()
        .filter(|a| a.header.index == index)
    {
        let ip = address_ip(&a);
        if new_addrs
            .iter()
            .any(|(n, len)| Some(*n) == ip && *len == a.header.prefix_len)
        {
            continue;
        }
        h.address()
            .del(a)
            .execute()
            .await
            .map_err(|e| nl("removing an old address", e))?;
    }
    for (ip, len) in &new_addrs {
        match h.address().add(index, *ip, *len).execute().await {
            Ok(()) => {}
            Err(e) if is_eexist(&e) => {}
            Err(e) => return Err(nl(&format!("adding {ip}/{len}"), e)),
        }
    }
    // raw_flags carries the interface flags the runtime wants; of those only
    // NOARP is not implied by bringing the link up (Kata's agent sets it too).
    let noarp = want.raw_flags & libc::IFF_NOARP as u32 != 0;
    h.link()
        .set(LinkUnspec::new_with_index(index).arp(!noarp).up().build())
        .execute()
        .await
        .map_err(|e| nl("setting link up", e))?;
    let addrs = addresses(&h).await?;
    let updated = links(&h)
        .await?
        .into_iter()
        .find(|l| l.index == index)
        .ok_or_else(|| not_found("interface vanished"))?;
    Ok(interface(&updated, &addrs))
}

fn is_eexist(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

struct NewRoute {
    dest: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    index: u32,
    scope: u8,
    /// RTNH_F_ONLINK: the gateway is on the link even if no address's
    /// subnet covers it (CNI plugins use it for /32 pod addresses).
    onlink: bool,
    /// Route MTU (0: none).
    mtu: u32,
}

/// Route.flags bit for on-link next hops (RTNH_F_ONLINK).
const RTNH_F_ONLINK: u32 = 4;

fn route_message(r: &NewRoute) -> Result<RouteMessage> {
    let scope = RouteScope::from(r.scope);
    let m = match r
        .dest
        .map(|d| d.0)
        .or(r.gateway)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    {
        IpAddr::V4(_) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .output_interface(r.index)
                .scope(scope)
                .protocol(RouteProtocol::Boot);
            if let Some((IpAddr::V4(d), len)) = r.dest {
                b = b.destination_prefix(d, len);
            }
            match r.gateway {
                Some(IpAddr::V4(g)) => b = b.gateway(g),
                Some(_) => return Err(invalid("IPv4 route with an IPv6 gateway")),
                None => {}
            }
            if let Some(IpAddr::V4(s)) = r.source {
                b = b.pref_source(s);
            }
            if r.onlink {
                b = b.onlink();
            }
            b.build()
        }
        IpAddr::V6(_) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .output_interface(r.index)
                .scope(scope)
                .protocol(RouteProtocol::Boot);
            if let Some((IpAddr::V6(d), len)) = r.dest {
                b = b.destination_prefix(d, len);
            }
            match r.gateway {
                Some(IpAddr::V6(g)) => b = b.gateway(g),
                Some(_) => return Err(invalid("IPv6 route with an IPv4 gateway")),
                None => {}
            }
            if let Some(IpAddr::V6(s)) = r.source {
                b = b.pref_source(s);
            }
            if r.onlink {
                b = b.onlink();
            }
            b.build()
        }
    };
    let mut m = m;
    if r.mtu > 0 {
        m.attributes
            .push(rtnetlink::packet_route::route::RouteAttribute::Metrics(
                vec![rtnetlink::packet_route::route::RouteMetric::Mtu(r.mtu)],
            ));
    }
    Ok(m)
}

pub async fn update_routes(req: Option<&agent::Routes>) -> Result<agent::Routes> {
    let wanted = req.map(|r| r.Routes.as_slice()).unwrap_or(&[]);
    if wanted.len() > MAX_ITEMS {
        return Err(invalid("too many routes"));
    }
    let h = connect().await?;
    let by_name: HashMap<String, u32> = links(&h)
        .await?
        .into_iter()
        .map(|l| (l.name, l.index))
        .collect();
    let mut new_routes = Vec::new();
    for r in wanted {
        let index = *by_name.get(&r.device).ok_or_else(|| {
            not_found(format!(
                "Link not found: route to {:?} names no interface {:?}",
                r.dest, r.device
            ))
        })?;
        let dest = match r.dest.as_str() {
            "" | "default" => None,
            d => Some(parse_cidr(d)?),
        };
        let gateway =
            if r.gateway.is_empty() {
                None
            } else {
                Some(r.gateway.parse::<IpAddr>().map_err(|_| {
                    invalid(format!("gateway {:?} is not an IP address", r.gateway))
                })?)
            };
        let source = if r.source.is_empty() {
            None
        } else {
            Some(
                r.source
                    .parse::<IpAddr>()
                    .map_err(|_| invalid(format!("source {:?} is not an IP address", r.source)))?,
            )
        };
        let scope = u8::try_from(r.scope)
            .map_err(|_| invalid(format!("route scope {} is not a scope", r.scope)))?;
        new_routes.push(NewRoute {
            dest,
            gateway,
            source,
            index,
            scope,
            onlink: r.flags & RTNH_F_ONLINK != 0,
            mtu: r.mtu,
        });
    }
    // Link routes first: a gateway must be reachable before a route uses it.
    new_routes.sort_by_key(|r| r.gateway.is_some());
    let messages = new_routes
        .iter()
        .map(route_message)
        .collect::<Result<Vec<_>>>()?;
    for old in route_messages(&h).await? {
        if old.header.protocol == RouteProtocol::Kernel {
            continue;
        }
        h.route()
            .del(old)
            .execute()
            .await
            .map_err(|e| nl("removing an old route", e))?;
    }
    for m in messages {
        match h.route().add(m).execute().await {
            Ok(()) => {}
            Err(e) if is_eexist(&e) => {}
            Err(e) => return Err(nl("adding a route", e)),
        }
    }
    drop(h);
    list_routes().await
}

pub async fn add_arp_neighbors(req: Option<&agent::ARPNeighbors>) -> Result<()> {
    let list = req.map(|r| r.ARPNeighbors.as_slice()).unwrap_or(&[]);
    if list.len() > MAX_ITEMS {
        return Err(invalid("too many neighbours"));
    }
    let h = connect().await?;
    let by_name: HashMap<String, u32> = links(&h)
        .await?
        .into_iter()
        .map(|l| (l.name, l.index))
        .collect();
    for n in list {
        let ip_text = n
            .toIPAddress
            .as_ref()
            .map(|a| a.address.as_str())
            .unwrap_or("");
        let ip: IpAddr = ip_text.parse().map_err(|_| {
            invalid(format!(
                "neighbour address {ip_text:?} is not an IP address"
            ))
        })?;
        let index = *by_name
            .get(&n.device)
            .ok_or_else(|| not_found(format!("neighbour {ip}: no interface {:?}", n.device)))?;
        let state = if n.state == 0 {
            NUD_PERMANENT
        } else {
            u16::try_from(n.state).map_err(|_| invalid("bad neighbour state"))?
        };
        let flags = NeighbourFlags::from_bits_truncate(u8::try_from(n.flags).unwrap_or(0));
        let mut add = h
            .neighbours()
            .add(index, ip)
            .state(NeighbourState::from(state))
            .flags(flags)
            .replace();
        if !n.lladdr.is_empty() {
            add = add.link_layer_address(&parse_mac(&n.lladdr)?);
        }
        add.execute()
            .await
            .map_err(|e| nl(&format!("adding neighbour {ip} on {}", n.device), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_cidrs_and_masks() {
        assert_eq!(
            parse_mac("02:42:AC:11:00:02").unwrap(),
            vec![2, 0x42, 0xac, 0x11, 0, 2]
        );
        assert_eq!(
            format_mac(&[2, 0x42, 0xac, 0x11, 0, 2]),
            "02:42:ac:11:00:02"
        );
        for bad in [
            "",
            "02:42",
            "zz:42:ac:11:00:02",
            "2:42:ac:11:00:02:00",
            "02-42-ac-11-00-02",
            // Found by fuzzing (`fuzz/`, agent_requests): a sign is not a digit.
            "+2:42:ac:11:00:02",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cidr("10.0.0.0/24").unwrap(),
            ("10.0.0.0".parse().unwrap(), 24)
        );
        assert_eq!(parse_cidr("10.0.0.1").unwrap().1, 32);
        assert_eq!(parse_cidr("fd00::/64").unwrap().1, 64);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nonsense/8").is_err());
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(parse_mask("24", &v4).unwrap(), 24);
        assert_eq!(parse_mask("255.255.255.0", &v4).unwrap(), 24);
        assert_eq!(parse_mask("", &v4).unwrap(), 32);
        assert!(parse_mask("255.0.255.0", &v4).is_err());
        assert!(parse_mask("40", &v4).is_err());
    }
}
