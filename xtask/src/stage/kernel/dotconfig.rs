//! Kernel configuration as data: the `.config` / fragment format, and merging
//! fragments in order.
//!
//! One grammar serves both kinds of file. A line is blank, a `#` comment,
//! `# CONFIG_NAME is not set`, or `CONFIG_NAME=value` where value is `y`, `m`,
//! `n`, a decimal or `0x` number, or a `"string"` (with `\"` and `\\` escapes).
//! Fragments may end a setting line with a `# why` comment; the file kiln hands
//! to Kconfig is rendered from the parsed values, so Kconfig never sees them.
//! Anything else is an error naming the file and line, so a typo never silently
//! turns into "option not requested".

use std::collections::BTreeMap;
use std::fmt;

/// Value of one option. Names are kept without the `CONFIG_` prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Yes,
    Module,
    No,
    /// Decimal (possibly negative) or `0x` hex, as written.
    Num(String),
    Str(String),
}

impl Value {
    /// `n` and "not in the file" mean the same to Kconfig.
    pub fn is_off(&self) -> bool {
        matches!(self, Value::No)
    }

    /// Equality as Kconfig means it: numbers by value (`0x10` = `0x0010`).
    pub fn same_as(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Num(a), Value::Num(b)) => match (parse_num(a), parse_num(b)) {
                (Some(x), Some(y)) => x == y,
                _ => a.eq_ignore_ascii_case(b),
            },
            (a, b) => a == b,
        }
    }

    /// The line Kconfig reads for option `name`.
    pub fn config_line(&self, name: &str) -> String {
        match self {
            Value::No => format!("# CONFIG_{name} is not set"),
            other => format!("CONFIG_{name}={other}"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Yes => f.write_str("y"),
            Value::Module => f.write_str("m"),
            Value::No => f.write_str("n"),
            Value::Num(n) => f.write_str(n),
            Value::Str(s) => write!(f, "\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        }
    }
}

/// Where a setting was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub value: Value,
    pub origin: Origin,
}

/// A parse error that names the file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A parsed `.config` or fragment: option name (no `CONFIG_` prefix) → setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigFile {
    pub settings: BTreeMap<String, Setting>,
}

impl ConfigFile {
    pub fn parse(text: &str, file: &str) -> Result<ConfigFile, ConfigError> {
        let mut settings: BTreeMap<String, Setting> = BTreeMap::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let err = |message: String| ConfigError {
                file: file.to_string(),
                line,
                message,
            };
            let Some((name, value)) = parse_line(raw).map_err(err)? else {
                continue;
            };
            if let Some(prev) = settings.get(&name) {
                return Err(err(format!(
                    "CONFIG_{name} is already set on line {} of this file; set each option once per file",
                    prev.origin.line
                )));
            }
            settings.insert(
                name,
                Setting {
                    value,
                    origin: Origin {
                        file: file.to_string(),
                        line,
                    },
                },
            );
        }
        Ok(ConfigFile { settings })
    }

    /// Parses someone else's configuration (a distro `.config`, another
    /// project's fragments): lines kiln's grammar refuses are skipped and
    /// returned as errors instead of failing the whole file, and a repeated
    /// option keeps its last value, as Kconfig would.
    pub fn parse_lenient(text: &str, file: &str) -> (ConfigFile, Vec<ConfigError>) {
        let mut settings: BTreeMap<String, Setting> = BTreeMap::new();
        let mut skipped = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            match parse_line(raw) {
                Ok(Some((name, value))) => {
                    let origin = Origin {
                        file: file.to_string(),
                        line,
                    };
                    settings.insert(name, Setting { value, origin });
                }
                Ok(None) => {}
                Err(message) => skipped.push(ConfigError {
                    file: file.to_string(),
                    line,
                    message,
                }),
            }
        }
        (ConfigFile { settings }, skipped)
    }

    /// Value of `name`, treating an absent option as absent (not as `n`).
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.settings.get(name).map(|s| &s.value)
    }

    /// Options switched on or given a value (what `.config` sets, not what it leaves off).
    pub fn enabled_count(&self) -> usize {
        self.settings.values().filter(|s| !s.value.is_off()).count()
    }

    /// The file Kconfig reads: one line per option, in name order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, s) in &self.settings {
            out.push_str(&s.value.config_line(name));
            out.push('\n');
        }
        out
    }

    /// `self` with every setting of `top` laid over it (top wins).
    pub fn overlay(&self, top: &ConfigFile) -> ConfigFile {
        let mut settings = self.settings.clone();
        for (name, s) in &top.settings {
            settings.insert(name.clone(), s.clone());
        }
        ConfigFile { settings }
    }
}

/// A later fragment replacing an earlier fragment's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub name: String,
    pub earlier: Setting,
    pub later: Setting,
}

/// Merges fragments in order: a later fragment's value wins. Returns the
/// requested options and the list of overrides (worth telling, rarely wrong).
pub fn merge(fragments: &[ConfigFile]) -> (ConfigFile, Vec<Override>) {
    let mut merged = ConfigFile::default();
    let mut overrides = Vec::new();
    for frag in fragments {
        for (name, s) in &frag.settings {
            if let Some(prev) = merged.settings.insert(name.clone(), s.clone()) {
                overrides.push(Override {
                    name: name.clone(),
                    earlier: prev,
                    later: s.clone(),
                });
            }
        }
    }
    (merged, overrides)
}

/// One line → `None` (blank or comment) or `(name, value)`.
fn parse_line(raw: &str) -> Result<Option<(String, Value)>, String> {
    let line = raw.trim();
    if line.is_empty() {
        return Ok(None);
    }
    if let Some(comment) = line.strip_prefix('#') {
        let body = comment.trim_start();
        let Some(rest) = body.strip_prefix("CONFIG_") else {
            return Ok(None);
        };
        let name_len = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
        let (name, tail) = rest.split_at(name_len);
        let tail = tail.trim_start();
        if let Some(after) = tail.strip_prefix("is not set") {
            if !name.is_empty() && trailing_ok(after) {
                return Ok(Some((name.to_string(), Value::No)));
            }
        }
        return Err(format!(
            "`{line}` looks like a disabled option but is not `# CONFIG_NAME is not set`; \
             write it that way, or reword the comment so it does not start with CONFIG_"
        ));
    }
    let Some(rest) = line.strip_prefix("CONFIG_") else {
        return Err(format!(
            "`{line}` is not a config line: expected `CONFIG_NAME=value`, `# CONFIG_NAME is not set` or a `#` comment"
        ));
    };
    let Some((name, value)) = rest.split_once('=') else {
        return Err(format!(
            "`{line}` has no `=`: write `CONFIG_NAME=y` (or m, n, a number, a \"string\")"
        ));
    };
    if name.is_empty() || !name.chars().all(is_name_char) {
        return Err(format!(
            "`CONFIG_{name}` is not an option name (letters, digits and `_` only)"
        ));
    }
    let value = value.trim_start();
    let (value, after) = if let Some(quoted) = value.strip_prefix('"') {
        let (s, after) = parse_quoted(quoted)
            .ok_or_else(|| format!("CONFIG_{name}: string value has no closing `\"`"))?;
        (Value::Str(s), after)
    } else {
        let end = value.find(char::is_whitespace).unwrap_or(value.len());
        let (token, after) = value.split_at(end);
        let v = match token {
            "y" => Value::Yes,
            "m" => Value::Module,
            "n" => Value::No,
            t if parse_num(t).is_some() => Value::Num(t.to_string()),
            "" => return Err(format!("CONFIG_{name} has an empty value: write y, m, n, a number or \"\"")),
            t => {
                return Err(format!(
                    "CONFIG_{name}={t}: a value is y, m, n, a decimal or 0x number, or a \"quoted string\""
                ))
            }
        };
        (v, after)
    };
    if !trailing_ok(after) {
        return Err(format!(
            "CONFIG_{name}: unexpected `{}` after the value (comments start with `#`)",
            after.trim()
        ));
    }
    Ok(Some((name.to_string(), value)))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Nothing, or whitespace then a `#` comment.
fn trailing_ok(after: &str) -> bool {
    let t = after.trim_start();
    t.is_empty() || (t.starts_with('#') && (after.len() > t.len()))
}

/// Reads a string body after its opening quote; returns it and what follows the closing quote.
fn parse_quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?.1),
            '"' => return Some((out, &s[i + 1..])),
            c => out.push(c),
        }
    }
    None
}

/// Kconfig numbers: decimal with optional sign, or `0x` hex.
pub fn parse_num(s: &str) -> Option<i128> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        // Digits only: `from_str_radix` also takes a sign (`0x+1`).
        if hex.is_empty() || hex.len() > 30 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        return i128::from_str_radix(hex, 16).ok();
    }
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || digits.len() > 30 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(text, "frag.conf")
    }

    #[test]
    fn parses_every_value_kind() {
        let f = parse(concat!(
            "# a comment\n",
            "\n",
            "CONFIG_A=y\n",
            "CONFIG_B=m   # inline why\n",
            "CONFIG_C=n\n",
            "# CONFIG_D is not set\n",
            "#   CONFIG_E is not set  # because\n",
            "CONFIG_F=\"console=ttyS0 \\\"quoted\\\" back\\\\slash\"\n",
            "CONFIG_G=\"\"\n",
            "CONFIG_H=42\n",
            "CONFIG_I=-1\n",
            "CONFIG_J=0x1000 # hex\n",
            "CONFIG_K=\"has # inside\" # and a comment\n",
            "\tCONFIG_L=y\r\n",
        ))
        .unwrap();
        let v = |n: &str| f.get(n).cloned();
        assert_eq!(v("A"), Some(Value::Yes));
        assert_eq!(v("B"), Some(Value::Module));
        assert_eq!(v("C"), Some(Value::No));
        assert_eq!(v("D"), Some(Value::No));
        assert_eq!(v("E"), Some(Value::No));
        assert_eq!(
            v("F"),
            Some(Value::Str("console=ttyS0 \"quoted\" back\\slash".into()))
        );
        assert_eq!(v("G"), Some(Value::Str(String::new())));
        assert_eq!(v("H"), Some(Value::Num("42".into())));
        assert_eq!(v("I"), Some(Value::Num("-1".into())));
        assert_eq!(v("J"), Some(Value::Num("0x1000".into())));
        assert_eq!(v("K"), Some(Value::Str("has # inside".into())));
        assert_eq!(v("L"), Some(Value::Yes));
        assert_eq!(
            f.settings["D"].origin,
            Origin {
                file: "frag.conf".into(),
                line: 6
            }
        );
        assert_eq!(f.enabled_count(), 9);
    }

    #[test]
    fn render_round_trips() {
        let f =
            parse("CONFIG_S=\"a\\\"b\\\\c\"\n# CONFIG_N is not set\nCONFIG_X=0x10\nCONFIG_Y=y\n")
                .unwrap();
        let text = f.render();
        assert_eq!(
            text,
            "# CONFIG_N is not set\nCONFIG_S=\"a\\\"b\\\\c\"\nCONFIG_X=0x10\nCONFIG_Y=y\n"
        );
        let again = parse(&text).unwrap();
        for (name, s) in &f.settings {
            assert_eq!(again.get(name), Some(&s.value), "{name}");
        }
    }

    #[test]
    fn garbage_lines_name_file_and_line() {
        let cases = [
            ("CONFIG_A=y\nFOO=y\n", 2, "not a config line"),
            ("CONFIG_A\n", 1, "no `=`"),
            ("CONFIG_A=yes\n", 1, "CONFIG_A=yes"),
            ("CONFIG_A=\n", 1, "empty value"),
            ("CONFIG_A=\"open\n", 1, "closing"),
            ("CONFIG_A=y trailing\n", 1, "unexpected `trailing`"),
            ("CONFIG_A=y#nospace\n", 1, "CONFIG_A=y#nospace"),
            ("CONFIG_A-B=y\n", 1, "not an option name"),
            ("CONFIG_=y\n", 1, "not an option name"),
            ("# CONFIG_A=y\n", 1, "looks like a disabled option"),
            (
                "# CONFIG_A is not set, really\n",
                1,
                "looks like a disabled option",
            ),
            ("CONFIG_A=y\n\nCONFIG_A=n\n", 3, "already set on line 1"),
            ("CONFIG_A=0x\n", 1, "CONFIG_A=0x"),
            ("CONFIG_A=1.5\n", 1, "CONFIG_A=1.5"),
        ];
        for (text, line, needle) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("frag.conf:{line}: ")), "{msg}");
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }

    #[test]
    fn parser_never_panics_on_odd_input() {
        for text in [
            "#",
            "# CONFIG_",
            "CONFIG_=",
            "CONFIG_A=\"\\",
            "CONFIG_A=\"\\\"",
            "\u{feff}x",
            "CONFIG_A=-",
            "CONFIG_A=0x\u{e9}",
        ] {
            let _ = parse(text);
        }
        assert!(parse("CONFIG_A=99999999999999999999999999999999999999999999\n").is_err());
    }

    #[test]
    fn later_fragment_wins_and_overrides_are_listed() {
        let base = ConfigFile::parse("CONFIG_A=y\nCONFIG_B=y\n", "base.conf").unwrap();
        let arch =
            ConfigFile::parse("# CONFIG_B is not set\nCONFIG_C=\"x\"\n", "arch.conf").unwrap();
        let feat = ConfigFile::parse("CONFIG_C=\"y\"\n", "feat.conf").unwrap();
        let (merged, overrides) = merge(&[base, arch, feat]);
        assert_eq!(merged.get("A"), Some(&Value::Yes));
        assert_eq!(merged.get("B"), Some(&Value::No));
        assert_eq!(merged.get("C"), Some(&Value::Str("y".into())));
        assert_eq!(merged.settings["B"].origin.file, "arch.conf");
        let names: Vec<_> = overrides
            .iter()
            .map(|o| (o.name.as_str(), o.later.origin.file.as_str()))
            .collect();
        assert_eq!(names, vec![("B", "arch.conf"), ("C", "feat.conf")]);
    }

    #[test]
    fn overlay_keeps_base_and_replaces_requested() {
        let base = ConfigFile::parse("# CONFIG_64BIT is not set\nCONFIG_X=y\n", ".config").unwrap();
        let top = ConfigFile::parse("CONFIG_64BIT=y\n", "x86_64/base.conf").unwrap();
        let all = base.overlay(&top);
        assert_eq!(all.render(), "CONFIG_64BIT=y\nCONFIG_X=y\n");
    }

    /// Found while fuzzing (`fuzz/`, kernel_config): `0x+1` was a number.
    #[test]
    fn hex_numbers_are_hex_digits_only() {
        for bad in ["0x+1", "0x-1", "0X+ff"] {
            assert_eq!(parse_num(bad), None, "{bad}");
            assert!(parse(&format!("CONFIG_A={bad}\n")).is_err(), "{bad}");
        }
        assert_eq!(parse_num("0xfF"), Some(255));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(Value::Num("0x10".into()).same_as(&Value::Num("0x0010".into())));
        assert!(Value::Num("16".into()).same_as(&Value::Num("0x10".into())));
        assert!(!Value::Num("1".into()).same_as(&Value::Num("2".into())));
        assert!(!Value::Str("1".into()).same_as(&Value::Num("1".into())));
    }
}
