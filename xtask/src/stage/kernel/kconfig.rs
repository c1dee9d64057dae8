//! Just enough of the Kconfig language to explain why an option did not make it
//! into `.config`: where each symbol is defined, the conditions it depends on
//! (its own `depends on` lines, a conditional prompt, and enclosing `if`, `menu`
//! and `choice` blocks), whether it has a prompt, and who `select`s it.
//!
//! The walk starts at the top-level `Kconfig` and follows `source` lines with
//! `$(SRCARCH)` substituted, as Kconfig does, so only the chosen arch's
//! definitions count. This is a diagnostic aid, not a second Kconfig: anything
//! it cannot read is skipped, and it never decides whether a build passes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::dotconfig::{parse_num, ConfigFile, Value};

/// Source nesting deeper than this is treated as a loop and cut off.
const MAX_SOURCE_DEPTH: usize = 32;
/// Expression nesting deeper than this is treated as unreadable.
const MAX_EXPR_DEPTH: usize = 64;

/// One `config`/`menuconfig` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolDef {
    /// Path relative to the source tree, and line of the `config` line.
    pub file: String,
    pub line: usize,
    /// Every condition that must hold for the option to be settable.
    pub conditions: Vec<String>,
    /// False for `def_bool`-style symbols that only defaults or `select` can set.
    pub has_prompt: bool,
}

/// A `select NAME [if COND]` line in the block of `by`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub by: String,
    pub cond: Option<String>,
}

#[derive(Debug, Default)]
pub struct KconfigIndex {
    pub defs: BTreeMap<String, Vec<SymbolDef>>,
    pub selected_by: BTreeMap<String, Vec<Selector>>,
}

#[derive(Debug)]
enum Frame {
    If(String),
    /// `menu` or `choice`, with the `depends on` lines that follow it.
    Block(Vec<String>),
}

enum Target {
    None,
    Symbol(String, usize),
    Frame,
}

struct Walker<'a> {
    root: &'a Path,
    srcarch: &'a str,
    index: KconfigIndex,
    frames: Vec<Frame>,
}

impl KconfigIndex {
    /// Reads the Kconfig tree at `root` as seen for `SRCARCH=srcarch`.
    pub fn load(root: &Path, srcarch: &str) -> KconfigIndex {
        let mut w = Walker {
            root,
            srcarch,
            index: KconfigIndex::default(),
            frames: Vec::new(),
        };
        w.file(&root.join("Kconfig"), 0);
        w.index
    }

    /// Suggestions for a name that is not a symbol (see [`closest`]).
    pub fn closest(&self, name: &str, max: usize) -> Vec<String> {
        closest(name, self.defs.keys().map(String::as_str), max)
    }
}

/// Whether `line` belongs to the help text being read. `help` is Some while
/// inside one: Some(indent of its first line) once seen. As in Kconfig's
/// lexer, the text ends at a line indented less than its first.
fn in_help_text(help: &mut Option<Option<usize>>, line: &str) -> bool {
    let Some(first) = *help else {
        return false;
    };
    let width = indent_width(line);
    if line.trim().is_empty() {
        return true;
    }
    match first {
        None if width > 0 => {
            *help = Some(Some(width));
            true
        }
        Some(first) if width >= first => true,
        _ => {
            *help = None;
            false
        }
    }
}

impl Walker<'_> {
    fn file(&mut self, path: &Path, depth: usize) {
        if depth > MAX_SOURCE_DEPTH {
            return;
        }
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let rel = path
            .strip_prefix(self.root)
            .unwrap_or(path)
            .display()
            .to_string();
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let frames_at_entry = self.frames.len();
        let mut target = Target::None;
        // Inside help text: see in_help_text.
        let mut help: Option<Option<usize>> = None;
        for (line_no, line) in logical_lines(&text) {
            if in_help_text(&mut help, &line) {
                continue;
            }
            let stripped = strip_comment(&line);
            let trimmed = stripped.trim();
            if trimmed.is_empty() {
                continue;
            }
            let (keyword, rest) = split_word(trimmed);
            match keyword {
                "config" | "menuconfig" => {
                    let name = rest.trim().to_string();
                    let def = SymbolDef {
                        file: rel.clone(),
                        line: line_no,
                        conditions: self.enclosing(),
                        has_prompt: false,
                    };
                    let defs = self.index.defs.entry(name.clone()).or_default();
                    defs.push(def);
                    target = Target::Symbol(name, defs.len() - 1);
                }
                "choice" => {
                    self.frames.push(Frame::Block(Vec::new()));
                    target = Target::Frame;
                }
                "menu" => {
                    self.frames.push(Frame::Block(Vec::new()));
                    target = Target::Frame;
                }
                "if" => {
                    self.frames.push(Frame::If(squash_spaces(rest)));
                    target = Target::None;
                }
                "endchoice" | "endmenu" | "endif" => {
                    if self.frames.len() > frames_at_entry {
                        self.frames.pop();
                    }
                    target = Target::None;
                }
                "comment" | "mainmenu" => target = Target::None,
                "source" | "osource" | "rsource" | "orsource" => {
                    target = Target::None;
                    if let Some(p) = self.source_path(keyword, rest, &dir) {
                        self.file(&p, depth + 1);
                    }
                }
                "depends" => {
                    let cond = rest
                        .trim()
                        .strip_prefix("on")
                        .map(str::trim)
                        .unwrap_or_default()
                        .to_string();
                    if !cond.is_empty() {
                        self.add_condition(&target, cond);
                    }
                }
                "bool" | "tristate" | "string" | "int" | "hex" | "prompt" => {
                    self.type_or_prompt(&target, keyword, rest)
                }
                "select" => {
                    if let Target::Symbol(by, _) = &target {
                        self.select(by, rest);
                    }
                }
                "help" | "---help---" => help = Some(None),
                _ => {}
            }
        }
        // An unbalanced file must not leak its blocks into the next one.
        self.frames.truncate(frames_at_entry);
    }

    /// A type (`bool "Prompt"`) or `prompt` line: marks the symbol as
    /// prompted and adds the prompt's `if` condition.
    fn type_or_prompt(&mut self, target: &Target, keyword: &str, rest: &str) {
        let rest = rest.trim();
        if keyword == "prompt" || rest.starts_with('"') || rest.starts_with('\'') {
            if let Target::Symbol(name, i) = target {
                if let Some(def) = self.def_mut(name, *i) {
                    def.has_prompt = true;
                }
            }
            if let Some(cond) = prompt_condition(rest) {
                self.add_condition(target, cond);
            }
        }
    }

    /// `select SYM [if COND]` in symbol `by`.
    fn select(&mut self, by: &str, rest: &str) {
        let (sym, cond) = match rest.split_once(" if ") {
            Some((s, c)) => (s.trim(), Some(c.trim().to_string())),
            None => (rest.trim(), None),
        };
        if !sym.is_empty() {
            self.index
                .selected_by
                .entry(sym.to_string())
                .or_default()
                .push(Selector {
                    by: by.to_string(),
                    cond,
                });
        }
    }

    fn enclosing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in &self.frames {
            match f {
                Frame::If(c) => out.push(c.clone()),
                Frame::Block(cs) => out.extend(cs.iter().cloned()),
            }
        }
        out
    }

    fn def_mut(&mut self, name: &str, i: usize) -> Option<&mut SymbolDef> {
        self.index.defs.get_mut(name).and_then(|d| d.get_mut(i))
    }

    fn add_condition(&mut self, target: &Target, cond: String) {
        let cond = squash_spaces(&cond);
        match target {
            Target::Symbol(name, i) => {
                if let Some(def) = self.def_mut(name, *i) {
                    def.conditions.push(cond);
                }
            }
            Target::Frame => {
                if let Some(Frame::Block(cs)) = self.frames.last_mut() {
                    cs.push(cond);
                }
            }
            Target::None => {}
        }
    }

    fn source_path(&self, keyword: &str, rest: &str, dir: &Path) -> Option<PathBuf> {
        let quoted = rest.trim().trim_matches('"');
        let path = quoted.replace("$(SRCARCH)", self.srcarch);
        if path.contains("$(") || path.is_empty() {
            return None; // a macro we do not model (e.g. um's HEADER_ARCH)
        }
        // `osource`/`orsource` are the optional forms; a missing file is skipped either way.
        let base = keyword.strip_prefix('o').unwrap_or(keyword);
        Some(if base == "rsource" {
            dir.join(path)
        } else {
            self.root.join(path)
        })
    }
}

/// `"prompt text" if COND` → COND.
fn prompt_condition(rest: &str) -> Option<String> {
    let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let body = &rest[1..];
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            c if c == quote && !escaped => {
                let after = body[i + 1..].trim();
                return after
                    .strip_prefix("if")
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty());
            }
            _ => escaped = false,
        }
    }
    None
}

/// Lines with `\` continuations joined, numbered by their first physical line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(cont) = line.strip_suffix('\\') {
            acc.push_str(cont);
            acc.push(' ');
            pending = Some((start, acc));
        } else {
            acc.push_str(line);
            out.push((start, acc));
        }
    }
    if let Some(p) = pending {
        out.push(p);
    }
    out
}

fn squash_spaces(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn indent_width(line: &str) -> usize {
    let mut w = 0;
    for c in line.chars() {
        match c {
            ' ' => w += 1,
            '\t' => w = (w / 8 + 1) * 8,
            _ => break,
        }
    }
    w
}

/// Drops a `#` comment that is not inside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (_, '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (None, '"' | '\'') if !escaped => quote = Some(c),
            (Some(q), c) if c == q && !escaped => quote = None,
            (None, '#') => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

fn split_word(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// Every `config NAME` anywhere under `root` (all arches), for telling "this
/// symbol exists, but not for your arch" apart from "no such symbol".
pub fn scan_all_definitions(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let walker = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git");
    for entry in walker.flatten() {
        if !entry.file_type().is_file()
            || !entry.file_name().to_string_lossy().starts_with("Kconfig")
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap_or(entry.path())
            .display()
            .to_string();
        for line in text.lines() {
            let (kw, rest) = split_word(line.trim());
            if kw == "config" || kw == "menuconfig" {
                let name = rest.trim();
                if !name.is_empty() {
                    out.entry(name.to_string()).or_default().insert(rel.clone());
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Expressions

/// Kconfig's three-valued logic: n < m < y.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tri {
    N,
    M,
    Y,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Not,
    And,
    Or,
    Cmp(&'static str),
    Word(String),
    Quoted(String),
    /// `$(...)`: a toolchain or environment test we do not run.
    Macro,
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                toks.push(Tok::LParen);
                i += 1
            }
            ')' => {
                toks.push(Tok::RParen);
                i += 1
            }
            '&' if next == Some('&') => {
                toks.push(Tok::And);
                i += 2
            }
            '|' if next == Some('|') => {
                toks.push(Tok::Or);
                i += 2
            }
            '!' if next == Some('=') => {
                toks.push(Tok::Cmp("!="));
                i += 2
            }
            '!' => {
                toks.push(Tok::Not);
                i += 1
            }
            '=' => {
                toks.push(Tok::Cmp("="));
                i += 1
            }
            '<' | '>' => {
                let op = match (c, next) {
                    ('<', Some('=')) => "<=",
                    ('>', Some('=')) => ">=",
                    ('<', _) => "<",
                    _ => ">",
                };
                i += op.len();
                toks.push(Tok::Cmp(op));
            }
            '"' | '\'' => {
                let mut j = i + 1;
                let mut s = String::new();
                while j < chars.len() && chars[j] != c {
                    if chars[j] == '\\' {
                        j += 1;
                    }
                    if let Some(ch) = chars.get(j) {
                        s.push(*ch);
                    }
                    j += 1;
                }
                if j >= chars.len() {
                    return None;
                }
                toks.push(Tok::Quoted(s));
                i = j + 1;
            }
            '$' if next == Some('(') => {
                let mut depth = 0usize;
                let mut j = i + 1;
                while j < chars.len() {
                    match chars[j] {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                if j >= chars.len() {
                    return None;
                }
                toks.push(Tok::Macro);
                i = j + 1;
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-')
                {
                    i += 1;
                }
                toks.push(Tok::Word(chars[start..i].iter().collect()));
            }
            _ => return None,
        }
    }
    Some(toks)
}

struct Eval<'a> {
    toks: &'a [Tok],
    pos: usize,
    config: &'a ConfigFile,
}

/// What an operand stands for: a symbol (looked up) or a constant.
enum Operand {
    Tri(Tri),
    Text(String),
}

impl Eval<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn or(&mut self, depth: usize) -> Option<Tri> {
        let mut v = self.and(depth)?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            v = v.max(self.and(depth)?);
        }
        Some(v)
    }

    fn and(&mut self, depth: usize) -> Option<Tri> {
        let mut v = self.not(depth)?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            v = v.min(self.not(depth)?);
        }
        Some(v)
    }

    fn not(&mut self, depth: usize) -> Option<Tri> {
        if depth > MAX_EXPR_DEPTH {
            return None;
        }
        if self.peek() == Some(&Tok::Not) {
            self.pos += 1;
            return Some(match self.not(depth + 1)? {
                Tri::N => Tri::Y,
                Tri::M => Tri::M,
                Tri::Y => Tri::N,
            });
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let v = self.or(depth + 1)?;
            if self.peek() != Some(&Tok::RParen) {
                return None;
            }
            self.pos += 1;
            return Some(v);
        }
        let left = self.operand()?;
        if let Some(Tok::Cmp(op)) = self.peek().cloned() {
            self.pos += 1;
            let right = self.operand()?;
            return Some(compare(&self.text(&left), op, &self.text(&right)));
        }
        Some(match left {
            Operand::Tri(t) => t,
            Operand::Text(_) => Tri::N,
        })
    }

    fn operand(&mut self) -> Option<Operand> {
        let tok = self.peek()?.clone();
        self.pos += 1;
        Some(match tok {
            Tok::Word(w) => match w.as_str() {
                "y" => Operand::Tri(Tri::Y),
                "m" => Operand::Tri(Tri::M),
                "n" => Operand::Tri(Tri::N),
                _ if parse_num(&w).is_some() => Operand::Text(w),
                _ => match self.config.get(&w) {
                    Some(Value::Yes) => Operand::Tri(Tri::Y),
                    Some(Value::Module) => Operand::Tri(Tri::M),
                    Some(Value::No) | None => Operand::Tri(Tri::N),
                    Some(Value::Num(n)) => Operand::Text(n.clone()),
                    Some(Value::Str(s)) => Operand::Text(s.clone()),
                },
            },
            Tok::Quoted(s) => Operand::Text(s),
            // Toolchain tests are true on any compiler able to build the kernel at all.
            Tok::Macro => Operand::Tri(Tri::Y),
            _ => return None,
        })
    }

    fn text(&self, o: &Operand) -> String {
        match o {
            Operand::Tri(Tri::Y) => "y".into(),
            Operand::Tri(Tri::M) => "m".into(),
            Operand::Tri(Tri::N) => "n".into(),
            Operand::Text(s) => s.clone(),
        }
    }
}

fn compare(a: &str, op: &str, b: &str) -> Tri {
    let ord = match (parse_num(a), parse_num(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => a.cmp(b),
    };
    let holds = match op {
        "=" => ord.is_eq(),
        "!=" => !ord.is_eq(),
        "<" => ord.is_lt(),
        "<=" => ord.is_le(),
        ">" => ord.is_gt(),
        _ => ord.is_ge(),
    };
    if holds {
        Tri::Y
    } else {
        Tri::N
    }
}

/// Value of a Kconfig expression under `config`; None when it cannot be read.
pub fn eval(expr: &str, config: &ConfigFile) -> Option<Tri> {
    let toks = tokenize(expr)?;
    let mut e = Eval {
        toks: &toks,
        pos: 0,
        config,
    };
    let v = e.or(0)?;
    (e.pos == toks.len()).then_some(v)
}

/// The `&&`-separated parts of an expression at the outermost level.
pub fn conjuncts(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'&' if depth == 0 && bytes.get(i + 1) == Some(&b'&') => {
                out.push(expr[start..i].trim().to_string());
                start = i + 2;
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(expr[start..].trim().to_string());
    out.retain(|s| !s.is_empty());
    out
}

/// Symbol names an expression mentions (not constants), in order of appearance.
pub fn symbols_in(expr: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for t in tokenize(expr).unwrap_or_default() {
        if let Tok::Word(w) = t {
            if !matches!(w.as_str(), "y" | "m" | "n")
                && parse_num(&w).is_none()
                && seen.insert(w.clone())
            {
                out.push(w);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Suggestions

pub fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Up to `max` names close to `name`: names containing it first (shortest
/// first), then names within a small edit distance; ties by name.
pub fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
    max: usize,
) -> Vec<String> {
    let limit = (name.len() / 3).max(2);
    let mut scored: Vec<(u8, usize, &str)> = candidates
        .filter(|c| *c != name)
        .filter_map(|c| {
            let len_gap = c.len().abs_diff(name.len());
            if c.contains(name) {
                return Some((0, len_gap, c));
            }
            // Cheap bound first: the distance is at least the length difference.
            if len_gap > limit {
                return None;
            }
            let d = levenshtein(name, c);
            (d <= limit).then_some((1, d, c))
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(max)
        .map(|(_, _, c)| c.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> ConfigFile {
        ConfigFile::parse(text, ".config").unwrap()
    }

    fn fake_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let w = |p: &str, t: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, t).unwrap();
        };
        w("Kconfig", "mainmenu \"Linux\"\n\nsource \"arch/$(SRCARCH)/Kconfig\"\nsource \"drivers/Kconfig\"\n");
        w(
            "arch/x86/Kconfig",
            "config X86\n\tdef_bool y\n\tselect HAVE_PCI\n\nconfig HAVE_PCI\n\tbool\n",
        );
        w("arch/arm64/Kconfig", "config ARM_AMBA\n\tbool \"AMBA\"\n");
        w(
            "drivers/Kconfig",
            concat!(
                "menu \"Device drivers\"\n",
                "\tdepends on HAVE_PCI\n",
                "\n",
                "config PCI\n",
                "\tbool \"PCI support\"\n",
                "\thelp\n",
                "\t  This help mentions config FAKE and\n",
                "\t  depends on NONSENSE.\n",
                "\n",
                "\t  It has a second paragraph.\n",
                "\n",
                "rsource \"virtio/Kconfig\"\n",
                "osource \"missing/Kconfig\"\n",
                "endmenu\n",
            ),
        );
        w(
            "drivers/virtio/Kconfig",
            concat!(
                "menuconfig VIRTIO_MENU\n",
                "\tbool \"Virtio drivers\"\n",
                "\tdefault y\n",
                "\n",
                "if VIRTIO_MENU\n",
                "\n",
                "config VIRTIO_PCI\n",
                "\ttristate \"PCI driver for virtio devices\" if EXPERT # prompt only for experts\n",
                "\tdepends on PCI && \\\n",
                "\t\t(X86 || ARM64)\n",
                "\tselect VIRTIO\n",
                "\tselect VIRTIO_PCI_LIB if !HIDE\n",
                "\n",
                "comment \"a comment block\"\n",
                "\tdepends on COMMENT_ONLY\n",
                "\n",
                "endif # VIRTIO_MENU\n",
                "\n",
                "config VIRTIO\n",
                "\ttristate\n",
            ),
        );
        dir
    }

    #[test]
    fn walks_sources_for_one_arch() {
        let tree = fake_tree();
        let idx = KconfigIndex::load(tree.path(), "x86");
        assert!(idx.defs.contains_key("X86") && !idx.defs.contains_key("ARM_AMBA"));
        assert!(
            !idx.defs.contains_key("FAKE"),
            "help text is not parsed as config"
        );
        let pci = &idx.defs["VIRTIO_PCI"][0];
        assert_eq!(pci.file, "drivers/virtio/Kconfig");
        assert_eq!(pci.line, 7);
        assert!(pci.has_prompt);
        assert_eq!(
            pci.conditions,
            vec!["HAVE_PCI", "VIRTIO_MENU", "EXPERT", "PCI && (X86 || ARM64)"]
        );
        let plain = &idx.defs["PCI"][0];
        assert_eq!(
            plain.conditions,
            vec!["HAVE_PCI"],
            "help text must not add conditions"
        );
        assert!(!idx.defs["VIRTIO"][0].has_prompt);
        assert_eq!(
            idx.defs["VIRTIO"][0].conditions,
            vec!["HAVE_PCI"],
            "endif closes the if block"
        );
        assert_eq!(
            idx.selected_by["VIRTIO"],
            vec![Selector {
                by: "VIRTIO_PCI".into(),
                cond: None
            }]
        );
        assert_eq!(
            idx.selected_by["VIRTIO_PCI_LIB"][0].cond.as_deref(),
            Some("!HIDE")
        );
        assert!(!idx
            .defs
            .values()
            .flatten()
            .any(|d| d.conditions.iter().any(|c| c == "COMMENT_ONLY")));
    }

    #[test]
    fn all_definitions_include_other_arches() {
        let tree = fake_tree();
        let all = scan_all_definitions(tree.path());
        assert_eq!(
            all["ARM_AMBA"].iter().collect::<Vec<_>>(),
            vec!["arch/arm64/Kconfig"]
        );
        assert!(!all.contains_key("FAKE"));
    }

    #[test]
    fn evaluates_tristate_expressions() {
        let c =
            cfg("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_N=16\nCONFIG_S=\"x86\"\n");
        let e = |s: &str| eval(s, &c);
        assert_eq!(e("A"), Some(Tri::Y));
        assert_eq!(e("A && B"), Some(Tri::M));
        assert_eq!(e("A && C"), Some(Tri::N));
        assert_eq!(e("C || B"), Some(Tri::M));
        assert_eq!(e("!C && (A || MISSING)"), Some(Tri::Y));
        assert_eq!(e("!B"), Some(Tri::M));
        assert_eq!(e("B = m"), Some(Tri::Y));
        assert_eq!(e("B != y"), Some(Tri::Y));
        assert_eq!(e("N >= 0x10"), Some(Tri::Y));
        assert_eq!(e("N < 8"), Some(Tri::N));
        assert_eq!(e("S = \"x86\""), Some(Tri::Y));
        assert_eq!(e("$(cc-option,-mfoo) && A"), Some(Tri::Y));
        assert_eq!(e("A &&"), None);
        assert_eq!(e("(A"), None);
        assert_eq!(e("A ) B"), None);
        assert_eq!(e("\"open"), None);
        assert_eq!(
            e(&"(".repeat(500)),
            None,
            "deep nesting is refused, not a stack overflow"
        );
    }

    #[test]
    fn splits_top_level_conjuncts_and_names_symbols() {
        assert_eq!(
            conjuncts("PCI && (X86 || ARM64) && !HIDE"),
            vec!["PCI", "(X86 || ARM64)", "!HIDE"]
        );
        assert_eq!(
            symbols_in("PCI && (X86 || ARM64) && A = y && N > 3"),
            vec!["PCI", "X86", "ARM64", "A", "N"]
        );
    }

    #[test]
    fn suggests_close_names() {
        let names = [
            "VSOCKETS",
            "VIRTIO_VSOCKETS",
            "VIRTIO_PCI",
            "VIRTIO_MMIO",
            "DEVTMPFS",
            "DEVTMPFS_MOUNT",
            "UNIX98_PTYS",
        ];
        let names = [&names[..], &["BLOCK"]].concat();
        assert_eq!(
            closest("VSOCK", names.iter().copied(), 3),
            vec!["VSOCKETS", "VIRTIO_VSOCKETS", "BLOCK"]
        );
        assert_eq!(
            closest("VIRTIO_PIC", names.iter().copied(), 1),
            vec!["VIRTIO_PCI"]
        );
        assert_eq!(
            closest("DEVTMPFS_MOUNTT", names.iter().copied(), 1),
            vec!["DEVTMPFS_MOUNT"]
        );
        assert!(closest("ZZZZZZZZ", names.iter().copied(), 3).is_empty());
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
    }

    #[test]
    fn comments_and_prompts() {
        assert_eq!(strip_comment("bool \"a # b\" # c"), "bool \"a # b\" ");
        assert_eq!(
            prompt_condition("\"Text\" if EXPERT && X"),
            Some("EXPERT && X".into())
        );
        assert_eq!(prompt_condition("\"Text\""), None);
        assert_eq!(prompt_condition("\"unterminated"), None);
        assert_eq!(indent_width("\t  x"), 10);
    }
}
