//! `braid check`: every example config passes; bad documents list every error with its
//! field path and exit 1.

use crate::support::braid;

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, text).unwrap();
    let out = braid(&["check", path.to_str().unwrap()], b"");
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn every_example_config_is_valid() {
    let mut n = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = braid(&["check", path.to_str().unwrap()], b"");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{}: {stdout}", path.display());
            assert!(stdout.contains(": ok: "), "{stdout}");
            n += 1;
        }
    }
    assert!(n >= 2);
}

/// Each case: a document and the lines its report must contain.
#[test]
fn bad_documents_name_each_problem_by_field_path() {
    let local = "executor: http://127.0.0.1:8081\n";
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("{local}routes:\n  - model: m\n    variants: [{{name: a, backend: local}}]\n    log: {{fraction: 1, sink: /tmp/p.jsonl, headers: [content-type, x-goog-iap-jwt-assertion, authorization, \"bad name\"]}}\n"),
            vec![
                "routes[0].log.headers[1]: \"x-goog-iap-jwt-assertion\" may carry credentials and is never logged",
                "routes[0].log.headers[2]: \"authorization\" may carry credentials and is never logged",
                "routes[0].log.headers[3]: \"bad name\" is not a valid HTTP header name",
            ],
        ),
        (
            format!("{local}routes:\n  - model: m\n    variants:\n      - {{name: a, weight: -1, backend: local}}\n      - {{name: b, weight: .nan, backend: local}}\n"),
            vec!["routes[0].variants[0].weight: must be >= 0", "routes[0].variants[1].weight: must be a number, not NaN"],
        ),
        (
            format!("{local}routes:\n  - model: m\n    variants: [{{name: a, weight: 0, backend: local}}, {{name: b, weight: 0, backend: local}}]\n"),
            vec!["routes[0].variants: all weights are zero"],
        ),
        (
            format!("{local}routes:\n  - model: m\n    variants: [{{name: a, backend: local}}, {{name: a, backend: local}}]\n"),
            vec!["routes[0].variants[1].name: variant \"a\" is already defined at variants[0]"],
        ),
        (
            format!("{local}routes:\n  - model: m\n    variants: [{{name: a, backend: local}}]\n  - model: m\n    name: other\n    variants: [{{name: a, backend: local}}]\n"),
            vec!["routes[1].model: model \"m\" is already matched by routes[0]"],
        ),
        (
            format!("{local}routes:\n  - model: m\n    variants: [{{name: a, backend: local}}]\n  - path_prefix: /x\n    name: m\n    variants: [{{name: a, backend: local}}]\n"),
            vec!["routes[1].name: route name \"m\" is already used by routes[0]"],
        ),
        (
            format!("{local}routes:\n  - model: m\n    variants: [{{name: a, backend: local}}]\n    shadow: {{variant: ghost, fraction: 0.1}}\n"),
            vec!["routes[0].shadow.variant: unknown variant \"ghost\" (this route has: a)"],
        ),
        (
            format!("{local}routes:\n  - model: m\n    variants: [{{name: a, backend: local}}]\n    timeout: 5\n    retry: {{per_try_timeout: fast}}\n"),
            vec!["routes[0].timeout: durations need a unit", "routes[0].retry.per_try_timeout: \"fast\" is not a duration"],
        ),
        (
            "routes:\n  - model: m\n    variants: [{name: a, backend: \"http//nope\"}, {name: b, backend: \"ftp://x:1\"}, {name: c, backend: local}]\n".into(),
            vec![
                "routes[0].variants[0].backend: \"http//nope\" must be \"local\" or a URL",
                "routes[0].variants[1].backend: \"ftp://x:1\" must be a URL starting with http://, h2c:// or https://",
                "routes[0].variants[2].backend: `local` needs the top-level `executor` URL",
            ],
        ),
        (
            format!("{local}routes:\n  - model: m\n    varients: []\n    extra: 1\n"),
            vec!["routes[0].variants: is required", "routes[0].varients: unknown field", "routes[0].extra: unknown field"],
        ),
        (
            format!("{local}routes:\n  - model: m\n    variants: [{{name: a, backend: local}}]\n    sticky_header: \"bad header\"\n"),
            vec!["routes[0].sticky_header: \"bad header\" is not a valid HTTP header name"],
        ),
        ("routes: [\n".into(), vec!["(document):"]),
        ("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n".into(), vec!["(document):"]),
        ("routes: []\n".into(), vec!["routes: must list at least one route"]),
        ("executor: http://a:1\nexecutor: http://b:1\nroutes: []\n".into(), vec!["(document):"]),
    ];
    for (doc, wanted) in cases {
        let (code, out) = check(&doc);
        assert_eq!(code, 1, "accepted:\n{doc}\n{out}");
        for w in wanted {
            assert!(out.contains(w), "missing {w:?} in:\n{out}\nfor:\n{doc}");
        }
        assert!(out.contains("invalid:"), "{out}");
    }
}

#[test]
fn strict_booleans_do_not_turn_names_into_booleans() {
    // `no` is a perfectly good variant name under YAML 1.2 rules.
    let (code, out) = check(
        "routes:\n  - path_prefix: /\n    variants: [{name: no, backend: \"http://127.0.0.1:1\"}]\n",
    );
    assert_eq!(code, 0, "{out}");
}
