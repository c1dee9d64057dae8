//! dm-verity hash trees (format version 1, SHA-256, 4 KiB blocks), written
//! after the data in the same file, without a superblock: the kernel takes
//! every parameter from its table (kiln-shim passes it with `dm-mod.create=`),
//! so the tree is all that has to be on disk. The on-disk facts, from the
//! kernel's `dm-verity-target.c` and cryptsetup's `veritysetup`:
//!
//! - a block's digest is `sha256(salt || block)` (version 1 puts the salt first);
//! - a hash block holds 128 digests (4096 / 32), zero-padded;
//! - level 0 hashes the data blocks, level i+1 hashes the blocks of level i,
//!   up to a level of one block, whose digest is the root hash;
//! - levels are stored from the top (one block) down to level 0, each
//!   starting on a hash block.
//!
//! [`verify`] re-reads a file against a root hash the same way, so tests can
//! check a tree without the kernel; `cargo xtask test` also checks every
//! image with cryptsetup's `veritysetup verify`, an independent reader.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
const DIGEST: usize = 32;
const PER_BLOCK: u64 = BLOCK / DIGEST as u64;

/// Everything the kernel's verity table needs, besides the device names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTree {
    /// Data blocks covered (the filesystem's length / [`BLOCK`]).
    pub data_blocks: u64,
    /// First hash block, counted in [`BLOCK`]s from the start of the file:
    /// the tree starts right after the data.
    pub hash_start_block: u64,
    /// Blocks the tree takes.
    pub hash_blocks: u64,
    pub salt: [u8; 32],
    pub root_hash: [u8; 32],
}

impl VerityTree {
    /// The verity target's arguments for a tree in the same device as its
    /// data (`dev`, e.g. `/dev/vda1`):
    /// `1 dev dev 4096 4096 <blocks> <hash start> sha256 <root> <salt>`.
    pub fn table_args(&self, dev: &str) -> String {
        format!(
            "1 {dev} {dev} {BLOCK} {BLOCK} {} {} sha256 {} {}",
            self.data_blocks,
            self.hash_start_block,
            hex(&self.root_hash),
            hex(&self.salt)
        )
    }
}

/// Blocks in each level, level 0 (hashes of the data) first.
fn level_sizes(data_blocks: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut n = data_blocks;
    loop {
        n = n.div_ceil(PER_BLOCK);
        sizes.push(n);
        if n == 1 {
            return sizes;
        }
    }
}

/// Bytes a tree for `data_len` bytes of data takes.
pub fn tree_len(data_len: u64) -> u64 {
    level_sizes(data_len / BLOCK).iter().sum::<u64>() * BLOCK
}

fn check_data_len(data_len: u64) -> Result<u64> {
    if data_len % BLOCK != 0 || data_len < 2 * BLOCK {
        return Err(Error::BadSize {
            size: data_len,
            reason: format!(
                "verity data must be at least two {BLOCK}-byte blocks and a whole number of them"
            ),
        });
    }
    Ok(data_len / BLOCK)
}

fn salted(salt: &[u8; 32], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Hashes `digests` into whole hash blocks: the next level up.
fn pack(digests: &[[u8; 32]], salt: &[u8; 32]) -> (Vec<u8>, Vec<[u8; 32]>) {
    let mut blocks =
        Vec::with_capacity(digests.len().div_ceil(PER_BLOCK as usize) * BLOCK as usize);
    let mut up = Vec::new();
    for chunk in digests.chunks(PER_BLOCK as usize) {
        let mut block = vec![0u8; BLOCK as usize];
        for (i, d) in chunk.iter().enumerate() {
            block[i * DIGEST..(i + 1) * DIGEST].copy_from_slice(d);
        }
        up.push(salted(salt, &block));
        blocks.extend_from_slice(&block);
    }
    (blocks, up)
}

/// Every level's bytes (level 0 first) and the root hash, for the data read from `data`.
fn build(
    data: &mut impl Read,
    data_blocks: u64,
    salt: &[u8; 32],
) -> Result<(Vec<Vec<u8>>, [u8; 32])> {
    let mut digests = Vec::with_capacity(data_blocks as usize);
    let mut block = vec![0u8; BLOCK as usize];
    for _ in 0..data_blocks {
        data.read_exact(&mut block)
            .map_err(|e| Error::io("reading verity data", e))?;
        digests.push(salted(salt, &block));
    }
    let mut levels = Vec::new();
    loop {
        let (bytes, up) = pack(&digests, salt);
        levels.push(bytes);
        if up.len() == 1 {
            return Ok((levels, up[0]));
        }
        digests = up;
    }
}

/// Appends the hash tree of the first `data_len` bytes of `file` at offset
/// `data_len` (the file is truncated there first) and returns the table facts.
pub fn append_tree(file: &mut File, data_len: u64, salt: [u8; 32]) -> Result<VerityTree> {
    let data_blocks = check_data_len(data_len)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io("seeking to the verity data", e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut *file);
    let (levels, root_hash) = build(&mut reader, data_blocks, &salt)?;
    drop(reader);
    file.set_len(data_len)
        .map_err(|e| Error::io("truncating before the hash tree", e))?;
    file.seek(SeekFrom::Start(data_len))
        .map_err(|e| Error::io("seeking to the hash tree", e))?;
    // Top level first.
    for level in levels.iter().rev() {
        file.write_all(level)
            .map_err(|e| Error::io("writing the hash tree", e))?;
    }
    Ok(VerityTree {
        data_blocks,
        hash_start_block: data_blocks,
        hash_blocks: levels.iter().map(|l| l.len() as u64 / BLOCK).sum(),
        salt,
        root_hash,
    })
}

/// Checks `file` (data, then the tree as [`append_tree`] writes it) against
/// `root_hash`, as the kernel would on reading every block: the first data
/// or hash block that does not match is named.
pub fn verify(file: &mut File, tree: &VerityTree, root_hash: &[u8; 32]) -> Result<()> {
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io("seeking to the verity data", e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut *file);
    let (levels, computed) = build(&mut reader, tree.data_blocks, &tree.salt)?;
    drop(reader);
    let mut stored = Vec::new();
    file.seek(SeekFrom::Start(tree.hash_start_block * BLOCK))
        .map_err(|e| Error::io("seeking to the hash tree", e))?;
    file.read_to_end(&mut stored)
        .map_err(|e| Error::io("reading the hash tree", e))?;
    let mut at = 0usize;
    for (depth, level) in levels.iter().enumerate().rev() {
        let on_disk = stored.get(at..at + level.len()).ok_or(Error::Truncated {
            what: "verity hash tree",
            offset: tree.hash_start_block * BLOCK + at as u64,
            need: level.len() as u64,
            have: stored.len().saturating_sub(at) as u64,
        })?;
        if on_disk != level.as_slice() {
            let block = on_disk
                .chunks(BLOCK as usize)
                .zip(level.chunks(BLOCK as usize))
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(Error::BadField {
                what: "verity hash tree",
                field: "hash block",
                value: format!(
                    "{} (level {depth})",
                    tree.hash_start_block + (at / BLOCK as usize + block) as u64
                ),
                reason: "does not match the data below it: data or tree was modified".into(),
            });
        }
        at += level.len();
    }
    if &computed != root_hash {
        return Err(Error::BadField {
            what: "verity hash tree",
            field: "root hash",
            value: hex(&computed),
            reason: format!(
                "expected {}: the data or the tree was modified",
                hex(root_hash)
            ),
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_file(blocks: u64) -> File {
        let mut f = tempfile::tempfile().unwrap();
        for i in 0..blocks {
            let block: Vec<u8> = (0..BLOCK).map(|j| (i * 31 + j * 7) as u8).collect();
            f.write_all(&block).unwrap();
        }
        f
    }

    /// The kernel's level count: levels grow while (blocks - 1) >> (7 * levels) > 0.
    fn kernel_levels(blocks: u64) -> usize {
        let mut levels = 0;
        while (blocks - 1) >> (7 * levels) > 0 {
            levels += 1;
        }
        levels
    }

    #[test]
    fn levels_match_the_kernels_count_and_sizes() {
        for blocks in [2, 127, 128, 129, 128 * 128, 128 * 128 + 1, 1_000_003] {
            let sizes = level_sizes(blocks);
            assert_eq!(sizes.len(), kernel_levels(blocks), "{blocks} blocks");
            for (i, s) in sizes.iter().enumerate() {
                assert_eq!(*s, blocks.div_ceil(PER_BLOCK.pow(i as u32 + 1)));
            }
            assert_eq!(*sizes.last().unwrap(), 1);
        }
        assert_eq!(tree_len(129 * BLOCK), 3 * BLOCK);
    }

    #[test]
    fn tree_follows_the_data_and_verifies() {
        let mut f = data_file(300);
        let tree = append_tree(&mut f, 300 * BLOCK, [9; 32]).unwrap();
        assert_eq!(tree.hash_start_block, 300);
        assert_eq!(tree.hash_blocks, 3 + 1);
        assert_eq!(f.metadata().unwrap().len(), (300 + 4) * BLOCK);
        verify(&mut f, &tree, &tree.root_hash).unwrap();
        // The root is the salted hash of the top block, stored first.
        let mut top = vec![0u8; BLOCK as usize];
        f.seek(SeekFrom::Start(300 * BLOCK)).unwrap();
        f.read_exact(&mut top).unwrap();
        assert_eq!(salted(&[9; 32], &top), tree.root_hash);
        assert!(tree
            .table_args("/dev/vda1")
            .starts_with("1 /dev/vda1 /dev/vda1 4096 4096 300 300 sha256 "));
    }

    #[test]
    fn same_data_same_tree_and_salt_changes_the_root() {
        let a = append_tree(&mut data_file(10), 10 * BLOCK, [1; 32]).unwrap();
        let b = append_tree(&mut data_file(10), 10 * BLOCK, [1; 32]).unwrap();
        let c = append_tree(&mut data_file(10), 10 * BLOCK, [2; 32]).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.root_hash, c.root_hash);
    }

    #[test]
    fn a_flipped_byte_in_data_or_tree_is_named() {
        let mut f = data_file(200);
        let tree = append_tree(&mut f, 200 * BLOCK, [3; 32]).unwrap();
        let flip = |f: &mut File, at: u64| {
            let mut b = [0u8; 1];
            f.seek(SeekFrom::Start(at)).unwrap();
            f.read_exact(&mut b).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[b[0] ^ 1]).unwrap();
        };
        flip(&mut f, 150 * BLOCK + 5);
        let e = verify(&mut f, &tree, &tree.root_hash)
            .unwrap_err()
            .to_string();
        assert!(e.contains("modified"), "{e}");
        flip(&mut f, 150 * BLOCK + 5);
        verify(&mut f, &tree, &tree.root_hash).unwrap();
        flip(&mut f, 200 * BLOCK + 100);
        let e = verify(&mut f, &tree, &tree.root_hash)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hash block") && e.contains("200"), "{e}");
    }

    #[test]
    fn bad_lengths_are_refused_not_panicked_on() {
        for len in [0, BLOCK, BLOCK + 1, 3 * BLOCK - 1] {
            let e = append_tree(&mut data_file(3), len, [0; 32]).unwrap_err();
            assert!(e.to_string().contains("whole number"), "{e}");
        }
    }
}
