//! Debian packages' declared licences, for the SBOM: read from the
//! machine-readable copyright files (DEP-5,
//! `/usr/share/doc/<package>/copyright`) that the Debian recipe keeps, and
//! turned into SPDX license expressions. Debian's short names that have an
//! SPDX identifier are mapped to it; the others become `LicenseRef-Debian-…`,
//! which the SBOM declares as extracted licences. A file that is not DEP-5
//! declares nothing we can read: the package keeps NOASSERTION.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use anyhow::Context;

/// The prefix of licences without an SPDX identifier.
pub const REF_PREFIX: &str = "LicenseRef-Debian-";

/// Debian short name (lower case, `+` kept) → SPDX identifier.
fn spdx_id(name: &str) -> Option<&'static str> {
    Some(match name {
        "gpl-1" => "GPL-1.0-only",
        "gpl-1+" => "GPL-1.0-or-later",
        "gpl-2" => "GPL-2.0-only",
        "gpl-2+" => "GPL-2.0-or-later",
        "gpl-3" => "GPL-3.0-only",
        "gpl-3+" => "GPL-3.0-or-later",
        "lgpl-2" => "LGPL-2.0-only",
        "lgpl-2+" => "LGPL-2.0-or-later",
        "lgpl-2.1" => "LGPL-2.1-only",
        "lgpl-2.1+" => "LGPL-2.1-or-later",
        "lgpl-3" => "LGPL-3.0-only",
        "lgpl-3+" => "LGPL-3.0-or-later",
        "agpl-3" => "AGPL-3.0-only",
        "agpl-3+" => "AGPL-3.0-or-later",
        "gfdl-1.2" | "gfdl-1.2+" => "GFDL-1.2-or-later",
        "gfdl-1.3" | "gfdl-1.3+" => "GFDL-1.3-or-later",
        "bsd-2-clause" => "BSD-2-Clause",
        "bsd-3-clause" => "BSD-3-Clause",
        "bsd-4-clause" => "BSD-4-Clause",
        "expat" | "mit" => "MIT",
        "isc" => "ISC",
        "apache-2.0" | "apache-2" => "Apache-2.0",
        "artistic" | "artistic-1" => "Artistic-1.0",
        "artistic-2.0" => "Artistic-2.0",
        "zlib" => "Zlib",
        "mpl-1.1" => "MPL-1.1",
        "mpl-2.0" => "MPL-2.0",
        "cc0-1.0" | "cc0" => "CC0-1.0",
        "cc-by-sa-3.0" => "CC-BY-SA-3.0",
        "cc-by-sa-4.0" => "CC-BY-SA-4.0",
        "fsfap" => "FSFAP",
        "fsful" => "FSFUL",
        "fsfullr" => "FSFULLR",
        "x11" => "X11",
        "psf-2" => "PSF-2.0",
        "curl" => "curl",
        "openssl" => "OpenSSL",
        "ssleay" => "SSLeay-standalone",
        "bzip2-1.0.6" | "bzip2" => "bzip2-1.0.6",
        "unicode-dfs-2016" => "Unicode-DFS-2016",
        "wtfpl" => "WTFPL",
        "0bsd" => "0BSD",
        "unlicense" => "Unlicense",
        "bsl-1.0" | "boost-1.0" => "BSL-1.0",
        "beerware" => "Beerware",
        "sleepycat" => "Sleepycat",
        "tcl" => "TCL",
        "ofl-1.1" => "OFL-1.1",
        _ => return None,
    })
}

/// One licence name as an SPDX term: its identifier, or a LicenseRef made
/// of the characters SPDX allows (letters, digits, `.`, `-`).
fn term(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    // "GPL-2+ with OpenSSL exception": the base licence; the exception is
    // not an SPDX exception id we can trust, so the ref keeps the full name.
    if let Some(id) = spdx_id(&lower) {
        return id.to_string();
    }
    let clean: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches('-');
    format!(
        "{REF_PREFIX}{}",
        if clean.is_empty() { "unnamed" } else { clean }
    )
}

/// A DEP-5 `License:` short line ("GPL-2+ or Artistic", "BSD-3-clause and
/// MIT", "GPL-2+ | LGPL-2+", "A, and B") as an SPDX expression.
fn expression(line: &str) -> Option<String> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let lower = line.to_ascii_lowercase();
    // Split on " and " / "," first (weaker binding), then " or " / "|".
    let ands: Vec<String> = split_words(&lower, line, &[" and ", ","])
        .into_iter()
        .filter_map(|part| {
            let ors: Vec<String> = split_words(&part.to_ascii_lowercase(), &part, &[" or ", "|"])
                .into_iter()
                .filter(|t| !t.trim().is_empty())
                .map(|t| term(&t))
                .collect();
            match ors.len() {
                0 => None,
                1 => ors.into_iter().next(),
                _ => Some(format!("({})", ors.join(" OR "))),
            }
        })
        .collect();
    match ands.len() {
        0 => None,
        _ => Some(ands.join(" AND ")),
    }
}

/// `original` cut where `lower` (its lower-case copy) has one of `seps`.
fn split_words(lower: &str, original: &str, seps: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < lower.len() {
        if let Some(sep) = seps.iter().find(|s| lower[i..].starts_with(**s)) {
            out.push(original[start..i].trim().to_string());
            i += sep.len();
            start = i;
        } else {
            i += lower[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    out.push(original[start..].trim().to_string());
    out.retain(|s| !s.is_empty());
    out
}

/// The licences a DEP-5 copyright file declares for the package's files,
/// as one SPDX expression (every distinct `Files:` paragraph's licence,
/// joined with AND), or None when the file is not machine-readable.
pub fn declared(copyright: &str) -> Option<String> {
    let mut paragraphs = copyright.split("\n\n").filter(|p| !p.trim().is_empty());
    let header = paragraphs.next()?;
    if !header.lines().any(|l| l.starts_with("Format:")) {
        return None;
    }
    let mut terms = BTreeSet::new();
    for para in std::iter::once(header).chain(paragraphs) {
        let has_files = para.lines().any(|l| l.starts_with("Files:"));
        let license = para
            .lines()
            .find_map(|l| l.strip_prefix("License:"))
            .map(str::trim);
        // Standalone License paragraphs only hold texts for the names used above.
        if let (true, Some(line)) = (has_files || para == header, license) {
            if let Some(e) = expression(line) {
                terms.extend(top_level_and(&e));
            }
        }
    }
    if terms.is_empty() {
        return None;
    }
    let parts: Vec<String> = terms.into_iter().collect();
    Some(if parts.len() == 1 {
        parts.into_iter().next().unwrap_or_default()
    } else {
        parts
            .into_iter()
            .map(|p| {
                if p.contains(" OR ") && !p.starts_with('(') {
                    format!("({p})")
                } else {
                    p
                }
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    })
}

/// The operands of `e`'s top-level ANDs (outside parentheses), so one
/// licence named by several paragraphs is listed once.
fn top_level_and(e: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    let bytes = e.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b' ' if depth == 0 && e[i..].starts_with(" AND ") => {
                out.push(e[start..i].to_string());
                i += " AND ".len();
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(e[start..].to_string());
    out
}

/// Package name → declared licence, from every `usr/share/doc/<pkg>/copyright`
/// in a Debian base tarball (links to another package's file are skipped:
/// that package reports it).
pub fn from_tarball(tar_path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let file =
        std::fs::File::open(tar_path).with_context(|| format!("opening {}", tar_path.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut out = BTreeMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path()?.to_string_lossy().into_owned();
        let Some(pkg) = name
            .trim_start_matches("./")
            .strip_prefix("usr/share/doc/")
            .and_then(|r| r.strip_suffix("/copyright"))
            .filter(|p| !p.contains('/'))
        else {
            continue;
        };
        let mut text = String::new();
        if entry.read_to_string(&mut text).is_err() {
            continue;
        }
        if let Some(expr) = declared(&text) {
            out.insert(pkg.to_string(), expr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP5: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: demo
Source: https://example.org

Files: *
Copyright: 2000 Someone
License: GPL-2+

Files: lib/*
Copyright: 2001 Other
License: LGPL-2.1+ or BSD-3-clause

Files: contrib/odd.c
Copyright: 2002 Odd
License: public-domain

Files: debian/*
Copyright: 2003 Packager
License: GPL-2+ and Expat

License: GPL-2+
 This program is free software...

License: public-domain
 No rights reserved.
";

    #[test]
    fn dep5_licences_become_one_spdx_expression() {
        assert_eq!(
            declared(DEP5).unwrap(),
            "(LGPL-2.1-or-later OR BSD-3-Clause) AND GPL-2.0-or-later AND LicenseRef-Debian-public-domain AND MIT"
        );
    }

    #[test]
    fn names_map_or_become_refs() {
        assert_eq!(expression("Expat").unwrap(), "MIT");
        assert_eq!(
            expression("GPL-2+ | Artistic").unwrap(),
            "(GPL-2.0-or-later OR Artistic-1.0)"
        );
        assert_eq!(
            expression("BSD-3-clause and ISC").unwrap(),
            "BSD-3-Clause AND ISC"
        );
        assert_eq!(
            expression("GPL-2+ with OpenSSL exception").unwrap(),
            "LicenseRef-Debian-GPL-2--with-OpenSSL-exception"
        );
        assert_eq!(expression("  "), None);
        assert_eq!(
            top_level_and("(A OR B) AND C AND (D AND E)"),
            ["(A OR B)", "C", "(D AND E)"]
        );
    }

    #[test]
    fn a_free_form_file_declares_nothing() {
        assert_eq!(
            declared("This is Debian's prepackaged version of foo.\n\nIt is GPL.\n"),
            None
        );
        assert_eq!(declared(""), None);
    }
}
