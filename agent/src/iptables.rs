//! GetIPTables / SetIPTables: the guest's own netfilter rules, read with
//! `iptables-save` and replaced with `iptables-restore` (or the ip6 variants),
//! as Kata's agent does. The minimal image has no iptables: the error then
//! names the missing program and the fix.

use std::time::Duration;

use crate::error::{internal, precondition, Result};
use crate::guest::GuestFs;
use crate::reaper::Reaper;

/// How long iptables-restore may wait for the xtables lock, and then run.
const RESTORE_WAIT_SECS: u64 = 5;
const LIMIT: Duration = Duration::from_secs(30);
/// The largest rule set SetIPTables accepts.
const MAX_RULES: usize = 16 * 1024 * 1024;

/// `/usr/sbin/<name>` or `/sbin/<name>`, whichever the guest has.
fn find(guest: &GuestFs, name: &str) -> Result<String> {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = format!("{dir}/{name}");
        if guest.path(&p).exists() {
            return Ok(p);
        }
    }
    Err(precondition(format!(
        "{name} is not in the guest image (looked in /usr/sbin, /sbin, /usr/bin, /bin): \
         use an image whose recipe installs iptables (e.g. the debian image)"
    )))
}

fn program(ipv6: bool, what: &str) -> String {
    format!("{}tables-{what}", if ipv6 { "ip6" } else { "ip" })
}

pub async fn get(guest: &GuestFs, reaper: &Reaper, ipv6: bool) -> Result<Vec<u8>> {
    let prog = find(guest, &program(ipv6, "save"))?;
    let out = crate::command::run(reaper, &prog, &[], Vec::new(), LIMIT).await?;
    if out.code != 0 {
        return Err(internal(format!(
            "{prog} failed (exit {}): {}",
            out.code,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

pub async fn set(guest: &GuestFs, reaper: &Reaper, ipv6: bool, rules: &[u8]) -> Result<Vec<u8>> {
    if rules.len() > MAX_RULES {
        return Err(crate::error::invalid(format!(
            "SetIPTables data is {} bytes; at most {MAX_RULES}",
            rules.len()
        )));
    }
    let prog = find(guest, &program(ipv6, "restore"))?;
    let wait = RESTORE_WAIT_SECS.to_string();
    let out = crate::command::run(reaper, &prog, &["--wait", &wait], rules.to_vec(), LIMIT).await?;
    if out.code != 0 {
        return Err(internal(format!(
            "{prog} failed (exit {}): {}",
            out.code,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn missing_program_is_named_and_a_fake_one_is_run() {
        let dir = tempfile::tempdir().unwrap();
        let g = GuestFs::new(dir.path());
        let reaper = Reaper::default();
        tokio::spawn(reaper.clone().run());
        let e = get(&g, &reaper, false).await.unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::FailedPrecondition);
        assert!(
            e.message
                .contains("iptables-save is not in the guest image"),
            "{}",
            e.message
        );
        // The program is found under the guest root, by its guest path.
        let sbin = dir.path().join("usr/sbin");
        std::fs::create_dir_all(&sbin).unwrap();
        let prog = sbin.join("ip6tables-restore");
        std::fs::write(
            &prog,
            "#!/bin/sh\ncat >/dev/null; echo bad rule >&2; exit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find(&g, "ip6tables-restore").unwrap(),
            "/usr/sbin/ip6tables-restore"
        );
        let e = set(&g, &reaper, true, &vec![b'x'; MAX_RULES + 1])
            .await
            .unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::InvalidArgument);
    }
}
