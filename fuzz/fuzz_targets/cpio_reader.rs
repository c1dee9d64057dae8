//! The cpio (newc) reader the tests and inspection tools use, and the
//! writer's round trip.
//!
//! Every input is read as an archive (gzip or zstd detected by magic,
//! decompressed up to 16 MiB): errors are fine, panics are not. The same
//! bytes also drive a list of additions to an `Archive`; what the writer
//! writes must read back entry for entry (same names in order, kinds,
//! permissions, contents, device numbers), and an archive rebuilt from what
//! was read must write the same bytes.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kiln_initrd::reader::{self, Entry, EntryKind};
use kiln_initrd::{Archive, Compression, DeviceKind, WriteOptions};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Dir(String, u32),
    File(String, u32, Vec<u8>),
    Symlink(String, String),
    Device(String, bool, u32, u32, u32),
}

fn apply(a: &mut Archive, op: &Op) {
    let _ = match op {
        Op::Dir(p, mode) => a.add_dir(p, *mode).map(|_| ()),
        Op::File(p, mode, data) => a.add_file(p, *mode, data.clone()).map(|_| ()),
        Op::Symlink(p, target) => a.add_symlink(p, target).map(|_| ()),
        Op::Device(p, block, mode, major, minor) => {
            let kind = if *block {
                DeviceKind::Block
            } else {
                DeviceKind::Char
            };
            a.add_device(p, kind, *mode, *major, *minor).map(|_| ())
        }
    };
}

fn write(a: &Archive, compression: Compression) -> Vec<u8> {
    let mut out = Vec::new();
    let opts = WriteOptions::new(1_700_000_000)
        .compression(compression)
        .zstd_level(1);
    a.write(&mut out, &opts).expect("writing to memory");
    out
}

/// The archive `entries` describe, built with the public API.
fn rebuild(entries: &[Entry]) -> Archive {
    let mut a = Archive::new();
    for e in entries {
        let p = e.permissions();
        let r = match e.kind() {
            EntryKind::Directory => a.add_dir(&e.name, p),
            EntryKind::File => a.add_file(&e.name, p, e.data.clone()),
            EntryKind::Symlink => {
                let target = std::str::from_utf8(&e.data).expect("symlink target was a str");
                a.add_symlink(&e.name, target)
            }
            EntryKind::CharDevice => {
                a.add_device(&e.name, DeviceKind::Char, p, e.rdev_major, e.rdev_minor)
            }
            EntryKind::BlockDevice => {
                a.add_device(&e.name, DeviceKind::Block, p, e.rdev_major, e.rdev_minor)
            }
            other => panic!("the writer wrote a {other:?} for {}", e.name),
        };
        r.unwrap_or_else(|err| panic!("re-adding {}: {err}", e.name));
    }
    a
}

fuzz_target!(|data: &[u8]| {
    let _ = reader::read_with_limit(data, 16 << 20);

    let mut u = Unstructured::new(data);
    let compression = match u.int_in_range(0..=7u8).unwrap_or(0) {
        6 => Compression::Gzip,
        7 => Compression::Zstd,
        _ => Compression::None,
    };
    let mut archive = Archive::new();
    let mut ops = 0;
    while ops < 64 {
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        apply(&mut archive, &op);
        ops += 1;
        if u.is_empty() {
            break;
        }
    }
    let bytes = write(&archive, compression);
    let entries = reader::read(&bytes).expect("the writer's output reads back");
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let paths: Vec<&str> = archive.paths().collect();
    assert_eq!(names, paths);
    let again = rebuild(&entries);
    assert_eq!(again, archive, "read-back differs from what was written");
    assert_eq!(write(&again, compression), bytes);
});
