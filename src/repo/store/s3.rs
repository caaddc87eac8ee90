//! [`S3Store`]: a [`Store`] in a bucket of an S3-compatible object store (AWS,
//! Ceph RGW, SeaweedFS, Garage, MinIO), through `object_store`'s S3 client.
//!
//! A key is an object name under the target's prefix in the bucket. How each
//! operation maps to S3 is in docs/FORMAT.md ("Store operations"):
//!
//! - reads: `GetObject` (ranged for [`Store::get_range`]), `HeadObject`;
//! - writes: one `PutObject`, or a multipart upload with parts in flight for
//!   objects of [`MULTIPART_THRESHOLD`] bytes and more; an object is visible
//!   whole or not at all, so nothing needs rename;
//! - put-if-absent: `If-None-Match: *` *only* when this server was seen to
//!   honour it (probed once per store, [`S3Store::conditional_writes`]);
//!   otherwise (Garage ignores the header) a `HeadObject` first, then the put.
//!   The check-then-put fallback can replace an object created at the same
//!   moment by another writer, which is harmless for every use of
//!   put-if-absent (FORMAT.md): correctness never relies on the header;
//! - deferred puts: uploads in flight on the store's runtime, bounded in count
//!   and bytes (a writer waits for room), awaited by [`Store::flush`];
//! - listings: `ListObjectsV2` page by page, each page handed to the visitor;
//! - partial writes: multipart uploads older than an age, listed with
//!   `ListMultipartUploads` and aborted.
//!
//! Every request has a connect timeout and a total timeout and is retried with
//! exponential backoff on 5xx, timeouts and connection errors, within a bounded
//! time; after that the operation fails (a backup then fails cleanly).
//!
//! Credentials (AWS shared-credentials file, or `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`) are read when the store is
//! opened; they are never stored, logged or printed (this type's `Debug` shows
//! the location only).
//!
//! The `Store` trait is synchronous; requests run on one process-wide tokio
//! runtime and callers wait on a channel, so it works from plain threads and
//! from inside other runtimes alike.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{
    BackoffConfig, Certificate, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};
use serde::{Deserialize, Serialize};

use super::{check_key, ObjectInfo, Store};
use crate::error::invalid;

/// Objects of this size and larger are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// Size of each part of a multipart upload (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Deferred uploads in flight per store, at most.
const MAX_INFLIGHT: usize = 32;
/// Bytes of deferred uploads in flight per store, at most (bounds memory).
const MAX_INFLIGHT_BYTES: usize = 128 * 1024 * 1024;
/// Connecting to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One request, start to end (a 32 MiB part over a slow link fits).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Retries of one request (5xx, timeouts, connection errors), and the time
/// after which no further retry starts.
const MAX_RETRIES: usize = 5;
const RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the S3 credentials come from (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum S3Credentials {
    /// An AWS shared-credentials file and the profile in it.
    File { path: PathBuf, profile: String },
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`)
    /// of the process that opens the target.
    Environment,
}

impl fmt::Display for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::File { path, profile } => {
                write!(f, "file {} [{profile}]", path.display())
            }
            S3Credentials::Environment => write!(f, "environment"),
        }
    }
}

/// An S3 target: endpoint, bucket, prefix and how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Spec {
    /// `https://host:port` (or `http://` to loopback, or with `allow_http`).
    pub endpoint: String,
    pub bucket: String,
    /// Key prefix inside the bucket: `""` or `/`-separated names (no slashes at the ends).
    pub prefix: String,
    pub region: String,
    pub credentials: S3Credentials,
    /// A PEM file of extra CA certificates to trust.
    pub ca_file: Option<PathBuf>,
    /// Plain HTTP to a host that is not loopback.
    pub allow_http: bool,
}

impl S3Spec {
    /// `s3://bucket/prefix at https://host:port`.
    pub fn location(&self) -> String {
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("/{}", self.prefix)
        };
        format!("s3://{}{prefix} at {}", self.bucket, self.endpoint)
    }

    /// Check the fields a user gave (`target add --s3 ...`): one-line usage
    /// errors naming the option.
    pub fn check(&self) -> Result<()> {
        let url = reqwest::Url::parse(&self.endpoint).map_err(|e| {
            invalid(
                "--s3",
                &self.endpoint,
                format!("expected https://HOST[:PORT] ({e})"),
            )
        })?;
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err(invalid(
                "--s3",
                &self.endpoint,
                "expected https://HOST[:PORT] without a path, query or user (the bucket goes in --bucket)",
            ));
        }
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http || is_loopback(&url) => {}
            "http" => {
                return Err(invalid(
                    "--s3",
                    &self.endpoint,
                    "plain http is allowed only to a loopback address; use https, or --allow-http to send data unencrypted over the network",
                ))
            }
            _ => return Err(invalid("--s3", &self.endpoint, "expected an https:// URL")),
        }
        let bucket_ok = (3..=63).contains(&self.bucket.len())
            && self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !self.bucket.starts_with(['-', '.'])
            && !self.bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(invalid(
                "--bucket",
                &self.bucket,
                "expected an S3 bucket name: 3-63 of a-z 0-9 - . (starting and ending with a letter or digit)",
            ));
        }
        if !self.prefix.is_empty() && check_key(&self.prefix).is_err() {
            return Err(invalid(
                "--prefix",
                &self.prefix,
                "expected '/'-separated names of A-Z a-z 0-9 . _ % - (none empty or starting with '.')",
            ));
        }
        if self.region.is_empty() || !self.region.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "--region",
                &self.region,
                "expected a region name like us-east-1",
            ));
        }
        Ok(())
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Access key, secret and session token, as read at open.
struct Secret {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// Read the credentials `how` names. Errors name the file and profile, never
/// a value.
fn read_credentials(how: &S3Credentials) -> Result<Secret> {
    match how {
        S3Credentials::Environment => {
            let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
            let key_id = var("AWS_ACCESS_KEY_ID")
                .context("S3 credentials from the environment: AWS_ACCESS_KEY_ID is not set")?;
            let secret = var("AWS_SECRET_ACCESS_KEY")
                .context("S3 credentials from the environment: AWS_SECRET_ACCESS_KEY is not set")?;
            Ok(Secret {
                key_id,
                secret,
                token: var("AWS_SESSION_TOKEN"),
            })
        }
        S3Credentials::File { path, profile } => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read S3 credentials file {}", path.display()))?;
            warn_if_readable_by_others(path);
            parse_credentials(&text, profile).with_context(|| {
                format!("S3 credentials file {} profile [{profile}]", path.display())
            })
        }
    }
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "S3 credentials file {} is readable by other users (mode {:o}); chmod 600 it",
                path.display(),
                m.permissions().mode() & 0o777
            );
        }
    }
}

/// Parse an AWS shared-credentials file (INI: `[profile]`, `key = value`,
/// `#`/`;` comments) and take one profile's keys.
fn parse_credentials(text: &str, profile: &str) -> Result<Secret> {
    let mut section: Option<String> = None;
    let mut found = false;
    let mut values: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            let name = name.strip_prefix("profile ").unwrap_or(name).trim();
            section = Some(name.to_string());
            found |= name == profile;
            continue;
        }
        if section.as_deref() != Some(profile) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            values.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    if !found {
        bail!("no such profile");
    }
    let take = |k: &str| values.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(Secret {
        key_id: take("aws_access_key_id").context("aws_access_key_id is missing")?,
        secret: take("aws_secret_access_key").context("aws_secret_access_key is missing")?,
        token: take("aws_session_token"),
    })
}

/// The runtime every S3 request runs on (module docs).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("vmbackup-s3")
            .enable_all()
            .build()
            .expect("cannot start the S3 client runtime")
    })
}

/// Run `fut` on the S3 runtime and wait for it, from any thread.
fn block<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().expect("the S3 client runtime stopped")
}

/// Deferred uploads of one store.
#[derive(Debug, Default)]
struct Inflight {
    /// Keys being uploaded (with how many uploads of each).
    keys: HashMap<String, usize>,
    bytes: usize,
    /// The first failure, reported by every later submit and flush.
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Uploads {
    state: Mutex<Inflight>,
    changed: Condvar,
}

/// A store in an S3 bucket (module docs).
pub struct S3Store {
    s3: Arc<AmazonS3>,
    /// For the requests `object_store` lacks (`ListMultipartUploads`).
    http: reqwest::Client,
    /// `""` or ends with `/`.
    root: String,
    location: String,
    /// Whether the server honours `If-None-Match: *` (probed on first need).
    conditional: OnceLock<bool>,
    uploads: Arc<Uploads>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// An `object_store` error as a one-line cause.
fn s3_err(e: object_store::Error) -> anyhow::Error {
    anyhow!("{e}")
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3Store {
    /// Open the bucket `spec` names with its credentials (read now). Nothing
    /// is sent yet: [`S3Store::check_access`] lists the bucket.
    pub fn open(spec: &S3Spec) -> Result<S3Store> {
        spec.check()?;
        // reqwest is built without a default TLS provider: ring it is.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let secret = read_credentials(&spec.credentials)?;
        let mut options = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_allow_http(spec.endpoint.starts_with("http://"));
        let mut http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if let Some(ca) = &spec.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read CA file {}", ca.display()))?;
            let bad = |e: &dyn fmt::Display| anyhow!("CA file {}: {e}", ca.display());
            for cert in Certificate::from_pem_bundle(&pem).map_err(|e| bad(&e))? {
                options = options.with_root_certificate(cert);
            }
            http = http
                .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(&e))?);
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
        };
        let mut builder = AmazonS3Builder::new()
            .with_endpoint(spec.endpoint.trim_end_matches('/'))
            .with_bucket_name(&spec.bucket)
            .with_region(&spec.region)
            .with_access_key_id(&secret.key_id)
            .with_secret_access_key(&secret.secret)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(spec.endpoint.starts_with("http://"))
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(retry)
            .with_client_options(options);
        if let Some(token) = &secret.token {
            builder = builder.with_token(token);
        }
        let s3 = builder
            .build()
            .map_err(|e| anyhow!("S3 target {}: {e}", spec.location()))?;
        let http = http.build().context("cannot build the HTTP client")?;
        Ok(S3Store {
            s3: Arc::new(s3),
            http,
            root: if spec.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", spec.prefix)
            },
            location: spec.location(),
            conditional: OnceLock::new(),
            uploads: Arc::new(Uploads::default()),
        })
    }

    /// List (one key of) the bucket: checks endpoint, bucket and credentials.
    pub fn check_access(&self) -> Result<()> {
        let s3 = self.s3.clone();
        let prefix = self.root.clone();
        block(async move {
            let opts = PaginatedListOptions {
                max_keys: Some(1),
                ..Default::default()
            };
            s3.list_paginated(Some(&prefix), opts).await.map(|_| ())
        })
        .map_err(|e| anyhow!("cannot list {}: {e}", self.location))
    }

    /// True when the server honours `If-None-Match: *` on PutObject. Probed
    /// once per store: a hidden probe object is created twice with the header
    /// (the second must be refused), then deleted.
    pub fn conditional_writes(&self) -> Result<bool> {
        if let Some(known) = self.conditional.get() {
            return Ok(*known);
        }
        let key = format!(
            "{}.vmbackup-probe-{}-{:016x}",
            self.root,
            std::process::id(),
            super::unique_u64()
        );
        let path = ObjectPath::parse(&key).map_err(|e| anyhow!("{e}"))?;
        let s3 = self.s3.clone();
        let honoured = block(async move {
            let create = || PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            let first = s3
                .put_opts(&path, PutPayload::from_static(b"1"), create())
                .await;
            let second = match first {
                Ok(_) => {
                    s3.put_opts(&path, PutPayload::from_static(b"2"), create())
                        .await
                }
                Err(e) => Err(e),
            };
            let _ = s3.delete(&path).await;
            match second {
                Ok(_) => Ok(false),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(true),
                // A server that refuses the header outright.
                Err(object_store::Error::NotImplemented { .. })
                | Err(object_store::Error::NotSupported { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| anyhow!("cannot probe conditional writes on {}: {e}", self.location))?;
        if !honoured {
            tracing::info!(
                "S3 target {} ignores If-None-Match: put-if-absent checks for the object first",
                self.location
            );
        }
        Ok(*self.conditional.get_or_init(|| honoured))
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        check_key(key)?;
        ObjectPath::parse(format!("{}{key}", self.root)).map_err(|e| anyhow!("key {key}: {e}"))
    }

    /// The store's key of an object name in the bucket, if it is one of ours.
    fn key_of(&self, name: &str) -> Option<String> {
        let key = name.strip_prefix(&self.root)?;
        check_key(key).ok()?;
        Some(key.to_string())
    }

    fn head(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        match block(async move { s3.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => {
                Err(s3_err(e)).with_context(|| format!("cannot stat {key} in {}", self.location))
            }
        }
    }

    /// Upload `bytes` to `key` (replacing), in parts when large.
    async fn upload(s3: Arc<AmazonS3>, path: ObjectPath, bytes: Vec<u8>) -> Result<()> {
        if bytes.len() < MULTIPART_THRESHOLD {
            s3.put(&path, PutPayload::from(bytes))
                .await
                .map_err(s3_err)?;
            return Ok(());
        }
        let id = s3.create_multipart(&path).await.map_err(s3_err)?;
        let bytes = bytes::Bytes::from(bytes);
        let mut parts = tokio::task::JoinSet::new();
        for (i, start) in (0..bytes.len()).step_by(PART_SIZE).enumerate() {
            let (s3, path, id) = (s3.clone(), path.clone(), id.clone());
            let part = bytes.slice(start..(start + PART_SIZE).min(bytes.len()));
            parts.spawn(async move {
                let r = s3.put_part(&path, &id, i, PutPayload::from(part)).await;
                (i, r)
            });
        }
        let mut ids = Vec::new();
        let mut failed = None;
        while let Some(done) = parts.join_next().await {
            match done {
                Ok((i, Ok(part))) => ids.push((i, part)),
                Ok((_, Err(e))) => {
                    failed.get_or_insert(s3_err(e));
                }
                Err(e) => {
                    failed.get_or_insert(anyhow!("upload part task failed: {e}"));
                }
            }
        }
        if let Some(e) = failed {
            let _ = s3.abort_multipart(&path, &id).await;
            return Err(e.context("multipart upload failed"));
        }
        ids.sort_by_key(|(i, _)| *i);
        let parts = ids.into_iter().map(|(_, p)| p).collect();
        if let Err(e) = s3.complete_multipart(&path, &id, parts).await {
            let _ = s3.abort_multipart(&path, &id).await;
            return Err(s3_err(e).context("cannot complete multipart upload"));
        }
        Ok(())
    }

    /// put-if-absent (module docs); true when this call created the object.
    async fn create(
        s3: Arc<AmazonS3>,
        path: ObjectPath,
        bytes: Vec<u8>,
        conditional: bool,
    ) -> Result<bool> {
        if conditional && bytes.len() < MULTIPART_THRESHOLD {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            return match s3.put_opts(&path, PutPayload::from(bytes), opts).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(false),
                Err(e) => Err(s3_err(e)),
            };
        }
        match s3.head(&path).await {
            Ok(_) => return Ok(false),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(s3_err(e)),
        }
        Self::upload(s3, path, bytes).await?;
        Ok(true)
    }

    /// Incomplete multipart uploads under `prefix` (full object names): key,
    /// upload id, initiated.
    fn multipart_uploads(&self, prefix: &str) -> Result<Vec<(String, String, SystemTime)>> {
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut query = vec![
                ("uploads".to_string(), String::new()),
                ("prefix".to_string(), prefix.to_string()),
            ];
            if let Some((k, u)) = &markers {
                query.push(("key-marker".into(), k.clone()));
                query.push(("upload-id-marker".into(), u.clone()));
            }
            let s3 = self.s3.clone();
            let url = block(async move {
                let opts = SignedUrlOptions::default().with_query(query);
                s3.signed_url_opts(
                    http::Method::GET,
                    &ObjectPath::default(),
                    Duration::from_secs(300),
                    &opts,
                )
                .await
            })
            .map_err(s3_err)?;
            let http = self.http.clone();
            let text = block(async move {
                let resp = http.get(url).send().await?.error_for_status()?;
                resp.text().await
            })
            .map_err(|e| anyhow!("ListMultipartUploads: {e}"))?;
            for upload in xml_blocks(&text, "Upload") {
                let (Some(key), Some(id)) =
                    (xml_value(upload, "Key"), xml_value(upload, "UploadId"))
                else {
                    continue;
                };
                let initiated = xml_value(upload, "Initiated")
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                    .map(SystemTime::from)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((key, id, initiated));
            }
            if xml_value(&text, "IsTruncated").as_deref() != Some("true") {
                return Ok(out);
            }
            match (
                xml_value(&text, "NextKeyMarker"),
                xml_value(&text, "NextUploadIdMarker"),
            ) {
                (Some(k), Some(u)) if markers.as_ref() != Some(&(k.clone(), u.clone())) => {
                    markers = Some((k, u))
                }
                _ => return Ok(out),
            }
        }
    }
}

/// The contents of every `<tag>...</tag>` in `xml` (flat, no attributes).
fn xml_blocks<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// The text of the first `<tag>` in `xml`, XML entities decoded.
fn xml_value(xml: &str, tag: &str) -> Option<String> {
    let raw = *xml_blocks(xml, tag).first()?;
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

impl Store for S3Store {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        let got = block(async move {
            match s3.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map(|b| b.map(|b| b.to_vec()))
            .map_err(s3_err)
            .with_context(|| format!("cannot read {key} from {}", self.location))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
        if len == 0 {
            return Ok(self.head(key)?.then(Vec::new));
        }
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        let got = block(async move {
            let meta = match s3.head(&path).await {
                Ok(m) => m,
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let end = offset.saturating_add(len).min(meta.size);
            if offset >= end {
                return Ok(Some(bytes::Bytes::new()));
            }
            match s3.get_range(&path, offset..end).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map(|b| b.map(|b| b.to_vec()))
            .map_err(s3_err)
            .with_context(|| format!("cannot read {key} from {}", self.location))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let pending = self
            .uploads
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .contains_key(key);
        if pending {
            return Ok(true);
        }
        self.head(key)
    }

    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let path = self.path(key)?;
        let conditional = self.conditional_writes()?;
        let (s3, bytes) = (self.s3.clone(), bytes.to_vec());
        block(Self::create(s3, path, bytes, conditional))
            .with_context(|| format!("cannot write {key} to {}", self.location))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let (s3, bytes) = (self.s3.clone(), bytes.to_vec());
        block(Self::upload(s3, path, bytes))
            .with_context(|| format!("cannot write {key} to {}", self.location))
    }

    fn put_if_absent_deferred(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        let conditional = self.conditional_writes()?;
        let size = bytes.len();
        {
            let mut st = self
                .uploads
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(e) = &st.error {
                    bail!("an earlier upload to {} failed: {e}", self.location);
                }
                let count: usize = st.keys.values().sum();
                if count == 0 || (count < MAX_INFLIGHT && st.bytes + size <= MAX_INFLIGHT_BYTES) {
                    break;
                }
                st = self
                    .uploads
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            *st.keys.entry(key.to_string()).or_default() += 1;
            st.bytes += size;
        }
        let (s3, uploads, key, location) = (
            self.s3.clone(),
            self.uploads.clone(),
            key.to_string(),
            self.location.clone(),
        );
        runtime().spawn(async move {
            let result = Self::create(s3, path, bytes, conditional).await;
            let mut st = uploads.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = result {
                st.error
                    .get_or_insert(format!("cannot write {key} to {location}: {e:#}"));
            }
            if let Some(n) = st.keys.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    st.keys.remove(&key);
                }
            }
            st.bytes -= size;
            uploads.changed.notify_all();
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self
            .uploads
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !st.keys.is_empty() {
            st = self
                .uploads
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match &st.error {
            Some(e) => Err(anyhow!("{e}")),
            None => Ok(()),
        }
    }

    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectInfo) -> Result<()>) -> Result<()> {
        let full = format!("{}{prefix}", self.root);
        let mut token: Option<String> = None;
        loop {
            let (s3, full2, tok) = (self.s3.clone(), full.clone(), token.take());
            let page = block(async move {
                let opts = PaginatedListOptions {
                    page_token: tok,
                    ..Default::default()
                };
                s3.list_paginated(Some(&full2), opts).await
            })
            .map_err(s3_err)
            .with_context(|| format!("cannot list {full} in {}", self.location))?;
            for meta in page.result.objects {
                let Some(key) = self.key_of(meta.location.as_ref()) else {
                    continue;
                };
                if !key.starts_with(prefix) {
                    continue;
                }
                each(ObjectInfo {
                    key,
                    size: meta.size,
                    modified: meta.last_modified.into(),
                })?;
            }
            match page.page_token {
                Some(t) => token = Some(t),
                None => return Ok(()),
            }
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        match block(async move { s3.delete(&path).await }) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => {
                Err(s3_err(e)).with_context(|| format!("cannot delete {key} in {}", self.location))
            }
        }
    }

    fn remove_stale_partials(&self, prefix: &str, min_age: Duration) -> Result<Vec<String>> {
        let now = SystemTime::now();
        let mut removed = Vec::new();
        let full = format!("{}{prefix}", self.root);
        for (name, id, initiated) in self.multipart_uploads(&full)? {
            let old = now
                .duration_since(initiated)
                .is_ok_and(|age| age >= min_age);
            if !old {
                continue;
            }
            let path = ObjectPath::parse(&name).map_err(|e| anyhow!("{e}"))?;
            let (s3, id2) = (self.s3.clone(), id.clone());
            match block(async move { s3.abort_multipart(&path, &id2).await }) {
                Ok(()) => removed.push(format!("incomplete multipart upload of {name} ({id})")),
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(s3_err(e)).with_context(|| format!("cannot abort upload of {name}"))
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(endpoint: &str) -> S3Spec {
        S3Spec {
            endpoint: endpoint.into(),
            bucket: "backups".into(),
            prefix: String::new(),
            region: "us-east-1".into(),
            credentials: S3Credentials::Environment,
            ca_file: None,
            allow_http: false,
        }
    }

    #[test]
    fn endpoints_are_checked_plain_http_only_to_loopback() {
        spec("https://s3.example.net:9000").check().unwrap();
        spec("http://127.0.0.1:8333").check().unwrap();
        spec("http://[::1]:8333").check().unwrap();
        spec("http://localhost:8333").check().unwrap();
        let err = spec("http://s3.example.net")
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--s3") && err.contains("--allow-http"),
            "{err}"
        );
        let mut allowed = spec("http://s3.example.net");
        allowed.allow_http = true;
        allowed.check().unwrap();
        for bad in ["ftp://x", "https://h/bucket", "nonsense", "https://u:p@h"] {
            assert!(spec(bad).check().is_err(), "{bad}");
        }
        let mut b = spec("https://h");
        b.bucket = "Bad_Bucket".into();
        assert!(b.check().unwrap_err().to_string().contains("--bucket"));
        b.bucket = "ok-bucket".into();
        b.prefix = "../x".into();
        assert!(b.check().unwrap_err().to_string().contains("--prefix"));
    }

    #[test]
    fn credentials_files_are_parsed_by_profile() {
        let text = "# c\n[default]\naws_access_key_id = A1\naws_secret_access_key=S1\n\n[profile backup]\n; x\naws_access_key_id = A2\naws_secret_access_key = S2\naws_session_token = T2\n";
        let d = parse_credentials(text, "default").unwrap();
        assert_eq!(
            (d.key_id.as_str(), d.secret.as_str(), d.token),
            ("A1", "S1", None)
        );
        let b = parse_credentials(text, "backup").unwrap();
        assert_eq!((b.key_id.as_str(), b.token.as_deref()), ("A2", Some("T2")));
        let err = parse_credentials(text, "none").err().unwrap().to_string();
        assert!(err.contains("no such profile"), "{err}");
        let err = parse_credentials("[x]\naws_access_key_id = A\n", "x")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("aws_secret_access_key"), "{err}");
        assert!(
            !err.contains('A') || !err.contains("= A"),
            "no values in errors"
        );
    }

    #[test]
    fn multipart_upload_listings_are_parsed() {
        let xml = "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated><Upload><Key>p/a&amp;b</Key><UploadId>u1</UploadId><Initiated>2026-01-01T00:00:00.000Z</Initiated></Upload><Upload><Key>p/c</Key><UploadId>u2</UploadId></Upload></ListMultipartUploadsResult>";
        let ups = xml_blocks(xml, "Upload");
        assert_eq!(ups.len(), 2);
        assert_eq!(xml_value(ups[0], "Key").as_deref(), Some("p/a&b"));
        assert_eq!(xml_value(ups[1], "UploadId").as_deref(), Some("u2"));
        assert_eq!(xml_value(xml, "IsTruncated").as_deref(), Some("false"));
    }
}
