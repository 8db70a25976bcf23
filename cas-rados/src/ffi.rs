//! The part of librados's C API (`rados/librados.h`, Ceph 16) that the pool uses.
#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, size_t, time_t};

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rados_completion_t = *mut c_void;
pub type rados_list_ctx_t = *mut c_void;
pub type rados_write_op_t = *mut c_void;
pub type rados_callback_t = Option<unsafe extern "C" fn(cb: rados_completion_t, arg: *mut c_void)>;

pub const LIBRADOS_CREATE_EXCLUSIVE: c_int = 1;

#[link(name = "rados")]
extern "C" {
    pub fn rados_create2(pcluster: *mut rados_t, clustername: *const c_char, name: *const c_char, flags: u64) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_conf_parse_env(cluster: rados_t, var: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_cluster_fsid(cluster: rados_t, buf: *mut c_char, len: size_t) -> c_int;

    pub fn rados_ioctx_create(cluster: rados_t, pool_name: *const c_char, ioctx: *mut rados_ioctx_t) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    pub fn rados_ioctx_get_id(io: rados_ioctx_t) -> i64;

    pub fn rados_aio_create_completion2(cb_arg: *mut c_void, cb_complete: rados_callback_t, pc: *mut rados_completion_t) -> c_int;
    pub fn rados_aio_wait_for_complete(c: rados_completion_t) -> c_int;
    pub fn rados_aio_get_return_value(c: rados_completion_t) -> c_int;
    pub fn rados_aio_release(c: rados_completion_t);

    pub fn rados_aio_stat(io: rados_ioctx_t, o: *const c_char, completion: rados_completion_t, psize: *mut u64, pmtime: *mut time_t) -> c_int;
    pub fn rados_aio_read(io: rados_ioctx_t, oid: *const c_char, completion: rados_completion_t, buf: *mut c_char, len: size_t, off: u64) -> c_int;
    pub fn rados_aio_exec(
        io: rados_ioctx_t,
        o: *const c_char,
        completion: rados_completion_t,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: size_t,
        buf: *mut c_char,
        out_len: size_t,
    ) -> c_int;
    pub fn rados_aio_getxattr(io: rados_ioctx_t, o: *const c_char, completion: rados_completion_t, name: *const c_char, buf: *mut c_char, len: size_t)
        -> c_int;

    pub fn rados_read(io: rados_ioctx_t, oid: *const c_char, buf: *mut c_char, len: size_t, off: u64) -> c_int;

    pub fn rados_create_write_op() -> rados_write_op_t;
    pub fn rados_release_write_op(write_op: rados_write_op_t);
    pub fn rados_write_op_create(write_op: rados_write_op_t, exclusive: c_int, category: *const c_char);
    pub fn rados_write_op_write_full(write_op: rados_write_op_t, buffer: *const c_char, len: size_t);
    pub fn rados_write_op_operate(write_op: rados_write_op_t, io: rados_ioctx_t, oid: *const c_char, mtime: *mut time_t, flags: c_int) -> c_int;

    pub fn rados_nobjects_list_open(io: rados_ioctx_t, ctx: *mut rados_list_ctx_t) -> c_int;
    pub fn rados_nobjects_list_next2(
        ctx: rados_list_ctx_t,
        entry: *mut *const c_char,
        key: *mut *const c_char,
        nspace: *mut *const c_char,
        entry_size: *mut size_t,
        key_size: *mut size_t,
        nspace_size: *mut size_t,
    ) -> c_int;
    pub fn rados_nobjects_list_close(ctx: rados_list_ctx_t);
}
