//! Reading the OpenAPI documents silo serves (the admin API's and the tenant API's), for the
//! tests that check them whole and call what they describe.

use serde_json::Value;

/// Every operation of `doc`: (method in capitals, path, operation).
pub fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut all = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            if method != "parameters" {
                all.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    all
}

/// `value`, or what its `$ref` names in `doc`.
pub fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(reference) => doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{reference} names nothing")),
        None => value,
    }
}

/// The `{name}` segments of `doc`'s paths that an operation does not declare as a path
/// parameter (of its own, or of its path item), as `METHOD path: {name}`.
pub fn undeclared_path_parameters(doc: &Value) -> Vec<String> {
    let mut undeclared = Vec::new();
    for (method, path, op) in operations(doc) {
        let shared = doc["paths"][&path]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let own = op["parameters"].as_array().cloned().unwrap_or_default();
        let declared: Vec<&str> = shared
            .iter()
            .chain(&own)
            .map(|p| resolve(doc, p))
            .filter(|p| p["in"] == "path")
            .filter_map(|p| p["name"].as_str())
            .collect();
        for segment in path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if !declared.contains(&name) {
                    undeclared.push(format!("{method} {path}: {{{name}}}"));
                }
            }
        }
    }
    undeclared
}
