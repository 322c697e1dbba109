//! Shared by the bench binaries: flag parsing and the review-like sentences they send.
#![allow(dead_code)]

/// Review-like texts of mixed length (3 to ~60 tokens), as a sentiment endpoint sees.
pub const TEXTS: &[&str] = &[
    "Great!",
    "Not worth the money.",
    "The delivery was late but the product itself works fine.",
    "I loved this film, it was wonderful from start to finish.",
    "Terrible service, I want a refund.",
    "ok",
    "The battery lasts two days, the screen is bright, and the camera is far better than my old phone's, although the speaker is a little quiet.",
    "Would buy again.",
    "Customer support answered within minutes and solved my problem on the first call.",
    "Meh.",
    "The hotel room was clean, the staff friendly, and breakfast had plenty of choice, but the wifi kept dropping every few minutes which made working impossible.",
    "Arrived broken.",
    "Five stars, no complaints at all.",
    "It does what it says on the box, nothing more and nothing less.",
    "The sequel is slower than the first book but the ending makes up for it.",
    "Worst purchase I have made this year.",
];

/// `--name N` from the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `braid proxy` from this build, on ports the OS picks; killed when dropped.
pub struct Braid {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl Drop for Braid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `braid proxy --config CONFIG` with `--worker-threads THREADS` and waits for
/// the data address it logs.
pub fn start_braid(config: &std::path::Path, threads: usize) -> Braid {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_braid"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--worker-threads", &threads.to_string(), "--config"])
        .arg(config)
        .env("BRAID_LOG", "warn,braid::cli=info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn braid");
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("braid exited").unwrap();
        if let Some(a) = line
            .split_whitespace()
            .find_map(|t| t.strip_prefix("data="))
        {
            break a.parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Braid { child, addr }
}
