//! Decoding `gateway.yaml` with the policy crate's decode framework, so a gateway config
//! reports every error at once as `file:line:column: path: message`, exactly like a policy.
//! An inline `policy:` map is decoded by the policy decoder at its place in the same file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::time::Duration;

use fairgate_middleware::dashboard::DashboardConfig;
use fairgate_policies::decode::{
    choice, decode_policy_in, expected, from_str, one_or_many, scalar, uint, variant, Ctx, Decode,
    MapReader, Path,
};
use fairgate_policies::model::{ByteSize, HumanDuration};
use fairgate_policies::yaml::{self, Limits as YamlLimits, Node, NodeKind};
use fairgate_policies::{Policy, PolicyErrors};
use http::header::HeaderName;
use http::Method;

use fairgate_middleware::observe::AlertConfig;

use crate::tls::{CertificateFiles, TlsError};
use crate::upstream_tls::UpstreamTlsError;

use super::model::{
    AccessFormat, AccessLogConfig, AccessTarget, AdminConfig, Balance, DecisionTarget,
    GatewayConfig, HashKey, HealthCheck, Limits, ListenerConfig, LogConfig, LogFormat,
    PolicySource, ResolverConfig, RouteConfig, RuntimeModel, TargetSpec, TlsConfig, UpstreamConfig,
    UpstreamProtocol, UpstreamTls,
};

/// A decoded gateway config, with its inline policy (if it has one) already decoded.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The config.
    pub config: GatewayConfig,
    /// The inline policy, when `policy:` is a map.
    pub inline_policy: Option<Policy>,
}

/// Reads and decodes a gateway config file.
pub fn load(path: &FsPath) -> Result<LoadedConfig, PolicyErrors> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| PolicyErrors::unlocated(&file, format!("cannot read the file: {e}")))?;
    let source =
        fairgate_policies::decode::source_from_bytes(&bytes, &file, &YamlLimits::default())?;
    parse(source, &file, path)
}

/// Decodes gateway config `source`; `path` is where it lives (relative paths in it are
/// resolved against its directory) and `file` the name used in errors.
pub fn parse(source: &str, file: &str, path: &FsPath) -> Result<LoadedConfig, PolicyErrors> {
    let root = yaml::parse(source, file, &YamlLimits::default())?;
    let mut ctx = Ctx::new(file);
    let base = path.parent().map(FsPath::to_path_buf).unwrap_or_default();
    let mut inline_errors = None;
    let decoded = config(&mut ctx, &root, &base, path, &mut inline_errors);
    let mut result = ctx.finish(decoded);
    if let Some(errors) = inline_errors {
        result = match result {
            Ok(_) => Err(errors),
            Err(mut e) => {
                e.0.extend(errors.0);
                e.sort();
                Err(e)
            }
        };
    }
    result
}

/// The inline policy section of a gateway config file, decoded (used by reloads of an
/// inline policy: only the `policy` section is taken from the re-read file).
pub fn inline_policy(source: &str, file: &str) -> Result<Policy, PolicyErrors> {
    let root = yaml::parse(source, file, &YamlLimits::default())?;
    let mut ctx = Ctx::new(file);
    let mut m = MapReader::new(&mut ctx, &root, &Path::Root);
    let node = m.as_mut().and_then(|m| m.entry("policy")).map(|e| e.value);
    match node {
        Some(n) if matches!(n.kind, yaml::NodeKind::Map(_)) => {
            // A fresh context: the rest of the file was checked when the gateway started.
            let mut ctx = Ctx::new(file);
            let policy = decode_policy_in(&mut ctx, n, &Path::Root.key("policy"));
            ctx.finish(policy)
        }
        _ => Err(PolicyErrors::unlocated(
            file,
            "policy: the file no longer has an inline policy map",
        )),
    }
}

/// Errors of compiling an inline policy (`PolicyStore::from_policy` names them after the
/// file `policy`, with paths from the policy's root), located in the gateway config `file`
/// under its `policy` key: `policy.rules[0].when.path`.
pub fn locate_inline(mut errors: PolicyErrors, file: &str) -> PolicyErrors {
    for e in &mut errors.0 {
        file.clone_into(&mut e.file);
        e.path = if e.path.is_empty() {
            "policy".to_owned()
        } else {
            format!("policy.{}", e.path)
        };
    }
    errors
}

fn config(
    ctx: &mut Ctx,
    root: &Node,
    base: &FsPath,
    path: &FsPath,
    inline_errors: &mut Option<PolicyErrors>,
) -> Option<LoadedConfig> {
    let mut m = MapReader::new(ctx, root, &Path::Root)?;
    let listen = m.required_with(ctx, "listen", |c, n, p| {
        one_or_many(c, n, p, |c, n, p| listener(c, n, p, base))
    });
    let admin = m.optional_with(ctx, "admin", |c, n, p| admin(c, n, p, base));
    let workers = m.optional_with(ctx, "workers", |c, n, p| {
        let w = uint(c, n, p, 1024)?;
        if w == 0 {
            c.error(n, p, "must be at least 1");
            return None;
        }
        Some(w as usize)
    });
    let runtime = m
        .optional_with(ctx, "runtime", |c, n, p| {
            choice(
                c,
                n,
                p,
                &[
                    ("multi_thread", RuntimeModel::MultiThread),
                    ("thread_per_core", RuntimeModel::ThreadPerCore),
                ],
            )
        })
        .unwrap_or_default();
    let shutdown_grace = m
        .optional_with(ctx, "shutdown_grace", duration)
        .unwrap_or(Duration::from_secs(10));
    let upstreams_entry = m.entry("upstreams");
    // Every upstream name written, even of pools that fail to decode, for route checks.
    let upstream_names: Option<Vec<String>> = upstreams_entry.and_then(|e| match &e.value.kind {
        yaml::NodeKind::Map(pairs) => Some(
            pairs
                .iter()
                .filter_map(|(k, _)| k.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    });
    let upstreams: Option<BTreeMap<String, UpstreamConfig>> = match upstreams_entry {
        Some(e) => {
            let p = Path::Root;
            let p = p.key("upstreams");
            upstream_map(ctx, e.value, &p, base)
        }
        None => {
            ctx.error(root, &Path::Root, "missing field `upstreams`");
            None
        }
    };
    let routes_entry = m.entry("routes");
    let routes: Option<Vec<RouteConfig>> = match routes_entry {
        Some(e) => {
            let p = Path::Root;
            let p = p.key("routes");
            routes(ctx, e.value, &p, upstream_names.as_deref())
        }
        None => {
            ctx.error(root, &Path::Root, "missing field `routes`");
            None
        }
    };
    let limits = m.optional_with(ctx, "limits", limits).unwrap_or_default();
    let mut inline_policy = None;
    let policy = match m.entry("policy") {
        None => None,
        Some(e) if e.value.is_null() => None,
        Some(e) => match &e.value.kind {
            yaml::NodeKind::Map(_) => {
                // Decoded in its own context (its errors are merged into the file's by
                // `parse`), with full paths: `policy.default_plan`, not `default_plan`.
                let mut pctx = Ctx::new(ctx.file());
                let policy = decode_policy_in(&mut pctx, e.value, &Path::Root.key("policy"));
                match pctx.finish(policy) {
                    Ok(p) => inline_policy = Some(p),
                    Err(errs) => *inline_errors = Some(errs),
                }
                Some(PolicySource::Inline {
                    config_file: path.to_path_buf(),
                })
            }
            _ => {
                let p = Path::Root;
                let p = p.key("policy");
                let file = scalar(
                    ctx,
                    e.value,
                    &p,
                    "a policy file path or an inline policy map",
                )?;
                Some(PolicySource::File(base.join(file)))
            }
        },
    };
    let log = m
        .optional_with(ctx, "log", |c, n, p| log(c, n, p, base))
        .unwrap_or_default();
    let alerts = m.optional_with(ctx, "alerts", alerts).unwrap_or_default();
    let resolver = m
        .optional_with(ctx, "resolver", resolver)
        .unwrap_or_default();
    m.finish(ctx);

    let listen = listen?;
    if listen.is_empty() {
        ctx.error(
            root,
            &Path::Root.key("listen"),
            "at least one listen address is required",
        );
        return None;
    }
    let policy = match policy {
        Some(p) => p,
        None => {
            // No policy: an empty one (admit everything), still reloadable by nobody.
            inline_policy =
                Some(fairgate_policies::decode::parse_policy("version: 1\n", ctx.file()).ok()?);
            PolicySource::Inline {
                config_file: path.to_path_buf(),
            }
        }
    };
    Some(LoadedConfig {
        config: GatewayConfig {
            listen,
            admin: admin.flatten(),
            workers,
            runtime,
            shutdown_grace,
            routes: routes?,
            upstreams: upstreams?,
            limits,
            policy,
            log,
            alerts,
            resolver,
        },
        inline_policy,
    })
}

fn socket_addr(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<SocketAddr> {
    let text = scalar(ctx, node, path, "an address like `127.0.0.1:8080`")?;
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            ctx.error(
                node,
                path,
                format!("`{text}` is not an address like `127.0.0.1:8080` or `[::1]:8080`"),
            );
            None
        }
    }
}

/// A listener: a plain address, or `{address: ADDR, tls: {cert: PATH, key: PATH}}`.
fn listener(ctx: &mut Ctx, node: &Node, path: &Path<'_>, base: &FsPath) -> Option<ListenerConfig> {
    if !matches!(node.kind, yaml::NodeKind::Map(_)) {
        let text = scalar(
            ctx,
            node,
            path,
            "an address like `127.0.0.1:8080` or a map `{address: ADDR, tls: {cert: PATH, key: PATH}}` (or `tls: {certs: [{cert, key}, …]}`)",
        )?;
        return match text.parse::<SocketAddr>() {
            Ok(a) => Some(ListenerConfig::plain(a)),
            Err(_) => {
                ctx.error(
                    node,
                    path,
                    format!("`{text}` is not an address like `127.0.0.1:8080` or `[::1]:8080`"),
                );
                None
            }
        };
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let address = m.required_with(ctx, "address", socket_addr);
    let tls = m.optional_with(ctx, "tls", |c, n, p| tls(c, n, p, base));
    m.finish(ctx);
    Some(ListenerConfig {
        address: address?,
        tls,
    })
}

/// A listener's `tls` map: `{cert, key}` (one certificate) or `{certs: [{cert, key}, …]}`.
/// The files are loaded here too, so that a missing or invalid certificate or key (or an
/// expired one, or a name two certificates share) is reported at its place in the file (and
/// by `fairgate check`).
fn tls(ctx: &mut Ctx, node: &Node, path: &Path<'_>, base: &FsPath) -> Option<TlsConfig> {
    let mut m = MapReader::new(ctx, node, path)?;
    let list = m.entry("certs");
    // Each certificate with where it is written: (files, map node, cert node, key node).
    let certs: Vec<(CertificateFiles, &Node, &Node, &Node)> = match list {
        Some(list) => {
            for key in ["cert", "key"] {
                if let Some(e) = m.entry(key) {
                    ctx.error(
                        e.key_node,
                        &path.key(key),
                        format!(
                            "`{key}` and `certs` cannot be used together: list every \
                             certificate under `certs`"
                        ),
                    );
                }
            }
            m.finish(ctx);
            let certs_path = path.key("certs");
            let certs =
                fairgate_policies::decode::list(ctx, list.value, &certs_path, |c, n, p| {
                    let mut m = MapReader::new(c, n, p)?;
                    let pair = certificate(c, &mut m, n, base);
                    m.finish(c);
                    pair.map(|(files, cert, key)| (files, n, cert, key))
                })?;
            if certs.is_empty() {
                ctx.error(
                    list.value,
                    &certs_path,
                    "must list at least one certificate (the first is the default)",
                );
                return None;
            }
            certs
        }
        None => {
            let pair = certificate(ctx, &mut m, node, base);
            m.finish(ctx);
            let (files, cert, key) = pair?;
            vec![(files, node, cert, key)]
        }
    };
    let files: Vec<CertificateFiles> = certs.iter().map(|c| c.0.clone()).collect();
    if let Err(e) = crate::tls::Certificates::load(&files, std::time::SystemTime::now()) {
        let (f, at_map, cert_node, key_node) = &certs[e.index];
        let certs_path = path.key("certs");
        let map_path = if list.is_some() {
            certs_path.index(e.index)
        } else {
            *path
        };
        let cert_path = map_path.key("cert");
        let key_path = map_path.key("key");
        // The certificate is read first, so a read or PEM error on its path is about it
        // even when one file holds both.
        let (at, at_path) = match (&e.source, e.source.path()) {
            (TlsError::NoKey(_), _) => (*key_node, &key_path),
            (TlsError::NoCertificate(_), _) => (*cert_node, &cert_path),
            (_, Some(p)) if p == f.cert => (*cert_node, &cert_path),
            (_, Some(p)) if p == f.key => (*key_node, &key_path),
            _ => (*at_map, &map_path),
        };
        ctx.error(at, at_path, e.source.to_string());
        return None;
    }
    Some(TlsConfig { certs: files })
}

/// The `cert` and `key` of a certificate's map, with their value nodes.
fn certificate<'n>(
    ctx: &mut Ctx,
    m: &mut MapReader<'n, '_>,
    node: &'n Node,
    base: &FsPath,
) -> Option<(CertificateFiles, &'n Node, &'n Node)> {
    let file = |c: &mut Ctx, n: &Node, p: &Path<'_>| {
        let s = scalar(c, n, p, "a PEM file path")?;
        if s.is_empty() {
            c.error(n, p, "must not be empty");
            return None;
        }
        Some(base.join(s))
    };
    let cert = m.required_with(ctx, "cert", file);
    let key = m.required_with(ctx, "key", file);
    let cert_node = m.entry("cert").map_or(node, |e| e.value);
    let key_node = m.entry("key").map_or(node, |e| e.value);
    Some((
        CertificateFiles {
            cert: cert?,
            key: key?,
        },
        cert_node,
        key_node,
    ))
}

fn duration(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Duration> {
    let d = HumanDuration::decode(ctx, node, path)?;
    Some(d.0)
}

fn positive_duration(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Duration> {
    let d = duration(ctx, node, path)?;
    if d.is_zero() {
        ctx.error(node, path, "must be greater than zero");
        return None;
    }
    Some(d)
}

fn admin(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    base: &FsPath,
) -> Option<Option<AdminConfig>> {
    let mut m = MapReader::new(ctx, node, path)?;
    let listen = m
        .optional_with(ctx, "listen", socket_addr)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090)));
    let token: Option<String> = m.optional(ctx, "token");
    let token_file: Option<String> = m.optional(ctx, "token_file");
    let allow_remote: bool = m.optional(ctx, "allow_remote").unwrap_or(false);
    let dashboard = m
        .optional_with(ctx, "dashboard", dashboard)
        .unwrap_or(Some(DashboardConfig::default()));
    let listen_node = m.entry("listen").map(|e| e.value).unwrap_or(node);
    let token_node = m.entry("token_file").map(|e| e.value);
    m.finish(ctx);
    if token.is_some() && token_file.is_some() {
        ctx.error(
            token_node.unwrap_or(node),
            &path.key("token_file"),
            "give `token` or `token_file`, not both",
        );
    }
    if token.as_deref() == Some("") {
        ctx.error(node, &path.key("token"), "must not be empty");
    }
    let has_token = token.is_some() || token_file.is_some();
    if !listen.ip().is_loopback() {
        if !allow_remote {
            ctx.error(
                listen_node,
                &path.key("listen"),
                format!("`{listen}` is not a loopback address; set `allow_remote: true` and a token to expose the admin API"),
            );
        } else if !has_token {
            ctx.error(
                listen_node,
                &path.key("listen"),
                "a non-loopback admin listener requires `token` or `token_file`",
            );
        }
    }
    Some(Some(AdminConfig {
        listen,
        token,
        token_file: token_file.map(|f| base.join(f)),
        allow_remote,
        dashboard,
    }))
}

/// `dashboard: false`, `true`, or `{step: 5s, history: 1h}`.
fn dashboard(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Option<DashboardConfig>> {
    if let NodeKind::Scalar(..) = node.kind {
        let on: bool = Decode::decode(ctx, node, path)?;
        return Some(on.then(DashboardConfig::default));
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let defaults = DashboardConfig::default();
    let step = m.optional_with(ctx, "step", positive_duration);
    let history = m.optional_with(ctx, "history", positive_duration);
    let step_node = m.entry("step").map_or(node, |e| e.value);
    let history_node = m.entry("history").map_or(node, |e| e.value);
    m.finish(ctx);
    let step = step.unwrap_or(defaults.step);
    let history = history.unwrap_or(defaults.step * u32::try_from(defaults.points).unwrap_or(720));
    if step < Duration::from_secs(1) || step.subsec_nanos() != 0 {
        ctx.error(
            step_node,
            &path.key("step"),
            "must be whole seconds, at least 1s",
        );
        return None;
    }
    if history < step {
        ctx.error(
            history_node,
            &path.key("history"),
            "must be at least one `step`",
        );
        return None;
    }
    let points = history.as_secs() / step.as_secs();
    if points > 7_200 {
        ctx.error(
            history_node,
            &path.key("history"),
            format!("keeps {points} samples of `step`; at most 7200 (raise `step` or shorten `history`)"),
        );
        return None;
    }
    Some(Some(DashboardConfig {
        step,
        points: usize::try_from(points).unwrap_or(720),
    }))
}

fn method(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Method> {
    let text = scalar(ctx, node, path, "an HTTP method")?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_uppercase()) {
        ctx.error(
            node,
            path,
            format!("`{text}` is not an upper-case HTTP method like `GET`"),
        );
        return None;
    }
    Method::from_bytes(text.as_bytes()).ok()
}

fn routes(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    upstreams: Option<&[String]>,
) -> Option<Vec<RouteConfig>> {
    let yaml::NodeKind::Seq(items) = &node.kind else {
        expected(ctx, node, path, "a list of routes");
        return None;
    };
    if items.is_empty() {
        ctx.error(node, path, "at least one route is required");
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = path.index(i);
        match route(ctx, item, &p, i, upstreams) {
            Some(r) => out.push(r),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn route(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    index: usize,
    upstreams: Option<&[String]>,
) -> Option<RouteConfig> {
    let mut m = MapReader::new(ctx, node, path)?;
    let name: Option<String> = m.optional(ctx, "name");
    let host: Option<String> = m.optional(ctx, "host");
    let path_prefix = m.optional_with(ctx, "path_prefix", |c, n, p| {
        let s = scalar(c, n, p, "a path prefix")?;
        if !s.starts_with('/') {
            c.error(n, p, format!("`{s}` must start with `/`"));
            return None;
        }
        Some(s.to_owned())
    });
    let methods = m.optional_with(ctx, "methods", |c, n, p| one_or_many(c, n, p, method));
    let upstream: Option<String> = m.required(ctx, "upstream");
    let upstream_node = m.entry("upstream").map(|e| e.value);
    let operation: Option<String> = m.optional(ctx, "operation");
    let timeout = m.optional_with(ctx, "timeout", positive_duration);
    m.finish(ctx);
    let upstream = upstream?;
    if let (Some(ups), Some(n)) = (upstreams, upstream_node) {
        if !ups.contains(&upstream) {
            let known: Vec<&str> = ups.iter().map(String::as_str).collect();
            let hint =
                match fairgate_policies::decode::did_you_mean(&upstream, known.iter().copied()) {
                    Some(s) => format!(" (did you mean `{s}`?)"),
                    None => String::new(),
                };
            ctx.error(
                n,
                &path.key("upstream"),
                format!("no upstream named `{upstream}`{hint}"),
            );
            return None;
        }
    }
    Some(RouteConfig {
        name: name.unwrap_or_else(|| format!("route{index}")),
        host,
        path_prefix: path_prefix.unwrap_or_else(|| "/".to_owned()),
        methods,
        upstream,
        operation,
        timeout,
    })
}

fn upstream_map(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    base: &FsPath,
) -> Option<BTreeMap<String, UpstreamConfig>> {
    let entries = fairgate_policies::decode::map_entries(ctx, node, path)?;
    if entries.is_empty() {
        ctx.error(node, path, "at least one upstream is required");
        return None;
    }
    let mut out = BTreeMap::new();
    let mut ok = true;
    for e in entries {
        let p = path.key(e.key);
        match upstream(ctx, e.value, &p, base) {
            Some(u) => {
                out.insert(e.key.to_owned(), u);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn target(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<TargetSpec> {
    const LIKE: &str = "a target like `127.0.0.1:8081`, `api.internal:8080` or `builtin:echo`";
    let text = scalar(ctx, node, path, LIKE)?;
    if text == "builtin:echo" {
        return Some(TargetSpec::Echo);
    }
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Some(TargetSpec::Addr(a));
    }
    let mut error = |message: String| {
        ctx.error(node, path, message);
        None
    };
    // An address without a port.
    let bracketed = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
    match (bracketed, text.parse::<std::net::IpAddr>()) {
        (Some(v6), _) if v6.parse::<std::net::Ipv6Addr>().is_ok() => {
            return error(format!("`{text}` has no port: write it as `{text}:PORT`"))
        }
        (_, Ok(std::net::IpAddr::V6(_))) => {
            return error(format!("`{text}` has no port: write it as `[{text}]:PORT`"))
        }
        (_, Ok(std::net::IpAddr::V4(_))) => {
            return error(format!("`{text}` has no port: write it as `{text}:PORT`"))
        }
        _ if text.starts_with('[') => return error(format!("`{text}` is not {LIKE}")),
        _ => {}
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return error(if host_name(text).is_ok() {
            format!("`{text}` has no port: write it as `{text}:PORT`")
        } else {
            format!("`{text}` is not {LIKE}")
        });
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return error(format!("`{text}`: `{port}` is not a port (1-65535)")),
    };
    match host_name(host) {
        Ok(host) => Some(TargetSpec::Name { host, port }),
        Err(why) => error(format!("`{text}`: `{host}` is not a host name: {why}")),
    }
}

/// A DNS host name (RFC 1123: letters, digits and hyphens, labels of 1-63 characters not
/// starting or ending with a hyphen, 253 characters at most; a trailing dot is dropped),
/// lowercase. A name made of digits and dots only is refused (it reads as a bad address).
fn host_name(text: &str) -> Result<String, &'static str> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("a label is empty or longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("only letters, digits, hyphens and dots may be used");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label may not start or end with a hyphen");
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("it is all digits (an IPv4 address needs four numbers up to 255)");
    }
    Ok(name.to_ascii_lowercase())
}

/// The `resolver` map.
fn resolver(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<ResolverConfig> {
    let d = ResolverConfig::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let nameservers = m.optional_with(ctx, "nameservers", |c, n, p| {
        let list = one_or_many(c, n, p, socket_addr)?;
        if list.is_empty() {
            c.error(
                n,
                p,
                "must list at least one server (or leave `nameservers` out for /etc/resolv.conf)",
            );
            return None;
        }
        Some(list)
    });
    let min_ttl = m.optional_with(ctx, "min_ttl", positive_duration);
    let max_ttl = m.optional_with(ctx, "max_ttl", positive_duration);
    let max_node = m.entry("max_ttl").map_or(node, |e| e.value);
    let timeout = m.optional_with(ctx, "timeout", positive_duration);
    m.finish(ctx);
    let config = ResolverConfig {
        nameservers,
        min_ttl: min_ttl.unwrap_or(d.min_ttl),
        max_ttl: max_ttl.unwrap_or(d.max_ttl),
        timeout: timeout.unwrap_or(d.timeout),
    };
    if config.max_ttl < config.min_ttl {
        ctx.error(
            max_node,
            &path.key("max_ttl"),
            format!("must be at least `min_ttl` ({:?})", config.min_ttl),
        );
        return None;
    }
    Some(config)
}

fn upstream(ctx: &mut Ctx, node: &Node, path: &Path<'_>, base: &FsPath) -> Option<UpstreamConfig> {
    let mut m = MapReader::new(ctx, node, path)?;
    let targets = m.required_with(ctx, "targets", |c, n, p| one_or_many(c, n, p, target));
    let targets_node = m.entry("targets").map(|e| e.value);
    let balance = m
        .optional_with(ctx, "balance", |c, n, p| {
            choice(
                c,
                n,
                p,
                &[
                    ("p2c_ewma", Balance::P2cEwma),
                    ("round_robin", Balance::RoundRobin),
                    ("consistent_hash", Balance::ConsistentHash),
                ],
            )
        })
        .unwrap_or_default();
    let hash_key = m
        .optional_with(ctx, "hash_key", hash_key)
        .unwrap_or_default();
    let factor_at = m.entry("hash_balance_factor").map(|e| e.value);
    let hash_balance_factor = m.optional_with(ctx, "hash_balance_factor", balance_factor);
    let health_check = m.optional_with(ctx, "health_check", health_check);
    let connect_timeout = m
        .optional_with(ctx, "connect_timeout", positive_duration)
        .unwrap_or(Duration::from_secs(1));
    let request_timeout = m
        .optional_with(ctx, "request_timeout", positive_duration)
        .unwrap_or(Duration::from_secs(30));
    let idle_timeout = m
        .optional_with(ctx, "idle_timeout", positive_duration)
        .unwrap_or(DEFAULT_IDLE_TIMEOUT);
    let max_idle = m
        .optional_with(ctx, "max_idle", |c, n, p| uint(c, n, p, 65_536))
        .map_or(DEFAULT_MAX_IDLE, |v| v as usize);
    let outbound = m.optional_with(ctx, "outbound", outbound::outbound);
    let protocol_at = m.entry("protocol").map(|e| e.value);
    let protocol = m
        .optional_with(ctx, "protocol", |c, n, p| {
            choice(
                c,
                n,
                p,
                &[
                    ("http1", UpstreamProtocol::Http1),
                    ("h2c", UpstreamProtocol::H2c),
                    ("h2", UpstreamProtocol::H2),
                ],
            )
        })
        .unwrap_or_default();
    let tls_at = m.entry("tls").map(|e| e.value);
    let tls = m.optional_with(ctx, "tls", |c, n, p| upstream_tls(c, n, p, base, protocol));
    m.finish(ctx);
    match (protocol, tls_at, protocol_at) {
        (UpstreamProtocol::H2, None, Some(at)) => ctx.error(
            at,
            &path.key("protocol"),
            "`h2` is HTTP/2 over TLS (ALPN): add a `tls` block, or write `h2c` for HTTP/2 without TLS",
        ),
        (UpstreamProtocol::H2c, Some(_), Some(at)) => ctx.error(
            at,
            &path.key("protocol"),
            "`h2c` is HTTP/2 without TLS: with a `tls` block, write `h2`",
        ),
        _ => {}
    }
    if let (Some(_), Some(targets)) = (tls_at, &targets) {
        if targets.contains(&TargetSpec::Echo) {
            ctx.error(
                targets_node.unwrap_or(node),
                &path.key("targets"),
                "`builtin:echo` speaks plain HTTP: it cannot be a target of a pool with `tls`",
            );
        }
    }
    if let (Some(at), true) = (factor_at, balance != Balance::ConsistentHash) {
        ctx.error(
            at,
            &path.key("hash_balance_factor"),
            "`hash_balance_factor` bounds `balance: consistent_hash`; this pool does not hash",
        );
    }
    let targets = targets?;
    if targets.is_empty() {
        ctx.error(
            targets_node.unwrap_or(node),
            &path.key("targets"),
            "at least one target is required",
        );
        return None;
    }
    Some(UpstreamConfig {
        targets,
        balance,
        hash_key,
        hash_balance_factor,
        health_check,
        connect_timeout,
        request_timeout,
        idle_timeout,
        max_idle,
        outbound,
        protocol,
        tls,
    })
}

/// A pool's `tls` map: `ca`, `server_name`, `cert` + `key`, all optional. The files are
/// loaded here (the client config is built), so a missing or invalid file is reported at its
/// place in the file, as a listener's are.
fn upstream_tls(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    base: &FsPath,
    protocol: UpstreamProtocol,
) -> Option<UpstreamTls> {
    let mut m = MapReader::new(ctx, node, path)?;
    let file = |c: &mut Ctx, n: &Node, p: &Path<'_>| {
        let s = scalar(c, n, p, "a PEM file path")?;
        if s.is_empty() {
            c.error(n, p, "must not be empty");
            return None;
        }
        Some(base.join(s))
    };
    let ca = m.optional_with(ctx, "ca", file);
    let server_name = m.optional_with(ctx, "server_name", |c, n, p| {
        let s = scalar(c, n, p, "a DNS name or an IP address")?;
        match crate::upstream_tls::parse_server_name(s) {
            Some(name) => Some(name),
            None => {
                c.error(n, p, format!("`{s}` is not a DNS name or an IP address"));
                None
            }
        }
    });
    let cert = m.optional_with(ctx, "cert", file);
    let key = m.optional_with(ctx, "key", file);
    // The present (non-null) values, to place errors and to know what was written.
    let mut present = |k: &'static str| m.entry(k).map(|e| e.value).filter(|n| !n.is_null());
    let (ca_node, name_node, cert_node, key_node) = (
        present("ca"),
        present("server_name"),
        present("cert"),
        present("key"),
    );
    m.finish(ctx);
    match (cert_node, key_node) {
        (Some(n), None) => {
            ctx.error(n, &path.key("cert"), "a client `cert` needs its `key`");
            return None;
        }
        (None, Some(n)) => {
            ctx.error(n, &path.key("key"), "a client `key` needs its `cert`");
            return None;
        }
        _ => {}
    }
    // Every present key decoded: a failed one was reported.
    if (ca_node.is_some() && ca.is_none())
        || (name_node.is_some() && server_name.is_none())
        || (cert_node.is_some() && cert.is_none())
        || (key_node.is_some() && key.is_none())
    {
        return None;
    }
    let client_cert = cert.zip(key);
    let built = crate::upstream_tls::client_config(
        ca.as_deref(),
        client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
        protocol,
    );
    let config = match built {
        Ok(config) => config,
        Err(e) => {
            // The file the error is about, else the block.
            let about = match &e {
                UpstreamTlsError::File(f) => f.path().map(FsPath::to_path_buf),
                UpstreamTlsError::BadRoot { path, .. } => Some(path.clone()),
                UpstreamTlsError::NoSystemRoots(_) => None,
            };
            let is = |p: &Option<std::path::PathBuf>| p.is_some() && p.as_ref() == about.as_ref();
            let cert_file = client_cert.as_ref().map(|(c, _)| c.clone());
            let key_file = client_cert.as_ref().map(|(_, k)| k.clone());
            // `ca` is read first, then the certificate, then the key: a file named twice is
            // reported where it was read.
            let (at, at_path) = match &e {
                UpstreamTlsError::File(TlsError::NoKey(_)) => (key_node, path.key("key")),
                UpstreamTlsError::File(TlsError::Config(_)) => (key_node, path.key("key")),
                _ if is(&ca) => (ca_node, path.key("ca")),
                _ if is(&cert_file) => (cert_node, path.key("cert")),
                _ if is(&key_file) => (key_node, path.key("key")),
                _ => (None, *path),
            };
            ctx.error(at.unwrap_or(node), &at_path, e.to_string());
            return None;
        }
    };
    Some(UpstreamTls {
        ca,
        server_name,
        client_cert,
        config,
    })
}

/// `125%` or a factor like `1.25`: at least 100 %, at most 1000 %.
fn balance_factor(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<f64> {
    let what = "a percentage like `125%` or a factor like `1.25`";
    let s = scalar(ctx, node, path, what)?;
    let value = match s.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok().map(|v| v / 100.0),
        None => s.trim().parse::<f64>().ok(),
    };
    match value {
        Some(v) if v.is_finite() && (1.0..=10.0).contains(&v) => Some(v),
        Some(_) => {
            ctx.error(
                node,
                path,
                format!("`{s}` must be between 100% and 1000% (a target may take the average load, at least)"),
            );
            None
        }
        None => {
            expected(ctx, node, path, what);
            None
        }
    }
}

/// An upstream pool's idle keep-alive connections live this long by default.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle keep-alive connections kept per target by default.
const DEFAULT_MAX_IDLE: usize = 1024;

fn hash_key(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<HashKey> {
    if let Some(s) = node.as_str() {
        if s == "client" {
            ctx.error(
                node,
                path,
                "`client` is not a balancing key: write `peer` for the TCP peer's IP (what `client` meant before), or `{header: NAME}`",
            );
            return None;
        }
    }
    Some(match word_or_header(ctx, node, path, "peer")? {
        None => HashKey::Peer,
        Some(h) => HashKey::Header(h),
    })
}

/// `WORD` (`None`) or `{header: NAME}` (the header), the policy's way of writing a key taken
/// from a header.
pub(crate) fn word_or_header(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    word: &'static str,
) -> Option<Option<HeaderName>> {
    if let Some(s) = node.as_str() {
        if let Some(h) = s.strip_prefix("header:") {
            ctx.error(
                node,
                path,
                format!("write a header key as `{{header: {}}}`", h.trim()),
            );
            return None;
        }
    }
    let expected = format!("`{word}` or `{{header: NAME}}`");
    let v = variant(ctx, node, path, &expected)?;
    match (v.name, v.value) {
        (name, None) if name == word => Some(None),
        ("header", Some(value)) => {
            let p = path.key("header");
            let name = scalar(ctx, value, &p, "a header name")?;
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => Some(Some(h)),
                Err(_) => {
                    ctx.error(value, &p, format!("`{name}` is not a valid header name"));
                    None
                }
            }
        }
        _ => {
            fairgate_policies::decode::unknown_variant(ctx, &v, path, &[word, "header"]);
            None
        }
    }
}

fn health_check(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<HealthCheck> {
    let d = HealthCheck::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let interval = m.optional_with(ctx, "interval", positive_duration);
    let check_path = m.optional_with(ctx, "path", |c, n, p| {
        let s = scalar(c, n, p, "a path")?;
        if !s.starts_with('/') || http::uri::PathAndQuery::try_from(s).is_err() {
            c.error(n, p, format!("`{s}` is not a path starting with `/`"));
            return None;
        }
        Some(s.to_owned())
    });
    let timeout = m.optional_with(ctx, "timeout", positive_duration);
    let unhealthy_after = m.optional_with(ctx, "unhealthy_after", count);
    let healthy_after = m.optional_with(ctx, "healthy_after", count);
    m.finish(ctx);
    Some(HealthCheck {
        interval: interval.unwrap_or(d.interval),
        path: check_path.unwrap_or(d.path),
        timeout: timeout.unwrap_or(d.timeout),
        unhealthy_after: unhealthy_after.unwrap_or(d.unhealthy_after),
        healthy_after: healthy_after.unwrap_or(d.healthy_after),
    })
}

fn count(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<u32> {
    let n = uint(ctx, node, path, 1_000_000)?;
    if n == 0 {
        ctx.error(node, path, "must be at least 1");
        return None;
    }
    Some(n as u32)
}

/// `alerts: {queue, max_crossings, attempts, timeout, backoff}`: the usage-alert sender.
fn alerts(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<AlertConfig> {
    let d = AlertConfig::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let queue = m.optional_with(ctx, "queue", count);
    let max_crossings = m.optional_with(ctx, "max_crossings", count);
    let attempts = m.optional_with(ctx, "attempts", |c, n, p| {
        let a = count(c, n, p)?;
        if a > 20 {
            c.error(n, p, format!("{a} is out of range (1 to 20)"));
            return None;
        }
        Some(a)
    });
    let timeout = m.optional_with(ctx, "timeout", positive_duration);
    let backoff = m.optional_with(ctx, "backoff", positive_duration);
    m.finish(ctx);
    Some(AlertConfig {
        queue: queue.map_or(d.queue, |q| q as usize),
        max_crossings: max_crossings.map_or(d.max_crossings, |q| q as usize),
        attempts: attempts.unwrap_or(d.attempts),
        timeout: timeout.unwrap_or(d.timeout),
        backoff: backoff.unwrap_or(d.backoff),
    })
}

fn limits(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Limits> {
    let d = Limits::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let max_header_bytes = m.optional_with(ctx, "max_header_bytes", |c, n, p| {
        let b = ByteSize::decode(c, n, p)?.0;
        if !(8192..=16 << 20).contains(&b) {
            c.error(n, p, "must be between 8KiB and 16MiB");
            return None;
        }
        Some(b as usize)
    });
    let max_headers = m.optional_with(ctx, "max_headers", |c, n, p| {
        let v = uint(c, n, p, 10_000)?;
        if v == 0 {
            c.error(n, p, "must be at least 1");
            return None;
        }
        Some(v as usize)
    });
    let max_body = m.optional_with(ctx, "max_body", |c, n, p| {
        ByteSize::decode(c, n, p).map(|b| b.0)
    });
    let header_read_timeout = m.optional_with(ctx, "header_read_timeout", positive_duration);
    let handshake_timeout = m.optional_with(ctx, "handshake_timeout", positive_duration);
    let max_connections_per_source =
        m.optional_with(ctx, "max_connections_per_source", conn::per_source);
    let body_min_rate = m.optional_with(ctx, "body_min_rate", conn::body_min_rate);
    let write_timeout = m.optional_with(ctx, "write_timeout", positive_duration);
    let http2 = m.optional_with(ctx, "http2", http2::http2);
    m.finish(ctx);
    Some(Limits {
        max_header_bytes: max_header_bytes.unwrap_or(d.max_header_bytes),
        max_headers: max_headers.unwrap_or(d.max_headers),
        max_body: max_body.unwrap_or(d.max_body),
        header_read_timeout: header_read_timeout.unwrap_or(d.header_read_timeout),
        handshake_timeout: handshake_timeout.unwrap_or(d.handshake_timeout),
        max_connections_per_source: max_connections_per_source
            .unwrap_or(d.max_connections_per_source),
        body_min_rate: body_min_rate.unwrap_or(d.body_min_rate),
        write_timeout: write_timeout.unwrap_or(d.write_timeout),
        http2: http2.unwrap_or(d.http2),
    })
}

fn log(ctx: &mut Ctx, node: &Node, path: &Path<'_>, base: &FsPath) -> Option<LogConfig> {
    let d = LogConfig::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let decisions = m.optional_with(ctx, "decisions", |c, n, p| {
        let s = scalar(c, n, p, "`stdout`, `off` or a file path")?;
        Some(match s {
            "stdout" | "-" => DecisionTarget::Stdout,
            "off" => DecisionTarget::Off,
            "" => {
                c.error(n, p, "must not be empty");
                return None;
            }
            file => DecisionTarget::File(base.join(file)),
        })
    });
    let sample_admits = m.optional_with(ctx, "sample_admits", |c, n, p| {
        let v = f64::decode(c, n, p)?;
        if !(0.0..=1.0).contains(&v) {
            c.error(n, p, format!("`{v}` must be between 0 and 1"));
            return None;
        }
        Some(v)
    });
    let max_rejections_per_rule = m.optional_with(ctx, "max_rejections_per_rule", |c, n, p| {
        uint(c, n, p, 1_000_000).map(|v| v as u32)
    });
    let audit = m.optional_with(ctx, "audit", |c, n, p| {
        let on = bool::decode(c, n, p)?;
        if on && decisions == Some(DecisionTarget::Off) {
            c.error(
                n,
                p,
                "needs a decision log: set `decisions` to a file or `stdout`",
            );
            return None;
        }
        Some(on)
    });
    let format = m.optional_with(ctx, "format", |c, n, p| {
        choice(
            c,
            n,
            p,
            &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
        )
    });
    let level = m.optional_with(ctx, "level", |c, n, p| {
        let s = scalar(c, n, p, "a log filter like `info`")?;
        from_str::<tracing_subscriber::EnvFilter>(c, n, p, "a log filter like `info`")
            .map(|_| s.to_owned())
    });
    let access_at = m.entry("access").map(|e| e.value);
    let access = m.optional_with(ctx, "access", |c, n, p| access_log(c, n, p, base));
    m.finish(ctx);
    let decisions_to_stdout = decisions.as_ref().unwrap_or(&d.decisions) == &DecisionTarget::Stdout;
    if let (Some(at), Some(Some(a))) = (access_at, &access) {
        if a.target == AccessTarget::Stdout && decisions_to_stdout {
            ctx.error(
                at,
                &path.key("access"),
                "the decision log already writes to stdout: give the access log a file (or \
                 the decision log one)",
            );
        }
    }
    Some(LogConfig {
        decisions: decisions.unwrap_or(d.decisions),
        sample_admits: sample_admits.unwrap_or(d.sample_admits),
        max_rejections_per_rule: max_rejections_per_rule.unwrap_or(d.max_rejections_per_rule),
        audit: audit.unwrap_or(d.audit),
        format: format.unwrap_or(d.format),
        level: level.unwrap_or(d.level),
        access: access.flatten(),
    })
}

/// `log.access`: `off`, a file path, `stdout`, or `{path, format, buffer}`.
fn access_log(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    base: &FsPath,
) -> Option<Option<AccessLogConfig>> {
    let target = |c: &mut Ctx, n: &Node, p: &Path<'_>| -> Option<Option<AccessTarget>> {
        let s = scalar(c, n, p, "`stdout`, `off` or a file path")?;
        Some(match s {
            "off" => None,
            "stdout" | "-" => Some(AccessTarget::Stdout),
            "" => {
                c.error(n, p, "must not be empty");
                return None;
            }
            file => Some(AccessTarget::File(base.join(file))),
        })
    };
    if !matches!(node.kind, NodeKind::Map(_)) {
        return Some(target(ctx, node, path)?.map(|t| AccessLogConfig {
            target: t,
            format: AccessFormat::Json,
            buffer: DEFAULT_ACCESS_BUFFER,
        }));
    }
    let mut m = MapReader::new(ctx, node, path)?;
    let t = m.required_with(ctx, "path", target);
    let format = m.optional_with(ctx, "format", |c, n, p| {
        choice(
            c,
            n,
            p,
            &[
                ("json", AccessFormat::Json),
                ("common", AccessFormat::Common),
                ("combined", AccessFormat::Combined),
            ],
        )
    });
    let buffer = m.optional_with(ctx, "buffer", |c, n, p| {
        let v = uint(c, n, p, 10_000_000)?;
        if v == 0 {
            c.error(n, p, "must be at least 1");
            return None;
        }
        Some(v as usize)
    });
    m.finish(ctx);
    Some(t?.map(|target| AccessLogConfig {
        target,
        format: format.unwrap_or(AccessFormat::Json),
        buffer: buffer.unwrap_or(DEFAULT_ACCESS_BUFFER),
    }))
}

/// Access-log lines queued for the writer by default.
const DEFAULT_ACCESS_BUFFER: usize = 10_000;

mod conn;
mod http2;
mod outbound;

#[cfg(test)]
mod tests;
