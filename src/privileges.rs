//! Dropping root after setup. What the daemon still needs afterwards:
//! CAP_NET_ADMIN, to change routes on reload and remove them at shutdown
//! (through `ip`, so it is raised as an ambient capability that the child
//! inherits). Everything else goes, including from the bounding set, so
//! nothing the daemon starts can regain it.

use anyhow::{bail, Context};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, User};

/// The user the daemon runs as when the config does not name one.
pub const DEFAULT_USER: &str = "veilmesh";

pub struct DropTarget {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Which user to become. `None`: stay root, because the config says `root`
/// or (without a `user` setting) the default user does not exist.
pub fn resolve(configured: Option<&str>) -> anyhow::Result<Option<DropTarget>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let name = configured.unwrap_or(DEFAULT_USER);
    if name == "root" {
        return Ok(None);
    }
    match User::from_name(name).with_context(|| format!("cannot look up user {name}"))? {
        Some(user) => Ok(Some(DropTarget {
            name: name.to_owned(),
            uid: user.uid,
            gid: user.gid,
        })),
        None if configured.is_none() => {
            tracing::warn!(
                "user {DEFAULT_USER} does not exist: staying root. Create it (the package does, via \
                 systemd-sysusers) or set [interface] user"
            );
            Ok(None)
        }
        None => bail!("[interface] user: no such user `{name}`"),
    }
}

fn net_admin_only() -> CapsHashSet {
    std::iter::once(Capability::CAP_NET_ADMIN).collect()
}

impl DropTarget {
    /// Gives `path` to the target user, so the dropped daemon can still
    /// write there.
    pub fn hand_over(&self, path: &std::path::Path) -> anyhow::Result<()> {
        nix::unistd::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("cannot hand {} to {}", path.display(), self.name))
    }
}

/// Becomes `target`, keeping only CAP_NET_ADMIN.
pub fn drop_to(target: &DropTarget) -> anyhow::Result<()> {
    for cap in caps::all() {
        if cap != Capability::CAP_NET_ADMIN {
            caps::drop(None, CapSet::Bounding, cap)
                .context("cannot shrink the capability bounding set")?;
        }
    }
    caps::securebits::set_keepcaps(true).context("cannot keep capabilities across setuid")?;
    nix::unistd::setgroups(&[target.gid]).context("setgroups")?;
    nix::unistd::setresgid(target.gid, target.gid, target.gid).context("setresgid")?;
    nix::unistd::setresuid(target.uid, target.uid, target.uid).context("setresuid")?;
    let keep = net_admin_only();
    for set in [CapSet::Permitted, CapSet::Inheritable, CapSet::Effective] {
        caps::set(None, set, &keep).with_context(|| format!("cannot set {set:?} capabilities"))?;
    }
    caps::raise(None, CapSet::Ambient, Capability::CAP_NET_ADMIN)
        .context("cannot raise ambient CAP_NET_ADMIN")?;
    caps::securebits::set_keepcaps(false).context("keepcaps")?;
    // Trust, but verify: a partial drop must not go unnoticed.
    if Uid::effective() != target.uid || Uid::current() != target.uid {
        bail!(
            "still running as uid {} after dropping to {}",
            Uid::effective(),
            target.name
        );
    }
    if caps::read(None, CapSet::Effective).context("cannot read capabilities")? != keep {
        bail!("capabilities other than CAP_NET_ADMIN survived the drop");
    }
    tracing::info!(user = %target.name, uid = %target.uid, "dropped privileges; keeping CAP_NET_ADMIN only");
    Ok(())
}
