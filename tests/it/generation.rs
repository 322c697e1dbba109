//! OpenAI-style streams past the routing (parts 2 to 4 of the LLM issue): braid asks
//! for the usage chunk and takes it out again, so the client gets what it would get
//! without braid; a stream that fails before its first token is tried again or sent
//! to the fallback; one that breaks after it ends with an error event, never [DONE];
//! and the generation reaches the access log and the experiment report.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::support::*;

/// What the scripted backend does with one request.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// A whole stream: three tokens, a finish, the usage chunk if asked, [DONE]. With
    /// `nulls`, every chunk carries `"usage":null` when usage was asked, as OpenAI's do.
    Stream { nulls: bool },
    /// 200, then an error as the first event.
    ErrorFirst,
    /// 200 and the role chunk, then the connection drops.
    ResetBeforeToken,
    /// 200, then nothing for this long before a whole stream.
    Silent(u64),
    /// Two tokens, then the connection drops.
    CutAfterTwo,
    /// A whole stream with this long between its tokens.
    Trickle(u64),
}

/// A backend streaming like vLLM, acting out `script` one request at a time (then
/// `Stream` forever); it keeps every request body it was sent.
struct LlmBackend {
    url: String,
    bodies: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl LlmBackend {
    async fn start(script: Vec<Act>) -> LlmBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let kept = bodies.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (bodies, script) = (kept.clone(), script.clone());
                tokio::spawn(serve(s, bodies, script));
            }
        });
        LlmBackend {
            url,
            bodies,
            _task: task,
        }
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

async fn serve(
    mut s: tokio::net::TcpStream,
    bodies: Arc<Mutex<Vec<String>>>,
    script: Arc<Mutex<VecDeque<Act>>>,
) {
    let Some((head, body)) = read_request(&mut s, &mut Vec::new()).await else {
        return;
    };
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    bodies.lock().unwrap().push(body.clone());
    let act = script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Act::Stream { nulls: false });
    let asked: serde_json::Value = serde_json::from_str(&body).unwrap();
    let usage = asked["stream_options"]["include_usage"] == true;
    let completions = path == "/v1/completions";
    if asked["stream"] != true {
        // A whole answer, as vLLM gives one.
        let answer = if completions {
            r#"{"id":"c1","object":"text_completion","model":"m","choices":[{"index":0,"text":"Hello!","finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}"#
        } else {
            r#"{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}"#
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            answer.len()
        );
        let _ = s.write_all(format!("{head}{answer}").as_bytes()).await;
        return;
    }
    let _ = s
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        .await;
    async fn send(s: &mut tokio::net::TcpStream, event: String) -> bool {
        let e = format!("data: {event}\n\n");
        let chunk = format!("{:x}\r\n{e}\r\n", e.len());
        s.write_all(chunk.as_bytes()).await.is_ok()
    }
    let chunk = |delta: &str, finish: &str, nulls: bool| {
        let null = if nulls && usage {
            r#","usage":null"#
        } else {
            ""
        };
        if completions {
            // A completion's chunk carries its text, not a delta.
            let text = serde_json::from_str::<serde_json::Value>(delta).unwrap()["content"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let text = serde_json::to_string(&text).unwrap();
            return format!(
                r#"{{"id":"c1","object":"text_completion","model":"m","choices":[{{"index":0,"text":{text},"finish_reason":{finish}}}]{null}}}"#
            );
        }
        format!(
            r#"{{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]{null}}}"#
        )
    };
    let role = chunk(r#"{"role":"assistant","content":""}"#, "null", false);
    match act {
        Act::ErrorFirst => {
            send(
                &mut s,
                r#"{"error":{"message":"engine is overloaded","type":"server_error","code":503}}"#
                    .into(),
            )
            .await;
            let _ = s.write_all(b"0\r\n\r\n").await;
            return;
        }
        Act::ResetBeforeToken => {
            send(&mut s, role).await;
            return; // dropped without the last chunk
        }
        Act::CutAfterTwo => {
            send(&mut s, role).await;
            for t in ["Hel", "lo"] {
                send(
                    &mut s,
                    chunk(&format!(r#"{{"content":"{t}"}}"#), "null", false),
                )
                .await;
            }
            return;
        }
        Act::Silent(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Act::Stream { .. } | Act::Trickle(_) => {}
    }
    let nulls = matches!(act, Act::Stream { nulls: true });
    send(
        &mut s,
        chunk(r#"{"role":"assistant","content":""}"#, "null", nulls),
    )
    .await;
    for t in ["Hel", "lo", "!"] {
        if let Act::Trickle(ms) = act {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if !send(
            &mut s,
            chunk(&format!(r#"{{"content":"{t}"}}"#), "null", nulls),
        )
        .await
        {
            return;
        }
    }
    send(&mut s, chunk("{}", r#""stop""#, nulls)).await;
    if usage {
        send(
            &mut s,
            r#"{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}"#.into(),
        )
        .await;
    }
    send(&mut s, "[DONE]".into()).await;
    let _ = s.write_all(b"0\r\n\r\n").await;
}

const CHAT: &str = "/v1/chat/completions";

async fn wait_for(proxy: &TestProxy, name: &str, at_least: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(proxy, name).await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The SSE text of a streamed answer, read to its end (or its break).
async fn stream_text(c: &TestClient, url: &str, body: &str) -> (u16, String, bool) {
    use http_body_util::BodyExt;
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    let mut broke = false;
    loop {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    text.extend_from_slice(d);
                }
            }
            None => break,
            Some(Err(_)) => {
                broke = true;
                break;
            }
        }
    }
    (status, String::from_utf8(text).unwrap(), broke)
}

#[tokio::test]
async fn braid_asks_for_usage_and_the_client_gets_the_stream_it_would_without_braid() {
    let backend = LlmBackend::start(vec![
        Act::Stream { nulls: false },
        Act::Stream { nulls: false },
        Act::Stream { nulls: true },
        Act::Stream { nulls: true },
        Act::Stream { nulls: false },
        Act::Stream { nulls: false },
    ])
    .await;
    let proxy = TestProxy::start(&format!(
        "routes:\n  - model: m\n    variants: [{{ name: only, backend: \"{}\" }}]\n",
        backend.url
    ))
    .await;
    let c = client();
    let plain = r#"{"model":"m","stream":true,"messages":[]}"#;
    let asked =
        r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    // Each body twice: direct, then through braid (plain, OpenAI-style nulls, asked).
    for body in [plain, plain, asked] {
        let direct = stream_text(&c, &format!("{}{CHAT}", backend.url), body).await;
        let through = stream_text(&c, &proxy.url(CHAT), body).await;
        assert_eq!(through, direct, "{body}");
        assert!(through.1.ends_with("data: [DONE]\n\n"));
        assert_eq!(through.1.contains("\"usage\""), body == asked);
    }
    // braid asked for usage where the client did not, and only then.
    let bodies = backend.bodies();
    assert_eq!(bodies.len(), 6);
    assert_eq!(bodies[0], plain);
    assert_eq!(
        bodies[1],
        r#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":true}}"#
    );
    assert_eq!(bodies[5], asked);
    // And each stream's tokens are the usage's: 11 in and 3 out, three times.
    let tokens = |t: &str| {
        format!(
            r#"braid_gen_ai_client_token_usage_sum{{route="m",variant="only",token_type="{t}"}}"#
        )
    };
    wait_for(&proxy, &tokens("output"), 9.0).await;
    assert_eq!(metric(&proxy, &tokens("input")).await, 33.0);
    proxy.stop().await;
}

fn retrying(backend: &str, fallback: Option<&str>) -> String {
    let mut variants = format!("      - {{ name: main, weight: 1, backend: \"{backend}\" }}\n");
    if let Some(f) = fallback {
        variants.push_str(&format!(
            "      - {{ name: spare, weight: 0, backend: \"{f}\" }}\n    fallback: spare\n"
        ));
    }
    format!(
        "routes:\n  - model: m\n    ttft_timeout: 300ms\n    retry: {{ attempts: 2 }}\n    variants:\n{variants}"
    )
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_token_is_tried_again() {
    let backend = LlmBackend::start(vec![
        Act::ErrorFirst,
        Act::Stream { nulls: false },
        Act::ResetBeforeToken,
        Act::Stream { nulls: false },
        Act::Silent(10_000),
        Act::Stream { nulls: false },
    ])
    .await;
    let proxy = TestProxy::start(&retrying(&backend.url, None)).await;
    let c = client();
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    for case in [
        "an error first",
        "a reset",
        "no first token in ttft_timeout",
    ] {
        let (status, text, broke) = stream_text(&c, &proxy.url(CHAT), body).await;
        assert_eq!(status, 200, "{case}");
        assert!(!broke, "{case}");
        // The client sees the good stream only, whole.
        assert!(!text.contains("error"), "{case}: {text}");
        assert_eq!(text.matches("\"content\":\"").count(), 4, "{case}: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{case}");
    }
    assert_eq!(backend.bodies().len(), 6);
    let retried = r#"braid_retries_total{route="m",variant="main",outcome="retried"}"#;
    assert_eq!(metric(&proxy, retried).await, 3.0);
    proxy.stop().await;
}

#[tokio::test]
async fn with_no_tries_left_the_fallback_serves_and_else_the_error_is_the_clients() {
    let failing = LlmBackend::start(vec![Act::ErrorFirst; 4]).await;
    let spare = LlmBackend::start(vec![]).await;
    let c = client();
    let body = r#"{"model":"m","stream":true}"#;
    // Both tries fail before a token, and the fallback serves.
    let proxy = TestProxy::start(&retrying(&failing.url, Some(&spare.url))).await;
    let r = post(&c, &proxy.url(CHAT), &[], body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.variant(), "spare");
    assert_eq!(r.headers["x-braid-fallback-from"], "main");
    let text = r.text();
    assert!(
        text.ends_with("data: [DONE]\n\n") && !text.contains("error"),
        "{text}"
    );
    proxy.stop().await;
    // With no fallback: the backend's own error event, as it sent it, after both tries.
    let proxy = TestProxy::start(&retrying(&failing.url, None)).await;
    let r = post(&c, &proxy.url(CHAT), &[], body).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("engine is overloaded"), "{text}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(failing.bodies().len(), 4);
    proxy.stop().await;
}

/// A stream's tries go through the one retry loop, so its rules hold for streams too:
/// a prompt larger than `retry.max_body_bytes` is not repeated (counted as
/// `body_too_large`), and the fallback serves it.
#[tokio::test]
async fn a_stream_over_the_retry_body_limit_is_not_repeated_but_falls_back() {
    let failing = LlmBackend::start(vec![Act::ErrorFirst; 2]).await;
    let spare = LlmBackend::start(vec![]).await;
    let config = retrying(&failing.url, Some(&spare.url)).replace(
        "retry: { attempts: 2 }",
        "retry: { attempts: 2, max_body_bytes: 64 }",
    );
    let proxy = TestProxy::start(&config).await;
    let c = client();
    let body = format!(
        r#"{{"model":"m","stream":true,"user":"{}"}}"#,
        "u".repeat(100)
    );
    let r = post(&c, &proxy.url(CHAT), &[], &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.variant(), "spare");
    assert_eq!(r.headers["x-braid-fallback-from"], "main");
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    assert_eq!(failing.bodies().len(), 1, "tried once");
    let too_large = r#"braid_retries_total{route="m",variant="main",outcome="body_too_large"}"#;
    assert_eq!(metric(&proxy, too_large).await, 1.0);
    let retried = r#"braid_retries_total{route="m",variant="main",outcome="retried"}"#;
    assert_eq!(metric(&proxy, retried).await, 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_stream_that_breaks_after_its_first_token_ends_with_an_error_event() {
    let backend = LlmBackend::start(vec![Act::CutAfterTwo]).await;
    let proxy = TestProxy::start(&retrying(&backend.url, None)).await;
    let (status, text, broke) = stream_text(
        &client(),
        &proxy.url(CHAT),
        r#"{"model":"m","stream":true}"#,
    )
    .await;
    assert_eq!(status, 200);
    // The stream ends cleanly, on an error event the SDK raises; never a [DONE].
    assert!(!broke, "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["type"], "server_error");
    assert_eq!(event["error"]["code"], "stream_broken");
    assert_eq!(text.matches("\"content\":\"").count(), 3, "{text}");
    // Tried once: past the first token nothing is repeated.
    assert_eq!(backend.bodies().len(), 1);
    let errors = r#"braid_gen_ai_stream_errors_total{route="m",variant="main"}"#;
    wait_for(&proxy, errors, 1.0).await;
    let out =
        r#"braid_gen_ai_client_token_usage_sum{route="m",variant="main",token_type="output"}"#;
    assert_eq!(metric(&proxy, out).await, 2.0);
    assert_eq!(metric(&proxy, "braid_requests_in_flight").await, 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn the_generation_reaches_the_access_log_and_the_experiment_report() {
    let (a, b) = (
        LlmBackend::start(vec![]).await,
        LlmBackend::start(vec![Act::Silent(200); 4]).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("braid.yaml");
    let log = dir.path().join("access.log");
    std::fs::write(
        &path,
        format!(
            "routes:\n  - model: m\n    variants:\n      - {{ name: base, weight: 1, backend: \"{}\" }}\n      - {{ name: slow, weight: 1, backend: \"{}\" }}\n    guardrail: {{ control: base, errors: false, slow_ttft: 100ms, warmup: 0s, min_bad_events: 1 }}\n    log: {{ sink: {}, fraction: 1 }}\n",
            a.url,
            b.url,
            dir.path().join("payloads.jsonl").display()
        ),
    )
    .unwrap();
    let mut opts = options(&path);
    opts.access_log = Some(braid::access::Destination::File(log.clone()));
    let proxy = TestProxy::start_at(&path, opts).await;
    let c = client();
    for variant in ["base", "slow", "base", "slow"] {
        let body = r#"{"model":"m","stream":true}"#;
        let r = post(&c, &proxy.url(CHAT), &[("x-braid-variant", variant)], body).await;
        assert_eq!(r.status, 200);
        assert!(r.text().ends_with("data: [DONE]\n\n"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() == 4 {
            break lines;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for line in &lines {
        assert_eq!(line["output_tokens"], 3, "{line}");
        assert_eq!(line["input_tokens"], 11, "{line}");
        assert_eq!(line["finish_reasons"], serde_json::json!(["stop"]));
        let ttft = line["ttft_ms"].as_f64().unwrap();
        assert!(line["duration_ms"].as_f64().unwrap() >= ttft, "{line}");
        if line["variant"] == "slow" {
            assert!(ttft >= 200.0, "{line}");
        }
    }
    // The payload log's records carry the same generation.
    let payloads = dir.path().join("payloads.jsonl");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let records = loop {
        let text = std::fs::read_to_string(&payloads).unwrap_or_default();
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if records.len() == 4 {
            break records;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for r in &records {
        let g = &r["generation"];
        assert_eq!(
            (g["input_tokens"].clone(), g["output_tokens"].clone()),
            (serde_json::json!(11), serde_json::json!(3)),
            "{r}"
        );
        assert!(g["ttft_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    let report = get(&c, &proxy.admin_url("/experiments"), &[]).await.json();
    let variants = &report["routes"][0]["variants"];
    let slow = &variants[1]["generation"];
    assert_eq!(slow["requests"], 2, "{report}");
    assert!(
        slow["ttft_ms"]["p50"].as_f64().unwrap() >= 200.0,
        "{report}"
    );
    assert_eq!(slow["output_tokens_per_request"], 3.0);
    assert!(
        variants[0]["generation"]["output_tokens_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streams_through_braid_and_raises_on_a_broken_stream() {
    let (a, b) = (
        LlmBackend::start(vec![Act::Stream { nulls: true }; 2]).await,
        LlmBackend::start(vec![Act::Stream { nulls: true }; 2]).await,
    );
    let flaky = LlmBackend::start(vec![
        Act::ErrorFirst,
        Act::Stream { nulls: false },
        Act::Silent(5_000),
        Act::Stream { nulls: false },
        Act::CutAfterTwo,
    ])
    .await;
    let proxy = TestProxy::start(&format!(
        r#"routes:
  - model: m
    variants:
      - {{ name: a, weight: 1, backend: "{}" }}
      - {{ name: b, weight: 1, backend: "{}" }}
  - model: flaky
    ttft_timeout: 300ms
    retry: {{ attempts: 2 }}
    variants: [{{ name: only, backend: "{}" }}]
"#,
        a.url, b.url, flaky.url
    ))
    .await;
    let report = run_python_client("openai_streams.py", vec![proxy.url("/v1")]).await;
    // Not asked: no chunk carries usage (braid's own usage chunk was taken out).
    assert_eq!(report["plain"]["text"], "Hello!", "{report}");
    let plain = report["plain"]["usages"].as_array().unwrap();
    assert!(plain.iter().all(|u| u.is_null()), "{report}");
    // Asked: the last chunk's usage, as the backend sent it.
    let asked = report["asked"]["usages"].as_array().unwrap();
    assert_eq!(asked.last().unwrap()["completion_tokens"], 3, "{report}");
    assert_eq!(report["asked"]["text"], "Hello!");
    // The split: each user stays on one variant; both variants serve someone.
    let mut variants = std::collections::HashSet::new();
    for (user, seen) in report["split"].as_object().unwrap() {
        let seen = seen.as_array().unwrap();
        assert_eq!(seen[0]["variant"], seen[1]["variant"], "{user}: {report}");
        assert!(seen.iter().all(|s| s["text"] == "Hello!"), "{report}");
        variants.insert(seen[0]["variant"].as_str().unwrap().to_string());
    }
    assert_eq!(variants.len(), 2, "{report}");
    assert_eq!(report["whole_chat"]["text"], "Hello!");
    assert_eq!(report["whole_chat"]["completion_tokens"], 3);
    assert_eq!(report["completions"]["text"], "Hello!");
    assert_eq!(report["completions"]["streamed"], "Hello!");
    // An error first, then a silent first token: retried, the SDK never saw either.
    assert_eq!(
        report["flaky"],
        serde_json::json!(["Hello!", "Hello!"]),
        "{report}"
    );
    // Broken after two tokens: the SDK raises, with braid's words, the text so far.
    let broken = &report["broken"];
    assert_eq!(broken["raised"], "APIError", "{report}");
    assert!(
        broken["message"].as_str().unwrap().contains("stream broke"),
        "{report}"
    );
    assert_eq!(broken["text"], "Hello");
    assert_eq!(flaky.bodies().len(), 5);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_variant_sheds_sheddable_classes_and_queues_the_rest() {
    // The first generation holds the only place until its last byte.
    let backend = LlmBackend::start(vec![Act::Silent(1500)]).await;
    let proxy = TestProxy::start(&format!(
        r#"routes:
  - model: m
    variants: [{{ name: only, backend: "{}", max_concurrent: 1 }}]
    admission:
      max_queue: 1
      priorities: [{{ name: interactive }}, {{ name: batch, sheddable: true }}]
"#,
        backend.url
    ))
    .await;
    let body = r#"{"model":"m","stream":true}"#;
    let url = proxy.url(CHAT);
    let first = tokio::spawn({
        let url = url.clone();
        async move { stream_text(&client(), &url, body).await }
    });
    let labels = r#"{route="m",variant="only"}"#;
    wait_for(&proxy, &format!("braid_admission_running{labels}"), 1.0).await;
    let c = client();
    // A sheddable class is refused at once, in OpenAI's shape, with Retry-After.
    let shed = post(&c, &url, &[("x-braid-priority", "batch")], body).await;
    assert_eq!(shed.status, 429, "{}", shed.text());
    assert_eq!(shed.headers["retry-after"], "1");
    assert_eq!(shed.json()["error"]["type"], "rate_limit_error");
    assert_eq!(shed.json()["error"]["code"], "shed");
    // An interactive one waits for the place...
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { stream_text(&client(), &url, body).await }
    });
    wait_for(&proxy, &format!("braid_admission_waiting{labels}"), 1.0).await;
    // ...and the queue holds one: the next is refused.
    let full = post(&c, &url, &[("x-braid-priority", "interactive")], body).await;
    assert_eq!(full.status, 429);
    assert_eq!(full.json()["error"]["code"], "queue_full");
    let unknown = post(&c, &url, &[("x-braid-priority", "vip")], body).await;
    assert_eq!(unknown.status, 400);
    // The first ends, and the waiting one is served whole.
    for task in [first, waiting] {
        let (status, text, broke) = task.await.unwrap();
        assert_eq!((status, broke), (200, false));
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    assert_eq!(backend.bodies().len(), 2);
    wait_for(
        &proxy,
        &format!("braid_gen_ai_server_request_duration_seconds_count{labels}"),
        2.0,
    )
    .await;
    assert_eq!(
        metric(&proxy, &format!("braid_admission_running{labels}")).await,
        0.0
    );
    assert_eq!(
        metric(&proxy, &format!("braid_admission_waiting{labels}")).await,
        0.0
    );
    let refused = |reason: &str| {
        format!(r#"braid_admission_refused_total{{route="m",variant="only",reason="{reason}"}}"#)
    };
    assert_eq!(metric(&proxy, &refused("shed")).await, 1.0);
    assert_eq!(metric(&proxy, &refused("queue_full")).await, 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_still_gets_its_payload_record_and_frees_everything() {
    use http_body_util::BodyExt;
    let backend = LlmBackend::start(vec![Act::Trickle(300)]).await;
    let dir = tempfile::tempdir().unwrap();
    let payloads = dir.path().join("payloads.jsonl");
    let proxy = TestProxy::start(&format!(
        "routes:\n  - model: m\n    variants: [{{ name: only, backend: \"{}\" }}]\n    log: {{ sink: {}, fraction: 1 }}\n",
        backend.url,
        payloads.display()
    ))
    .await;
    let req = http::Request::post(proxy.url(CHAT))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"model":"m","stream":true}"#,
        )))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    // The first token arrives (after the role chunk); then the client leaves.
    loop {
        let frame = body.frame().await.unwrap().unwrap();
        if String::from_utf8_lossy(frame.data_ref().unwrap()).contains("Hel") {
            break;
        }
    }
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let record = loop {
        let text = std::fs::read_to_string(&payloads).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            break serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "no record");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Measured to where it was cut: one token, its time to first token.
    assert_eq!(record["generation"]["output_tokens"], 1, "{record}");
    assert!(
        record["generation"]["ttft_ms"].as_f64().unwrap() >= 300.0,
        "{record}"
    );
    assert_eq!(metric(&proxy, "braid_requests_in_flight").await, 0.0);
    assert_eq!(metric(&proxy, "braid_buffered_bytes").await, 0.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_give_up_reset_or_trickle_on_an_llm_route_leave_nothing_held() {
    use tokio::io::AsyncReadExt;
    // The first two generations never send a token while their clients wait.
    let backend = LlmBackend::start(vec![Act::Silent(10_000), Act::Silent(10_000)]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("braid.yaml");
    std::fs::write(
        &path,
        format!(
            "routes:\n  - model: m\n    variants: [{{ name: only, backend: \"{}\", max_concurrent: 1 }}]\n",
            backend.url
        ),
    )
    .unwrap();
    let mut opts = options(&path);
    opts.limits.body_idle_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start_at(&path, opts).await;
    let body = r#"{"model":"m","stream":true}"#;
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let labels = r#"{route="m",variant="only"}"#;
    let running = format!("braid_admission_running{labels}");
    // Gives up (closes), then resets (RST), each while braid waits for the first token.
    for reset in [false, true] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        wait_for(&proxy, &running, 1.0).await;
        if reset {
            // A zero linger does not block: the close is sent as a RST at once.
            #[allow(deprecated)]
            s.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(s);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metric(&proxy, &running).await != 0.0
            || metric(&proxy, "braid_requests_in_flight").await != 0.0
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a place is still held"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The place is free: the next generation is served whole.
    let (status, text, _) = stream_text(&client(), &proxy.url(CHAT), body).await;
    assert_eq!(status, 200);
    assert!(text.ends_with("data: [DONE]\n\n"));
    // A body that stalls: 408 in OpenAI's shape, and its bytes given back.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let cut = request.len() - 10;
    s.write_all(&request.as_bytes()[..cut]).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains(r#""type":"invalid_request_error""#), "{out}");
    assert!(out.contains(r#""code":"body_stalled""#), "{out}");
    assert_eq!(metric(&proxy, "braid_buffered_bytes").await, 0.0);
    assert_eq!(metric(&proxy, "braid_requests_in_flight").await, 0.0);
    assert_eq!(metric(&proxy, &running).await, 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn streams_that_fail_before_their_first_token_count_as_failures_and_eject() {
    // Every stream of `main` is a 200 whose first event is an error.
    let failing = LlmBackend::start(vec![Act::ErrorFirst; 8]).await;
    let spare = LlmBackend::start(vec![]).await;
    let proxy = TestProxy::start(&format!(
        "routes:\n  - model: m\n    variants:\n      - {{ name: main, weight: 1, backend: \"{}\" }}\n      - {{ name: spare, weight: 0, backend: \"{}\" }}\n    fallback: spare\n    outlier: {{ consecutive_failures: 2, base_ejection: 1h, max_ejection: 1h }}\n",
        failing.url, spare.url
    ))
    .await;
    let body = r#"{"model":"m","stream":true}"#;
    for _ in 0..2 {
        let r = post(&client(), &proxy.url(CHAT), &[], body).await;
        assert_eq!((r.status.as_u16(), r.variant()), (200, "spare"));
    }
    // Two failures in a row (not a success and a failure each): `main` is ejected, and
    // the next call goes to the spare without trying it.
    let ejected = r#"braid_variant_ejected{route="m",variant="main"}"#;
    assert_eq!(metric(&proxy, ejected).await, 1.0);
    let r = post(&client(), &proxy.url(CHAT), &[], body).await;
    assert_eq!(r.variant(), "spare");
    assert_eq!(failing.bodies().len(), 2);
    proxy.stop().await;
}

/// A backend whose every connection is answered by `act` after its request is read:
/// streams of bytes written by hand, cut wherever the test says.
fn hand_written<F, Fut>(act: F) -> (String, tokio::task::JoinHandle<()>)
where
    F: Fn(tokio::net::TcpStream, String) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", std_listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        while let Ok((mut s, _)) = listener.accept().await {
            let act = act.clone();
            tokio::spawn(async move {
                if let Some((_, body)) = read_request(&mut s, &mut Vec::new()).await {
                    act(s, body).await;
                }
            });
        }
    });
    (url, task)
}

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// `bytes` as one chunk of a chunked body.
fn chunk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

fn token(t: &str) -> String {
    format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n"
    )
}

#[tokio::test]
async fn a_backend_that_dies_inside_an_event_after_the_first_token_ends_with_an_error_event() {
    // The event the backend dies inside, at every byte offset of it.
    let third = token("world");
    let cut = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (url, _task) = {
        let (cut, third) = (cut.clone(), third.clone());
        hand_written(move |mut s, _| {
            let at = cut.load(std::sync::atomic::Ordering::SeqCst);
            let third = third.clone();
            async move {
                let mut out = SSE_HEAD.to_vec();
                out.extend(chunk(token("Hel").as_bytes()));
                out.extend(chunk(token("lo").as_bytes()));
                // The cut part of the third event, in a chunk of its own length: the
                // chunk is whole, the event is not; then the connection drops.
                if at > 0 {
                    out.extend(chunk(&third.as_bytes()[..at]));
                }
                let _ = s.write_all(&out).await;
                let _ = s.flush().await;
            }
        })
    };
    let proxy = TestProxy::start(&retrying(&url, None)).await;
    let c = client();
    let errors = r#"braid_gen_ai_stream_errors_total{route="m",variant="main"}"#;
    for at in 0..third.len() {
        cut.store(at, std::sync::atomic::Ordering::SeqCst);
        let (status, text, broke) =
            stream_text(&c, &proxy.url(CHAT), r#"{"model":"m","stream":true}"#).await;
        assert_eq!(status, 200, "cut at {at}");
        assert!(!broke, "cut at {at}: the client's stream was cut: {text:?}");
        // The two whole events, then braid's error event; nothing of the third.
        let want_prefix = format!("{}{}", token("Hel"), token("lo"));
        assert!(text.starts_with(&want_prefix), "cut at {at}: {text:?}");
        let last = &text[want_prefix.len()..];
        let event: serde_json::Value = serde_json::from_str(
            last.strip_prefix("data: ")
                .and_then(|l| l.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("cut at {at}: {last:?}")),
        )
        .unwrap();
        assert_eq!(event["error"]["code"], "stream_broken", "cut at {at}");
        assert!(
            !text.contains("world") && !text.contains("[DONE]"),
            "cut at {at}"
        );
        // Counted as a broken stream, every time.
        wait_for(&proxy, errors, (at + 1) as f64).await;
    }
    assert_eq!(metric(&proxy, "braid_requests_in_flight").await, 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn server_sent_events_with_cr_only_line_ends_are_framed_as_they_come() {
    let go = Arc::new(tokio::sync::Notify::new());
    let (url, _task) = {
        let go = go.clone();
        hand_written(move |mut s, body| {
            let go = go.clone();
            async move {
                let asked: serde_json::Value = serde_json::from_str(&body).unwrap();
                let usage = asked["stream_options"]["include_usage"] == true;
                let cr = |e: String| e.replace('\n', "\r");
                let mut out = SSE_HEAD.to_vec();
                out.extend(chunk(cr(token("Hel")).as_bytes()));
                let _ = s.write_all(&out).await;
                // Nothing more until the client has its first token: braid must not
                // hold the stream to its end.
                go.notified().await;
                let mut out = chunk(cr(token("lo")).as_bytes());
                if usage {
                    out.extend(chunk(cr("data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n".into()).as_bytes()));
                }
                out.extend(chunk(b"data: [DONE]\r\r"));
                out.extend(b"0\r\n\r\n");
                let _ = s.write_all(&out).await;
            }
        })
    };
    let proxy = TestProxy::start(&retrying(&url, None)).await;
    use http_body_util::BodyExt;
    let req = http::Request::post(proxy.url(CHAT))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"model":"m","stream":true}"#,
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), client().request(req))
        .await
        .expect("the head waited for the stream's end")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event waited for the stream's end")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.data_ref().unwrap(),
        token("Hel").replace('\n', "\r").as_bytes()
    );
    go.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    let rest = String::from_utf8(rest.to_vec()).unwrap();
    // The usage chunk braid asked for is taken out: the client did not ask for it.
    assert!(!rest.contains("usage"), "{rest:?}");
    assert!(rest.contains("[DONE]"), "{rest:?}");
    // And it was read: the tokens counted from braid's own usage chunk.
    let out =
        r#"braid_gen_ai_client_token_usage_sum{route="m",variant="main",token_type="output"}"#;
    wait_for(&proxy, out, 2.0).await;
    proxy.stop().await;
}

#[tokio::test]
async fn max_inflight_counts_a_stream_to_its_last_byte() {
    let go = Arc::new(tokio::sync::Notify::new());
    let (url, _task) = {
        let go = go.clone();
        hand_written(move |mut s, _| {
            let go = go.clone();
            async move {
                let mut out = SSE_HEAD.to_vec();
                out.extend(chunk(token("Hel").as_bytes()));
                let _ = s.write_all(&out).await;
                // On until told, or until braid closes the call (its client left).
                let mut byte = [0u8; 1];
                tokio::select! {
                    _ = go.notified() => {}
                    _ = tokio::io::AsyncReadExt::read(&mut s, &mut byte) => return,
                }
                let mut out = chunk(b"data: [DONE]\n\n");
                out.extend(b"0\r\n\r\n");
                let _ = s.write_all(&out).await;
            }
        })
    };
    // The route's max_inflight, then the process's --max-inflight.
    let route = format!(
        "routes:\n  - model: m\n    max_inflight: 1\n    variants: [{{ name: main, backend: \"{url}\" }}]\n"
    );
    let open =
        format!("routes:\n  - model: m\n    variants: [{{ name: main, backend: \"{url}\" }}]\n");
    for (config, max) in [(route, None), (open, Some(1))] {
        let proxy = match max {
            None => TestProxy::start(&config).await,
            Some(n) => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("braid.yaml");
                std::fs::write(&path, &config).unwrap();
                let mut opts = options(&path);
                opts.limits.max_inflight = n;
                let mut p = TestProxy::start_at(&path, opts).await;
                p._dir = Some(dir);
                p
            }
        };
        let c = client();
        use http_body_util::BodyExt;
        let req = http::Request::post(proxy.url(CHAT))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"model":"m","stream":true}"#,
            )))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        let mut body = resp.into_body();
        // Its first token is here: the head was sent long ago, the generation goes on.
        body.frame().await.unwrap().unwrap();
        assert_eq!(metric(&proxy, "braid_requests_in_flight").await, 1.0);
        let busy = post(&c, &proxy.url(CHAT), &[], r#"{"model":"m"}"#).await;
        assert_eq!(
            busy.status,
            if max.is_some() { 503 } else { 429 },
            "{}",
            busy.text()
        );
        assert!(busy.headers.contains_key("retry-after"));
        // The stream ends: its count is given back, and the next call is served.
        go.notify_one();
        body.collect().await.unwrap();
        wait_for_in_flight_zero(&proxy).await;
        go.notify_one();
        let (status, _, _) =
            stream_text(&c, &proxy.url(CHAT), r#"{"model":"m","stream":true}"#).await;
        assert_eq!(status, 200);
        // A client that leaves mid-stream gives its count back too.
        let req = http::Request::post(proxy.url(CHAT))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"model":"m","stream":true}"#,
            )))
            .unwrap();
        let mut body = c.request(req).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        wait_for_in_flight_zero(&proxy).await;
        proxy.stop().await;
    }
}

async fn wait_for_in_flight_zero(proxy: &TestProxy) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(proxy, "braid_requests_in_flight").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a request stayed in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
