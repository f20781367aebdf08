//! Compiles every `cuda/*.cu` with nvcc into a fatbin and embeds it in the library.
//!
//! nvcc is looked up in `NVCC`, then `PATH`, then `CUDA_HOME/bin`. Without it the crate
//! still builds (CPU only) and says so once; with it, a kernel that does not compile
//! fails the build, so CI catches broken kernels on machines without a GPU.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// SASS for Ampere (A100, A10/30-series), Jetson Orin, Ada and Hopper, plus PTX for
/// Hopper so newer GPUs can JIT.
const DEFAULT_ARCHS: &str = "sm_80,sm_86,sm_87,sm_89,sm_90,compute_90";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    for var in ["NVCC", "CUDA_HOME", "MASSV_CUDA_ARCHS", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let sources = cuda_sources(Path::new("cuda"));
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    if let Ok(entries) = fs::read_dir("cuda") {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "cuh") {
                println!("cargo:rerun-if-changed={}", e.path().display());
            }
        }
    }

    let archs = env::var("MASSV_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let (modules, release) = match find_nvcc() {
        Some(nvcc) => (compile_all(&nvcc, &sources, &archs, &out_dir), nvcc_release(&nvcc)),
        None => {
            println!(
                "cargo:warning=nvcc not found (NVCC, PATH, CUDA_HOME/bin): building massv without CUDA kernels (CPU only)"
            );
            (Vec::new(), None)
        }
    };
    write_module_table(&out_dir, &modules, &archs, release);
}

/// One kernel's resources for one SASS architecture, from ptxas's `-v` report.
#[derive(Debug, Default)]
struct Resources {
    kernel: String,
    arch: String,
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
    shared: u32,
}

/// The whitespace-separated number just before `unit` in `line`.
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let head = &line[..line.find(unit)?];
    head.split_whitespace().last()?.parse().ok()
}

/// ptxas's `-v` lines (nvcc's stderr): "Compiling entry function 'K' for 'sm_90'", then
/// its stack frame and spills, then "Used N registers, ..., M bytes smem".
fn ptxas_report(stderr: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    for line in stderr.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let mut quoted = line[i..].split('\'').skip(1).step_by(2);
            if let (Some(kernel), Some(arch)) = (quoted.next(), quoted.next()) {
                out.push(Resources {
                    kernel: kernel.to_string(),
                    arch: arch.to_string(),
                    ..Resources::default()
                });
            }
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack = number_before(line, " bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, " bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, " bytes spill loads").unwrap_or(0);
            } else if line.contains(" registers") && line.contains("Used ") {
                r.registers = number_before(line, " registers").unwrap_or(0);
                r.shared = number_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// The CUDA release of `nvcc` as (major, minor), from `nvcc --version`'s "release 13.0,".
fn nvcc_release(nvcc: &Path) -> Option<(u32, u32)> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = &text[text.find("release ")? + "release ".len()..];
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.trim().parse().ok()?, minor.parse().ok()?))
}

fn cuda_sources(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        println!("cargo:warning=NVCC={} is not a file; looking elsewhere", p.display());
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let cand = dir.join("nvcc");
            if cand.is_file() {
                return Some(cand);
            }
        }
    }
    let home = env::var_os("CUDA_HOME")?;
    let cand = PathBuf::from(home).join("bin").join("nvcc");
    cand.is_file().then_some(cand)
}

fn gencode_flags(archs: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let (kind, num) = a
            .split_once('_')
            .unwrap_or_else(|| panic!("MASSV_CUDA_ARCHS: bad entry {a:?}"));
        match kind {
            "sm" => flags.push(format!("-gencode=arch=compute_{num},code=sm_{num}")),
            "compute" => flags.push(format!("-gencode=arch=compute_{num},code=compute_{num}")),
            _ => panic!("MASSV_CUDA_ARCHS: entry {a:?} is neither sm_XX nor compute_XX"),
        }
    }
    flags
}

/// A compiled module: its name (the .cu file's stem), fatbin and ptxas's report.
struct Module {
    name: String,
    fatbin: PathBuf,
    resources: Vec<Resources>,
}

/// Compiles each source in its own nvcc process, in parallel, or takes its fatbin and
/// ptxas report from the kernel cache (see [`KernelCache`]).
fn compile_all(nvcc: &Path, sources: &[PathBuf], archs: &str, out_dir: &Path) -> Vec<Module> {
    let gencode = gencode_flags(archs);
    let cache = KernelCache::open(nvcc, out_dir);
    let jobs: Vec<_> = sources
        .iter()
        .map(|src| {
            let name = src
                .file_stem()
                .expect("a .cu file has a stem")
                .to_string_lossy()
                .into_owned();
            let out = out_dir.join(format!("{name}.fatbin"));
            let mut flags: Vec<String> = ["--fatbin", "-O3", "-std=c++17", "-Icuda", "-Xptxas=-v"]
                .map(String::from)
                .to_vec();
            // Sampling decides which token a request gets: its softmax takes the full-range
            // expf (fast math's ex2.approx.ftz is ulps off and flushes the tail's
            // probabilities below 1.2e-38 to 0). It streams one vocabulary row, so the
            // slower exp costs nothing measurable; every other kernel keeps fast math.
            if name != "sampling" {
                flags.push("--use_fast_math".into());
            }
            flags.extend(gencode.iter().cloned());
            let (nvcc, src, cache) = (nvcc.to_path_buf(), src.clone(), cache.clone());
            std::thread::spawn(move || {
                // The cache and this module's key in it, where both are known.
                let entry = cache.as_ref().and_then(|c| Some((c, c.key(&nvcc, &flags, &src)?)));
                if let Some(report) = entry.and_then(|(c, key)| c.fetch(&name, key, &out)) {
                    return (name, out, Ok(Ok(report)));
                }
                let result = Command::new(&nvcc).args(&flags).arg("-o").arg(&out).arg(&src).output();
                let result = result.map(|o| {
                    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
                    if o.status.success() {
                        if let Some((c, key)) = entry {
                            c.store(&name, key, &out, &stderr);
                        }
                        Ok(stderr)
                    } else {
                        Err(stderr)
                    }
                });
                (name, out, result)
            })
        })
        .collect();
    let mut modules = Vec::new();
    let mut failures = String::new();
    for job in jobs {
        let (name, out, result) = job.join().expect("nvcc thread");
        match result {
            Ok(Ok(stderr)) => modules.push(Module {
                resources: ptxas_report(&stderr),
                name,
                fatbin: out,
            }),
            Ok(Err(stderr)) => {
                let _ = writeln!(failures, "cuda/{name}.cu:\n{stderr}");
            }
            Err(e) => {
                let _ = writeln!(failures, "cuda/{name}.cu: could not run {}: {e}", nvcc.display());
            }
        }
    }
    if !failures.is_empty() {
        panic!("CUDA kernels failed to compile with {}:\n{failures}", nvcc.display());
    }
    modules
}

/// Compiled kernels kept across builds in `<target dir>/massv-kernel-cache`, so that the
/// same sources are not compiled again by another profile or command (`cargo clippy`,
/// `cargo test`, `cargo build --release` each run this script in a directory of its
/// own: about 3 minutes of nvcc for every architecture on 2 cores) or for a change to
/// another .cu file. An entry is a module's fatbin and ptxas report, named by a hash of
/// everything the compile reads: nvcc's path and version, the flags, and the contents of
/// every file nvcc's preprocessor includes (`nvcc -M`: the source, cuda/*.cuh, the CUDA
/// and system headers). `MASSV_KERNEL_CACHE=0` turns it off. Entries are written to a
/// temporary name and renamed, so a build killed halfway leaves none half-written, and
/// each module keeps its [`KernelCache::KEEP`] newest.
#[derive(Clone)]
struct KernelCache {
    dir: PathBuf,
    nvcc_version: String,
}

impl KernelCache {
    const KEEP: usize = 4;

    fn open(nvcc: &Path, out_dir: &Path) -> Option<KernelCache> {
        println!("cargo:rerun-if-env-changed=MASSV_KERNEL_CACHE");
        if env::var("MASSV_KERNEL_CACHE").is_ok_and(|v| v == "0") {
            return None;
        }
        // OUT_DIR is <target dir>[/<triple>]/<profile>/build/<package>-<hash>/out.
        let dir = out_dir.ancestors().nth(4)?.join("massv-kernel-cache");
        fs::create_dir_all(&dir).ok()?;
        let version = Command::new(nvcc).arg("--version").output().ok()?;
        let nvcc_version = String::from_utf8_lossy(&version.stdout).into_owned();
        Some(KernelCache { dir, nvcc_version })
    }

    /// The hash of what compiling `src` with `flags` reads, or None when nvcc cannot
    /// list the files it includes (then the module is compiled and not cached).
    fn key(&self, nvcc: &Path, flags: &[String], src: &Path) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let deps = Command::new(nvcc)
            .args(["-M", "-std=c++17", "-Icuda"])
            .arg(src)
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let mut h = std::hash::DefaultHasher::new();
        (nvcc, &self.nvcc_version, flags).hash(&mut h);
        // A make rule: "gemv.o : cuda/gemv.cu \", then one included file a line.
        let text = String::from_utf8_lossy(&deps.stdout).into_owned();
        let (_, paths) = text.split_once(": ")?;
        for path in paths.split_whitespace().filter(|p| *p != "\\") {
            (path, fs::read(path).ok()?).hash(&mut h);
        }
        Some(h.finish())
    }

    fn entry(&self, name: &str, key: u64, ext: &str) -> PathBuf {
        self.dir.join(format!("{name}-{key:016x}.{ext}"))
    }

    /// The cached report after copying the cached fatbin to `out`, if both are there.
    fn fetch(&self, name: &str, key: u64, out: &Path) -> Option<String> {
        let report = fs::read_to_string(self.entry(name, key, "ptxas")).ok()?;
        fs::copy(self.entry(name, key, "fatbin"), out).ok()?;
        Some(report)
    }

    /// Stores a compiled module (the fatbin before the report: an entry counts once its
    /// report is there). A failure to store costs the next build a compile, nothing else.
    fn store(&self, name: &str, key: u64, fatbin: &Path, report: &str) {
        let put = |ext: &str, write: &dyn Fn(&Path) -> std::io::Result<()>| {
            let tmp = self
                .dir
                .join(format!("{name}-{key:016x}.{ext}.{}.tmp", std::process::id()));
            write(&tmp)
                .and_then(|()| fs::rename(&tmp, self.entry(name, key, ext)))
                .is_ok()
        };
        if put("fatbin", &|t| fs::copy(fatbin, t).map(drop)) && put("ptxas", &|t| fs::write(t, report)) {
            self.evict(name);
        }
    }

    /// Removes all but the newest KEEP entries of module `name`.
    fn evict(&self, name: &str) {
        let Ok(rd) = fs::read_dir(&self.dir) else { return };
        let prefix = format!("{name}-");
        let mut reports: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "ptxas")
                    && p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| {
                        // name-<16 hex digits>: not another module whose name starts the same
                        s.strip_prefix(&prefix)
                            .is_some_and(|k| k.len() == 16 && k.chars().all(|c| c.is_ascii_hexdigit()))
                    })
            })
            .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        reports.sort();
        let stale = reports.len().saturating_sub(Self::KEEP);
        for (_, report) in reports.into_iter().take(stale) {
            let _ = fs::remove_file(report.with_extension("fatbin"));
            let _ = fs::remove_file(report);
        }
    }
}

fn write_module_table(out_dir: &Path, modules: &[Module], archs: &str, release: Option<(u32, u32)>) {
    let mut s = String::new();
    let _ = writeln!(s, "/// True when build.rs found nvcc and compiled every kernel.");
    let _ = writeln!(s, "pub const COMPILED: bool = {};", !modules.is_empty());
    let _ = writeln!(s, "/// The `MASSV_CUDA_ARCHS` the fatbins were built for.");
    let _ = writeln!(s, "pub const ARCHS: &str = {archs:?};");
    let _ = writeln!(
        s,
        "/// The CUDA release (major, minor) of the nvcc that built them, when it said."
    );
    let _ = writeln!(s, "pub const NVCC_RELEASE: Option<(u32, u32)> = {release:?};");
    let _ = writeln!(s, "/// (module name = the .cu file's stem, fatbin image).");
    let _ = writeln!(s, "pub static MODULES: &[(&str, &[u8])] = &[");
    for m in modules {
        let _ = writeln!(
            s,
            "    ({:?}, include_bytes!({:?})),",
            m.name,
            m.fatbin.display().to_string()
        );
    }
    let _ = writeln!(s, "];");
    let _ = writeln!(
        s,
        "/// ptxas's report of every kernel for each SASS architecture built."
    );
    let _ = writeln!(s, "pub static RESOURCES: &[Resources] = &[");
    for m in modules {
        for r in &m.resources {
            let _ = writeln!(
                s,
                "    Resources {{ module: {:?}, kernel: {:?}, arch: {:?}, registers: {}, spill_stores: {}, \
                 spill_loads: {}, stack: {}, shared: {} }},",
                m.name, r.kernel, r.arch, r.registers, r.spill_stores, r.spill_loads, r.stack, r.shared
            );
        }
    }
    let _ = writeln!(s, "];");
    fs::write(out_dir.join("kernels.rs"), s).expect("write kernels.rs");
}
