//! Hostile input is refused early, before it costs time or memory. Each test shows *where* the
//! parser stopped (the first anchor, the 65th level, before reading a byte), which is what
//! makes the rejection fast; no test times anything.

use fairgate_policies::decode::{parse_policy, parse_policy_bytes};

fn first_error(src: &str) -> String {
    parse_policy(src, "h.yaml").unwrap_err().0[0].to_string()
}

#[test]
fn alias_bomb_is_refused_at_its_first_anchor() {
    // "Billion laughs": nine levels of ten aliases each would expand to 10^9 nodes.
    let mut src = String::from("version: 1\na: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (i, (name, prev)) in ["b", "c", "d", "e", "f", "g", "h", "i"]
        .iter()
        .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
        .enumerate()
    {
        let refs = vec![format!("*{prev}"); 9].join(",");
        src.push_str(&format!("{name}: &{name} [{refs}]\n"));
        assert!(i < 8);
    }
    let e = parse_policy(&src, "h.yaml").unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!(
        e.to_string(),
        "h.yaml:2:7: yaml anchors (`&name`) are not supported: write the value out"
    );
}

#[test]
fn ten_thousand_levels_of_nesting_stop_at_level_65() {
    // yaml-rust2's scanner looks ahead inside flow collections and has its own limit, which
    // it reaches first here; either way the parse stops after a few hundred bytes.
    let flow = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(
        first_error(&flow),
        "h.yaml:1:256: invalid yaml: recursion limit exceeded"
    );
    let flow = format!("{}{}", "[".repeat(100), "]".repeat(100));
    assert_eq!(
        first_error(&flow),
        "h.yaml:1:65: nesting deeper than 64 levels"
    );

    let maps = format!("{}1{}", "{a: ".repeat(10_000), "}".repeat(10_000));
    assert_eq!(
        first_error(&maps),
        "h.yaml:1:1021: invalid yaml: recursion limit exceeded"
    );
    let maps = format!("{}1{}", "{a: ".repeat(100), "}".repeat(100));
    assert_eq!(
        first_error(&maps),
        "h.yaml:1:257: nesting deeper than 64 levels"
    );

    // Block style needs indentation, so 1,000 levels already weigh 500 KB.
    let mut block = String::new();
    for depth in 0..1_000 {
        block.push_str(&" ".repeat(depth));
        block.push_str("a:\n");
    }
    assert_eq!(
        first_error(&block),
        "h.yaml:65:66: nesting deeper than 64 levels"
    );

    // Conditions nest through `not`; the same limit applies.
    let nots = format!(
        "version: 1\nrules: [{{name: r, action: deny, when: {}{{path: /}}{}}}]\n",
        "{not: ".repeat(100),
        "}".repeat(100)
    );
    assert!(first_error(&nots).ends_with("nesting deeper than 64 levels"));
}

#[test]
fn deep_but_allowed_nesting_still_decodes() {
    // 20 levels of `not` inside a rule (well under 64 with the enclosing structure).
    let src = format!(
        "version: 1\nrules: [{{name: r, action: deny, when: {}{{path: /}}{}}}]\n",
        "{not: ".repeat(20),
        "}".repeat(20)
    );
    parse_policy(&src, "h.yaml").unwrap();
}

#[test]
fn fifty_mib_is_refused_before_parsing() {
    let big = vec![b'#'; 50 << 20];
    let e = parse_policy_bytes(&big, "h.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "h.yaml: file is 52428800 bytes, more than the limit of 4194304 bytes"
    );
    // The &str entry point refuses it the same way.
    let text = String::from_utf8(big).unwrap();
    assert_eq!(
        first_error(&text),
        "h.yaml: file is 52428800 bytes, more than the limit of 4194304 bytes"
    );
}

#[test]
fn a_file_just_under_the_limit_is_parsed() {
    // 4 MiB of comments after a valid policy: accepted.
    let mut src = String::from("version: 1\n");
    let line = format!("# {}\n", "x".repeat(1021));
    while src.len() + line.len() <= 4 << 20 {
        src.push_str(&line);
    }
    parse_policy(&src, "h.yaml").unwrap();
}

#[test]
fn non_utf8_is_reported_at_its_line_and_column() {
    let e = parse_policy_bytes(b"version: 1\nrules:\n  - name: caf\xe9\n", "h.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "h.yaml:3:14: invalid utf-8 at byte offset 31 (the file must be utf-8 text)"
    );
    // UTF-16 (with its byte-order mark) is not UTF-8 either.
    let e = parse_policy_bytes(b"\xff\xfev\x00", "h.yaml").unwrap_err();
    assert_eq!(e.0[0].line, 1);
    assert_eq!(e.0[0].column, 1);
    // A UTF-8 byte-order mark is fine.
    parse_policy_bytes(b"\xef\xbb\xbfversion: 1\n", "h.yaml").unwrap();
}

#[test]
fn a_million_small_nodes_is_the_ceiling() {
    // Well-formed but absurd: 1.1 million list items (about 2.2 MB, under the size limit).
    let src = format!("version: 1\nx: [{}]\n", vec!["1"; 1_100_000].join(","));
    assert!(src.len() < 4 << 20);
    assert!(first_error(&src).ends_with("more than 1000000 yaml nodes"));
}

#[test]
fn many_errors_do_not_explode() {
    // 20,000 unknown keys: every one reported, in order.
    let mut src = String::from("version: 1\n");
    for i in 0..20_000 {
        src.push_str(&format!("k{i}: 1\n"));
    }
    let e = parse_policy(&src, "h.yaml").unwrap_err();
    assert_eq!(e.len(), 20_000);
    assert_eq!(e.0[0].line, 2);
    assert_eq!(e.0[19_999].line, 20_001);
}
