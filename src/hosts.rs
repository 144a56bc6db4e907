//! Peer names in the hosts file: a block of `ADDRESS NAME.veil` lines that
//! veilmesh owns, one block per interface, between marker lines. Lines
//! outside the block are never changed.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;

pub const DOMAIN: &str = "veil";

fn begin_marker(interface: &str) -> String {
    format!("# BEGIN veilmesh {interface} (managed by veilmesh; edits inside are overwritten)")
}

fn end_marker(interface: &str) -> String {
    format!("# END veilmesh {interface}")
}

/// `existing` with this interface's block replaced by `entries` (appended if
/// there was none; removed when `entries` is None).
pub fn with_block(
    existing: &str,
    interface: &str,
    entries: Option<&[(String, Ipv6Addr)]>,
) -> String {
    let (begin, end) = (begin_marker(interface), end_marker(interface));
    let mut kept: Vec<&str> = Vec::new();
    let mut inside = false;
    let mut block_at = None;
    for line in existing.lines() {
        if !inside && line == begin {
            inside = true;
            block_at.get_or_insert(kept.len());
        } else if inside && line == end {
            inside = false;
        } else if !inside {
            kept.push(line);
        }
    }
    let mut block: Vec<String> = Vec::new();
    if let Some(entries) = entries {
        block.push(begin);
        block.extend(
            entries
                .iter()
                .map(|(name, addr)| format!("{addr}\t{name}.{DOMAIN}")),
        );
        block.push(end);
    }
    let at = block_at.unwrap_or(kept.len());
    let mut lines: Vec<String> = kept[..at].iter().map(|l| l.to_string()).collect();
    lines.extend(block);
    lines.extend(kept[at..].iter().map(|l| l.to_string()));
    // Every line ends in a newline (blank lines included); a missing final
    // newline is added.
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// The hosts file of one interface, held open: the daemon may lose the
/// right to open it when it drops privileges.
pub struct HostsFile {
    path: PathBuf,
    file: std::fs::File,
    interface: String,
}

impl HostsFile {
    pub fn open(path: &Path, interface: &str) -> anyhow::Result<HostsFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(HostsFile {
            path: path.to_owned(),
            file,
            interface: interface.to_owned(),
        })
    }

    /// Rewrites the file in place through the open descriptor (never by
    /// rename: the file may be a bind mount, as /etc/netns/NS/hosts is).
    fn rewrite(&mut self, entries: Option<&[(String, Ipv6Addr)]>) -> anyhow::Result<()> {
        use std::io::{Read, Seek, SeekFrom, Write};
        let context = || format!("cannot rewrite {}", self.path.display());
        let mut existing = String::new();
        self.file.seek(SeekFrom::Start(0)).with_context(context)?;
        self.file
            .read_to_string(&mut existing)
            .with_context(context)?;
        let updated = with_block(&existing, &self.interface, entries);
        if updated != existing {
            // Overwrite, then trim: the file is never empty in between, as it
            // would be after truncating first.
            self.file.seek(SeekFrom::Start(0)).with_context(context)?;
            self.file
                .write_all(updated.as_bytes())
                .with_context(context)?;
            self.file
                .set_len(updated.len() as u64)
                .with_context(context)?;
            self.file.sync_data().with_context(context)?;
        }
        Ok(())
    }

    pub fn update(&mut self, entries: &[(String, Ipv6Addr)]) -> anyhow::Result<()> {
        self.rewrite(Some(entries))
    }

    pub fn remove(&mut self) -> anyhow::Result<()> {
        self.rewrite(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries() -> Vec<(String, Ipv6Addr)> {
        vec![("site-b".into(), "fd60:db4d:ddb5::2".parse().unwrap())]
    }

    #[test]
    fn block_is_appended_replaced_and_removed() {
        let original = "127.0.0.1\tlocalhost\n# my comment\n10.0.0.5 printer\n";
        let with = with_block(original, "veil0", Some(&entries()));
        assert!(with.starts_with(original));
        assert!(with.contains("fd60:db4d:ddb5::2\tsite-b.veil\n"));
        let replaced = with_block(&with, "veil0", Some(&[]));
        assert!(!replaced.contains("site-b"));
        assert_eq!(with_block(&replaced, "veil0", None), original);
        // Another interface's block is left alone.
        let two = with_block(&with, "veil1", Some(&entries()));
        assert_eq!(with_block(&two, "veil1", None), with);
    }

    #[test]
    fn the_file_on_disk_follows_updates_that_grow_and_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "127.0.0.1\tlocalhost\n").unwrap();
        let mut hosts = HostsFile::open(&path, "veil0").unwrap();
        let many: Vec<(String, Ipv6Addr)> = (0..5)
            .map(|i| {
                (
                    format!("p{i}"),
                    format!("fd60:db4d:ddb5::{i}").parse().unwrap(),
                )
            })
            .collect();
        hosts.update(&many).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path)
                .unwrap()
                .matches(".veil")
                .count(),
            5
        );
        hosts.update(&many[..1]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            with_block("127.0.0.1\tlocalhost\n", "veil0", Some(&many[..1]))
        );
        hosts.remove().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "127.0.0.1\tlocalhost\n"
        );
    }

    proptest! {
        #[test]
        fn lines_outside_the_block_survive(lines in proptest::collection::vec("[ -~]{0,30}", 0..12)) {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            let added = with_block(&text, "veil0", Some(&entries()));
            prop_assert_eq!(with_block(&added, "veil0", None), text.clone());
            let again = with_block(&added, "veil0", Some(&entries()));
            prop_assert_eq!(again, added);
        }
    }
}
