//! OpenAI-style calls routed by their body's `model` (part 1 of the LLM issue): a
//! weighted sticky split between two backends serving different model names, the
//! body's model rewritten with every other byte as sent, the sticky key from the body's
//! `user`, `GET /v1/models`, and braid's errors in OpenAI's shape.

use crate::support::*;

fn config(a: &str, b: &str) -> String {
    format!(
        r#"routes:
  - model: assistant
    variants:
      - {{ name: base, weight: 50, backend: "{a}", target_model: llama-3-8b }}
      - {{ name: tuned, weight: 50, backend: "{b}", target_model: llama-3-8b-ft }}
    sticky_header: x-user-id
    max_inflight: 1
  - model: embedder
    variants: [{{ name: only, backend: "{a}" }}]
"#
    )
}

const PATHS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/rerank",
    "/rerank",
];

#[tokio::test]
async fn calls_are_routed_by_the_bodys_model_and_rewritten_per_variant() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&config(&a.url(), &b.url())).await;
    let c = client();
    for path in PATHS {
        // Pinned to each variant: the backend sees its own model name, the rest as sent.
        for (variant, backend, target) in
            [("base", "a", "llama-3-8b"), ("tuned", "b", "llama-3-8b-ft")]
        {
            let body = r#"{"model" : "assistant", "messages":[{"role":"user","content":"say \"model\": hi"}],"stream":false}"#;
            let r = post(&c, &proxy.url(path), &[("x-braid-variant", variant)], body).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert_eq!(r.variant(), variant);
            let seen = r.json();
            assert_eq!(seen["backend"], backend);
            assert_eq!(seen["path"], path);
            let want = body.replace("\"assistant\"", &format!("\"{target}\""));
            assert_eq!(seen["body"], want.as_str(), "{path}");
            assert_eq!(seen["body_len"], want.len());
        }
    }
    // A variant without target_model sends the body exactly as it came.
    let body = r#"{"input":["a","b"],"model":"embedder"}"#;
    let r = post(&c, &proxy.url("/v1/embeddings"), &[], body).await;
    assert_eq!((r.status.as_u16(), r.variant()), (200, "only"));
    assert_eq!(r.json()["body"], body);
    proxy.stop().await;
}

#[tokio::test]
async fn the_sticky_key_comes_from_the_header_or_else_the_bodys_user() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&config(&a.url(), &b.url())).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let user = format!("user-{i}");
        let by_body = post(
            &c,
            &url,
            &[],
            &format!(r#"{{"model":"assistant","user":"{user}"}}"#),
        )
        .await;
        let by_header = post(
            &c,
            &url,
            &[("x-user-id", &user)],
            r#"{"model":"assistant"}"#,
        )
        .await;
        assert_eq!(by_body.status, 200);
        // The same key either way: the same variant, every time.
        assert_eq!(by_body.variant(), by_header.variant(), "{user}");
        let again = post(
            &c,
            &url,
            &[],
            &format!(r#"{{"model":"assistant","user":"{user}"}}"#),
        )
        .await;
        assert_eq!(again.variant(), by_body.variant());
        seen.insert(by_body.variant().to_string());
    }
    assert_eq!(seen.len(), 2, "40 users all on one variant: {seen:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn models_are_listed_and_errors_take_openais_shape() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&config(&a.url(), &b.url())).await;
    let c = client();
    let r = get(&c, &proxy.url("/v1/models"), &[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["assistant", "embedder"]);
    assert_eq!(v["data"][0]["object"], "model");

    let error = |r: &Reply, status: u16, kind: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert_eq!(e["type"], kind, "{v}");
        assert!(e.get("param").is_some() && e["code"].is_string(), "{v}");
        v
    };
    let url = proxy.url("/v1/chat/completions");
    let v = error(
        &post(&c, &url, &[], r#"{"model":"gpt-9"}"#).await,
        404,
        "not_found_error",
    );
    assert_eq!(v["error"]["param"], "model");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("assistant, embedder")
    );
    error(
        &post(&c, &url, &[], r#"{"messages":[]}"#).await,
        400,
        "invalid_request_error",
    );
    error(
        &post(&c, &url, &[], "not json").await,
        400,
        "invalid_request_error",
    );
    let v = error(
        &post(
            &c,
            &url,
            &[("x-braid-variant", "nope")],
            r#"{"model":"assistant"}"#,
        )
        .await,
        400,
        "invalid_request_error",
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("base, tuned")
    );
    let big = format!(
        r#"{{"model":"assistant","prompt":"{}"}}"#,
        "x".repeat(17 * 1024 * 1024)
    );
    error(
        &post(&c, &url, &[], &big).await,
        413,
        "invalid_request_error",
    );
    // The route's max_inflight of 1, taken by a slow call: 429 with Retry-After.
    let slow = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            post(
                &c,
                &url,
                &[("x-delay-ms", "600")],
                r#"{"model":"assistant"}"#,
            )
            .await
        })
    };
    let busy = loop {
        let r = post(&c, &url, &[], r#"{"model":"assistant"}"#).await;
        if r.status == 429 {
            break r;
        }
        assert!(!slow.is_finished(), "never saw the route busy");
    };
    error(&busy, 429, "rate_limit_error");
    assert_eq!(busy.headers["retry-after"], "1");
    assert_eq!(slow.await.unwrap().status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn without_model_routes_openai_paths_are_proxied_as_before() {
    let a = Backend::start("a").await;
    let proxy = TestProxy::start(&single_route(&a.url())).await;
    let c = client();
    let body = r#"{"model":"whatever","stream":true}"#;
    let r = post(&c, &proxy.url("/v1/chat/completions"), &[], body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body"], body);
    // /v1/models is the backend's own when braid routes no model by name.
    let r = get(&c, &proxy.url("/v1/models"), &[]).await;
    assert_eq!(r.json()["backend"], "a");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_is_routed_by_model_and_raises_braids_errors() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&config(&a.url(), &b.url())).await;
    let report = run_python_client("openai_clients.py", vec![proxy.url("/v1")]).await;
    assert_eq!(
        report["models"],
        serde_json::json!(["assistant", "embedder"]),
        "{report}"
    );
    for call in report["chat"].as_array().unwrap() {
        let (variant, backend) = (
            call["variant"].as_str().unwrap(),
            call["backend"].as_str().unwrap(),
        );
        let target = match variant {
            "base" => "llama-3-8b",
            "tuned" => "llama-3-8b-ft",
            other => panic!("variant {other}"),
        };
        assert_eq!(backend, if variant == "base" { "a" } else { "b" });
        let body: serde_json::Value = serde_json::from_str(call["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["model"], target, "{call}");
        assert_eq!(body["user"], call["user"]);
    }
    assert_eq!(report["embeddings"]["variant"], "only");
    let r = &report["responses"];
    assert_eq!(
        (r["variant"].as_str(), r["path"].as_str()),
        (Some("tuned"), Some("/v1/responses")),
        "{r}"
    );
    assert!(
        r["body"]
            .as_str()
            .unwrap()
            .contains(r#""model":"llama-3-8b-ft""#),
        "{r}"
    );
    let e = &report["errors"]["unknown_model"];
    assert_eq!(
        (e["class"].as_str(), e["status"].as_u64()),
        (Some("NotFoundError"), Some(404)),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("gpt-9"), "{e}");
    assert_eq!(e["param"], "model");
    let e = &report["errors"]["unknown_variant"];
    assert_eq!(e["class"], "BadRequestError", "{e}");
    assert_eq!(e["type"], "invalid_request_error");
    proxy.stop().await;
}

/// A streamed answer (SSE) passes event by event, and a client that leaves mid-stream
/// closes the backend's request: the generation stops instead of running on.
#[tokio::test]
async fn a_stream_passes_event_by_event_and_a_client_leaving_closes_the_backends_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<usize>();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        // One event every 20 ms, vLLM's chunk shape, until the write fails.
        for i in 0..500 {
            let event = format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            );
            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
            if s.write_all(chunk.as_bytes()).await.is_err() {
                let _ = closed_tx.send(i);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let proxy = TestProxy::start(&format!(
        "routes:\n  - model: assistant\n    variants: [{{ name: only, backend: \"{backend}\" }}]\n"
    ))
    .await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let body = r#"{"model":"assistant","stream":true}"#;
    c.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: braid\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Events arrive one by one as the backend writes them, not buffered to the end.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"t3\"") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("events arrive while the stream runs")
            .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("text/event-stream"), "{text}");
    assert!(text.contains("x-braid-variant: only"), "{text}");
    drop(c);
    let left_at = tokio::time::timeout(std::time::Duration::from_secs(5), closed_rx)
        .await
        .expect("the backend's request was not closed after the client left")
        .unwrap();
    // A few events may still be written into socket buffers before the close is seen.
    assert!(
        left_at < 30,
        "the backend kept generating: {left_at} events"
    );
    server.await.unwrap();
    // Nothing left held, and the stream cut short was still measured, once.
    assert_eq!(metric(&proxy, "braid_requests_in_flight").await, 0.0);
    assert_eq!(metric(&proxy, "braid_buffered_bytes").await, 0.0);
    let labels = r#"{route="assistant",variant="only"}"#;
    let recorded = format!("braid_gen_ai_server_request_duration_seconds_count{labels}");
    assert_eq!(metric(&proxy, &recorded).await, 1.0);
    let out = r#"braid_gen_ai_client_token_usage_sum{route="assistant",variant="only",token_type="output"}"#;
    assert!(
        metric(&proxy, out).await >= 4.0,
        "the tokens that arrived are counted"
    );
    proxy.stop().await;
}

/// A backend that answers every request with `events` (each after its delay), as an
/// SSE stream over chunked HTTP/1.1, the way vLLM streams a chat completion.
async fn sse_backend(events: Vec<(u64, String)>) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let events = events.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                    .await;
                for (delay, event) in events {
                    tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                    let e = format!("data: {event}\n\n");
                    if s.write_all(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (url, task)
}

fn chunk(content: &str) -> String {
    format!(
        r#"{{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{{"index":0,"delta":{{"content":"{content}"}},"finish_reason":null}}]}}"#
    )
}

#[tokio::test]
async fn a_streams_time_to_first_token_tokens_and_finish_are_measured_per_variant() {
    let mut events = vec![(
        0,
        r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#.to_string(),
    )];
    events.push((150, chunk("Hel")));
    for t in ["lo", ",", " wor", "ld"] {
        events.push((30, chunk(t)));
    }
    events.push((
        0,
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#.into(),
    ));
    events.push((
        0,
        r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#
            .into(),
    ));
    events.push((0, "[DONE]".into()));
    let (backend, _task) = sse_backend(events).await;
    let proxy = TestProxy::start(&format!(
        "routes:\n  - model: assistant\n    variants: [{{ name: only, backend: \"{backend}\" }}]\n"
    ))
    .await;
    let c = client();
    let r = post(
        &c,
        &proxy.url("/v1/chat/completions"),
        &[],
        r#"{"model":"assistant","stream":true,"stream_options":{"include_usage":true}}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    let labels = r#"{route="assistant",variant="only"}"#;
    let m = |name: &str| format!("braid_gen_ai_{name}{labels}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while metric(&proxy, &m("server_request_duration_seconds_count")).await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never recorded");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let ttft = metric(&proxy, &m("server_time_to_first_token_seconds_sum")).await;
    assert!((0.15..1.0).contains(&ttft), "time to first token {ttft}");
    // Four gaps of ~30 ms between five tokens.
    let tpot = metric(&proxy, &m("server_time_per_output_token_seconds_sum")).await;
    assert!((0.025..0.5).contains(&tpot), "time per output token {tpot}");
    let duration = metric(&proxy, &m("server_request_duration_seconds_sum")).await;
    assert!(
        duration >= ttft + 0.1,
        "last byte {duration}, first token {ttft}"
    );
    let tokens = |t: &str| {
        format!(
            r#"braid_gen_ai_client_token_usage_sum{{route="assistant",variant="only",token_type="{t}"}}"#
        )
    };
    assert_eq!(metric(&proxy, &tokens("input")).await, 7.0);
    assert_eq!(metric(&proxy, &tokens("output")).await, 5.0);
    let stop =
        r#"braid_gen_ai_finish_reasons_total{route="assistant",variant="only",reason="stop"}"#;
    assert_eq!(metric(&proxy, stop).await, 1.0);
    // The request histogram, too, runs to a generation's last byte.
    let request = metric(
        &proxy,
        &format!("braid_request_duration_seconds_sum{labels}"),
    )
    .await;
    assert_eq!(request, duration);
    proxy.stop().await;
}

#[tokio::test]
async fn a_stream_cut_short_counts_the_tokens_that_arrived_and_in_band_errors_are_counted() {
    let mut events = vec![(0, chunk("a")), (0, chunk("b")), (0, chunk("c"))];
    events.push((
        0,
        r#"{"error":{"message":"engine overloaded","type":"server_error"}}"#.into(),
    ));
    let (backend, _task) = sse_backend(events).await;
    let proxy = TestProxy::start(&format!(
        "routes:\n  - model: assistant\n    variants: [{{ name: only, backend: \"{backend}\" }}]\n"
    ))
    .await;
    let r = post(
        &client(),
        &proxy.url("/v1/chat/completions"),
        &[],
        r#"{"model":"assistant","stream":true}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let labels = r#"{route="assistant",variant="only"}"#;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while metric(
        &proxy,
        &format!("braid_gen_ai_server_request_duration_seconds_count{labels}"),
    )
    .await
        < 1.0
    {
        assert!(tokio::time::Instant::now() < deadline, "never recorded");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // No usage came: the three content events count as three tokens.
    let out = r#"braid_gen_ai_client_token_usage_sum{route="assistant",variant="only",token_type="output"}"#;
    assert_eq!(metric(&proxy, out).await, 3.0);
    assert_eq!(
        metric(&proxy, &format!("braid_gen_ai_stream_errors_total{labels}")).await,
        1.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_shadow_copy_names_the_shadow_variants_own_model() {
    use tokio::io::AsyncWriteExt;
    let a = Backend::start("a").await;
    // The shadow's backend: records what it is sent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shadow = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let _server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((_, body)) = read_request(&mut s, &mut buf).await {
                    let _ = tx.send(body);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                        .await;
                }
            });
        }
    });
    let proxy = TestProxy::start(&format!(
        r#"routes:
  - model: assistant
    variants:
      - {{ name: base, weight: 1, backend: "{}", target_model: llama-3-8b }}
      - {{ name: tuned, weight: 0, backend: "{shadow}", target_model: llama-3-8b-ft }}
    shadow: {{ variant: tuned, fraction: 1 }}
"#,
        a.url()
    ))
    .await;
    let body = r#"{"model":"assistant","prompt":"hi"}"#;
    let r = post(&client(), &proxy.url("/v1/completions"), &[], body).await;
    assert_eq!((r.status.as_u16(), r.variant()), (200, "base"));
    assert_eq!(
        r.json()["body"],
        body.replace("assistant", "llama-3-8b").as_str()
    );
    let copied = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("the shadow copy arrives")
        .unwrap();
    assert_eq!(copied, body.replace("assistant", "llama-3-8b-ft"));
    proxy.stop().await;
}

#[tokio::test]
async fn escaped_keys_are_routed_as_their_names_and_a_repeated_member_is_refused() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    // A path route behind the model route: what braid cannot read must not reach it.
    let config = format!(
        r#"routes:
  - model: assistant
    variants: [{{ name: base, backend: "{}", target_model: llama-3-8b }}]
  - path_prefix: /
    variants: [{{ name: open, backend: "{}" }}]
"#,
        a.url(),
        b.url()
    );
    let proxy = TestProxy::start(&config).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    // `\u006dodel` is `model` to every JSON parser: routed and rewritten as one.
    let r = post(&c, &url, &[], r#"{"\u006dodel":"assistant","messages":[]}"#).await;
    assert_eq!(
        (r.status.as_u16(), r.variant()),
        (200, "base"),
        "{}",
        r.text()
    );
    let seen: serde_json::Value = serde_json::from_str(r.json()["body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["model"], "llama-3-8b");
    let hits = (a.hits(), b.hits());
    for body in [
        r#"{"model":"assistant","\u006dodel":"internal-unreleased-model"}"#,
        r#"{"model":"assistant","model":"internal-unreleased-model"}"#,
        r#"{"model":"assistant","user":"a","\u0075ser":"b"}"#,
        r#"{"model":"assistant","stream":false,"stream":true}"#,
        r#"{"model":"assistant"} {"model":"internal-unreleased-model"}"#,
        "\u{feff}{\"model\":\"internal-unreleased-model\"}",
    ] {
        let r = post(&c, &url, &[], body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Nothing refused reached either backend.
    assert_eq!((a.hits(), b.hits()), hits);
    proxy.stop().await;
}
