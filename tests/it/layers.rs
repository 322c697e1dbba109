//! The layering of `src/` as a test: imports point down only. Each top-level module
//! has a layer (the table in the crate doc of `src/lib.rs`); a module may name modules
//! of its own layer or below, and no two files may import each other in a circle.
//! Run it alone with `cargo test --test it layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layer of each top-level module, bottom first. Keep in step with `src/lib.rs`.
const LAYERS: &[(&str, u8)] = &[
    ("error", 0),
    ("metrics", 0),
    ("hash", 0),
    ("headers", 0),
    ("addr", 0),
    ("sync", 0),
    ("watched", 0),
    ("http1", 1),
    ("server", 1),
    ("tls", 1),
    ("access", 1),
    ("payload", 1),
    ("trace", 1),
    ("grpc", 1),
    ("openai", 1),
    ("upstream", 1),
    ("batch", 1),
    ("executor", 1),
    ("route", 2),
    ("config", 3),
    ("proxy", 4),
    ("admin", 4),
    ("probe", 4),
    ("inject", 4),
    ("fleet", 4),
    ("run", 5),
    ("demo", 5),
    ("cli", 5),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path (`config::store`) of every file under `src/`, with its text.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src()).unwrap().with_extension("");
            let mut segs: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if segs.last().is_some_and(|s| s == "mod") {
                segs.pop();
            }
            if segs == ["lib"] || segs == ["main"] {
                segs.clear();
            }
            (segs.join("::"), std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The code of a file without comments and without its `mod tests { .. }` block
/// (tests may reach anywhere).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path the text names through `crate::` or `super::`, as segment lists
/// (groups such as `crate::a::{b, c::d}` expand to each member).
fn paths(module: &str, text: &str) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let bytes: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let (kw, base): (usize, Vec<String>) = if rest.starts_with("crate::") {
            (7, vec![])
        } else if rest.starts_with("super::") {
            let mut b: Vec<String> = module.split("::").map(String::from).collect();
            b.pop();
            (7, b)
        } else {
            i += 1;
            continue;
        };
        if i > 0 && ident(bytes[i - 1]) {
            i += 1;
            continue;
        }
        i += kw;
        let mut segs = base;
        loop {
            if bytes.get(i) == Some(&'{') {
                // A group: each member's segments after the prefix.
                let end = (i..bytes.len()).find(|&j| bytes[j] == '}').unwrap();
                let group: String = bytes[i + 1..end].iter().collect();
                for member in group.split(',') {
                    let mut p = segs.clone();
                    p.extend(
                        member
                            .trim()
                            .trim_start_matches('{')
                            .split("::")
                            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
                            .filter(|s| !s.is_empty() && s != "self"),
                    );
                    out.push(p);
                }
                i = end;
                break;
            }
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            segs.push(bytes[start..i].iter().collect());
            if bytes[i..].starts_with(&[':', ':']) {
                i += 2;
            } else {
                out.push(segs);
                break;
            }
        }
    }
    out
}

/// file module -> the modules it imports (the longest module prefix of each path).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let known: BTreeSet<&String> = mods.keys().collect();
    mods.iter()
        .map(|(m, text)| {
            let deps = paths(m, &code(text))
                .into_iter()
                .filter_map(|segs| {
                    (1..=segs.len())
                        .rev()
                        .map(|n| segs[..n].join("::"))
                        .find(|p| known.contains(p))
                })
                // A file naming its own submodules or parents is not an import.
                .filter(|d| d != m && !m.starts_with(&format!("{d}::")))
                .filter(|d| !d.starts_with(&format!("{m}::")))
                .collect();
            (m.clone(), deps)
        })
        .collect()
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap()
}

fn layer(m: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(n, _)| *n == top(m))
        .unwrap_or_else(|| panic!("module {m} has no layer: add it to LAYERS and lib.rs"))
        .1
}

/// The cycles of a graph, as its strongly connected components larger than one.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    // Two nodes share a component when each reaches the other.
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for d in g.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|k| (k, reach(k))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for a in g.keys() {
        let comp: BTreeSet<String> = g
            .keys()
            .filter(|b| reaches[a].contains(*b) && reaches[*b].contains(a))
            .cloned()
            .collect();
        if comp.len() > 1 && !out.contains(&comp) {
            out.push(comp);
        }
    }
    out
}

#[test]
fn no_file_imports_another_in_a_circle() {
    let g = graph();
    assert!(g.len() > 40, "found only {} files under src/", g.len());
    let found = cycles(&g);
    assert!(found.is_empty(), "import circles between files: {found:?}");
    let tops: BTreeMap<String, BTreeSet<String>> =
        g.iter().fold(BTreeMap::new(), |mut acc, (m, deps)| {
            let entry = acc.entry(top(m).to_string()).or_default();
            entry.extend(
                deps.iter()
                    .map(|d| top(d).to_string())
                    .filter(|d| d != top(m)),
            );
            acc
        });
    let found = cycles(&tops);
    assert!(
        found.is_empty(),
        "import circles between modules: {found:?}"
    );
}

#[test]
fn imports_point_down_the_layers() {
    let mut wrong = Vec::new();
    for (m, deps) in graph() {
        if m.is_empty() {
            continue; // lib.rs declares every module
        }
        for d in deps {
            if layer(&d) > layer(&m) {
                wrong.push(format!(
                    "{m} (layer {}) imports {d} (layer {})",
                    layer(&m),
                    layer(&d)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "upward imports:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_relative_imports() {
    let p = paths(
        "config::store",
        "use super::{ConfigError, schema::Document};\nuse crate::{hash, addr::Upstream};\nlet x = crate::route::live::Registry::new();",
    );
    assert!(
        p.contains(&vec!["config".into(), "ConfigError".into()]),
        "{p:?}"
    );
    assert!(p.contains(&vec!["config".into(), "schema".into(), "Document".into()]));
    assert!(p.contains(&vec!["hash".into()]), "{p:?}");
    assert!(p.contains(&vec!["addr".into(), "Upstream".into()]), "{p:?}");
    assert!(p.contains(&vec![
        "route".into(),
        "live".into(),
        "Registry".into(),
        "new".into()
    ]));
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
        ("c".to_string(), BTreeSet::new()),
    ]
    .into();
    assert_eq!(cycles(&g).len(), 1, "a circle of two is found");
}

/// The layer table in the crate doc of `src/lib.rs` ("the one copy" of the map) names
/// every top-level module at the layer this test gives it, and nothing else: the map
/// cannot drift from what is checked.
#[test]
fn the_crate_doc_s_layer_table_is_this_test_s() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut documented: BTreeMap<String, u8> = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | ") else {
            continue;
        };
        let mut cells = row.split(" | ");
        let Some(layer) = cells.next().and_then(|c| c.trim().parse::<u8>().ok()) else {
            continue;
        };
        for m in cells.next().unwrap_or("").split('`').skip(1).step_by(2) {
            documented.insert(m.to_string(), layer);
        }
    }
    let tested: BTreeMap<String, u8> = LAYERS.iter().map(|(m, l)| (m.to_string(), *l)).collect();
    assert_eq!(
        documented, tested,
        "src/lib.rs's layer table and LAYERS differ"
    );
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    let tested: BTreeSet<String> = LAYERS.iter().map(|(m, _)| m.to_string()).collect();
    assert_eq!(declared, tested, "a module of src/lib.rs has no layer");
}
