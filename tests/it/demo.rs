//! `braid demo`, the README's first command, as a user runs it: the real binary, the
//! real model, requests through the proxy, and a clean exit on Ctrl-C.

use std::time::Duration;

use crate::support::*;

/// `braid demo` with `extra` flags, every port picked by the system. Fetching a model
/// on a cold cache can take a while; after that it is seconds.
fn spawn_demo(extra: &[&str]) -> BraidProcess {
    let mut args = vec!["demo"];
    args.extend_from_slice(extra);
    args.extend([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--executor-listen",
        "127.0.0.1:0",
    ]);
    BraidProcess::spawn(
        &args,
        &[],
        &["proxy", "admin", "executor"],
        Duration::from_secs(600),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_ab_test_end_to_end() {
    let mut demo = spawn_demo(&[]);
    let (proxy, admin) = (&demo.announced["proxy"], &demo.announced["admin"]);
    let c = client();
    let body = infer_body(
        &[
            "I loved this film, it was wonderful",
            "Terrible service, I want a refund",
        ],
        r#","outputs":[{"name":"label"},{"name":"scores"}]"#,
    );
    let first = post(
        &c,
        &format!("{proxy}/v2/models/sentiment/infer"),
        &[("x-user-id", "alice")],
        &body,
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text());
    for _ in 0..5 {
        let again = post(
            &c,
            &format!("{proxy}/v2/models/sentiment/infer"),
            &[("x-user-id", "alice")],
            &body,
        )
        .await;
        assert_eq!(
            again.variant(),
            first.variant(),
            "alice must stay on one variant"
        );
    }
    for (variant, positive, negative) in [
        ("short-labels", "positive", "negative"),
        (
            "sentence-labels",
            "This is a positive review.",
            "This is a negative review.",
        ),
    ] {
        let r = post(
            &c,
            &format!("{proxy}/v2/models/sentiment/infer"),
            &[("x-braid-variant", variant)],
            &body,
        )
        .await;
        assert_eq!(r.variant(), variant);
        let j = r.json();
        assert_eq!(
            j["outputs"][0]["data"],
            serde_json::json!([positive, negative]),
            "{j}"
        );
        assert_eq!(j["outputs"][1]["shape"], serde_json::json!([2, 2]));
    }
    let r = post(
        &c,
        &format!("{proxy}/v1/models/sentiment:predict"),
        &[("x-braid-variant", "short-labels")],
        r#"{"instances":["What a great day"]}"#,
    )
    .await;
    assert_eq!(r.json()["predictions"][0]["label"], "positive");
    // Concurrent requests share forward passes and each gets its own answer.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (c, url) = (client(), format!("{proxy}/v2/models/sentiment/infer"));
        let (text, want) = if i % 2 == 0 {
            ("I loved this film, it was wonderful", "positive")
        } else {
            ("Terrible service, I want a refund", "negative")
        };
        tasks.push(tokio::spawn(async move {
            let body = infer_body(&[text], r#","outputs":[{"name":"label"}]"#);
            (
                want,
                post(&c, &url, &[("x-braid-variant", "short-labels")], &body)
                    .await
                    .json(),
            )
        }));
    }
    for t in tasks {
        let (want, j) = t.await.unwrap();
        assert_eq!(j["outputs"][0]["data"], serde_json::json!([want]), "{j}");
    }
    let m = get(&c, &format!("{admin}/metrics"), &[]).await.text();
    assert!(m.contains(r#"variant="short-labels",code="200""#), "{m}");
    assert!(
        m.contains(r#"braid_batch_size_count{route="sentiment",variant="short-labels"}"#),
        "{m}"
    );
    // The demo's A/B test is an experiment with a guardrail on the sentence variant.
    let e = get(&c, &format!("{admin}/experiments"), &[]).await.json();
    let route = &e["routes"][0];
    assert_eq!(route["control"], "short-labels", "{e}");
    let state = &route["variants"][1]["guardrail"]["state"];
    assert!(state == "warmup" || state == "watching", "{e}");
    assert!(
        route["variants"][0]["requests"].as_u64().unwrap() >= 16,
        "{e}"
    );

    demo.signal("INT");
    let status = demo.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
}

/// `braid demo --llm`: the real Gemma behind the proxy, two sampling presets A/B-tested
/// under one OpenAI model name, and `braid experiments` showing time to first token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_demo_ab_tests_two_presets_over_the_openai_api() {
    let mut demo = spawn_demo(&["--llm"]);
    let (proxy, admin) = (
        demo.announced["proxy"].clone(),
        demo.announced["admin"].clone(),
    );
    let c = client();
    let body = r#"{"model":"assistant","prompt":"The capital of France is","max_tokens":8}"#;
    let greedy = post(
        &c,
        &format!("{proxy}/v1/completions"),
        &[("x-braid-variant", "greedy")],
        body,
    )
    .await;
    assert_eq!(greedy.status, 200, "{}", greedy.text());
    assert_eq!(greedy.variant(), "greedy");
    let j = greedy.json();
    // The greedy preset is deterministic: llama.cpp's text for this prompt starts so.
    assert!(
        j["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(" the capital of"),
        "{j}"
    );
    assert_eq!(j["model"], "gemma-greedy", "{j}");
    let chat = r#"{"model":"assistant","messages":[{"role":"user","content":"Hi"}],"max_tokens":6,"stream":true}"#;
    let s = post(
        &c,
        &format!("{proxy}/v1/chat/completions"),
        &[("x-braid-variant", "creative")],
        chat,
    )
    .await;
    assert_eq!(s.status, 200);
    assert!(s.text().ends_with("data: [DONE]\n\n"), "{}", s.text());
    // Users stick to a variant.
    for user in ["alice", "bob", "carol"] {
        let a = post(
            &c,
            &format!("{proxy}/v1/completions"),
            &[("x-user-id", user)],
            body,
        )
        .await;
        let b = post(
            &c,
            &format!("{proxy}/v1/completions"),
            &[("x-user-id", user)],
            body,
        )
        .await;
        assert_eq!(a.variant(), b.variant());
    }
    let out = braid(
        &[
            "experiments",
            "--admin",
            admin.trim_start_matches("http://"),
            "--json",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = &e["routes"][0]["variants"];
    let creative = v
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "creative")
        .unwrap();
    assert!(
        creative["generation"]["ttft_ms"]["p50"].as_f64().unwrap() > 0.0,
        "{e}"
    );
    demo.signal("INT");
    let status = demo.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
}
