//! What a server keeps of its migrations across a restart: one small record per migration in
//! progress, written when the migration reaches a point a restart must not forget.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::protocol::Hello;
use crate::source::SourceConfig;

/// Where a migration stood when its record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The source serves the disk and is authoritative.
    PreCopy,
    /// The source export is frozen and SWITCH may be on its way: only the destination knows
    /// whether it switched, so a restarted source keeps the disk frozen until it can ask.
    SwitchingOver,
    /// The destination serves the disk.
    Switched,
}

/// One migration in progress, as a restart finds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: String,
    /// "source" or "destination".
    pub role: String,
    pub disk: String,
    /// The source: the destination's migration address. The destination: informational.
    pub peer: String,
    pub stage: Stage,
    /// The source's settings (source records).
    pub config: Option<SourceConfig>,
    /// The source's HELLO (destination records).
    pub hello: Option<Hello>,
}

/// Keeps migration records (a server's store directory in production).
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Writes a record durably (it survives kill -9 once this returns).
    fn save(&self, record: &MigrationRecord) -> io::Result<()>;
    fn remove(&self, id: &str) -> io::Result<()>;
    fn load(&self) -> io::Result<Vec<MigrationRecord>>;
    /// A directory for a migration's larger state (post-copy's missing-block list); None
    /// keeps that state in memory only.
    fn dir(&self) -> Option<&Path> {
        None
    }
}

/// Records as JSON files in a directory, each replaced atomically (write, fsync, rename,
/// fsync the directory).
#[derive(Debug)]
pub struct FileStateStore {
    dir: PathBuf,
}

impl FileStateStore {
    pub fn open(dir: impl AsRef<Path>) -> io::Result<FileStateStore> {
        fs::create_dir_all(dir.as_ref())?;
        Ok(FileStateStore { dir: dir.as_ref().to_path_buf() })
    }

    fn path(&self, id: &str) -> io::Result<PathBuf> {
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') || id.starts_with('.') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("migration id {id:?} cannot name a record")));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    fn sync_dir(&self) -> io::Result<()> {
        fs::File::open(&self.dir)?.sync_all()
    }
}

impl StateStore for FileStateStore {
    fn dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn save(&self, record: &MigrationRecord) -> io::Result<()> {
        let path = self.path(&record.id)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(record).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        self.sync_dir()
    }

    fn remove(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.path(id)?) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn load(&self) -> io::Result<Vec<MigrationRecord>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = fs::read(&path)?;
            match serde_json::from_slice::<MigrationRecord>(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "ignoring an unreadable migration record")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// Records in memory (tests, and servers without a store directory).
#[derive(Debug, Default)]
pub struct MemStateStore(Mutex<BTreeMap<String, MigrationRecord>>);

impl StateStore for MemStateStore {
    fn save(&self, record: &MigrationRecord) -> io::Result<()> {
        self.0.lock().insert(record.id.clone(), record.clone());
        Ok(())
    }
    fn remove(&self, id: &str) -> io::Result<()> {
        self.0.lock().remove(id);
        Ok(())
    }
    fn load(&self) -> io::Result<Vec<MigrationRecord>> {
        Ok(self.0.lock().values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_records_round_trip_and_refuse_bad_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStateStore::open(dir.path()).unwrap();
        let r = MigrationRecord {
            id: "out-1".into(),
            role: "source".into(),
            disk: "vm".into(),
            peer: "127.0.0.1:1".into(),
            stage: Stage::PreCopy,
            config: Some(SourceConfig::default()),
            hello: None,
        };
        s.save(&r).unwrap();
        let mut r2 = r.clone();
        r2.stage = Stage::Switched;
        s.save(&r2).unwrap();
        assert_eq!(FileStateStore::open(dir.path()).unwrap().load().unwrap(), vec![r2]);
        s.remove("out-1").unwrap();
        s.remove("out-1").unwrap();
        assert!(s.load().unwrap().is_empty());
        let mut bad = r.clone();
        bad.id = "../x".into();
        assert!(s.save(&bad).is_err());
    }
}
