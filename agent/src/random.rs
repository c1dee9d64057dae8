//! ReseedRandomDev: entropy from the host mixed into the guest's pool, then
//! the CRNG reseeded at once (what Kata's VM factory sends to a VM cloned
//! from a template, whose pool would otherwise repeat the template's).

use std::io::Write;
use std::os::fd::AsRawFd;

use crate::error::{invalid, os, Result};

nix::ioctl_write_ptr!(rnd_add_to_ent_cnt, b'R', 0x01, libc::c_int);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// The most entropy bytes accepted in one request.
const MAX_SEED: usize = 1024 * 1024;

pub fn reseed(dev: &std::path::Path, data: &[u8]) -> Result<()> {
    if data.is_empty() {
        return Err(invalid("ReseedRandomDev has no data"));
    }
    if data.len() > MAX_SEED {
        return Err(invalid(format!(
            "ReseedRandomDev data is {} bytes; at most {MAX_SEED}",
            data.len()
        )));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| os(format!("opening {}", dev.display()), e))?;
    f.write_all(data)
        .map_err(|e| os(format!("writing entropy to {}", dev.display()), e))?;
    // Credit what was written (in bits, capped by the kernel), then reseed.
    let bits = libc::c_int::try_from(data.len() * 8).unwrap_or(libc::c_int::MAX);
    // SAFETY: both ioctls act on the random device fd we own; the first reads one int.
    unsafe {
        rnd_add_to_ent_cnt(f.as_raw_fd(), &bits)
            .map_err(|e| os("crediting entropy (RNDADDTOENTCNT)", e))?;
        rnd_reseed_crng(f.as_raw_fd()).map_err(|e| os("reseeding the CRNG (RNDRESEEDCRNG)", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_oversized_and_non_device_are_errors() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(reseed(f.path(), b"").is_err());
        assert!(reseed(f.path(), &vec![0; MAX_SEED + 1]).is_err());
        // A plain file takes the write but not the ioctl: an error, not a panic.
        let e = reseed(f.path(), b"seed").unwrap_err();
        assert!(e.message.contains("RNDADDTOENTCNT"), "{}", e.message);
    }
}
