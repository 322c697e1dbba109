//! The executor serving a language model (a tiny random-weight Gemma 3 GGUF, written
//! per test), driven over real sockets: OpenAI completions and chat, whole and
//! streamed; continuous batching (batched equals alone); refusals in OpenAI's shape;
//! queue overflow, deadlines and clients that leave; the vLLM-named metrics.

use std::path::Path;
use std::time::Duration;

use braid::executor::generate::LlmOptions;
use braid::executor::llm::testkit::{Tiny, write_tiny};
use braid::server::Limits;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{client, get, post};

pub struct TinyLlm {
    pub addr: std::net::SocketAddr,
    _running: braid::executor::server::RunningExecutor,
    _dir: tempfile::TempDir,
}

impl TinyLlm {
    pub async fn start(opts: LlmOptions, queue: usize) -> TinyLlm {
        Self::with(Tiny::default(), opts, queue).await
    }

    pub async fn with(t: Tiny, opts: LlmOptions, queue: usize) -> TinyLlm {
        Self::with_limits(t, opts, queue, Limits::default()).await
    }

    pub async fn with_limits(t: Tiny, opts: LlmOptions, queue: usize, limits: Limits) -> TinyLlm {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny(&path, &t).unwrap();
        let opts = braid::executor::server::ExecutorOptions {
            models: vec![spec(&path, queue)],
            device: "cpu".into(),
            trace: None,
            limits,
            llm: opts,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut running = braid::executor::server::start(opts, listener)
            .await
            .unwrap();
        running.wait_loaded().await.unwrap();
        TinyLlm {
            addr: running.addr,
            _running: running,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn call(&self, path: &str, body: Value) -> crate::support::Reply {
        post(&client(), &self.url(path), &[], &body.to_string()).await
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = get(&client(), &self.url("/metrics"), &[]).await.text();
        crate::support::metric_value(&text, series).unwrap_or(0.0)
    }
}

fn spec(path: &Path, queue: usize) -> braid::executor::server::ModelSpec {
    braid::executor::server::ModelSpec {
        name: "tiny".into(),
        source: path.display().to_string(),
        labels: vec![],
        threads: 1,
        compute_threads: Some(1),
        queue,
        max_batch: 64,
        default_temperature: None,
    }
}

/// The events of an SSE body, `[DONE]` as the string "[DONE]".
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                json!("[DONE]")
            } else {
                serde_json::from_str(d).unwrap()
            }
        })
        .collect()
}

fn streamed_text(evs: &[Value], chat: bool) -> String {
    evs.iter()
        .filter_map(|e| e["choices"].get(0))
        .filter_map(|c| {
            if chat {
                c["delta"]["content"].as_str()
            } else {
                c["text"].as_str()
            }
        })
        .collect()
}

#[tokio::test]
async fn completions_and_chat_whole_and_streamed_agree() {
    let llm = TinyLlm::start(LlmOptions::default(), 16).await;
    let body = json!({"model": "tiny", "prompt": "the cat sat on the mat", "max_tokens": 12, "temperature": 0});
    let whole = llm.call("/v1/completions", body.clone()).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    let w = whole.json();
    assert_eq!(w["object"], "text_completion");
    assert_eq!(w["choices"][0]["finish_reason"], "length");
    assert_eq!(w["usage"]["completion_tokens"], 12);
    // BOS + "the cat sat on the mat" in the tiny vocabulary's pieces.
    assert_eq!(w["usage"]["prompt_tokens"], 7);
    assert_eq!(w["usage"]["total_tokens"], 19);
    let text = w["choices"][0]["text"].as_str().unwrap().to_string();

    let mut s = body.clone();
    s["stream"] = json!(true);
    s["stream_options"] = json!({"include_usage": true});
    let r = llm.call("/v1/completions", s).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let evs = events(&r.text());
    assert_eq!(evs.last().unwrap(), "[DONE]");
    assert_eq!(
        streamed_text(&evs, false),
        text,
        "the stream says what the whole answer says"
    );
    let usage = &evs[evs.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    // Without include_usage, no usage chunk and no usage field.
    let mut s = body.clone();
    s["stream"] = json!(true);
    let evs = events(&llm.call("/v1/completions", s).await.text());
    assert!(evs.iter().all(|e| e.get("usage").is_none()));
    assert_eq!(evs[evs.len() - 2]["choices"][0]["finish_reason"], "length");

    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0});
    let c = llm.call("/v1/chat/completions", chat.clone()).await;
    assert_eq!(c.status, 200, "{}", c.text());
    let c = c.json();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    let said = c["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let mut cs = chat.clone();
    cs["stream"] = json!(true);
    let evs = events(&llm.call("/v1/chat/completions", cs).await.text());
    assert_eq!(evs[0]["object"], "chat.completion.chunk");
    assert_eq!(evs[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_text(&evs, true), said);
    // The chat's prompt is the documented transcript (the tiny model has no template).
    let p = llm
        .call(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "User: hello\nAssistant:", "max_tokens": 1}),
        )
        .await
        .json();
    assert_eq!(c["usage"]["prompt_tokens"], p["usage"]["prompt_tokens"]);

    let models = get(&client(), &llm.url("/v1/models"), &[]).await.json();
    assert_eq!(models["data"][0]["id"], "tiny");
}

#[tokio::test]
async fn logprobs_echo_stop_and_seeds() {
    let llm = TinyLlm::start(LlmOptions::default(), 16).await;
    let r = llm
        .call("/v1/completions", json!({"model": "tiny", "prompt": "a dog ran", "max_tokens": 5, "temperature": 0, "logprobs": 3}))
        .await
        .json();
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        // Greedy: the chosen token is the most likely one.
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(
            chosen <= 0.0 && (chosen - best).abs() < 1e-6,
            "{chosen} vs {best}"
        );
    }
    // Echo with max_tokens 0 scores the prompt (as evaluation harnesses do): the text
    // is the prompt, the first token has no log-probability, the rest do.
    let e = llm
        .call("/v1/completions", json!({"model": "tiny", "prompt": "a dog ran", "max_tokens": 0, "echo": true, "logprobs": 1}))
        .await;
    assert_eq!(e.status, 200, "{}", e.text());
    let e = e.json();
    assert_eq!(e["choices"][0]["text"], "a dog ran");
    let lp = &e["choices"][0]["logprobs"];
    let n = e["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert!(lp["token_logprobs"][0].is_null());
    assert!(
        lp["token_logprobs"].as_array().unwrap()[1..]
            .iter()
            .all(|x| x.as_f64().unwrap() < 0.0)
    );
    assert_eq!(e["usage"]["completion_tokens"], 0);

    // A stop string ends the text before it, finish_reason stop, whole and streamed.
    let free = llm
        .call(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "the", "max_tokens": 30, "temperature": 0}),
        )
        .await
        .json();
    let text = free["choices"][0]["text"].as_str().unwrap();
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(2).collect();
    let before = &text[..text.find(&stop).unwrap()];
    let body = json!({"model": "tiny", "prompt": "the", "max_tokens": 30, "temperature": 0, "stop": [stop]});
    let s = llm.call("/v1/completions", body.clone()).await.json();
    assert_eq!(s["choices"][0]["text"], before);
    assert_eq!(s["choices"][0]["finish_reason"], "stop");
    let mut sb = body;
    sb["stream"] = json!(true);
    let evs = events(&llm.call("/v1/completions", sb).await.text());
    assert_eq!(streamed_text(&evs, false), before);
    assert_eq!(evs[evs.len() - 2]["choices"][0]["finish_reason"], "stop");

    // Sampling repeats for a seed, and differs across seeds.
    let sampled = |seed: u64| {
        let llm = &llm;
        async move {
            llm.call("/v1/completions", json!({"model": "tiny", "prompt": "the", "max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "top_k": 40, "seed": seed}))
                .await
                .json()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(sampled(7).await, sampled(7).await);
    assert_ne!(sampled(7).await, sampled(8).await);
}

/// 16 greedy sequences of different prompt lengths, started a few at a time so they
/// join the running batch at different steps, each produce exactly what they
/// produce alone.
#[tokio::test]
async fn batched_equals_alone() {
    let llm = TinyLlm::start(
        LlmOptions {
            step_tokens: 16,
            ..LlmOptions::default()
        },
        64,
    )
    .await;
    let words = [
        "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "hello", "world",
    ];
    let prompts: Vec<String> = (0..16)
        .map(|i| {
            (0..1 + i * 3)
                .map(|j| words[(i + j) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let body = |p: &str| json!({"model": "tiny", "prompt": p, "max_tokens": 20, "temperature": 0, "logprobs": 0});
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(llm.call("/v1/completions", body(p)).await.json()["choices"][0].clone());
    }
    let mut tasks = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (url, b) = (llm.url("/v1/completions"), body(p).to_string());
        tasks.push(tokio::spawn(async move {
            // Staggered: later ones arrive while earlier ones decode.
            for _ in 0..i % 4 * 3 {
                tokio::task::yield_now().await;
            }
            post(&client(), &url, &[], &b).await.json()["choices"][0].clone()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let batched = t.await.unwrap();
        assert_eq!(batched["text"], alone[i]["text"], "prompt {i}");
        assert_eq!(
            batched["logprobs"]["tokens"], alone[i]["logprobs"]["tokens"],
            "prompt {i}"
        );
    }
    // And they were batched: some steps ran several sequences at once.
    let text = get(&client(), &llm.url("/metrics"), &[]).await.text();
    let series =
        |s: &str| crate::support::metric_value(&text, s).unwrap_or_else(|| panic!("no {s}"));
    let steps = series("braid_executor_llm_step_sequences_count{model=\"tiny\"}");
    let ones = series("braid_executor_llm_step_sequences_bucket{le=\"1.0\",model=\"tiny\"}");
    assert!(steps > ones, "{steps} steps, {ones} of one sequence");
}

#[tokio::test]
async fn refusals_are_400s_in_openais_shape() {
    let llm = TinyLlm::start(LlmOptions::default(), 16).await;
    let cases = [
        (json!({"model": "tiny", "prompt": "a", "n": 2}), "n"),
        (
            json!({"model": "tiny", "prompt": "a", "best_of": 3}),
            "best_of",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "frobnicate": true}),
            "frobnicate",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "presence_penalty": 0.5}),
            "presence_penalty",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "logit_bias": {"5": 10}}),
            "logit_bias",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "logprobs": 6}),
            "logprobs",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "temperature": 3}),
            "temperature",
        ),
        (json!({"model": "tiny", "prompt": ["a", "b"]}), "prompt"),
        (json!({"model": "tiny", "prompt": [999999]}), "prompt"),
        (json!({"model": "tiny"}), "prompt"),
        (
            json!({"model": "tiny", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}),
            "stop",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "max_tokens": 10000}),
            "prompt",
        ),
    ];
    for (body, param) in cases {
        let r = llm.call("/v1/completions", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["param"], param, "{body}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    let long = "the ".repeat(600);
    let r = llm
        .call("/v1/completions", json!({"model": "tiny", "prompt": long}))
        .await;
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    let chat = [
        (json!({"model": "tiny", "messages": []}), "messages"),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}),
            "tools",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "a"}]}),
            "messages",
        ),
    ];
    for (body, param) in chat {
        let r = llm.call("/v1/chat/completions", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    let r = llm
        .call("/v1/completions", json!({"model": "nope", "prompt": "a"}))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = post(
        &client(),
        &llm.url("/v1/completions"),
        &[("x-braid-priority", "urgent")],
        &json!({"model": "tiny", "prompt": "a"}).to_string(),
    )
    .await;
    assert_eq!(r.json()["error"]["param"], "x-braid-priority");
    let r = post(&client(), &llm.url("/v1/completions"), &[], "{not json").await;
    assert_eq!(r.status, 400);
    // The encoder protocols on a language model say what to use instead.
    let r = post(
        &client(),
        &llm.url("/v2/models/tiny/infer"),
        &[],
        &crate::support::infer_body(&["a"], ""),
    )
    .await;
    crate::support::assert_json_error(&r, 400, "/v1/completions");
}

/// A stream that runs while others wait: the queue's limit answers 429 with
/// Retry-After, a waiter past its deadline 504, and a client that leaves mid-stream
/// frees its sequence for the next at once.
#[tokio::test]
async fn overflow_deadlines_and_clients_that_leave() {
    let opts = LlmOptions {
        max_num_seqs: 1,
        ..LlmOptions::default()
    };
    let llm = TinyLlm::start(opts, 1).await;
    // A: a long stream, read only until its first token, then the socket is dropped
    // (greedy: a sampled one could end early on an end-of-sequence token).
    let mut a = TcpStream::connect(llm.addr).await.unwrap();
    let body =
        json!({"model": "tiny", "prompt": "the", "max_tokens": 400, "stream": true, "temperature": 0})
            .to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    a.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = a.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(
        llm.metric("vllm:num_requests_running{model_name=\"tiny\"}")
            .await,
        1.0
    );

    // B waits (the one running slot is A's); C finds the queue of 1 full.
    let b_url = llm.url("/v1/completions");
    let b = tokio::spawn(async move {
        post(
            &client(),
            &b_url,
            &[],
            &json!({"model": "tiny", "prompt": "a", "max_tokens": 3}).to_string(),
        )
        .await
    });
    while llm
        .metric("vllm:num_requests_waiting{model_name=\"tiny\"}")
        .await
        < 1.0
    {
        tokio::task::yield_now().await;
    }
    let c = llm
        .call(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "a", "max_tokens": 3}),
        )
        .await;
    assert_eq!(c.status, 429, "{}", c.text());
    assert_eq!(c.headers["retry-after"], "1");
    assert_eq!(c.json()["error"]["type"], "rate_limit_error");

    // A leaves: B is admitted at the next step and answered.
    drop(a);
    let b = tokio::time::timeout(Duration::from_secs(30), b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(
        llm.metric("braid_executor_llm_finished_total{model=\"tiny\",finished_reason=\"abort\"}")
            .await,
        1.0
    );
    let mut idle = false;
    for _ in 0..200 {
        if llm
            .metric("vllm:num_requests_running{model_name=\"tiny\"}")
            .await
            == 0.0
            && llm
                .metric("vllm:kv_cache_usage_perc{model_name=\"tiny\"}")
                .await
                == 0.0
        {
            idle = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(idle, "the engine holds nothing once every client is gone");

    // A waiter whose deadline passes while another runs is answered 504.
    let long = llm.url("/v1/completions");
    let runner = tokio::spawn(async move {
        post(
            &client(),
            &long,
            &[],
            &json!({"model": "tiny", "prompt": "the", "max_tokens": 200, "temperature": 0})
                .to_string(),
        )
        .await
    });
    while llm
        .metric("vllm:num_requests_running{model_name=\"tiny\"}")
        .await
        < 1.0
    {
        tokio::task::yield_now().await;
    }
    let late = post(
        &client(),
        &llm.url("/v1/completions"),
        &[("x-braid-timeout", "1ms")],
        &json!({"model": "tiny", "prompt": "a"}).to_string(),
    )
    .await;
    assert_eq!(late.status, 504, "{}", late.text());
    assert_eq!(late.json()["error"]["code"], "timeout");
    assert_eq!(runner.await.unwrap().status, 200);

    // A client that gives up on a whole (not streamed) answer while it is generated:
    // its sequence is freed too, and nothing stays counted.
    let mut g = TcpStream::connect(llm.addr).await.unwrap();
    let body =
        json!({"model": "tiny", "prompt": "the", "max_tokens": 400, "temperature": 0}).to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    g.write_all(head.as_bytes()).await.unwrap();
    while llm
        .metric("vllm:num_requests_running{model_name=\"tiny\"}")
        .await
        < 1.0
    {
        tokio::task::yield_now().await;
    }
    drop(g);
    let mut freed = false;
    for _ in 0..2000 {
        if llm
            .metric("braid_executor_llm_finished_total{model=\"tiny\",finished_reason=\"abort\"}")
            .await
            == 2.0
            && llm
                .metric("vllm:num_requests_running{model_name=\"tiny\"}")
                .await
                == 0.0
            && llm
                .metric("vllm:kv_cache_usage_perc{model_name=\"tiny\"}")
                .await
                == 0.0
        {
            freed = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        freed,
        "a whole answer's client that left still holds its sequence"
    );
}

#[tokio::test]
async fn metrics_carry_vllms_names() {
    let llm = TinyLlm::start(LlmOptions::default(), 16).await;
    let r = llm
        .call(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "the cat", "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(r.status, 200);
    let text = get(&client(), &llm.url("/metrics"), &[]).await.text();
    for series in [
        "vllm:num_requests_running{model_name=\"tiny\"} 0",
        "vllm:num_requests_waiting{model_name=\"tiny\"} 0",
        "vllm:prompt_tokens_total{model_name=\"tiny\"} 3",
        "vllm:generation_tokens_total{model_name=\"tiny\"} 4",
        "vllm:time_to_first_token_seconds_count{model_name=\"tiny\"} 1",
        "vllm:time_per_output_token_seconds_count{model_name=\"tiny\"} 3",
        "vllm:request_queue_time_seconds_count{model_name=\"tiny\"} 1",
        "vllm:e2e_request_latency_seconds_count{model_name=\"tiny\"} 1",
        "vllm:request_success_total{model_name=\"tiny\",finished_reason=\"length\"} 1",
        "braid_executor_llm_prompt_tokens_total{model=\"tiny\"} 3",
        "braid_executor_llm_generation_tokens_total{model=\"tiny\"} 4",
        "braid_executor_llm_time_to_first_token_seconds_count{model=\"tiny\"} 1",
        "braid_executor_llm_kv_cache_usage{model=\"tiny\"} 0",
        "braid_executor_requests_total{model=\"tiny\",code=\"200\"} 1",
    ] {
        assert!(text.contains(series), "no {series:?} in\n{text}");
    }
    // promtool's lint flags `:` in names (the recording-rule convention); they are
    // vLLM's own names, served only as aliases of braid's: checked without them.
    let braid_only: String = text
        .lines()
        .filter(|l| !l.contains("vllm:"))
        .map(|l| format!("{l}\n"))
        .collect();
    crate::support::promtool_check(&braid_only);
}

#[tokio::test]
async fn a_gguf_chat_template_is_rendered() {
    let t = Tiny {
        chat_template: Some(
            "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ),
        ..Tiny::default()
    };
    let llm = TinyLlm::with(t, LlmOptions::default(), 16).await;
    let c = llm
        .call("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}))
        .await;
    assert_eq!(c.status, 200, "{}", c.text());
    // The template writes the BOS itself; the same text as a prompt gets one added.
    let p = llm
        .call("/v1/completions", json!({"model": "tiny", "prompt": "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n", "max_tokens": 1, "echo": true, "logprobs": 0}))
        .await
        .json();
    assert_eq!(
        c.json()["usage"]["prompt_tokens"],
        p["usage"]["prompt_tokens"]
    );
    // Control tokens in text are tokens: BOS, <start_of_turn>, "user", ...
    assert_eq!(p["choices"][0]["logprobs"]["tokens"][1], "<start_of_turn>");
}

#[test]
fn bad_model_files_are_refused_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let load = |p: &Path| {
        braid::executor::llm::LlmModel::load("m", p, 64, &candle_core::Device::Cpu)
            .err()
            .unwrap()
    };
    let good = dir.path().join("good.gguf");
    write_tiny(&good, &Tiny::default()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    assert!(load(&cut).contains("truncated"), "{}", load(&cut));
    let head = dir.path().join("head.gguf");
    std::fs::write(&head, &bytes[..100]).unwrap();
    assert!(
        load(&head).contains("not a readable GGUF"),
        "{}",
        load(&head)
    );
    let other = dir.path().join("mamba.gguf");
    write_tiny(
        &other,
        &Tiny {
            arch: "mamba",
            ..Tiny::default()
        },
    )
    .unwrap();
    assert!(
        load(&other).contains("architecture \"mamba\" is not one braid runs"),
        "{}",
        load(&other)
    );
    let text = dir.path().join("text.gguf");
    std::fs::write(&text, "hello").unwrap();
    assert!(
        load(&text).contains("not a readable GGUF"),
        "{}",
        load(&text)
    );
}

fn check_sdk_report(r: &Value, model_listed: &str) {
    assert!(
        r["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == model_listed),
        "{r}"
    );
    assert_eq!(r["completion"]["finish"], "length", "{r}");
    assert_eq!(r["completion"]["usage"]["completion_tokens"], 8);
    assert_eq!(
        r["completion_stream"]["text"], r["completion"]["text"],
        "{r}"
    );
    assert_eq!(r["completion_stream"]["usage"], r["completion"]["usage"]);
    assert_eq!(r["chat"]["role"], "assistant");
    assert_eq!(r["chat_stream"], r["chat"]["content"], "{r}");
    assert!(
        r["chat"]["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t[1] == 2),
        "{r}"
    );
    assert_eq!(r["seeded"][0], r["seeded"][1]);
    assert_ne!(r["seeded"][0], r["seeded"][2]);
    let e = &r["errors"];
    assert_eq!(
        (e["n"]["class"].as_str(), e["n"]["param"].as_str()),
        (Some("BadRequestError"), Some("n")),
        "{e}"
    );
    assert_eq!(e["context"]["code"], "context_length_exceeded", "{e}");
    assert_eq!(e["unknown_model"]["class"], "NotFoundError", "{e}");
}

/// The `openai` SDK in its default mode, straight to the executor and through braid's
/// proxy, which routes the model name the client uses to two variants of it.
#[tokio::test]
async fn the_openai_sdk_drives_the_executor_directly_and_through_the_proxy() {
    let llm = TinyLlm::start(LlmOptions::default(), 16).await;
    let direct =
        crate::support::run_python_client("openai_llm.py", vec![llm.url("/v1"), "tiny".into()])
            .await;
    check_sdk_report(&direct, "tiny");
    let exec = llm.url("");
    let config = format!(
        r#"routes:
  - model: assistant
    variants:
      - {{ name: a, weight: 50, backend: "{exec}", target_model: tiny }}
      - {{ name: b, weight: 50, backend: "{exec}", target_model: tiny }}
"#
    );
    let proxy = crate::support::TestProxy::start(&config).await;
    let via = crate::support::run_python_client(
        "openai_llm.py",
        vec![proxy.url("/v1"), "assistant".into()],
    )
    .await;
    check_sdk_report(&via, "assistant");
    // Both variants serve the same model greedily: the same text either way.
    assert_eq!(via["completion"]["text"], direct["completion"]["text"]);
    proxy.stop().await;
}

/// deploy/example/llm's ConfigMap: the sidecar's routes pass `braid check`, and the
/// executor's models (one GGUF under two names, two temperatures) load as written.
#[test]
fn the_llm_example_configs_are_valid() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/example/llm/configmap.yaml"
    );
    let cm: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let braid_yaml = dir.path().join("braid.yaml");
    std::fs::write(&braid_yaml, cm["data"]["braid.yaml"].as_str().unwrap()).unwrap();
    let out = crate::support::braid(&["check", braid_yaml.to_str().unwrap()], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let doc = braid::config::executor::load(cm["data"]["executor.yaml"].as_str().unwrap()).unwrap();
    let t: Vec<_> = doc
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.default_temperature))
        .collect();
    assert_eq!(
        t,
        [("gemma-greedy", Some(0.0)), ("gemma-creative", Some(0.8))]
    );
    let bad = "models:\n  - { name: m, source: x.gguf, temperature: 3 }\n";
    let errs = braid::config::executor::load(bad).unwrap_err();
    assert_eq!(errs[0].path, "models[0].temperature");
}

/// Clients that trickle, stall or abandon a prompt's body: 408 for the stalled one, the
/// connection of the abandoned one dropped, and neither holds a sequence, a queue place
/// or KV cache; the next caller is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_abandoned_prompt_bodies_hold_nothing() {
    let limits = Limits {
        body_idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let llm = TinyLlm::with_limits(Tiny::default(), LlmOptions::default(), 4, limits).await;
    let head = "POST /v1/completions HTTP/1.1\r\nHost: e\r\ncontent-type: application/json\r\n";
    // Ten bytes of two hundred, then silence.
    let mut stalled = TcpStream::connect(llm.addr).await.unwrap();
    stalled
        .write_all(format!("{head}Content-Length: 200\r\n\r\n{{\"model\":").as_bytes())
        .await
        .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut resp))
        .await
        .expect("a stalled body's connection stays open")
        .ok();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    let body: Value = serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap();
    assert!(
        body["error"]["message"].is_string(),
        "not OpenAI's error object: {resp}"
    );
    // Half a body, then the client goes.
    let mut gone = TcpStream::connect(llm.addr).await.unwrap();
    gone.write_all(format!("{head}Content-Length: 200\r\n\r\n{{\"model\":\"tiny\",").as_bytes())
        .await
        .unwrap();
    drop(gone);
    let r = llm
        .call(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "a b c", "max_tokens": 3}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for series in [
        "vllm:num_requests_running{model_name=\"tiny\"}",
        "vllm:num_requests_waiting{model_name=\"tiny\"}",
        "vllm:kv_cache_usage_perc{model_name=\"tiny\"}",
    ] {
        assert_eq!(llm.metric(series).await, 0.0, "{series}");
    }
}

#[tokio::test]
async fn a_bad_timeout_header_is_a_400_never_a_panic() {
    let llm = TinyLlm::start(LlmOptions::default(), 16).await;
    let body = json!({"model": "tiny", "prompt": "a", "max_tokens": 2}).to_string();
    let url = llm.url("/v1/completions");
    for bad in [
        "-1",
        "inf",
        "NaN",
        "-1s",
        "infs",
        "NaNms",
        "1e400s",
        "1e9999",
        "",
        "soon",
        // Past what a duration holds.
        "99999999999999999999h",
    ] {
        let r = post(&client(), &url, &[("x-braid-timeout", bad)], &body).await;
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["param"], "x-braid-timeout", "{bad:?}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    // Huge but valid: capped, not overflowed; the call is served.
    for huge in ["9999999999s", "5000000000h", "2s"] {
        let r = post(&client(), &url, &[("x-braid-timeout", huge)], &body).await;
        assert_eq!(r.status, 200, "{huge:?}: {}", r.text());
    }
}
