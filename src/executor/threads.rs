//! How many threads a forward pass uses, fixed once at start-up.
//!
//! candle reads its thread count from the environment on every matrix multiply
//! (`RAYON_NUM_THREADS`; when unset it parses `/proc/cpuinfo`, uncached: about 48 reads
//! per MiniLM pass, 4-5 ms of a 19 ms pass on 2 cores). Its element-wise pool spins
//! `CANDLE_BARRIER_POOL_SPIN_LIMIT` times (25,000 by default) after every operation,
//! taking a core from the matrix kernels that follow. Both are read from the process
//! environment, and changing that environment after start-up needs `unsafe`
//! (`std::env::set_var`), which this crate forbids. So a process that runs models
//! calls [`pin_environment`] first: when either variable is missing it re-executes
//! itself (`execve`, same PID, same arguments) with them set. Values the user set are
//! kept.
//!
//! Each model then runs its passes inside its own rayon pool ([`compute_pool`]), so a
//! pass starts on a pool thread and the matrix kernels split across that pool without
//! a hand-off per operation.

use std::ffi::OsString;
use std::num::NonZeroUsize;

/// What [`pin_environment`] sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to when unset. Spins
/// of a worker waiting for the next element-wise operation before it parks; candle's
/// 25,000 keeps a core busy between operations that the matrix kernels need. Measured
/// on 2 cores (docs/benchmarks.md): anything from 200 to 2,000 gives the same pass time.
pub const DEFAULT_SPIN_LIMIT: u32 = 1000;

pub const THREADS_VAR: &str = "RAYON_NUM_THREADS";
pub const SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The CPUs this process may use: cgroup quota and affinity included (what a pod's
/// `resources.limits.cpu` allows), at least 1.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// The thread count candle uses for every pass: `RAYON_NUM_THREADS` when it holds a
/// positive number, else [`cpus`].
pub fn compute_threads() -> usize {
    positive(std::env::var_os(THREADS_VAR)).unwrap_or_else(cpus)
}

fn positive(v: Option<OsString>) -> Option<usize> {
    v?.to_str()?.parse().ok().filter(|&n: &usize| n > 0)
}

/// The variables the environment lacks, with the values [`pin_environment`] gives them.
/// A value that is set but not a positive number counts as missing (candle would ignore
/// it and read `/proc/cpuinfo` on every multiply).
pub fn missing(get: impl Fn(&str) -> Option<OsString>) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if positive(get(THREADS_VAR)).is_none() {
        out.push((THREADS_VAR, cpus().to_string()));
    }
    let spin_ok = get(SPIN_VAR)
        .and_then(|v| v.to_str().and_then(|s| s.parse::<u32>().ok()))
        .is_some();
    if !spin_ok {
        out.push((SPIN_VAR, DEFAULT_SPIN_LIMIT.to_string()));
    }
    out
}

/// Makes sure candle's thread count and spin limit are in this process's environment,
/// re-executing the current binary with them set when they are not. Returns only when
/// they are set, or when re-executing failed (the reason is returned; the process then
/// runs correctly, just slower).
pub fn pin_environment() -> Result<(), String> {
    let missing = missing(|k| std::env::var_os(k));
    if missing.is_empty() {
        return Ok(());
    }
    reexec(&missing)
}

#[cfg(unix)]
fn reexec(vars: &[(&'static str, String)]) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("finding own binary: {e}"))?;
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(&exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    // Only returns on failure.
    let err = cmd.exec();
    Err(format!("re-executing {} : {err}", exe.display()))
}

#[cfg(not(unix))]
fn reexec(_: &[(&'static str, String)]) -> Result<(), String> {
    Err("re-executing is only supported on Unix".into())
}

/// A model's own rayon pool of `threads` workers (0: [`compute_threads`]). Passes run
/// inside it with `pool.install`, so candle's matrix kernels split across these
/// workers and the pass's own thread takes part.
pub fn compute_pool(model: &str, threads: usize) -> std::io::Result<rayon::ThreadPool> {
    let n = if threads == 0 {
        compute_threads()
    } else {
        threads
    };
    let name = model.to_string();
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(move |i| format!("braid-compute-{name}-{i}"))
        .build()
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn both_set_means_nothing_to_do() {
        let got = missing(env(&[(THREADS_VAR, "3"), (SPIN_VAR, "0")]));
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn unset_or_unusable_values_are_filled() {
        let got = missing(env(&[]));
        assert_eq!(
            got,
            vec![
                (THREADS_VAR, cpus().to_string()),
                (SPIN_VAR, DEFAULT_SPIN_LIMIT.to_string())
            ]
        );
        // candle ignores 0 and non-numbers and would fall back to /proc/cpuinfo.
        let got = missing(env(&[(THREADS_VAR, "0"), (SPIN_VAR, "lots")]));
        assert_eq!(got.len(), 2, "{got:?}");
        let got = missing(env(&[(THREADS_VAR, "4"), (SPIN_VAR, " 9")]));
        assert_eq!(got, vec![(SPIN_VAR, DEFAULT_SPIN_LIMIT.to_string())]);
    }

    #[test]
    fn a_pool_has_the_asked_size() {
        let pool = compute_pool("m", 3).unwrap();
        assert_eq!(pool.current_num_threads(), 3);
        let name = pool.install(|| std::thread::current().name().map(String::from));
        assert_eq!(
            name.as_deref().map(|n| n.starts_with("braid-compute-m-")),
            Some(true)
        );
    }
}
