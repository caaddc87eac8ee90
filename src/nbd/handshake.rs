//! The fixed newstyle handshake: from the server's greeting to the transmission phase.
//!
//! Sequence: greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags) → client flags
//! (`FIXED_NEWSTYLE`, `NO_ZEROES` when offered) → `NBD_OPT_STRUCTURED_REPLY` →
//! `NBD_OPT_SET_META_CONTEXT` for the requested contexts (when any) → `NBD_OPT_GO`
//! with `NBD_INFO_BLOCK_SIZE` requested. Options are sent one at a time; every
//! error names the export and the option.

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, Info, OptionReplyHeader};

/// Largest option reply payload accepted (a reply is a few names at most).
const MAX_OPTION_REPLY: u32 = 1 << 20;

/// What the negotiation settled.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
    pub structured_replies: bool,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    /// Meta contexts by name with the id the server gave each, in request order.
    pub contexts: Vec<(String, u32)>,
}

/// Run the handshake for `export`, selecting `contexts`.
pub async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    export: &str,
    contexts: &[&str],
) -> Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut conn = OptionConn { rd, wr, export };
    let handshake_flags = conn.greeting().await?;
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if handshake_flags & proto::FLAG_NO_ZEROES != 0 {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    conn.wr
        .write_all(&client_flags.to_be_bytes())
        .await
        .context("sending client flags")?;

    let structured_replies = conn.structured_reply().await?;
    let contexts = if contexts.is_empty() {
        Vec::new()
    } else {
        ensure!(
            structured_replies,
            "NBD server does not support structured replies, needed for meta contexts {contexts:?}"
        );
        conn.set_meta_contexts(contexts).await?
    };
    let mut negotiated = conn.go().await?;
    negotiated.structured_replies = structured_replies;
    negotiated.contexts = contexts;
    tracing::debug!(
        "NBD export '{export}': handshake flags {handshake_flags:#x}, size {} bytes, transmission flags {:#x}, structured replies {structured_replies}, block sizes {}/{}/{} (min/preferred/max), meta contexts {:?}",
        negotiated.size,
        negotiated.transmission_flags,
        negotiated.min_block,
        negotiated.preferred_block,
        negotiated.max_block,
        negotiated.contexts
    );
    Ok(negotiated)
}

struct OptionConn<'a, R, W> {
    rd: &'a mut R,
    wr: &'a mut W,
    export: &'a str,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> OptionConn<'_, R, W> {
    /// Read the server's greeting; returns its handshake flags.
    async fn greeting(&mut self) -> Result<u16> {
        let mut buf = [0u8; 18];
        self.rd
            .read_exact(&mut buf[..16])
            .await
            .context("reading the NBD server greeting")?;
        let magic = proto::be_u64(&buf[0..8]);
        ensure!(
            magic == proto::NBDMAGIC,
            "not an NBD server (greeting starts {magic:#018x})"
        );
        let style = proto::be_u64(&buf[8..16]);
        if style == proto::OLDSTYLE_MAGIC {
            bail!("NBD server speaks the oldstyle protocol, which is not supported");
        }
        ensure!(
            style == proto::IHAVEOPT,
            "NBD server greeting has unknown magic {style:#018x}"
        );
        self.rd
            .read_exact(&mut buf[16..18])
            .await
            .context("reading the NBD handshake flags")?;
        let flags = proto::be_u16(&buf[16..18]);
        ensure!(
            flags & proto::FLAG_FIXED_NEWSTYLE != 0,
            "NBD server does not support the fixed newstyle handshake"
        );
        Ok(flags)
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.wr
            .write_all(&proto::encode_option(option, data))
            .await
            .with_context(|| format!("sending {}", proto::option_name(option)))?;
        self.wr
            .flush()
            .await
            .with_context(|| format!("sending {}", proto::option_name(option)))
    }

    /// Read one reply to `option`: its type and data.
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let name = proto::option_name(option);
        let mut head = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.rd
            .read_exact(&mut head)
            .await
            .with_context(|| format!("reading the reply to {name}"))?;
        let header = OptionReplyHeader::parse(&head)
            .with_context(|| format!("reading the reply to {name}"))?;
        ensure!(
            header.option == option,
            "NBD server answered {} to {name}",
            proto::option_name(header.option)
        );
        ensure!(
            header.length <= MAX_OPTION_REPLY,
            "NBD server sent a {}-byte reply to {name}",
            header.length
        );
        let mut data = vec![0u8; header.length as usize];
        self.rd
            .read_exact(&mut data)
            .await
            .with_context(|| format!("reading the reply to {name}"))?;
        Ok((header.reply, data))
    }

    /// An error reply as a message naming the option, the export and the server's text.
    fn option_error(&self, option: u32, reply: u32, data: &[u8]) -> anyhow::Error {
        let text = String::from_utf8_lossy(data);
        let what = if reply == proto::REP_ERR_UNKNOWN {
            format!("NBD server has no export '{}'", self.export)
        } else {
            format!(
                "NBD server refused {} for export '{}': {}",
                proto::option_name(option),
                self.export,
                proto::option_error_name(reply)
            )
        };
        if text.is_empty() {
            anyhow!(what)
        } else {
            anyhow!("{what} (server says: {text})")
        }
    }

    async fn structured_reply(&mut self) -> Result<bool> {
        let option = proto::OPT_STRUCTURED_REPLY;
        self.send_option(option, &[]).await?;
        let (reply, data) = self.reply(option).await?;
        match reply {
            proto::REP_ACK => Ok(true),
            proto::REP_ERR_UNSUP => Ok(false),
            _ => Err(self.option_error(option, reply, &data)),
        }
    }

    /// Select `queries`; every one must come back with an id.
    async fn set_meta_contexts(&mut self, queries: &[&str]) -> Result<Vec<(String, u32)>> {
        let option = proto::OPT_SET_META_CONTEXT;
        let data = proto::meta_context_data(self.export, queries);
        self.send_option(option, &data).await?;
        let mut selected: Vec<(String, u32)> = Vec::new();
        loop {
            let (reply, data) = self.reply(option).await?;
            match reply {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context(&data)?;
                    selected.push((name, id));
                }
                proto::REP_ACK => break,
                _ if reply & proto::REP_FLAG_ERROR != 0 => {
                    return Err(self.option_error(option, reply, &data));
                }
                _ => bail!("unexpected reply {reply} to NBD_OPT_SET_META_CONTEXT"),
            }
        }
        let mut ordered = Vec::with_capacity(queries.len());
        for query in queries {
            match selected.iter().find(|(name, _)| name == query) {
                Some(entry) => ordered.push(entry.clone()),
                None => {
                    let offered = match self.list_meta_contexts().await {
                        Ok(names) if names.is_empty() => "server offers none".to_string(),
                        Ok(names) => format!("server offers: {}", names.join(", ")),
                        Err(e) => format!("listing the server's contexts failed: {e:#}"),
                    };
                    bail!(
                        "NBD export '{}' has no meta context '{query}' ({offered})",
                        self.export
                    );
                }
            }
        }
        Ok(ordered)
    }

    /// Every meta context the server has for the export (for error messages).
    async fn list_meta_contexts(&mut self) -> Result<Vec<String>> {
        let option = proto::OPT_LIST_META_CONTEXT;
        self.send_option(option, &proto::meta_context_data(self.export, &[]))
            .await?;
        let mut names = Vec::new();
        loop {
            let (reply, data) = self.reply(option).await?;
            match reply {
                proto::REP_META_CONTEXT => names.push(proto::parse_meta_context(&data)?.1),
                proto::REP_ACK => return Ok(names),
                _ => return Err(self.option_error(option, reply, &data)),
            }
        }
    }

    /// `NBD_OPT_GO`: export size, flags and block sizes; ends the handshake.
    async fn go(&mut self) -> Result<Negotiated> {
        let option = proto::OPT_GO;
        self.send_option(
            option,
            &proto::go_data(self.export, &[proto::INFO_BLOCK_SIZE]),
        )
        .await?;
        let mut export_info = None;
        let mut block = (
            proto::DEFAULT_MIN_BLOCK,
            proto::DEFAULT_PREFERRED_BLOCK,
            proto::DEFAULT_MAX_BLOCK,
        );
        loop {
            let (reply, data) = self.reply(option).await?;
            match reply {
                proto::REP_INFO => match proto::parse_info(&data)? {
                    Info::Export { size, flags } => export_info = Some((size, flags)),
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        ensure!(
                            min.is_power_of_two() && min <= 65536 && max >= min,
                            "NBD export '{}' has invalid block sizes min {min}, max {max}",
                            self.export
                        );
                        block = (min, preferred.max(min), max);
                    }
                    Info::Other(_) => {}
                },
                proto::REP_ACK => break,
                _ if reply & proto::REP_FLAG_ERROR != 0 => {
                    return Err(self.option_error(option, reply, &data));
                }
                _ => bail!("unexpected reply {reply} to NBD_OPT_GO"),
            }
        }
        let (size, transmission_flags) = export_info.ok_or_else(|| {
            anyhow!(
                "NBD server sent no size for export '{}' (no NBD_INFO_EXPORT)",
                self.export
            )
        })?;
        Ok(Negotiated {
            size,
            transmission_flags,
            structured_replies: false,
            min_block: block.0,
            preferred_block: block.1,
            max_block: block.2,
            contexts: Vec::new(),
        })
    }
}
