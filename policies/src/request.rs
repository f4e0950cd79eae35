//! What the matchers see of a request: [`RequestView`], built by the adapters (the tower
//! layer, the gateway) per request, borrowing from it. No HTTP type: header lookups go
//! through [`HeaderSource`].

use std::net::IpAddr;

/// The facts about one request that rules and operations match on.
///
/// Built by the adapter (tower layer, gateway) per request, borrowing from the request; no
/// allocation needed.
pub struct RequestView<'a> {
    /// Client IP after trusted-proxy resolution (not aggregated).
    pub ip: IpAddr,
    /// Method, upper case as on the wire.
    pub method: &'a str,
    /// Host without port, lower case; empty when unknown.
    pub host: &'a str,
    /// URI path without the query.
    pub path: &'a str,
    /// The `User-Agent` header, empty when absent.
    pub user_agent: &'a str,
    /// The operation name the adapter already resolved (e.g. a gateway route), if any.
    pub operation: Option<&'a str>,
    /// Header lookup.
    pub headers: &'a dyn HeaderSource,
}

/// Case-insensitive header lookup, implemented by the adapters over `http::HeaderMap`.
pub trait HeaderSource {
    /// The first value of header `name` (given in lower case), if present and valid UTF-8.
    fn header(&self, name: &str) -> Option<&str>;
}

impl HeaderSource for () {
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
}
