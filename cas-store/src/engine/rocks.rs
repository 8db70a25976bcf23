//! The RocksDB engine.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, DBRawIteratorWithThreadMode, DataBlockIndexType,
    IngestExternalFileOptions, Options, ReadOptions, SstFileWriter, DB,
};

use super::{BatchOp, Cf, EngineMemory, KvEngine, KvPair, ScanIter, WriteBatch};
use crate::{Result, StoreError};

/// Knobs for RocksDB that an operator may want to change.
#[derive(Debug, Clone)]
pub struct RocksTuning {
    /// RocksDB's own block cache (compressed and uncompressed SST blocks), shared by all column
    /// families. The store's hot-block cache sits in front of it.
    pub block_cache_bytes: usize,
    /// Memtable size per column family, and the cap on all column families' memtables
    /// together.
    pub write_buffer_bytes: usize,
}

impl Default for RocksTuning {
    fn default() -> Self {
        RocksTuning { block_cache_bytes: 128 << 20, write_buffer_bytes: 64 << 20 }
    }
}

/// A RocksDB database with one column family per [`Cf`].
pub struct RocksEngine {
    db: Arc<DB>,
    /// Threads one large existence lookup is split over (the CPUs available, at most 4).
    lookup_threads: usize,
    /// Where table files for [`KvEngine::ingest_sorted`] are written before RocksDB links
    /// them in (emptied at open: a crash may leave one behind).
    ingest_dir: PathBuf,
    next_ingest: AtomicU64,
    /// Each column family's options, for the table files written for it.
    cf_options: Vec<Options>,
}

/// The directory under the database that holds table files being written for ingestion.
pub(crate) const INGEST_DIR: &str = "ingest";

/// Below this many keys per thread, a thread costs more than it saves.
const MIN_LOOKUPS_PER_THREAD: usize = 512;

impl std::fmt::Debug for RocksEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksEngine").field("path", &self.db.path()).finish()
    }
}

/// The refs merge, full and partial alike: RocksDB gives a partial merge no existing value,
/// and the sum of addends it then returns (8 bytes) is itself an addend.
fn refs_merge(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    super::add_to_counter(existing, operands.iter())
}

fn engine_err(e: rocksdb::Error) -> StoreError {
    StoreError::Engine(e.into_string())
}

impl RocksEngine {
    pub fn open(path: &Path, tuning: &RocksTuning) -> Result<RocksEngine> {
        let cache = Cache::new_lru_cache(tuning.block_cache_bytes);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        // Compactions (the LOW pool) are bulk work that can wait: at nice 19 they take the
        // cores only when the control and data paths leave them idle, so a gang's switch-over
        // or an NBD request no longer waits behind one for a core. Flushes (the HIGH pool)
        // stay at normal priority: writers stall when they fall behind.
        let mut env = rocksdb::Env::new().map_err(engine_err)?;
        env.lower_thread_pool_cpu_priority();
        db_opts.set_env(&env);
        db_opts.set_keep_log_file_num(4);
        // Bound WAL growth: column families with little traffic (meta, disks) would otherwise
        // keep old WAL files alive.
        db_opts.set_max_total_wal_size(256 << 20);
        // Memtables of all column families together: the maps and the references both take
        // bursts of writes (an import, a migration), and each would otherwise hold up to two
        // full write buffers. Past this the largest is flushed. One write buffer's worth for
        // all of them: a migration's destination peaked at 501-520 MiB of RSS with one and a
        // half (a 10 M-block disk; target 512), 470-484 MiB with one, in about the same time.
        db_opts.set_db_write_buffer_size(tuning.write_buffer_bytes);
        // Many NBD requests write at once: let the WAL append of one write group overlap the
        // memtable inserts of the previous one.
        db_opts.set_enable_pipelined_write(true);
        // The write group's leader inserts every member's batch into the memtable itself, and
        // waiting writers sleep instead of spinning: with parallel inserts the members spun in
        // `sched_yield` until the slowest insert ended, 20 % of the server's CPU under 4 KiB
        // random writes at QD32 on two cores (11 % without). Twelve of fifteen alternating
        // rounds faster (median about +15 %); sequential writes and a 10 M-block migration's
        // destination (several writers at once) no slower.
        db_opts.set_allow_concurrent_memtable_write(false);
        db_opts.set_enable_write_thread_adaptive_yield(false);

        let cf_opts = |cf: Cf| {
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            // Point lookups dominate (has_many during migration, map lookups on every I/O):
            // bloom filters keep a miss to a memory probe.
            table.set_bloom_filter(10.0, false);
            table.set_cache_index_and_filter_blocks(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if matches!(cf, Cf::Maps | Cf::Refs) {
                // Every write looks up its blocks' old map entries and the counts of their old
                // and new contents: a hash index in each data block makes such a lookup one
                // probe instead of a binary search, and 16 KiB blocks make the index four times
                // smaller. 4 KiB random writes at QD32 on a populated store cost 41.1 us of the
                // server's CPU each against 45.3 (three and six alternating rounds, README:
                // Measured, the block map's table options).
                table.set_data_block_index_type(DataBlockIndexType::BinaryAndHash);
                table.set_data_block_hash_ratio(0.75);
                table.set_block_size(16 << 10);
            }
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(tuning.write_buffer_bytes);
            o.set_level_compaction_dynamic_level_bytes(true);
            o.set_compression_type(match cf {
                // Format 1's block bytes (read only by `cas upgrade` now).
                Cf::Blocks => DBCompressionType::Lz4,
                // Fingerprints are random; compressing them only costs CPU.
                Cf::Refs | Cf::Maps | Cf::Sketches => DBCompressionType::None,
                Cf::Meta | Cf::Disks => DBCompressionType::None,
            });
            // Point lookups that miss the memtable's skiplist cost a bloom probe, not a search.
            o.set_memtable_whole_key_filtering(true);
            o.set_memtable_prefix_bloom_ratio(0.05);
            if cf == Cf::Refs {
                // Counts raised without reading them first (snapshots and clones).
                o.set_merge_operator_associative("cas.add-to-counter", refs_merge);
            }
            if cf == Cf::Blocks {
                // Format 1 kept block bytes in blob files (RocksDB's integrated BlobDB): written once, not
                // rewritten by every compaction as 4 KiB values inside SST files would be.
                // Blob garbage collection reclaims the space of deleted blocks.
                o.set_enable_blob_files(true);
                o.set_min_blob_size(256);
                o.set_blob_file_size(256 << 20);
                o.set_blob_compression_type(DBCompressionType::Lz4);
                o.set_enable_blob_gc(true);
            }
            o
        };
        let cf_options: Vec<Options> = Cf::ALL.iter().map(|&cf| cf_opts(cf)).collect();
        let descriptors: Vec<_> = Cf::ALL.iter().zip(&cf_options).map(|(cf, o)| ColumnFamilyDescriptor::new(cf.name(), o.clone())).collect();
        let db = DB::open_cf_descriptors(&db_opts, path, descriptors).map_err(engine_err)?;
        let lookup_threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let ingest_dir = path.join(INGEST_DIR);
        let _ = std::fs::remove_dir_all(&ingest_dir);
        Ok(RocksEngine { db: Arc::new(db), lookup_threads, ingest_dir, next_ingest: AtomicU64::new(0), cf_options })
    }

    /// Whether `keys[order[k]]` exists, into `out[k]`, for sorted `order`.
    fn contains_run(&self, cf: Cf, keys: &[&[u8]], order: &[usize], out: &mut [bool]) -> Result<()> {
        perf_counters_off();
        let sorted = order.iter().map(|&i| keys[i]);
        for (slot, r) in out.iter_mut().zip(self.db.batched_multi_get_cf(self.cf(cf), sorted, true)) {
            *slot = r.map_err(engine_err)?.is_some();
        }
        Ok(())
    }

    fn cf(&self, cf: Cf) -> &ColumnFamily {
        self.db.cf_handle(cf.name()).expect("every column family is created at open")
    }
}

/// RocksDB counts every key comparison in a thread-local perf context unless told not to
/// (its default level is "count"). Through the shared library each count is a
/// `__tls_get_addr` call: about a tenth of the CPU of an import. Turned off once per thread.
fn perf_counters_off() {
    thread_local! {
        static OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    OFF.with(|off| {
        if !off.get() {
            rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
            off.set(true);
        }
    });
}

impl KvEngine for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        perf_counters_off();
        self.db.get_cf(self.cf(cf), key).map_err(engine_err)
    }

    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        perf_counters_off();
        self.db
            .batched_multi_get_cf(self.cf(cf), keys.iter().copied(), false)
            .into_iter()
            .map(|r| r.map(|v| v.map(|s| s.to_vec())).map_err(engine_err))
            .collect()
    }

    fn contains_many(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<bool>> {
        // Sorted input lets MultiGet walk each level once in order instead of sorting itself.
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_unstable_by_key(|&i| keys[i]);
        // A migration's listing asks about hundreds of thousands of fingerprints at once:
        // contiguous runs of the sorted keys, one per thread, each writing its own answers.
        let threads = self.lookup_threads.min(keys.len() / MIN_LOOKUPS_PER_THREAD).max(1);
        let per_thread = order.len().div_ceil(threads).max(1);
        let mut answers: Vec<Vec<bool>> = order.chunks(per_thread).map(|run| vec![false; run.len()]).collect();
        match answers.as_mut_slice() {
            [] => {}
            [only] => self.contains_run(cf, keys, &order, only)?,
            _ => std::thread::scope(|scope| {
                let workers: Vec<_> =
                    order.chunks(per_thread).zip(answers.iter_mut()).map(|(run, out)| scope.spawn(move || self.contains_run(cf, keys, run, out))).collect();
                workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            })?,
        }
        let mut found = vec![false; keys.len()];
        for (&i, hit) in order.iter().zip(answers.into_iter().flatten()) {
            found[i] = hit;
        }
        Ok(found)
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        perf_counters_off();
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                BatchOp::Put(cf, k, v) => wb.put_cf(self.cf(*cf), k, v),
                BatchOp::Delete(cf, k) => wb.delete_cf(self.cf(*cf), k),
                BatchOp::DeleteRange(cf, start, end) => wb.delete_range_cf(self.cf(*cf), start, end),
                BatchOp::AddToCount(cf, k, addend) => wb.merge_cf(self.cf(*cf), k, addend),
            }
        }
        // The WAL is written before this returns, so a crash of the process (kill -9) loses
        // nothing that returned; `sync` adds power-loss durability.
        self.db.write(wb).map_err(engine_err)
    }

    fn sync(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(engine_err)
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter> {
        perf_counters_off();
        let mut opts = ReadOptions::default();
        if let Some(end) = end {
            opts.set_iterate_upper_bound(end.to_vec());
        }
        // Big scans (fsck, snapshots of whole disks) should not evict the hot working set.
        opts.fill_cache(false);
        let iter = self.db.raw_iterator_cf_opt(self.cf(cf), opts);
        // SAFETY: the iterator borrows the DB. `RocksScan` owns an `Arc<DB>` and declares the
        // iterator first, so the iterator is dropped before that reference to the DB; the column
        // family handle is only used while creating the iterator and lives as long as the DB
        // (column families are never dropped).
        let iter: DBRawIteratorWithThreadMode<'static, DB> = unsafe { std::mem::transmute(iter) };
        Ok(Box::new(RocksScan { iter, _db: Arc::clone(&self.db), start: Some(start.to_vec()), done: false }))
    }

    fn for_each_in(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        perf_counters_off();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(end.to_vec());
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(cf), opts);
        iter.seek(start);
        while iter.valid() {
            if let (Some(k), Some(v)) = (iter.key(), iter.value()) {
                visit(k, v)?;
            }
            iter.next();
        }
        iter.status().map_err(engine_err)
    }

    fn ingest_sorted_changes(&self, cf: Cf, entries: &mut dyn Iterator<Item = Result<(Vec<u8>, Option<Vec<u8>>)>>) -> Result<u64> {
        perf_counters_off();
        std::fs::create_dir_all(&self.ingest_dir).map_err(|e| StoreError::Engine(format!("creating {}: {e}", self.ingest_dir.display())))?;
        let file = self.ingest_dir.join(format!("{}.sst", self.next_ingest.fetch_add(1, Ordering::Relaxed)));
        let written = (|| {
            let mut writer = SstFileWriter::create(&self.cf_options[cf.index()]);
            writer.open(&file).map_err(engine_err)?;
            let mut added = 0u64;
            for entry in entries {
                match entry? {
                    (key, Some(value)) => writer.put(key, value).map_err(engine_err)?,
                    (key, None) => writer.delete(key).map_err(engine_err)?,
                }
                added += 1;
            }
            if added > 0 {
                writer.finish().map_err(engine_err)?;
            }
            Ok(added)
        })();
        let ingested = match written {
            Ok(0) => Ok(0),
            Ok(added) => {
                let mut opts = IngestExternalFileOptions::default();
                // Linked, not copied; RocksDB syncs the file and records it in its manifest.
                opts.set_move_files(true);
                self.db.ingest_external_file_cf_opts(self.cf(cf), &opts, vec![&file]).map(|()| added).map_err(engine_err)
            }
            Err(e) => Err(e),
        };
        // Whatever happened, this name is not needed any more (RocksDB keeps its own link).
        let _ = std::fs::remove_file(&file);
        ingested
    }

    fn fresh_memtable(&self, cf: Cf) -> Result<()> {
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(false);
        self.db.flush_cf_opt(self.cf(cf), &opts).map_err(engine_err)
    }

    fn disk_usage_bytes(&self) -> Option<u64> {
        let mut total = 0u64;
        for cf in Cf::ALL {
            total += self.db.property_int_value_cf(self.cf(cf), "rocksdb.total-sst-files-size").ok()??;
            // Block bytes live in blob files, which the SST figure leaves out.
            total += self.db.property_int_value_cf(self.cf(cf), "rocksdb.total-blob-file-size").ok()?.unwrap_or(0);
            // Not flushed yet: a fresh store's whole index can sit in its memtables.
            total += self.db.property_int_value_cf(self.cf(cf), "rocksdb.cur-size-all-mem-tables").ok()?.unwrap_or(0);
        }
        Some(total)
    }

    fn memory(&self) -> Option<EngineMemory> {
        let mut m = EngineMemory::default();
        for cf in Cf::ALL {
            let int = |name: &str| self.db.property_int_value_cf(self.cf(cf), name).ok().flatten().unwrap_or(0);
            m.memtable_bytes += int("rocksdb.cur-size-all-mem-tables");
            m.table_reader_bytes += int("rocksdb.estimate-table-readers-mem");
        }
        // One cache for every column family but RocksDB's default one, which the store leaves
        // empty.
        m.block_cache_bytes = self.db.property_int_value_cf(self.cf(Cf::Maps), "rocksdb.block-cache-usage").ok().flatten().unwrap_or(0);
        Some(m)
    }
}

/// A RocksDB iterator that owns a handle on its database. A RocksDB iterator reads from an
/// implicit snapshot taken at its creation, which is the point-in-time view a scan promises.
struct RocksScan {
    iter: DBRawIteratorWithThreadMode<'static, DB>,
    _db: Arc<DB>,
    start: Option<Vec<u8>>,
    done: bool,
}

impl Iterator for RocksScan {
    type Item = Result<KvPair>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.start.take() {
            Some(start) => self.iter.seek(start),
            None => self.iter.next(),
        }
        if !self.iter.valid() {
            self.done = true;
            return self.iter.status().err().map(|e| Err(engine_err(e)));
        }
        match (self.iter.key(), self.iter.value()) {
            (Some(k), Some(v)) => Some(Ok((k.into(), v.into()))),
            _ => {
                self.done = true;
                None
            }
        }
    }
}
