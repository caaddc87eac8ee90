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
//!
//! Deadlines (a stuck hypervisor never hangs vmbackup): every call that talks to
//! the daemon runs on a thread of its own and is waited for at most the
//! connection's `io_timeout`; one that does not return in time fails with a
//! message naming the libvirt function, and the connection is *abandoned*: every
//! later call on it fails at once, and its objects are never freed (the stuck
//! thread may still use them). libvirt's keepalive (an event loop thread, probes
//! every `io_timeout / 4`, 3 unanswered = dead) closes a connection whose daemon
//! stopped answering, which also releases the stuck thread.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

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
    set_keep_alive: unsafe extern "C" fn(Conn, c_int, c_uint) -> c_int,
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
    let register_events: unsafe extern "C" fn() -> c_int = sym!("virEventRegisterDefaultImpl");
    let run_events: unsafe extern "C" fn() -> c_int = sym!("virEventRunDefaultImpl");
    // SAFETY: plain calls into the freshly loaded library.
    unsafe {
        if init() < 0 {
            return Err("virInitialize failed".into());
        }
        set_error_func(std::ptr::null_mut(), quiet_errors);
        // The event loop keepalive needs; registered before any connection.
        if register_events() < 0 {
            return Err("virEventRegisterDefaultImpl failed".into());
        }
    }
    std::thread::Builder::new()
        .name("libvirt-events".into())
        // SAFETY: the default event loop, run from one thread as libvirt requires.
        .spawn(move || loop {
            if unsafe { run_events() } < 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .map_err(|e| format!("cannot start libvirt's event loop thread: {e}"))?;
    Ok(Api {
        connect_open: sym!("virConnectOpen"),
        connect_close: sym!("virConnectClose"),
        connect_is_alive: sym!("virConnectIsAlive"),
        connect_get_hostname: sym!("virConnectGetHostname"),
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
        set_keep_alive: sym!("virConnectSetKeepAlive"),
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

/// libvirt's message and code for a failed call, read on the thread that made it.
type Failure = (String, i32);

fn vir_error(what: impl Into<String>, (message, code): Failure) -> anyhow::Error {
    VirError {
        what: what.into(),
        message,
        code,
    }
    .into()
}

/// A libvirt object pointer handed to the thread that makes a call.
#[derive(Clone, Copy)]
struct Raw(*mut c_void);

// SAFETY: libvirt objects may be used from any thread; see `Connection::call`
// for why they outlive a call that times out.
unsafe impl Send for Raw {}

impl Raw {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the field).
    fn get(self) -> *mut c_void {
        self.0
    }
}

/// `rc < 0` → the calling thread's libvirt error.
fn checked(api: &Api, rc: c_int) -> std::result::Result<c_int, Failure> {
    if rc < 0 {
        Err(read_last_error(api))
    } else {
        Ok(rc)
    }
}

/// A malloc'ed string, or the calling thread's libvirt error when it is null.
///
/// # Safety
/// As [`owned_string`].
unsafe fn string_or_error(api: &Api, p: *mut c_char) -> std::result::Result<String, Failure> {
    owned_string(p).ok_or_else(|| read_last_error(api))
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
    /// How long a call may take (the rule's or system.conf's `io_timeout`).
    timeout: Duration,
    /// A call did not return in time: the connection is abandoned.
    stuck: AtomicBool,
}

// SAFETY: libvirt documents virConnectPtr as safe to use from several threads.
unsafe impl Send for Connection {}
unsafe impl Sync for Connection {}

impl Connection {
    /// Connect to `uri`; every call then waits at most `timeout` for the daemon.
    pub fn open(uri: &str, timeout: Duration) -> Result<Connection> {
        let api = api()?;
        let c = cstring(uri, "URI")?;
        let what = format!("cannot connect to libvirt at {uri}");
        let opened = bounded(timeout, "virConnectOpen", move || {
            // SAFETY: valid C string; returns null on failure.
            let ptr = unsafe { (api.connect_open)(c.as_ptr()) };
            if ptr.is_null() {
                Err(read_last_error(api))
            } else {
                Ok(Raw(ptr))
            }
        })
        .with_context(|| what.clone())?;
        let ptr = opened.map_err(|f| vir_error(what, f))?.get();
        // Keepalive: probes every timeout/4 s, the connection is closed after 3
        // unanswered ones (about the deadline of one call).
        let interval = (timeout.as_secs() / 4).clamp(1, i32::MAX as u64) as c_int;
        // SAFETY: live connection; a failure (e.g. a driver without keepalive) only
        // leaves the per-call deadlines.
        if unsafe { (api.set_keep_alive)(ptr, interval, 3) } < 0 {
            tracing::debug!(
                "libvirt keepalive not enabled for {uri}: {}",
                read_last_error(api).0
            );
        }
        Ok(Connection {
            ptr,
            api,
            timeout,
            stuck: AtomicBool::new(false),
        })
    }

    /// Run one libvirt call (`function`, for messages) on its own thread and wait
    /// at most the connection's timeout. On timeout the connection is marked
    /// abandoned: the thread may still be inside libvirt with this connection's
    /// objects, so none of them is freed from then on (see the `Drop`s).
    fn call<T: Send + 'static>(
        &self,
        function: &str,
        f: impl FnOnce(&'static Api) -> std::result::Result<T, Failure> + Send + 'static,
    ) -> Result<std::result::Result<T, Failure>> {
        if self.stuck.load(Ordering::SeqCst) {
            bail!(
                "{function} not called: an earlier libvirt call on this connection did not \
                 return within {} (io_timeout)",
                humantime::format_duration(self.timeout)
            );
        }
        let api = self.api;
        bounded(self.timeout, function, move || f(api)).inspect_err(|_| {
            self.stuck.store(true, Ordering::SeqCst);
        })
    }

    fn raw(&self) -> Raw {
        Raw(self.ptr)
    }

    pub fn is_alive(&self) -> bool {
        let c = self.raw();
        // SAFETY: live connection (a local check, no call to the daemon).
        !self.stuck.load(Ordering::SeqCst) && unsafe { (self.api.connect_is_alive)(c.get()) == 1 }
    }

    pub fn hostname(&self) -> Result<String> {
        let c = self.raw();
        self.call("virConnectGetHostname", move |api| {
            // SAFETY: live connection; result is malloc'ed.
            unsafe { string_or_error(api, (api.connect_get_hostname)(c.get())) }
        })?
        .map_err(|f| vir_error("cannot read the libvirt host name", f))
    }

    /// Every domain, running or not (persistent and transient).
    pub fn domains(&self) -> Result<Vec<Domain<'_>>> {
        let c = self.raw();
        let raws = self
            .call("virConnectListAllDomains", move |api| {
                let mut list: *mut Dom = std::ptr::null_mut();
                // SAFETY: libvirt allocates the array; we free it and own each element.
                let n = checked(api, unsafe {
                    (api.list_all_domains)(c.get(), &mut list, 0)
                })?;
                // SAFETY: n elements were returned; the array itself was malloc'ed.
                let raws = (0..n as usize)
                    .map(|i| Raw(unsafe { *list.add(i) }))
                    .collect::<Vec<_>>();
                unsafe { free(list.cast()) };
                Ok(raws)
            })?
            .map_err(|f| vir_error("cannot list domains", f))?;
        Ok(raws
            .into_iter()
            .map(|r| Domain {
                ptr: r.get(),
                conn: self,
            })
            .collect())
    }

    pub fn domain(&self, name: &str) -> Result<Domain<'_>> {
        let c = self.raw();
        let n = cstring(name, "domain name")?;
        let ptr = self
            .call("virDomainLookupByName", move |api| {
                // SAFETY: valid C string.
                let ptr = unsafe { (api.lookup_by_name)(c.get(), n.as_ptr()) };
                if ptr.is_null() {
                    Err(read_last_error(api))
                } else {
                    Ok(Raw(ptr))
                }
            })?
            .map_err(|f| vir_error(format!("no domain '{name}'"), f))?;
        Ok(Domain {
            ptr: ptr.get(),
            conn: self,
        })
    }

    /// Define a persistent domain from XML.
    pub fn define(&self, xml: &str) -> Result<Domain<'_>> {
        let c = self.raw();
        let x = cstring(xml, "domain XML")?;
        let ptr = self
            .call("virDomainDefineXML", move |api| {
                // SAFETY: valid C string.
                let ptr = unsafe { (api.define_xml)(c.get(), x.as_ptr()) };
                if ptr.is_null() {
                    Err(read_last_error(api))
                } else {
                    Ok(Raw(ptr))
                }
            })?
            .map_err(|f| vir_error("cannot define the domain", f))?;
        Ok(Domain {
            ptr: ptr.get(),
            conn: self,
        })
    }

    fn abandoned(&self) -> bool {
        self.stuck.load(Ordering::SeqCst)
    }
}

/// Run `f` on a new thread and wait at most `timeout` for it; the error names
/// `function`. A thread that times out is left to finish (or block) on its own.
fn bounded<T: Send + 'static>(
    timeout: Duration,
    function: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("libvirt-call".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .with_context(|| format!("cannot start a thread for {function}"))?;
    match rx.recv_timeout(timeout) {
        Ok(v) => Ok(v),
        Err(mpsc::RecvTimeoutError::Timeout) => bail!(
            "libvirt did not answer {function} within {} (io_timeout): the daemon or the \
             hypervisor is stuck; run `vmbackup cleanup` once it answers again",
            humantime::format_duration(timeout)
        ),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            bail!("the thread calling {function} ended without an answer")
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.abandoned() {
            return; // a stuck call may still use it (and closing would block)
        }
        let c = self.raw();
        let api = self.api;
        // SAFETY: we own one reference; closing talks to the daemon: bounded too.
        let _ = bounded(self.timeout, "virConnectClose", move || unsafe {
            (api.connect_close)(c.get())
        });
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

    /// One call to the daemon about this domain (see [`Connection::call`]);
    /// `what` says what failed in the error.
    fn call<T: Send + 'static>(
        &self,
        function: &str,
        what: &str,
        f: impl FnOnce(&'static Api, Dom) -> std::result::Result<T, Failure> + Send + 'static,
    ) -> Result<T> {
        let d = Raw(self.ptr);
        self.conn
            .call(function, move |api| f(api, d.get()))
            .with_context(|| format!("domain '{}': {what}", self.name()))?
            .map_err(|f| vir_error(format!("domain '{}': {what} ({function})", self.name()), f))
    }

    /// A call returning an int status (`< 0` fails).
    fn call_rc(
        &self,
        function: &str,
        what: &str,
        f: impl FnOnce(&'static Api, Dom) -> c_int + Send + 'static,
    ) -> Result<c_int> {
        self.call(function, what, move |api, d| checked(api, f(api, d)))
    }

    pub fn name(&self) -> String {
        // SAFETY: the name lives as long as the domain object (local, no call).
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
        // SAFETY: VIR_UUID_STRING_BUFLEN is 37 (local, no call to the daemon).
        let rc = unsafe { (self.api().domain_get_uuid_string)(self.ptr, buf.as_mut_ptr()) };
        checked(self.api(), rc)
            .map_err(|f| vir_error(format!("domain '{}': read UUID", self.name()), f))?;
        // SAFETY: libvirt wrote a NUL-terminated string.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    pub fn state(&self) -> Result<DomainState> {
        let state = self.call("virDomainGetState", "read state", |api, d| {
            let (mut state, mut reason) = (0, 0);
            // SAFETY: out-pointers to locals.
            checked(api, unsafe {
                (api.domain_get_state)(d, &mut state, &mut reason, 0)
            })?;
            Ok(state)
        })?;
        // SAFETY: live domain.
        let persistent = self.call_rc(
            "virDomainIsPersistent",
            "read persistence",
            |api, d| unsafe { (api.domain_is_persistent)(d) },
        )? == 1;
        Ok(DomainState { state, persistent })
    }

    /// The domain XML without secure fields (no passwords: no VIR_DOMAIN_XML_SECURE).
    pub fn xml(&self, flags: c_uint) -> Result<String> {
        self.call("virDomainGetXMLDesc", "read domain XML", move |api, d| {
            // SAFETY: result is malloc'ed.
            unsafe { string_or_error(api, (api.domain_get_xml_desc)(d, flags)) }
        })
    }

    /// A disk's virtual size in bytes (by target, e.g. `vda`).
    pub fn disk_capacity(&self, target: &str) -> Result<u64> {
        let c = cstring(target, "disk target")?;
        self.call(
            "virDomainGetBlockInfo",
            &format!("read size of disk {target}"),
            move |api, d| {
                let mut info = BlockInfo {
                    capacity: 0,
                    allocation: 0,
                    physical: 0,
                };
                // SAFETY: out-pointer to a repr(C) struct of libvirt's layout.
                checked(api, unsafe {
                    (api.domain_get_block_info)(d, c.as_ptr(), &mut info, 0)
                })?;
                Ok(info.capacity)
            },
        )
    }

    pub fn start(&self) -> Result<()> {
        // SAFETY: live domain.
        self.call_rc("virDomainCreate", "start", |api, d| unsafe {
            (api.domain_create)(d)
        })
        .map(drop)
    }

    pub fn destroy(&self) -> Result<()> {
        // SAFETY: live domain.
        self.call_rc("virDomainDestroy", "stop", |api, d| unsafe {
            (api.domain_destroy)(d)
        })
        .map(drop)
    }

    pub fn undefine(&self, flags: c_uint) -> Result<()> {
        // SAFETY: live domain.
        self.call_rc("virDomainUndefineFlags", "undefine", move |api, d| unsafe {
            (api.domain_undefine_flags)(d, flags)
        })
        .map(drop)
    }

    /// Start a backup job (pull mode: libvirt starts QEMU's NBD server).
    pub fn backup_begin(&self, backup_xml: &str, checkpoint_xml: Option<&str>) -> Result<()> {
        let b = cstring(backup_xml, "backup XML")?;
        let c = checkpoint_xml
            .map(|x| cstring(x, "checkpoint XML"))
            .transpose()?;
        self.call_rc("virDomainBackupBegin", "begin backup", move |api, d| {
            let cp = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
            // SAFETY: valid C strings (or null for no checkpoint).
            unsafe { (api.backup_begin)(d, b.as_ptr(), cp, 0) }
        })
        .map(drop)
    }

    /// The running backup job's XML; `None` when no backup job runs.
    pub fn backup_xml(&self) -> Result<Option<String>> {
        self.call(
            "virDomainBackupGetXMLDesc",
            "read the backup job",
            |api, d| {
                // SAFETY: result is malloc'ed or null (no job).
                Ok(unsafe { owned_string((api.backup_get_xml_desc)(d, 0)) })
            },
        )
    }

    /// Abort the domain's job (ends a pull-mode backup).
    pub fn abort_job(&self) -> Result<()> {
        // SAFETY: live domain.
        self.call_rc("virDomainAbortJob", "abort job", |api, d| unsafe {
            (api.domain_abort_job)(d)
        })
        .map(drop)
    }

    /// Freeze every guest file system through the guest agent; returns how many.
    pub fn fs_freeze(&self) -> Result<u32> {
        // SAFETY: no mount point list (all file systems).
        let n = self.call_rc(
            "virDomainFSFreeze",
            "freeze guest file systems",
            |api, d| unsafe { (api.fs_freeze)(d, std::ptr::null(), 0, 0) },
        )?;
        Ok(n as u32)
    }

    /// Thaw every guest file system; returns how many were thawed.
    pub fn fs_thaw(&self) -> Result<u32> {
        // SAFETY: no mount point list (all file systems).
        let n = self.call_rc(
            "virDomainFSThaw",
            "thaw guest file systems",
            |api, d| unsafe { (api.fs_thaw)(d, std::ptr::null(), 0, 0) },
        )?;
        Ok(n as u32)
    }

    /// Create (or, with the REDEFINE flags, redefine) a checkpoint.
    pub fn checkpoint_create(&self, xml: &str, flags: c_uint) -> Result<Checkpoint<'_>> {
        let c = cstring(xml, "checkpoint XML")?;
        let ptr = self.call(
            "virDomainCheckpointCreateXML",
            "create checkpoint",
            move |api, d| {
                // SAFETY: valid C string.
                let ptr = unsafe { (api.checkpoint_create_xml)(d, c.as_ptr(), flags) };
                if ptr.is_null() {
                    Err(read_last_error(api))
                } else {
                    Ok(Raw(ptr))
                }
            },
        )?;
        Ok(Checkpoint {
            ptr: ptr.get(),
            dom: self,
        })
    }

    /// The checkpoint called `name`; `Ok(None)` when the domain has none by that name.
    pub fn checkpoint(&self, name: &str) -> Result<Option<Checkpoint<'_>>> {
        let c = cstring(name, "checkpoint name")?;
        let found = self.call(
            "virDomainCheckpointLookupByName",
            &format!("look up checkpoint {name}"),
            move |api, d| {
                // SAFETY: valid C string.
                let ptr = unsafe { (api.checkpoint_lookup_by_name)(d, c.as_ptr(), 0) };
                if !ptr.is_null() {
                    return Ok(Some(Raw(ptr)));
                }
                let failure = read_last_error(api);
                if failure.1 == ERR_NO_DOMAIN_CHECKPOINT {
                    Ok(None)
                } else {
                    Err(failure)
                }
            },
        )?;
        Ok(found.map(|r| Checkpoint {
            ptr: r.get(),
            dom: self,
        }))
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint<'_>>> {
        let raws = self.call(
            "virDomainListAllCheckpoints",
            "list checkpoints",
            |api, d| {
                let mut list: *mut Cp = std::ptr::null_mut();
                // SAFETY: libvirt allocates the array; we free it and own each element.
                let n = checked(api, unsafe { (api.list_all_checkpoints)(d, &mut list, 0) })?;
                // SAFETY: n elements were returned; the array was malloc'ed.
                let raws = (0..n as usize)
                    .map(|i| Raw(unsafe { *list.add(i) }))
                    .collect::<Vec<_>>();
                unsafe { free(list.cast()) };
                Ok(raws)
            },
        )?;
        Ok(raws
            .into_iter()
            .map(|r| Checkpoint {
                ptr: r.get(),
                dom: self,
            })
            .collect())
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        if self.conn.abandoned() {
            return; // a stuck call may still use it
        }
        // SAFETY: we own one reference (local, no call to the daemon).
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

    /// One call to the daemon about this checkpoint (see [`Connection::call`]).
    fn call<T: Send + 'static>(
        &self,
        function: &str,
        what: &str,
        f: impl FnOnce(&'static Api, Cp) -> std::result::Result<T, Failure> + Send + 'static,
    ) -> Result<T> {
        let c = Raw(self.ptr);
        let what = format!(
            "domain '{}': {what} {} ({function})",
            self.dom.name(),
            self.name()
        );
        self.dom
            .conn
            .call(function, move |api| f(api, c.get()))
            .with_context(|| what.clone())?
            .map_err(|f| vir_error(what, f))
    }

    /// The checkpoint's XML without the domain definition in it.
    pub fn xml(&self) -> Result<String> {
        self.call(
            "virDomainCheckpointGetXMLDesc",
            "read checkpoint XML of",
            |api, c| {
                // SAFETY: result is malloc'ed.
                unsafe {
                    string_or_error(
                        api,
                        (api.checkpoint_get_xml_desc)(c, CHECKPOINT_XML_NO_DOMAIN),
                    )
                }
            },
        )
    }

    /// Delete the checkpoint; libvirt merges its bitmaps so no change is lost.
    pub fn delete(&self) -> Result<()> {
        self.call(
            "virDomainCheckpointDelete",
            "delete checkpoint",
            |api, c| {
                // SAFETY: live checkpoint.
                checked(api, unsafe { (api.checkpoint_delete)(c, 0) })
            },
        )
        .map(drop)
    }
}

impl Drop for Checkpoint<'_> {
    fn drop(&mut self) {
        if self.dom.conn.abandoned() {
            return; // a stuck call may still use it
        }
        // SAFETY: we own one reference (local, no call to the daemon).
        unsafe { (self.dom.api().checkpoint_free)(self.ptr) };
    }
}
