//! Policy routing for exit nodes, as wg-quick does it: an exit's default
//! route goes in a table of its own, used by every packet that does not
//! carry veilmesh's firewall mark; our own sockets carry it, so the
//! transports' traffic (UDP to peers, STUN, the DHT, toxcore's UDP socket,
//! the SAM bridge connection) never enters the tunnel it carries.
//!
//! Per family with an exit, with M the mark (and the table's number):
//!
//! ```text
//! ip rule add not fwmark M table main suppress_prefixlength 0
//! ip rule add not fwmark M table M       (default dev TUN, throw BYPASS)
//! ```
//!
//! The first keeps every more specific route of the main table (the LAN,
//! the mesh /48, site subnets) in force for unmarked traffic; the second
//! sends the rest to the exit. Both rules name our mark, so removing them
//! never touches another program's rules. After a crash the rules and the
//! throw routes stay behind (the default route goes with the TUN): the next
//! start finds the table without a device route and clears them.

use std::net::IpAddr;

use anyhow::Context;
use ipnet::IpNet;

use crate::netdev::ip;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// iproute2's family option.
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// The exit routing of one TUN device.
#[derive(Debug)]
pub struct ExitRouting {
    mark: u32,
    /// Addresses whose traffic never goes to the exit: toxcore's TCP relays
    /// (its TCP sockets cannot be marked before they connect).
    bypass: Vec<IpAddr>,
    installed: Vec<Family>,
}

impl ExitRouting {
    /// Clears what a crashed instance with the same mark left behind.
    pub fn new(mark: u32, bypass: Vec<IpAddr>) -> ExitRouting {
        for family in [Family::V4, Family::V6] {
            clear_stale(mark, family);
        }
        ExitRouting {
            mark,
            bypass,
            installed: Vec::new(),
        }
    }

    /// Makes the families with an exit through `dev` exactly `wanted`.
    pub fn sync(&mut self, wanted: &[Family], dev: &str) -> anyhow::Result<()> {
        for &family in wanted {
            if !self.installed.contains(&family) {
                self.install(family, dev)?;
                self.installed.push(family);
            }
        }
        let gone: Vec<Family> = self
            .installed
            .iter()
            .copied()
            .filter(|f| !wanted.contains(f))
            .collect();
        for family in gone {
            self.remove(family);
            self.installed.retain(|f| *f != family);
        }
        Ok(())
    }

    fn install(&self, family: Family, dev: &str) -> anyhow::Result<()> {
        let table = self.mark.to_string();
        let route = [family.flag(), "route", "add", family.default_route()];
        if let Err(error) = ip(&[&route[..], &["dev", dev, "table", &table]].concat()) {
            return Err(error).with_context(|| {
                format!(
                    "cannot route {} through the exit: table {table} is in use (another \
                     veilmesh or wg-quick with the same mark?); set [interface] fwmark",
                    family.default_route()
                )
            });
        }
        let done = (|| {
            for addr in self.bypass.iter().filter(|a| family_of(a) == family) {
                ip(&[
                    family.flag(),
                    "route",
                    "add",
                    "throw",
                    &addr.to_string(),
                    "table",
                    &table,
                ])?;
            }
            for rule in rules(self.mark).iter().rev() {
                rule_command(family, "add", rule)?;
            }
            anyhow::Ok(())
        })();
        if let Err(error) = done {
            self.remove(family);
            return Err(error);
        }
        if family == Family::V4 {
            // Strict reverse-path filtering would drop the answers to our
            // marked packets unless it considers the mark too.
            let knob = "/proc/sys/net/ipv4/conf/all/src_valid_mark";
            if let Err(error) = std::fs::write(knob, "1") {
                tracing::warn!(%error, "cannot set net.ipv4.conf.all.src_valid_mark=1: with strict rp_filter, peers' answers may be dropped");
            }
        }
        tracing::info!(
            route = family.default_route(),
            interface = dev,
            table = self.mark,
            "exit route added; veilmesh's own traffic stays outside"
        );
        Ok(())
    }

    /// Removes the rules and the table's routes of `family`.
    fn remove(&self, family: Family) {
        for rule in rules(self.mark) {
            delete_all(family, &rule);
        }
        let _ = ip(&[
            family.flag(),
            "route",
            "flush",
            "table",
            &self.mark.to_string(),
        ]);
        tracing::info!(route = family.default_route(), "exit route removed");
    }
}

impl Drop for ExitRouting {
    fn drop(&mut self) {
        for family in std::mem::take(&mut self.installed) {
            self.remove(family);
        }
    }
}

fn family_of(addr: &IpAddr) -> Family {
    Family::of(&IpNet::from(*addr))
}

/// Our two rules, in the order they are consulted.
fn rules(mark: u32) -> [Vec<String>; 2] {
    let mark = mark.to_string();
    let words = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    [
        words(&format!(
            "not fwmark {mark} table main suppress_prefixlength 0"
        )),
        words(&format!("not fwmark {mark} table {mark}")),
    ]
}

/// Deletes every copy of one of our rules (a crash and a restart may have
/// added it twice); returns how many there were.
fn delete_all(family: Family, rule: &[String]) -> usize {
    (0..16)
        .take_while(|_| rule_command(family, "del", rule).is_ok())
        .count()
}

fn rule_command(family: Family, verb: &str, rule: &[String]) -> anyhow::Result<String> {
    let args: Vec<&str> = [family.flag(), "rule", verb]
        .into_iter()
        .chain(rule.iter().map(String::as_str))
        .collect();
    ip(&args)
}

/// A table with no route through a device belongs to nobody alive: its
/// rules and throw routes are a crashed instance's.
fn clear_stale(mark: u32, family: Family) {
    let table = mark.to_string();
    // A table the kernel has no route in does not exist: an error here.
    let listing = ip(&[family.flag(), "route", "show", "table", &table]).unwrap_or_default();
    if listing.lines().any(|line| line.contains(" dev ")) {
        return; // another live instance uses this mark
    }
    let rules_left: usize = rules(mark).iter().map(|r| delete_all(family, r)).sum();
    if rules_left > 0 || !listing.trim().is_empty() {
        let _ = ip(&[family.flag(), "route", "flush", "table", &table]);
        tracing::info!(
            table = mark,
            rules_left,
            "cleared exit routing left by an earlier run"
        );
    }
}

/// The families `nets` has a default route (an exit) for.
pub fn exit_families(nets: &[IpNet]) -> Vec<Family> {
    let mut families = Vec::new();
    for family in nets.iter().filter(|n| n.prefix_len() == 0).map(Family::of) {
        if !families.contains(&family) {
            families.push(family);
        }
    }
    families
}
