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
