//! Layers point one way (docs/ARCHITECTURE.md, "Layers"): no import cycle between
//! the source files of `thp`, `guest-mem` and `vmm`, and clap only in the binary's
//! `cli/` and `main.rs`. Read from the `use` lines and paths of each file (test
//! modules and comments left out), the way a reviewer would. Host: any (no KVM).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Module path (`a::b`) of every `.rs` file under `src`, with the file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).expect("under src").with_extension("");
                let mut parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if parts.last().is_some_and(|l| l == "mod") {
                    parts.pop();
                }
                // lib.rs is the crate root; main.rs (the binary's root) keeps
                // its name: nothing in the library names it.
                if parts == ["lib"] {
                    parts.clear();
                }
                out.insert(parts.join("::"), p);
            }
        }
    }
    out
}

/// A file's code without its `#[cfg(test)]` tail and without comment lines.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module paths file `module` names: `crate::a::b`, `super::x`, `self::y`,
/// and the items of `{...}` groups after them.
fn named_paths(module: &str, code: &str) -> Vec<String> {
    let base: Vec<&str> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").collect()
    };
    let mut out = Vec::new();
    for head in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(head) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &code[at + head.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let path = rest[..end].trim_end_matches(':');
            let mut prefix: Vec<&str> = match head {
                "crate::" => Vec::new(),
                "super::" => base[..base.len().saturating_sub(1)].to_vec(),
                _ => base.clone(),
            };
            prefix.extend(path.split("::").filter(|s| !s.is_empty()));
            let full = prefix.join("::");
            if rest[end..].starts_with('{') {
                let group = &rest[end + 1..rest[end..].find('}').map_or(end + 1, |c| end + c)];
                for item in group.split(',') {
                    let item = item.trim().trim_start_matches('{');
                    let name = item.split_whitespace().next().unwrap_or_default();
                    if name.is_empty() || name == "self" {
                        out.push(full.clone());
                    } else {
                        out.push(format!("{full}::{name}"));
                    }
                }
            } else {
                out.push(full);
            }
        }
    }
    out
}

/// The longest module of `mods` that `path` starts with.
fn resolve<'a>(mods: &'a BTreeMap<String, PathBuf>, path: &str) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|k| parts[..k].join("::"))
        .find_map(|c| mods.get_key_value(&c).map(|(k, _)| k.as_str()))
}

/// File-level import graph of crate `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut g = BTreeMap::new();
    for (m, p) in &mods {
        let edges: BTreeSet<String> = named_paths(m, &code(p))
            .iter()
            .filter_map(|path| resolve(&mods, path))
            // A module naming its own parent's items is not an import of a sibling.
            .filter(|r| r != m && !m.starts_with(&format!("{r}::")))
            .map(str::to_string)
            .collect();
        g.insert(m.clone(), edges);
    }
    g
}

/// The cycles of `g` (strongly connected components of more than one module).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: finish order on g, then components on the reverse graph.
    fn visit(
        v: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(v.to_string()) {
            return;
        }
        for w in g.get(v).into_iter().flatten() {
            visit(w, g, seen, out);
        }
        out.push(v.to_string());
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for v in g.keys() {
        visit(v, g, &mut seen, &mut order);
    }
    let mut rev: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (v, ws) in g {
        for w in ws {
            rev.entry(w.clone()).or_default().insert(v.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for v in order.iter().rev() {
        let mut comp = Vec::new();
        visit(v, &rev, &mut seen, &mut comp);
        if comp.len() > 1 {
            comp.sort();
            out.push(comp);
        }
    }
    out
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn no_import_cycle_between_files_of_a_crate() {
    for krate in ["thp", "guest-mem", "vmm"] {
        let g = graph(&crate_src(krate));
        assert!(g.len() > 5, "{krate}: only {} modules found", g.len());
        let found = cycles(&g);
        let detail: Vec<String> = found
            .iter()
            .flatten()
            .map(|m| format!("  {m} -> {:?}", g[m]))
            .collect();
        assert!(
            found.is_empty(),
            "{krate}: import cycles {found:?}\n{}",
            detail.join("\n")
        );
    }
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
    let paths = named_paths(
        "x::y",
        "use super::z::{A, b::C};\nuse crate::q;\nfoo(self::w::f)",
    );
    assert_eq!(paths, vec!["q", "x::z::A", "x::z::b::C", "x::y::w::f"]);
}

#[test]
fn clap_only_in_the_binary() {
    let src = crate_src("vmm");
    for (m, p) in modules(&src) {
        let in_binary = m == "main" || m == "cli" || m.starts_with("cli::");
        if !in_binary {
            assert!(
                !code(&p).contains("clap::"),
                "{} uses clap outside the binary's cli/",
                p.display()
            );
        }
    }
    for krate in ["thp", "guest-mem"] {
        for p in modules(&crate_src(krate)).values() {
            assert!(!code(p).contains("clap::"), "{} uses clap", p.display());
        }
    }
}
