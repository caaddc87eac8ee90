//! libvirt's C API, loaded at run time from `libvirt.so.0`, and safe wrappers for
//! the few calls vmbackup makes.
//!
//! Loading at run time (libloading) keeps one binary for every host: the build needs
//! no libvirt headers, and a host without libvirt runs every other platform; only a
//! `libvirt` platform needs the library (Debian: package `libvirt0`). The functions
//! are declared by hand from libvirt's public headers (stable ABI since 0.x; the
//! newest used, `virDomainBackupBegin` and checkpoints, since 6.0).
//!
//! Errors: libvirt's default error handler prints to stderr; it is replaced by one
//! that prints nothing, and each failed call is turned into an error carrying
//! `virGetLastErrorMessage` and `virGetLastErrorCode`.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};

/// `VIR_ERR_NO_DOMAIN_CHECKPOINT`
pub const ERR_NO_DOMAIN_CHECKPOINT: i32 = 103;
/// `VIR_ERR_NO_DOMAIN`
pub const ERR_NO_DOMAIN: i32 = 42;

/// `virDomainState`
pub const STATE_RUNNING: c_int = 1;
pub const STATE_BLOCKED: c_int = 2;
pub const STATE_PAUSED: c_int = 3;
pub const STATE_SHUTDOWN: c_int = 4;
pub const STATE_SHUTOFF: c_int = 5;
pub const STATE_CRASHED: c_int = 6;
pub const STATE_PMSUSPENDED: c_int = 7;

/// `VIR_DOMAIN_XML_INACTIVE`: the persistent definition, not the live state.
pub const XML_INACTIVE: c_uint = 1 << 1;
/// `VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN`
pub const CHECKPOINT_XML_NO_DOMAIN: c_uint = 1 << 1;
/// `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`
pub const CHECKPOINT_CREATE_REDEFINE: c_uint = 1 << 0;
/// `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE`: refuse a redefinition whose
/// bitmaps are not in the images.
pub const CHECKPOINT_CREATE_REDEFINE_VALIDATE: c_uint = 1 << 2;
/// `VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA`
pub const UNDEFINE_CHECKPOINTS_METADATA: c_uint = 1 << 5;
/// `VIR_DOMAIN_UNDEFINE_NVRAM`
pub const UNDEFINE_NVRAM: c_uint = 1 << 2;

type Conn = *mut c_void;
type Dom = *mut c_void;
type Cp = *mut c_void;

#[repr(C)]
struct BlockInfo {
    capacity: c_ulonglong,
    allocation: c_ulonglong,
    physical: c_ulonglong,
}

/// The entry points, resolved once.
struct Api {
    _lib: libloading::Library,
    connect_open: unsafe extern "C" fn(*const c_char) -> Conn,
    connect_close: unsafe extern "C" fn(Conn) -> c_int,
    connect_is_alive: unsafe extern "C" fn(Conn) -> c_int,
    connect_get_hostname: unsafe extern "C" fn(Conn) -> *mut c_char,
    connect_get_uri: unsafe extern "C" fn(Conn) -> *mut c_char,
    list_all_domains: unsafe extern "C" fn(Conn, *mut *mut Dom, c_uint) -> c_int,
    lookup_by_name: unsafe extern "C" fn(Conn, *const c_char) -> Dom,
    define_xml: unsafe extern "C" fn(Conn, *const c_char) -> Dom,
    domain_free: unsafe extern "C" fn(Dom) -> c_int,
    domain_get_name: unsafe extern "C" fn(Dom) -> *const c_char,
    domain_get_uuid_string: unsafe extern "C" fn(Dom, *mut c_char) -> c_int,
    domain_get_state: unsafe extern "C" fn(Dom, *mut c_int, *mut c_int, c_uint) -> c_int,
    domain_is_persistent: unsafe extern "C" fn(Dom) -> c_int,
    domain_get_xml_desc: unsafe extern "C" fn(Dom, c_uint) -> *mut c_char,
    domain_get_block_info:
        unsafe extern "C" fn(Dom, *const c_char, *mut BlockInfo, c_uint) -> c_int,
    domain_create: unsafe extern "C" fn(Dom) -> c_int,
    domain_destroy: unsafe extern "C" fn(Dom) -> c_int,
    domain_undefine_flags: unsafe extern "C" fn(Dom, c_uint) -> c_int,
    domain_abort_job: unsafe extern "C" fn(Dom) -> c_int,
    backup_begin: unsafe extern "C" fn(Dom, *const c_char, *const c_char, c_uint) -> c_int,
    backup_get_xml_desc: unsafe extern "C" fn(Dom, c_uint) -> *mut c_char,
    fs_freeze: unsafe extern "C" fn(Dom, *const *const c_char, c_uint, c_uint) -> c_int,
    fs_thaw: unsafe extern "C" fn(Dom, *const *const c_char, c_uint, c_uint) -> c_int,
    checkpoint_create_xml: unsafe extern "C" fn(Dom, *const c_char, c_uint) -> Cp,
    checkpoint_lookup_by_name: unsafe extern "C" fn(Dom, *const c_char, c_uint) -> Cp,
    list_all_checkpoints: unsafe extern "C" fn(Dom, *mut *mut Cp, c_uint) -> c_int,
    checkpoint_get_name: unsafe extern "C" fn(Cp) -> *const c_char,
    checkpoint_get_xml_desc: unsafe extern "C" fn(Cp, c_uint) -> *mut c_char,
    checkpoint_delete: unsafe extern "C" fn(Cp, c_uint) -> c_int,
    checkpoint_free: unsafe extern "C" fn(Cp) -> c_int,
    last_error_message: unsafe extern "C" fn() -> *const c_char,
    last_error_code: unsafe extern "C" fn() -> c_int,
}

extern "C" {
    /// libc's `free`, for strings and arrays libvirt hands over.
    fn free(p: *mut c_void);
}

/// libvirt's error callback: errors are read back per call, never printed.
extern "C" fn quiet_errors(_user: *mut c_void, _err: *mut c_void) {}

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

fn api() -> Result<&'static Api> {
    API.get_or_init(load).as_ref().map_err(|e| anyhow!("{e}"))
}

fn load() -> std::result::Result<Api, String> {
    // SAFETY: loading libvirt runs its (well-behaved) library constructors.
    let lib = unsafe { libloading::Library::new("libvirt.so.0") }.map_err(|e| {
        format!(
            "the libvirt client library cannot be loaded ({e}): install it (Debian: apt-get install libvirt0)"
        )
    })?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the declared type matches libvirt's public header for $name.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| {
                format!(
                    "libvirt.so.0 lacks {} ({e}): libvirt 6.0 or newer is needed",
                    $name
                )
            })?
        };
    }
    let init: unsafe extern "C" fn() -> c_int = sym!("virInitialize");
    let set_error_func: unsafe extern "C" fn(*mut c_void, extern "C" fn(*mut c_void, *mut c_void)) =
        sym!("virSetErrorFunc");
    // SAFETY: plain calls into the freshly loaded library.
    unsafe {
        if init() < 0 {
            return Err("virInitialize failed".into());
        }
        set_error_func(std::ptr::null_mut(), quiet_errors);
    }
    Ok(Api {
        connect_open: sym!("virConnectOpen"),
        connect_close: sym!("virConnectClose"),
        connect_is_alive: sym!("virConnectIsAlive"),
        connect_get_hostname: sym!("virConnectGetHostname"),
        connect_get_uri: sym!("virConnectGetURI"),
        list_all_domains: sym!("virConnectListAllDomains"),
        lookup_by_name: sym!("virDomainLookupByName"),
        define_xml: sym!("virDomainDefineXML"),
        domain_free: sym!("virDomainFree"),
        domain_get_name: sym!("virDomainGetName"),
        domain_get_uuid_string: sym!("virDomainGetUUIDString"),
        domain_get_state: sym!("virDomainGetState"),
        domain_is_persistent: sym!("virDomainIsPersistent"),
        domain_get_xml_desc: sym!("virDomainGetXMLDesc"),
        domain_get_block_info: sym!("virDomainGetBlockInfo"),
        domain_create: sym!("virDomainCreate"),
        domain_destroy: sym!("virDomainDestroy"),
        domain_undefine_flags: sym!("virDomainUndefineFlags"),
        domain_abort_job: sym!("virDomainAbortJob"),
        backup_begin: sym!("virDomainBackupBegin"),
        backup_get_xml_desc: sym!("virDomainBackupGetXMLDesc"),
        fs_freeze: sym!("virDomainFSFreeze"),
        fs_thaw: sym!("virDomainFSThaw"),
        checkpoint_create_xml: sym!("virDomainCheckpointCreateXML"),
        checkpoint_lookup_by_name: sym!("virDomainCheckpointLookupByName"),
        list_all_checkpoints: sym!("virDomainListAllCheckpoints"),
        checkpoint_get_name: sym!("virDomainCheckpointGetName"),
        checkpoint_get_xml_desc: sym!("virDomainCheckpointGetXMLDesc"),
        checkpoint_delete: sym!("virDomainCheckpointDelete"),
        checkpoint_free: sym!("virDomainCheckpointFree"),
        last_error_message: sym!("virGetLastErrorMessage"),
        last_error_code: sym!("virGetLastErrorCode"),
        _lib: lib,
    })
}

/// A failed libvirt call: what was asked, libvirt's message and error code.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct VirError {
    pub what: String,
    pub message: String,
    pub code: i32,
}

fn last_error(api: &Api, what: impl Into<String>) -> anyhow::Error {
    let (message, code) = read_last_error(api);
    VirError {
        what: what.into(),
        message,
        code,
    }
    .into()
}

/// The calling thread's last libvirt error. Read it before any other libvirt
/// call: most calls (even `virDomainGetName`) reset it.
fn read_last_error(api: &Api) -> (String, i32) {
    // SAFETY: both return thread-local state; the message is a static or
    // thread-local string valid until the next libvirt call on this thread.
    unsafe {
        let m = (api.last_error_message)();
        let m = if m.is_null() {
            "unknown libvirt error".to_string()
        } else {
            CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        (m, (api.last_error_code)())
    }
}

/// The libvirt error code of an error from this module (0 if it is none).
pub fn error_code(err: &anyhow::Error) -> i32 {
    err.downcast_ref::<VirError>().map(|e| e.code).unwrap_or(0)
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("{what} contains a NUL byte"))
}

/// Take ownership of a malloc'ed C string.
///
/// # Safety
/// `p` is null or a NUL-terminated string allocated with malloc.
unsafe fn owned_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let s = CStr::from_ptr(p).to_string_lossy().into_owned();
    free(p.cast());
    Some(s)
}

/// An open connection (`virConnectPtr`). libvirt connections are thread-safe.
pub struct Connection {
    ptr: Conn,
    api: &'static Api,
}

// SAFETY: libvirt documents virConnectPtr as safe to use from several threads.
unsafe impl Send for Connection {}
unsafe impl Sync for Connection {}

impl Connection {
    pub fn open(uri: &str) -> Result<Connection> {
        let api = api()?;
        let c = cstring(uri, "URI")?;
        // SAFETY: valid C string; returns null on failure.
        let ptr = unsafe { (api.connect_open)(c.as_ptr()) };
        if ptr.is_null() {
            return Err(last_error(
                api,
                format!("cannot connect to libvirt at {uri}"),
            ));
        }
        Ok(Connection { ptr, api })
    }

    pub fn is_alive(&self) -> bool {
        // SAFETY: live connection.
        unsafe { (self.api.connect_is_alive)(self.ptr) == 1 }
    }

    pub fn hostname(&self) -> Result<String> {
        // SAFETY: live connection; result is malloc'ed.
        unsafe { owned_string((self.api.connect_get_hostname)(self.ptr)) }
            .ok_or_else(|| last_error(self.api, "cannot read the libvirt host name"))
    }

    pub fn uri(&self) -> Result<String> {
        // SAFETY: live connection; result is malloc'ed.
        unsafe { owned_string((self.api.connect_get_uri)(self.ptr)) }
            .ok_or_else(|| last_error(self.api, "cannot read the connection URI"))
    }

    /// Every domain, running or not (persistent and transient).
    pub fn domains(&self) -> Result<Vec<Domain<'_>>> {
        let mut list: *mut Dom = std::ptr::null_mut();
        // SAFETY: libvirt allocates the array; we free it and own each element.
        let n = unsafe { (self.api.list_all_domains)(self.ptr, &mut list, 0) };
        if n < 0 {
            return Err(last_error(self.api, "cannot list domains"));
        }
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: i < n elements were returned.
            out.push(Domain {
                ptr: unsafe { *list.add(i) },
                conn: self,
            });
        }
        // SAFETY: the array itself was malloc'ed by libvirt.
        unsafe { free(list.cast()) };
        Ok(out)
    }

    pub fn domain(&self, name: &str) -> Result<Domain<'_>> {
        let c = cstring(name, "domain name")?;
        // SAFETY: valid C string.
        let ptr = unsafe { (self.api.lookup_by_name)(self.ptr, c.as_ptr()) };
        if ptr.is_null() {
            return Err(last_error(self.api, format!("no domain '{name}'")));
        }
        Ok(Domain { ptr, conn: self })
    }

    /// Define a persistent domain from XML.
    pub fn define(&self, xml: &str) -> Result<Domain<'_>> {
        let c = cstring(xml, "domain XML")?;
        // SAFETY: valid C string.
        let ptr = unsafe { (self.api.define_xml)(self.ptr, c.as_ptr()) };
        if ptr.is_null() {
            return Err(last_error(self.api, "cannot define the domain"));
        }
        Ok(Domain { ptr, conn: self })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { (self.api.connect_close)(self.ptr) };
    }
}

/// One domain (`virDomainPtr`), borrowed from its connection.
pub struct Domain<'c> {
    ptr: Dom,
    conn: &'c Connection,
}

/// Run state and persistence of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainState {
    pub state: c_int,
    pub persistent: bool,
}

impl DomainState {
    /// QEMU runs (backups go through libvirt) vs not (disks are read offline).
    pub fn is_active(self) -> bool {
        !matches!(self.state, STATE_SHUTOFF | STATE_CRASHED | 0)
    }

    pub fn word(self) -> &'static str {
        match self.state {
            STATE_RUNNING => "running",
            STATE_BLOCKED => "blocked",
            STATE_PAUSED => "paused",
            STATE_SHUTDOWN => "shutting down",
            STATE_SHUTOFF => "shut off",
            STATE_CRASHED => "crashed",
            STATE_PMSUSPENDED => "suspended",
            _ => "unknown",
        }
    }
}

impl Domain<'_> {
    fn api(&self) -> &'static Api {
        self.conn.api
    }

    fn fail(&self, what: &str) -> anyhow::Error {
        let (message, code) = read_last_error(self.api());
        VirError {
            what: format!("domain '{}': {what}", self.name()),
            message,
            code,
        }
        .into()
    }

    fn check(&self, rc: c_int, what: &str) -> Result<c_int> {
        if rc < 0 {
            Err(self.fail(what))
        } else {
            Ok(rc)
        }
    }

    pub fn name(&self) -> String {
        // SAFETY: the name lives as long as the domain object.
        unsafe {
            let p = (self.api().domain_get_name)(self.ptr);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    pub fn uuid(&self) -> Result<String> {
        let mut buf = [0 as c_char; 37];
        // SAFETY: VIR_UUID_STRING_BUFLEN is 37.
        self.check(
            unsafe { (self.api().domain_get_uuid_string)(self.ptr, buf.as_mut_ptr()) },
            "read UUID",
        )?;
        // SAFETY: libvirt wrote a NUL-terminated string.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    pub fn state(&self) -> Result<DomainState> {
        let (mut state, mut reason) = (0, 0);
        // SAFETY: out-pointers to locals.
        self.check(
            unsafe { (self.api().domain_get_state)(self.ptr, &mut state, &mut reason, 0) },
            "read state",
        )?;
        // SAFETY: live domain.
        let persistent = self.check(
            unsafe { (self.api().domain_is_persistent)(self.ptr) },
            "read persistence",
        )? == 1;
        Ok(DomainState { state, persistent })
    }

    /// The domain XML without secure fields (no passwords: no VIR_DOMAIN_XML_SECURE).
    pub fn xml(&self, flags: c_uint) -> Result<String> {
        // SAFETY: result is malloc'ed.
        unsafe { owned_string((self.api().domain_get_xml_desc)(self.ptr, flags)) }
            .ok_or_else(|| self.fail("read domain XML"))
    }

    /// A disk's virtual size in bytes (by target, e.g. `vda`).
    pub fn disk_capacity(&self, target: &str) -> Result<u64> {
        let c = cstring(target, "disk target")?;
        let mut info = BlockInfo {
            capacity: 0,
            allocation: 0,
            physical: 0,
        };
        // SAFETY: out-pointer to a repr(C) struct of libvirt's layout.
        self.check(
            unsafe { (self.api().domain_get_block_info)(self.ptr, c.as_ptr(), &mut info, 0) },
            &format!("read size of disk {target}"),
        )?;
        Ok(info.capacity)
    }

    pub fn start(&self) -> Result<()> {
        // SAFETY: live domain.
        self.check(unsafe { (self.api().domain_create)(self.ptr) }, "start")
            .map(drop)
    }

    pub fn destroy(&self) -> Result<()> {
        // SAFETY: live domain.
        self.check(unsafe { (self.api().domain_destroy)(self.ptr) }, "stop")
            .map(drop)
    }

    pub fn undefine(&self, flags: c_uint) -> Result<()> {
        // SAFETY: live domain.
        self.check(
            unsafe { (self.api().domain_undefine_flags)(self.ptr, flags) },
            "undefine",
        )
        .map(drop)
    }

    /// Start a backup job (pull mode: libvirt starts QEMU's NBD server).
    pub fn backup_begin(&self, backup_xml: &str, checkpoint_xml: Option<&str>) -> Result<()> {
        let b = cstring(backup_xml, "backup XML")?;
        let c = checkpoint_xml
            .map(|x| cstring(x, "checkpoint XML"))
            .transpose()?;
        let cp = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: valid C strings (or null for no checkpoint).
        self.check(
            unsafe { (self.api().backup_begin)(self.ptr, b.as_ptr(), cp, 0) },
            "begin backup",
        )
        .map(drop)
    }

    /// The running backup job's XML; `None` when no backup job runs.
    pub fn backup_xml(&self) -> Option<String> {
        // SAFETY: result is malloc'ed or null (no job).
        unsafe { owned_string((self.api().backup_get_xml_desc)(self.ptr, 0)) }
    }

    /// Abort the domain's job (ends a pull-mode backup).
    pub fn abort_job(&self) -> Result<()> {
        // SAFETY: live domain.
        self.check(
            unsafe { (self.api().domain_abort_job)(self.ptr) },
            "abort job",
        )
        .map(drop)
    }

    /// Freeze every guest file system through the guest agent; returns how many.
    pub fn fs_freeze(&self) -> Result<u32> {
        // SAFETY: no mount point list (all file systems).
        let n = self.check(
            unsafe { (self.api().fs_freeze)(self.ptr, std::ptr::null(), 0, 0) },
            "freeze guest file systems",
        )?;
        Ok(n as u32)
    }

    /// Thaw every guest file system; returns how many were thawed.
    pub fn fs_thaw(&self) -> Result<u32> {
        // SAFETY: no mount point list (all file systems).
        let n = self.check(
            unsafe { (self.api().fs_thaw)(self.ptr, std::ptr::null(), 0, 0) },
            "thaw guest file systems",
        )?;
        Ok(n as u32)
    }

    /// Create (or, with the REDEFINE flags, redefine) a checkpoint.
    pub fn checkpoint_create(&self, xml: &str, flags: c_uint) -> Result<Checkpoint<'_>> {
        let c = cstring(xml, "checkpoint XML")?;
        // SAFETY: valid C string.
        let ptr = unsafe { (self.api().checkpoint_create_xml)(self.ptr, c.as_ptr(), flags) };
        if ptr.is_null() {
            return Err(self.fail("create checkpoint"));
        }
        Ok(Checkpoint { ptr, dom: self })
    }

    /// The checkpoint called `name`; `Ok(None)` when the domain has none by that name.
    pub fn checkpoint(&self, name: &str) -> Result<Option<Checkpoint<'_>>> {
        let c = cstring(name, "checkpoint name")?;
        // SAFETY: valid C string.
        let ptr = unsafe { (self.api().checkpoint_lookup_by_name)(self.ptr, c.as_ptr(), 0) };
        if ptr.is_null() {
            let err = self.fail(&format!("look up checkpoint {name}"));
            if error_code(&err) == ERR_NO_DOMAIN_CHECKPOINT {
                return Ok(None);
            }
            return Err(err);
        }
        Ok(Some(Checkpoint { ptr, dom: self }))
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint<'_>>> {
        let mut list: *mut Cp = std::ptr::null_mut();
        // SAFETY: libvirt allocates the array; we free it and own each element.
        let n = self.check(
            unsafe { (self.api().list_all_checkpoints)(self.ptr, &mut list, 0) },
            "list checkpoints",
        )?;
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: i < n elements were returned.
            out.push(Checkpoint {
                ptr: unsafe { *list.add(i) },
                dom: self,
            });
        }
        // SAFETY: the array was malloc'ed by libvirt.
        unsafe { free(list.cast()) };
        Ok(out)
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { (self.api().domain_free)(self.ptr) };
    }
}

/// One checkpoint (`virDomainCheckpointPtr`).
pub struct Checkpoint<'d> {
    ptr: Cp,
    dom: &'d Domain<'d>,
}

impl Checkpoint<'_> {
    pub fn name(&self) -> String {
        // SAFETY: the name lives as long as the checkpoint object.
        unsafe {
            let p = (self.dom.api().checkpoint_get_name)(self.ptr);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    /// The checkpoint's XML without the domain definition in it.
    pub fn xml(&self) -> Result<String> {
        // SAFETY: result is malloc'ed.
        unsafe {
            owned_string((self.dom.api().checkpoint_get_xml_desc)(
                self.ptr,
                CHECKPOINT_XML_NO_DOMAIN,
            ))
        }
        .ok_or_else(|| self.dom.fail("read checkpoint XML"))
    }

    /// Delete the checkpoint; libvirt merges its bitmaps so no change is lost.
    pub fn delete(&self) -> Result<()> {
        // SAFETY: live checkpoint.
        let rc = unsafe { (self.dom.api().checkpoint_delete)(self.ptr, 0) };
        if rc < 0 {
            let err = self.dom.fail("delete checkpoint");
            return Err(err.context(format!("checkpoint {}", self.name())));
        }
        Ok(())
    }
}

impl Drop for Checkpoint<'_> {
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { (self.dom.api().checkpoint_free)(self.ptr) };
    }
}
