//! Reading a device-mapper device's table and status through
//! `/dev/mapper/control` (`DM_TABLE_STATUS`), without dmsetup: how
//! GuestFacts reports a dm-verity root's root hash and whether the kernel has
//! seen corruption. Layouts from linux/dm-ioctl.h (interface version 4).

use std::os::fd::AsRawFd;
use std::path::Path;

/// `struct dm_ioctl`: the header of every device-mapper ioctl buffer.
#[repr(C)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; 128],
    uuid: [u8; 129],
    data: [u8; 7],
}

const HEADER: usize = std::mem::size_of::<DmIoctl>();
/// `struct dm_target_spec`: sector_start, length, status, next, target_type[16].
const SPEC: usize = 40;
const DM_TABLE_STATUS_CMD: u8 = 12;
const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
const BUFFER: usize = 16 << 10;

/// One target of a device's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub length: u64,
    pub target_type: String,
    /// The table line's arguments (`table`) or the target's status (`!table`).
    pub params: String,
}

/// The targets of device `name`: its table when `table`, else its status.
pub fn table_status(control: &Path, name: &str, table: bool) -> std::io::Result<Vec<Target>> {
    if name.is_empty() || name.len() >= 128 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("device-mapper name `{name}` is empty or longer than 127 bytes"),
        ));
    }
    let file = std::fs::File::open(control)?;
    // u64 storage: the header has a u64 field, so the buffer must be 8-aligned.
    let mut buf = vec![0u64; BUFFER / 8];
    let header = DmIoctl {
        version: [4, 0, 0],
        data_size: BUFFER as u32,
        data_start: HEADER as u32,
        target_count: 0,
        open_count: 0,
        flags: if table { DM_STATUS_TABLE_FLAG } else { 0 },
        event_nr: 0,
        padding: 0,
        dev: 0,
        name: {
            let mut n = [0u8; 128];
            n[..name.len()].copy_from_slice(name.as_bytes());
            n
        },
        uuid: [0; 129],
        data: [0; 7],
    };
    // SAFETY: buf is BUFFER bytes, 8-aligned, larger than the header.
    unsafe { std::ptr::write(buf.as_mut_ptr().cast::<DmIoctl>(), header) };
    let request = nix::request_code_readwrite!(0xfd, DM_TABLE_STATUS_CMD, HEADER);
    // SAFETY: the kernel reads the header and writes at most data_size bytes.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain bytes of the same allocation.
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), BUFFER) };
    parse(bytes)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The targets in an answered buffer (header, then specs from `data_start`,
/// each followed by its NUL-terminated text; `next` counts from the first spec).
fn parse(b: &[u8]) -> std::io::Result<Vec<Target>> {
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("DM_TABLE_STATUS answer: {what}"),
        )
    };
    let flags = u32_at(b, 28).ok_or_else(|| bad("short header"))?;
    if flags & DM_BUFFER_FULL_FLAG != 0 {
        return Err(bad("the table does not fit 16 KiB"));
    }
    let start = u32_at(b, 16).ok_or_else(|| bad("short header"))? as usize;
    let count = u32_at(b, 20).ok_or_else(|| bad("short header"))?;
    let data = b
        .get(start..)
        .ok_or_else(|| bad("data_start past the end"))?;
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let spec = data
            .get(at..at + SPEC)
            .ok_or_else(|| bad("target spec past the end"))?;
        let next = u32_at(spec, 20).ok_or_else(|| bad("short spec"))? as usize;
        out.push(Target {
            start: u64_at(spec, 0).ok_or_else(|| bad("short spec"))?,
            length: u64_at(spec, 8).ok_or_else(|| bad("short spec"))?,
            target_type: c_string(&spec[24..40]),
            params: c_string(data.get(at + SPEC..).unwrap_or_default()),
        });
        if next <= at && out.len() < count as usize {
            return Err(bad("target specs do not advance"));
        }
        at = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(targets: &[(&str, &str)], next_of: impl Fn(usize, usize) -> usize) -> Vec<u8> {
        let mut b = vec![0u8; HEADER];
        b[16..20].copy_from_slice(&(HEADER as u32).to_ne_bytes());
        b[20..24].copy_from_slice(&(targets.len() as u32).to_ne_bytes());
        let mut data = Vec::new();
        for (i, (ty, params)) in targets.iter().enumerate() {
            let at = data.len();
            let mut spec = vec![0u8; SPEC];
            spec[8..16].copy_from_slice(&(1000u64 * (i as u64 + 1)).to_ne_bytes());
            spec[24..24 + ty.len()].copy_from_slice(ty.as_bytes());
            data.extend_from_slice(&spec);
            data.extend_from_slice(params.as_bytes());
            data.push(0);
            while data.len() % 8 != 0 {
                data.push(0);
            }
            let next = next_of(at, data.len()) as u32;
            data[at + 20..at + 24].copy_from_slice(&next.to_ne_bytes());
        }
        b.extend_from_slice(&data);
        b
    }

    #[test]
    fn parses_targets_as_the_kernel_lays_them_out() {
        assert_eq!(HEADER, 312, "struct dm_ioctl is 312 bytes");
        let b = answer(
            &[("verity", "1 254:1 254:1 4096"), ("linear", "8:0 0")],
            |_, end| end,
        );
        let t = parse(&b).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].target_type.as_str(), t[0].length), ("verity", 1000));
        assert_eq!(t[0].params, "1 254:1 254:1 4096");
        assert_eq!(
            (t[1].target_type.as_str(), t[1].params.as_str()),
            ("linear", "8:0 0")
        );
    }

    #[test]
    fn hostile_answers_are_errors_not_panics() {
        let b = answer(&[("verity", "V"), ("verity", "C")], |at, _| at);
        assert!(parse(&b).unwrap_err().to_string().contains("advance"));
        let mut b = answer(&[("verity", "V")], |_, end| end);
        b[20..24].copy_from_slice(&50u32.to_ne_bytes());
        assert!(parse(&b).is_err());
        assert!(parse(&b[..10]).is_err());
        let mut b = answer(&[("verity", "V")], |_, end| end);
        b[28..32].copy_from_slice(&DM_BUFFER_FULL_FLAG.to_ne_bytes());
        assert!(parse(&b).unwrap_err().to_string().contains("16 KiB"));
        assert!(table_status(Path::new("/nonexistent"), "x", true).is_err());
        assert!(table_status(Path::new("/dev/null"), "", true).is_err());
    }
}
