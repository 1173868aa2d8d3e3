//! What every machine can check, GPU or not: asking for a device never panics, and the
//! error says plainly why there is none.

use engram_cuda::{probe, CudaBackend, CudaBackendError};

fn says_no_gpu(e: &CudaBackendError) -> bool {
    let m = e.to_string();
    e.is_unavailable()
        && (m.contains("no CUDA driver")
            || m.contains("no CUDA device")
            || m.contains("NVRTC not found"))
}

#[test]
fn try_new_reports_a_missing_driver_or_device_as_an_error() {
    let got = std::panic::catch_unwind(|| CudaBackend::try_new(0));
    let result = got.expect("CudaBackend::try_new panicked instead of returning an error");
    match result {
        Err(e) => {
            assert!(says_no_gpu(&e), "unexpected error: {e}");
            println!("no GPU here, as reported: {e}");
            assert!(!CudaBackend::available());
        }
        Ok(backend) => {
            println!("GPU found: {}", backend.info());
            assert!(CudaBackend::available());
        }
    }
    // No machine has device 4096.
    let e = std::panic::catch_unwind(|| CudaBackend::try_new(4096))
        .expect("try_new(4096) panicked")
        .expect_err("device 4096 exists?");
    assert!(says_no_gpu(&e), "{e}");
}

/// Without a driver the error names the library; with one, the device count answers and
/// the error for a device past it says so.
#[test]
fn the_error_names_the_missing_library() {
    let libs = engram_cuda::probe::libraries();
    if !libs.driver {
        let e = CudaBackend::try_new(0).unwrap_err();
        assert!(matches!(e, CudaBackendError::NoDriver), "{e:?}");
        assert_eq!(e.to_string(), "no CUDA driver (libcuda not found)");
        assert!(engram_cuda::probe::device_count().is_err());
    } else {
        match engram_cuda::probe::device_count() {
            Ok(n) => {
                let e = CudaBackend::try_new(n).unwrap_err();
                assert!(e.to_string().contains("no CUDA device"), "{e}");
            }
            // A driver library without a usable driver (a stub, no device): said so.
            Err(e) => assert!(says_no_gpu(&e), "{e}"),
        }
    }
}

#[test]
fn probe_never_panics_and_says_why() {
    let report = std::panic::catch_unwind(probe).expect("probe panicked");
    let line = report.to_string();
    assert!(line.contains("libcuda"), "{line}");
    if !report.libraries.driver {
        assert!(
            report
                .unavailable
                .as_deref()
                .is_some_and(|w| w.contains("no CUDA driver")),
            "{line}"
        );
    }
    println!("{line}");
}
