//! The OpenAPI documents in the repository are whole: every path parameter declared, and every
//! answer a client can meet before its request reaches a handler documented (malformed or
//! refused bodies; for the tenant API also the router's own answers). The tests in `admin_api`
//! and `tenant_app` call each documented operation of the running servers.

use serde_json::Value;
use silo_tests::openapi::{operations, resolve, undeclared_path_parameters};

const ADMIN: &str = include_str!("../../control-plane/src/api/openapi.json");
const TENANT: &str = include_str!("../../tenant-app/src/openapi.json");

#[test]
fn every_path_parameter_is_declared() {
    for document in [ADMIN, TENANT] {
        let doc: Value = serde_json::from_str(document).unwrap();
        assert_eq!(
            undeclared_path_parameters(&doc),
            Vec::<String>::new(),
            "{}",
            doc["info"]["title"]
        );
    }
}

#[test]
fn the_admin_apis_request_errors_are_documented() {
    let doc: Value = serde_json::from_str(ADMIN).unwrap();
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

#[test]
fn the_tenant_apis_request_errors_and_the_routers_answers_are_documented() {
    let doc: Value = serde_json::from_str(TENANT).unwrap();
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
            let schema = &resolve(&doc, response)["content"]["application/json"]["schema"];
            assert_eq!(
                schema["allOf"][0]["$ref"], "#/components/schemas/Error",
                "{method} {path} {code}: not an Error"
            );
        }
        for code in ["429", "503"] {
            assert!(
                resolve(&doc, &responses[code])["headers"].get("Retry-After").is_some(),
                "{method} {path} {code}: no Retry-After"
            );
        }
    }
}
