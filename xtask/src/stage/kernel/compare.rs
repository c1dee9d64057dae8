//! `kernel-check --compare`: kiln's kernel configuration against someone
//! else's (a directory of fragments such as Kata's
//! `tools/packaging/kernel/configs/fragments/<arch>/`, or a single `.config`
//! such as a distro's `/boot/config-*`).
//!
//! The interesting direction is "they turn it on, kiln has it off": each such
//! option is either deliberately left off — listed, with a reason, in
//! `kernel-configs/omitted.toml` — or not decided yet. The other direction is
//! what kiln's fragments ask for that the other side leaves off. The omitted
//! list is data, not a fragment: it is no build input and no part of the
//! kernel stage's key (which hashes each fragment's parsed settings only).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use super::dotconfig::{ConfigError, ConfigFile, Value};

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct OmittedFile {
    #[serde(default)]
    omitted: Vec<OmittedGroup>,
}

/// Options kiln leaves off on purpose, sharing one reason.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OmittedGroup {
    /// Option names (with or without `CONFIG_`); a trailing `*` matches every
    /// option starting with what precedes it (`MLX5_*`).
    pub options: Vec<String>,
    pub reason: String,
}

#[derive(Debug, Default, Clone)]
pub struct OmittedList {
    groups: Vec<OmittedGroup>,
}

impl OmittedList {
    pub fn parse(text: &str, file: &str) -> anyhow::Result<OmittedList> {
        let parsed: OmittedFile =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let mut groups = Vec::new();
        for (i, mut g) in parsed.omitted.into_iter().enumerate() {
            let n = i + 1;
            if g.reason.trim().is_empty() {
                anyhow::bail!("{file}: [[omitted]] entry {n}: key `reason` is empty; say why kiln leaves these off");
            }
            if g.options.is_empty() {
                anyhow::bail!("{file}: [[omitted]] entry {n}: key `options` is empty");
            }
            for o in &mut g.options {
                *o = o.trim().trim_start_matches("CONFIG_").to_string();
                let stem = o.strip_suffix('*').unwrap_or(o);
                if stem.is_empty() || !stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    anyhow::bail!(
                        "{file}: [[omitted]] entry {n}: key `options`: `{o}` is not an option name (a trailing * is the only pattern)"
                    );
                }
            }
            groups.push(g);
        }
        Ok(OmittedList { groups })
    }

    /// The reason `name` is left off, if it is.
    pub fn reason(&self, name: &str) -> Option<&str> {
        self.groups
            .iter()
            .find(|g| {
                g.options.iter().any(|o| match o.strip_suffix('*') {
                    Some(prefix) => name.starts_with(prefix),
                    None => o == name,
                })
            })
            .map(|g| g.reason.as_str())
    }
}

/// The other side: one `.config`, or every `*.conf` of a directory merged
/// in name order (later files win), as fragment build scripts do.
#[derive(Debug, Default)]
pub struct OtherConfig {
    pub config: ConfigFile,
    /// The files read, for the report.
    pub files: Vec<PathBuf>,
    /// Lines that are not kernel config syntax (skipped).
    pub skipped: Vec<ConfigError>,
}

impl OtherConfig {
    pub fn load(paths: &[PathBuf]) -> anyhow::Result<OtherConfig> {
        let mut out = OtherConfig::default();
        for path in paths {
            let md = std::fs::metadata(path).with_context(|| {
                format!("--compare {}: no such file or directory", path.display())
            })?;
            let files = if md.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "conf"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    anyhow::bail!(
                        "--compare {}: the directory has no *.conf fragments (pass the directory that holds them, or a .config file)",
                        path.display()
                    );
                }
                files
            } else {
                vec![path.clone()]
            };
            for f in files {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                let (parsed, skipped) = ConfigFile::parse_lenient(&text, &f.display().to_string());
                out.config = out.config.overlay(&parsed);
                out.skipped.extend(skipped);
                out.files.push(f);
            }
        }
        Ok(out)
    }
}

fn is_on(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::Yes | Value::Module))
}

/// One option in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffRow {
    pub name: String,
    /// Their value (first two lists) or kiln's (the third).
    pub value: Value,
    /// kiln's value in its built `.config` (None: unset).
    pub kiln: Option<Value>,
    /// Where it is set: their file:line, or kiln's fragment:line.
    pub origin: String,
}

#[derive(Debug, Default)]
pub struct ConfigDiff {
    /// They turn it on, kiln has it off, on purpose: (row, reason).
    pub omitted: Vec<(DiffRow, String)>,
    /// They turn it on, kiln has it off, and nobody decided.
    pub undecided: Vec<DiffRow>,
    /// They turn it on, but kiln's kernel source has no such option (renamed,
    /// removed, or another arch's): nothing to decide.
    pub unknown: Vec<DiffRow>,
    /// kiln's fragments turn it on (and it survived), they leave it off.
    pub kiln_only: Vec<DiffRow>,
    /// On in both.
    pub both_on: usize,
    /// Listed as omitted, yet on in kiln's `.config` (stale list entries).
    pub omitted_but_on: Vec<(String, String)>,
}

/// Compares kiln's built `.config` (`actual`) and requested fragments
/// (`requested`) with `theirs`. `exists` says whether kiln's kernel source
/// (for the arch) defines an option.
pub fn diff(
    actual: &ConfigFile,
    requested: &ConfigFile,
    theirs: &ConfigFile,
    omitted: &OmittedList,
    exists: impl Fn(&str) -> bool,
) -> ConfigDiff {
    let mut d = ConfigDiff::default();
    for (name, s) in &theirs.settings {
        if !is_on(Some(&s.value)) {
            continue;
        }
        let kiln = actual.get(name);
        if is_on(kiln) {
            d.both_on += 1;
            if let Some(reason) = omitted.reason(name) {
                d.omitted_but_on.push((name.clone(), reason.to_string()));
            }
            continue;
        }
        let row = DiffRow {
            name: name.clone(),
            value: s.value.clone(),
            kiln: kiln.cloned(),
            origin: s.origin.to_string(),
        };
        match omitted.reason(name) {
            Some(reason) => d.omitted.push((row, reason.to_string())),
            None if kiln.is_none() && !exists(name) => d.unknown.push(row),
            None => d.undecided.push(row),
        }
    }
    for (name, s) in &requested.settings {
        if is_on(Some(&s.value)) && is_on(actual.get(name)) && !is_on(theirs.get(name)) {
            d.kiln_only.push(DiffRow {
                name: name.clone(),
                value: actual.get(name).cloned().unwrap_or(Value::No),
                kiln: actual.get(name).cloned(),
                origin: s.origin.to_string(),
            });
        }
    }
    d
}

fn short_origin(origin: &str, base: Option<&Path>) -> String {
    match base.and_then(|b| origin.strip_prefix(&format!("{}/", b.display()))) {
        Some(rest) => rest.to_string(),
        None => origin.to_string(),
    }
}

fn kiln_text(v: &Option<Value>) -> String {
    v.as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "unset".into())
}

impl ConfigDiff {
    /// The report: three lists, then the counts. `base` shortens their file
    /// names (the directory given to --compare).
    /// `closest` names kiln's options near each unknown one (renames).
    pub fn render(
        &self,
        kiln_name: &str,
        their_name: &str,
        base: Option<&Path>,
        closest: &BTreeMap<String, Vec<String>>,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "on in {their_name}, off in {kiln_name}, deliberately left off ({}):",
            self.omitted.len()
        );
        let mut by_reason: BTreeMap<&str, Vec<&DiffRow>> = BTreeMap::new();
        for (row, reason) in &self.omitted {
            by_reason.entry(reason).or_default().push(row);
        }
        for (reason, rows) in &by_reason {
            let names: Vec<String> = rows
                .iter()
                .map(|r| format!("CONFIG_{}={}", r.name, r.value))
                .collect();
            let _ = writeln!(out, "  {reason}");
            let _ = writeln!(out, "      {}", names.join(" "));
        }
        let _ = writeln!(
            out,
            "on in {their_name}, off in {kiln_name}, not decided ({}):",
            self.undecided.len()
        );
        for r in &self.undecided {
            let _ = writeln!(
                out,
                "  CONFIG_{}={}  ({kiln_name}: {}; {})",
                r.name,
                r.value,
                kiln_text(&r.kiln),
                short_origin(&r.origin, base)
            );
        }
        let _ = writeln!(
            out,
            "on in {their_name}, not an option of {kiln_name}'s kernel source (renamed, removed or another arch's) ({}):",
            self.unknown.len()
        );
        for r in &self.unknown {
            let near = closest.get(&r.name).filter(|c| !c.is_empty()).map(|c| {
                let names: Vec<String> = c.iter().map(|n| format!("CONFIG_{n}")).collect();
                format!("; closest: {}", names.join(", "))
            });
            let _ = writeln!(
                out,
                "  CONFIG_{}={}  ({}{})",
                r.name,
                r.value,
                short_origin(&r.origin, base),
                near.unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "requested by {kiln_name}'s fragments, off in {their_name} ({}):",
            self.kiln_only.len()
        );
        for r in &self.kiln_only {
            let _ = writeln!(out, "  CONFIG_{}={}  ({})", r.name, r.value, r.origin);
        }
        for (name, reason) in &self.omitted_but_on {
            let _ = writeln!(
                out,
                "note: CONFIG_{name} is on in {kiln_name} but listed as left off (\"{reason}\"); the entry may be stale"
            );
        }
        let _ = writeln!(
            out,
            "{} on in both; {} on only in {their_name} ({} left off on purpose, {} not decided, {} not in {kiln_name}'s kernel); {} requested by {kiln_name} only",
            self.both_on,
            self.omitted.len() + self.undecided.len() + self.unknown.len(),
            self.omitted.len(),
            self.undecided.len(),
            self.unknown.len(),
            self.kiln_only.len()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OMITTED: &str = r#"
[[omitted]]
reason = "vendor NICs: the guest only sees virtio-net"
options = ["CONFIG_MLX5_*", "E1000"]

[[omitted]]
reason = "SELinux: no policy in the guest"
options = ["SECURITY_SELINUX"]
"#;

    fn cfg(text: &str) -> ConfigFile {
        ConfigFile::parse(text, "kiln.conf").unwrap()
    }

    #[test]
    fn omitted_list_matches_names_and_prefixes() {
        let l = OmittedList::parse(OMITTED, "omitted.toml").unwrap();
        assert_eq!(
            l.reason("MLX5_CORE_EN"),
            Some("vendor NICs: the guest only sees virtio-net")
        );
        assert!(l.reason("E1000").is_some());
        assert_eq!(l.reason("E1000E"), None, "no * means the exact name");
        assert_eq!(l.reason("MLX4_CORE"), None);
    }

    #[test]
    fn omitted_list_errors_name_the_entry_and_key() {
        let e = OmittedList::parse(
            "[[omitted]]\nreason = \"\"\noptions = [\"A\"]\n",
            "omitted.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("entry 1") && e.contains("`reason`"), "{e}");
        let e = OmittedList::parse(
            "[[omitted]]\nreason = \"r\"\noptions = [\"A*B\"]\n",
            "omitted.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`A*B`"), "{e}");
        assert!(OmittedList::parse("[[omitted]]\nreason = \"r\"\nopts = []\n", "o").is_err());
    }

    #[test]
    fn fragments_dir_and_dotconfig_load_leniently() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.conf"),
            "CONFIG_A=y\nCONFIG_B=m\nnot a config line\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.conf"),
            "# CONFIG_A is not set\nCONFIG_C=y\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "CONFIG_IGNORED=y\n").unwrap();
        let o = OtherConfig::load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(o.files.len(), 2, "only *.conf files");
        assert_eq!(
            o.config.get("A"),
            Some(&Value::No),
            "the later fragment wins"
        );
        assert_eq!(o.config.get("B"), Some(&Value::Module));
        assert_eq!(o.config.get("IGNORED"), None);
        assert_eq!(o.skipped.len(), 1);
        assert_eq!(o.skipped[0].line, 3);

        let dotconfig = dir.path().join("config-6.1.0-amd64");
        std::fs::write(&dotconfig, "#\n# Automatically generated\nCONFIG_X=y\n").unwrap();
        let o = OtherConfig::load(&[dotconfig]).unwrap();
        assert_eq!(o.config.get("X"), Some(&Value::Yes));

        let empty = tempfile::tempdir().unwrap();
        let e = OtherConfig::load(&[empty.path().to_path_buf()]).unwrap_err();
        assert!(format!("{e:#}").contains("no *.conf"), "{e:#}");
        let e = OtherConfig::load(&[PathBuf::from("/nonexistent/kiln")]).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/kiln"), "{e:#}");
    }

    #[test]
    fn diff_splits_left_off_undecided_and_kiln_only() {
        let omitted = OmittedList::parse(OMITTED, "omitted.toml").unwrap();
        // kiln's final .config and its fragments.
        let actual = cfg("CONFIG_VIRTIO=y\nCONFIG_IPV6=y\nCONFIG_SHARED=y\nCONFIG_E1000=y\n# CONFIG_NUMA is not set\n");
        let requested =
            cfg("CONFIG_VIRTIO=y\nCONFIG_IPV6=y\nCONFIG_SHARED=y\n# CONFIG_GONE is not set\n");
        let (theirs, _) = ConfigFile::parse_lenient(
            "CONFIG_SHARED=y\nCONFIG_MLX5_CORE=y\nCONFIG_SECURITY_SELINUX=y\nCONFIG_NUMA=y\nCONFIG_EXTRA=m\n# CONFIG_IPV6 is not set\nCONFIG_E1000=y\nCONFIG_LOG_BUF_SHIFT=17\nCONFIG_OLD_NAME=y\n",
            "kata/x.conf",
        );
        let d = diff(&actual, &requested, &theirs, &omitted, |n| n != "OLD_NAME");
        let names = |rows: Vec<&DiffRow>| rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(d.omitted.iter().map(|(r, _)| r).collect()),
            ["MLX5_CORE", "SECURITY_SELINUX"]
        );
        assert_eq!(d.omitted[1].1, "SELinux: no policy in the guest");
        assert_eq!(names(d.undecided.iter().collect()), ["EXTRA", "NUMA"]);
        assert_eq!(d.undecided[1].kiln, Some(Value::No));
        assert_eq!(d.undecided[0].origin, "kata/x.conf:5");
        assert_eq!(names(d.kiln_only.iter().collect()), ["IPV6", "VIRTIO"]);
        assert_eq!(d.both_on, 2, "SHARED and E1000");
        assert_eq!(d.omitted_but_on.len(), 1, "E1000 is on in kiln yet listed");
        assert_eq!(names(d.unknown.iter().collect()), ["OLD_NAME"]);

        let closest = BTreeMap::from([("OLD_NAME".to_string(), vec!["NEW_NAME".to_string()])]);
        let text = d.render("kiln", "kata", Some(Path::new("kata")), &closest);
        assert!(text.contains("deliberately left off (2)"), "{text}");
        assert!(
            text.contains("  SELinux: no policy in the guest\n      CONFIG_SECURITY_SELINUX=y"),
            "{text}"
        );
        assert!(
            text.contains("CONFIG_NUMA=y  (kiln: n; x.conf:4)"),
            "{text}"
        );
        assert!(
            text.contains("CONFIG_EXTRA=m  (kiln: unset; x.conf:5)"),
            "{text}"
        );
        assert!(text.contains("CONFIG_IPV6=y  (kiln.conf:2)"), "{text}");
        assert!(text.contains("note: CONFIG_E1000 is on in kiln"), "{text}");
        assert!(
            text.contains("CONFIG_OLD_NAME=y  (x.conf:9; closest: CONFIG_NEW_NAME)"),
            "{text}"
        );
        assert!(
            text.ends_with("2 on in both; 5 on only in kata (2 left off on purpose, 2 not decided, 1 not in kiln's kernel); 2 requested by kiln only\n"),
            "{text}"
        );
    }

    #[test]
    fn the_shipped_omitted_list_parses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../kernel-configs/omitted.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        OmittedList::parse(&text, path).unwrap();
    }
}
