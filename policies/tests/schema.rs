//! The JSON Schema that `fairgate schema` prints, checked by a real validator (`jsonschema`):
//! every example policy is valid against it, and documents the decoder refuses for their
//! shape are refused by the schema too. Five of the schema's parts are hand-written
//! (`StringMatch`, `Action`, `Bandwidth`, `ShedLimit` and the units), so they can drift from
//! the decoder; this is what catches it.

use std::path::Path;

use fairgate_policies::model::json_schema;
use fairgate_policies::PolicyStore;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// A YAML document as the JSON value an editor's YAML language server validates.
fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(s.clone()), Value::Number),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Null | Yaml::BadValue | Yaml::Alias(_) => Value::Null,
    }
}

fn doc(text: &str) -> Value {
    let docs = YamlLoader::load_from_str(text).expect("YAML");
    to_json(&docs[0])
}

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&json_schema()).expect("the schema is a valid JSON Schema")
}

fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn every_example_policy_is_valid_against_the_schema() {
    let v = validator();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["examples/policy.yaml", "examples/gateway-policy.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        PolicyStore::from_yaml_str(&text, file).expect("the example decodes");
        let errs = errors(&v, &doc(&text));
        assert!(errs.is_empty(), "{file}:\n{}", errs.join("\n"));
    }
}

#[test]
fn schema_and_decoder_agree_on_the_shape_of_a_policy() {
    let v = validator();
    let base = "version: 1\nplans: {free: {bandwidths: ['10/s burst 20', 100000/day], concurrency: 4}}\ndefault_plan: free\n";
    // (document, valid?) — all decided by shape alone, so both must give the same answer.
    let cases: &[(&str, bool)] = &[
        (base, true),
        ("version: 1\nrules:\n  - {name: a, when: {path: {prefix: /x}}, action: deny}\n", true),
        ("version: 1\nrules:\n  - {name: a, when: {path: /x}, action: {deny: {status: 451}}}\n", true),
        ("version: 1\nrules:\n  - {name: a, when: {user_agent: {regex: [bot, crawl]}}, action: {limit: {rate: 5/min, key: ip}}}\n", true),
        ("version: 1\nshedding: {limit: 100}\n", true),
        ("version: 1\nshedding: {limit: {adaptive: gradient, min: 10, max: 200}}\n", false),
        ("version: 1\nunknown_key: 1\n", false),
        ("plans: {}\n", false),
        ("version: 1\nrules:\n  - {name: a, when: {path: {prefix: /x, exact: /y}}, action: deny}\n", false),
        ("version: 1\nrules:\n  - {name: a, action: explode}\n", false),
        ("version: 1\nplans: {free: {bandwidths: [{rate: 10/s, burst: 20}]}}\n", true),
        ("version: 1\nplans: {free: {concurrency: many}}\n", false),
    ];
    for (text, valid) in cases {
        let by_decoder = PolicyStore::from_yaml_str(text, "case.yaml");
        let by_schema = errors(&v, &doc(text));
        assert_eq!(
            by_decoder.is_ok(),
            *valid,
            "decoder on {text:?}: {:?}",
            by_decoder.err().map(|e| e.to_string())
        );
        assert_eq!(
            by_schema.is_empty(),
            *valid,
            "schema on {text:?}: {by_schema:?}"
        );
    }
}
