//! The one way kiln's tests change a stored byte: a verity tree, a registry
//! blob or an image must then refuse the result, which is what they prove.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// XORs the byte at `at` of the file at `path` with `mask` (non-zero), in
/// place, without reading the whole file. Returns the byte's old value.
pub fn flip_byte(path: &Path, at: u64, mask: u8) -> std::io::Result<u8> {
    assert_ne!(mask, 0, "a zero mask changes nothing");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut b)?;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&[b[0] ^ mask])?;
    f.sync_all()?;
    Ok(b[0])
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_byte_changes_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, [1u8, 2, 3, 4]).unwrap();
        assert_eq!(super::flip_byte(&p, 2, 0x40).unwrap(), 3);
        assert_eq!(std::fs::read(&p).unwrap(), [1, 2, 3 ^ 0x40, 4]);
        assert!(
            super::flip_byte(&p, 9, 1).is_err(),
            "past the end is an error"
        );
    }
}
