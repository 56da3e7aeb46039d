//! The crate's layout rules, checked from the source: the library never reaches the
//! command line; each top-level module imports only modules declared below it in
//! `lib.rs` (so there are no import cycles between them); sibling files of one folder do
//! not import each other in a circle; and the layout section of the README lists what
//! the tree holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments (doc links are not imports).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::NAME` a text refers to.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `adesync_crate::`
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

/// The top-level module a library file belongs to (`src/store/devices.rs` → `store`).
fn top_module(path: &Path) -> String {
    let rel = path.strip_prefix(SRC).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The modules `lib.rs` declares, top to bottom.
fn declared_order() -> Vec<String> {
    std::fs::read_to_string(Path::new(SRC).join("lib.rs"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            Some(l.trim_end_matches(';').to_owned())
        })
        .collect()
}

#[test]
fn library_modules_import_only_modules_below_them_and_never_the_cli() {
    let order = declared_order();
    assert!(
        !order.contains(&"cli".to_owned()),
        "lib.rs must not declare cli"
    );
    let rank: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut files = Vec::new();
    rust_files(Path::new(SRC), &mut files);
    let mut violations = Vec::new();
    for f in &files {
        let module = top_module(f);
        if matches!(module.as_str(), "main" | "lib" | "cli") {
            continue;
        }
        let own = *rank
            .get(module.as_str())
            .unwrap_or_else(|| panic!("{} is not declared in lib.rs", f.display()));
        for r in crate_refs(&code(f)) {
            if r == module {
                continue;
            }
            match rank.get(r.as_str()) {
                Some(&other) if other > own => {}
                Some(_) => violations.push(format!(
                    "{} (module {module}) imports {r}, which lib.rs lists above it",
                    f.display()
                )),
                None => violations.push(format!(
                    "{} refers to crate::{r}, which is not a library module",
                    f.display()
                )),
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn sibling_files_of_a_folder_import_each_other_without_cycles() {
    let mut files = Vec::new();
    rust_files(Path::new(SRC), &mut files);
    let mut folders: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name != "mod.rs" && f.parent() != Some(Path::new(SRC)) {
            folders
                .entry(f.parent().unwrap().to_owned())
                .or_default()
                .push(f);
        }
    }
    for (folder, files) in folders {
        let stem = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
        let names: BTreeSet<String> = files.iter().map(|f| stem(f)).collect();
        let edges: BTreeMap<String, BTreeSet<String>> = files
            .iter()
            .map(|f| {
                let text = code(f);
                let uses = names
                    .iter()
                    .filter(|n| **n != stem(f) && text.contains(&format!("super::{n}")))
                    .cloned()
                    .collect();
                (stem(f), uses)
            })
            .collect();
        // Kahn: repeatedly remove files nothing left imports.
        let mut left = edges.clone();
        while let Some(free) = left
            .keys()
            .find(|k| !left.values().any(|deps| deps.contains(*k)))
            .cloned()
        {
            left.remove(&free);
        }
        assert!(
            left.is_empty(),
            "files in {} import each other in a cycle: {left:?}",
            folder.display()
        );
    }
}

#[test]
fn the_cli_is_part_of_the_binary_only() {
    let main = std::fs::read_to_string(Path::new(SRC).join("main.rs")).unwrap();
    assert!(main.contains("mod cli;"), "main.rs declares the cli");
    let mut files = Vec::new();
    rust_files(Path::new(SRC), &mut files);
    for f in files {
        if matches!(top_module(&f).as_str(), "cli" | "main") {
            continue;
        }
        let text = code(&f);
        for word in [
            "println!",
            "eprintln!",
            "print!(",
            "eprint!(",
            "process::exit",
        ] {
            assert!(
                !text.contains(word),
                "{} uses {word}: words for people and exits belong to src/cli/",
                f.display()
            );
        }
    }
}

#[test]
fn the_readme_layout_section_names_every_folder_and_file_of_src() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## How the code is laid out")
        .expect("README has a \"How the code is laid out\" section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(SRC).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let shown = if path.is_dir() {
            format!("{name}/")
        } else {
            name
        };
        if !section.contains(&format!("`src/{shown}`")) {
            missing.push(shown);
        }
    }
    assert!(
        missing.is_empty(),
        "README's layout section does not list: {missing:?}"
    );
}
