//! Builds the emulator's three shared libraries with the host C++ compiler (cc's choice,
//! honouring CXX): libcuda.so (the driver API, the fiber scheduler and every kernel of
//! ../*.cu compiled for the CPU), libcublas.so and libcublasLt.so. Each carries its real
//! counterpart's soname, so once loaded by path, cudarc's dlopen of "libcuda.so" etc.
//! resolves to it.
//!
//! The kernels a .cu file defines are found by preprocessing it with `__global__` marked
//! (MASSV_EMU_SCAN) and reading the `extern "C"` names, macro-generated ones included; a
//! generated unit per file then registers each by name with a typed trampoline and its
//! parameters' sizes.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

fn main() {
    let here = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels_dir = here.parent().expect("cuda/emu lives in cuda/").to_path_buf();
    let include = here.join("include");
    let cpp = here.join("cpp");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let lib_dir = out.join("lib");
    fs::create_dir_all(&lib_dir).expect("creating OUT_DIR/lib");
    for d in [&kernels_dir, &include, &cpp] {
        println!("cargo:rerun-if-changed={}", d.display());
    }

    // Extra flags for every compile and link, e.g. "-fsanitize=alignment,undefined
    // -fno-sanitize-recover=all" to hunt misaligned vector loads, which a GPU faults on.
    println!("cargo:rerun-if-env-changed=MASSV_EMU_CXXFLAGS");
    #[allow(unused_mut)] // only x86-64 adds to it
    let mut extra: Vec<String> = env::var("MASSV_EMU_CXXFLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    // fmaf as one instruction, not a libm call (the result is the same: both round once);
    // contraction stays off, so a·b + c written apart still rounds twice, as the CPU
    // twins do. The emulator runs where it is built.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        extra.extend(["-mfma".to_string(), "-ffp-contract=off".to_string()]);
    }
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let cxx = compiler.path().to_path_buf();
    // Without a C++ compiler the emulator is not built and `load` says why; everything
    // else builds and tests as before. (A compiler that fails on a kernel fails the build.)
    let probe = Command::new(&cxx)
        .args(["-x", "c++", "-E", "-"])
        .stdin(std::process::Stdio::null())
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = format!(
            "no working C++ compiler ({}) when massv-cuda-emu was built",
            cxx.display()
        );
        println!("cargo:warning=CUDA emulator not built: {why}");
        println!("cargo:rustc-env=MASSV_CUDA_EMU_UNBUILT={why}");
        return;
    }
    let common = |c: &mut Command| {
        c.args(["-std=c++17", "-O3", "-fPIC", "-g0"])
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(&cpp)
            .args(&extra);
    };

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels_dir)
        .expect("reading cuda/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    let mut units = Vec::new();
    for src in &sources {
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name");
        let mut c = Command::new(&cxx);
        common(&mut c);
        c.args(["-E", "-P", "-DMASSV_EMU_SCAN", "-include", "emu.h", "-x", "c++"])
            .arg(src);
        let pre = c.output().unwrap_or_else(|e| panic!("running {}: {e}", cxx.display()));
        if !pre.status.success() {
            panic!(
                "preprocessing {} for the CUDA emulator failed:\n{}",
                src.display(),
                String::from_utf8_lossy(&pre.stderr)
            );
        }
        let names = kernel_names(&String::from_utf8_lossy(&pre.stdout));
        // The file's __shared__ arrays (its .bss, see emu.h) move to the section
        // massv_smem_<stem> once compiled; the linker's __start_ / __stop_ symbols bound
        // it. The file sits in an unnamed namespace so that the statics of its inline
        // functions and templates are the unit's own, in its .bss (not in COMDAT groups).
        let section = format!("massv_smem_{stem}");
        let mut unit = format!(
            "#include \"emu_internal.h\"\nnamespace {{\n#include \"{}\"\n}}  // namespace\n",
            src.display()
        );
        for bound in ["start", "stop"] {
            unit +=
                &format!("extern \"C\" char __{bound}_{section}[] __attribute__((weak, visibility(\"hidden\")));\n");
        }
        unit += &format!(
            "namespace {{\nstruct Register {{\n    Register() {{\n        const massv_emu::SharedMemory shared{{__start_{section}, __stop_{section}}};\n"
        );
        for n in &names {
            unit += &format!("        massv_emu::register_kernel<&{n}>(\"{n}\", shared);\n");
        }
        unit += "    }\n} registered;\n}  // namespace\n";
        let path = out.join(format!("{stem}.emu.cpp"));
        fs::write(&path, unit).expect("writing a registration unit");
        units.push((path, section));
    }

    let compile = |src: &Path| -> (PathBuf, Child) {
        let obj = out.join(format!(
            "{}.o",
            src.file_name().and_then(|s| s.to_str()).expect("utf-8 file name")
        ));
        let mut c = Command::new(&cxx);
        common(&mut c);
        c.arg("-c").arg(src).arg("-o").arg(&obj);
        let child = c.spawn().unwrap_or_else(|e| panic!("running {}: {e}", cxx.display()));
        (obj, child)
    };
    let wait = |jobs: Vec<(PathBuf, Child)>| -> Vec<PathBuf> {
        jobs.into_iter()
            .map(|(obj, mut child)| {
                let st = child.wait().expect("waiting for the compiler");
                assert!(st.success(), "compiling {} for the CUDA emulator failed", obj.display());
                obj
            })
            .collect()
    };

    let driver_srcs = [cpp.join("fiber.cpp"), cpp.join("driver.cpp"), cpp.join("capture.cpp")];
    let mut jobs: Vec<_> = driver_srcs.iter().map(|s| compile(s)).collect();
    jobs.extend(units.iter().map(|(s, _)| compile(s)));
    let driver_objs = wait(jobs);
    // wait keeps the jobs' order: the units' objects come after the driver's sources.
    for (obj, (_, section)) in driver_objs[driver_srcs.len()..].iter().zip(&units) {
        // Without objcopy the emulator runs, with shared memory not poisoned.
        match Command::new("objcopy")
            .arg(format!("--rename-section=.bss={section}"))
            .arg(obj)
            .status()
        {
            Ok(st) => assert!(st.success(), "objcopy on {} failed", obj.display()),
            Err(e) => println!("cargo:warning=shared memory not poisoned by the CUDA emulator (objcopy: {e})"),
        }
    }
    let blas_obj = wait(vec![compile(&cpp.join("blas.cpp"))]);
    let lt_obj = wait(vec![compile(&cpp.join("blaslt.cpp"))]);

    for (name, objs) in [
        ("libcuda.so", &driver_objs),
        ("libcublas.so", &blas_obj),
        ("libcublasLt.so", &lt_obj),
    ] {
        let st = Command::new(&cxx)
            .args(["-shared", "-fPIC"])
            .arg(format!("-Wl,-soname,{name}"))
            // Calls and data within a library bind to its own definitions: the kernels'
            // reads of threadIdx and friends skip the GOT, calls skip the PLT.
            .arg("-Wl,-Bsymbolic")
            .arg("-o")
            .arg(lib_dir.join(name))
            .args(objs.iter())
            .arg("-pthread")
            .args(&extra)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", cxx.display()));
        assert!(st.success(), "linking the emulator's {name} failed");
    }
}

/// `extern "C"` kernels in preprocessed source where `__global__` reads `__massv_kernel__`.
fn kernel_names(pre: &str) -> Vec<String> {
    const MARK: &str = "__massv_kernel__";
    let mut names = Vec::new();
    let mut rest = pre;
    while let Some(at) = rest.find(MARK) {
        let before = rest[..at].trim_end();
        let after = &rest[at + MARK.len()..];
        rest = after;
        if !before.ends_with("extern \"C\"") {
            continue;
        }
        let Some(paren) = after.find('(') else { continue };
        let head = after[..paren].trim_end();
        let name: String = head
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if !name.is_empty() {
            names.push(name);
        }
    }
    names
}
