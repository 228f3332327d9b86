//! Host (or `/t/{slug}/...` path) → which tenant a request is for.
//!
//! The edge of the router: the host is taken from the request once, normalised (lower case,
//! no port, no trailing dot), checked against a strict charset and length, and classified.
//! Nothing from the request reaches the catalog unless it passed these checks, and what
//! leaves this module is a [`TenantKey`] (a validated slug or a well-formed domain).

use std::net::{Ipv4Addr, Ipv6Addr};

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderMap, Uri};
use silo_control_plane::names::TenantSlug;

/// A DNS name is at most 253 bytes (without the trailing dot).
const MAX_HOST_LEN: usize = 253;

/// What the directory looks a tenant up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TenantKey {
    /// `{slug}.{base_domain}` or `/t/{slug}/...`.
    Slug(TenantSlug),
    /// Any other host: a custom domain a tenant may have registered (lower case, no port).
    Domain(String),
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// To the tenant found under `key`; with path-prefix routing, the app sees `path` instead
    /// of the original path and query.
    Tenant {
        /// The lookup key.
        key: TenantKey,
        /// The path and query with `/t/{slug}` removed, when the request was routed by path.
        path: Option<PathAndQuery>,
    },
    /// A well-formed host that cannot name a tenant (a base domain itself, a deeper
    /// subdomain, an IP address): answered 404 without asking the catalog.
    NoTenant,
}

/// The request's host is missing or malformed; the reason is fixed text, never an echo of
/// the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidHost(pub(crate) &'static str);

/// A normalised host.
#[derive(Debug, PartialEq, Eq)]
enum Host {
    /// A domain name: `[a-z0-9.-]`, 1..=253 bytes.
    Name(String),
    /// An IPv4 or IPv6 literal: never a tenant host.
    IpLiteral,
}

/// Classifies requests by host and, optionally, by `/t/{slug}` path prefix.
#[derive(Debug, Clone)]
pub(crate) struct Resolver {
    /// Lower case, longest first, so `a.app.example.com` prefers base `app.example.com` over
    /// `example.com`.
    base_domains: Vec<String>,
    path_prefix_routing: bool,
}

impl Resolver {
    /// A resolver for `base_domains` (already validated and lower-cased by the config).
    pub(crate) fn new(base_domains: &[String], path_prefix_routing: bool) -> Self {
        let mut base_domains: Vec<String> = base_domains.to_vec();
        base_domains.sort_by_key(|d| std::cmp::Reverse(d.len()));
        Self {
            base_domains,
            path_prefix_routing,
        }
    }

    /// Where the request with this URI and these headers goes. Every request must carry a
    /// well-formed host, even one routed by path.
    pub(crate) fn resolve(&self, uri: &Uri, headers: &HeaderMap) -> Result<Resolution, InvalidHost> {
        let host = request_host(uri, headers)?;
        if self.path_prefix_routing {
            if let Some(resolution) = by_path_prefix(uri) {
                return Ok(resolution);
            }
        }
        Ok(match host {
            Host::Name(name) => self.by_host(name),
            Host::IpLiteral => Resolution::NoTenant,
        })
    }

    fn by_host(&self, name: String) -> Resolution {
        for base in &self.base_domains {
            if name == *base {
                return Resolution::NoTenant;
            }
            let label = name.strip_suffix(base.as_str()).and_then(|rest| rest.strip_suffix('.'));
            if let Some(label) = label {
                // Exactly one label in front of the base domain, and a valid slug.
                return match TenantSlug::parse(label) {
                    Ok(slug) => Resolution::Tenant {
                        key: TenantKey::Slug(slug),
                        path: None,
                    },
                    Err(_) => Resolution::NoTenant,
                };
            }
        }
        Resolution::Tenant {
            key: TenantKey::Domain(name),
            path: None,
        }
    }
}

/// The host of a request: the URI authority when the request has one (HTTP/2 `:authority`,
/// or an absolute-form HTTP/1.1 target, where RFC 9112 says Host is ignored), else the one
/// `Host` header.
fn request_host(uri: &Uri, headers: &HeaderMap) -> Result<Host, InvalidHost> {
    if let Some(authority) = uri.authority() {
        return normalise_host(authority.as_str().as_bytes());
    }
    let mut hosts = headers.get_all(HOST).iter();
    let host = hosts.next().ok_or(InvalidHost("the request has no Host header"))?;
    if hosts.next().is_some() {
        return Err(InvalidHost("the request has more than one Host header"));
    }
    normalise_host(host.as_bytes())
}

/// Lower case, port and one trailing dot removed; only `[a-z0-9.-]`, 1..=253 bytes.
fn normalise_host(raw: &[u8]) -> Result<Host, InvalidHost> {
    const MALFORMED: InvalidHost = InvalidHost("the Host header is not a valid host name");
    if raw.is_empty() {
        return Err(InvalidHost("the Host header is empty"));
    }
    // Longest acceptable: 253 bytes, a trailing dot, ':' and a 5-digit port.
    if raw.len() > MAX_HOST_LEN + 7 {
        return Err(InvalidHost("the Host header is too long"));
    }
    if raw[0] == b'[' {
        return ipv6_literal(raw).ok_or(MALFORMED);
    }
    let name = match raw.iter().rposition(|&b| b == b':') {
        Some(colon) if is_port(&raw[colon + 1..]) => &raw[..colon],
        Some(_) => return Err(MALFORMED),
        None => raw,
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(InvalidHost("the Host header is empty"));
    }
    if name.len() > MAX_HOST_LEN {
        return Err(InvalidHost("the Host header is too long"));
    }
    let lower = name.to_ascii_lowercase();
    if !lower
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(MALFORMED);
    }
    // Only ASCII remains, so this cannot fail; an error would still be a 400, never a panic.
    let name = String::from_utf8(lower).map_err(|_| MALFORMED)?;
    if name.parse::<Ipv4Addr>().is_ok() {
        return Ok(Host::IpLiteral);
    }
    Ok(Host::Name(name))
}

/// `[v6addr]` or `[v6addr]:port`.
fn ipv6_literal(raw: &[u8]) -> Option<Host> {
    let close = raw.iter().position(|&b| b == b']')?;
    let addr = std::str::from_utf8(&raw[1..close]).ok()?;
    addr.parse::<Ipv6Addr>().ok()?;
    match &raw[close + 1..] {
        [] => Some(Host::IpLiteral),
        [b':', port @ ..] if is_port(port) => Some(Host::IpLiteral),
        _ => None,
    }
}

/// RFC 3986 `port = *DIGIT` (empty allowed), bounded to five digits.
fn is_port(port: &[u8]) -> bool {
    port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

/// `/t/{slug}` or `/t/{slug}/rest?query` → the slug, and `/rest?query` for the app. `None`
/// when the path does not start with `/t/` (the host decides); `NoTenant` when the segment
/// is not a slug.
fn by_path_prefix(uri: &Uri) -> Option<Resolution> {
    let rest = uri.path().strip_prefix("/t/")?;
    let (segment, tail) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    let Ok(slug) = TenantSlug::parse(segment) else {
        return Some(Resolution::NoTenant);
    };
    let path = match uri.query() {
        Some(query) => PathAndQuery::try_from(format!("{tail}?{query}")),
        None => PathAndQuery::try_from(tail),
    };
    Some(match path {
        Ok(path) => Resolution::Tenant {
            key: TenantKey::Slug(slug),
            path: Some(path),
        },
        Err(_) => Resolution::NoTenant,
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn resolver() -> Resolver {
        Resolver::new(&["localhost".to_owned(), "app.example.com".to_owned()], false)
    }

    fn resolve_host(resolver: &Resolver, host: &[u8]) -> Result<Resolution, InvalidHost> {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_bytes(host).unwrap());
        resolver.resolve(&Uri::from_static("/api/v1/me"), &headers)
    }

    fn slug(s: &str) -> Resolution {
        Resolution::Tenant {
            key: TenantKey::Slug(TenantSlug::parse(s).unwrap()),
            path: None,
        }
    }

    fn domain(s: &str) -> Resolution {
        Resolution::Tenant {
            key: TenantKey::Domain(s.to_owned()),
            path: None,
        }
    }

    #[test]
    fn tenant_subdomains_resolve_to_slugs() {
        let r = resolver();
        for (host, want) in [
            ("acme.localhost", "acme"),
            ("ACME.LOCALHOST:8080", "acme"),
            ("acme.localhost.", "acme"),
            ("Acme.LocalHost.:8443", "acme"),
            ("acme-corp.app.example.com", "acme-corp"),
            ("acme.localhost:", "acme"),
        ] {
            assert_eq!(resolve_host(&r, host.as_bytes()), Ok(slug(want)), "{host}");
        }
    }

    #[test]
    fn other_hosts_are_custom_domains() {
        let r = resolver();
        assert_eq!(resolve_host(&r, b"acme.example.com"), Ok(domain("acme.example.com")));
        assert_eq!(resolve_host(&r, b"Shop.Acme.COM:443"), Ok(domain("shop.acme.com")));
        // A base domain in the middle is not a base domain.
        assert_eq!(
            resolve_host(&r, b"acme.localhost.evil.com"),
            Ok(domain("acme.localhost.evil.com"))
        );
        assert_eq!(resolve_host(&r, b"evillocalhost"), Ok(domain("evillocalhost")));
    }

    #[test]
    fn hosts_that_cannot_name_a_tenant() {
        let r = resolver();
        for host in [
            "localhost",
            "localhost.:80",
            "a.b.localhost",
            "www.localhost",   // reserved slug
            "ab.localhost",    // too short for a slug
            "-acme.localhost", // not a slug
            "x.acme.app.example.com",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:8080",
        ] {
            assert_eq!(resolve_host(&r, host.as_bytes()), Ok(Resolution::NoTenant), "{host}");
        }
    }

    #[test]
    fn hostile_hosts_are_refused() {
        let r = resolver();
        let long = format!("{}.localhost", "a".repeat(290));
        assert_eq!(long.len(), 300);
        let too_long_name = format!("{}a", "a.".repeat(127)); // 255 bytes
        for host in [
            &b""[..],
            b".",
            b":8080",
            b"acme\0.localhost",
            b"acme .localhost",
            b" acme.localhost",
            b"acme.localhost\t",
            b"acme_corp.localhost",
            b"user@acme.localhost",
            "\u{fc}mlaut.localhost".as_bytes(),
            "acme.localhost\u{3002}com".as_bytes(),
            long.as_bytes(),
            too_long_name.as_bytes(),
            b"acme.localhost:80:80",
            b"acme.localhost:http",
            b"acme.localhost:123456",
            b"[::1",
            b"[nonsense]",
            b"[::1]x",
            b"acme.localhost/x",
        ] {
            let mut headers = HeaderMap::new();
            // Some of these cannot even be a HeaderValue; the parser refuses those before us.
            let Ok(value) = HeaderValue::from_bytes(host) else {
                continue;
            };
            headers.insert(HOST, value);
            let got = r.resolve(&Uri::from_static("/"), &headers);
            assert!(got.is_err(), "{:?} resolved to {got:?}", String::from_utf8_lossy(host));
        }
        // NUL cannot be in a HeaderValue; the normaliser refuses it on its own too.
        assert!(normalise_host(b"acme\0.localhost").is_err());
    }

    #[test]
    fn host_must_be_present_once() {
        let r = resolver();
        let uri = Uri::from_static("/");
        assert!(r.resolve(&uri, &HeaderMap::new()).is_err());
        let mut two = HeaderMap::new();
        two.append(HOST, HeaderValue::from_static("acme.localhost"));
        two.append(HOST, HeaderValue::from_static("other.localhost"));
        assert!(r.resolve(&uri, &two).is_err());
    }

    #[test]
    fn uri_authority_wins_over_host_header() {
        let r = resolver();
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("other.localhost"));
        let uri = Uri::from_static("http://acme.localhost:8080/api/v1/me");
        assert_eq!(r.resolve(&uri, &headers), Ok(slug("acme")));
    }

    #[test]
    fn path_prefix_routing_strips_the_prefix() {
        let r = Resolver::new(&["localhost".to_owned()], true);
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
        let at = |uri: &'static str| r.resolve(&Uri::from_static(uri), &headers);
        let tenant = |s: &str, p: &'static str| Resolution::Tenant {
            key: TenantKey::Slug(TenantSlug::parse(s).unwrap()),
            path: Some(PathAndQuery::from_static(p)),
        };
        assert_eq!(
            at("/t/acme/api/v1/tasks?limit=1"),
            Ok(tenant("acme", "/api/v1/tasks?limit=1"))
        );
        assert_eq!(at("/t/acme"), Ok(tenant("acme", "/")));
        assert_eq!(at("/t/acme/"), Ok(tenant("acme", "/")));
        assert_eq!(at("/t/acme?x=1"), Ok(tenant("acme", "/?x=1")));
        assert_eq!(at("/t/Acme/x"), Ok(Resolution::NoTenant));
        assert_eq!(at("/t/www/x"), Ok(Resolution::NoTenant));
        assert_eq!(at("/t//x"), Ok(Resolution::NoTenant));
        // Not under /t/: the host decides (here an IP address: no tenant).
        assert_eq!(at("/api/v1/me"), Ok(Resolution::NoTenant));
        assert_eq!(at("/tx/acme"), Ok(Resolution::NoTenant));
        // Host routing still works in path mode.
        headers.insert(HOST, HeaderValue::from_static("acme.localhost"));
        assert_eq!(r.resolve(&Uri::from_static("/api/v1/me"), &headers), Ok(slug("acme")));
        // A malformed host is refused even when the path names the tenant.
        headers.insert(HOST, HeaderValue::from_static("bad_host"));
        assert!(r.resolve(&Uri::from_static("/t/acme/x"), &headers).is_err());
    }

    #[test]
    fn path_prefix_is_ignored_without_path_mode() {
        let r = resolver();
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("acme.localhost"));
        assert_eq!(r.resolve(&Uri::from_static("/t/other/x"), &headers), Ok(slug("acme")));
    }
}
