//! AddSwap / AddSwapPath: swap the runtime prepared (a hot-plugged disk
//! already formatted with mkswap, or a swap file in the guest), switched on
//! with swapon(2) as Kata's agent does. Needs CONFIG_SWAP in the guest kernel.

use std::path::Path;
use std::time::Duration;

use crate::error::{invalid, os, Result};
use crate::guest::GuestFs;
use crate::pci::{PciPath, SlotFn};

fn swapon(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| invalid("swap path contains NUL"))?;
    // SAFETY: swapon reads the NUL-terminated path we pass.
    if unsafe { libc::swapon(c.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::ENOSYS) => " (the guest kernel has no CONFIG_SWAP)",
            Some(libc::EINVAL) => " (no swap signature: run mkswap on it first)",
            _ => "",
        };
        return Err(os(format!("swapon {}{hint}", path.display()), e));
    }
    tracing::info!(path = %path.display(), "swap on");
    Ok(())
}

/// The swap disk at Kata's PCI path (one slot per bus level, root bus first).
pub async fn add_disk(guest: &GuestFs, wait: Duration, slots: &[u32]) -> Result<()> {
    if slots.is_empty() || slots.len() > 32 {
        return Err(invalid(format!(
            "AddSwap PCIPath {slots:?} must list 1 to 32 slots"
        )));
    }
    let hops = slots
        .iter()
        .map(|s| {
            u8::try_from(*s)
                .ok()
                .filter(|s| *s < 32)
                .map(|slot| SlotFn { slot, function: 0 })
                .ok_or_else(|| invalid(format!("AddSwap PCIPath slot {s} is not 0..=31")))
        })
        .collect::<Result<Vec<_>>>()?;
    let path = PciPath::on_root_bus(hops);
    let _ = std::fs::write(guest.path("/sys/bus/pci/rescan"), "1");
    let g = guest.clone();
    let dev = crate::uevent::wait_for(
        &format!("swap disk at PCI path {path}"),
        wait,
        || crate::pci::resolve(&g, &path).and_then(|bdf| crate::pci::block_device(&g, &bdf)),
        |ev| ev.get("SUBSYSTEM") == "block" || ev.get("SUBSYSTEM") == "pci",
    )
    .await?;
    swapon(&guest.path(&format!("/dev/{dev}")))
}

/// A swap file or device by guest path.
pub fn add_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(invalid(format!(
            "AddSwapPath path {path:?} must be an absolute guest path"
        )));
    }
    swapon(Path::new(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_requests_are_refused_before_any_system_call() {
        let g = GuestFs::new("/nonexistent");
        let d = Duration::from_millis(10);
        for slots in [vec![], vec![40], vec![0; 33]] {
            let e = add_disk(&g, d, &slots).await.unwrap_err();
            assert_eq!(
                e.kind,
                crate::error::ErrorKind::InvalidArgument,
                "{slots:?}"
            );
        }
        assert!(add_path("relative/swap").is_err());
        // A file without a swap signature: swapon refuses and we say why.
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = add_path(f.path().to_str().unwrap()).unwrap_err();
        assert!(e.message.contains("swapon"), "{}", e.message);
    }
}
