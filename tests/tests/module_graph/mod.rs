//! The module graph of a crate, read from its sources as text, and its import cycles (the tidy
//! check `no_import_cycles_between_modules` in `tidy.rs`).
//!
//! **Modules.** A module is a file: the crate roots (`lib.rs`, `main.rs`, `bin/x.rs`,
//! `bin/x/main.rs`) and every file they reach through `mod x;` (`x.rs` or `x/mod.rs`, next to
//! the parent or in the parent's directory). Inline modules (`mod tests { … }`) belong to their
//! file. `#[cfg(feature = …)]` is ignored: every declared module is read.
//!
//! **Test code is left out**: an item under `#[cfg(test)]` (a `mod tests { … }`, a test-only
//! `use` or function, a `mod x;` of tests) is skipped. A unit test may use any fixture or
//! helper of its crate (`shared::fixtures` builds the golden inputs from `lora` and `update`,
//! whose tests use it); the check is about what one module's code needs from another.
//!
//! **References.** With comments and literals skipped, a file refers to another module by
//! - a `use` tree (`use crate::a::{b, c::D};`, `use super::*;`, `use self::x::Y;`, and a path
//!   that starts at a child module or at a name imported by another `use`);
//! - a path in code that starts with `crate::`, `super::` or `self::` (`crate::fleet::no_delay`).
//!
//! A path names the deepest module it goes through; when the next segment is a name that module
//! imports (`pub use train::TrainConfig;`, or a private `use`, which its children can name), the
//! import is followed, so a re-export does not hide where an item lives.
//!
//! **Granularity.** Cycles are looked for at every level of the module tree: among the top-level
//! modules of each crate root, and among the children of every module that has some. At the
//! level of a module `D`, a reference from anything inside child `a` of `D` (its file or a
//! descendant) to anything inside another child `b` is an edge `a → b`. References of `D`'s own
//! file to its children, and of a child to `D` itself (`super::Engine`), are how a module is
//! split into files (the parent declares and re-exports, the children implement): they are not
//! edges at any level. A cycle is a strongly connected component of two or more children; every
//! edge inside one lies on a cycle, so the report lists those edges with where they are made.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

mod lex;

use lex::{lex, Tok, Token};

/// A module's path below its crate root (`["engine", "train"]`; empty for the root).
pub(crate) type ModPath = Vec<String>;

/// One path of a `use` tree, as written (`crate`, `super`, `self` or a name first).
#[derive(Debug, Clone, PartialEq)]
struct UsePath {
    segments: Vec<String>,
    /// The name it brings into scope (its last segment, or the `as` name); None for a glob.
    name: Option<String>,
}

/// The paths of a use tree (the tokens between `use` and `;`).
fn use_paths(toks: &[Tok]) -> Vec<UsePath> {
    let mut out = Vec::new();
    let mut i = 0;
    use_tree(toks, &mut i, Vec::new(), &mut out);
    out
}

fn use_tree(toks: &[Tok], i: &mut usize, mut prefix: Vec<String>, out: &mut Vec<UsePath>) {
    if toks.get(*i) == Some(&Tok::PathSep) {
        *i += 1; // `use ::ext::x`: an extern crate, no module of ours.
        prefix.push("::".into());
    }
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(s)) => {
                *i += 1;
                if toks.get(*i) == Some(&Tok::PathSep) {
                    prefix.push(s.clone());
                    *i += 1;
                    continue;
                }
                let mut name = s.clone();
                let mut segments = prefix.clone();
                if s == "self" {
                    name = prefix.last().cloned().unwrap_or_default();
                } else {
                    segments.push(s.clone());
                }
                if toks.get(*i) == Some(&Tok::Ident("as".into())) {
                    if let Some(Tok::Ident(alias)) = toks.get(*i + 1) {
                        name = alias.clone();
                    }
                    *i += 2;
                }
                out.push(UsePath {
                    segments,
                    name: Some(name),
                });
                return;
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push(UsePath {
                    segments: prefix,
                    name: None,
                });
                return;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                loop {
                    match toks.get(*i) {
                        None => return,
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        _ => {
                            let before = *i;
                            use_tree(toks, i, prefix.clone(), out);
                            if *i == before {
                                *i += 1;
                            }
                        }
                    }
                }
            }
            _ => return,
        }
    }
}

/// A path as a file writes it, with the logical module (inline modules included) it is in.
#[derive(Debug, Clone)]
struct Written {
    /// `crate`, `super`, `self` or a name first (use trees only).
    segments: Vec<String>,
    /// The module the path is written in: the file's module plus enclosing inline modules.
    scope: ModPath,
    line: usize,
    /// Part of a use tree (whose first segment may be a child module or an imported name).
    is_use: bool,
    /// For a `use` at the file's (or an inline module's) item level: the name it imports.
    import: Option<Option<String>>,
    /// `pub use` (any visibility): other modules can name the import; a private one only the
    /// module and its descendants.
    public: bool,
}

/// What one file declares and writes.
#[derive(Debug, Default)]
struct FileScan {
    /// `mod x;` (a module in its own file), per logical module they are declared in.
    file_mods: Vec<(ModPath, String)>,
    /// Inline modules (`mod tests { … }`), as logical paths.
    inline_mods: Vec<ModPath>,
    paths: Vec<Written>,
}

/// Reads the module declarations, use trees and `crate::`/`super::`/`self::` paths of a file.
fn scan(src: &str, module: &ModPath) -> FileScan {
    let toks = lex(src);
    let t = |i: usize| toks.get(i).map(|t| &t.tok);
    let ident = |i: usize, w: &str| matches!(t(i), Some(Tok::Ident(s)) if s == w);
    let mut scan = FileScan::default();
    // Enclosing inline modules: (name, brace depth inside them); items sit at that depth.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let scope = |inline: &[(String, usize)]| {
        let mut s = module.clone();
        s.extend(inline.iter().map(|(n, _)| n.clone()));
        s
    };
    let mut i = 0;
    while i < toks.len() {
        if let Some(end) = cfg_test_item(&toks, i) {
            i = end;
            continue;
        }
        match &toks[i].tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if inline.last().is_some_and(|&(_, d)| d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(w) if w == "mod" => {
                if let Some(Tok::Ident(name)) = t(i + 1) {
                    match t(i + 2) {
                        Some(Tok::Punct(';')) => {
                            scan.file_mods.push((scope(&inline), name.clone()))
                        }
                        Some(Tok::Punct('{')) => {
                            inline.push((name.clone(), depth + 1));
                            scan.inline_mods.push(scope(&inline));
                            depth += 1;
                            i += 3;
                            continue;
                        }
                        _ => {}
                    }
                }
            }
            Tok::Ident(w) if w == "use" => {
                let end = (i + 1..toks.len())
                    .find(|&j| toks[j].tok == Tok::Punct(';'))
                    .unwrap_or(toks.len());
                let tree: Vec<Tok> = toks[i + 1..end].iter().map(|t| t.tok.clone()).collect();
                let item_level = inline.last().map_or(0, |&(_, d)| d) == depth;
                // `pub use`, `pub(crate) use`, `pub(in path) use`.
                let public = ident(i.wrapping_sub(1), "pub")
                    || (t(i.wrapping_sub(1)) == Some(&Tok::Punct(')'))
                        && (0..i)
                            .rev()
                            .find(|&j| toks[j].tok == Tok::Punct('('))
                            .is_some_and(|j| ident(j.wrapping_sub(1), "pub")));
                for u in use_paths(&tree) {
                    scan.paths.push(Written {
                        segments: u.segments,
                        scope: scope(&inline),
                        line: toks[i].line,
                        is_use: true,
                        import: item_level.then_some(u.name),
                        public,
                    });
                }
                i = end + 1;
                continue;
            }
            Tok::Ident(w)
                if matches!(w.as_str(), "crate" | "super" | "self")
                    && t(i + 1) == Some(&Tok::PathSep)
                    && !matches!(t(i.wrapping_sub(1)), Some(Tok::Punct('$') | Tok::PathSep)) =>
            {
                let mut segments = vec![w.clone()];
                let mut j = i + 1;
                while t(j) == Some(&Tok::PathSep) {
                    match t(j + 1) {
                        Some(Tok::Ident(s)) => segments.push(s.clone()),
                        _ => break,
                    }
                    j += 2;
                }
                scan.paths.push(Written {
                    segments,
                    scope: scope(&inline),
                    line: toks[i].line,
                    is_use: false,
                    import: None,
                    public: false,
                });
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    scan
}

/// When `toks[i..]` starts with `#[cfg(test)]`: the index past the item it gates (its other
/// attributes, then up to its `;` or the end of its `{ … }` block).
fn cfg_test_item(toks: &[Token], i: usize) -> Option<usize> {
    let attr = [
        Tok::Punct('#'),
        Tok::Punct('['),
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
        Tok::Punct(']'),
    ];
    let at = |j: usize| toks.get(j).map(|t| &t.tok);
    if !(0..attr.len()).all(|k| at(i + k) == Some(&attr[k])) {
        return None;
    }
    let mut j = i + attr.len();
    let mut nesting = 0usize;
    while let Some(tok) = at(j) {
        j += 1;
        match tok {
            Tok::Punct('(' | '[') => nesting += 1,
            Tok::Punct(')' | ']') => nesting = nesting.saturating_sub(1),
            Tok::Punct(';') if nesting == 0 => return Some(j),
            Tok::Punct('{') if nesting == 0 => {
                let mut braces = 1;
                while let Some(tok) = at(j) {
                    j += 1;
                    match tok {
                        Tok::Punct('{') => braces += 1,
                        Tok::Punct('}') => {
                            braces -= 1;
                            if braces == 0 {
                                return Some(j);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(j)
}

/// A reference from one module (file) to another, and where it is made.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Edge {
    pub(crate) from: ModPath,
    pub(crate) to: ModPath,
    /// `file:line` and the path as written.
    pub(crate) at: String,
}

/// The module graph of one crate root.
#[derive(Debug)]
pub(crate) struct CrateGraph {
    /// `lib`, `main`, `bin/x`: the crate root's name.
    pub(crate) root: String,
    /// Every module (file) of the crate root.
    pub(crate) modules: BTreeSet<ModPath>,
    pub(crate) edges: Vec<Edge>,
}

/// The crate roots under a crate's `src`: `lib.rs`, `main.rs`, `bin/*.rs`, `bin/*/main.rs`.
pub(crate) fn crate_roots(src: &Path) -> Vec<(String, PathBuf)> {
    let mut roots = Vec::new();
    for r in ["lib", "main"] {
        let p = src.join(format!("{r}.rs"));
        if p.is_file() {
            roots.push((r.to_owned(), p));
        }
    }
    if let Ok(rd) = std::fs::read_dir(src.join("bin")) {
        let mut bins: Vec<PathBuf> = rd.map(|e| e.expect("dir entry").path()).collect();
        bins.sort();
        for b in bins {
            let name = b.file_stem().unwrap().to_string_lossy().into_owned();
            if b.is_dir() && b.join("main.rs").is_file() {
                roots.push((format!("bin/{name}"), b.join("main.rs")));
            } else if b.extension().is_some_and(|e| e == "rs") {
                roots.push((format!("bin/{name}"), b));
            }
        }
    }
    roots
}

/// Reads the module tree from `root_file` through its `mod x;` declarations and returns the
/// graph of references between its modules; `display` names a file in the report.
pub(crate) fn crate_graph(
    root: &str,
    root_file: &Path,
    display: &dyn Fn(&Path) -> String,
) -> CrateGraph {
    let mut files: BTreeMap<ModPath, (PathBuf, FileScan)> = BTreeMap::new();
    let mut todo = vec![(ModPath::new(), root_file.to_path_buf())];
    while let Some((m, file)) = todo.pop() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("read {}: {e}", display(&file)));
        let scanned = scan(&text, &m);
        // Children of `a.rs` live in `a/`; of a root or a `mod.rs`, next to it.
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        let own_dir = m.is_empty() || stem == "mod";
        let dir = if own_dir {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for (scope, name) in &scanned.file_mods {
            let mut sub_dir = dir.clone();
            for s in &scope[m.len()..] {
                sub_dir.push(s);
            }
            let a = sub_dir.join(format!("{name}.rs"));
            let b = sub_dir.join(name).join("mod.rs");
            let child_file = if a.is_file() { a } else { b };
            assert!(
                child_file.is_file(),
                "{}: `mod {name};` has no file (#[path] is not read by this check)",
                display(&file)
            );
            let mut child = scope.clone();
            child.push(name.clone());
            todo.push((child, child_file));
        }
        files.insert(m, (file, scanned));
    }

    // Logical modules (files and inline modules) → the file module they belong to.
    let mut logical: BTreeMap<ModPath, ModPath> = BTreeMap::new();
    for (m, (_, s)) in &files {
        logical.insert(m.clone(), m.clone());
        for (scope, name) in &s.file_mods {
            let mut c = scope.clone();
            c.push(name.clone());
            logical.insert(c.clone(), c);
        }
        for inl in &s.inline_mods {
            logical.insert(inl.clone(), m.clone());
        }
    }
    // Imports at item level: logical module → name → the path as written (and its scope).
    let mut imports: BTreeMap<ModPath, BTreeMap<String, Written>> = BTreeMap::new();
    for (_, s) in files.values() {
        for w in &s.paths {
            if let Some(Some(name)) = &w.import {
                imports
                    .entry(w.scope.clone())
                    .or_default()
                    .insert(name.clone(), w.clone());
            }
        }
    }
    let g = Resolver {
        logical: &logical,
        imports: &imports,
    };
    let mut edges = Vec::new();
    for (m, (file, s)) in &files {
        for w in &s.paths {
            let Some(to) = g.resolve(&w.segments, &w.scope, w.is_use, 0) else {
                continue;
            };
            let to = logical[&to].clone();
            if &to != m {
                edges.push(Edge {
                    from: m.clone(),
                    to,
                    at: format!("{}:{} `{}`", display(file), w.line, w.segments.join("::")),
                });
            }
        }
    }
    CrateGraph {
        root: root.to_owned(),
        modules: files.into_keys().collect(),
        edges,
    }
}

struct Resolver<'a> {
    logical: &'a BTreeMap<ModPath, ModPath>,
    imports: &'a BTreeMap<ModPath, BTreeMap<String, Written>>,
}

/// How many imports one path may go through (imports can name each other in a ring).
const MAX_HOPS: usize = 8;

impl Resolver<'_> {
    /// The logical module a path written in `scope` names (None: another crate, or a local
    /// item that is no module path). In a use tree (`in_use`) the first segment may also be a
    /// child module or a name imported in `scope`.
    fn resolve(
        &self,
        segments: &[String],
        scope: &ModPath,
        in_use: bool,
        hops: usize,
    ) -> Option<ModPath> {
        let abs = self.absolute(segments, scope, in_use, hops)?;
        self.module_of(abs, scope, hops)
    }

    /// `segments` as a path from the crate root.
    fn absolute(
        &self,
        segments: &[String],
        scope: &ModPath,
        in_use: bool,
        hops: usize,
    ) -> Option<ModPath> {
        let (first, mut rest) = segments.split_first()?;
        let mut abs = match first.as_str() {
            "crate" => Vec::new(),
            "self" => scope.clone(),
            "super" => {
                let mut s = scope.clone();
                s.pop()?;
                while rest.first().is_some_and(|r| r == "super") {
                    s.pop()?;
                    rest = &rest[1..];
                }
                s
            }
            _ if in_use && hops < MAX_HOPS => {
                let mut child = scope.clone();
                child.push(first.clone());
                if self.logical.contains_key(&child) {
                    child
                } else {
                    // A name imported in this scope (`use super::data; use data::Split;`).
                    let w = self.imports.get(scope)?.get(first)?;
                    self.absolute(&w.segments, &w.scope, true, hops + 1)?
                }
            }
            _ => return None,
        };
        abs.extend(rest.iter().cloned());
        Some(abs)
    }

    /// The deepest module an absolute path goes through. When the next segment is a name that
    /// module imports, and `from` may name that import (it is `pub`, or `from` is inside the
    /// module), the import is followed: the item lives where it was imported from.
    fn module_of(&self, abs: ModPath, from: &ModPath, hops: usize) -> Option<ModPath> {
        let n = (0..=abs.len())
            .rev()
            .find(|&n| self.logical.contains_key(&abs[..n]))?;
        let module = abs[..n].to_vec();
        let import = abs
            .get(n)
            .and_then(|name| self.imports.get(&module)?.get(name))
            .filter(|w| w.public || from.starts_with(&module));
        if let Some(w) = import.filter(|_| hops < MAX_HOPS) {
            if let Some(mut target) = self.absolute(&w.segments, &w.scope, true, hops + 1) {
                target.extend(abs[n + 1..].iter().cloned());
                if let Some(m) = self.module_of(target, &w.scope, hops + 1) {
                    return Some(m);
                }
            }
        }
        Some(module)
    }
}

/// A cycle: children of `parent` that reach one another, and the edges between them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cycle {
    pub(crate) parent: ModPath,
    pub(crate) members: Vec<String>,
    /// `a -> b: where` for every reference between two members.
    pub(crate) edges: Vec<String>,
}

impl Cycle {
    /// `crate_dir (root) parent::{a, b}`: the key of the allow-list.
    pub(crate) fn key(&self, krate: &str, root: &str) -> String {
        let parent = if self.parent.is_empty() {
            String::new()
        } else {
            format!("{}::", self.parent.join("::"))
        };
        format!("{krate} ({root}) {parent}{{{}}}", self.members.join(", "))
    }
}

/// References listed per edge of a cycle (the rest are counted).
const SHOWN_PER_EDGE: usize = 3;

/// The cycles of a crate root's graph at every level of its module tree.
pub(crate) fn cycles(g: &CrateGraph) -> Vec<Cycle> {
    let parents: BTreeSet<ModPath> = g
        .modules
        .iter()
        .filter(|m| !m.is_empty())
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    let mut out = Vec::new();
    for parent in parents {
        let child = |m: &ModPath| -> Option<String> {
            (m.len() > parent.len() && m.starts_with(&parent)).then(|| m[parent.len()].clone())
        };
        let mut level: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for e in &g.edges {
            if let (Some(a), Some(b)) = (child(&e.from), child(&e.to)) {
                if a != b {
                    level.entry((a, b)).or_default().push(e.at.clone());
                }
            }
        }
        let pairs: Vec<(&str, &str)> = level
            .keys()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        for scc in strongly_connected(&pairs) {
            let edges = level
                .iter()
                .filter(|((a, b), _)| scc.contains(a) && scc.contains(b))
                .map(|((a, b), at)| {
                    let more = at.len().saturating_sub(SHOWN_PER_EDGE);
                    let shown = at[..at.len().min(SHOWN_PER_EDGE)].join("; ");
                    match more {
                        0 => format!("{a} -> {b}: {shown}"),
                        n => format!("{a} -> {b}: {shown} (and {n} more)"),
                    }
                })
                .collect();
            out.push(Cycle {
                parent: parent.clone(),
                members: scc,
                edges,
            });
        }
    }
    out
}

/// The strongly connected components of two or more nodes of a directed graph (Tarjan),
/// each sorted, in sorted order.
pub(crate) fn strongly_connected(edges: &[(&str, &str)]) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&str> = edges.iter().flat_map(|&(a, b)| [a, b]).collect();
    let nodes: Vec<&str> = nodes.into_iter().collect();
    let idx = |n: &str| nodes.binary_search(&n).unwrap();
    let mut adj = vec![Vec::new(); nodes.len()];
    for &(a, b) in edges {
        adj[idx(a)].push(idx(b));
    }
    struct Tarjan<'a> {
        adj: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.adj[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                self.out.push(scc);
            }
        }
    }
    let mut t = Tarjan {
        adj: &adj,
        index: vec![None; nodes.len()],
        low: vec![0; nodes.len()],
        on_stack: vec![false; nodes.len()],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..nodes.len() {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    let mut sccs: Vec<Vec<String>> = t
        .out
        .into_iter()
        .filter(|s| s.len() > 1)
        .map(|s| {
            let mut names: Vec<String> = s.into_iter().map(|i| nodes[i].to_owned()).collect();
            names.sort();
            names
        })
        .collect();
    sccs.sort();
    sccs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Edges (from, to) of a graph, or (file, text) of a made-up crate.
    type Pairs<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn strongly_connected_components_of_a_table_of_graphs() {
        let cases: &[(Pairs, &[&[&str]])] = &[
            (&[], &[]),
            (&[("a", "b")], &[]),
            (&[("a", "b"), ("b", "a")], &[&["a", "b"]]),
            (&[("a", "b"), ("b", "c"), ("c", "a")], &[&["a", "b", "c"]]),
            (&[("a", "b"), ("b", "c"), ("a", "c")], &[]),
            (
                &[("a", "b"), ("b", "a"), ("c", "d"), ("d", "c"), ("b", "c")],
                &[&["a", "b"], &["c", "d"]],
            ),
            // Two rings sharing a node are one component.
            (
                &[("a", "b"), ("b", "a"), ("b", "c"), ("c", "b"), ("d", "a")],
                &[&["a", "b", "c"]],
            ),
            // A self-loop is no cycle between modules.
            (&[("a", "a"), ("a", "b")], &[]),
        ];
        for (edges, want) in cases {
            let want: Vec<Vec<String>> = want
                .iter()
                .map(|s| s.iter().map(|x| x.to_string()).collect())
                .collect();
            assert_eq!(strongly_connected(edges), want, "{edges:?}");
        }
    }

    #[test]
    fn use_trees_expand_to_paths() {
        let paths = |src: &str| -> Vec<(String, Option<String>)> {
            let toks: Vec<Tok> = lex(src).into_iter().map(|t| t.tok).collect();
            use_paths(&toks)
                .into_iter()
                .map(|u| (u.segments.join("::"), u.name))
                .collect()
        };
        let s = |a: &str, n: Option<&str>| (a.to_owned(), n.map(str::to_owned));
        assert_eq!(
            paths("crate::a::{self, b::C as D, e::*, f::{g, h}}"),
            [
                s("crate::a", Some("a")),
                s("crate::a::b::C", Some("D")),
                s("crate::a::e", None),
                s("crate::a::f::g", Some("g")),
                s("crate::a::f::h", Some("h")),
            ]
        );
        assert_eq!(paths("super::*"), [s("super", None)]);
        assert_eq!(paths("std::io::{self}"), [s("std::io", Some("io"))]);
    }

    /// The graph of a crate written to a temporary directory: `(path below src, text)`.
    fn graph(files: &[(&str, &str)]) -> CrateGraph {
        let dir = tempfile::tempdir().unwrap();
        for (p, text) in files {
            let f = dir.path().join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, text).unwrap();
        }
        crate_graph("lib", &dir.path().join("lib.rs"), &|p| {
            p.strip_prefix(dir.path()).unwrap().display().to_string()
        })
    }

    fn keys(files: &[(&str, &str)]) -> Vec<String> {
        cycles(&graph(files))
            .iter()
            .map(|c| c.key("k", "lib"))
            .collect()
    }

    #[test]
    fn cycles_of_a_table_of_crates() {
        let cases: &[(Pairs, &[&str])] = &[
            // No references.
            (
                &[("lib.rs", "mod a; mod b;"), ("a.rs", ""), ("b.rs", "")],
                &[],
            ),
            // One way only.
            (
                &[
                    ("lib.rs", "mod a; mod b;"),
                    ("a.rs", "use crate::b::X;"),
                    ("b.rs", ""),
                ],
                &[],
            ),
            // A use one way, a path in code the other.
            (
                &[
                    ("lib.rs", "pub mod a; pub mod b;"),
                    ("a.rs", "use crate::b::X;"),
                    ("b.rs", "fn f() { crate::a::g(); }"),
                ],
                &["k (lib) {a, b}"],
            ),
            // A parent and its children are no cycle: mod.rs re-exports, children use super.
            (
                &[
                    ("lib.rs", "mod e;"),
                    ("e/mod.rs", "mod t; mod r; pub use t::C; fn f() { r::g() }"),
                    ("e/t.rs", "use super::Engine;"),
                    ("e/r.rs", "use super::{Engine, EngineError};"),
                ],
                &[],
            ),
            // Siblings through the parent's re-export: the re-export is followed.
            (
                &[
                    ("lib.rs", "mod e;"),
                    ("e/mod.rs", "mod t; mod r; pub use t::TrainConfig;"),
                    ("e/t.rs", "use super::r::Stepper;"),
                    ("e/r.rs", "use super::TrainConfig;"),
                ],
                &["k (lib) e::{r, t}"],
            ),
            // A top-level cycle made by submodules of a directory module.
            (
                &[
                    ("lib.rs", "mod cli; mod engine;"),
                    ("cli.rs", "use crate::engine::train::run;"),
                    ("engine/mod.rs", "mod train; mod load;"),
                    ("engine/train.rs", ""),
                    ("engine/load.rs", "fn f(a: crate::cli::Args) {}"),
                ],
                &["k (lib) {cli, engine}"],
            ),
            // A child of a file module (`predict.rs` + `predict/sft.rs`) using its parent.
            (
                &[
                    ("lib.rs", "mod predict;"),
                    ("predict.rs", "mod sft; fn f() { sft::run() }"),
                    ("predict/sft.rs", "use super::{open, Args};"),
                ],
                &[],
            ),
            // Test code is left out: a test module, a test-only use and a test file.
            (
                &[
                    ("lib.rs", "mod a; mod b; #[cfg(test)]\nmod c;"),
                    ("a.rs", "use crate::b::X;"),
                    (
                        "b.rs",
                        "#[cfg(test)]\n#[allow(x)]\nmod tests { use crate::a::Y; fn f() {} }\n\
                         #[cfg(test)]\nuse crate::a::Z;\nfn g() {}",
                    ),
                    ("c.rs", "use crate::{a::X, b::Y};"),
                ],
                &[],
            ),
            // ...but only test code: `super::super` leaves an inline module and the file.
            (
                &[
                    ("lib.rs", "mod a; mod b;"),
                    ("a.rs", "use crate::b::X;"),
                    ("b.rs", "mod inner { use super::super::a::Y; }"),
                ],
                &["k (lib) {a, b}"],
            ),
            // `use super::x; use x::Y` (a name imported first) and comments that name paths.
            (
                &[
                    ("lib.rs", "mod a; mod b;"),
                    ("a.rs", "use super::b; use b::Y; // crate::b"),
                    (
                        "b.rs",
                        "/// [`crate::a::Z`]\nfn f() -> &'static str { \"crate::a\" }",
                    ),
                ],
                &[],
            ),
            (
                &[
                    ("lib.rs", "mod a; mod b;"),
                    ("a.rs", "use super::b; use b::Y;"),
                    ("b.rs", "fn f() { let _ = super::a::Z; }"),
                ],
                &["k (lib) {a, b}"],
            ),
            // A three-module ring, and a `$crate` path in a macro (no module of ours).
            (
                &[
                    ("lib.rs", "mod a; mod b; mod c; mod d;"),
                    ("a.rs", "use crate::b::X;"),
                    ("b.rs", "use crate::c::X;"),
                    ("c.rs", "use crate::{a::X, d::Y};"),
                    ("d.rs", "macro_rules! m { () => { $crate::a::X } }"),
                ],
                &["k (lib) {a, b, c}"],
            ),
        ];
        for (files, want) in cases {
            assert_eq!(keys(files), *want, "{files:#?}");
        }
    }

    #[test]
    fn a_cycle_lists_where_each_reference_is_made() {
        let g = graph(&[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "\nuse crate::b::X;"),
            ("b.rs", "fn f() {\n    crate::a::g();\n}"),
        ]);
        let c = cycles(&g);
        assert_eq!(
            c[0].edges,
            [
                "a -> b: a.rs:2 `crate::b::X`",
                "b -> a: b.rs:2 `crate::a::g`"
            ]
        );
    }
}
