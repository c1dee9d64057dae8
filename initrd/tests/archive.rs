//! Behaviour tests for kiln-initrd: layout, reproducibility, compression, hostile input.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use kiln_initrd::reader::{self, EntryKind};
use kiln_initrd::{newc, Archive, Compression, Error, WriteOptions, ZSTD_WINDOW_LOG};
use sha2::{Digest, Sha256};

const EPOCH: u64 = 1_700_000_000;

fn raw(a: &Archive) -> Vec<u8> {
    let mut out = Vec::new();
    a.write(
        &mut out,
        &WriteOptions::new(EPOCH).compression(Compression::None),
    )
    .unwrap();
    out
}

fn sample() -> Archive {
    let mut a = Archive::new();
    a.add_file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
        .unwrap()
        .add_dir("dev", 0o755)
        .unwrap()
        .add_char_device("/dev/console", 0o600, 5, 1)
        .unwrap()
        .add_block_device("dev/vda", 0o660, 254, 0)
        .unwrap()
        .add_symlink("bin/sh", "busybox")
        .unwrap()
        .add_file("bin/busybox", 0o4755, vec![0xAB; 1001])
        .unwrap()
        .add_file("etc/empty", 0o644, Vec::new())
        .unwrap()
        .add_dir("tmp", 0o1777)
        .unwrap();
    a
}

#[test]
fn round_trip_write_read() {
    let a = sample();
    let bytes = raw(&a);
    let entries = reader::read(&bytes).unwrap();
    let got: Vec<(&str, EntryKind, u32)> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind(), e.permissions()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("bin", EntryKind::Directory, 0o755),
            ("bin/busybox", EntryKind::File, 0o4755),
            ("bin/sh", EntryKind::Symlink, 0o777),
            ("dev", EntryKind::Directory, 0o755),
            ("dev/console", EntryKind::CharDevice, 0o600),
            ("dev/vda", EntryKind::BlockDevice, 0o660),
            ("etc", EntryKind::Directory, 0o755),
            ("etc/empty", EntryKind::File, 0o644),
            ("init", EntryKind::File, 0o755),
            ("tmp", EntryKind::Directory, 0o1777),
        ]
    );
    let by_name: BTreeMap<_, _> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    assert_eq!(by_name["init"].data, b"#!/bin/sh\necho hi\n");
    assert_eq!(by_name["bin/busybox"].data, vec![0xAB; 1001]);
    assert_eq!(by_name["bin/sh"].data, b"busybox");
    assert!(by_name["etc/empty"].data.is_empty());
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.ino as usize, i + 1, "{}", e.name);
        assert_eq!((e.uid, e.gid), (0, 0));
        assert_eq!(e.mtime as u64, EPOCH);
        assert_eq!((e.dev_major, e.dev_minor), (0, 0));
        assert_eq!(e.check, 0);
        let nlink = if e.kind() == EntryKind::Directory {
            2
        } else {
            1
        };
        assert_eq!(e.nlink, nlink, "{}", e.name);
        assert!(!e.name.starts_with('/') && e.name != ".");
    }
    // The trailer is the last thing in the stream and nothing follows its padding.
    let tail = b"TRAILER!!!\0";
    let pos = bytes.windows(tail.len()).rposition(|w| w == tail).unwrap();
    assert_eq!(
        bytes.len(),
        pos + tail.len() + newc::pad4(newc::HEADER_LEN + tail.len())
    );
}

#[test]
fn sorted_bytewise_parents_first_and_implicit_dirs() {
    let mut a = Archive::new();
    for p in ["z/y/x", "a/b", "a-b", "a.c/d", "A", "a/b-c", "a/b/c"] {
        if p == "a/b" {
            a.add_dir(p, 0o700).unwrap();
        } else {
            a.add_file(p, 0o644, p.as_bytes().to_vec()).unwrap();
        }
    }
    let names: Vec<String> = reader::read(&raw(&a))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let mut sorted = names.clone();
    sorted.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));
    assert_eq!(names, sorted);
    assert_eq!(names, a.paths().collect::<Vec<_>>());
    for (i, n) in names.iter().enumerate() {
        if let Some((parent, _)) = n.rsplit_once('/') {
            let pi = names
                .iter()
                .position(|x| x == parent)
                .expect("parent emitted");
            assert!(pi < i, "{parent} must precede {n}");
        }
    }
    assert!(names.contains(&"z".to_owned()) && names.contains(&"z/y".to_owned()));
    let entries = reader::read(&raw(&a)).unwrap();
    let z = entries.iter().find(|e| e.name == "z/y").unwrap();
    assert_eq!(z.mode, newc::S_IFDIR | 0o755);
    let ab = entries.iter().find(|e| e.name == "a/b").unwrap();
    assert_eq!(
        ab.mode,
        newc::S_IFDIR | 0o700,
        "explicit dir mode replaces implicit 0755"
    );
}

#[test]
fn path_rules_and_conflicts() {
    let mut a = Archive::new();
    a.add_file("/x//y/./f", 0o644, Vec::new()).unwrap();
    assert!(a.contains("x/y/f") && a.contains("/x/y"));
    assert!(matches!(
        a.add_file("x/y/f", 0o644, Vec::new()),
        Err(Error::Duplicate { .. })
    ));
    assert!(matches!(
        a.add_symlink("x", "y"),
        Err(Error::Duplicate { .. })
    ));
    assert!(matches!(
        a.add_dir("x/y/f/g", 0o755),
        Err(Error::ParentNotDirectory { .. })
    ));
    assert!(matches!(
        a.add_dir("../etc", 0o755),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        a.add_dir("/", 0o755),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        a.add_file("f", 0o100644, Vec::new()),
        Err(Error::InvalidMode { .. })
    ));
    assert!(matches!(
        a.add_symlink("l", ""),
        Err(Error::InvalidSymlinkTarget { .. })
    ));
    assert!(matches!(
        a.add_char_device("c", 0o600, 4096, 0),
        Err(Error::InvalidDevice { .. })
    ));
    assert!(matches!(
        a.add_char_device("c", 0o600, 0, 1 << 20),
        Err(Error::InvalidDevice { .. })
    ));
    a.add_dir("x", 0o700).unwrap(); // re-adding a directory updates its mode
    assert_eq!(a.len(), 3);
    let msg = a.add_dir("x/y/f/g", 0o755).unwrap_err().to_string();
    assert!(
        msg.contains("x/y/f/g") && msg.contains("\"x/y/f\""),
        "{msg}"
    );
}

#[test]
fn device_node_rdev_fields() {
    let mut a = Archive::new();
    a.add_char_device("dev/console", 0o600, 5, 1)
        .unwrap()
        .add_char_device("dev/null", 0o666, 1, 3)
        .unwrap()
        .add_block_device("dev/big", 0o600, 4095, (1 << 20) - 1)
        .unwrap();
    let bytes = raw(&a);
    let e = reader::read(&bytes).unwrap();
    let find = |n: &str| e.iter().find(|x| x.name == n).unwrap();
    let console = find("dev/console");
    assert_eq!(console.kind(), EntryKind::CharDevice);
    assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
    assert_eq!((console.dev_major, console.dev_minor), (0, 0));
    assert_eq!(console.mode, 0o020600);
    assert!(console.data.is_empty());
    let null = find("dev/null");
    assert_eq!((null.rdev_major, null.rdev_minor), (1, 3));
    let big = find("dev/big");
    assert_eq!(big.kind(), EntryKind::BlockDevice);
    assert_eq!((big.rdev_major, big.rdev_minor), (0xFFF, 0xFFFFF));
    // Check the raw header text too: rdevmajor / rdevminor are fields 10 and 11.
    let off = console.offset as usize;
    let hdr = &bytes[off..off + newc::HEADER_LEN];
    assert_eq!(&hdr[78..86], b"00000005");
    assert_eq!(&hdr[86..94], b"00000001");
    let off = big.offset as usize;
    assert_eq!(&bytes[off + 78..off + 94], b"00000FFF000FFFFF");
}

#[test]
fn padding_alignment_for_all_name_and_data_lengths() {
    let mut a = Archive::new();
    for name_len in 1..=9 {
        for data_len in 0..=9 {
            let name = format!("d{data_len}/{}", "n".repeat(name_len));
            a.add_file(&name, 0o644, vec![b'x'; data_len]).unwrap();
        }
    }
    let bytes = raw(&a);
    assert_eq!(bytes.len() % 4, 0);
    // Walk the headers by hand, independently of the reader.
    let mut pos = 0usize;
    let mut seen = 0;
    loop {
        assert_eq!(pos % 4, 0);
        let h = &bytes[pos..pos + newc::HEADER_LEN];
        assert_eq!(&h[..6], b"070701");
        assert!(h[6..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)));
        let field = |i: usize| newc::parse_hex(&h[6 + 8 * i..14 + 8 * i]).unwrap() as usize;
        let (filesize, namesize) = (field(6), field(11));
        let name = &bytes[pos + newc::HEADER_LEN..pos + newc::HEADER_LEN + namesize];
        assert_eq!(*name.last().unwrap(), 0);
        let data_start = pos + newc::HEADER_LEN + namesize;
        let pad = (4 - data_start % 4) % 4;
        assert!(bytes[data_start..data_start + pad].iter().all(|&b| b == 0));
        let data_start = data_start + pad;
        assert_eq!(data_start % 4, 0);
        let end = data_start + filesize;
        let next = end + (4 - end % 4) % 4;
        assert!(bytes[end..next].iter().all(|&b| b == 0));
        pos = next;
        if &name[..name.len() - 1] == b"TRAILER!!!" {
            break;
        }
        seen += 1;
    }
    assert_eq!(pos, bytes.len());
    assert_eq!(seen, a.len());
}

/// Builds the same logical tree under `root`, with host metadata chosen by `variant`.
fn make_tree(root: &Path, variant: u32) {
    let files: &[(&str, &[u8], u32)] = &[
        ("bin/tool", b"\x7fELF tool", 0o755),
        ("etc/conf", b"key=value\n", 0o644),
        ("etc/deep/er/file", b"deep", 0o600),
        ("init", b"#!/bin/sh\n", 0o700),
        ("lib/empty", b"", 0o640),
    ];
    // Create in a different order each time so directory listing and inode order differ.
    let order: Vec<usize> = if variant == 0 {
        vec![0, 1, 2, 3, 4]
    } else {
        vec![4, 2, 3, 0, 1]
    };
    for i in order {
        let (p, data, mode) = files[i];
        let host = root.join(p);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        fs::write(&host, data).unwrap();
        let mtime = SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_000_000 * (variant as u64 + 1) + i as u64);
        fs::File::options()
            .write(true)
            .open(&host)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        // Different but equivalent-after-normalisation host modes.
        let mode = if variant == 0 {
            mode
        } else if mode & 0o111 != 0 {
            0o751
        } else {
            0o444
        };
        fs::set_permissions(&host, fs::Permissions::from_mode(mode)).unwrap();
    }
    symlink("tool", root.join("bin/sh")).unwrap();
    symlink("/nonexistent/dangling", root.join("lib/dangling")).unwrap();
    fs::create_dir_all(root.join("proc")).unwrap();
    fs::set_permissions(
        root.join("etc"),
        fs::Permissions::from_mode(if variant == 0 { 0o700 } else { 0o775 }),
    )
    .unwrap();
    if variant == 1 && is_root() {
        // Different owner: must not matter.
        let _ = std::os::unix::fs::chown(root.join("init"), Some(1234), Some(5678));
        let _ = std::os::unix::fs::lchown(root.join("bin/sh"), Some(1234), Some(5678));
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn same_tree_in_two_temp_dirs_is_byte_identical() {
    let d1 = tempfile::tempdir().unwrap();
    let filler = tempfile::tempdir().unwrap(); // shifts inode allocation between the two trees
    for i in 0..7 {
        fs::write(filler.path().join(format!("f{i}")), b"x").unwrap();
    }
    let d2 = tempfile::tempdir().unwrap();
    make_tree(d1.path(), 0);
    make_tree(d2.path(), 1);

    for compression in Compression::ALL {
        let opts = WriteOptions::new(EPOCH).compression(compression);
        let mut outs = Vec::new();
        for d in [&d1, &d2] {
            let mut a = Archive::new();
            a.add_tree(d.path(), "/").unwrap();
            let mut out = Vec::new();
            let report = a.write(&mut out, &opts).unwrap();
            assert_eq!(report.compressed_bytes, out.len() as u64);
            assert_eq!(report.sha256_hex, hex::encode(Sha256::digest(&out)));
            outs.push((out, report));
        }
        assert_eq!(outs[0].0, outs[1].0, "{compression}: archives differ");
        assert_eq!(outs[0].1, outs[1].1);
        // And writing again gives the same bytes.
        let mut a = Archive::new();
        a.add_tree(d1.path(), "").unwrap();
        let mut again = Vec::new();
        a.write(&mut again, &opts).unwrap();
        assert_eq!(again, outs[0].0);
    }

    let mut a = Archive::new();
    a.add_tree(d1.path(), "").unwrap();
    let entries = reader::read(&raw(&a)).unwrap();
    let modes: BTreeMap<&str, (EntryKind, u32)> = entries
        .iter()
        .map(|e| (e.name.as_str(), (e.kind(), e.permissions())))
        .collect();
    assert_eq!(
        modes["init"],
        (EntryKind::File, 0o755),
        "0700 host file -> 0755"
    );
    assert_eq!(
        modes["etc/deep/er/file"],
        (EntryKind::File, 0o644),
        "0600 host file -> 0644"
    );
    assert_eq!(modes["lib/empty"], (EntryKind::File, 0o644));
    assert_eq!(
        modes["etc"],
        (EntryKind::Directory, 0o755),
        "host dir modes normalised"
    );
    assert_eq!(
        modes["proc"],
        (EntryKind::Directory, 0o755),
        "empty dirs kept"
    );
    assert_eq!(modes["bin/sh"], (EntryKind::Symlink, 0o777));
    let dangling = entries.iter().find(|e| e.name == "lib/dangling").unwrap();
    assert_eq!(dangling.data, b"/nonexistent/dangling");
    assert!(entries
        .iter()
        .all(|e| e.uid == 0 && e.gid == 0 && e.mtime as u64 == EPOCH));
}

#[test]
fn add_tree_with_prefix_merges_and_rejects_special_files() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    fs::write(d.path().join("sub/f"), b"f").unwrap();
    let mut a = Archive::new();
    a.add_dir("usr", 0o700).unwrap();
    a.add_tree(d.path(), "/usr/lib/").unwrap();
    assert_eq!(
        a.paths().collect::<Vec<_>>(),
        ["usr", "usr/lib", "usr/lib/sub", "usr/lib/sub/f"]
    );

    // A socket is neither file, dir nor symlink.
    let _listener = std::os::unix::net::UnixListener::bind(d.path().join("sub/sock")).unwrap();
    let before = a.clone();
    let err = a.add_tree(d.path(), "other").unwrap_err();
    match &err {
        Error::UnsupportedFileType { path, kind } => {
            assert!(path.ends_with("sub/sock"));
            assert_eq!(*kind, "socket");
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(err.to_string().contains("sock"), "{err}");
    assert_eq!(a, before, "failed add_tree leaves the archive unchanged");

    // Conflict with an existing non-directory.
    let mut b = Archive::new();
    b.add_file("x/sub", 0o644, Vec::new()).unwrap();
    fs::remove_file(d.path().join("sub/sock")).unwrap();
    assert!(matches!(
        b.add_tree(d.path(), "x"),
        Err(Error::Duplicate { .. })
    ));

    // host_dir must be a directory.
    assert!(a.add_tree(d.path().join("sub/f"), "y").is_err());
}

#[test]
fn add_tree_does_not_follow_symlinks() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"secret").unwrap();
    let d = tempfile::tempdir().unwrap();
    symlink(outside.path(), d.path().join("linkdir")).unwrap();
    symlink(outside.path().join("secret"), d.path().join("linkfile")).unwrap();
    let mut a = Archive::new();
    a.add_tree(d.path(), "").unwrap();
    let e = reader::read(&raw(&a)).unwrap();
    assert_eq!(e.len(), 2);
    assert!(e.iter().all(|e| e.kind() == EntryKind::Symlink));
    assert!(!e.iter().any(|e| e.name.contains("secret")));
}

#[test]
fn host_file_read_at_write_time_with_normalised_mode() {
    let d = tempfile::tempdir().unwrap();
    let host = d.path().join("prog");
    fs::write(&host, b"v1").unwrap();
    fs::set_permissions(&host, fs::Permissions::from_mode(0o700)).unwrap();
    let mut a = Archive::new();
    a.add_host_file("usr/bin/prog", &host).unwrap();
    fs::write(&host, b"version 2").unwrap();
    let e = reader::read(&raw(&a)).unwrap();
    let prog = e.iter().find(|e| e.name == "usr/bin/prog").unwrap();
    assert_eq!(prog.data, b"version 2");
    assert_eq!(prog.mode, newc::S_IFREG | 0o755);

    fs::remove_file(&host).unwrap();
    let err = a
        .write(
            &mut Vec::new(),
            &WriteOptions::new(EPOCH).compression(Compression::None),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("prog"), "{err}");
}

#[test]
fn file_over_4gib_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let host = d.path().join("huge");
    let f = fs::File::create(&host).unwrap();
    f.set_len((1u64 << 32) + 1).unwrap(); // sparse
    drop(f);
    let mut a = Archive::new();
    a.add_host_file("huge", &host).unwrap();
    let err = a
        .write(
            &mut std::io::sink(),
            &WriteOptions::new(EPOCH).compression(Compression::None),
        )
        .unwrap_err();
    match err {
        Error::FieldOverflow { path, field, value } => {
            assert_eq!(
                (path.as_str(), field, value),
                ("huge", "filesize", (1 << 32) + 1)
            );
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn mtime_must_fit_32_bits() {
    let a = sample();
    let err = a
        .write(&mut Vec::new(), &WriteOptions::new(1 << 32))
        .unwrap_err();
    assert!(matches!(err, Error::MtimeOverflow(v) if v == 1 << 32));
    a.write(
        &mut Vec::new(),
        &WriteOptions::new(u32::MAX as u64).compression(Compression::None),
    )
    .unwrap();
}

#[test]
fn gzip_and_zstd_decompress_to_the_same_cpio() {
    let a = sample();
    let plain = raw(&a);
    let mut gz = Vec::new();
    let rg = a
        .write(
            &mut gz,
            &WriteOptions::new(EPOCH).compression(Compression::Gzip),
        )
        .unwrap();
    let mut zs = Vec::new();
    let rz = a
        .write(
            &mut zs,
            &WriteOptions::new(EPOCH).compression(Compression::Zstd),
        )
        .unwrap();

    let mut dec = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut dec)
        .unwrap();
    assert_eq!(dec, plain);
    assert_eq!(zstd::stream::decode_all(&zs[..]).unwrap(), plain);
    for r in [&rg, &rz] {
        assert_eq!(r.uncompressed_bytes, plain.len() as u64);
        assert_eq!(r.entries, a.len() as u64);
    }
    assert_eq!(rg.compressed_bytes, gz.len() as u64);
    assert_eq!(rz.compressed_bytes, zs.len() as u64);
    assert_eq!(
        reader::decompress(&gz, 1 << 20).unwrap().as_ref(),
        &plain[..]
    );
    assert_eq!(
        reader::decompress(&zs, 1 << 20).unwrap().as_ref(),
        &plain[..]
    );
    assert_eq!(reader::read(&gz).unwrap(), reader::read(&plain).unwrap());
    assert_eq!(reader::read(&zs).unwrap(), reader::read(&plain).unwrap());

    // gzip header: no FNAME/any flag, mtime 0, XFL 2 (level 9), OS 255.
    assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0]);
    assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
    assert_eq!(gz[8], 2);
    assert_eq!(gz[9], 255);
}

/// Window size declared in a zstd frame header (None if single-segment).
fn zstd_window_size(frame: &[u8]) -> Option<u64> {
    assert_eq!(&frame[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    let fhd = frame[4];
    if fhd & 0x20 != 0 {
        return None;
    }
    let wd = frame[5];
    let log = 10 + u64::from(wd >> 3);
    let base = 1u64 << log;
    Some(base + (base / 8) * u64::from(wd & 7))
}

#[test]
fn zstd_window_is_at_most_8_mib_even_at_ultra_levels() {
    let a = sample();
    for level in [1, 19, 22] {
        let mut zs = Vec::new();
        a.write(&mut zs, &WriteOptions::new(EPOCH).zstd_level(level))
            .unwrap();
        let window = zstd_window_size(&zs).expect("streaming frame declares a window");
        assert!(
            window <= 1 << ZSTD_WINDOW_LOG,
            "level {level}: window {window}"
        );
        // A decoder capped at 2^23 (what the kernel is built for) accepts it.
        let mut dec = zstd::stream::read::Decoder::new(&zs[..]).unwrap();
        dec.window_log_max(ZSTD_WINDOW_LOG).unwrap();
        let mut out = Vec::new();
        dec.read_to_end(&mut out).unwrap();
        assert_eq!(out, raw(&a));
    }
    let err = a
        .write(&mut Vec::new(), &WriteOptions::new(EPOCH).zstd_level(1000))
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidZstdLevel { level: 1000, .. }),
        "{err:?}"
    );
}

#[test]
fn zstd_multithreaded_output_is_deterministic_across_worker_counts() {
    let mut a = Archive::new();
    // Enough pseudo-random-ish data for several jobs.
    let mut x: u32 = 12345;
    let data: Vec<u8> = (0..3 << 20)
        .map(|i| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if i % 3 == 0 {
                (x >> 24) as u8
            } else {
                b'a' + (i % 7) as u8
            }
        })
        .collect();
    a.add_file("blob", 0o644, data).unwrap();
    let plain = raw(&a);
    let write = |workers| {
        let mut out = Vec::new();
        a.write(
            &mut out,
            &WriteOptions::new(EPOCH).zstd_level(3).zstd_workers(workers),
        )
        .unwrap();
        out
    };
    let one = write(1);
    let two = write(2);
    assert_eq!(one, two);
    assert_eq!(one, write(1));
    assert_eq!(zstd::stream::decode_all(&one[..]).unwrap(), plain);
    let st = write(0);
    assert_eq!(st, write(0));
    assert_eq!(zstd::stream::decode_all(&st[..]).unwrap(), plain);
}

#[test]
fn write_to_is_atomic() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("initrd.img");
    let a = sample();
    let opts = WriteOptions::new(EPOCH).compression(Compression::Gzip);
    let report = a.write_to(&target, &opts).unwrap();
    let bytes = fs::read(&target).unwrap();
    assert_eq!(report.compressed_bytes, bytes.len() as u64);
    assert_eq!(report.sha256_hex, hex::encode(Sha256::digest(&bytes)));
    assert_eq!(
        fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
        0o644
    );
    let mut buf = Vec::new();
    assert_eq!(a.write(&mut buf, &opts).unwrap(), report);
    assert_eq!(buf, bytes);

    // A failing write (host file vanished) leaves the old file and no temp files.
    let mut bad = sample();
    bad.add_host_file("zzz", d.path().join("missing")).unwrap();
    assert!(bad.write_to(&target, &opts).is_err());
    assert_eq!(fs::read(&target).unwrap(), bytes);
    let names: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["initrd.img"]);

    // And a fresh path is not created at all.
    let fresh = d.path().join("fresh.img");
    assert!(bad.write_to(&fresh, &opts).is_err());
    assert!(!fresh.exists());
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
}

// ---------------------------------------------------------------- hostile input

#[test]
fn truncation_at_every_offset_is_an_error() {
    let plain = raw(&sample());
    for i in 0..plain.len() {
        assert!(
            reader::parse(&plain[..i]).is_err(),
            "prefix of {i} bytes parsed"
        );
    }
    assert!(reader::parse(&plain).is_ok());
    // Trailing zero padding (e.g. 512-byte blocking) is fine, trailing data is not.
    let mut padded = plain.clone();
    padded.resize(plain.len() + 512, 0);
    assert!(reader::parse(&padded).is_ok());
    padded.push(1);
    assert!(matches!(
        reader::parse(&padded),
        Err(Error::TrailingData { .. })
    ));

    let a = sample();
    for c in [Compression::Gzip, Compression::Zstd] {
        let mut out = Vec::new();
        a.write(&mut out, &WriteOptions::new(EPOCH).compression(c))
            .unwrap();
        for i in 0..out.len() {
            assert!(
                reader::read(&out[..i]).is_err(),
                "{c}: prefix of {i} bytes read"
            );
        }
    }
}

fn one_entry(name: &[u8], namesize: u32, filesize: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"070701");
    for f in [1, 0o100644, 0, 0, 1, 0, filesize, 0, 0, 0, 0, namesize, 0] {
        v.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    v.extend_from_slice(name);
    v.extend_from_slice(data);
    v
}

#[test]
fn hostile_headers_give_typed_errors() {
    // Bad magic.
    let mut bad = raw(&sample());
    bad[5] = b'7';
    assert!(matches!(
        reader::parse(&bad),
        Err(Error::BadMagic { offset: 0, .. })
    ));
    let msg = reader::parse(&bad).unwrap_err().to_string();
    assert!(msg.contains("offset 0") && msg.contains("070707"), "{msg}");
    // Non-hex field.
    let mut bad = raw(&sample());
    bad[14] = b'x';
    assert!(matches!(
        reader::parse(&bad),
        Err(Error::BadHeaderField {
            offset: 14,
            field: "mode",
            ..
        })
    ));
    // Huge namesize / filesize: truncation, not allocation or panic.
    let e = one_entry(b"a\0", u32::MAX, 0, &[]);
    assert!(matches!(
        reader::parse(&e),
        Err(Error::Truncated {
            what: "entry name",
            ..
        })
    ));
    let e = one_entry(b"a\0\0\0\0", 2, u32::MAX, b"abc");
    assert!(matches!(
        reader::parse(&e),
        Err(Error::Truncated {
            what: "file data",
            ..
        })
    ));
    // namesize 0.
    let e = one_entry(b"", 0, 0, &[]);
    assert!(matches!(reader::parse(&e), Err(Error::BadName { .. })));
    // Missing NUL, embedded NUL.
    let e = one_entry(b"ab\0\0", 2, 0, &[]);
    assert!(matches!(reader::parse(&e), Err(Error::BadName { .. })));
    let e = one_entry(b"a\0b\0", 4, 0, &[]);
    assert!(matches!(reader::parse(&e), Err(Error::BadName { .. })));
    // Non-UTF-8 name.
    let e = one_entry(b"\xff\xfe\0\0", 3, 0, &[]);
    assert!(matches!(
        reader::parse(&e),
        Err(Error::NonUtf8Name { offset: 110, .. })
    ));
    // Non-zero padding.
    let e = one_entry(b"ab\0X\0\0", 3, 0, &[]);
    assert!(matches!(
        reader::parse(&e),
        Err(Error::BadPadding { offset: 113 })
    ));
    // Unknown format, empty input.
    assert!(matches!(
        reader::read(b"PK\x03\x04"),
        Err(Error::UnknownFormat { .. })
    ));
    assert!(reader::read(b"").is_err());
    // Garbage after a compression magic.
    assert!(matches!(
        reader::read(&[0x1f, 0x8b, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        Err(Error::Decompress { format: "gzip", .. })
    ));
    assert!(matches!(
        reader::read(&[0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff, 0xff]),
        Err(Error::Decompress { format: "zstd", .. })
    ));
}

#[test]
fn random_corruption_never_panics() {
    let plain = raw(&sample());
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..5000 {
        let mut v = plain.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % v.len() as u64) as usize;
            v[i] = match next() % 3 {
                0 => next() as u8,
                1 => b"0123456789ABCDEFf"[(next() % 17) as usize],
                _ => v[i] ^ 0x01,
            };
        }
        let _ = reader::parse(&v);
    }
    // Corrupted compressed streams: errors, never panics.
    let a = sample();
    for c in [Compression::Gzip, Compression::Zstd] {
        let mut out = Vec::new();
        a.write(&mut out, &WriteOptions::new(EPOCH).compression(c))
            .unwrap();
        for _ in 0..300 {
            let mut v = out.clone();
            let i = 4 + (next() % (v.len() as u64 - 4)) as usize;
            v[i] ^= (next() % 255 + 1) as u8;
            let _ = reader::read_with_limit(&v, 1 << 20);
        }
    }
}

#[test]
fn fifo_in_place_of_host_file_is_rejected_without_hanging() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status();
    if !matches!(status, Ok(s) if s.success()) {
        println!("note: mkfifo unavailable; skipping");
        return;
    }
    let mut a = Archive::new();
    a.add_host_file("f", &fifo).unwrap();
    let err = a
        .write(&mut Vec::new(), &WriteOptions::new(EPOCH))
        .unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedFileType { kind: "FIFO", .. }),
        "{err:?}"
    );
    let mut t = Archive::new();
    assert!(matches!(
        t.add_tree(d.path(), ""),
        Err(Error::UnsupportedFileType { kind: "FIFO", .. })
    ));
}

#[test]
fn decompression_is_capped() {
    let mut a = Archive::new();
    a.add_file("zeros", 0o644, vec![0u8; 4 << 20]).unwrap();
    for c in [Compression::Gzip, Compression::Zstd] {
        let mut out = Vec::new();
        a.write(&mut out, &WriteOptions::new(EPOCH).compression(c))
            .unwrap();
        assert!(out.len() < 1 << 20);
        assert!(matches!(
            reader::read_with_limit(&out, 1 << 20),
            Err(Error::TooLarge { limit, .. }) if limit == 1 << 20
        ));
        assert_eq!(reader::read_with_limit(&out, 8 << 20).unwrap().len(), 1);
    }
}

// ---------------------------------------------------------------- compatibility

#[test]
fn gnu_cpio_lists_and_extracts_our_archives() {
    let cpio = Path::new("/usr/bin/cpio");
    if !cpio.exists() {
        println!("note: /usr/bin/cpio not found; skipping cpio compatibility test");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let archive_path = d.path().join("a.cpio");

    // Listing, device nodes included.
    let a = sample();
    a.write_to(
        &archive_path,
        &WriteOptions::new(EPOCH).compression(Compression::None),
    )
    .unwrap();
    let out = Command::new(cpio)
        .args(["-it", "--quiet", "-F"])
        .arg(&archive_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cpio -it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(listed, a.paths().collect::<Vec<_>>());

    // Extraction of files, dirs and symlinks.
    let mut b = Archive::new();
    b.add_file("init", 0o755, b"#!/bin/sh\n".to_vec())
        .unwrap()
        .add_file("etc/motd", 0o644, b"hello\n".to_vec())
        .unwrap()
        .add_dir("var/empty", 0o700)
        .unwrap()
        .add_symlink("bin/sh", "../init")
        .unwrap();
    b.write_to(
        &archive_path,
        &WriteOptions::new(EPOCH).compression(Compression::None),
    )
    .unwrap();
    let dest = d.path().join("x");
    fs::create_dir(&dest).unwrap();
    let out = Command::new(cpio)
        .args(["-idm", "--quiet", "--no-absolute-filenames", "-F"])
        .arg(&archive_path)
        .current_dir(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cpio -idm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(dest.join("init")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(fs::read(dest.join("etc/motd")).unwrap(), b"hello\n");
    assert_eq!(
        fs::read_link(dest.join("bin/sh")).unwrap(),
        Path::new("../init")
    );
    let m = fs::metadata(dest.join("init")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        m.modified().unwrap(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH),
        "cpio -m restores our mtime"
    );
    assert!(fs::metadata(dest.join("var/empty")).unwrap().is_dir());
}
