//! The fence between a checkpoint staging the trainer's state in the background and the
//! trainer's next in-place update of it.

/// Released when a background reader of the trainer's state (a checkpoint staging its
/// share) has finished copying it. The weights and AdamW moments change only in place
/// and only through `Trainer::wait_for_readers` first (the optimizer update, a
/// checkpoint load, a state broadcast), so staging can overlap the next step's forward
/// and backward, which only read them.
#[derive(Clone, Default)]
pub struct ReadFence(std::sync::Arc<(std::sync::Mutex<FenceState>, std::sync::Condvar)>);

#[derive(Default)]
struct FenceState {
    released: bool,
    /// A writer is blocked in [`ReadFence::wait`].
    writer_waiting: bool,
}

impl ReadFence {
    pub fn new() -> Self {
        Self::default()
    }

    /// The reader is done (also called by [`ReadFence::release_on_drop`]'s guard, so a
    /// reader that panics still releases).
    pub fn release(&self) {
        let (state, cv) = &*self.0;
        state.lock().unwrap_or_else(|p| p.into_inner()).released = true;
        cv.notify_all();
    }

    /// A guard that releases the fence when dropped.
    pub fn release_on_drop(&self) -> impl Drop + Send {
        struct Guard(ReadFence);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.release();
            }
        }
        Guard(self.clone())
    }

    /// Blocks the writer until the reader is done.
    pub fn wait(&self) {
        let (state, cv) = &*self.0;
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.writer_waiting = true;
        cv.notify_all();
        while !s.released {
            s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until a writer is waiting for this fence (tests use it to read the state at
    /// the very moment an update is held back, instead of guessing with a sleep).
    pub fn wait_for_writer(&self) {
        let (state, cv) = &*self.0;
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        while !s.writer_waiting && !s.released {
            s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}
