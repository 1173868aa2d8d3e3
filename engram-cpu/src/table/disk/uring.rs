//! The io_uring reader of [`super::DiskTable`]: every extent of a gather submitted to one
//! ring, up to its depth in flight, completions reaped on the calling thread. A short
//! read is resubmitted for the rest; a read that returns nothing is the end of the file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::Extent;

/// Reads each extent into `buf` (at `extent.at`); the first failure is returned with the
/// extent it hit.
pub(super) fn read_all(
    ring: &mut IoUring,
    file: &File,
    extents: &[Extent],
    buf: &mut [u8],
) -> Result<(), (Extent, io::Error)> {
    let fd = types::Fd(file.as_raw_fd());
    let depth = ring.params().sq_entries() as usize;
    let base = buf.as_mut_ptr();
    // Bytes of each extent read so far.
    let mut done = vec![0u64; extents.len()];
    // Extents (by index) still to submit, or to resubmit after a short read.
    let mut queue: Vec<usize> = (0..extents.len()).rev().collect();
    let mut in_flight = 0usize;
    let mut failure: Option<(Extent, io::Error)> = None;
    while in_flight > 0 || (failure.is_none() && !queue.is_empty()) {
        while failure.is_none() && in_flight < depth {
            let Some(i) = queue.pop() else { break };
            let e = &extents[i];
            let remaining = (e.len - done[i]).min(u32::MAX as u64) as u32;
            // SAFETY: `e.at + done[i] .. + remaining` lies inside `buf` (extents were
            // laid out in it back to back), which this call borrows mutably until every
            // submitted read has completed (the loop does not return before).
            let dst = unsafe { base.add(e.at + done[i] as usize) };
            let read = opcode::Read::new(fd, dst, remaining)
                .offset(e.offset + done[i])
                .build()
                .user_data(i as u64);
            // SAFETY: the entry's buffer outlives its completion (see above).
            if unsafe { ring.submission().push(&read) }.is_err() {
                queue.push(i);
                break;
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        if let Err(err) = ring.submit_and_wait(1) {
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Reads already submitted may still land in `buf`: wait for them before
            // giving the buffer back.
            drain(ring, &mut in_flight);
            return Err((extents[0], err));
        }
        for cqe in ring.completion() {
            in_flight -= 1;
            let i = cqe.user_data() as usize;
            let res = cqe.result();
            let e = extents[i];
            if res < 0 {
                failure.get_or_insert((e, io::Error::from_raw_os_error(-res)));
            } else if res == 0 {
                failure.get_or_insert((
                    e,
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the file",
                    ),
                ));
            } else {
                done[i] += res as u64;
                if done[i] < e.len {
                    queue.push(i);
                }
            }
        }
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// Waits for every read in flight to complete (after a failed submit).
fn drain(ring: &mut IoUring, in_flight: &mut usize) {
    while *in_flight > 0 {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Nothing more can be learnt; the caller's buffer stays borrowed by the
            // table's ring until it is dropped.
            return;
        }
        for _ in ring.completion() {
            *in_flight -= 1;
        }
    }
}
