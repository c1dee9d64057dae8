//! Requested fragments against the final `.config`: every requested option must
//! survive Kconfig, except where `kernel-configs/allowlist.toml` says an option
//! cannot exist on an arch. Failures come with Kconfig's own reason where it can
//! be found (see `kconfig`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Deserialize;

use super::dotconfig::{ConfigFile, Origin, Value};
use super::kconfig::{conjuncts, eval, symbols_in, KconfigIndex, SymbolDef, Tri};
use crate::arch::Arch;

/// Most definitions / selectors named in one hint.
const HINT_LIMIT: usize = 5;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct AllowFile {
    #[serde(default)]
    allow: Vec<AllowEntry>,
}

/// An option that legitimately cannot exist on some arches.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// Option name, with or without the `CONFIG_` prefix.
    pub option: String,
    pub arches: Vec<Arch>,
    pub reason: String,
}

#[derive(Debug, Default, Clone)]
pub struct AllowList {
    entries: Vec<AllowEntry>,
}

impl AllowList {
    pub fn parse(text: &str, file: &str) -> anyhow::Result<AllowList> {
        let parsed: AllowFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let mut entries = Vec::new();
        for (i, mut e) in parsed.allow.into_iter().enumerate() {
            let n = i + 1;
            e.option = e.option.trim().trim_start_matches("CONFIG_").to_string();
            if e.option.is_empty()
                || !e
                    .option
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                anyhow::bail!(
                    "{file}: [[allow]] entry {n}: key `option` = `{}` is not an option name",
                    e.option
                );
            }
            if e.arches.is_empty() {
                anyhow::bail!("{file}: [[allow]] entry {n} (CONFIG_{}): key `arches` is empty; name the arches it cannot exist on", e.option);
            }
            if e.reason.trim().is_empty() {
                anyhow::bail!("{file}: [[allow]] entry {n} (CONFIG_{}): key `reason` is empty; say why the option cannot exist there", e.option);
            }
            entries.push(e);
        }
        Ok(AllowList { entries })
    }

    pub fn find(&self, name: &str, arch: Arch) -> Option<&AllowEntry> {
        self.entries
            .iter()
            .find(|e| e.option == name && e.arches.contains(&arch))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Requested on (or a value), but `.config` has it unset or `n`.
    Dropped,
    /// Present with another value, or on although `n` was requested.
    Changed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub requested: Value,
    pub actual: Option<Value>,
    pub origin: Origin,
    pub status: Status,
    /// Reason from the allow-list when it excuses a failure.
    pub allowed: Option<String>,
}

impl Row {
    pub fn fails(&self) -> bool {
        self.status != Status::Ok && self.allowed.is_none()
    }

    fn actual_text(&self) -> String {
        match &self.actual {
            None => "(unset)".into(),
            Some(v) => v.to_string(),
        }
    }

    fn status_text(&self) -> &'static str {
        match (self.status, &self.allowed) {
            (Status::Ok, _) => "ok",
            (_, Some(_)) => "allowed",
            (Status::Dropped, None) => "DROPPED",
            (Status::Changed, None) => "CHANGED",
        }
    }
}

#[derive(Debug, Default)]
pub struct Comparison {
    pub rows: Vec<Row>,
    /// Allow-list entries for this arch whose option came through fine after all.
    pub stale_allows: Vec<String>,
}

impl Comparison {
    pub fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.fails()).collect()
    }

    pub fn allowed(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.allowed.is_some()).collect()
    }
}

/// Checks every requested option against the final `.config`.
pub fn compare(
    requested: &ConfigFile,
    actual: &ConfigFile,
    allow: &AllowList,
    arch: Arch,
) -> Comparison {
    let mut out = Comparison::default();
    for (name, want) in &requested.settings {
        let got = actual.get(name).cloned();
        let status = match (&want.value, &got) {
            (Value::No, None | Some(Value::No)) => Status::Ok,
            (Value::No, Some(_)) => Status::Changed,
            (_, None | Some(Value::No)) => Status::Dropped,
            (w, Some(g)) if w.same_as(g) => Status::Ok,
            _ => Status::Changed,
        };
        let entry = allow.find(name, arch);
        if status == Status::Ok && entry.is_some() {
            out.stale_allows.push(name.clone());
        }
        let allowed = entry
            .filter(|_| status != Status::Ok)
            .map(|e| e.reason.clone());
        out.rows.push(Row {
            name: name.clone(),
            requested: want.value.clone(),
            actual: got,
            origin: want.origin.clone(),
            status,
            allowed,
        });
    }
    out
}

/// What is known when explaining failures: the Kconfig tree, the final
/// `.config` and the request.
pub struct Explainer<'a> {
    pub index: &'a KconfigIndex,
    /// Every symbol of every arch → its defining files.
    pub everywhere: &'a BTreeMap<String, BTreeSet<String>>,
    pub actual: &'a ConfigFile,
    pub requested: &'a ConfigFile,
    /// Kconfig's SRCARCH (x86, arm64, powerpc, s390).
    pub srcarch: &'a str,
}

/// How far `why_off` follows a chain of unmet dependencies.
const CHAIN_DEPTH: usize = 4;

impl Explainer<'_> {
    /// Why `row` failed, in Kconfig's words where they can be found.
    pub fn explain(&self, row: &Row) -> Vec<String> {
        let name = &row.name;
        let Some(defs) = self.index.defs.get(name) else {
            return self.not_a_symbol(name);
        };
        if row.requested.is_off() {
            return explain_forced_on(name, defs, self.index, self.actual);
        }
        let mut hints = Vec::new();
        for def in defs.iter().take(HINT_LIMIT) {
            let at = format!("{}:{}", def.file, def.line);
            let unmet = self.conjuncts_at(def, Tri::N);
            let limiting = self.conjuncts_at(def, Tri::M);
            if !unmet.is_empty() {
                let parts: Vec<String> = unmet.iter().map(|p| self.describe_chain(p)).collect();
                hints.push(format!("unmet dependency ({at}): {}", parts.join("; ")));
            } else if !limiting.is_empty() && row.requested == Value::Yes {
                let parts: Vec<String> =
                    limiting.iter().map(|p| describe(p, self.actual)).collect();
                hints.push(format!("limited to m by ({at}): {}", parts.join("; ")));
            } else if !def.has_prompt && matches!(row.requested, Value::Num(_) | Value::Str(_)) {
                hints.push(format!(
                    "CONFIG_{name} has no prompt ({at}): its value comes from the `default` lines there; request the options they test instead"
                ));
            } else if !def.has_prompt {
                hints.push(format!(
                    "CONFIG_{name} has no prompt ({at}): only a `select` or a default turns it on; {}",
                    selectors(name, self.index, self.actual)
                ));
            } else if matches!(row.requested, Value::Num(_) | Value::Str(_)) {
                hints.push(format!(
                    "Kconfig replaced the value: check the option's `range` and type at {at}"
                ));
            } else {
                hints.push(format!(
                    "its dependencies are met ({at}); it may be one side of a `choice` where another side is chosen"
                ));
            }
        }
        hints
    }

    fn not_a_symbol(&self, name: &str) -> Vec<String> {
        let mut hints = Vec::new();
        match self.everywhere.get(name) {
            Some(files) => hints.push(format!(
                "CONFIG_{name} does not exist for ARCH={}: it is only defined in {}",
                self.srcarch,
                files
                    .iter()
                    .take(HINT_LIMIT)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => hints.push(format!(
                "CONFIG_{name} is not a Kconfig symbol of this kernel source"
            )),
        }
        let close = self.index.closest(name, 3);
        if !close.is_empty() {
            let list: Vec<String> = close.iter().map(|c| format!("CONFIG_{c}")).collect();
            hints.push(format!("did you mean {}?", list.join(", ")));
        }
        hints
    }

    /// The `&&` parts of `def`'s conditions that evaluate to exactly `level`.
    fn conjuncts_at(&self, def: &SymbolDef, level: Tri) -> Vec<String> {
        def.conditions
            .iter()
            .flat_map(|c| conjuncts(c))
            .filter(|part| eval(part, self.actual) == Some(level))
            .collect()
    }

    /// An unmet part, and for a lone symbol the chain of reasons it is off:
    /// "`BLK_DEV` (BLK_DEV=n) <- CONFIG_BLK_DEV needs `BLOCK` (BLOCK=n) <- CONFIG_BLOCK is requested n at …".
    fn describe_chain(&self, part: &str) -> String {
        let mut out = describe(part, self.actual);
        let mut current = part.trim().to_string();
        for _ in 0..CHAIN_DEPTH {
            if !is_symbol(&current) {
                break;
            }
            let (step, next) = self.why_off(&current);
            out.push_str(" <- ");
            out.push_str(&step);
            match next {
                Some(n) => current = n,
                None => break,
            }
        }
        out
    }

    /// One step of `describe_chain`: why `sym` is off, and the next lone
    /// symbol to follow, if any.
    fn why_off(&self, sym: &str) -> (String, Option<String>) {
        if let Some(s) = self.requested.settings.get(sym) {
            if s.value.is_off() {
                return (format!("CONFIG_{sym} is requested n at {}", s.origin), None);
            }
        }
        let Some(def) = self.index.defs.get(sym).and_then(|d| d.first()) else {
            return (
                format!("CONFIG_{sym} does not exist for ARCH={}", self.srcarch),
                None,
            );
        };
        let unmet = self.conjuncts_at(def, Tri::N);
        if let Some(first) = unmet.first() {
            let parts: Vec<String> = unmet.iter().map(|p| describe(p, self.actual)).collect();
            let next = is_symbol(first.trim()).then(|| first.trim().to_string());
            return (format!("CONFIG_{sym} needs {}", parts.join(" and ")), next);
        }
        if def.has_prompt {
            (format!("request CONFIG_{sym}=y"), None)
        } else {
            (
                format!(
                    "CONFIG_{sym} has no prompt; {}",
                    selectors(sym, self.index, self.actual)
                ),
                None,
            )
        }
    }
}

fn is_symbol(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !matches!(s, "y" | "m" | "n")
}

fn explain_forced_on(
    name: &str,
    defs: &[SymbolDef],
    index: &KconfigIndex,
    actual: &ConfigFile,
) -> Vec<String> {
    let on: Vec<String> = index
        .selected_by
        .get(name)
        .map(|sel| {
            sel.iter()
                .filter(|s| matches!(actual.get(&s.by), Some(Value::Yes | Value::Module)))
                .take(HINT_LIMIT)
                .map(|s| format!("CONFIG_{}", s.by))
                .collect()
        })
        .unwrap_or_default();
    if !on.is_empty() {
        return vec![format!(
            "forced on by `select` from {}; turn those off or drop the `n` request",
            on.join(", ")
        )];
    }
    let at: Vec<String> = defs
        .iter()
        .take(HINT_LIMIT)
        .map(|d| format!("{}:{}", d.file, d.line))
        .collect();
    vec![format!(
        "turned on by a default or a `select` kiln could not see (has_prompt = {}; defined at {})",
        defs.iter().any(|d| d.has_prompt),
        at.join(", ")
    )]
}

/// `PCI && X86` → "`PCI && X86` (PCI=n, X86=y)".
fn describe(part: &str, actual: &ConfigFile) -> String {
    let values: Vec<String> = symbols_in(part)
        .into_iter()
        .map(|s| {
            let v = actual
                .get(&s)
                .map(Value::to_string)
                .unwrap_or_else(|| "n".into());
            format!("{s}={v}")
        })
        .collect();
    if values.is_empty() {
        format!("`{part}`")
    } else {
        format!("`{part}` ({})", values.join(", "))
    }
}

fn selectors(name: &str, index: &KconfigIndex, actual: &ConfigFile) -> String {
    match index.selected_by.get(name) {
        None => "nothing selects it".into(),
        Some(sel) => {
            let mut names: Vec<String> = sel
                .iter()
                .take(HINT_LIMIT)
                .map(|s| {
                    let v = actual
                        .get(&s.by)
                        .map(Value::to_string)
                        .unwrap_or_else(|| "n".into());
                    match &s.cond {
                        Some(c) => format!("CONFIG_{} (={v}) if {c}", s.by),
                        None => format!("CONFIG_{} (={v})", s.by),
                    }
                })
                .collect();
            if sel.len() > HINT_LIMIT {
                names.push(format!("and {} more", sel.len() - HINT_LIMIT));
            }
            format!("selected by {}", names.join(", "))
        }
    }
}

/// A fixed-width table of `rows`, each followed by its hints.
pub fn render_table(rows: &[&Row], hints: &BTreeMap<String, Vec<String>>) -> String {
    let head = ["OPTION", "REQUESTED", "ACTUAL", "STATUS", "FROM"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                format!("CONFIG_{}", r.name),
                r.requested.to_string(),
                r.actual_text(),
                r.status_text().to_string(),
                r.origin.to_string(),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, cell) in width.iter_mut().zip(c.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: [&str; 5]| {
        let _ = writeln!(
            out,
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3]
        );
    };
    line(&mut out, head);
    for (row, c) in rows.iter().zip(&cells) {
        line(&mut out, [&c[0], &c[1], &c[2], &c[3], &c[4]]);
        if let Some(reason) = &row.allowed {
            let _ = writeln!(out, "      allowed: {reason}");
        }
        for h in hints.get(&row.name).into_iter().flatten() {
            let _ = writeln!(out, "      -> {h}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str, file: &str) -> ConfigFile {
        ConfigFile::parse(text, file).unwrap()
    }

    const REQUESTED: &str = concat!(
        "CONFIG_KEPT=y\n",
        "CONFIG_GONE=y\n",
        "CONFIG_MOD=y\n",
        "CONFIG_STR=\"ttyS0\"\n",
        "CONFIG_NUM=0x10\n",
        "# CONFIG_OFF_ABSENT is not set\n",
        "# CONFIG_OFF_N is not set\n",
        "# CONFIG_OFF_ON is not set\n",
        "CONFIG_ARCHLESS=y\n",
    );
    const ACTUAL: &str = concat!(
        "CONFIG_KEPT=y\n",
        "# CONFIG_GONE is not set\n",
        "CONFIG_MOD=m\n",
        "CONFIG_STR=\"hvc0\"\n",
        "CONFIG_NUM=16\n",
        "# CONFIG_OFF_N is not set\n",
        "CONFIG_OFF_ON=y\n",
    );

    fn status_of(c: &Comparison, name: &str) -> (Status, Option<String>) {
        let r = c.rows.iter().find(|r| r.name == name).unwrap();
        (r.status, r.allowed.clone())
    }

    #[test]
    fn compares_every_kind_of_request() {
        let req = cfg(REQUESTED, "base.conf");
        let act = cfg(ACTUAL, ".config");
        let c = compare(&req, &act, &AllowList::default(), Arch::X86_64);
        assert_eq!(status_of(&c, "KEPT").0, Status::Ok);
        assert_eq!(status_of(&c, "GONE").0, Status::Dropped);
        assert_eq!(status_of(&c, "ARCHLESS").0, Status::Dropped);
        assert_eq!(status_of(&c, "MOD").0, Status::Changed);
        assert_eq!(status_of(&c, "STR").0, Status::Changed);
        assert_eq!(status_of(&c, "NUM").0, Status::Ok, "0x10 = 16");
        assert_eq!(
            status_of(&c, "OFF_ABSENT").0,
            Status::Ok,
            "n is satisfied by unset"
        );
        assert_eq!(status_of(&c, "OFF_N").0, Status::Ok);
        assert_eq!(status_of(&c, "OFF_ON").0, Status::Changed);
        let failing: Vec<_> = c.failures().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(failing, vec!["ARCHLESS", "GONE", "MOD", "OFF_ON", "STR"]);

        let table = render_table(&c.failures(), &BTreeMap::new());
        let gone = table.lines().find(|l| l.contains("CONFIG_GONE ")).unwrap();
        assert!(
            gone.contains("DROPPED") && gone.contains(" n ") && gone.contains("base.conf:2"),
            "{table}"
        );
        let archless = table
            .lines()
            .find(|l| l.contains("CONFIG_ARCHLESS"))
            .unwrap();
        assert!(archless.contains("(unset)"), "{table}");
        let s = table.lines().find(|l| l.contains("CONFIG_STR")).unwrap();
        assert!(
            s.contains("\"ttyS0\"") && s.contains("\"hvc0\"") && s.contains("CHANGED"),
            "{table}"
        );
    }

    #[test]
    fn allow_list_excuses_only_its_arches() {
        let allow = AllowList::parse(
            r#"
[[allow]]
option = "CONFIG_ARCHLESS"
arches = ["s390x", "x86_64"]
reason = "no such hardware there"

[[allow]]
option = "KEPT"
arches = ["x86_64"]
reason = "was needed once"
"#,
            "allowlist.toml",
        )
        .unwrap();
        let req = cfg(REQUESTED, "base.conf");
        let act = cfg(ACTUAL, ".config");
        let c = compare(&req, &act, &allow, Arch::X86_64);
        assert_eq!(
            status_of(&c, "ARCHLESS"),
            (Status::Dropped, Some("no such hardware there".into()))
        );
        assert!(!c.failures().iter().any(|r| r.name == "ARCHLESS"));
        assert_eq!(c.allowed().len(), 1);
        assert_eq!(c.stale_allows, vec!["KEPT"]);
        let table = render_table(&c.allowed(), &BTreeMap::new());
        assert!(table.contains("allowed: no such hardware there"), "{table}");

        let c = compare(&req, &act, &allow, Arch::Aarch64);
        assert!(
            c.failures().iter().any(|r| r.name == "ARCHLESS"),
            "aarch64 is not listed"
        );
        assert!(c.stale_allows.is_empty());
    }

    #[test]
    fn allow_list_errors_name_the_entry() {
        let err = AllowList::parse(
            "[[allow]]\noption = \"X\"\narches = []\nreason = \"r\"\n",
            "a.toml",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("entry 1 (CONFIG_X): key `arches`"),
            "{err}"
        );
        let err = AllowList::parse(
            "[[allow]]\noption = \"X\"\narches = [\"x86_64\"]\nreason = \" \"\n",
            "a.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("`reason`"), "{err}");
        let err = AllowList::parse(
            "[[allow]]\noption = \"X-Y\"\narches = [\"x86_64\"]\nreason = \"r\"\n",
            "a.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not an option name"), "{err}");
        let err = AllowList::parse(
            "[[allow]]\noption = \"X\"\narches = [\"mips\"]\nreason = \"r\"\n",
            "a.toml",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("a.toml") && err.to_string().contains("mips"),
            "{err}"
        );
        let err = AllowList::parse("[[allow]]\noptin = \"X\"\n", "a.toml").unwrap_err();
        assert!(err.to_string().contains("optin"), "{err}");
        assert!(AllowList::parse("# nothing allowed yet\n", "a.toml")
            .unwrap()
            .entries
            .is_empty());
    }

    fn index() -> KconfigIndex {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("Kconfig"), "source \"drivers/Kconfig\"\n").unwrap();
        std::fs::create_dir_all(root.join("drivers")).unwrap();
        std::fs::write(
            root.join("drivers/Kconfig"),
            concat!(
                "config PCI\n\tbool \"PCI\"\n\n",
                "config VIRTIO\n\ttristate\n\n",
                "config VIRTIO_PCI\n\ttristate \"virtio pci\"\n\tdepends on PCI && (X86 || ARM64)\n\tselect VIRTIO\n\n",
                "config VIRTIO_MENU\n\tbool \"virtio menu\"\n\n",
                "config GONE\n\ttristate \"mod only\"\n\tdepends on VIRTIO_MENU\n\n",
                "config OFF_ON\n\tbool\n\n",
                "config HZ\n\tint\n\tdefault 250\n\n",
                "config PICKER\n\tbool \"picks\"\n\tselect OFF_ON\n\n",
                "config BLOCK\n\tbool \"block layer\"\n\n",
                "menuconfig BLK_DEV\n\tbool \"block devices\"\n\tdepends on BLOCK\n\n",
                "config VIRTIO_BLK\n\ttristate \"virtio block\"\n\tdepends on BLK_DEV\n",
            ),
        )
        .unwrap();
        KconfigIndex::load(root, "x86")
    }

    fn row(name: &str, requested: Value, actual: Option<Value>, status: Status) -> Row {
        Row {
            name: name.into(),
            requested,
            actual,
            origin: Origin {
                file: "f".into(),
                line: 1,
            },
            status,
            allowed: None,
        }
    }

    #[test]
    fn explains_dropped_options_with_their_dependencies() {
        let idx = index();
        let everywhere: BTreeMap<String, BTreeSet<String>> = [(
            "ARM_AMBA".to_string(),
            BTreeSet::from(["arch/arm64/Kconfig".to_string()]),
        )]
        .into();
        let act = cfg(
            "# CONFIG_PCI is not set\nCONFIG_X86=y\nCONFIG_VIRTIO_MENU=m\nCONFIG_PICKER=y\nCONFIG_OFF_ON=y\n",
            ".config",
        );
        let req = cfg("# CONFIG_BLOCK is not set\n", "base.conf");
        let ex = Explainer {
            index: &idx,
            everywhere: &everywhere,
            actual: &act,
            requested: &req,
            srcarch: "x86",
        };
        let explain = |name: &str, want: Value, got: Option<Value>, status: Status| {
            ex.explain(&row(name, want, got, status))
        };

        let h = explain("VIRTIO_PCI", Value::Yes, None, Status::Dropped);
        assert_eq!(
            h,
            vec!["unmet dependency (drivers/Kconfig:7): `PCI` (PCI=n) <- request CONFIG_PCI=y"]
        );

        let h = explain("VIRTIO_BLK", Value::Yes, None, Status::Dropped);
        assert_eq!(
            h,
            vec![
                "unmet dependency (drivers/Kconfig:37): `BLK_DEV` (BLK_DEV=n) <- CONFIG_BLK_DEV needs `BLOCK` (BLOCK=n) \
                 <- CONFIG_BLOCK is requested n at base.conf:1"
            ]
        );

        let h = explain("GONE", Value::Yes, Some(Value::Module), Status::Changed);
        assert!(
            h[0].starts_with("limited to m") && h[0].contains("VIRTIO_MENU=m"),
            "{h:?}"
        );

        let h = explain("VIRTIO", Value::Yes, None, Status::Dropped);
        assert!(
            h[0].contains("no prompt") && h[0].contains("CONFIG_VIRTIO_PCI (=n)"),
            "{h:?}"
        );

        let h = explain(
            "HZ",
            Value::Num("1000".into()),
            Some(Value::Num("250".into())),
            Status::Changed,
        );
        assert!(
            h[0].contains("value comes from the `default` lines"),
            "{h:?}"
        );

        let h = explain("OFF_ON", Value::No, Some(Value::Yes), Status::Changed);
        assert!(
            h[0].contains("forced on by `select` from CONFIG_PICKER"),
            "{h:?}"
        );

        let h = explain("VIRTIO_PIC", Value::Yes, None, Status::Dropped);
        assert_eq!(
            h,
            vec![
                "CONFIG_VIRTIO_PIC is not a Kconfig symbol of this kernel source",
                "did you mean CONFIG_VIRTIO_PCI, CONFIG_VIRTIO_BLK?"
            ]
        );

        let h = explain("ARM_AMBA", Value::Yes, None, Status::Dropped);
        assert!(
            h[0].contains("does not exist for ARCH=x86") && h[0].contains("arch/arm64/Kconfig"),
            "{h:?}"
        );
    }
}

/// Against the real kernel source (extracted in the cache by an earlier
/// build): a fragment with a misspelt option and one whose dependency is off
/// fails the kernel stage at configuration time (nothing is compiled), and
/// the message names both options, the closest real symbol and the unmet
/// dependency as Kconfig states it.
#[cfg(test)]
mod real_source_tests {
    use crate::arch::Arch;
    use crate::ctx::Ctx;
    use crate::stage::kernel;

    #[test]
    #[ignore = "configures the real kernel source; run by `cargo xtask test`"]
    fn misspelt_and_dependency_less_options_fail_by_name() {
        let ctx = Ctx::for_tests();
        let dir = tempfile::tempdir().unwrap();
        let frag = dir.path().join("broken.conf");
        std::fs::write(
            &frag,
            "CONFIG_VIRTIO_FSS=y     # misspelt VIRTIO_FS\n\
             CONFIG_USB_STORAGE=y    # depends on USB (and SCSI), which nothing turns on\n",
        )
        .unwrap();
        let image = crate::image_spec::ImageSpec::load(&ctx, "minimal").unwrap();
        let mut req = kernel::KernelRequest::for_image(&ctx, &image, Arch::X86_64, None).unwrap();
        req.fragments.push(frag);
        let err = format!("{:#}", kernel::build(&ctx, &req).unwrap_err());
        eprintln!("{err}");
        assert!(
            err.contains("2 of") && err.contains("did not survive Kconfig"),
            "{err}"
        );
        assert!(
            err.contains("CONFIG_VIRTIO_FSS") && err.contains("not a Kconfig symbol"),
            "{err}"
        );
        assert!(
            err.contains("did you mean") && err.contains("CONFIG_VIRTIO_FS"),
            "{err}"
        );
        assert!(
            err.contains("CONFIG_USB_STORAGE") && err.contains("unmet dependency"),
            "{err}"
        );
        assert!(
            err.contains("drivers/usb/storage/Kconfig") && err.contains("`USB`"),
            "{err}"
        );
    }
}
