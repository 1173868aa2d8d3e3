//! `OpenOptions::from_env`: the backend a host engine's user picks through the
//! environment. One test in its own process, since it sets environment variables.

use engram_cpu::table::TableMode;
use engram_plugin::{
    BackendKind, CudaTables, HotCache, OpenOptions, BACKEND_ENV, CUDA_TABLES_ENV, HOT_CACHE_ENV,
    PREFETCH_ENV, TABLES_ENV,
};

fn set(name: &str, value: Option<&str>) {
    // This binary has one test, so no other thread reads the environment meanwhile.
    match value {
        Some(v) => std::env::set_var(name, v),
        None => std::env::remove_var(name),
    }
}

fn backend_for(backend: Option<&str>, tables: Option<&str>) -> Result<BackendKind, String> {
    set(BACKEND_ENV, backend);
    set(CUDA_TABLES_ENV, tables);
    OpenOptions::from_env()
        .map(|o| o.backend)
        .map_err(|e| e.to_string())
}

#[test]
fn the_environment_selects_the_backend() {
    assert_eq!(backend_for(None, None), Ok(BackendKind::Cpu));
    assert_eq!(backend_for(Some(""), None), Ok(BackendKind::Cpu));
    assert_eq!(
        backend_for(Some("reference"), None),
        Ok(BackendKind::Reference)
    );
    assert_eq!(
        backend_for(Some("cuda:1"), Some("cache:100000")),
        Ok(BackendKind::Cuda {
            ordinal: 1,
            tables: CudaTables::Cached { rows: 100_000 }
        })
    );
    assert_eq!(
        backend_for(Some("cuda"), None),
        Ok(BackendKind::Cuda {
            ordinal: 0,
            tables: CudaTables::PinnedHost
        })
    );
    let e = backend_for(Some("gpu"), None).unwrap_err();
    assert!(e.contains("ENGRAM_BACKEND=\"gpu\""), "{e}");
    let e = backend_for(Some("cuda"), Some("cache:0")).unwrap_err();
    assert!(e.contains("ENGRAM_CUDA_TABLES=\"cache:0\""), "{e}");
    // Tables without CUDA would be silently ignored; they are refused instead.
    let e = backend_for(None, Some("device")).unwrap_err();
    assert!(
        e.contains("ENGRAM_CUDA_TABLES") && e.contains("ENGRAM_BACKEND=cuda"),
        "{e}"
    );
    set(CUDA_TABLES_ENV, None);
    set(BACKEND_ENV, None);

    // How the host reads the tables.
    let mode = |v: Option<&str>| {
        set(TABLES_ENV, v);
        OpenOptions::from_env()
            .map(|o| o.table_mode)
            .map_err(|e| e.to_string())
    };
    assert_eq!(mode(None), Ok(TableMode::Mmap));
    assert_eq!(mode(Some("disk")), Ok(TableMode::Disk));
    assert_eq!(mode(Some("ram")), Ok(TableMode::Ram));
    let e = mode(Some("nvme")).unwrap_err();
    assert!(e.contains("ENGRAM_TABLES=\"nvme\""), "{e}");
    set(TABLES_ENV, None);

    // The hot-row cache: a size or a percentage; a bad value or CUDA is refused by name.
    let hot = |backend: Option<&str>, v: Option<&str>| {
        set(BACKEND_ENV, backend);
        set(CUDA_TABLES_ENV, None);
        set(HOT_CACHE_ENV, v);
        OpenOptions::from_env()
            .map(|o| o.hot_cache)
            .map_err(|e| e.to_string())
    };
    assert_eq!(hot(None, None), Ok(None));
    assert_eq!(hot(None, Some("2GiB")), Ok(Some(HotCache::Bytes(2 << 30))));
    assert_eq!(
        hot(None, Some("5%")),
        Ok(Some(HotCache::TableFraction(0.05)))
    );
    assert_eq!(hot(None, Some("off")), Ok(None));
    let e = hot(None, Some("lots")).unwrap_err();
    assert!(e.contains("ENGRAM_HOT_CACHE=\"lots\""), "{e}");
    let e = hot(Some("cuda"), Some("1GiB")).unwrap_err();
    assert!(e.contains("ENGRAM_HOT_CACHE") && e.contains("CUDA"), "{e}");
    set(HOT_CACHE_ENV, None);
    set(BACKEND_ENV, None);

    // Tables in a Redis Cluster: the URL's nodes and settings, or an error naming it.
    set(
        TABLES_ENV,
        Some("redis://127.0.0.1:7000,127.0.0.1:7001?timeout_ms=250"),
    );
    let remote = OpenOptions::from_env().unwrap().remote_tables.unwrap();
    assert_eq!(remote.seeds, ["127.0.0.1:7000", "127.0.0.1:7001"]);
    assert_eq!(remote.deadline, std::time::Duration::from_millis(250));
    for bad in [
        "redis://nohost",
        "redis://h:1?timeout_ms=0",
        "redis:/h:1",
        "redis://h:1?x=1",
    ] {
        set(TABLES_ENV, Some(bad));
        let e = OpenOptions::from_env().unwrap_err().to_string();
        assert!(e.contains(TABLES_ENV) && e.contains(bad), "{e}");
    }
    set(TABLES_ENV, Some("mmap"));
    assert!(OpenOptions::from_env().unwrap().remote_tables.is_none());
    set(TABLES_ENV, None);

    // The prefetch thread: on by default, off on request, anything else refused.
    assert!(OpenOptions::from_env().unwrap().runtime.prefetch);
    set(PREFETCH_ENV, Some("off"));
    assert!(!OpenOptions::from_env().unwrap().runtime.prefetch);
    set(PREFETCH_ENV, Some("on"));
    assert!(OpenOptions::from_env().unwrap().runtime.prefetch);
    set(PREFETCH_ENV, Some("no"));
    let e = OpenOptions::from_env().unwrap_err().to_string();
    assert!(e.contains(PREFETCH_ENV) && e.contains("no"), "{e}");
    set(PREFETCH_ENV, None);
}
