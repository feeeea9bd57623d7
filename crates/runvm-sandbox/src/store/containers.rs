//! Container records: `ROOT/SANDBOX/containers/ID/container.json`.

use std::fs;
use std::io;

use super::fsio::{self, FaultPoint, CREATING, REMOVING};
use super::{
    check_field, check_no_mounts, io_error, list_ids, read_record, remove_leftover_dir, Store,
    StoreError, CONTAINERS_DIR, CONTAINER_FILE,
};
use crate::id::{ContainerId, SandboxId};
use crate::state::ContainerRecord;
use crate::store::SandboxLock;

impl Store {
    /// Makes container `record.id` in sandbox `record.sandbox_id`, all at once. Refuses with
    /// [`StoreError::ContainerExists`] if it exists. Needs the sandbox's exclusive lock. The
    /// sandbox record's `containers` list is the caller's to update.
    pub fn create_container(
        &self,
        lock: &SandboxLock,
        record: &ContainerRecord,
    ) -> Result<(), StoreError> {
        let (sandbox, id) = (&record.sandbox_id, &record.id);
        self.check_lock(lock, sandbox, "creating a container")?;
        if !self.sandbox_dir(sandbox).is_dir() {
            return Err(self.sandbox_not_found(sandbox));
        }
        let parent = self.sandbox_dir(sandbox).join(CONTAINERS_DIR);
        fsio::create_private_dir_all(&parent).map_err(io_error("create", &parent))?;
        let dir = parent.join(id.as_str());
        let exists = || StoreError::ContainerExists {
            sandbox: sandbox.clone(),
            id: id.clone(),
            path: dir.clone(),
        };
        if fs::symlink_metadata(&dir).is_ok() {
            return Err(exists());
        }
        let staging = fsio::create_unique_dir(&parent, &format!("{CREATING}{id}~"))
            .map_err(io_error("create a staging folder in", &parent))?;
        let staged = self
            .write_record(&staging.join(CONTAINER_FILE), record)
            .and_then(|()| fsio::sync_dir(&staging).map_err(io_error("sync", &staging)))
            .and_then(|()| {
                fsio::crash_here(self.crash_at, FaultPoint::Staged)
                    .map_err(io_error("publish", &staging))
            });
        if let Err(e) = staged {
            self.discard_staging(&staging);
            return Err(e);
        }
        if let Err(e) = fsio::publish_dir(&staging, &dir) {
            self.discard_staging(&staging);
            return Err(match e.kind() {
                io::ErrorKind::AlreadyExists => exists(),
                _ => io_error("publish the container folder", &dir)(e),
            });
        }
        fsio::sync_dir(&parent).map_err(io_error("sync", &parent))
    }

    /// Replaces the record of container `record.id`, which must exist. Needs the sandbox's
    /// exclusive lock.
    pub fn save_container(
        &self,
        lock: &SandboxLock,
        record: &ContainerRecord,
    ) -> Result<(), StoreError> {
        let (sandbox, id) = (&record.sandbox_id, &record.id);
        self.check_lock(lock, sandbox, "saving a container record")?;
        let dir = self.container_dir(sandbox, id);
        if !dir.is_dir() {
            return Err(self.container_not_found(sandbox, id));
        }
        self.write_record(&dir.join(CONTAINER_FILE), record)
    }

    /// Reads the record of container `id` of sandbox `sandbox`.
    pub fn load_container(
        &self,
        sandbox: &SandboxId,
        id: &ContainerId,
    ) -> Result<ContainerRecord, StoreError> {
        let path = self.container_dir(sandbox, id).join(CONTAINER_FILE);
        let record: ContainerRecord =
            read_record(&path)?.ok_or_else(|| self.container_not_found(sandbox, id))?;
        check_field(&path, "id", id.as_str(), record.id.as_str())?;
        check_field(
            &path,
            "sandbox_id",
            sandbox.as_str(),
            record.sandbox_id.as_str(),
        )?;
        Ok(record)
    }

    /// The containers of sandbox `sandbox` on disk, sorted by id (the sandbox record keeps
    /// creation order).
    pub fn list_containers(&self, sandbox: &SandboxId) -> Result<Vec<ContainerId>, StoreError> {
        if !self.sandbox_dir(sandbox).is_dir() {
            return Err(self.sandbox_not_found(sandbox));
        }
        list_ids(
            &self.sandbox_dir(sandbox).join(CONTAINERS_DIR),
            ContainerId::parse,
        )
    }

    /// Removes container `id` of sandbox `lock.id()`. Needs the sandbox's exclusive lock;
    /// refuses while anything is mounted under the container's folder.
    pub fn remove_container(&self, lock: &SandboxLock, id: &ContainerId) -> Result<(), StoreError> {
        let sandbox = lock.id();
        self.check_lock(lock, sandbox, "removing a container")?;
        let dir = self.container_dir(sandbox, id);
        let not_found = |e: StoreError| match e {
            StoreError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                self.container_not_found(sandbox, id)
            }
            other => other,
        };
        check_no_mounts(&dir).map_err(not_found)?;
        let parent = self.sandbox_dir(sandbox).join(CONTAINERS_DIR);
        let grave = parent.join(format!("{REMOVING}{id}~{}", fsio::unique_suffix()));
        fs::rename(&dir, &grave)
            .map_err(io_error("move away the container folder", &dir))
            .map_err(not_found)?;
        if let Err(e) = fsio::sync_dir(&parent) {
            tracing::warn!(sandbox = %sandbox, container = %id, error = %e, "cannot sync");
        }
        remove_leftover_dir(&grave);
        Ok(())
    }

    fn container_not_found(&self, sandbox: &SandboxId, id: &ContainerId) -> StoreError {
        if !self.sandbox_dir(sandbox).is_dir() {
            return self.sandbox_not_found(sandbox);
        }
        StoreError::ContainerNotFound {
            sandbox: sandbox.clone(),
            id: id.clone(),
            path: self.container_dir(sandbox, id),
        }
    }
}
