//! Paths from requests that must stay inside a directory the agent owns
//! (storage mount points, CopyFile destinations).

use std::path::{Path, PathBuf};

use crate::error::{invalid, Result};

/// Checks that `requested` is an absolute path under `base`, with no `..`,
/// no NUL, and no symlink among the components below `base` that exist now
/// (a symlink planted there could redirect a mount or a write elsewhere).
/// Returns the path unchanged.
pub fn confined(what: &str, base: &Path, requested: &str) -> Result<PathBuf> {
    if requested.is_empty() || requested.contains('\0') || requested.len() > 4096 {
        return Err(invalid(format!(
            "{what} {requested:?} is not a usable path"
        )));
    }
    let p = Path::new(requested);
    if !p.is_absolute() {
        return Err(invalid(format!("{what} {requested:?} must be absolute")));
    }
    // Path::components() drops inner "." silently; look at the raw text.
    if requested.split('/').any(|c| c == "." || c == "..") {
        return Err(invalid(format!(
            "{what} {requested:?} must not contain '.' or '..' components"
        )));
    }
    let rel = p.strip_prefix(base).map_err(|_| {
        invalid(format!(
            "{what} {requested:?} is outside {}",
            base.display()
        ))
    })?;
    let mut cur = base.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(invalid(format!(
                    "{what} {requested:?}: {} is a symlink",
                    cur.display()
                )))
            }
            Ok(_) => {}
            Err(_) => break, // the rest does not exist yet, so it holds no links
        }
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run");
        std::fs::create_dir_all(base.join("sandbox")).unwrap();
        std::os::unix::fs::symlink("/etc", base.join("sandbox/link")).unwrap();
        let b = base.display();
        for bad in [
            "relative/x".to_string(),
            format!("{b}/../etc/passwd"),
            format!("{b}/sandbox/./x"),
            "/etc/passwd".to_string(),
            format!("{b}x/escape"),
            format!("{b}/sandbox/link/passwd"),
            format!("{b}/a\0b"),
            String::new(),
        ] {
            assert!(
                confined("CopyFile path", &base, &bad).is_err(),
                "{bad:?} accepted"
            );
        }
        let ok = format!("{b}/sandbox/new/dir/file");
        assert_eq!(confined("x", &base, &ok).unwrap(), PathBuf::from(&ok));
    }
}
