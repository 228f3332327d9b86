//! `GET /api/v1/openapi.json`: the tenant API described for tenants' clients and code
//! generators, served without a key (it is the public contract). The document is written by
//! hand next to the handlers, and lists the router's own answers too, since every client
//! meets the app through the router. The tests below check that it is whole (each path
//! parameter declared, each operation's request errors and the router's answers documented)
//! and that the app routes each operation it names; the end-to-end tests call each one.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

/// The document, as served.
const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /api/v1/openapi.json`.
pub(crate) async fn document() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt as _;

    use super::DOCUMENT;

    /// Every operation: (method, path, operation).
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut all = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if method != "parameters" {
                    all.push((method.to_uppercase(), path.clone(), op.clone()));
                }
            }
        }
        all
    }

    /// `value`, or what its `$ref` names.
    fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
        match value["$ref"].as_str() {
            Some(reference) => doc
                .pointer(reference.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{reference} names nothing")),
            None => value,
        }
    }

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).unwrap()
    }

    #[test]
    fn every_path_parameter_is_declared() {
        let doc = document();
        for (method, path, op) in operations(&doc) {
            let shared = doc["paths"][&path]["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let own = op["parameters"].as_array().cloned().unwrap_or_default();
            let declared: Vec<&str> = shared
                .iter()
                .chain(&own)
                .map(|p| resolve(&doc, p))
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .collect();
            for segment in path.split('/') {
                if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    assert!(declared.contains(&name), "{method} {path}: {{{name}}} is not declared");
                }
            }
        }
    }

    #[test]
    fn request_errors_and_the_routers_answers_are_documented() {
        let doc = document();
        for (method, path, op) in operations(&doc) {
            let responses = &op["responses"];
            // no or an unknown key; the router's: bad Host, suspended, no such tenant, body over
            // its limit, rate limited, unavailable
            let mut expected = vec!["400", "401", "403", "404", "413", "429", "503"];
            if op.get("requestBody").is_some() {
                // not JSON, fields of the wrong shape
                expected.extend(["415", "422"]);
            }
            for code in expected {
                let response = responses
                    .get(code)
                    .unwrap_or_else(|| panic!("{method} {path} does not document {code}"));
                let response = resolve(&doc, response);
                let schema = &response["content"]["application/json"]["schema"];
                assert_eq!(
                    schema["allOf"][0]["$ref"], "#/components/schemas/Error",
                    "{method} {path} {code}: not an Error"
                );
            }
            for code in ["429", "503"] {
                let response = resolve(&doc, &responses[code]);
                assert!(
                    response["headers"].get("Retry-After").is_some(),
                    "{method} {path} {code}: no Retry-After"
                );
            }
        }
    }

    /// Each documented operation reaches a handler: without the `TenantContext` its host
    /// inserts, a handler answers 500 `internal`, where an unrouted one gets 404 or 405.
    #[tokio::test]
    async fn every_documented_operation_is_routed() {
        let doc = document();
        let base = doc["servers"][0]["url"].as_str().unwrap();
        for (method, path, _) in operations(&doc) {
            let request = Request::builder()
                .method(method.as_str())
                .uri(format!("{base}{}", path.replace("{id}", "1")))
                .body(Body::empty())
                .unwrap();
            let response = crate::app().oneshot(request).await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "{method} {path} is not routed"
            );
        }
    }

    #[tokio::test]
    async fn the_document_is_served_as_json_without_a_key() {
        let request = Request::builder()
            .uri("/api/v1/openapi.json")
            .body(Body::empty())
            .unwrap();
        let response = crate::app().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert_eq!(body, DOCUMENT.as_bytes());
        assert_eq!(document()["openapi"], "3.1.0");
    }
}
