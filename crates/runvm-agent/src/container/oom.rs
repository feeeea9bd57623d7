//! OOM events: the `oom_kill` counter of each container's memory.events, watched every half
//! second while there are containers (an idle guest without any is not woken: under TCG each
//! wake-up costs the host CPU), and once more just before a container is removed. Each increase queues one event
//! with the container's id; GetOOMEvent takes them in order, waiting while none is queued.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, Mutex, Notify};

use super::{stats, Container, Containers};

/// Events kept while nobody asks for them; when full, new events are dropped (and logged).
const QUEUE: usize = 256;
const PERIOD: Duration = Duration::from_millis(500);

/// The queue of OOM events.
#[derive(Debug)]
pub struct OomEvents {
    tx: mpsc::Sender<String>,
    rx: Mutex<mpsc::Receiver<String>>,
    /// Wakes the monitor when a container appears.
    added: Arc<Notify>,
}

impl OomEvents {
    pub fn new() -> OomEvents {
        let (tx, rx) = mpsc::channel(QUEUE);
        OomEvents {
            tx,
            rx: Mutex::new(rx),
            added: Arc::new(Notify::new()),
        }
    }

    /// A container was added: the monitor watches again.
    pub fn wake(&self) {
        self.added.notify_one();
    }

    /// Queues an event if the container's OOM-kill count rose since last seen.
    pub fn check(&self, c: &Container) {
        let count = stats::oom_kills(&c.cgroup_dir);
        let seen = c.oom_seen.fetch_max(count, Ordering::AcqRel);
        if count > seen {
            tracing::warn!(container = %c.id, oom_kills = count, "container OOM-killed");
            if self.tx.try_send(c.id.clone()).is_err() {
                tracing::warn!(container = %c.id, "OOM event queue full; event dropped");
            }
        }
    }

    /// The next event's container id, waiting for one. Cancel-safe.
    pub async fn next(&self) -> Option<String> {
        self.rx.lock().await.recv().await
    }
}

/// Watches the containers until the registry goes away.
pub fn spawn_monitor(containers: Weak<Containers>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(registry) = containers.upgrade() else {
                return;
            };
            if registry.all().is_empty() {
                // A container added meanwhile left a permit: this returns at once then.
                let added = Arc::clone(&registry.oom.added);
                drop(registry);
                added.notified().await;
                tick.reset();
                continue;
            }
            drop(registry);
            tick.tick().await;
            let Some(containers) = containers.upgrade() else {
                return;
            };
            for c in containers.all() {
                containers.oom.check(&c);
            }
        }
    });
}
