//! Events to containerd, sent in order by one forwarding task, and their payloads.

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context;
use containerd_shim::publisher::RemotePublisher;
use tokio::sync::mpsc;

/// One event for containerd.
#[derive(Debug)]
pub struct Event {
    topic: &'static str,
    body: Box<dyn MessageDyn>,
}

#[cfg(test)]
impl Event {
    /// Its topic (`/tasks/exit`, ...).
    pub fn topic(&self) -> &'static str {
        self.topic
    }

    /// Its payload, as `T` when it is one.
    pub fn body<T: containerd_shim::protos::protobuf::MessageFull>(&self) -> Option<&T> {
        self.body.downcast_ref::<T>()
    }
}

/// The task service's side of the event channel.
#[derive(Debug, Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<Event>,
}

impl Events {
    /// Starts the forwarder publishing to containerd in `namespace`.
    pub fn spawn(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let topic = event.topic;
                if let Err(e) = publisher
                    .publish(context::with_timeout(0), topic, &namespace, event.body)
                    .await
                {
                    tracing::warn!(topic, error = %e, "publishing an event to containerd");
                }
            }
        });
        Events { tx }
    }

    /// An event sink that drops everything (unit tests).
    #[cfg(test)]
    pub fn discard() -> (Events, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Events { tx }, rx)
    }

    fn send(&self, topic: &'static str, body: Box<dyn MessageDyn>) {
        tracing::debug!(topic, "event");
        let _ = self.tx.send(Event { topic, body });
    }

    /// `/tasks/create`.
    pub fn create(&self, id: &str, bundle: &str, io: [&str; 3], terminal: bool, pid: u32) {
        self.send(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id.into(),
                bundle: bundle.into(),
                io: MessageField::some(TaskIO {
                    stdin: io[0].into(),
                    stdout: io[1].into(),
                    stderr: io[2].into(),
                    terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
    }

    /// `/tasks/start`.
    pub fn start(&self, id: &str, pid: u32) {
        self.send(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: id.into(),
                pid,
                ..Default::default()
            }),
        );
    }

    /// `/tasks/exit` for the init (`exec_id` empty) or an exec'd process.
    pub fn exit(&self, id: &str, exec_id: &str, pid: u32, status: u32, at_ns: u64) {
        self.send(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.into(),
                id: if exec_id.is_empty() { id } else { exec_id }.into(),
                pid,
                exit_status: status,
                exited_at: MessageField::some(timestamp(at_ns)),
                ..Default::default()
            }),
        );
    }

    /// `/tasks/delete`.
    pub fn delete(&self, id: &str, pid: u32, status: u32, at_ns: u64) {
        self.send(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.into(),
                id: id.into(),
                pid,
                exit_status: status,
                exited_at: MessageField::some(timestamp(at_ns)),
                ..Default::default()
            }),
        );
    }

    /// `/tasks/exec-added`.
    pub fn exec_added(&self, id: &str, exec_id: &str) {
        self.send(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            }),
        );
    }

    /// `/tasks/exec-started`.
    pub fn exec_started(&self, id: &str, exec_id: &str, pid: u32) {
        self.send(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid,
                ..Default::default()
            }),
        );
    }

    /// `/tasks/paused`.
    pub fn paused(&self, id: &str) {
        self.send(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: id.into(),
                ..Default::default()
            }),
        );
    }

    /// `/tasks/resumed`.
    pub fn resumed(&self, id: &str) {
        self.send(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: id.into(),
                ..Default::default()
            }),
        );
    }

    /// `/tasks/oom`.
    pub fn oom(&self, id: &str) {
        self.send(
            topics::TASK_OOM_EVENT_TOPIC,
            Box::new(TaskOOM {
                container_id: id.into(),
                ..Default::default()
            }),
        );
    }
}

/// A protobuf timestamp from ns since the Unix epoch.
pub fn timestamp(ns: u64) -> Timestamp {
    Timestamp {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_events_name_the_process() {
        let (events, mut rx) = Events::discard();
        events.exit("c1", "", 7, 3, 1_500_000_000);
        events.exit("c1", "e1", 7, 0, 1);
        let first = rx.try_recv().unwrap();
        assert_eq!(first.topic, "/tasks/exit");
        let exit = first.body.downcast_ref::<TaskExit>().unwrap();
        assert_eq!((exit.id.as_str(), exit.exit_status), ("c1", 3));
        assert_eq!(exit.exited_at.seconds, 1);
        assert_eq!(exit.exited_at.nanos, 500_000_000);
        let second = rx.try_recv().unwrap();
        assert_eq!(second.body.downcast_ref::<TaskExit>().unwrap().id, "e1");
    }
}
