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
    /// Gives `path` (a regular file or directory) to the target user, so
    /// the dropped daemon can still write there. Through a descriptor opened
    /// without following a symbolic link: a link planted in a state
    /// directory (by another instance running as that user) must not make
    /// root give away what it points to.
    pub fn hand_over(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use nix::fcntl::{open, OFlag};
        use nix::sys::stat::{fstat, Mode, SFlag};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let what = || format!("cannot hand {} to {}", path.display(), self.name);
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = open(path, flags, Mode::empty()).with_context(what)?;
        // SAFETY: `open` just returned this descriptor, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let kind = SFlag::from_bits_truncate(fstat(fd.as_raw_fd()).with_context(what)?.st_mode)
            & SFlag::S_IFMT;
        if kind != SFlag::S_IFREG && kind != SFlag::S_IFDIR {
            bail!("{}: neither a regular file nor a directory", what());
        }
        nix::unistd::fchown(fd.as_raw_fd(), Some(self.uid), Some(self.gid)).with_context(what)
    }
}

/// No privilege can be gained from here on (setuid binaries, file
/// capabilities), whether the daemon dropped to its user or stays root.
pub fn forbid_new_privileges() -> anyhow::Result<()> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes four integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        bail!(
            "cannot set PR_SET_NO_NEW_PRIVS: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A symbolic link planted where a state file goes (by another
    /// instance running as the daemon user) must not make root hand over
    /// what it points to.
    #[test]
    fn hand_over_never_follows_a_symbolic_link() {
        assert!(
            Uid::effective().is_root(),
            "needs root (chown); CI runs it as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("shadow");
        std::fs::write(&victim, "root only").unwrap();
        let link = dir.path().join("veil0.tox");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let nobody = DropTarget {
            name: "nobody".into(),
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
        };
        let err = nobody.hand_over(&link).unwrap_err();
        assert!(format!("{err:#}").contains("veil0.tox"), "{err:#}");
        assert_eq!(std::fs::metadata(&victim).unwrap().uid(), 0);
        // Real files and directories are handed over.
        let state = dir.path().join("veil0.i2p");
        std::fs::write(&state, "key").unwrap();
        nobody.hand_over(&state).unwrap();
        nobody.hand_over(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().uid(), 65534);
        assert_eq!(std::fs::metadata(dir.path()).unwrap().uid(), 65534);
    }
}
