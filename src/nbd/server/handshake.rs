//! The server side of the fixed newstyle handshake: greeting, client flags, then
//! options one at a time until `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME` (transmission)
//! or `NBD_OPT_ABORT` / a closed socket (no session).
//!
//! Supported: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation` only). Every
//! other option (TLS, extended headers) gets `NBD_REP_ERR_UNSUP`, so clients fall
//! back to what is supported.

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{transmission_flags, Export, Session, BASE_ALLOCATION_ID, MAX_READ};
use crate::nbd::proto::{self, *};
use crate::nbd::BASE_ALLOCATION;

/// Option data longer than this is refused (`NBD_REP_ERR_TOO_BIG`) and skipped.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Option data longer than this closes the connection (not worth skipping).
const MAX_SKIPPED_DATA: u32 = 16 * 1024 * 1024;
/// Options after which a client that never picks an export is dropped.
const MAX_OPTIONS: usize = 1024;

/// Run the handshake; `None` when the client left without choosing an export.
pub(super) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &[Export],
) -> Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::encode_greeting(
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    ))
    .await
    .context("sending the greeting")?;
    wr.flush().await?;
    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags)
        .await
        .context("reading client flags")?;
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        bail!("client sent unknown flags {client_flags:#x}");
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut conn = Options {
        wr,
        exports,
        structured: false,
        base_allocation: false,
    };
    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; OPTION_HEADER_LEN];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e).context("reading an option"),
        }
        let (option, len) = proto::parse_option_header(&head)?;
        if len > MAX_OPTION_DATA {
            if len > MAX_SKIPPED_DATA {
                bail!("client sent {len} bytes of option data");
            }
            tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink()).await?;
            conn.error(option, REP_ERR_TOO_BIG, "option data too long")
                .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data)
            .await
            .context("reading option data")?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = find(exports, &name) else {
                    // This option has no error reply: the protocol says to disconnect.
                    bail!("client asked for unknown export '{name}'");
                };
                let reply = proto::export_name_reply(
                    export.source.size(),
                    transmission_flags(conn.structured),
                    no_zeroes,
                );
                conn.wr.write_all(&reply).await?;
                conn.wr.flush().await?;
                return Ok(Some(conn.session(export.clone())));
            }
            OPT_ABORT => {
                let _ = conn.reply(option, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => conn.list(&data).await?,
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    conn.structured = true;
                    conn.reply(option, REP_ACK, &[]).await?;
                } else {
                    conn.error(option, REP_ERR_INVALID, "option takes no data")
                        .await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                conn.meta_context(option, &data).await?
            }
            OPT_INFO | OPT_GO => {
                if let Some(export) = conn.info(option, &data).await? {
                    if option == OPT_GO {
                        return Ok(Some(conn.session(export)));
                    }
                }
            }
            _ => {
                let name = proto::option_name(option);
                conn.error(option, REP_ERR_UNSUP, &format!("{name} is not supported"))
                    .await?
            }
        }
    }
    bail!("client sent {MAX_OPTIONS} options without choosing an export")
}

/// The export a client names; `""` means the only export, when there is one.
fn find<'a>(exports: &'a [Export], name: &str) -> Option<&'a Export> {
    if name.is_empty() && exports.len() == 1 {
        return exports.first();
    }
    exports.iter().find(|e| e.name == name)
}

struct Options<'a, W> {
    wr: &'a mut W,
    exports: &'a [Export],
    structured: bool,
    base_allocation: bool,
}

impl<W: AsyncWrite + Unpin> Options<'_, W> {
    fn session(&self, export: Export) -> Session {
        Session {
            export,
            structured: self.structured,
            base_allocation: self.structured && self.base_allocation,
        }
    }

    async fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Result<()> {
        self.wr
            .write_all(&proto::encode_option_reply(option, reply, data))
            .await?;
        self.wr.flush().await?;
        Ok(())
    }

    async fn error(&mut self, option: u32, reply: u32, message: &str) -> Result<()> {
        self.reply(option, reply, message.as_bytes()).await
    }

    async fn list(&mut self, data: &[u8]) -> Result<()> {
        if !data.is_empty() {
            return self
                .error(OPT_LIST, REP_ERR_INVALID, "option takes no data")
                .await;
        }
        for export in self.exports {
            let entry = proto::server_reply_data(&export.name);
            self.reply(OPT_LIST, REP_SERVER, &entry).await?;
        }
        self.reply(OPT_LIST, REP_ACK, &[]).await
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let Ok((export, queries)) = proto::parse_meta_context_data(data) else {
            return self
                .error(option, REP_ERR_INVALID, "malformed meta context request")
                .await;
        };
        if option == OPT_SET_META_CONTEXT && !self.structured {
            return self
                .error(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                )
                .await;
        }
        if find(self.exports, &export).is_none() {
            return self
                .error(option, REP_ERR_UNKNOWN, &format!("no export '{export}'"))
                .await;
        }
        let selected = if option == OPT_LIST_META_CONTEXT {
            queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
        } else {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        };
        if option == OPT_SET_META_CONTEXT {
            self.base_allocation = selected;
        }
        if selected {
            let entry = proto::meta_context_reply_data(BASE_ALLOCATION_ID, BASE_ALLOCATION);
            self.reply(option, REP_META_CONTEXT, &entry).await?;
        }
        self.reply(option, REP_ACK, &[]).await
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`: describe the export; its value when found.
    async fn info(&mut self, option: u32, data: &[u8]) -> Result<Option<Export>> {
        let Ok((name, infos)) = proto::parse_go_data(data) else {
            self.error(option, REP_ERR_INVALID, "malformed request")
                .await?;
            return Ok(None);
        };
        let Some(export) = find(self.exports, &name).cloned() else {
            let known: Vec<&str> = self.exports.iter().map(|e| e.name.as_str()).collect();
            let msg = format!("no export '{name}' (exports: {})", known.join(", "));
            self.error(option, REP_ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        };
        let flags = transmission_flags(self.structured);
        let info = proto::info_export_data(export.source.size(), flags);
        self.reply(option, REP_INFO, &info).await?;
        for kind in infos {
            let payload = match kind {
                INFO_BLOCK_SIZE => proto::info_block_size_data(1, 4096, MAX_READ),
                INFO_NAME => proto::info_text_data(INFO_NAME, &export.name),
                INFO_DESCRIPTION => proto::info_text_data(INFO_DESCRIPTION, &export.description),
                _ => continue,
            };
            self.reply(option, REP_INFO, &payload).await?;
        }
        self.reply(option, REP_ACK, &[]).await?;
        Ok(Some(export))
    }
}
