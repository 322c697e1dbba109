//! Request coalescing through real sockets, against a scriptable mock executor and the
//! real executor: every client gets exactly its own rows, and every fault fails safe.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

fn rows_of(r: &Reply) -> Vec<String> {
    r.json()["outputs"][0]["data"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// A scriptable mock executor and a proxy batching route `m` to it.
async fn mock_behind_proxy(behaviour: MockBehaviour, batching: &str) -> (MockExecutor, TestProxy) {
    let exec = MockExecutor::start(behaviour).await;
    let proxy = TestProxy::start(&batching_config(exec.addr, batching)).await;
    (exec, proxy)
}

async fn concurrent(
    proxy: &TestProxy,
    clients: usize,
    rows: usize,
    tag: &str,
) -> Vec<(Vec<String>, Reply)> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, url) = (client(), proxy.url("/v2/models/m/infer"));
        let texts: Vec<String> = (0..rows).map(|r| format!("{tag}-c{c}-r{r}")).collect();
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let r = post(
                &client,
                &url,
                &[],
                &infer_body(&refs, &format!(r#","id":"{}""#, texts[0])),
            )
            .await;
            (texts, r)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_each_get_exactly_their_own_rows() {
    let (exec, proxy) = mock_behind_proxy(
        MockBehaviour {
            fixed: Duration::from_millis(5),
            per_row: Duration::from_micros(500),
            ..Default::default()
        },
        "{ max_batch_size: 32, max_queue: 256 }",
    )
    .await;
    for round in 0..3 {
        let results = concurrent(&proxy, 64, 1 + round, &format!("round{round}")).await;
        for (texts, r) in &results {
            assert_eq!(r.status, 200, "{}", r.text());
            let want: Vec<String> = texts.iter().map(|t| format!("{t}!")).collect();
            assert_eq!(rows_of(r), want, "a client got rows that are not its own");
            assert_eq!(r.json()["id"], texts[0].as_str());
            assert_eq!(r.variant(), "local");
        }
    }
    let batches = exec.batches();
    let avg = batches.iter().sum::<usize>() as f64 / batches.len() as f64;
    assert!(
        avg > 2.0,
        "average rows per executor call {avg} ({batches:?})"
    );
    let m = get(&client(), &proxy.admin_url("/metrics"), &[])
        .await
        .text();
    assert!(
        m.contains("braid_batch_size_count{route=\"m\",variant=\"local\"}"),
        "{m}"
    );
    assert!(
        m.contains("braid_batch_flushes_total{route=\"m\",variant=\"local\",reason=\"full\"}")
            || m.contains("reason=\"idle\""),
        "{m}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn one_client_at_a_time_pays_no_waiting_tax() {
    let exec = MockExecutor::start(MockBehaviour::default()).await;
    let proxy = TestProxy::start(&batching_config(exec.addr, "{ max_batch_size: 32 }")).await;
    let c = client();
    for i in 0..20 {
        let r = post(
            &c,
            &proxy.url("/v2/models/m/infer"),
            &[],
            &infer_body(&[&format!("solo{i}")], ""),
        )
        .await;
        assert_eq!(rows_of(&r), [format!("solo{i}!")]);
    }
    assert_eq!(exec.batches(), vec![1; 20]);
    let m = get(&c, &proxy.admin_url("/metrics"), &[]).await.text();
    assert!(
        m.contains(r#"braid_batch_flushes_total{route="m",variant="local",reason="idle"} 20"#),
        "{m}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after_at_once() {
    let (_exec, proxy) = mock_behind_proxy(
        MockBehaviour {
            fixed: Duration::from_millis(400),
            ..Default::default()
        },
        "{ max_batch_size: 1, max_queue: 2 }",
    )
    .await;
    let results = concurrent(&proxy, 10, 1, "q").await;
    let limited: Vec<&Reply> = results
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.status == 429)
        .collect();
    assert!(
        !limited.is_empty(),
        "no 429 among {:?}",
        results.iter().map(|(_, r)| r.status).collect::<Vec<_>>()
    );
    for r in &limited {
        assert_eq!(r.headers["retry-after"], "1");
        assert_json_error(r, 429, "queue is full");
    }
    assert!(
        results
            .iter()
            .all(|(_, r)| r.status == 200 || r.status == 429)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_past_its_deadline_gets_504_and_is_not_sent() {
    let (exec, proxy) = mock_behind_proxy(
        MockBehaviour {
            fixed: Duration::from_millis(300),
            ..Default::default()
        },
        "{ max_batch_size: 1 }",
    )
    .await;
    let (c1, c2) = (client(), client());
    let url = proxy.url("/v2/models/m/infer");
    let first_body = infer_body(&["first"], "");
    let slow = post(&c1, &url, &[], &first_body);
    let late = async {
        exec.wait_seen("first").await;
        post(
            &c2,
            &url,
            &[("x-braid-timeout", "100ms")],
            &infer_body(&["expires-in-queue"], ""),
        )
        .await
    };
    let (a, b) = tokio::join!(slow, late);
    assert_eq!(a.status, 200);
    assert_json_error(&b, 504, "deadline");
    assert!(
        !exec.seen().contains(&"expires-in-queue".to_string()),
        "an expired request was sent"
    );
    let r = post(
        &c1,
        &url,
        &[("x-braid-timeout", "soon")],
        &infer_body(&["x"], ""),
    )
    .await;
    assert_eq!(r.status, 400);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_before_dispatch_is_never_sent() {
    let (exec, proxy) = mock_behind_proxy(
        MockBehaviour {
            fixed: Duration::from_millis(300),
            ..Default::default()
        },
        "{ max_batch_size: 8 }",
    )
    .await;
    let url = proxy.url("/v2/models/m/infer");
    let c1 = client();
    let first = tokio::spawn({
        let url = url.clone();
        async move { post(&c1, &url, &[], &infer_body(&["occupies-the-executor"], "")).await }
    });
    exec.wait_seen("occupies-the-executor").await;
    // Queued behind the first batch, then the client gives up.
    let c2 = client();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        post(&c2, &url, &[], &infer_body(&["abandoned"], "")),
    )
    .await;
    assert!(gave_up.is_err());
    drop(c2);
    assert_eq!(first.await.unwrap().status, 200);
    // One more request goes through the batcher after the abandoned one was seen gone.
    let r = post(&client(), &url, &[], &infer_body(&["after"], "")).await;
    assert_eq!(r.status, 200);
    assert!(
        !exec.seen().contains(&"abandoned".to_string()),
        "a cancelled request reached the executor"
    );
    let m = get(&client(), &proxy.admin_url("/metrics"), &[])
        .await
        .text();
    assert!(
        m.contains(r#"braid_batch_dropped_total{route="m",variant="local",priority="default",reason="cancelled"} 1"#),
        "{m}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_item_fails_alone_and_the_rest_succeed() {
    let (exec, proxy) = mock_behind_proxy(
        MockBehaviour {
            fixed: Duration::from_millis(20),
            poison: true,
            ..Default::default()
        },
        "{ max_batch_size: 16, max_delay: 20ms }",
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (c, url) = (client(), proxy.url("/v2/models/m/infer"));
        let text = if i == 5 {
            "POISON pill".to_string()
        } else {
            format!("fine-{i}")
        };
        tasks.push(tokio::spawn(async move {
            (
                text.clone(),
                post(&c, &url, &[], &infer_body(&[&text], "")).await,
            )
        }));
    }
    for t in tasks {
        let (text, r) = t.await.unwrap();
        if text.contains("POISON") {
            assert_eq!(r.status, 400, "{}", r.text());
            assert_eq!(r.json()["error"], "poisoned input");
        } else {
            assert_eq!(r.status, 200, "{text}: {}", r.text());
            assert_eq!(rows_of(&r), [format!("{text}!")]);
        }
    }
    assert!(
        exec.batches().iter().any(|&n| n > 1),
        "the poison must have been batched with others"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_or_garbled_replies_fail_the_whole_batch_with_502_and_leak_nothing() {
    for (what, set) in [
        (
            "short",
            Box::new(|b: &mut MockBehaviour| b.drop_row = true) as Box<dyn Fn(&mut MockBehaviour)>,
        ),
        (
            "garbage",
            Box::new(|b: &mut MockBehaviour| b.garbage = true),
        ),
    ] {
        let mut behaviour = MockBehaviour {
            fixed: Duration::from_millis(20),
            ..Default::default()
        };
        set(&mut behaviour);
        let (_exec, proxy) =
            mock_behind_proxy(behaviour, "{ max_batch_size: 16, max_delay: 20ms }").await;
        for (_, r) in concurrent(&proxy, 8, 2, what).await {
            assert_json_error(&r, 502, "");
            assert!(r.json().get("outputs").is_none(), "{what}: data leaked");
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_still_loading_is_a_503_with_retry_after_for_every_caller() {
    let behaviour = MockBehaviour {
        fixed: Duration::from_millis(5),
        loading: true,
        ..Default::default()
    };
    let (_exec, proxy) =
        mock_behind_proxy(behaviour, "{ max_batch_size: 16, max_delay: 5ms }").await;
    for (_, r) in concurrent(&proxy, 4, 2, "loading").await {
        assert_json_error(&r, 503, "loading");
        assert_eq!(
            r.headers["retry-after"], "1",
            "a retryable 503 must say when"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_that_permutes_rows_is_caught_by_row_ids_and_leaks_nothing() {
    let (exec, proxy) = mock_behind_proxy(
        MockBehaviour {
            fixed: Duration::from_millis(20),
            ..Default::default()
        },
        "{ max_batch_size: 16, max_delay: 20ms, row_id: braid_row_id }",
    )
    .await;
    // In order: every client gets its own rows, and never sees the row-id tensor.
    for (texts, r) in concurrent(&proxy, 8, 2, "ordered").await {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            rows_of(&r),
            texts.iter().map(|t| format!("{t}!")).collect::<Vec<_>>()
        );
        assert_eq!(
            r.json()["outputs"].as_array().unwrap().len(),
            1,
            "row ids stripped"
        );
    }
    // Shapes stay right while rows are reversed: only the row ids can tell.
    exec.set(|b| b.shuffle = true);
    let results = concurrent(&proxy, 8, 2, "shuffled").await;
    assert!(
        exec.batches().iter().any(|&n| n > 2),
        "no batch formed: {:?}",
        exec.batches()
    );
    for (_, r) in results {
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().contains("reordered"),
            "{}",
            r.text()
        );
        assert!(r.json().get("outputs").is_none(), "data leaked");
    }
    // A client may not forge the row ids.
    let forged = r#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["x"]},{"name":"braid_row_id","datatype":"INT64","shape":[1],"data":[1]}]}"#;
    let r = post(&client(), &proxy.url("/v2/models/m/infer"), &[], forged).await;
    assert_json_error(&r, 400, "reserved");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_killed_mid_batch_gives_503_with_retry_after_then_recovers() {
    let (exec, proxy) = mock_behind_proxy(
        MockBehaviour {
            fixed: Duration::from_millis(20),
            die: true,
            ..Default::default()
        },
        "{ max_batch_size: 16, max_delay: 20ms }",
    )
    .await;
    for (_, r) in concurrent(&proxy, 8, 1, "killed").await {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.headers["retry-after"], "1");
        assert!(r.json().get("outputs").is_none());
    }
    exec.set(|b| b.die = false);
    for (texts, r) in concurrent(&proxy, 8, 1, "recovered").await {
        assert_eq!(rows_of(&r), [format!("{}!", texts[0])]);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v1_instances_are_batched_too() {
    let (exec, proxy) = mock_behind_proxy(
        MockBehaviour {
            fixed: Duration::from_millis(20),
            ..Default::default()
        },
        "{ max_batch_size: 16, max_delay: 10ms }",
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (c, url) = (client(), proxy.url("/v1/models/m:predict"));
        tasks.push(tokio::spawn(async move {
            let r = post(
                &c,
                &url,
                &[],
                &format!(r#"{{"instances":["a{i}","b{i}"]}}"#),
            )
            .await;
            (i, r)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(
            r.json()["predictions"],
            serde_json::json!([format!("a{i}!"), format!("b{i}!")])
        );
    }
    assert!(exec.batches().iter().any(|&n| n > 2));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_batching_settings_loses_no_queued_request() {
    let exec = MockExecutor::start(MockBehaviour {
        fixed: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let proxy =
        Arc::new(TestProxy::start(&batching_config(exec.addr, "{ max_batch_size: 2 }")).await);
    let load = {
        let proxy = proxy.clone();
        tokio::spawn(async move { concurrent(&proxy, 24, 1, "reload").await })
    };
    // Reload while requests are queued behind the first batches.
    exec.wait_seen("reload-").await;
    proxy
        .reload(&batching_config(exec.addr, "{ max_batch_size: 16 }"))
        .await;
    for (texts, r) in load.await.unwrap() {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(rows_of(&r), [format!("{}!", texts[0])]);
    }
    let batches = exec.batches();
    assert!(
        batches.iter().any(|&n| n > 2),
        "new limit never applied: {batches:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_answers_from_the_real_executor_equal_unbatched_ones() {
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &["good", "bad"])]).await;
    let cfg = format!(
        "executor: http://{}\nroutes:\n  - model: m\n    variants: [{{ name: local, backend: local, target_model: tiny }}]\n    batching: {{ max_batch_size: 32, max_delay: 5ms, row_id: braid_row_id }}\n",
        ex.addr
    );
    let proxy = TestProxy::start(&cfg).await;
    let texts = [
        "good film",
        "the food was bad",
        "i loved it",
        "terrible service",
        "good",
        "bad bad bad",
    ];
    let mut tasks = Vec::new();
    for t in texts {
        let (c, url) = (client(), proxy.url("/v2/models/m/infer"));
        tasks.push(tokio::spawn(async move {
            post(&c, &url, &[], &infer_body(&[t], "")).await.json()
        }));
    }
    let c = client();
    for (t, task) in texts.iter().zip(tasks) {
        let batched = task.await.unwrap();
        let alone = post(
            &c,
            &ex.url("/v2/models/tiny/infer"),
            &[],
            &infer_body(&[t], ""),
        )
        .await
        .json();
        assert_eq!(
            batched["outputs"].as_array().unwrap().len(),
            alone["outputs"].as_array().unwrap().len(),
            "{t}: the echoed row ids must not reach the client"
        );
        assert_eq!(
            batched["outputs"][1], alone["outputs"][1],
            "{t}: label differs"
        );
        let (a, b) = (
            batched["outputs"][0]["data"].as_array().unwrap(),
            alone["outputs"][0]["data"].as_array().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        let f = |v: &[serde_json::Value]| -> Vec<f32> {
            v.iter().map(|x| x.as_f64().unwrap() as f32).collect()
        };
        let (a, b) = (f(a), f(b));
        // The tiny model's summation-order bound (docs/development.md).
        let bound = braid::executor::model::bert_bound(
            2,
            32,
            64,
            48,
            braid::executor::model::max_abs(&a, &b),
        );
        let diff = braid::executor::model::max_abs_diff(&a, &b);
        assert!(diff <= bound, "{t}: {diff} > {bound}");
    }
    proxy.stop().await;
}
