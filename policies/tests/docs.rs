//! The documentation cannot lie: every YAML example in `docs/*.md` and `examples/*.yaml` is
//! checked against the real parser. The markers are documented in `docs/policy.md`
//! ("How this page is tested"):
//!
//! - ```` ```yaml ````: a complete, valid policy that compiles;
//! - ```` ```yaml,invalid ````: must fail; a following ```` ```text ```` block is the exact
//!   error output for a file named `policy.yaml`;
//! - ```` ```yaml,overrides ````: a valid overrides file for the previous policy block;
//! - ```` ```yaml,ignore ````: not checked;
//! - a block or file whose top level has `listen`/`listeners` is a gateway config, and one
//!   whose top level has no policy key at all (e.g. Prometheus alert rules) is not a
//!   policy either: both are skipped;
//! - `examples/*overrides*.yaml`: a valid overrides file for `examples/policy.yaml`.

use std::fs;
use std::path::{Path, PathBuf};

use fairgate_policies::compile::compile;
use fairgate_policies::decode::{parse_overrides_for, parse_policy};
use fairgate_policies::yaml::{self, Limits, NodeKind};
use fairgate_policies::{Policy, PolicyErrors};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A fenced block: its info string (`yaml,invalid`), first line number and text.
struct Block {
    info: String,
    line: usize,
    text: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    open = Some(Block {
                        info: info.trim().to_owned(),
                        line: i + 2,
                        text: String::new(),
                    });
                }
            }
            Some(b) => {
                if trimmed.starts_with("```") {
                    out.extend(open.take());
                } else {
                    b.text.push_str(line);
                    b.text.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "unclosed code fence");
    out
}

/// The top-level keys of a policy.
const POLICY_KEYS: [&str; 12] = [
    "version",
    "identify",
    "rules",
    "plans",
    "default_plan",
    "operations",
    "clients",
    "overrides_file",
    "burst_sharing",
    "shedding",
    "responses",
    "state",
];

/// True for YAML that is not a policy: a gateway config (top-level `listen` or `listeners`),
/// or a mapping with no policy key at all (e.g. Prometheus alert rules). Anything else,
/// including broken YAML, is checked as a policy, so a policy that forgot `version` still fails.
fn is_not_a_policy(src: &str) -> bool {
    let Ok(root) = yaml::parse(src, "x.yaml", &Limits::default()) else {
        return false;
    };
    let NodeKind::Map(entries) = &root.kind else {
        return false;
    };
    let keys: Vec<&str> = entries.iter().filter_map(|(k, _)| k.as_str()).collect();
    keys.iter().any(|k| matches!(*k, "listen" | "listeners"))
        || (!keys.is_empty() && !keys.iter().any(|k| POLICY_KEYS.contains(k)))
}

/// Parse and compile, as `fairgate check` does.
fn check(src: &str, file: &str) -> Result<Policy, PolicyErrors> {
    let policy = parse_policy(src, file)?;
    compile(policy.clone())?;
    Ok(policy)
}

#[test]
fn every_yaml_block_in_the_docs_is_checked() {
    let mut checked = 0;
    let mut docs: Vec<PathBuf> = fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    for doc in docs {
        let markdown = fs::read_to_string(&doc).expect("read doc");
        let name = doc.file_name().unwrap().to_string_lossy().into_owned();
        let blocks = blocks(&markdown);
        let mut last_policy: Option<Policy> = None;
        for (i, b) in blocks.iter().enumerate() {
            let at = format!("{name}:{}", b.line);
            let (lang, marker) = match b.info.split_once(',') {
                Some((l, m)) => (l.trim(), Some(m.trim())),
                None => (b.info.as_str(), None),
            };
            if lang != "yaml" && lang != "yml" {
                continue;
            }
            if marker != Some("ignore") && marker != Some("overrides") && is_not_a_policy(&b.text) {
                continue;
            }
            match marker {
                None => match check(&b.text, "policy.yaml") {
                    Ok(p) => last_policy = Some(p),
                    Err(e) => panic!("{at}: example does not validate:\n{e}\n---\n{}", b.text),
                },
                Some("invalid") => {
                    let e = match check(&b.text, "policy.yaml") {
                        Ok(_) => panic!("{at}: block marked invalid validates:\n{}", b.text),
                        Err(e) => e,
                    };
                    if let Some(next) = blocks.get(i + 1).filter(|n| n.info == "text") {
                        assert_eq!(
                            e.to_string().trim_end(),
                            next.text.trim_end(),
                            "{at}: the documented errors differ from the real ones"
                        );
                    }
                }
                Some("overrides") => {
                    let policy = last_policy.as_ref().unwrap_or_else(|| {
                        panic!("{at}: overrides block without a policy before it")
                    });
                    if let Err(e) = parse_overrides_for(&b.text, "overrides.yaml", policy) {
                        panic!("{at}: overrides example does not validate:\n{e}");
                    }
                }
                Some("ignore") => continue,
                Some(other) => panic!("{at}: unknown yaml block marker `{other}`"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} yaml blocks checked");
}

#[test]
fn every_example_file_is_valid() {
    let dir = repo().join("examples");
    let policy_src = fs::read_to_string(dir.join("policy.yaml")).expect("examples/policy.yaml");
    let main_policy = match check(&policy_src, "examples/policy.yaml") {
        Ok(p) => p,
        Err(e) => panic!("examples/policy.yaml:\n{e}"),
    };
    let overrides = main_policy
        .overrides_file
        .clone()
        .expect("the example names an overrides file");
    assert!(
        dir.join(&overrides).exists(),
        "examples/policy.yaml names {overrides}, which is missing"
    );
    let mut checked = 0;
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for file in files {
        let name = format!("examples/{}", file.file_name().unwrap().to_string_lossy());
        let src = fs::read_to_string(&file).expect("read example");
        if name.contains("overrides") {
            if let Err(e) = parse_overrides_for(&src, &name, &main_policy) {
                panic!("{name}:\n{e}");
            }
        } else if is_not_a_policy(&src) {
            continue;
        } else if let Err(e) = check(&src, &name) {
            panic!("{name}:\n{e}");
        }
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} example files checked");
}

#[test]
fn the_example_uses_every_feature() {
    let src = fs::read_to_string(repo().join("examples/policy.yaml")).unwrap();
    let p = parse_policy(&src, "examples/policy.yaml").unwrap();
    let json = serde_json::to_string(&p).unwrap();
    // Every kind of thing the language has appears at least once.
    for needle in [
        "\"trusted_proxies\":[\"",
        "{\"header\":",
        "{\"query\":",
        "\"bearer\"",
        "\"mode\":\"shadow\"",
        "\"ip\":[",
        "\"user_agent\":",
        "\"path\":",
        "\"method\":",
        "\"host\":",
        "\"headers\":",
        "\"operation\":",
        "\"any\":",
        "\"all\":",
        "\"not\":",
        "{\"exact\":",
        "{\"prefix\":",
        "{\"suffix\":",
        "{\"contains\":",
        "{\"glob\":",
        "{\"regex\":",
        "\"ignore_case\":true",
        "\"present\":true",
        "\"present\":false",
        "\"value\":",
        "{\"deny\":{}}",
        "{\"deny\":{\"status\":",
        "\"allow\"",
        "\"key\":\"ip\"",
        "\"key\":\"client\"",
        "\"key\":\"global\"",
        "\"key\":{\"header\":",
        "\"estimator\":\"sketch\"",
        "{\"tag\":{\"priority\":",
        "{\"tag\":{\"plan\":",
        "\"concurrency\":",
        "\"name\":\"daily\"",
        "\"default_plan\":",
        "\"post_hoc\":{\"bytes\":",
        "\"post_hoc\":{\"duration\":",
        "\"clients\":{\"",
        "\"overrides_file\":",
        "\"burst_sharing\":{\"enabled\":true",
        "{\"adaptive\":",
        "\"thresholds\":",
        "\"reject_delay\":",
        "\"ratelimit_headers\":",
        "\"max_keys\":",
    ] {
        assert!(
            json.contains(needle),
            "examples/policy.yaml never uses {needle}"
        );
    }
}
