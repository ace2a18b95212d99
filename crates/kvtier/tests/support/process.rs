//! Child processes of tests: killed when their guard drops, and when the test that started
//! them dies, so no test leaves a process running, even one that fails or is killed.
//!
//! Include with `#[path = "support/process.rs"] mod process;` (the kvtier-server tests include
//! it from here too).
#![allow(dead_code)]

use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Makes the process `cmd` starts receive SIGKILL when the thread that spawns it exits, and so
/// when the test process dies by any means (a panic elsewhere, SIGKILL from a CI timeout).
/// Linux sends the signal when the spawning *thread* ends: spawn from the test's own thread
/// (or one that outlives the child), never from a short-lived helper thread.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
    // system calls (prctl, getppid); it allocates only on the error path.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect: nobody would signal then.
            if libc::getppid() != parent {
                return Err(io::Error::other(
                    "the test process exited before its child started",
                ));
            }
            Ok(())
        })
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Spawns `cmd` (which also dies with its parent, see [`die_with_parent`]).
    pub fn spawn(cmd: &mut Command) -> io::Result<ChildGuard> {
        die_with_parent(cmd).spawn().map(ChildGuard)
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}
