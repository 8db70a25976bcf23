//! The set of exports a server offers, changeable while it runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::Export;

/// Name -> export map shared (as `Arc<ExportRegistry>`) by the server and whoever manages
/// exports (the binary at startup, later the control API and migration).
///
/// Connections resolve a name once, during negotiation, and keep their `Arc<Export>`:
/// removing or replacing an export affects new connections only. To stop existing ones,
/// [`Export::close`] the old export as well.
#[derive(Debug, Default)]
pub struct ExportRegistry {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    /// Export served for the empty name ("default export").
    default: RwLock<Option<String>>,
}

impl ExportRegistry {
    pub fn new() -> ExportRegistry {
        ExportRegistry::default()
    }

    /// Adds or replaces the export with this export's name; returns the one it replaced.
    pub fn insert(&self, export: Arc<Export>) -> Option<Arc<Export>> {
        self.exports.write().insert(export.name().to_owned(), export)
    }

    /// Adds the export unless one with that name exists (then returns it back as the error).
    pub fn try_insert(&self, export: Arc<Export>) -> Result<(), Arc<Export>> {
        let mut exports = self.exports.write();
        if exports.contains_key(export.name()) {
            return Err(export);
        }
        exports.insert(export.name().to_owned(), export);
        Ok(())
    }

    /// Removes an export from the registry (it stays usable by connections that hold it).
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.write().remove(name)
    }

    /// Looks up an export by name; the empty name means the default export.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            let default = self.default.read().clone()?;
            return self.exports.read().get(&default).cloned();
        }
        self.exports.read().get(name).cloned()
    }

    /// Every export, sorted by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.exports.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.exports.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.exports.read().is_empty()
    }

    /// Chooses the export served to clients that ask for the empty name (None: no default).
    pub fn set_default(&self, name: Option<&str>) {
        *self.default.write() = name.map(str::to_owned);
    }

    pub fn default_name(&self) -> Option<String> {
        self.default.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::MemDevice;

    fn export(name: &str, size: u64) -> Arc<Export> {
        Arc::new(Export::new(name, Arc::new(MemDevice::new(size))))
    }

    #[test]
    fn insert_get_replace_remove() {
        let r = ExportRegistry::new();
        assert!(r.is_empty());
        assert!(r.insert(export("b", 512)).is_none());
        assert!(r.insert(export("a", 1024)).is_none());
        assert_eq!(r.len(), 2);
        assert_eq!(r.get("a").unwrap().size(), 1024);
        assert!(r.get("c").is_none());
        assert_eq!(r.list().iter().map(|e| e.name().to_owned()).collect::<Vec<_>>(), ["a", "b"]);

        let old = r.insert(export("a", 2048)).unwrap();
        assert_eq!(old.size(), 1024);
        assert_eq!(r.get("a").unwrap().size(), 2048);

        assert!(r.try_insert(export("a", 1)).is_err());
        assert!(r.try_insert(export("c", 1)).is_ok());

        assert!(r.remove("a").is_some());
        assert!(r.get("a").is_none());
        assert!(r.remove("a").is_none());
    }

    #[test]
    fn default_export() {
        let r = ExportRegistry::new();
        r.insert(export("disk", 512));
        assert!(r.get("").is_none());
        r.set_default(Some("disk"));
        assert_eq!(r.get("").unwrap().name(), "disk");
        assert_eq!(r.default_name().as_deref(), Some("disk"));
        r.remove("disk");
        assert!(r.get("").is_none());
        r.set_default(None);
        assert!(r.default_name().is_none());
    }
}
