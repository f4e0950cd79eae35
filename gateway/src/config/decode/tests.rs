use std::path::Path as FsPath;

use super::*;
use crate::config::FleetRedis;

fn parse_ok(src: &str) -> LoadedConfig {
    match parse(src, "gw.yaml", FsPath::new("/etc/fairgate/gw.yaml")) {
        Ok(c) => c,
        Err(e) => panic!("unexpected errors:\n{e}"),
    }
}

fn parse_err(src: &str) -> String {
    parse(src, "gw.yaml", FsPath::new("/etc/fairgate/gw.yaml"))
        .expect_err("config should be rejected")
        .to_string()
}

const FULL: &str = "\
listen: [127.0.0.1:8080, '[::1]:8080']
admin:
  listen: 127.0.0.1:9090
  token_file: admin.token
workers: 2
runtime: multi_thread
shutdown_grace: 5s
routes:
  - name: export
    host: api.example.com
    path_prefix: /v1/export
    methods: [POST]
    upstream: api
    operation: export
    timeout: 2s
  - upstream: demo
upstreams:
  api:
    targets: [127.0.0.1:8081, 127.0.0.1:8082]
    balance: consistent_hash
    hash_key: {header: x-user}
    health_check: {interval: 2s, path: /healthz, unhealthy_after: 2}
    connect_timeout: 250ms
    request_timeout: 3s
    idle_timeout: 5s
    max_idle: 8
  demo:
    targets: builtin:echo
limits:
  max_header_bytes: 32KiB
  max_headers: 50
  max_body: 1MiB
  header_read_timeout: 5s
  handshake_timeout: 3s
policy: policy.yaml
log:
  decisions: decisions.jsonl
  sample_admits: 0.5
  max_rejections_per_rule: 3
  format: json
  level: debug
";

#[test]
fn decodes_every_field() {
    let c = parse_ok(FULL).config;
    assert_eq!(
        c.listen,
        [
            ListenerConfig::plain("127.0.0.1:8080".parse().unwrap()),
            ListenerConfig::plain("[::1]:8080".parse().unwrap()),
        ]
    );
    assert_eq!(c.runtime, RuntimeModel::MultiThread);
    assert_eq!(c.limits.handshake_timeout, Duration::from_secs(3));
    let admin = c.admin.unwrap();
    assert_eq!(admin.listen.port(), 9090);
    assert_eq!(
        admin.token_file.unwrap(),
        FsPath::new("/etc/fairgate/admin.token")
    );
    assert_eq!(c.workers, Some(2));
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.routes.len(), 2);
    let r = &c.routes[0];
    assert_eq!(r.name, "export");
    assert_eq!(r.host.as_deref(), Some("api.example.com"));
    assert_eq!(r.methods.as_deref(), Some(&[Method::POST][..]));
    assert_eq!(r.operation.as_deref(), Some("export"));
    assert_eq!(r.timeout, Some(Duration::from_secs(2)));
    assert_eq!(c.routes[1].name, "route1");
    assert_eq!(c.routes[1].path_prefix, "/");
    let api = &c.upstreams["api"];
    assert_eq!(api.balance, Balance::ConsistentHash);
    assert_eq!(
        api.hash_key,
        HashKey::Header(HeaderName::from_static("x-user"))
    );
    let hc = api.health_check.as_ref().unwrap();
    assert_eq!(
        (hc.path.as_str(), hc.unhealthy_after, hc.healthy_after),
        ("/healthz", 2, 1)
    );
    assert_eq!(api.connect_timeout, Duration::from_millis(250));
    assert_eq!(
        (api.idle_timeout, api.max_idle),
        (Duration::from_secs(5), 8)
    );
    assert_eq!(c.upstreams["demo"].targets, vec![TargetSpec::Echo]);
    assert_eq!(c.limits.max_header_bytes, 32 * 1024);
    assert_eq!(c.limits.max_body, 1024 * 1024);
    match &c.policy {
        PolicySource::File(p) => assert_eq!(p, FsPath::new("/etc/fairgate/policy.yaml")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.log.decisions,
        DecisionTarget::File("/etc/fairgate/decisions.jsonl".into())
    );
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.max_rejections_per_rule, 3);
}

#[test]
fn minimal_config_gets_defaults_and_an_empty_policy() {
    let loaded = parse_ok(
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\n",
    );
    let c = loaded.config;
    assert!(c.admin.is_none());
    assert_eq!(c.shutdown_grace, Duration::from_secs(10));
    assert_eq!(c.limits.max_headers, 100);
    assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.runtime, RuntimeModel::ThreadPerCore);
    assert_eq!(c.log.decisions, DecisionTarget::Stdout);
    assert_eq!(c.upstreams["u"].balance, Balance::P2cEwma);
    assert_eq!(
        (c.upstreams["u"].idle_timeout, c.upstreams["u"].max_idle),
        (Duration::from_secs(90), 1024)
    );
    assert!(loaded.inline_policy.is_some());
}

#[test]
fn inline_policy_is_decoded_in_place() {
    let loaded = parse_ok(
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\npolicy:\n  version: 1\n  plans:\n    free: {bandwidths: ['10/s burst 20']}\n  default_plan: free\n",
    );
    let p = loaded.inline_policy.unwrap();
    assert_eq!(p.default_plan.as_deref(), Some("free"));
    assert!(matches!(loaded.config.policy, PolicySource::Inline { .. }));
}

#[test]
fn every_error_is_reported_with_its_position() {
    let errors = parse_err(
        "\
listen: 127.0.0.1
workerz: 2
routes:
  - upstream: apii
    path_prefix: v1
upstreams:
  api:
    targets: [nohost, builtin:echo]
    balance: random
limits: {max_header_bytes: 1KiB}
log: {sample_admits: 2}
",
    );
    let lines: Vec<&str> = errors.lines().collect();
    assert_eq!(
        lines,
        [
            "gw.yaml:1:9: listen: `127.0.0.1` is not an address like `127.0.0.1:8080` or `[::1]:8080`",
            "gw.yaml:2:1: workerz: unknown field `workerz` (did you mean `workers`?)",
            "gw.yaml:4:15: routes[0].upstream: no upstream named `apii` (did you mean `api`?)",
            "gw.yaml:5:18: routes[0].path_prefix: `v1` must start with `/`",
            "gw.yaml:8:15: upstreams.api.targets[0]: `nohost` has no port: write it as `nohost:PORT`",
            "gw.yaml:9:14: upstreams.api.balance: unknown value `random` (expected one of `p2c_ewma`, `round_robin`, `consistent_hash`)",
            "gw.yaml:10:28: limits.max_header_bytes: must be between 8KiB and 16MiB",
            "gw.yaml:11:22: log.sample_admits: `2` must be between 0 and 1",
        ],
        "{errors}"
    );
}

#[test]
fn inline_policy_errors_point_into_the_gateway_file() {
    let errors = parse_err(
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\npolicy:\n  version: 1\n  default_plan: nope\n",
    );
    assert!(
        errors.starts_with("gw.yaml:6:17: policy.default_plan: unknown plan `nope`"),
        "{errors}"
    );
    // The section alone, as a reload of the inline policy reads it.
    let errors = inline_policy(
        "listen: 127.0.0.1:0\npolicy:\n  version: 1\n  rules: [{name: x, action: bogus}]\n",
        "gw.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.starts_with("gw.yaml:4:29: policy.rules[0].action: unknown value `bogus`"),
        "{errors}"
    );
}

#[test]
fn inline_policy_compile_errors_are_located_under_policy() {
    let compiled = fairgate_policies::PolicyErrors(vec![
        fairgate_policies::PolicyError {
            file: "policy".into(),
            line: 0,
            column: 0,
            path: "rules[0].when".into(),
            message: "too large".into(),
        },
        fairgate_policies::PolicyError {
            file: "policy".into(),
            line: 0,
            column: 0,
            path: String::new(),
            message: "whole".into(),
        },
    ]);
    assert_eq!(
        locate_inline(compiled, "gw.yaml").to_string(),
        "gw.yaml: policy.rules[0].when: too large\ngw.yaml: policy: whole"
    );
}

#[test]
fn remote_admin_needs_opt_in_and_a_token() {
    let base =
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\n";
    let e = parse_err(&format!("{base}admin: {{listen: 192.0.2.1:9090}}\n"));
    assert!(
        e.contains("admin.listen: `192.0.2.1:9090` is not a loopback address"),
        "{e}"
    );
    let e = parse_err(&format!(
        "{base}admin: {{listen: 192.0.2.1:9090, allow_remote: true}}\n"
    ));
    assert!(e.contains("requires `token` or `token_file`"), "{e}");
    parse_ok(&format!(
        "{base}admin: {{listen: 192.0.2.1:9090, allow_remote: true, token: s3cret}}\n"
    ));
    let e = parse_err(&format!("{base}admin: {{token: a, token_file: b}}\n"));
    assert!(e.contains("give `token` or `token_file`, not both"), "{e}");
}

#[test]
fn missing_sections_are_reported() {
    let e = parse_err("listen: 127.0.0.1:0\n");
    assert!(e.contains("missing field `upstreams`"), "{e}");
    assert!(e.contains("missing field `routes`"), "{e}");
}

#[test]
fn syntax_errors_do_not_panic() {
    let e = parse_err("listen: [127.0.0.1:0\n");
    assert!(e.starts_with("gw.yaml:"), "{e}");
    let e = parse_err("- just\n- a list\n");
    assert!(e.contains("expected a mapping"), "{e}");
}

/// A temp dir with `cert.pem` and `key.pem` (self-signed, `localhost`) and a config parser
/// that resolves relative paths against it.
struct TlsDir(tempfile::TempDir);

impl TlsDir {
    fn new() -> TlsDir {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("garbage.pem"), "garbage\n").unwrap();
        TlsDir(dir)
    }

    fn parse(&self, listen: &str) -> Result<LoadedConfig, PolicyErrors> {
        let src = format!(
            "listen:\n{listen}\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: [builtin:echo]}}}}\n"
        );
        parse(&src, "gw.yaml", &self.0.path().join("gw.yaml"))
    }
}

#[test]
fn listeners_mix_plain_addresses_and_tls_maps() {
    let d = TlsDir::new();
    let c = d
        .parse("  - 127.0.0.1:8080\n  - {address: 127.0.0.1:8443, tls: {cert: cert.pem, key: key.pem}}\n  - address: '[::1]:8081'")
        .unwrap()
        .config;
    assert_eq!(c.listen.len(), 3);
    assert_eq!(
        c.listen[0],
        ListenerConfig::plain("127.0.0.1:8080".parse().unwrap())
    );
    let tls = c.listen[1].tls.as_ref().unwrap();
    assert_eq!(c.listen[1].address.port(), 8443);
    assert_eq!(
        tls.certs,
        [crate::tls::CertificateFiles {
            cert: d.0.path().join("cert.pem"),
            key: d.0.path().join("key.pem"),
        }]
    );
    assert_eq!(
        c.listen[2],
        ListenerConfig::plain("[::1]:8081".parse().unwrap())
    );
}

#[test]
fn tls_errors_point_at_the_file_that_is_wrong() {
    let d = TlsDir::new();
    let errors = |listen: &str| d.parse(listen).unwrap_err().to_string();
    // Line 2 is the first listener; columns are those of the values.
    let e = errors("  - {address: 127.0.0.1:0, tls: {cert: nope.pem, key: key.pem}}");
    let missing = d.0.path().join("nope.pem");
    assert!(
        e.starts_with(&format!(
            "gw.yaml:2:40: listen[0].tls.cert: cannot read `{}`: ",
            missing.display()
        )),
        "{e}"
    );
    let e = errors("  - {address: 127.0.0.1:0, tls: {cert: garbage.pem, key: key.pem}}");
    assert_eq!(
        e,
        format!(
            "gw.yaml:2:40: listen[0].tls.cert: `{}` holds no PEM certificate",
            d.0.path().join("garbage.pem").display()
        )
    );
    let e = errors("  - {address: 127.0.0.1:0, tls: {cert: cert.pem, key: cert.pem}}");
    assert!(
        e.starts_with("gw.yaml:2:55: listen[0].tls.key: `")
            && e.contains("holds no PEM private key"),
        "{e}"
    );
    // A key of another certificate: the pair is wrong, reported at `tls`.
    let other = TlsDir::new();
    let e = errors(&format!(
        "  - {{address: 127.0.0.1:0, tls: {{cert: cert.pem, key: '{}'}}}}",
        other.0.path().join("key.pem").display()
    ));
    assert!(
        e.starts_with(
            "gw.yaml:2:33: listen[0].tls: the certificate and key cannot be used together"
        ),
        "{e}"
    );
}

#[test]
fn tls_map_shape_errors_are_reported_at_once() {
    let d = TlsDir::new();
    let e = d
        .parse("  - {address: nowhere, tls: {cert: cert.pem, kee: key.pem}}\n  - {tls: {cert: '', key: key.pem}}")
        .unwrap_err()
        .to_string();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(
        lines,
        [
            "gw.yaml:2:15: listen[0].address: `nowhere` is not an address like `127.0.0.1:8080` or `[::1]:8080`",
            "gw.yaml:2:29: listen[0].tls: missing field `key`",
            "gw.yaml:2:46: listen[0].tls.kee: unknown field `kee` (did you mean `key`?)",
            "gw.yaml:3:5: listen[1]: missing field `address`",
            "gw.yaml:3:18: listen[1].tls.cert: must not be empty",
        ],
        "{e}"
    );
}

impl TlsDir {
    /// Writes `NAME.pem` / `NAME-key.pem`: a self-signed certificate for `names`, valid
    /// until `until` (year).
    fn add(&self, file: &str, names: &[&str], until: i32) {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(self.0.path().join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(
            self.0.path().join(format!("{file}-key.pem")),
            key.serialize_pem(),
        )
        .unwrap();
    }
}

#[test]
fn a_listener_takes_a_list_of_certificates() {
    let d = TlsDir::new();
    d.add("a", &["a.test"], 2100);
    d.add("b", &["b.test", "*.b.test"], 2100);
    let c = d
        .parse("  - address: 127.0.0.1:0\n    tls:\n      certs:\n        - {cert: a.pem, key: a-key.pem}\n        - {cert: b.pem, key: b-key.pem}")
        .unwrap()
        .config;
    let certs = &c.listen[0].tls.as_ref().unwrap().certs;
    let names: Vec<_> = certs
        .iter()
        .map(|c| (c.cert.file_name().unwrap(), c.key.file_name().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("a.pem".as_ref(), "a-key.pem".as_ref()),
            ("b.pem".as_ref(), "b-key.pem".as_ref())
        ]
    );
}

#[test]
fn certificate_lists_are_checked_with_positions() {
    let d = TlsDir::new();
    d.add("a", &["a.test"], 2100);
    d.add("dup", &["x.test", "a.test"], 2100);
    d.add("old", &["old.test"], 2021);
    let errors = |listen: &str| d.parse(listen).unwrap_err().to_string();
    let dir = d.0.path().display().to_string();
    let cases = [
        (
            "  - {address: 127.0.0.1:0, tls: {certs: []}}",
            "gw.yaml:2:41: listen[0].tls.certs: must list at least one certificate (the first is the default)".to_owned(),
        ),
        (
            "  - {address: 127.0.0.1:0, tls: {certs: [{cert: a.pem}]}}",
            "gw.yaml:2:42: listen[0].tls.certs[0]: missing field `key`".to_owned(),
        ),
        (
            "  - {address: 127.0.0.1:0, tls: {cert: a.pem, key: a-key.pem, certs: [{cert: a.pem, key: a-key.pem}]}}",
            "gw.yaml:2:34: listen[0].tls.cert: `cert` and `certs` cannot be used together: list every certificate under `certs`\n\
             gw.yaml:2:47: listen[0].tls.key: `key` and `certs` cannot be used together: list every certificate under `certs`".to_owned(),
        ),
        (
            "  - {address: 127.0.0.1:0, tls: {certs: [{cert: a.pem, key: a-key.pem}, {cert: dup.pem, key: dup-key.pem}]}}",
            format!("gw.yaml:2:80: listen[0].tls.certs[1].cert: `{dir}/dup.pem` names `a.test`, which is already a name of certs[0]"),
        ),
        (
            "  - {address: 127.0.0.1:0, tls: {cert: old.pem, key: old-key.pem}}",
            format!("gw.yaml:2:40: listen[0].tls.cert: `{dir}/old.pem` expired at 2021-01-01T00:00:00Z"),
        ),
        (
            "  - {address: 127.0.0.1:0, tls: {certs: [{cert: a.pem, key: a-key.pem}, {cert: a.pem, key: dup-key.pem}]}}",
            "gw.yaml:2:73: listen[0].tls.certs[1]: the certificate and key cannot be used together: keys may not be consistent: KeyMismatch".to_owned(),
        ),
    ];
    for (listen, want) in cases {
        assert_eq!(errors(listen), want, "{listen}");
    }
}

#[test]
fn runtime_and_handshake_timeout_are_checked() {
    let e = parse_err(
        "listen: 127.0.0.1:0\nruntime: green_threads\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\nlimits: {handshake_timeout: 0s}\n",
    );
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(
        lines,
        [
            "gw.yaml:2:10: runtime: unknown value `green_threads` (expected one of `multi_thread`, `thread_per_core`)",
            "gw.yaml:5:29: limits.handshake_timeout: must be greater than zero",
        ],
        "{e}"
    );
}

#[test]
fn audit_mode_needs_a_decision_log() {
    let base =
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\n";
    let c = parse_ok(&format!("{base}log: {{decisions: d.jsonl, audit: true}}\n"));
    assert!(c.config.log.audit);
    assert!(!parse_ok(base).config.log.audit);
    let errors = parse_err(&format!("{base}log: {{decisions: off, audit: true}}\n"));
    assert_eq!(
        errors,
        "gw.yaml:4:30: log.audit: needs a decision log: set `decisions` to a file or `stdout`"
    );
}

#[test]
fn upstream_keep_alive_settings_are_checked() {
    let errors = parse_err(
        "\
listen: 127.0.0.1:0
routes: [{upstream: u}]
upstreams:
  u: {targets: [builtin:echo], idle_timeout: 0s, max_idle: -1}
",
    );
    assert!(
        errors.contains("gw.yaml:4:46: upstreams.u.idle_timeout:"),
        "{errors}"
    );
    assert!(errors.contains("upstreams.u.max_idle:"), "{errors}");
    let errors = parse_err(
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo], max_idle: 100000}}\n",
    );
    assert!(errors.contains("upstreams.u.max_idle:"), "{errors}");
}

#[test]
fn hash_keys_use_the_glossary_words() {
    let cfg = |key: &str| {
        format!(
            "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: [builtin:echo], balance: consistent_hash, hash_key: {key}}}}}\n"
        )
    };
    let ok = parse_ok(&cfg("peer"));
    assert_eq!(ok.config.upstreams["u"].hash_key, HashKey::Peer);
    let ok = parse_ok(&cfg("{header: x-user}"));
    assert_eq!(
        ok.config.upstreams["u"].hash_key,
        HashKey::Header(HeaderName::from_static("x-user"))
    );
    // `client` is the client key everywhere else; here it meant the peer: refused, with the
    // word to use.
    let errors = parse_err(&cfg("client"));
    assert!(
        errors.contains("upstreams.u.hash_key: `client` is not a balancing key: write `peer`"),
        "{errors}"
    );
    let errors = parse_err(&cfg("header:x-user"));
    assert!(
        errors.contains("upstreams.u.hash_key: write a header key as `{header: x-user}`"),
        "{errors}"
    );
}

#[test]
fn the_dashboard_is_on_by_default_and_its_history_is_bounded() {
    let base =
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\n";
    let dash = |admin: &str| {
        parse_ok(&format!("{base}admin: {admin}\n"))
            .config
            .admin
            .expect("admin")
            .dashboard
    };
    let d = dash("{listen: 127.0.0.1:0}").expect("on by default");
    assert_eq!((d.step, d.points), (Duration::from_secs(5), 720));
    assert_eq!(dash("{dashboard: false}"), None);
    let d = dash("{dashboard: {step: 15s, history: 1day}}").expect("on");
    assert_eq!((d.step, d.points), (Duration::from_secs(15), 5_760));
    for (bad, msg) in [
        (
            "{dashboard: {step: 500ms}}",
            "admin.dashboard.step: must be whole seconds, at least 1s",
        ),
        (
            "{dashboard: {step: 1500ms}}",
            "admin.dashboard.step: must be whole seconds",
        ),
        (
            "{dashboard: {step: 1min, history: 10s}}",
            "admin.dashboard.history: must be at least one `step`",
        ),
        (
            "{dashboard: {step: 1s, history: 1day}}",
            "keeps 86400 samples of `step`; at most 7200",
        ),
        ("{dashboard: yes}", "admin.dashboard"),
        ("{dashboard: {steps: 5s}}", "steps"),
    ] {
        let e = parse_err(&format!("{base}admin: {bad}\n"));
        assert!(e.contains(msg), "{bad}: {e}");
    }
}

#[test]
fn the_alert_sender_block_is_checked_and_defaults() {
    let base =
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\n";
    let c = parse_ok(base);
    assert_eq!(c.config.alerts.queue, 1024);
    assert_eq!(c.config.alerts.attempts, 4);
    let c = parse_ok(&format!(
        "{base}alerts: {{queue: 16, max_crossings: 100, attempts: 2, timeout: 500ms, backoff: 1s}}\n"
    ));
    let a = &c.config.alerts;
    assert_eq!((a.queue, a.max_crossings, a.attempts), (16, 100, 2));
    assert_eq!(
        (a.timeout, a.backoff),
        (Duration::from_millis(500), Duration::from_secs(1))
    );
    let e = parse_err(&format!(
        "{base}alerts: {{queue: 0, attempts: 50, timeout: 0s, retries: 3}}\n"
    ));
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(
        lines,
        [
            "gw.yaml:4:17: alerts.queue: must be at least 1",
            "gw.yaml:4:30: alerts.attempts: 50 is out of range (1 to 20)",
            "gw.yaml:4:43: alerts.timeout: must be greater than zero",
            "gw.yaml:4:47: alerts.retries: unknown field `retries` (expected one of `queue`, `max_crossings`, `attempts`, `timeout`, `backoff`)",
        ],
        "{e}"
    );
}

#[test]
fn a_hash_balance_factor_bounds_consistent_hash_only() {
    let cfg = |balance: &str, factor: &str| {
        format!(
            "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: [builtin:echo], balance: {balance}, hash_balance_factor: {factor}}}}}\n"
        )
    };
    let ok = parse_ok(&cfg("consistent_hash", "125%"));
    assert_eq!(ok.config.upstreams["u"].hash_balance_factor, Some(1.25));
    let ok = parse_ok(&cfg("consistent_hash", "1.5"));
    assert_eq!(ok.config.upstreams["u"].hash_balance_factor, Some(1.5));
    let errors = parse_err(&cfg("consistent_hash", "90%"));
    assert!(
        errors.contains("upstreams.u.hash_balance_factor: `90%` must be between 100% and 1000%"),
        "{errors}"
    );
    let errors = parse_err(&cfg("consistent_hash", "lots"));
    assert!(
        errors.contains("upstreams.u.hash_balance_factor:"),
        "{errors}"
    );
    let errors = parse_err(&cfg("p2c_ewma", "125%"));
    assert!(
        errors.contains("upstreams.u.hash_balance_factor: `hash_balance_factor` bounds `balance: consistent_hash`; this pool does not hash"),
        "{errors}"
    );
}

#[test]
fn an_outbound_fleet_block_decodes_and_every_bad_value_is_located() {
    let c = parse_ok(
        "\
listen: 127.0.0.1:0
routes: [{upstream: api}]
upstreams:
  api:
    targets: [127.0.0.1:9]
    outbound:
      rate: 10/s
      cache: {ttl: 30s}
      fleet: {redis: {url: 'redis://127.0.0.1:6379', timeout: 50ms, key_prefix: fg}, name: quotas, lease: 3s}
  other:
    targets: [127.0.0.1:9]
    outbound: {concurrency: 4, fleet: {redis: state}}
",
    );
    let fleet = |pool: &str| {
        c.config.upstreams[pool]
            .outbound
            .as_ref()
            .and_then(|o| o.fleet.clone())
            .unwrap()
    };
    let f = fleet("api");
    let FleetRedis::Own(r) = &f.redis else {
        panic!("{:?}", f.redis)
    };
    assert_eq!(r.url.as_deref(), Some("redis://127.0.0.1:6379"));
    assert_eq!(
        (r.timeout.0, r.key_prefix.as_str()),
        (Duration::from_millis(50), "fg")
    );
    assert_eq!(f.name.as_deref(), Some("quotas"));
    assert_eq!(
        (f.lease, f.max_wait),
        (Duration::from_secs(3), Duration::from_secs(5))
    );
    assert_eq!(fleet("other").redis, FleetRedis::State);

    let errors = parse_err(
        "\
listen: 127.0.0.1:0
routes: [{upstream: api}]
upstreams:
  api:
    targets: [127.0.0.1:9]
    outbound:
      retry: {}
      fleet: {redis: states, name: 'a b', lease: 0s}
  b:
    targets: [127.0.0.1:9]
    outbound: {rate: 1/s, fleet: {redis: {url: 'http://x:1', mode: exact}}}
  c:
    targets: [127.0.0.1:9]
    outbound: {rate: 1/s, fleet: {name: x}}
",
    );
    let lines: Vec<&str> = errors.lines().collect();
    assert_eq!(
        lines,
        [
            "gw.yaml:8:7: upstreams.api.outbound.fleet: `fleet` holds `rate`, `concurrency` and `cache` for the fleet: set at least one of them",
            "gw.yaml:8:22: upstreams.api.outbound.fleet.redis: `states` must be `state` (the policy's `state.redis`) or a map {url, timeout, key_prefix}",
            "gw.yaml:8:36: upstreams.api.outbound.fleet.name: a name must be non-empty, without braces or spaces",
            "gw.yaml:8:50: upstreams.api.outbound.fleet.lease: must be greater than zero",
            "gw.yaml:11:48: upstreams.b.outbound.fleet.redis.url: `http://x:1` is not a redis url (expected `redis://host:port`)",
            "gw.yaml:11:62: upstreams.b.outbound.fleet.redis.mode: unknown field `mode` (expected one of `url`, `timeout`, `key_prefix`)",
            "gw.yaml:14:34: upstreams.c.outbound.fleet: missing field `redis`",
        ],
        "{errors}"
    );
}

#[test]
fn targets_may_be_names_with_ports() {
    let src = "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [API.Internal.:8080, 127.0.0.1:8081, '[::1]:8082', web-1.svc:80]}}\n";
    let c = parse_ok(src).config;
    assert_eq!(
        c.upstreams["u"].targets,
        [
            TargetSpec::Name {
                host: "api.internal".into(),
                port: 8080
            },
            TargetSpec::Addr("127.0.0.1:8081".parse().unwrap()),
            TargetSpec::Addr("[::1]:8082".parse().unwrap()),
            TargetSpec::Name {
                host: "web-1.svc".into(),
                port: 80
            },
        ]
    );
    assert_eq!(c.resolver, crate::config::ResolverConfig::default());
}

#[test]
fn bad_target_names_and_resolver_settings_have_positions() {
    let src = "listen: 127.0.0.1:0
routes: [{upstream: u}]
upstreams:
  u:
    targets:
      - api.internal
      - api.internal:0
      - api.internal:http
      - bad_name:80
      - -api.internal:80
      - 10.0.0.300:80
      - '[::1]'
      - 10.0.0.1
      - '[nope]:80'
resolver: {nameservers: [127.0.0.1], timeout: 0s}
";
    let e = parse_err(src);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(
        lines,
        [
            "gw.yaml:6:9: upstreams.u.targets[0]: `api.internal` has no port: write it as `api.internal:PORT`",
            "gw.yaml:7:9: upstreams.u.targets[1]: `api.internal:0`: `0` is not a port (1-65535)",
            "gw.yaml:8:9: upstreams.u.targets[2]: `api.internal:http`: `http` is not a port (1-65535)",
            "gw.yaml:9:9: upstreams.u.targets[3]: `bad_name:80`: `bad_name` is not a host name: only letters, digits, hyphens and dots may be used",
            "gw.yaml:10:9: upstreams.u.targets[4]: `-api.internal:80`: `-api.internal` is not a host name: a label may not start or end with a hyphen",
            "gw.yaml:11:9: upstreams.u.targets[5]: `10.0.0.300:80`: `10.0.0.300` is not a host name: it is all digits (an IPv4 address needs four numbers up to 255)",
            "gw.yaml:12:9: upstreams.u.targets[6]: `[::1]` has no port: write it as `[::1]:PORT`",
            "gw.yaml:13:9: upstreams.u.targets[7]: `10.0.0.1` has no port: write it as `10.0.0.1:PORT`",
            "gw.yaml:14:9: upstreams.u.targets[8]: `[nope]:80` is not a target like `127.0.0.1:8081`, `api.internal:8080` or `builtin:echo`",
            "gw.yaml:15:26: resolver.nameservers[0]: `127.0.0.1` is not an address like `127.0.0.1:8080` or `[::1]:8080`",
            "gw.yaml:15:47: resolver.timeout: must be greater than zero",
        ],
        "{e}"
    );
    let e = parse_err(
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [a.b:1]}}\nresolver: {min_ttl: 10s, max_ttl: 5s, nameservers: []}\n",
    );
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(
        lines,
        [
            "gw.yaml:4:35: resolver.max_ttl: must be at least `min_ttl` (10s)",
            "gw.yaml:4:52: resolver.nameservers: must list at least one server (or leave `nameservers` out for /etc/resolv.conf)",
        ],
        "{e}"
    );
}
