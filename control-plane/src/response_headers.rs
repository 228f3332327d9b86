//! Headers every answer of silo's HTTP servers (the admin API, the router's tenant traffic)
//! carries, as security reviews of an HTTP API expect: the answers are private JSON, never
//! cached by a browser or proxy, never sniffed as another type; over TLS, browsers are told to
//! use nothing but HTTPS for the host. A header the app set itself is left as it is.

use axum::http::header::{CACHE_CONTROL, STRICT_TRANSPORT_SECURITY, X_CONTENT_TYPE_OPTIONS};
use axum::http::{HeaderMap, HeaderValue};

/// HTTPS only, for a year (the host's subdomains are not ours to speak for).
const HSTS: HeaderValue = HeaderValue::from_static("max-age=31536000");

/// Adds the headers to an answer's `headers`, HSTS only when it goes `over_tls`.
pub fn add(headers: &mut HeaderMap, over_tls: bool) {
    headers
        .entry(CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    headers
        .entry(X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
    if over_tls {
        headers.entry(STRICT_TRANSPORT_SECURITY).or_insert(HSTS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsts_only_over_tls_and_the_apps_own_headers_stay() {
        let mut plain = HeaderMap::new();
        add(&mut plain, false);
        assert_eq!(plain[CACHE_CONTROL], "no-store");
        assert_eq!(plain[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(!plain.contains_key(STRICT_TRANSPORT_SECURITY));

        let mut own = HeaderMap::new();
        own.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=60"));
        add(&mut own, true);
        assert_eq!(own[CACHE_CONTROL], "max-age=60");
        assert_eq!(own[STRICT_TRANSPORT_SECURITY], "max-age=31536000");
    }
}
