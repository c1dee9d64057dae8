//! What a Debian tree made with `mmdebstrap --variant=extract` (packages
//! unpacked, no maintainer script run: the way to a foreign-arch tree without
//! emulating it) still needs before systemd can boot it. Only what the image
//! needs is done, in Rust, from the files the packages shipped:
//!
//! - base-passwd's postinst: /etc/passwd and /etc/group from its `*.master` files;
//! - systemd's postinst (`systemd-sysusers`): the users and groups of
//!   usr/lib/sysusers.d, dynamic ids allocated downwards from 999 as
//!   systemd-sysusers does (so x86_64's and the foreign arches' ids agree);
//! - shadow's postinst: locked /etc/shadow and /etc/gshadow entries.
//!
//! Not done (not needed to boot the agent): update-alternatives links, the
//! ld.so cache (glibc searches the multiarch directories without it), dpkg's
//! database, unit enablement (the recipe sets the default target itself).

use anyhow::Context;

use super::tree::Tree;

const PASSWD_MASTER: &str = "usr/share/base-passwd/passwd.master";
const GROUP_MASTER: &str = "usr/share/base-passwd/group.master";
const SYSUSERS_DIR: &str = "usr/lib/sysusers.d";
/// systemd's SYSTEM_UID_MAX/SYSTEM_GID_MAX on Debian.
const SYSTEM_ID_MAX: u32 = 999;
const NOLOGIN: &str = "/usr/sbin/nologin";
/// The `shadow` group owns /etc/shadow and /etc/gshadow.
const SHADOW_GID: u32 = 42;

#[derive(Debug, Clone, PartialEq, Eq)]
struct User {
    name: String,
    uid: u32,
    gid: u32,
    gecos: String,
    home: String,
    shell: String,
}

#[derive(Debug, Default)]
struct Accounts {
    users: Vec<User>,
    /// name → gid, in order of creation.
    groups: Vec<(String, u32)>,
    /// (group, user) memberships from `m` lines.
    members: Vec<(String, String)>,
}

impl Accounts {
    fn gid_of(&self, name: &str) -> Option<u32> {
        self.groups.iter().find(|(n, _)| n == name).map(|(_, g)| *g)
    }
    fn has_user(&self, name: &str) -> bool {
        self.users.iter().any(|u| u.name == name)
    }
    fn uid_used(&self, id: u32) -> bool {
        self.users.iter().any(|u| u.uid == id)
    }
    fn gid_used(&self, id: u32) -> bool {
        self.groups.iter().any(|(_, g)| *g == id)
    }
    /// The highest free system id (both as uid and gid when `both`).
    fn free_id(&self, both: bool) -> anyhow::Result<u32> {
        (1..=SYSTEM_ID_MAX)
            .rev()
            .find(|&id| !self.gid_used(id) && (!both || !self.uid_used(id)))
            .context("no free system id below 1000")
    }
}

/// Runs the post-install steps on `tree`; `epoch` dates the shadow entries.
pub fn apply(tree: &mut Tree, epoch: u64) -> anyhow::Result<()> {
    let read = |path: &str| -> anyhow::Result<String> {
        std::fs::read_to_string(tree.host(path))
            .with_context(|| format!("the extracted tree has no {path} (is base-passwd in it?)"))
    };
    let mut acc = Accounts::default();
    for line in read(PASSWD_MASTER)?.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if let [name, _, uid, gid, gecos, home, shell] = f[..] {
            acc.users.push(User {
                name: name.into(),
                uid: uid
                    .parse()
                    .with_context(|| format!("{PASSWD_MASTER}: {line}"))?,
                gid: gid
                    .parse()
                    .with_context(|| format!("{PASSWD_MASTER}: {line}"))?,
                gecos: gecos.into(),
                home: home.into(),
                shell: shell.into(),
            });
        }
    }
    for line in read(GROUP_MASTER)?.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if let [name, _, gid, ..] = f[..] {
            acc.groups.push((
                name.into(),
                gid.parse()
                    .with_context(|| format!("{GROUP_MASTER}: {line}"))?,
            ));
        }
    }
    let mut confs: Vec<String> = tree
        .entries()
        .filter(|(p, _)| {
            p.strip_prefix(SYSUSERS_DIR)
                .and_then(|r| r.strip_prefix('/'))
                .is_some_and(|n| n.ends_with(".conf") && !n.contains('/'))
        })
        .map(|(p, _)| p.to_string())
        .collect();
    confs.sort();
    for conf in &confs {
        let text = read(conf)?;
        sysusers(&mut acc, &text).with_context(|| format!("in {conf}"))?;
    }
    write_files(tree, &acc, epoch)
}

/// Applies one sysusers.d file (types `g`, `u` and `m`; others are not
/// needed for a guest and are skipped).
fn sysusers(acc: &mut Accounts, text: &str) -> anyhow::Result<()> {
    let mut members: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f = split_fields(line);
        let field = |i: usize| f.get(i).map(String::as_str).filter(|s| *s != "-");
        match (field(0), field(1)) {
            (Some("g"), Some(name)) if acc.gid_of(name).is_none() => {
                let gid = match field(2).and_then(|s| s.parse().ok()) {
                    Some(g) => g,
                    None => acc.free_id(false)?,
                };
                acc.groups.push((name.into(), gid));
            }
            (Some("u"), Some(name)) => {
                if acc.has_user(name) {
                    continue;
                }
                let (uid, gid) = match field(2) {
                    Some(spec) => {
                        let (u, g) = spec
                            .split_once(':')
                            .map_or((spec, None), |(u, g)| (u, Some(g)));
                        let uid: Option<u32> = u.parse().ok();
                        let gid = match g {
                            Some(g) => {
                                Some(g.parse().ok().or_else(|| acc.gid_of(g)).with_context(
                                    || format!("user {name}: group `{g}` does not exist"),
                                )?)
                            }
                            None => None,
                        };
                        (uid, gid)
                    }
                    None => (None, None),
                };
                let uid = match uid {
                    Some(u) => u,
                    None => acc.free_id(gid.is_none())?,
                };
                let gid = match gid {
                    Some(g) => g,
                    None => match acc.gid_of(name) {
                        Some(g) => g,
                        None => {
                            let g = if acc.gid_used(uid) {
                                acc.free_id(false)?
                            } else {
                                uid
                            };
                            acc.groups.push((name.into(), g));
                            g
                        }
                    },
                };
                acc.users.push(User {
                    name: name.into(),
                    uid,
                    gid,
                    gecos: field(3).unwrap_or("").into(),
                    home: field(4).unwrap_or("/").into(),
                    shell: field(5).unwrap_or(NOLOGIN).into(),
                });
            }
            (Some("m"), Some(user)) => {
                if let Some(group) = field(2) {
                    members.push((group.into(), user.into()));
                }
            }
            _ => {}
        }
    }
    // A membership's group is created if no line made it (as sysusers does).
    for (group, user) in members {
        if acc.gid_of(&group).is_none() {
            let gid = acc.free_id(false)?;
            acc.groups.push((group.clone(), gid));
        }
        acc.members.push((group, user));
    }
    Ok(())
}

/// Fields separated by whitespace; double quotes group (the GECOS field).
fn split_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn write_files(tree: &mut Tree, acc: &Accounts, epoch: u64) -> anyhow::Result<()> {
    let days = epoch / 86_400;
    let members = &acc.members;
    let mut passwd = String::new();
    let mut shadow = String::new();
    for u in &acc.users {
        passwd.push_str(&format!(
            "{}:x:{}:{}:{}:{}:{}\n",
            u.name, u.uid, u.gid, u.gecos, u.home, u.shell
        ));
        shadow.push_str(&format!("{}:*:{days}:0:99999:7:::\n", u.name));
    }
    let mut group = String::new();
    let mut gshadow = String::new();
    for (name, gid) in &acc.groups {
        let m: Vec<&str> = members
            .iter()
            .filter(|(g, _)| g == name)
            .map(|(_, u)| u.as_str())
            .collect();
        group.push_str(&format!("{name}:x:{gid}:{}\n", m.join(",")));
        gshadow.push_str(&format!("{name}:*::{}\n", m.join(",")));
    }
    tree.add_file("etc/passwd", 0o644, passwd.as_bytes())?;
    tree.add_file("etc/group", 0o644, group.as_bytes())?;
    let shadow_gid = acc.gid_of("shadow").unwrap_or(SHADOW_GID);
    tree.add_file_owned("etc/shadow", 0o640, 0, shadow_gid, shadow.as_bytes())?;
    tree.add_file_owned("etc/gshadow", 0o640, 0, shadow_gid, gshadow.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with(dir: &std::path::Path) -> Tree {
        let mut t = Tree::empty(&dir.join("root")).unwrap();
        t.add_file(
            PASSWD_MASTER,
            0o644,
            b"root:*:0:0:root:/root:/bin/bash\nnobody:*:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        )
        .unwrap();
        t.add_file(
            GROUP_MASTER,
            0o644,
            b"root:*:0:\nshadow:*:42:\nnogroup:*:65534:\n",
        )
        .unwrap();
        t.add_file(
            "usr/lib/sysusers.d/basic.conf",
            0o644,
            b"g adm 4 -\nu root 0 - /root /bin/bash\n",
        )
        .unwrap();
        t.add_file(
            "usr/lib/sysusers.d/systemd-journal.conf",
            0o644,
            b"g systemd-journal - -\n",
        )
        .unwrap();
        t.add_file(
            "usr/lib/sysusers.d/systemd-network.conf",
            0o644,
            b"# comment\nu systemd-network - \"systemd Network Management\"\n",
        )
        .unwrap();
        t
    }

    #[test]
    fn accounts_match_what_the_maintainer_scripts_make() {
        let d = tempfile::tempdir().unwrap();
        let mut t = tree_with(d.path());
        apply(&mut t, 1_735_689_600).unwrap();
        let passwd = std::fs::read_to_string(t.host("etc/passwd")).unwrap();
        let group = std::fs::read_to_string(t.host("etc/group")).unwrap();
        // The ids Debian's systemd postinst gives on amd64.
        assert!(
            passwd.contains("root:x:0:0:root:/root:/bin/bash\n"),
            "{passwd}"
        );
        assert!(
            passwd.ends_with(
                "systemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin\n"
            ),
            "{passwd}"
        );
        assert!(
            group.contains("adm:x:4:\n") && group.contains("systemd-journal:x:999:\n"),
            "{group}"
        );
        assert!(group.ends_with("systemd-network:x:998:\n"), "{group}");
        let shadow = t.get("etc/shadow").unwrap();
        assert_eq!((shadow.mode, shadow.gid), (0o640, 42));
        let text = std::fs::read_to_string(t.host("etc/shadow")).unwrap();
        assert!(text.starts_with("root:*:20089:0:99999:7:::\n"), "{text}");
    }

    #[test]
    fn fields_and_errors() {
        assert_eq!(
            split_fields(r#"u  name  1:2  "A B"  /h  /s"#),
            vec!["u", "name", "1:2", "A B", "/h", "/s"]
        );
        let mut acc = Accounts::default();
        let err = format!(
            "{:#}",
            sysusers(&mut acc, "u x 5:nosuchgroup\n").unwrap_err()
        );
        assert!(err.contains("nosuchgroup"), "{err}");
        let d = tempfile::tempdir().unwrap();
        let mut t = Tree::empty(&d.path().join("r")).unwrap();
        let err = format!("{:#}", apply(&mut t, 0).unwrap_err());
        assert!(err.contains("base-passwd"), "{err}");
    }
}
