//! The workspace's shape, checked: stage crates (`ingest`, `vqgan`, `train`, `infer`) meet only
//! through manifests and never depend on one another, every crate depends only on the layers
//! below it (`manifests`, `shapes` <- `nn` <- `models` <- stages), and no crate's source files
//! import each other in a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const STAGES: [&str; 4] = ["ingest", "vqgan", "train", "infer"];

/// Which workspace crates each crate may depend on (any dependency kind).
fn allowed(name: &str) -> &'static [&'static str] {
    match name {
        "manifests" | "shapes" => &[],
        "nn" => &["manifests"],
        "models" => &["manifests", "nn"],
        "ingest" => &["manifests", "shapes"],
        "vqgan" | "train" => &["manifests", "nn", "models"],
        "infer" => &["manifests", "shapes", "nn", "models"],
        _ => &[],
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("manifests/ sits in the workspace root")
        .to_path_buf()
}

/// `cargo metadata` of the workspace; `resolved` adds the dependency graph for this host.
fn metadata(resolved: bool) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(workspace_root().join("Cargo.toml"));
    if resolved {
        command.args(["--filter-platform", &host_triple()]);
    } else {
        command.arg("--no-deps");
    }
    let output = command.output().expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// The platform this test runs on, as rustc names it.
fn host_triple() -> String {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

#[test]
fn crates_depend_only_on_the_layers_below_and_stages_never_on_each_other() {
    let metadata = metadata(false);
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|id| {
            metadata["packages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["id"] == *id)
                .and_then(|p| p["name"].as_str())
        })
        .collect();
    for stage in STAGES {
        assert!(members.contains(stage), "{stage} is not a workspace member");
    }
    let mut problems = Vec::new();
    for package in metadata["packages"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap();
        if !members.contains(name) {
            continue;
        }
        for dependency in package["dependencies"].as_array().unwrap() {
            let on = dependency["name"].as_str().unwrap();
            if members.contains(on) && !allowed(name).contains(&on) {
                problems.push(format!("{name} depends on {on}"));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn the_inference_server_builds_no_other_stage() {
    let metadata = metadata(true);
    let nodes = metadata["resolve"]["nodes"].as_array().unwrap();
    let name_of = |id: &str| -> String {
        metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .and_then(|p| p["name"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let infer = nodes
        .iter()
        .find(|n| name_of(n["id"].as_str().unwrap()) == "infer")
        .unwrap();
    // Everything infer links or builds (dev-dependencies of its own tests aside).
    let mut seen = BTreeSet::new();
    let mut todo = vec![infer["id"].as_str().unwrap().to_string()];
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let node = nodes.iter().find(|n| n["id"] == id.as_str()).unwrap();
        for dep in node["deps"].as_array().unwrap() {
            let normal_or_build = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"] != "dev");
            if normal_or_build {
                todo.push(dep["pkg"].as_str().unwrap().to_string());
            }
        }
    }
    let names: BTreeSet<String> = seen.iter().map(|id| name_of(id)).collect();
    for stage in ["ingest", "vqgan", "train"] {
        assert!(!names.contains(stage), "infer builds {stage}");
    }
    // No C of a stage (ingest's libjpeg-turbo glue is its build script): the C infer does build
    // comes with the storage libraries (aws-lc-sys for TLS, zstd-sys for Parquet), which every
    // stage reads manifests and shards through, and with nn, whose build script compiles its
    // c10d glue against libtorch in the tch build only (libtorch, which that build of infer
    // links anyway).
    for package in metadata["packages"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap();
        let local = package["source"].is_null();
        let build_script = package["targets"].as_array().unwrap().iter().any(|t| {
            t["kind"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k == "custom-build")
        });
        assert!(
            !(local && build_script && names.contains(name)) || name == "nn",
            "infer builds {name}'s build script"
        );
    }
}

/// `crate::name` references of one crate's source files, by module (file stem).
fn module_imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut graph = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        // The top module a file belongs to: `loss/mod.rs` and `loss/perceptual.rs` are `loss`.
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let imports: &mut BTreeSet<String> = graph.entry(top.clone()).or_default();
        for (at, _) in text.match_indices("crate::") {
            let name: String = text[at + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let is_module = src.join(format!("{name}.rs")).exists() || src.join(&name).is_dir();
            if is_module && name != top {
                imports.insert(name);
            }
        }
        // `use crate::{a, b}` lists.
        for (at, _) in text.match_indices("crate::{") {
            let list = &text[at + 8..];
            let list = &list[..list.find('}').unwrap_or(0)];
            for name in list
                .split(',')
                .map(|n| n.trim().split("::").next().unwrap_or(""))
            {
                let is_module = src.join(format!("{name}.rs")).exists();
                if is_module && name != top {
                    imports.insert(name.to_string());
                }
            }
        }
    }
    graph
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_source_files_import_each_other_in_a_cycle() {
    let root = workspace_root();
    for krate in [
        "manifests",
        "shapes",
        "nn",
        "models",
        "ingest",
        "vqgan",
        "train",
        "infer",
    ] {
        let graph = module_imports(&root.join(krate).join("src"));
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate}: modules import each other: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let acyclic: BTreeMap<String, BTreeSet<String>> = [("a", vec!["b"]), ("b", vec![])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
