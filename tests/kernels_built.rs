//! build.rs embeds one fatbin per cuda/*.cu. CI sets MASSV_REQUIRE_KERNELS=1 (with NVCC)
//! so a build that silently fell back to CPU-only fails here.

use massv::backend::kernels;

/// Magic number that opens every fatbin container (little-endian 0xBA55ED50).
const FATBIN_MAGIC: [u8; 4] = [0x50, 0xED, 0x55, 0xBA];

#[test]
fn every_cuda_source_is_embedded_as_a_fatbin() {
    if !kernels::COMPILED {
        assert!(
            std::env::var("MASSV_REQUIRE_KERNELS").as_deref() != Ok("1"),
            "MASSV_REQUIRE_KERNELS=1 but build.rs found no nvcc: the kernels were not compiled"
        );
        println!("skipped: built without nvcc, no kernels embedded");
        return;
    }
    let mut sources: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/cuda"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    sources.sort();
    let mut embedded: Vec<String> = kernels::MODULES.iter().map(|(n, _)| n.to_string()).collect();
    embedded.sort();
    assert_eq!(embedded, sources);
    for (name, image) in kernels::MODULES {
        assert!(image.len() > 1024, "{name}: fatbin of {} bytes", image.len());
        assert_eq!(image[..4], FATBIN_MAGIC, "{name}: not a fatbin");
    }
    for required in ["rmsnorm", "swiglu", "rope"] {
        assert!(embedded.iter().any(|n| n == required), "{required} missing");
    }
    println!("kernels embedded for {}: {embedded:?}", kernels::ARCHS);
}

/// Every attention entry point the launcher can ask for (mode × served head dim) is in the
/// attention fatbin: a name the launcher builds but nvcc never instantiated would only
/// fail at run time on a GPU.
#[test]
fn attention_entry_points_exist_for_every_served_head_dim() {
    if !kernels::COMPILED {
        println!("skipped: built without nvcc, no kernels embedded");
        return;
    }
    let (_, image) = kernels::MODULES
        .iter()
        .find(|(n, _)| *n == "attention")
        .expect("attention module");
    let has = |name: &str| {
        image
            .windows(name.len() + 1)
            .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
    };
    for d in massv::backend::cuda::ATTN_HEAD_DIMS {
        for mode in ["prefill", "decode", "verify", "varlen"] {
            let name = format!("attention_{mode}_d{d}");
            assert!(has(&name), "{name} missing from the attention fatbin");
        }
    }
    assert!(!has("attention_decode_d48"), "the check can fail");
}
