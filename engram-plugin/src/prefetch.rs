//! The background row fetcher: one worker thread that gathers each layer's rows as soon
//! as the step's hashes are known, so the host's earlier layers hide the table latency,
//! and for a layer on the host also applies its projections to them
//! (`EngramLayer::project`: they need no hidden state, and on a decode step their weights
//! come from memory, not cache).
//!
//! The gathers run on a thread pool of the fetcher's own, not on rayon's global pool:
//! the global pool's workers share cores with the host's compute, and a chunk of a gather
//! that lands on a worker whose core the host keeps busy waits for a scheduler time slice
//! (milliseconds), holding up the whole fetch.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engram_core::backend::EngramLayer;
use engram_core::table::{StoreCounters, TableStore};
use engram_cuda::Prefetch;

use crate::device::DeviceRows;
use crate::error::FetchError;

/// A layer's rows, ready for the layer.
pub enum FetchedRows {
    /// Gathered and decoded into host memory.
    Host(Vec<f32>),
    /// Gathered and projected by the layer (`EngramLayer::project`): what depends on the
    /// rows alone, done before the host asks.
    Projected(Vec<f32>),
    /// On their way to the device: a prefetch of the layer's device store.
    Device(Prefetch),
}

/// A layer's rows, or the error that stopped the fetch.
pub type Fetched = std::result::Result<FetchedRows, FetchError>;

/// Where a fetch's result lands; the host waits on it.
#[derive(Default)]
pub struct FetchSlot {
    result: Mutex<Option<FetchOutcome>>,
    ready: Condvar,
}

/// A finished fetch: its rows (or error), how long it took, what the store did for it.
pub struct FetchOutcome {
    pub rows: Fetched,
    pub took: Duration,
    /// The store's counters over the gather (another step's gather on the same store at
    /// the same time would be counted in both).
    pub store: StoreCounters,
}

impl FetchSlot {
    fn fill(&self, outcome: FetchOutcome) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        self.ready.notify_all();
    }

    /// Blocks until the rows are there; returns the fetch and the time waited here.
    pub fn wait(&self) -> (FetchOutcome, Duration) {
        let start = Instant::now();
        let mut guard = self.result.lock().unwrap_or_else(|e| e.into_inner());
        while guard.is_none() {
            guard = self.ready.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        let outcome = guard.take().expect("checked above");
        (outcome, start.elapsed())
    }
}

/// A fetch to run: rows of `table` into a fresh buffer, or, for a layer on the device,
/// a prefetch of its device store.
pub struct FetchJob {
    pub table: Arc<dyn TableStore>,
    pub device: Option<Arc<DeviceRows>>,
    /// The host layer the rows are for, when it projects them ahead (`None`: plain rows).
    pub project: Option<Arc<dyn EngramLayer>>,
    pub rows: Arc<Vec<u64>>,
    pub slot: Arc<FetchSlot>,
}

impl FetchJob {
    /// Runs the gather here and fills the slot (used by the worker and by synchronous mode).
    pub fn run(self) {
        let start = Instant::now();
        let before = self.table.counters();
        // A panicking store must not leave the host waiting forever on this slot.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(device) = &self.device {
                return Ok(FetchedRows::Device(device.prefetch(&self.rows)?));
            }
            let mut out = vec![0f32; self.rows.len() * self.table.width()];
            self.table.gather_f32(&self.rows, &mut out)?;
            if let Some(layer) = &self.project {
                if let Some(kv) = layer.project(&out).map_err(FetchError::Project)? {
                    return Ok(FetchedRows::Projected(kv));
                }
            }
            Ok(FetchedRows::Host(out))
        }))
        .unwrap_or_else(|_| {
            Err(FetchError::Panicked {
                table: self.table.name().to_string(),
            })
        });
        let took = start.elapsed();
        self.slot.fill(FetchOutcome {
            rows: result,
            took,
            store: self.table.counters().since(&before),
        });
    }
}

/// The worker thread and its queue; jobs run in submission order (layer order), each
/// gather split over the fetcher's own pool of `threads` threads.
pub struct Prefetcher {
    sender: Option<Sender<FetchJob>>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn spawn(threads: usize) -> std::io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("engram-prefetch-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let (sender, receiver) = channel::<FetchJob>();
        let worker = std::thread::Builder::new()
            .name("engram-prefetch".into())
            .spawn(move || {
                // The whole loop runs on one of the pool's threads, so a job wakes that
                // thread directly (no second hand-off per job) and its gather splits over
                // the pool from there.
                pool.install(move || {
                    for job in receiver {
                        job.run();
                    }
                })
            })?;
        Ok(Self {
            sender: Some(sender),
            worker: Some(worker),
        })
    }

    /// Queues a job; if the worker is gone, runs it on the caller's thread instead.
    pub fn submit(&self, job: FetchJob) {
        match &self.sender {
            Some(s) => {
                if let Err(failed) = s.send(job) {
                    failed.0.run();
                }
            }
            None => job.run(),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_core::dtype::RowDtype;

    /// A table whose gather records where it ran.
    #[derive(Default)]
    struct WhereTable {
        seen: Mutex<Option<(String, usize)>>,
        /// Rows gathered so far, reported as cache misses.
        gathers: Mutex<u64>,
    }

    impl TableStore for WhereTable {
        fn name(&self) -> &str {
            "where"
        }
        fn num_rows(&self) -> u64 {
            4
        }
        fn width(&self) -> usize {
            2
        }
        fn dtype(&self) -> RowDtype {
            RowDtype::F32
        }
        fn counters(&self) -> StoreCounters {
            StoreCounters {
                cache_misses: *self.gathers.lock().unwrap(),
                cache_bytes: 7,
                ..Default::default()
            }
        }
        fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> engram_core::Result<()> {
            self.check_gather(row_ids, out.len())?;
            *self.gathers.lock().unwrap() += row_ids.len() as u64;
            let thread = std::thread::current().name().unwrap_or("").to_string();
            *self.seen.lock().unwrap() = Some((thread, rayon::current_num_threads()));
            out.fill(1.0);
            Ok(())
        }
    }

    #[test]
    fn gathers_run_on_the_fetchers_own_pool() {
        let table = Arc::new(WhereTable::default());
        *table.gathers.lock().unwrap() = 5; // counted before this fetch
        let fetcher = Prefetcher::spawn(3).unwrap();
        let slot = Arc::new(FetchSlot::default());
        fetcher.submit(FetchJob {
            table: table.clone(),
            device: None,
            project: None,
            rows: Arc::new(vec![0, 3]),
            slot: slot.clone(),
        });
        let (outcome, _) = slot.wait();
        // The outcome carries what the store counted during this gather only.
        assert_eq!(outcome.store.cache_misses, 2);
        assert_eq!(outcome.store.cache_bytes, 7);
        match outcome.rows {
            Ok(FetchedRows::Host(rows)) => assert_eq!(rows, vec![1.0; 4]),
            _ => panic!("expected host rows"),
        }
        let (thread, pool_threads) = table.seen.lock().unwrap().clone().unwrap();
        assert!(thread.starts_with("engram-prefetch-"), "ran on {thread:?}");
        // Not rayon's global pool: a gather splits over the fetcher's threads only.
        assert_eq!(pool_threads, 3);
    }
}
