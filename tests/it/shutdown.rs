//! Graceful shutdown of the real binary under load: readiness turns 503 at once, new
//! connections are served through the grace period, in-flight requests finish, and
//! no client sees an error or a reset.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_with_zero_errors_and_exits_0() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_single_route(dir.path(), &a.url());
    let mut braid = BraidProcess::start(
        &path,
        &["--drain-grace", "1500ms", "--drain-timeout", "10s"],
    );
    let admin = client();
    wait_for_status(&admin, &format!("http://{}/readyz", braid.admin), 200).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for i in 0..8 {
        // Half the clients speak HTTP/1.1 with keep-alive, half HTTP/2.
        let c = if i % 2 == 0 { client() } else { h2_client() };
        let url = format!("http://{}/work", braid.addr);
        let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::post(&url)
                    .header("x-delay-ms", "5")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                    .unwrap();
                match c.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => errors
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => errors.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    wait_until(|| ok.load(Ordering::SeqCst) > 100).await;

    braid.signal("TERM");
    wait_for_status(&admin, &format!("http://{}/readyz", braid.admin), 503).await;
    // Load continues into the grace period, on old and new connections.
    let at_term = ok.load(Ordering::SeqCst);
    wait_until(|| ok.load(Ordering::SeqCst) > at_term + 100).await;
    // Slow requests that are still in flight when the listener closes must finish.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let (c, url) = (client(), format!("http://{}/slow", braid.addr));
        slow.push(tokio::spawn(async move {
            post(&c, &url, &[("x-delay-ms", "1200")], "{}").await.status
        }));
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    for t in slow {
        assert_eq!(t.await.unwrap(), 200);
    }
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(
        braid.wait_exit(Duration::from_secs(15)).await.code(),
        Some(0)
    );
}

async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
