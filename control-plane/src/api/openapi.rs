//! `GET /v1/openapi.json`: the admin API described for clients and code generators. The
//! document is written by hand next to the handlers; the tests below check that it is whole
//! (each path parameter declared, each operation's request errors documented), and the
//! end-to-end tests that each operation it names is served.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

/// The document, as served.
const DOCUMENT: &str = include_str!("openapi.json");

pub(super) async fn document() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

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

    /// `parameter`, or the one its `$ref` names.
    fn resolve<'a>(doc: &'a Value, parameter: &'a Value) -> &'a Value {
        match parameter["$ref"].as_str() {
            Some(reference) => doc
                .pointer(reference.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{reference} names nothing")),
            None => parameter,
        }
    }

    #[test]
    fn every_path_parameter_is_declared() {
        let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
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
    fn request_errors_are_documented() {
        let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
        for (method, path, op) in operations(&doc) {
            let responses = &op["responses"];
            let mut expected = Vec::new();
            if op.get("requestBody").is_some() {
                // malformed JSON, too large, not JSON, fields of the wrong shape
                expected.extend(["400", "413", "415", "422"]);
            }
            if path.contains('{') {
                expected.push("400");
            }
            for code in expected {
                assert!(
                    responses.get(code).is_some(),
                    "{method} {path} does not document {code}"
                );
            }
        }
    }
}
